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
use rusqlite::{Connection, OptionalExtension};
use serde_json::{Value, json};
use service_kit::db::Db;
use service_kit::events;
use service_kit::extract::{Json, Path};
use service_kit::money::Money;
use service_kit::openapi::ErrorBody;
use service_kit::{AppError, AppResult};

use crate::api::{
    ItemRequest, Reservation, ReservationStatus, ReserveRequest, ReservedItem, merge_items,
};
use crate::catalog::MAX_STOCK;
use crate::{AppState, SERVICE_NAME};

/// Most distinct products in one reservation; an order is a basket, not a
/// warehouse transfer.
const MAX_LINES: usize = 100;
/// Longest caller-chosen reservation id.
const MAX_ID_CHARS: usize = 64;
/// Expired reservations handled per sweep transaction.
const SWEEP_BATCH: i64 = 100;

// The statements of reserving and confirming, the order path's: none opens
// a temporary b-tree (no `RETURNING`, no `IN` list; see `service_kit::db`),
// which `hot_statements_open_no_temporary_btree` checks.
const TAKE_STOCK: &str = "UPDATE products SET stock = stock - ?1 WHERE id = ?2 AND stock >= ?1";
const PRICE: &str = "SELECT price_cents FROM products WHERE id = ?";
const INSERT_HELD: &str =
    "INSERT INTO reservations (id, status, expires_at, created_at) VALUES (?, 'held', ?, ?)";
const INSERT_LINE: &str =
    "INSERT INTO reservation_items (reservation_id, product_id, quantity, price_cents)
     VALUES (?, ?, ?, ?)";
const CONFIRM: &str = "UPDATE reservations SET status = 'confirmed', expires_at = NULL
     WHERE id = ? AND status = 'held'";
const STATUS: &str = "SELECT status FROM reservations WHERE id = ?";
const LINES: &str = "SELECT product_id, quantity, price_cents FROM reservation_items
     WHERE reservation_id = ? ORDER BY product_id";

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

/// The data of the `stock.*` events.
#[derive(serde::Serialize)]
struct StockEvent<'a> {
    reservation_id: &'a str,
    items: &'a [ReservedItem],
    /// What a release was for (the cancelled order); released only.
    #[serde(skip_serializing_if = "Option::is_none")]
    cause: Option<&'a Value>,
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
        None => uuid::Uuid::now_v7().to_string(),
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

    let hold = state.hold;
    let reserve = state
        .db
        .write(move |conn| reserve_in(conn, &id, &items, hold));
    // The whole transaction, up to its commit.
    let (status, reservation) =
        service_kit::metrics::timed(SERVICE_NAME, "reserve_commit", reserve).await?;
    if status == StatusCode::CREATED {
        state.relay.wake();
        counted("reserved");
        service_kit::fault::exit_after("reserved");
        // Debug: every order reserves; its request line and the
        // `stock.reserved` event already say so.
        tracing::debug!(reservation = %reservation.id, lines = reservation.items.len(), "stock reserved");
    }
    Ok((status, Json(reservation)))
}

/// [`reserve`]'s transaction: 201 and the new hold, or 200 and the hold
/// already made under `id` (a retry).
fn reserve_in(
    conn: &Connection,
    id: &str,
    items: &[ItemRequest],
    hold: Duration,
) -> AppResult<(StatusCode, Reservation)> {
    match existing(conn, id)? {
        Some(reservation) if reservation.status.holds_stock() => {
            // A retry of a reservation that went through: same answer.
            return Ok((StatusCode::OK, reservation));
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
    // Take the stock only if there is enough; one statement, no race. The
    // price is read after it, in the same transaction (a `RETURNING` would
    // collect it in a temporary b-tree on every run).
    let mut take = conn.prepare_cached(TAKE_STOCK)?;
    let mut price = conn.prepare_cached(PRICE)?;
    for item in items {
        let taken = take.execute((item.quantity, item.product_id))? == 1;
        let price_cents: Option<i64> = price
            .query_row([item.product_id], |row| row.get(0))
            .optional()?;
        let (true, Some(price_cents)) = (taken, price_cents) else {
            // The error rolls back the lines already taken.
            let exists = price_cents.is_some();
            counted(if exists { "insufficient" } else { "not_found" });
            return Err(if exists {
                AppError::bad_request(format!(
                    "Insufficient stock for product {}",
                    item.product_id
                ))
            } else {
                AppError::not_found(format!("Product {} not found", item.product_id))
            });
        };
        reserved.push(ReservedItem {
            product_id: item.product_id,
            quantity: item.quantity,
            price: Money::from_cents(price_cents),
        });
    }
    conn.prepare_cached(INSERT_HELD)?.execute((
        id,
        unix_now() + hold.as_secs() as i64,
        service_kit::db::now_text(),
    ))?;
    let mut line = conn.prepare_cached(INSERT_LINE)?;
    for item in &reserved {
        line.execute((id, item.product_id, item.quantity, item.price.cents()))?;
    }
    events::record(
        conn,
        SERVICE_NAME,
        "stock.reserved",
        format!("reservation/{id}"),
        StockEvent {
            reservation_id: id,
            items: &reserved,
            cause: None,
        },
    )?;
    Ok((
        StatusCode::CREATED,
        Reservation {
            id: id.to_owned(),
            status: ReservationStatus::Held,
            items: reserved,
        },
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
    let reservation = state.db.read(|conn| {
        // One snapshot for the reservation and its lines.
        let snapshot = conn.unchecked_transaction()?;
        Ok::<_, AppError>(existing(&snapshot, &id)?)
    })?;
    Ok(Json(reservation.ok_or_else(|| {
        AppError::not_found("Reservation not found")
    })?))
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
    let confirm = state.db.write(move |conn| {
        let reservation =
            existing(conn, &id)?.ok_or_else(|| AppError::not_found("Reservation not found"))?;
        match reservation.status {
            ReservationStatus::Confirmed => Ok((reservation, false)),
            ReservationStatus::Held => {
                conn.prepare_cached(CONFIRM)?.execute([&id])?;
                let confirmed = Reservation {
                    status: ReservationStatus::Confirmed,
                    ..reservation
                };
                Ok((confirmed, true))
            }
            other => Err(AppError::conflict(format!(
                "Reservation {id} was already {}",
                other.as_str()
            ))),
        }
    });
    let (reservation, changed) = confirm.await?;
    if changed {
        counted("confirmed");
        // Debug, as "stock reserved": once per order.
        tracing::debug!(reservation = %reservation.id, "reservation confirmed");
    }
    Ok(Json(reservation))
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
    let (reservation, released) = state
        .db
        .write(move |conn| release_in(conn, &id, Value::Null))
        .await?;
    if released {
        state.relay.wake();
        note_released(&reservation);
    }
    Ok(Json(reservation))
}

/// Releases `id` in the write `conn` is doing (see [`release`]); `cause`
/// goes into the `stock.released` event (the cancelled order, say). The
/// reservation, and whether this gave its stock back (then
/// [`note_released`] once committed).
pub fn release_in(conn: &Connection, id: &str, cause: Value) -> AppResult<(Reservation, bool)> {
    let reservation = match existing(conn, id)? {
        Some(r) if !r.status.holds_stock() => return Ok((r, false)),
        Some(r) => r,
        None => {
            // Never reserved (or not yet): remember the release so a late
            // reserve with this id is refused.
            conn.prepare_cached("INSERT INTO reservations (id, status) VALUES (?, 'released')")?
                .execute([id])?;
            let released = Reservation {
                id: id.to_owned(),
                status: ReservationStatus::Released,
                items: Vec::new(),
            };
            return Ok((released, false));
        }
    };
    give_back(conn, &reservation.items)?;
    conn.prepare_cached(
        "UPDATE reservations SET status = 'released', expires_at = NULL
         WHERE id = ? AND status IN ('held', 'confirmed')",
    )?
    .execute([id])?;
    events::record(
        conn,
        SERVICE_NAME,
        "stock.released",
        format!("reservation/{id}"),
        StockEvent {
            reservation_id: id,
            items: &reservation.items,
            cause: Some(&cause),
        },
    )?;
    let released = Reservation {
        status: ReservationStatus::Released,
        ..reservation
    };
    Ok((released, true))
}

/// Counts and logs a release [`release_in`] made, once it is committed.
fn note_released(reservation: &Reservation) {
    counted("released");
    tracing::info!(reservation = %reservation.id, lines = reservation.items.len(), "stock released");
}

fn give_back(conn: &Connection, items: &[ReservedItem]) -> rusqlite::Result<()> {
    let mut give = conn.prepare_cached("UPDATE products SET stock = stock + ? WHERE id = ?")?;
    for item in items {
        give.execute((item.quantity, item.product_id))?;
    }
    Ok(())
}

/// Expires the held reservations whose time is up (their stock returns,
/// `stock.expired` is recorded); how many.
pub async fn expire_due(db: &Db) -> Result<usize, AppError> {
    let expired = db
        .write(|conn| {
            let due: Vec<String> = conn
                .prepare_cached(
                    "SELECT id FROM reservations WHERE status = 'held' AND expires_at <= ? LIMIT ?",
                )?
                .query_map((unix_now(), SWEEP_BATCH), |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            for id in &due {
                let Some(reservation) = existing(conn, id)? else {
                    continue;
                };
                give_back(conn, &reservation.items)?;
                conn.prepare_cached(
                    "UPDATE reservations SET status = 'expired', expires_at = NULL
                     WHERE id = ? AND status = 'held'",
                )?
                .execute([id])?;
                events::record(
                    conn,
                    SERVICE_NAME,
                    "stock.expired",
                    format!("reservation/{id}"),
                    StockEvent {
                        reservation_id: id,
                        items: &reservation.items,
                        cause: None,
                    },
                )?;
            }
            Ok::<_, AppError>(due)
        })
        .await?;
    for id in &expired {
        counted("expired");
        tracing::warn!(reservation = %id, "reservation expired unconfirmed: stock returned");
    }
    Ok(expired.len())
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
    let reservation_id = reservation_id.to_owned();
    let released = state
        .db
        .write(move |conn| {
            if !events::first_delivery(conn, &event.id)? {
                return Ok(None);
            }
            let cause = json!({"event": event.id, "order_id": event.data.get("order_id")});
            let (reservation, released) = release_in(conn, &reservation_id, cause)?;
            Ok::<_, AppError>(released.then_some(reservation))
        })
        .await
        .map_err(|err| err.to_string())?;
    if let Some(reservation) = released {
        note_released(&reservation);
    }
    state.relay.wake();
    Ok(())
}

/// The reservation `id` with its lines, if it was ever seen. Run it in a
/// transaction: two statements.
fn existing(conn: &Connection, id: &str) -> rusqlite::Result<Option<Reservation>> {
    let status: Option<String> = conn
        .prepare_cached(STATUS)?
        .query_row([id], |row| row.get(0))
        .optional()?;
    let Some(status) = status else {
        return Ok(None);
    };
    let status = ReservationStatus::parse(&status).unwrap_or(ReservationStatus::Released);
    let items = conn
        .prepare_cached(LINES)?
        .query_map([id], |row| {
            service_kit::db::check_columns(row, &["product_id", "quantity", "price_cents"]);
            Ok(ReservedItem {
                product_id: row.get(0)?,
                quantity: row.get(1)?,
                price: Money::from_cents(row.get(2)?),
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Some(Reservation {
        id: id.to_owned(),
        status,
        items,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `stock.*` events carry the reservation, its lines with their
    /// prices as money (two decimals), and for a release what it was for.
    #[tokio::test]
    async fn stock_events_carry_the_lines_and_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::open_db(&dir.path().join("products.db"))
            .await
            .unwrap();
        let items = [ItemRequest {
            product_id: 2,
            quantity: 3,
        }];
        db.write(move |conn| {
            reserve_in(conn, "r-1", &items, Duration::from_secs(60))?;
            release_in(conn, "r-1", json!({"order_id": 7}))?;
            Ok::<_, AppError>(())
        })
        .await
        .unwrap();
        let payloads: Vec<Value> = db
            .read(|conn| {
                conn.prepare("SELECT payload FROM outbox ORDER BY seq")?
                    .query_map([], |row| row.get::<_, String>(0))?
                    .map(|payload| Ok(serde_json::from_str(&payload?).unwrap()))
                    .collect::<Result<_, service_kit::db::Error>>()
            })
            .unwrap();
        let data: Vec<&Value> = payloads.iter().map(|p| &p["data"]).collect();
        let lines = json!([{"product_id": 2, "quantity": 3, "price": 12.99}]);
        assert_eq!(
            data,
            [
                &json!({"reservation_id": "r-1", "items": lines}),
                &json!({"reservation_id": "r-1", "items": lines, "cause": {"order_id": 7}}),
            ]
        );
        assert_eq!(payloads[0]["type"], "stock.reserved");
        assert_eq!(payloads[1]["type"], "stock.released");
        // The price as money is written, not a float's shortest form.
        let raw: String = db
            .read(|conn| {
                conn.query_row("SELECT payload FROM outbox ORDER BY seq LIMIT 1", [], |r| {
                    r.get(0)
                })
                .map_err(service_kit::db::Error::from)
            })
            .unwrap();
        assert!(raw.contains(r#""price":12.99"#), "{raw}");
    }

    /// Reserving and confirming run on every order: none of their
    /// statements may build a temporary b-tree each time (see
    /// `service_kit::db`).
    #[tokio::test]
    async fn hot_statements_open_no_temporary_btree() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::open_db(&dir.path().join("products.db"))
            .await
            .unwrap();
        db.read(|conn| {
            for sql in [
                TAKE_STOCK,
                PRICE,
                INSERT_HELD,
                INSERT_LINE,
                CONFIRM,
                STATUS,
                LINES,
                events::RECORD,
            ] {
                assert_eq!(
                    service_kit::testing::ephemeral_tables(conn, sql)?,
                    0,
                    "{sql}"
                );
            }
            Ok::<_, service_kit::db::Error>(())
        })
        .unwrap();
    }
}
