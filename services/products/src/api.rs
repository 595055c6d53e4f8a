//! Wire format of the reservation endpoints, shared with the order service.

use serde::{Deserialize, Serialize};
use service_kit::money::Money;

/// One line of a reservation request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ItemRequest {
    #[serde(deserialize_with = "service_kit::number::integer")]
    pub product_id: i64,
    #[serde(deserialize_with = "service_kit::number::integer")]
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    pub quantity: i64,
}

/// `POST /reservations`: hold stock for every item, or for none.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReserveRequest {
    /// Chosen by the caller so that a retried request (or a release sent
    /// because the answer was lost) refers to the same reservation. Letters,
    /// digits, `-` and `_`, at most 64. Generated when absent.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]+$")]
    pub id: Option<String>,
    /// 1 to 100 different products (lines for the same one are added up,
    /// and the sum has the bound of one line's quantity).
    #[schema(min_items = 1)]
    pub items: Vec<ItemRequest>,
}

/// A reserved line, with the unit price at the moment of reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReservedItem {
    pub product_id: i64,
    pub quantity: i64,
    pub price: Money,
}

/// A reservation's state: `held` until the order confirms it; `released`
/// (compensated, or its order cancelled) and `expired` (not confirmed in
/// time) gave their stock back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReservationStatus {
    Held,
    Confirmed,
    Released,
    Expired,
}

impl ReservationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationStatus::Held => "held",
            ReservationStatus::Confirmed => "confirmed",
            ReservationStatus::Released => "released",
            ReservationStatus::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<ReservationStatus> {
        Some(match text {
            "held" => ReservationStatus::Held,
            "confirmed" => ReservationStatus::Confirmed,
            "released" => ReservationStatus::Released,
            "expired" => ReservationStatus::Expired,
            _ => return None,
        })
    }

    /// Whether the reservation still takes stock.
    pub fn holds_stock(self) -> bool {
        matches!(self, ReservationStatus::Held | ReservationStatus::Confirmed)
    }
}

/// Answer of `POST /reservations`, `GET /reservations/{id}` and the
/// confirm and release endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Reservation {
    pub id: String,
    pub status: ReservationStatus,
    pub items: Vec<ReservedItem>,
}

/// Adds up the quantities of lines for the same product, so that a product
/// listed twice is checked and reserved once, for the total. The result is
/// sorted by product id. `None` if a sum overflows.
pub fn merge_items(items: &[ItemRequest]) -> Option<Vec<ItemRequest>> {
    let mut merged: Vec<ItemRequest> = items.to_vec();
    merged.sort_by_key(|item| item.product_id);
    let mut out: Vec<ItemRequest> = Vec::with_capacity(merged.len());
    for item in merged {
        match out.last_mut() {
            Some(last) if last.product_id == item.product_id => {
                last.quantity = last.quantity.checked_add(item.quantity)?;
            }
            _ => out.push(item),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_duplicate_lines() {
        let item = |product_id, quantity| ItemRequest {
            product_id,
            quantity,
        };
        assert_eq!(
            merge_items(&[item(2, 1), item(1, 2), item(2, 3)]),
            Some(vec![item(1, 2), item(2, 4)])
        );
        assert_eq!(merge_items(&[item(1, i64::MAX), item(1, 1)]), None);
    }
}
