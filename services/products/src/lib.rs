//! product-service: the catalogue, stock, and stock reservations.
//!
//! Layout:
//! - [`catalog`]: `POST /products`, `GET /products?category=`,
//!   `GET /products/{id}`, `PUT /products/{id}/stock?stock_change=N`.
//! - [`reservations`]: `POST /reservations` (all-or-nothing hold of stock for
//!   several products), `GET /reservations/{id}`, `POST
//!   /reservations/{id}/confirm` (the order is placed) and `POST
//!   /reservations/{id}/release` (compensation, cancellation), used by the
//!   order service; a held reservation not confirmed in time expires.
//!   `order.cancelled` events release their reservation too.
//! - [`api`]: the JSON bodies of the reservation endpoints, shared with the
//!   order service so both sides agree on the wire format.
//!
//! Invariant: stock only ever changes through a single conditional `UPDATE`
//! inside the statement or transaction that needs it; never read-then-write.

use std::time::Duration;

use axum::Router;
use service_kit::db::{self, Db, DbError, Migration};
use service_kit::events::{self, Broker, Relay};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub mod api;
pub mod catalog;
pub mod reservations;

pub const SERVICE_NAME: &str = "product-service";

/// The schema and the seed catalogue, in order; applied by [`open_db`].
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../migrations/0001_products.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../migrations/0002_seed.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../migrations/0003_reservation_states.sql"),
    },
    Migration {
        version: 4,
        sql: events::OUTBOX_SQL,
    },
    Migration {
        version: 5,
        sql: include_str!("../migrations/0005_fewer_btrees.sql"),
    },
    Migration {
        version: 6,
        sql: events::OUTBOX_V2_SQL,
    },
    Migration {
        version: 7,
        sql: include_str!("../migrations/0007_checks_without_in_lists.sql"),
    },
    Migration {
        version: 8,
        sql: events::OUTBOX_V3_SQL,
    },
];

/// How long a reservation is held unconfirmed before its stock returns: far
/// longer than placing an order takes (milliseconds) or than the order
/// service's recovery needs after a crash (seconds), short enough that stock
/// an order service never comes back for is not gone for long.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(300);

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    /// How long an unconfirmed reservation holds its stock.
    pub hold: Duration,
    /// Publishes the outbox (idle without a broker).
    pub relay: Relay,
}

impl AppState {
    /// State for `db` with the default hold and no broker.
    pub fn new(db: Db) -> Self {
        AppState {
            db,
            hold: DEFAULT_HOLD,
            relay: Relay::idle(),
        }
    }
}

/// Starts what runs beside the HTTP API: expiring reservations, and with a
/// broker the outbox relay and the `order.cancelled` consumer.
pub fn start_background(state: &mut AppState, broker: Option<Broker>) {
    if let Some(broker) = broker {
        state.relay = Relay::spawn(state.db.clone(), broker.clone());
        let consumer = state.clone();
        events::consume(
            broker,
            "ORDERS",
            SERVICE_NAME,
            "orders.cancelled",
            move |event| {
                let state = consumer.clone();
                async move { reservations::on_order_cancelled(&state, event).await }
            },
        );
    }
    let every = (state.hold / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    reservations::spawn_expiry(state.clone(), every);
}

/// Opens the product database at `path`, creating, migrating and seeding it
/// if needed.
pub async fn open_db(path: &std::path::Path) -> Result<Db, DbError> {
    db::open(path, MIGRATIONS).await
}

/// The service's routes, with the common layers, `/health`, `/metrics`,
/// `/openapi.json` and `/docs`.
pub fn app(state: AppState) -> Router {
    let db = state.db.clone();
    let routes = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(catalog::list_products, catalog::create_product))
        .routes(routes!(catalog::get_product))
        .routes(routes!(catalog::change_stock))
        .routes(routes!(reservations::reserve))
        .routes(routes!(reservations::get))
        .routes(routes!(reservations::confirm))
        .routes(routes!(reservations::release))
        .with_state(state);
    service_kit::serve::finish_router(routes, SERVICE_NAME, db)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "product-service", description = "The catalogue, stock, and stock reservations."),
    tags(
        (name = "products", description = "The catalogue and its stock"),
        (name = "reservations", description = "All-or-nothing holds of stock, used by order-service"),
    ),
)]
struct ApiDoc;

#[cfg(test)]
mod tests {
    use super::*;

    /// A file written before the schema stored reservations in their keys
    /// keeps its reservations, lines and events across the migration.
    #[tokio::test]
    async fn the_fewer_btrees_migration_keeps_what_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("products.db");
        let before = db::open(&path, &MIGRATIONS[..4]).await.unwrap();
        before
            .write(|conn| {
                conn.execute_batch(
                    "INSERT INTO reservations (id, status, expires_at) VALUES ('r-1', 'held', 99);
                     INSERT INTO reservations (id, status) VALUES ('r-2', 'confirmed');
                     INSERT INTO reservation_items VALUES ('r-1', 1, 2, 129999), ('r-2', 3, 1, 3999);
                     INSERT INTO outbox (event_id, subject, payload) VALUES ('e-1', 'stock.reserved', '{}');
                     INSERT INTO inbox (event_id) VALUES ('seen');",
                )
                .map_err(db::Error::from)
            })
            .await
            .unwrap();
        before.close().await;

        let after = open_db(&path).await.unwrap();
        after
            .write(|conn| {
                events::record(
                    conn,
                    SERVICE_NAME,
                    "stock.released",
                    "reservation/r-1".into(),
                    serde_json::json!({}),
                )
                .map_err(db::Error::from)
            })
            .await
            .unwrap();
        after
            .read(|conn| {
                let schema = |table| service_kit::testing::table_sql(conn, table);
                for table in ["reservations", "reservation_items", "inbox"] {
                    assert!(
                        schema(table)?.ends_with("WITHOUT ROWID"),
                        "{table}: {}",
                        schema(table)?
                    );
                }
                assert!(!schema("outbox")?.contains("AUTOINCREMENT"));
                // Statuses are checked by comparisons (0007), and still checked.
                assert!(!schema("reservations")?.contains(" IN ("));
                assert!(
                    conn.execute(
                        "INSERT INTO reservations (id, status) VALUES ('r-3', 'lost')",
                        []
                    )
                    .is_err()
                );
                let held: (String, Option<i64>) = conn.query_row(
                    "SELECT status, expires_at FROM reservations WHERE id = 'r-1'",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                assert_eq!(held, ("held".to_owned(), Some(99)));
                let lines: i64 = conn.query_row(
                    "SELECT sum(quantity * price_cents) FROM reservation_items",
                    [],
                    |r| r.get(0),
                )?;
                assert_eq!(lines, 2 * 129_999 + 3_999);
                let events = service_kit::testing::outbox_subjects(conn)?;
                assert_eq!(
                    events,
                    [
                        (1, "stock.reserved".to_owned()),
                        (2, "stock.released".to_owned())
                    ]
                );
                let seen: i64 = conn.query_row(
                    "SELECT count(*) FROM inbox WHERE event_id = 'seen'",
                    [],
                    |r| r.get(0),
                )?;
                assert_eq!(seen, 1);
                // No line lost its reservation in the rebuild.
                let mut check = conn.prepare("PRAGMA foreign_key_check")?;
                assert!(check.query([])?.next()?.is_none());
                Ok::<_, db::Error>(())
            })
            .unwrap();
        // A line must still name a reservation that exists.
        let orphan = after
            .write(|conn| {
                conn.execute(
                    "INSERT INTO reservation_items VALUES ('nobody', 1, 1, 1)",
                    [],
                )
                .map_err(db::Error::from)
            })
            .await;
        assert!(orphan.is_err(), "{orphan:?}");
    }
}
