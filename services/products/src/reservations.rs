//! Stock reservations: hold stock for several products at once, all or
//! nothing; confirm the hold for a placed order; give it back (the order
//! service's compensation, or a cancelled order); and let a hold that is
//! never confirmed expire.
//!
//! States: `held` → `confirmed` | `released` | `expired`; `confirmed` →
//! `released`. Every change runs in one `BEGIN IMMEDIATE` transaction (the
//! write lock up front, so changes in this process or in another instance
//! on the same file run one after the other) and records its event in the
//! outbox in that same transaction (`stock.reserved`, `stock.released`,
//! `stock.expired`). Every change is a conditional update of the status,
//! so confirmation and expiry racing each other cannot both win.
//!
//! Reservation ids are chosen by the caller. Reserving an id that is already
//! held returns the existing reservation (a retried request does not reserve
//! twice); releasing an id that was never reserved records it as released, so
//! a reserve that arrives late (the caller gave up waiting and released)
//! cannot take stock that nobody will ever give back.

use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};
use service_kit::db::Db;
use service_kit::events;
use service_kit::extract::{Json, Path};
use service_kit::money::Money;
use service_kit::openapi::ErrorBody;
use service_kit::{AppError, AppResult};
use sqlx::{Row, Sqlite, Transaction};

use crate::api::{Reservation, ReservationStatus, ReserveRequest, ReservedItem, merge_items};
use crate::catalog::MAX_STOCK;
use crate::{AppState, SERVICE_NAME};

/// Most distinct products in one reservation; an order is a basket, not a
/// warehouse transfer.
const MAX_LINES: usize = 100;
/// Longest caller-chosen reservation id.
const MAX_ID_CHARS: usize = 64;
/// Expired reservations handled per sweep transaction.
const SWEEP_BATCH: i64 = 100;

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_CHARS
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `stock_reservations_total{outcome}`: reserved, insufficient,
/// not_found, confirmed, released, expired.
fn counted(outcome: &str) {
    static COUNTER: std::sync::OnceLock<prometheus::IntCounterVec> = std::sync::OnceLock::new();
    COUNTER
        .get_or_init(|| {
            service_kit::metrics::counter(
                "stock_reservations_total",
                "Reservation changes and refusals, by outcome.",
                &["outcome"],
            )
        })
        .with_label_values(&[outcome])
        .inc();
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn items_json(items: &[ReservedItem]) -> Value {
    json!(
        items
            .iter()
            .map(|i| json!({"product_id": i.product_id, "quantity": i.quantity, "price": i.price}))
            .collect::<Vec<_>>()
    )
}

/// `POST /reservations`: 201 with the held lines and their prices; 404
/// `Product N not found`; 400 `Insufficient stock for product N`; 409 if the
/// id was already released or expired. Nothing is held unless everything
/// is; the hold expires after the service's hold time unless confirmed.
#[utoipa::path(
    post,
    path = "/reservations",
    tag = "reservations",
    request_body = ReserveRequest,
    responses(
        (status = 201, description = "Held", body = Reservation),
        (status = 200, description = "Already held under this id (a retry)", body = Reservation),
        (status = 400, description = "Malformed JSON, or insufficient stock for a product", body = ErrorBody),
        (status = 404, description = "A product does not exist", body = ErrorBody),
        (status = 409, description = "The id was already released or expired", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 422, description = "Bad id, no items, or a quantity out of bounds", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
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

    let mut tx = state.db.write().begin_with("BEGIN IMMEDIATE").await?;
    match existing(&mut tx, &id).await? {
        Some(reservation) if reservation.status.holds_stock() => {
            // A retry of a reservation that went through: same answer.
            return Ok((StatusCode::OK, Json(reservation)));
        }
        Some(reservation) => {
            return Err(AppError::conflict(format!(
                "Reservation {id} was already {}",
                reservation.status.as_str()
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
            counted(if exists.is_some() {
                "insufficient"
            } else {
                "not_found"
            });
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
    sqlx::query("INSERT INTO reservations (id, status, expires_at) VALUES (?, 'held', ?)")
        .bind(&id)
        .bind(unix_now() + state.hold.as_secs() as i64)
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
    events::record(
        &mut tx,
        SERVICE_NAME,
        "stock.reserved",
        format!("reservation/{id}"),
        json!({"reservation_id": id, "items": items_json(&reserved)}),
    )
    .await?;
    service_kit::metrics::timed(SERVICE_NAME, "reserve_commit", tx.commit()).await?;
    state.relay.wake();
    counted("reserved");
    service_kit::fault::exit_after("reserved");
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

/// `GET /reservations/{id}`: the reservation and its state; 404 if the id
/// was never seen.
/// The reservation as it stands.
#[utoipa::path(
    get,
    path = "/reservations/{id}",
    tag = "reservations",
    params(("id" = String, Path, description = "The reservation id", pattern = r"^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 200, description = "The reservation", body = Reservation),
        (status = 404, description = "Never seen", body = ErrorBody),
        (status = 422, description = "Bad id", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> AppResult<Json<Reservation>> {
    if !valid_id(&id) {
        return Err(AppError::unprocessable("invalid reservation id"));
    }
    let mut tx = state.db.read().begin().await?;
    let reservation = existing(&mut tx, &id)
        .await?
        .ok_or_else(|| AppError::not_found("Reservation not found"))?;
    Ok(Json(reservation))
}

/// `POST /reservations/{id}/confirm`: the order is placed; the hold no
/// longer expires. Idempotent. 409 if it was released or expired first;
/// 404 if unknown.
/// The order is placed: the held stock is taken for good (idempotent).
#[utoipa::path(
    post,
    path = "/reservations/{id}/confirm",
    tag = "reservations",
    params(("id" = String, Path, description = "The reservation id", pattern = r"^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 200, description = "Confirmed", body = Reservation),
        (status = 404, description = "Never seen", body = ErrorBody),
        (status = 409, description = "Already released or expired", body = ErrorBody),
        (status = 422, description = "Bad id", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub async fn confirm(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> AppResult<Json<Reservation>> {
    if !valid_id(&id) {
        return Err(AppError::unprocessable("invalid reservation id"));
    }
    let mut tx = state.db.write().begin_with("BEGIN IMMEDIATE").await?;
    let reservation = existing(&mut tx, &id)
        .await?
        .ok_or_else(|| AppError::not_found("Reservation not found"))?;
    match reservation.status {
        ReservationStatus::Confirmed => Ok(Json(reservation)),
        ReservationStatus::Held => {
            sqlx::query(
                "UPDATE reservations SET status = 'confirmed', expires_at = NULL
                 WHERE id = ? AND status = 'held'",
            )
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            counted("confirmed");
            tracing::info!(reservation = %id, "reservation confirmed");
            Ok(Json(Reservation {
                status: ReservationStatus::Confirmed,
                ..reservation
            }))
        }
        other => Err(AppError::conflict(format!(
            "Reservation {id} was already {}",
            other.as_str()
        ))),
    }
}

/// `POST /reservations/{id}/release`: gives the stock back, once (from
/// `held` or `confirmed`). Idempotent: releasing again, or releasing an id
/// never reserved, is a 200 that changes no stock.
/// Gives the stock back (idempotent; an unknown id is remembered as
/// released, so that a late reserve with it is refused).
#[utoipa::path(
    post,
    path = "/reservations/{id}/release",
    tag = "reservations",
    params(("id" = String, Path, description = "The reservation id", pattern = r"^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 200, description = "Released (or already not holding stock)", body = Reservation),
        (status = 422, description = "Bad id", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub async fn release(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> AppResult<Json<Reservation>> {
    if !valid_id(&id) {
        return Err(AppError::unprocessable("invalid reservation id"));
    }
    let mut tx = state.db.write().begin_with("BEGIN IMMEDIATE").await?;
    let reservation = release_in(&mut tx, &id, Value::Null).await?;
    tx.commit().await?;
    state.relay.wake();
    Ok(Json(reservation))
}

/// Releases `id` in `tx` (see [`release`]); `cause` goes into the
/// `stock.released` event (the cancelled order, say).
pub async fn release_in(
    tx: &mut Transaction<'static, Sqlite>,
    id: &str,
    cause: Value,
) -> AppResult<Reservation> {
    let reservation = match existing(tx, id).await? {
        Some(r) if !r.status.holds_stock() => return Ok(r),
        Some(r) => r,
        None => {
            // Never reserved (or not yet): remember the release so a late
            // reserve with this id is refused.
            sqlx::query("INSERT INTO reservations (id, status) VALUES (?, 'released')")
                .bind(id)
                .execute(&mut **tx)
                .await?;
            return Ok(Reservation {
                id: id.to_owned(),
                status: ReservationStatus::Released,
                items: Vec::new(),
            });
        }
    };
    give_back(tx, &reservation.items).await?;
    sqlx::query(
        "UPDATE reservations SET status = 'released', expires_at = NULL
         WHERE id = ? AND status IN ('held', 'confirmed')",
    )
    .bind(id)
    .execute(&mut **tx)
    .await?;
    events::record(
        tx,
        SERVICE_NAME,
        "stock.released",
        format!("reservation/{id}"),
        json!({"reservation_id": id, "items": items_json(&reservation.items), "cause": cause}),
    )
    .await?;
    counted("released");
    tracing::info!(reservation = %id, lines = reservation.items.len(), "stock released");
    Ok(Reservation {
        status: ReservationStatus::Released,
        ..reservation
    })
}

async fn give_back(
    tx: &mut Transaction<'static, Sqlite>,
    items: &[ReservedItem],
) -> Result<(), sqlx::Error> {
    for item in items {
        sqlx::query("UPDATE products SET stock = stock + ? WHERE id = ?")
            .bind(item.quantity)
            .bind(item.product_id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Expires the held reservations whose time is up (their stock returns,
/// `stock.expired` is recorded); how many.
pub async fn expire_due(db: &Db) -> Result<usize, sqlx::Error> {
    let mut tx = db.write().begin_with("BEGIN IMMEDIATE").await?;
    let due: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM reservations WHERE status = 'held' AND expires_at <= ? LIMIT ?",
    )
    .bind(unix_now())
    .bind(SWEEP_BATCH)
    .fetch_all(&mut *tx)
    .await?;
    for id in &due {
        let Some(reservation) = existing(&mut tx, id).await? else {
            continue;
        };
        give_back(&mut tx, &reservation.items).await?;
        sqlx::query("UPDATE reservations SET status = 'expired', expires_at = NULL WHERE id = ? AND status = 'held'")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        events::record(
            &mut tx,
            SERVICE_NAME,
            "stock.expired",
            format!("reservation/{id}"),
            json!({"reservation_id": id, "items": items_json(&reservation.items)}),
        )
        .await?;
        counted("expired");
        tracing::warn!(reservation = %id, "reservation expired unconfirmed: stock returned");
    }
    tx.commit().await?;
    Ok(due.len())
}

/// Expires due reservations every `every`, forever.
pub fn spawn_expiry(state: AppState, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match expire_due(&state.db).await {
                Ok(0) => {}
                Ok(_) => state.relay.wake(),
                Err(err) => {
                    tracing::warn!(error = %err, "expiring reservations failed; will retry")
                }
            }
        }
    });
}

/// Applies an `order.cancelled` event: releases its reservation, once.
pub async fn on_order_cancelled(state: &AppState, event: events::Delivered) -> Result<(), String> {
    let Some(reservation_id) = event.data.get("reservation_id").and_then(Value::as_str) else {
        tracing::error!(event = %event.id, "order.cancelled without a reservation_id: ignored");
        return Ok(());
    };
    let apply = async {
        let mut tx = state.db.write().begin_with("BEGIN IMMEDIATE").await?;
        if events::first_delivery(&mut tx, &event.id).await? {
            let cause = json!({"event": event.id, "order_id": event.data.get("order_id")});
            release_in(&mut tx, reservation_id, cause).await?;
        }
        tx.commit().await?;
        Ok::<_, AppError>(())
    };
    apply.await.map_err(|err| err.to_string())?;
    state.relay.wake();
    Ok(())
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
    let status = ReservationStatus::parse(&status).unwrap_or(ReservationStatus::Released);
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
