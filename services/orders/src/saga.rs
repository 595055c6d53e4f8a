//! Placing, recovering and cancelling orders: a saga whose every state is
//! in the database before the step that follows it.
//!
//! Placing: check the user; write the order `pending` with the reservation
//! id it will use (one transaction); reserve the stock (idempotent by id);
//! confirm the reservation at product-service (from then on it no longer
//! expires); mark the order `confirmed` with its lines, total and the
//! `order.confirmed` event (one transaction). A clean refusal, or a failure
//! whose reservation was released, marks it `failed` (with `order.failed`).
//!
//! Recovery ([`recover`], at start-up and every interval): a `pending` order
//! older than the grace period is finished by asking product-service for
//! its reservation: confirmed there → the order is confirmed; held,
//! released, expired or never seen → the order failed, then its
//! reservation released (which also blocks a late reserve). The same path
//! serves every crash point, and product-service's expiry of unconfirmed
//! reservations is the backstop if this service never comes back.
//!
//! An order is marked failed *before* its reservation is released, never
//! after: a placement still running (slower than the grace period) can then
//! no longer confirm it (confirming is a conditional update of a pending
//! order), so an order is never confirmed with its stock given back. A
//! failed order whose release did not go through is released again by
//! every recovery round until it does.
//!
//! Cancelling: a confirmed order becomes `cancelling` with `order.cancelled`
//! (one transaction); product-service consumes the event, releases the
//! stock and emits `stock.released`; consuming that marks the order
//! `cancelled`. Without a broker the release is a direct call instead.

use std::time::Duration;

use product_service::api::{ItemRequest, Reservation, ReservationStatus};
use rusqlite::OptionalExtension;
use serde_json::{Value, json};
use service_kit::events;
use service_kit::fault;
use service_kit::money::Money;
use service_kit::{AppError, AppResult};

use crate::dependencies::Refused;
use crate::{AppState, Order, OrderItem, SERVICE_NAME, Status, load_order};

// The statements of placing an order, the order path's: none opens a
// temporary b-tree (no `RETURNING`; see `service_kit::db`), which
// `hot_statements_open_no_temporary_btree` checks. Times are bound
// (`db::now_text`), not formatted by `strftime` in the statement.
const INSERT_PENDING: &str =
    "INSERT INTO orders (user_id, total_cents, status, reservation_id, created_at, updated_at)
     VALUES (?, 0, 'pending', ?, ?, ?)";
const CONFIRM: &str = "UPDATE orders SET status = 'confirmed', total_cents = ?, updated_at = ?
     WHERE id = ? AND status = 'pending'";
const OWNER: &str = "SELECT user_id, created_at FROM orders WHERE id = ?";
const INSERT_LINE: &str = "INSERT INTO order_items (order_id, product_id, quantity, price_cents)
     VALUES (?, ?, ?, ?)";

/// Pending orders younger than this are left to the request placing them.
pub const DEFAULT_RECOVERY_GRACE: Duration = Duration::from_secs(15);
/// How often pending orders are looked for.
pub const DEFAULT_RECOVERY_INTERVAL: Duration = Duration::from_secs(5);

/// Places an order for `user_id`; see the module documentation.
pub async fn place(state: &AppState, user_id: i64, items: Vec<ItemRequest>) -> AppResult<Order> {
    state.deps.check_user(user_id).await?;
    // Time-ordered (v7): the ids indexed here and at product-service grow,
    // so each insert lands on its index's last page, which a group commit
    // then writes once, not one random page per order.
    let reservation_id = uuid::Uuid::now_v7().to_string();
    let id = insert_pending(state, user_id, &reservation_id).await?;
    fault::exit_after("pending");
    let reservation = match state.deps.reserve(&reservation_id, &items).await {
        Ok(reservation) => reservation,
        Err(Refused::Clean(error)) => {
            // Nothing is held.
            fail(state, id, &error.to_string(), false).await?;
            return Err(error);
        }
        Err(Refused::Unknown { error, released }) => {
            fail(state, id, &error.to_string(), !released).await?;
            return Err(error);
        }
    };
    fault::exit_after("reserved");
    match state.deps.confirm(&reservation_id).await {
        Ok(true) => {}
        Ok(false) => {
            fail(
                state,
                id,
                "the reservation expired before it was confirmed",
                false,
            )
            .await?;
            return Err(AppError::unavailable("Product service unavailable"));
        }
        Err(error) => {
            // It may have been confirmed: it must be given back.
            fail(state, id, &error.to_string(), true).await?;
            release_failed(state, id, &reservation_id).await?;
            return Err(error);
        }
    }
    fault::exit_after("reservation_confirmed");
    let order = confirm(state, id, &reservation).await?.ok_or_else(|| {
        AppError::unavailable("The order could not be completed; it was not placed")
    })?;
    fault::exit_after("confirmed");
    tracing::info!(order = order.id, user_id, total = %order.total, reservation = %reservation_id, "order placed");
    Ok(order)
}

/// `orders_placed_total{outcome}`: `confirmed` or `failed`.
fn placed(outcome: &str) {
    static COUNTER: std::sync::OnceLock<prometheus::IntCounterVec> = std::sync::OnceLock::new();
    COUNTER
        .get_or_init(|| {
            service_kit::metrics::counter(
                "orders_placed_total",
                "Orders that ended placing, by outcome (confirmed, failed).",
                &["outcome"],
            )
        })
        .with_label_values(&[outcome])
        .inc();
}

async fn insert_pending(state: &AppState, user_id: i64, reservation_id: &str) -> AppResult<i64> {
    let reservation_id = reservation_id.to_owned();
    let insert = state.db.write(move |conn| {
        let now = service_kit::db::now_text();
        conn.prepare_cached(INSERT_PENDING)?
            .execute((user_id, reservation_id, &now, &now))?;
        Ok::<_, AppError>(conn.last_insert_rowid())
    });
    let id: i64 = service_kit::metrics::timed(SERVICE_NAME, "order_insert_pending", insert).await?;
    Ok(id)
}

/// The data of `order.confirmed` and `order.cancelled`.
#[derive(serde::Serialize)]
struct OrderEvent<'a> {
    order_id: i64,
    user_id: i64,
    reservation_id: &'a str,
    items: &'a [OrderItem],
    total: Money,
}

fn event_data<'a>(order: &'a Order, reservation_id: &'a str) -> OrderEvent<'a> {
    OrderEvent {
        order_id: order.id,
        user_id: order.user_id,
        reservation_id,
        items: &order.items,
        total: order.total,
    }
}

/// Marks a pending order confirmed with the reservation's lines and prices,
/// and records `order.confirmed`; `None` if it was not pending any more.
async fn confirm(state: &AppState, id: i64, reservation: &Reservation) -> AppResult<Option<Order>> {
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
    let reservation_id = reservation.id.clone();
    let confirmed = state.db.write(move |conn| {
        let changed = conn.prepare_cached(CONFIRM)?.execute((
            total.cents(),
            service_kit::db::now_text(),
            id,
        ))?;
        if changed == 0 {
            return Ok(None);
        }
        let (user_id, created_at): (i64, String) = conn
            .prepare_cached(OWNER)?
            .query_row([id], |row| Ok((row.get(0)?, row.get(1)?)))?;
        let mut line = conn.prepare_cached(INSERT_LINE)?;
        for item in &items {
            line.execute((id, item.product_id, item.quantity, item.price.cents()))?;
        }
        let order = Order {
            id,
            user_id,
            items,
            total,
            status: Status::Confirmed,
            created_at,
            reason: None,
        };
        events::record(
            conn,
            SERVICE_NAME,
            "order.confirmed",
            format!("order/{id}"),
            event_data(&order, &reservation_id),
        )?;
        Ok::<_, AppError>(Some(order))
    });
    let Some(order) = confirmed.await? else {
        return Ok(None);
    };
    state.relay.wake();
    placed("confirmed");
    Ok(Some(order))
}

/// Marks a pending order failed with `reason`, recording `order.failed`;
/// with `hold_possible`, its reservation is to be released (by
/// [`release_failed`], now or by recovery). Whether it was pending.
async fn fail(state: &AppState, id: i64, reason: &str, hold_possible: bool) -> AppResult<bool> {
    let owned_reason = reason.to_owned();
    let failed = state.db.write(move |conn| {
        let reason = owned_reason;
        let row: Option<(i64, String)> = conn
            .prepare_cached(
                "UPDATE orders SET status = 'failed', failure_reason = ?, stock_released = ?,
                        updated_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now')
                 WHERE id = ? AND status = 'pending' RETURNING user_id, reservation_id",
            )?
            .query_row((&reason, !hold_possible, id), |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()?;
        let Some((user_id, reservation_id)) = row else {
            return Ok(false);
        };
        events::record(
            conn,
            SERVICE_NAME,
            "order.failed",
            format!("order/{id}"),
            json!({"order_id": id, "user_id": user_id, "reservation_id": reservation_id, "reason": reason}),
        )?;
        Ok::<_, AppError>(true)
    });
    if !failed.await? {
        return Ok(false);
    }
    state.relay.wake();
    tracing::info!(order = id, reason, "order failed");
    placed("failed");
    Ok(true)
}

/// Releases the reservation of the failed order `id`; marks it released
/// if product-service confirmed. Whether it did.
async fn release_failed(state: &AppState, id: i64, reservation_id: &str) -> AppResult<bool> {
    if !state.deps.release(reservation_id).await {
        return Ok(false);
    }
    state
        .db
        .write(move |conn| {
            conn.prepare_cached(
                "UPDATE orders SET stock_released = 1 WHERE id = ? AND status = 'failed'",
            )?
            .execute([id])
            .map_err(AppError::from)
        })
        .await?;
    Ok(true)
}

/// Finishes the pending orders older than `grace`; how many it finished.
pub async fn recover(state: &AppState, grace: Duration) -> AppResult<usize> {
    let due: Vec<(i64, String)> = state.db.read(|conn| {
        conn.prepare_cached(
            "SELECT id, reservation_id FROM orders
             WHERE status = 'pending' AND created_at <= strftime('%Y-%m-%dT%H:%M:%SZ', 'now', ?)
             ORDER BY id",
        )?
        .query_map([format!("-{} seconds", grace.as_secs())], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?
        .collect::<Result<_, _>>()
        .map_err(AppError::from)
    })?;
    let mut finished = 0;
    for (id, reservation_id) in due {
        let reservation = match state.deps.reservation(&reservation_id).await {
            Ok(reservation) => reservation,
            Err(error) => {
                tracing::warn!(order = id, %error, "recovery: product-service unavailable; will retry");
                break;
            }
        };
        match reservation {
            Some(reservation) if reservation.status == ReservationStatus::Confirmed => {
                if confirm(state, id, &reservation).await?.is_some() {
                    tracing::info!(
                        order = id,
                        "recovery: order confirmed (its reservation was)"
                    );
                }
            }
            _ => {
                // Held, released, expired or never seen: the order failed
                // (first: a placement still running can no longer confirm
                // it), then the stock goes back (and a late reserve is
                // blocked).
                fail(
                    state,
                    id,
                    "interrupted before it was confirmed; stock released",
                    true,
                )
                .await?;
            }
        }
        finished += 1;
    }
    let unreleased: Vec<(i64, String)> = state.db.read(|conn| {
        conn.prepare_cached(
            "SELECT id, reservation_id FROM orders WHERE status = 'failed' AND stock_released = 0",
        )?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()
        .map_err(AppError::from)
    })?;
    for (id, reservation_id) in unreleased {
        if !release_failed(state, id, &reservation_id).await? {
            break;
        }
    }
    if state.broker.is_none() {
        finished += finish_cancellations(state).await?;
    }
    Ok(finished)
}

/// Runs [`recover`] now and every `every`, forever.
pub fn spawn_recovery(state: AppState, grace: Duration, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match recover(&state, grace).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(orders = n, "recovery finished orders"),
                Err(error) => tracing::warn!(%error, "recovery failed; will retry"),
            }
        }
    });
}

/// `POST /orders/{id}/cancel`: see the module documentation. Returns the
/// order and whether the cancellation is still on its way.
pub async fn cancel(state: &AppState, id: i64) -> AppResult<(Order, bool)> {
    let cancel = state.db.write(move |conn| {
        let order = load_order(conn, id)?.ok_or_else(|| AppError::not_found("Order not found"))?;
        match order.status {
            Status::Cancelled => return Ok((order, None)),
            Status::Cancelling => return Ok((order, None)),
            Status::Failed => {
                return Err(AppError::conflict(format!(
                    "Order {id} failed: there is nothing to cancel"
                )));
            }
            Status::Pending => {
                return Err(AppError::conflict(format!(
                    "Order {id} is not confirmed yet"
                )));
            }
            Status::Confirmed => {}
        }
        let reservation_id: String = conn
            .prepare_cached("SELECT reservation_id FROM orders WHERE id = ?")?
            .query_row([id], |row| row.get(0))?;
        conn.prepare_cached(
            "UPDATE orders SET status = 'cancelling', updated_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now')
             WHERE id = ? AND status = 'confirmed'",
        )?
        .execute([id])?;
        events::record(
            conn,
            SERVICE_NAME,
            "order.cancelled",
            format!("order/{id}"),
            event_data(&order, &reservation_id),
        )?;
        Ok::<_, AppError>((order, Some(reservation_id)))
    });
    let (order, reservation_id) = match cancel.await? {
        (order, Some(reservation_id)) => (order, reservation_id),
        (order, None) => {
            let on_its_way = order.status == Status::Cancelling;
            return Ok((order, on_its_way));
        }
    };
    state.relay.wake();
    tracing::info!(order = id, "order cancelling");
    let cancelling = Order {
        status: Status::Cancelling,
        ..order
    };
    if state.broker.is_some() {
        return Ok((cancelling, true));
    }
    // No broker: release directly.
    if state.deps.release(&reservation_id).await && mark_cancelled(state, &reservation_id).await? {
        return Ok((
            Order {
                status: Status::Cancelled,
                ..cancelling
            },
            false,
        ));
    }
    Ok((cancelling, true))
}

/// Without a broker: releases the stock of orders left `cancelling`.
async fn finish_cancellations(state: &AppState) -> AppResult<usize> {
    let cancelling: Vec<String> = state.db.read(|conn| {
        conn.prepare_cached("SELECT reservation_id FROM orders WHERE status = 'cancelling'")?
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()
            .map_err(AppError::from)
    })?;
    let mut finished = 0;
    for reservation_id in cancelling {
        if !state.deps.release(&reservation_id).await {
            break;
        }
        finished += usize::from(mark_cancelled(state, &reservation_id).await?);
    }
    Ok(finished)
}

/// `cancelling` → `cancelled` for the order of `reservation_id`; whether it
/// changed.
async fn mark_cancelled(state: &AppState, reservation_id: &str) -> AppResult<bool> {
    let reservation_id = reservation_id.to_owned();
    let changed = state
        .db
        .write(move |conn| {
            conn.prepare_cached(
                "UPDATE orders SET status = 'cancelled', updated_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now')
                 WHERE reservation_id = ? AND status = 'cancelling'",
            )?
            .execute([reservation_id])
            .map_err(AppError::from)
        })
        .await?;
    Ok(changed == 1)
}

/// Applies a `stock.released` event: the order it frees is cancelled, once.
pub async fn on_stock_released(state: &AppState, event: events::Delivered) -> Result<(), String> {
    let Some(reservation_id) = event.data.get("reservation_id").and_then(Value::as_str) else {
        tracing::error!(event = %event.id, "stock.released without a reservation_id: ignored");
        return Ok(());
    };
    let reservation_id = reservation_id.to_owned();
    let cancelled = state
        .db
        .write(move |conn| {
            if !events::first_delivery(conn, &event.id)? {
                return Ok(None);
            }
            conn.prepare_cached(
                "UPDATE orders SET status = 'cancelled', updated_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now')
                 WHERE reservation_id = ? AND status = 'cancelling' RETURNING id",
            )?
            .query_row([reservation_id], |row| row.get::<_, i64>(0))
            .optional()
            .map_err(AppError::from)
        })
        .await
        .map_err(|err| err.to_string())?;
    if let Some(id) = cancelled {
        tracing::info!(order = id, "order cancelled: stock released");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Placing runs on every order: none of its statements may build a
    /// temporary b-tree each time (see `service_kit::db`).
    #[tokio::test]
    async fn hot_statements_open_no_temporary_btree() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::open_db(&dir.path().join("orders.db")).await.unwrap();
        db.read(|conn| {
            for sql in [INSERT_PENDING, CONFIRM, OWNER, INSERT_LINE, events::RECORD] {
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
