//! Stock reservations: hold stock for several products at once, all or
//! nothing, and give it back (the order service's compensation).
//!
//! Both operations run in one `BEGIN IMMEDIATE` transaction, which takes
//! SQLite's write lock up front: two reservations (in this process or in
//! another instance on the same file) run one after the other, and a failure
//! half-way rolls back every line already taken.
//!
//! Reservation ids are chosen by the caller. Reserving an id that is already
//! held returns the existing reservation (a retried request does not reserve
//! twice); releasing an id that was never reserved records it as released, so
//! a reserve that arrives late (the caller gave up waiting and released)
//! cannot take stock that nobody will ever give back.

use axum::extract::State;
use axum::http::StatusCode;
use service_kit::extract::{Json, Path};
use service_kit::money::Money;
use service_kit::{AppError, AppResult};
use sqlx::{Row, Sqlite, Transaction};

use crate::AppState;
use crate::api::{Reservation, ReservationStatus, ReserveRequest, ReservedItem, merge_items};
use crate::catalog::MAX_STOCK;

/// Most distinct products in one reservation; an order is a basket, not a
/// warehouse transfer.
const MAX_LINES: usize = 100;
/// Longest caller-chosen reservation id.
const MAX_ID_CHARS: usize = 64;

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_CHARS
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `POST /reservations`: 201 with the held lines and their prices; 404
/// `Product N not found`; 400 `Insufficient stock for product N`; 409 if the
/// id was already released. Nothing is held unless everything is.
pub async fn reserve(
    State(state): State<AppState>,
    Json(request): Json<ReserveRequest>,
) -> AppResult<(StatusCode, Json<Reservation>)> {
    let id = match request.id {
        Some(id) if valid_id(&id) => id,
        Some(_) => {
            return Err(AppError::unprocessable(format!(
                "id must be 1 to {MAX_ID_CHARS} letters, digits, '-' or '_'"
            )));
        }
        None => uuid::Uuid::new_v4().to_string(),
    };
    if request.items.is_empty() {
        return Err(AppError::unprocessable("items must not be empty"));
    }
    if let Some(bad) = request.items.iter().find(|i| i.quantity < 1) {
        return Err(AppError::unprocessable(format!(
            "quantity for product {} must be at least 1",
            bad.product_id
        )));
    }
    let items = merge_items(&request.items)
        .filter(|items| items.iter().all(|i| i.quantity <= MAX_STOCK))
        .ok_or_else(|| AppError::unprocessable(format!("quantity must be at most {MAX_STOCK}")))?;
    if items.len() > MAX_LINES {
        return Err(AppError::unprocessable(format!(
            "at most {MAX_LINES} different products per reservation"
        )));
    }

    let mut tx = state.db.begin_with("BEGIN IMMEDIATE").await?;
    match existing(&mut tx, &id).await? {
        Some(reservation) if reservation.status == ReservationStatus::Held => {
            // A retry of a reservation that went through: same answer.
            return Ok((StatusCode::OK, Json(reservation)));
        }
        Some(_) => {
            return Err(AppError::conflict(format!(
                "Reservation {id} was already released"
            )));
        }
        None => {}
    }
    let mut reserved = Vec::with_capacity(items.len());
    for item in &items {
        // Take the stock only if there is enough; one statement, no race.
        let price_cents: Option<i64> = sqlx::query_scalar(
            "UPDATE products SET stock = stock - ?1
             WHERE id = ?2 AND stock >= ?1
             RETURNING price_cents",
        )
        .bind(item.quantity)
        .bind(item.product_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(price_cents) = price_cents else {
            // Dropping `tx` rolls back the lines already taken.
            let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM products WHERE id = ?")
                .bind(item.product_id)
                .fetch_optional(&mut *tx)
                .await?;
            return Err(match exists {
                None => AppError::not_found(format!("Product {} not found", item.product_id)),
                Some(_) => AppError::bad_request(format!(
                    "Insufficient stock for product {}",
                    item.product_id
                )),
            });
        };
        reserved.push(ReservedItem {
            product_id: item.product_id,
            quantity: item.quantity,
            price: Money::from_cents(price_cents),
        });
    }
    sqlx::query("INSERT INTO reservations (id, status) VALUES (?, 'held')")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    for item in &reserved {
        sqlx::query(
            "INSERT INTO reservation_items (reservation_id, product_id, quantity, price_cents)
             VALUES (?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(item.product_id)
        .bind(item.quantity)
        .bind(item.price.cents())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    tracing::info!(reservation = %id, lines = reserved.len(), "stock reserved");
    Ok((
        StatusCode::CREATED,
        Json(Reservation {
            id,
            status: ReservationStatus::Held,
            items: reserved,
        }),
    ))
}

/// `POST /reservations/{id}/release`: gives the held stock back, once.
/// Idempotent: releasing again, or releasing an id never reserved, is a 200
/// that changes no stock.
pub async fn release(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> AppResult<Json<Reservation>> {
    if !valid_id(&id) {
        return Err(AppError::unprocessable("invalid reservation id"));
    }
    let mut tx = state.db.begin_with("BEGIN IMMEDIATE").await?;
    let reservation = match existing(&mut tx, &id).await? {
        Some(r) if r.status == ReservationStatus::Released => return Ok(Json(r)),
        Some(r) => r,
        None => {
            // Never reserved (or not yet): remember the release so a late
            // reserve with this id is refused.
            sqlx::query("INSERT INTO reservations (id, status) VALUES (?, 'released')")
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(Json(Reservation {
                id,
                status: ReservationStatus::Released,
                items: Vec::new(),
            }));
        }
    };
    for item in &reservation.items {
        sqlx::query("UPDATE products SET stock = stock + ? WHERE id = ?")
            .bind(item.quantity)
            .bind(item.product_id)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("UPDATE reservations SET status = 'released' WHERE id = ?")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(reservation = %id, lines = reservation.items.len(), "stock released");
    Ok(Json(Reservation {
        status: ReservationStatus::Released,
        ..reservation
    }))
}

async fn existing(
    tx: &mut Transaction<'static, Sqlite>,
    id: &str,
) -> Result<Option<Reservation>, sqlx::Error> {
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM reservations WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(status) = status else {
        return Ok(None);
    };
    let status = if status == "held" {
        ReservationStatus::Held
    } else {
        ReservationStatus::Released
    };
    let rows = sqlx::query(
        "SELECT product_id, quantity, price_cents FROM reservation_items
         WHERE reservation_id = ? ORDER BY product_id",
    )
    .bind(id)
    .fetch_all(&mut **tx)
    .await?;
    let items = rows
        .iter()
        .map(|row| {
            Ok(ReservedItem {
                product_id: row.try_get("product_id")?,
                quantity: row.try_get("quantity")?,
                price: Money::from_cents(row.try_get("price_cents")?),
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(Some(Reservation {
        id: id.to_owned(),
        status,
        items,
    }))
}
