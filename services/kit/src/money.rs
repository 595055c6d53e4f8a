//! Exact money: integer cents inside, a JSON number with two decimals outside.
//!
//! Prices never pass through floating-point arithmetic. An incoming JSON
//! number is read from its decimal text (`12.99` is 1299 cents exactly), and
//! an outgoing amount is written as decimal text (`1299.90`, not `1299.9`).

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// An amount of money in cents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Money(i64);

/// The largest amount accepted from a client: ten billion, far above any
/// price in this shop and far below where `i64` cent sums could overflow.
pub const MAX_CENTS: i64 = 1_000_000_000_000;

impl Money {
    pub const ZERO: Money = Money(0);

    pub const fn from_cents(cents: i64) -> Self {
        Money(cents)
    }
    pub const fn cents(self) -> i64 {
        self.0
    }
    /// `self * quantity`, or `None` on overflow.
    pub fn checked_mul(self, quantity: i64) -> Option<Money> {
        self.0.checked_mul(quantity).map(Money)
    }
    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }

    /// Parses decimal text such as `12`, `12.5`, `-0.99`. At most two
    /// decimals; no exponent; at most [`MAX_CENTS`] in absolute value.
    pub fn parse(text: &str) -> Result<Money, &'static str> {
        const INVALID: &str = "must be a number with at most 2 decimal places";
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) {
            return Err(INVALID);
        }
        // Trailing zeros carry no value: 1.500 is 1.50.
        let fraction = fraction.trim_end_matches('0');
        if fraction.len() > 2 {
            return Err(INVALID);
        }
        const TOO_LARGE: &str = "is too large";
        let whole: i64 = whole.parse().map_err(|_| TOO_LARGE)?;
        let fraction_cents = match fraction.len() {
            0 => 0,
            1 => i64::from(fraction.as_bytes()[0] - b'0') * 10,
            _ => fraction.parse::<i64>().map_err(|_| INVALID)?,
        };
        let cents = whole
            .checked_mul(100)
            .and_then(|c| c.checked_add(fraction_cents))
            .filter(|c| *c <= MAX_CENTS)
            .ok_or(TOO_LARGE)?;
        Ok(Money(if negative { -cents } else { cents }))
    }
}

impl std::fmt::Display for Money {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // A raw JSON number keeps the two decimals that f64 would drop.
        let raw = RawValue::from_string(self.to_string()).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // serde_json prints a float in its shortest exact form (12.99 stays
        // "12.99"), so parsing that text gives the cents the client wrote.
        let number = serde_json::Number::deserialize(deserializer)?;
        Money::parse(&number.to_string()).map_err(D::Error::custom)
    }
}

/// In the API document: a decimal number with at most two decimals.
impl utoipa::PartialSchema for Money {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::Number)
            .description(Some(
                "An amount of money: a decimal number with at most two decimals (1299.99)",
            ))
            .maximum(Some(MAX_CENTS / 100))
            .minimum(Some(-(MAX_CENTS / 100)))
            .multiple_of(Some(0.01))
            .examples([serde_json::json!(1299.99)])
            .into()
    }
}

impl utoipa::ToSchema for Money {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_text_exactly() {
        assert_eq!(Money::parse("1299.99"), Ok(Money(129_999)));
        assert_eq!(Money::parse("12.9"), Ok(Money(1_290)));
        assert_eq!(Money::parse("12.90"), Ok(Money(1_290)));
        assert_eq!(Money::parse("12.900"), Ok(Money(1_290)));
        assert_eq!(Money::parse("7"), Ok(Money(700)));
        assert_eq!(Money::parse("-0.5"), Ok(Money(-50)));
        assert!(Money::parse("12.999").is_err());
        assert!(Money::parse("1e3").is_err());
        assert!(Money::parse(".5").is_err());
        assert!(Money::parse("99999999999999999999").is_err());
    }

    #[test]
    fn json_round_trip_keeps_two_decimals() {
        let money: Money = serde_json::from_str("1299.9").unwrap();
        assert_eq!(money.cents(), 129_990);
        assert_eq!(serde_json::to_string(&money).unwrap(), "1299.90");
        let sum = Money(129_999).checked_mul(2).unwrap();
        let total = sum.checked_add(Money(1_299)).unwrap();
        assert_eq!(serde_json::to_string(&total).unwrap(), "2612.97");
        assert!(serde_json::from_str::<Money>("\"12.00\"").is_err());
        assert!(serde_json::from_str::<Money>("0.001").is_err());
    }
}
