//! JSON integers as JSON Schema counts them: `5054.0` and `1e2` are
//! integers (a number whose fraction is zero), so a field the document
//! declares `integer` takes them, as it takes `5054`.
//!
//! A float is taken only below 2^53 in magnitude, where every integer is
//! exact; `1.5` is refused (422, like any other wrong type).

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

/// The largest magnitude up to which every integer has an exact `f64`.
const EXACT: f64 = 9_007_199_254_740_992.0;

/// `#[serde(deserialize_with = "service_kit::number::integer")]` on an
/// `i64` field.
pub fn integer<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    if let Some(n) = number.as_i64() {
        return Ok(n);
    }
    match number.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < EXACT => Ok(f as i64),
        Some(f) if f.fract() != 0.0 => Err(D::Error::custom(format!(
            "invalid type: number {number}, expected an integer"
        ))),
        _ => Err(D::Error::custom(format!("integer {number} out of range"))),
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Line {
        #[serde(deserialize_with = "super::integer")]
        quantity: i64,
    }

    fn parse(json: &str) -> Result<i64, String> {
        serde_json::from_str::<Line>(&format!(r#"{{"quantity":{json}}}"#))
            .map(|line| line.quantity)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn integral_numbers_of_any_spelling_are_integers() {
        assert_eq!(parse("5054"), Ok(5054));
        assert_eq!(parse("-7"), Ok(-7));
        assert_eq!(parse("5054.0"), Ok(5054));
        assert_eq!(parse("1e2"), Ok(100));
        assert_eq!(parse("9223372036854775807"), Ok(i64::MAX));
    }

    #[test]
    fn fractions_strings_and_huge_numbers_are_refused() {
        for bad in [
            "1.5",
            "0.1",
            "\"3\"",
            "null",
            "9223372036854775808",
            "1e300",
            "-1e300",
        ] {
            assert!(parse(bad).is_err(), "{bad} was taken");
        }
        assert_eq!(parse("-2.5e1"), Ok(-25));
    }
}
