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
