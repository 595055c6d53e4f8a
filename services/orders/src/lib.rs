//! order-service: places orders against the user and product services.
//!
//! Layout:
//! - this file: routes, state, the order model, reading orders.
//! - [`saga`]: placing an order as a saga with durable states, recovering
//!   interrupted ones, cancelling (through the broker when there is one).
//! - [`dependencies`]: the HTTP calls to user-service and product-service
//!   (timeouts, error mapping), on [`connections`]: kept-alive HTTP/1.1
//!   connections of its own.
//!
//! The steps of placing an order run in their own task, so a client that
//! hangs up half-way cannot stop it between two steps; and every step's
//! outcome is in the database before the next one, so a crash anywhere is
//! finished by recovery.

use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use product_service::api::{ItemRequest, merge_items};
use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use service_kit::db::{self, Db, DbError, Migration};
use service_kit::events::{self, Broker, Relay};
use service_kit::extract::{Json, Path, Query};
use service_kit::money::Money;
use service_kit::openapi::ErrorBody;
use service_kit::page::Page;
use service_kit::{AppError, AppResult};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub mod connections;
pub mod dependencies;
pub mod saga;

pub use dependencies::Dependencies;

pub const SERVICE_NAME: &str = "order-service";

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../migrations/0001_orders.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../migrations/0002_saga.sql"),
    },
    Migration {
        version: 3,
        sql: events::OUTBOX_SQL,
    },
    Migration {
        version: 4,
        sql: include_str!("../migrations/0004_fewer_btrees.sql"),
    },
    Migration {
        version: 5,
        sql: events::OUTBOX_V2_SQL,
    },
    Migration {
        version: 6,
        sql: events::OUTBOX_V3_SQL,
    },
];

/// Most lines in one order (after merging duplicates).
const MAX_LINES: usize = 100;
/// Largest quantity of one product in one order.
const MAX_QUANTITY: i64 = 1_000_000;

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub deps: Dependencies,
    /// Publishes the outbox (idle without a broker).
    pub relay: Relay,
    /// The broker, if events flow (cancellation goes through it).
    pub broker: Option<Broker>,
}

impl AppState {
    /// State without a broker.
    pub fn new(db: Db, deps: Dependencies) -> Self {
        AppState {
            db,
            deps,
            relay: Relay::idle(),
            broker: None,
        }
    }
}

/// How recovery runs.
#[derive(Debug, Clone, Copy)]
pub struct Recovery {
    /// Pending orders younger than this are left alone.
    pub grace: Duration,
    pub every: Duration,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            grace: saga::DEFAULT_RECOVERY_GRACE,
            every: saga::DEFAULT_RECOVERY_INTERVAL,
        }
    }
}

/// Starts what runs beside the HTTP API: recovery, and with a broker the
/// outbox relay and the `stock.released` consumer.
pub fn start_background(state: &mut AppState, broker: Option<Broker>, recovery: Recovery) {
    if let Some(broker) = broker {
        state.relay = Relay::spawn(state.db.clone(), broker.clone());
        state.broker = Some(broker.clone());
        let consumer = state.clone();
        events::consume(
            broker,
            "STOCK",
            SERVICE_NAME,
            "stock.released",
            move |event| {
                let state = consumer.clone();
                async move { saga::on_stock_released(&state, event).await }
            },
        );
    }
    saga::spawn_recovery(state.clone(), recovery.grace, recovery.every);
}

pub async fn open_db(path: &std::path::Path) -> Result<Db, DbError> {
    db::open(path, MIGRATIONS).await
}

/// The service's routes, with the common layers, `/health`, `/metrics`,
/// `/openapi.json` and `/docs`.
pub fn app(state: AppState) -> Router {
    let db = state.db.clone();
    let routes = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_orders, create_order))
        .routes(routes!(get_order))
        .routes(routes!(cancel_order))
        .with_state(state);
    service_kit::serve::finish_router(routes, SERVICE_NAME, db)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "order-service", description = "Places orders (checking the user, reserving stock at product-service), lists and cancels them."),
    tags((name = "orders", description = "Orders and their saga: pending, then confirmed or failed; cancelling, then cancelled")),
)]
struct ApiDoc;

#[derive(Debug, Deserialize, ToSchema)]
pub struct NewOrder {
    #[serde(deserialize_with = "service_kit::number::integer")]
    pub user_id: i64,
    /// 1 to 100 different products (lines for the same product are added
    /// up), each quantity and each product's sum 1 to 1000000.
    #[schema(min_items = 1, value_type = Vec<OrderLine>)]
    pub items: Vec<ItemRequest>,
}

/// A line of a new order, as the document shows it: product-service's
/// `ItemRequest` with this service's quantity limit.
#[derive(ToSchema)]
#[allow(dead_code)] // Only its schema is used.
struct OrderLine {
    product_id: i64,
    #[schema(minimum = 1, maximum = 1_000_000)]
    quantity: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OrderItem {
    pub product_id: i64,
    pub quantity: i64,
    pub price: Money,
}

/// An order's state: see [`saga`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Confirmed,
    Failed,
    Cancelling,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Confirmed => "confirmed",
            Status::Failed => "failed",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }

    fn parse(text: &str) -> Option<Status> {
        [
            Status::Pending,
            Status::Confirmed,
            Status::Failed,
            Status::Cancelling,
            Status::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Order {
    pub id: i64,
    pub user_id: i64,
    pub items: Vec<OrderItem>,
    pub total: Money,
    pub status: Status,
    /// RFC 3339, UTC.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// Why a failed order failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Checks the lines and merges duplicates; every problem is a 422.
fn validated_items(items: &[ItemRequest]) -> AppResult<Vec<ItemRequest>> {
    if items.is_empty() {
        return Err(AppError::unprocessable("items must not be empty"));
    }
    if let Some(bad) = items.iter().find(|i| i.quantity < 1) {
        return Err(AppError::unprocessable(format!(
            "quantity for product {} must be at least 1",
            bad.product_id
        )));
    }
    let merged = merge_items(items)
        .filter(|m| m.iter().all(|i| i.quantity <= MAX_QUANTITY))
        .ok_or_else(|| {
            AppError::unprocessable(format!("quantity must be at most {MAX_QUANTITY}"))
        })?;
    if merged.len() > MAX_LINES {
        return Err(AppError::unprocessable(format!(
            "at most {MAX_LINES} different products per order"
        )));
    }
    Ok(merged)
}

/// Places an order: checks the user, holds the stock, records the order,
/// confirms the hold. 201 only once the order is confirmed.
#[utoipa::path(
    post,
    path = "/orders",
    tag = "orders",
    request_body = NewOrder,
    responses(
        (status = 201, description = "Placed and confirmed", body = Order),
        (status = 400, description = "Malformed JSON, or insufficient stock for a product", body = ErrorBody),
        (status = 404, description = "No such user, or no such product", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 422, description = "No items, a quantity out of bounds, too many lines, or a total too large", body = ErrorBody),
        (status = 503, description = "user-service, product-service or the database unavailable: the order was not placed", body = ErrorBody),
    )
)]
async fn create_order(
    State(state): State<AppState>,
    Json(new_order): Json<NewOrder>,
) -> AppResult<(StatusCode, Json<Order>)> {
    let items = validated_items(&new_order.items)?;
    let user_id = new_order.user_id;
    // Detached from the request: dropping this handler (client gone) must
    // not stop the task between two steps.
    let placed = tokio::spawn(service_kit::trace::carry(async move {
        saga::place(&state, user_id, items).await
    }))
    .await
    .map_err(|err| AppError::internal(format!("order task failed: {err}")))??;
    Ok((StatusCode::CREATED, Json(placed)))
}

/// `POST /orders/{id}/cancel`: 202 while the stock is being released (the
/// broker carries it), 200 once cancelled; 404 unknown; 409 failed or not
/// confirmed yet.
#[utoipa::path(
    post,
    path = "/orders/{id}/cancel",
    tag = "orders",
    params(("id" = i64, Path, description = "The order's id")),
    responses(
        (status = 200, description = "Cancelled (or already)", body = Order),
        (status = 202, description = "Cancelling: the stock is being given back", body = Order),
        (status = 404, description = "No such order", body = ErrorBody),
        (status = 409, description = "The order failed, or is not confirmed yet", body = ErrorBody),
        (status = 422, description = "The id is not an integer", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
async fn cancel_order(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> AppResult<(StatusCode, Json<Order>)> {
    let (order, on_its_way) = saga::cancel(&state, id).await?;
    let status = if on_its_way {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(order)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OrderFilter {
    /// Only this user's orders.
    pub user_id: Option<i64>,
    /// One state, or `all`; default: the orders their clients were told
    /// were placed (confirmed, cancelling, cancelled).
    #[param(pattern = "^(pending|confirmed|failed|cancelling|cancelled|all)$")]
    pub status: Option<String>,
    /// Most items in the answer (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// Only orders whose id is above this one (the previous page's last).
    #[param(minimum = 0)]
    pub after_id: Option<i64>,
}

/// The statuses `status=` selects.
fn statuses(filter: Option<&str>) -> AppResult<Vec<&'static str>> {
    match filter {
        None => Ok(vec!["confirmed", "cancelling", "cancelled"]),
        Some("all") => Ok(vec![
            "pending",
            "confirmed",
            "failed",
            "cancelling",
            "cancelled",
        ]),
        Some(one) => Status::parse(one).map(|s| vec![s.as_str()]).ok_or_else(|| {
            AppError::unprocessable(
                "status must be pending, confirmed, failed, cancelling, cancelled or all",
            )
        }),
    }
}

/// Orders, in id order, a page at a time.
#[utoipa::path(
    get,
    path = "/orders",
    tag = "orders",
    params(OrderFilter),
    responses(
        (status = 200, description = "One page of orders", body = Vec<Order>,
         headers(("link" = String, description = "`<?...&after_id=N>; rel=\"next\"` when another page may follow (a query-only reference)"))),
        (status = 422, description = "Bad `status`, `user_id`, `limit` or `after_id`", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
async fn list_orders(
    State(state): State<AppState>,
    Query(filter): Query<OrderFilter>,
    RawQuery(query): RawQuery,
) -> AppResult<Response> {
    let page = Page::new(filter.limit, filter.after_id)?;
    let wanted =
        serde_json::to_string(&statuses(filter.status.as_deref())?).map_err(AppError::internal)?;
    let (mut orders, items) = state.db.read(|conn| {
        // One snapshot for the page and its lines.
        let snapshot = conn.unchecked_transaction()?;
        let orders = snapshot
            .prepare_cached(
                "SELECT id, user_id, total_cents, status, created_at, failure_reason FROM orders
                 WHERE (?1 IS NULL OR user_id = ?1) AND status IN (SELECT value FROM json_each(?2))
                   AND id > ?3
                 ORDER BY id LIMIT ?4",
            )?
            .query_map(
                (filter.user_id, &wanted, page.after_id, page.fetch()),
                order_from_row,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        // One query for the page's lines, grouped by order in memory.
        let last = orders.last().map_or(page.after_id, |order| order.id);
        let items = snapshot
            .prepare_cached(
                "SELECT oi.product_id, oi.quantity, oi.price_cents, oi.order_id
                 FROM order_items oi JOIN orders o ON o.id = oi.order_id
                 WHERE (?1 IS NULL OR o.user_id = ?1) AND o.status IN (SELECT value FROM json_each(?2))
                   AND o.id > ?3 AND o.id <= ?4
                 ORDER BY oi.order_id, oi.product_id",
            )?
            .query_map((filter.user_id, &wanted, page.after_id, last), |row| {
                // The line's columns first, as `item_from_row` reads them.
                Ok((row.get::<_, i64>(3)?, item_from_row(row)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok::<_, AppError>((orders, items))
    })?;
    let mut index = 0;
    for (order_id, item) in items {
        // Both lists are sorted by order id; walk them together.
        while orders.get(index).is_some_and(|o| o.id < order_id) {
            index += 1;
        }
        if let Some(order) = orders.get_mut(index).filter(|o| o.id == order_id) {
            order.items.push(item);
        }
    }
    Ok(page.answer(orders, |order| order.id, query.as_deref()))
}

#[utoipa::path(
    get,
    path = "/orders/{id}",
    tag = "orders",
    params(("id" = i64, Path, description = "The order's id")),
    responses(
        (status = 200, description = "The order, in any state", body = Order),
        (status = 404, description = "No such order", body = ErrorBody),
        (status = 422, description = "The id is not an integer", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
async fn get_order(State(state): State<AppState>, Path(id): Path<i64>) -> AppResult<Json<Order>> {
    let order = state.db.read(|conn| {
        // One snapshot for the order and its lines.
        let snapshot = conn.unchecked_transaction()?;
        Ok::<_, AppError>(load_order(&snapshot, id)?)
    })?;
    Ok(Json(
        order.ok_or_else(|| AppError::not_found("Order not found"))?,
    ))
}

/// The order `id` with its lines, in any state. Run it in a transaction:
/// two statements.
pub fn load_order(conn: &Connection, id: i64) -> rusqlite::Result<Option<Order>> {
    let order = conn
        .prepare_cached(
            "SELECT id, user_id, total_cents, status, created_at, failure_reason FROM orders WHERE id = ?",
        )?
        .query_row([id], order_from_row)
        .optional()?;
    let Some(mut order) = order else {
        return Ok(None);
    };
    order.items = conn
        .prepare_cached(
            "SELECT product_id, quantity, price_cents FROM order_items
             WHERE order_id = ? ORDER BY product_id",
        )?
        .query_map([id], item_from_row)?
        .collect::<Result<_, _>>()?;
    Ok(Some(order))
}

/// A row of `id, user_id, total_cents, status, created_at, failure_reason`.
fn order_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Order> {
    service_kit::db::check_columns(
        row,
        &[
            "id",
            "user_id",
            "total_cents",
            "status",
            "created_at",
            "failure_reason",
        ],
    );
    let status: String = row.get(3)?;
    Ok(Order {
        id: row.get(0)?,
        user_id: row.get(1)?,
        items: Vec::new(),
        total: Money::from_cents(row.get(2)?),
        status: Status::parse(&status).unwrap_or(Status::Failed),
        created_at: row.get(4)?,
        reason: row.get(5)?,
    })
}

/// A row whose first columns are `product_id, quantity, price_cents`.
fn item_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<OrderItem> {
    service_kit::db::check_columns(row, &["product_id", "quantity", "price_cents"]);
    Ok(OrderItem {
        product_id: row.get(0)?,
        quantity: row.get(1)?,
        price: Money::from_cents(row.get(2)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(product_id: i64, quantity: i64) -> ItemRequest {
        ItemRequest {
            product_id,
            quantity,
        }
    }

    #[test]
    fn validation_rejects_empty_and_non_positive_and_merges() {
        let status = |items: &[ItemRequest]| validated_items(items).unwrap_err().status();
        assert_eq!(status(&[]), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(status(&[item(1, 0)]), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(status(&[item(1, -3)]), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            status(&[item(1, MAX_QUANTITY), item(1, 1)]),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            validated_items(&[item(2, 1), item(1, 1), item(2, 2)]).unwrap(),
            vec![item(1, 1), item(2, 3)]
        );
    }

    /// A file written before order lines were stored in their key keeps
    /// its orders, lines and events across the migration.
    #[tokio::test]
    async fn the_fewer_btrees_migration_keeps_what_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orders.db");
        let before = db::open(&path, &MIGRATIONS[..3]).await.unwrap();
        before
            .write(|conn| {
                conn.execute_batch(
                    "INSERT INTO orders (user_id, total_cents, status, reservation_id)
                         VALUES (7, 263997, 'confirmed', 'r-1');
                     INSERT INTO order_items VALUES (1, 1, 2, 129999), (1, 3, 1, 3999);
                     INSERT INTO outbox (event_id, subject, payload) VALUES ('e-1', 'orders.confirmed', '{}');",
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
                    "order.cancelled",
                    "order/1".into(),
                    serde_json::json!({}),
                )
                .map_err(db::Error::from)
            })
            .await
            .unwrap();
        after
            .read(|conn| {
                let schema = |table| service_kit::testing::table_sql(conn, table);
                assert!(schema("order_items")?.ends_with("WITHOUT ROWID"));
                assert!(!schema("outbox")?.contains("AUTOINCREMENT"));
                let lines: i64 = conn.query_row(
                    "SELECT sum(quantity * price_cents) FROM order_items WHERE order_id = 1",
                    [],
                    |r| r.get(0),
                )?;
                assert_eq!(lines, 263_997);
                let events = service_kit::testing::outbox_subjects(conn)?;
                assert_eq!(
                    events,
                    [
                        (1, "orders.confirmed".to_owned()),
                        (2, "orders.cancelled".to_owned())
                    ]
                );
                Ok::<_, db::Error>(())
            })
            .unwrap();
        // A line must still name an order that exists.
        let orphan = after
            .write(|conn| {
                conn.execute("INSERT INTO order_items VALUES (99, 1, 1, 1)", [])
                    .map_err(db::Error::from)
            })
            .await;
        assert!(orphan.is_err(), "{orphan:?}");
    }
}
