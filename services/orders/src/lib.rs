//! order-service: places orders against the user and product services.
//!
//! Layout:
//! - this file: routes, state, the order model and the database side.
//! - [`dependencies`]: the HTTP calls to user-service and product-service
//!   (one pooled client, timeouts, error mapping).
//!
//! Placing an order: validate and merge the lines, check the user, reserve
//! all stock in one call (all or nothing), record the order; if recording
//! fails, release the reservation. The steps after validation run in their
//! own task, so a client that hangs up half-way cannot leave stock reserved
//! for an order that was never written.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use product_service::api::{ItemRequest, Reservation, merge_items};
use serde::{Deserialize, Serialize};
use service_kit::db::{self, DbError, Migration};
use service_kit::extract::{Json, Path, Query};
use service_kit::money::Money;
use service_kit::{AppError, AppResult};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqlitePool};

pub mod dependencies;

pub use dependencies::Dependencies;

pub const SERVICE_NAME: &str = "order-service";

pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    sql: include_str!("../migrations/0001_orders.sql"),
}];

/// Most lines in one order (after merging duplicates).
const MAX_LINES: usize = 100;
/// Largest quantity of one product in one order.
const MAX_QUANTITY: i64 = 1_000_000;

#[derive(Clone)]
pub struct AppState {
    pub db: SqlitePool,
    pub deps: Dependencies,
}

pub async fn open_db(path: &std::path::Path) -> Result<SqlitePool, DbError> {
    db::open(path, MIGRATIONS).await
}

pub fn app(state: AppState) -> Router {
    let routes = Router::new()
        .route("/orders", get(list_orders).post(create_order))
        .route("/orders/{id}", get(get_order))
        .with_state(state.clone());
    service_kit::serve::finish_router(routes, SERVICE_NAME, state.db)
}

#[derive(Debug, Deserialize)]
pub struct NewOrder {
    pub user_id: i64,
    pub items: Vec<ItemRequest>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderItem {
    pub product_id: i64,
    pub quantity: i64,
    pub price: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: i64,
    pub user_id: i64,
    pub items: Vec<OrderItem>,
    pub total: Money,
    pub status: String,
    /// RFC 3339, UTC.
    pub created_at: String,
}

const CONFIRMED: &str = "confirmed";

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

async fn create_order(
    State(state): State<AppState>,
    Json(new_order): Json<NewOrder>,
) -> AppResult<(StatusCode, Json<Order>)> {
    let items = validated_items(&new_order.items)?;
    let user_id = new_order.user_id;
    // Detached from the request: dropping this handler (client gone) must
    // not stop the task between reserving stock and recording the order.
    let placed = tokio::spawn(place_order(state, user_id, items))
        .await
        .map_err(|err| AppError::internal(format!("order task failed: {err}")))??;
    Ok((StatusCode::CREATED, Json(placed)))
}

async fn place_order(state: AppState, user_id: i64, items: Vec<ItemRequest>) -> AppResult<Order> {
    state.deps.check_user(user_id).await?;
    let reservation_id = uuid::Uuid::new_v4().to_string();
    let reservation = state.deps.reserve(&reservation_id, &items).await?;
    match record_order(&state.db, user_id, &reservation).await {
        Ok(order) => {
            tracing::info!(order = order.id, user_id, total = %order.total, "order placed");
            Ok(order)
        }
        Err(err) => {
            tracing::warn!(reservation = %reservation_id, error = %err, "recording the order failed; releasing stock");
            state.deps.release(&reservation_id).await;
            Err(err)
        }
    }
}

/// Writes the order and its lines in one transaction.
async fn record_order(
    db: &SqlitePool,
    user_id: i64,
    reservation: &Reservation,
) -> AppResult<Order> {
    let items: Vec<OrderItem> = reservation
        .items
        .iter()
        .map(|i| OrderItem {
            product_id: i.product_id,
            quantity: i.quantity,
            price: i.price,
        })
        .collect();
    let total = items
        .iter()
        .try_fold(Money::ZERO, |sum, i| {
            i.price
                .checked_mul(i.quantity)
                .and_then(|line| sum.checked_add(line))
        })
        .ok_or_else(|| AppError::unprocessable("order total is too large"))?;

    let mut tx = db.begin_with("BEGIN IMMEDIATE").await?;
    let row = sqlx::query(
        "INSERT INTO orders (user_id, total_cents, status, reservation_id)
         VALUES (?, ?, ?, ?) RETURNING id, created_at",
    )
    .bind(user_id)
    .bind(total.cents())
    .bind(CONFIRMED)
    .bind(&reservation.id)
    .fetch_one(&mut *tx)
    .await?;
    let id: i64 = row.try_get("id")?;
    let created_at: String = row.try_get("created_at")?;
    for item in &items {
        sqlx::query(
            "INSERT INTO order_items (order_id, product_id, quantity, price_cents)
             VALUES (?, ?, ?, ?)",
        )
        .bind(id)
        .bind(item.product_id)
        .bind(item.quantity)
        .bind(item.price.cents())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Order {
        id,
        user_id,
        items,
        total,
        status: CONFIRMED.to_owned(),
        created_at,
    })
}

#[derive(Debug, Deserialize)]
pub struct OrderFilter {
    pub user_id: Option<i64>,
}

async fn list_orders(
    State(state): State<AppState>,
    Query(filter): Query<OrderFilter>,
) -> AppResult<Json<Vec<Order>>> {
    let rows = sqlx::query(
        "SELECT id, user_id, total_cents, status, created_at FROM orders
         WHERE ?1 IS NULL OR user_id = ?1 ORDER BY id",
    )
    .bind(filter.user_id)
    .fetch_all(&state.db)
    .await?;
    let mut orders = rows
        .iter()
        .map(order_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    // One query for all lines, grouped by order in memory.
    let item_rows = sqlx::query(
        "SELECT oi.order_id, oi.product_id, oi.quantity, oi.price_cents
         FROM order_items oi JOIN orders o ON o.id = oi.order_id
         WHERE ?1 IS NULL OR o.user_id = ?1
         ORDER BY oi.order_id, oi.product_id",
    )
    .bind(filter.user_id)
    .fetch_all(&state.db)
    .await?;
    let mut index = 0;
    for row in &item_rows {
        let order_id: i64 = row.try_get("order_id")?;
        // Both lists are sorted by order id; walk them together.
        while orders.get(index).is_some_and(|o| o.id < order_id) {
            index += 1;
        }
        if let Some(order) = orders.get_mut(index).filter(|o| o.id == order_id) {
            order.items.push(item_from_row(row)?);
        }
    }
    Ok(Json(orders))
}

async fn get_order(State(state): State<AppState>, Path(id): Path<i64>) -> AppResult<Json<Order>> {
    let row =
        sqlx::query("SELECT id, user_id, total_cents, status, created_at FROM orders WHERE id = ?")
            .bind(id)
            .fetch_optional(&state.db)
            .await?
            .ok_or_else(|| AppError::not_found("Order not found"))?;
    let mut order = order_from_row(&row)?;
    let item_rows = sqlx::query(
        "SELECT product_id, quantity, price_cents FROM order_items
         WHERE order_id = ? ORDER BY product_id",
    )
    .bind(id)
    .fetch_all(&state.db)
    .await?;
    order.items = item_rows
        .iter()
        .map(item_from_row)
        .collect::<Result<_, _>>()?;
    Ok(Json(order))
}

fn order_from_row(row: &SqliteRow) -> Result<Order, sqlx::Error> {
    Ok(Order {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        items: Vec::new(),
        total: Money::from_cents(row.try_get("total_cents")?),
        status: row.try_get("status")?,
        created_at: row.try_get("created_at")?,
    })
}

fn item_from_row(row: &SqliteRow) -> Result<OrderItem, sqlx::Error> {
    Ok(OrderItem {
        product_id: row.try_get("product_id")?,
        quantity: row.try_get("quantity")?,
        price: Money::from_cents(row.try_get("price_cents")?),
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
}
