//! Kubernetes resource quantities (`2`, `500m`, `1.5`, `1Gi`, `512Mi`,
//! `1G`, `1e9`, plain bytes), read exactly enough to compare a container's
//! limit with a profile's minimum.
//!
//! A quantity is `<number><suffix>`: the number is digits with at most one
//! `.`; the suffix is a binary SI one (`Ki Mi Gi Ti Pi Ei`), a decimal SI one
//! (`n u m k M G T P E`, or none), or a decimal exponent (`e3`, `E-2`). The
//! value is kept in nano-units (like the API server, which rounds finer
//! fractions up), so `0.5`, `500m` and `500000000n` are the same quantity.

use std::cmp::Ordering;
use std::fmt;

/// A non-negative quantity, in nano-units (1e-9 of the base unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity {
    nanos: u128,
}

/// Why a string is not a quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a Kubernetes quantity: {reason}")]
pub struct QuantityError {
    /// The text given.
    pub text: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Quantity {
    /// The value in nano-units.
    pub fn nanos(self) -> u128 {
        self.nanos
    }

    /// The value in whole units, rounded up (bytes for memory).
    pub fn ceil_units(self) -> u128 {
        self.nanos.div_ceil(NANOS_PER_UNIT)
    }

    /// The value in milli-units, rounded up (millicores for CPU).
    pub fn ceil_millis(self) -> u128 {
        self.nanos.div_ceil(1_000_000)
    }

    /// The sum of two quantities (saturating).
    #[must_use]
    pub fn saturating_add(self, other: Self) -> Self {
        Self {
            nanos: self.nanos.saturating_add(other.nanos),
        }
    }

    /// Builds a quantity from nano-units.
    pub fn from_nanos(nanos: u128) -> Self {
        Self { nanos }
    }
}

const NANOS_PER_UNIT: u128 = 1_000_000_000;

impl fmt::Display for Quantity {
    /// Whole units with up to nine decimals (`1.5`, `1073741824`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.nanos / NANOS_PER_UNIT;
        let frac = self.nanos % NANOS_PER_UNIT;
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let digits = format!("{frac:09}");
            write!(f, "{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

impl std::str::FromStr for Quantity {
    type Err = QuantityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_quantity(s)
    }
}

/// Parses a Kubernetes quantity.
///
/// # Errors
/// Empty text, a negative value, a malformed number, an unknown suffix, or a
/// value too large to hold.
pub fn parse_quantity(text: &str) -> Result<Quantity, QuantityError> {
    let err = |reason| QuantityError {
        text: text.to_owned(),
        reason,
    };
    if text.is_empty() {
        return Err(err("it is empty"));
    }
    let (negative, body) = match text.as_bytes()[0] {
        b'+' => (false, &text[1..]),
        b'-' => (true, &text[1..]),
        _ => (false, text),
    };
    let number_len = body
        .bytes()
        .position(|b| !(b.is_ascii_digit() || b == b'.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(number_len);
    if !number.bytes().any(|b| b.is_ascii_digit()) {
        return Err(err("it does not start with a number"));
    }
    if number.bytes().filter(|&b| b == b'.').count() > 1 {
        return Err(err("the number has more than one '.'"));
    }
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    // mantissa = digits without the dot; value = mantissa * 10^-frac_digits.
    let mut mantissa: u128 = 0;
    for b in int_part.bytes().chain(frac_part.bytes()) {
        mantissa = mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(u128::from(b - b'0')))
            .ok_or_else(|| err("the number is too large"))?;
    }
    let frac_digits = i64::try_from(frac_part.len()).map_err(|_| err("the number is too long"))?;
    let (exp10, pow2): (i64, u32) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        other => {
            let exponent = other.strip_prefix(['e', 'E']).ok_or_else(|| {
                err("unknown suffix (use Ki, Mi, Gi, Ti, Pi, Ei, n, u, m, k, M, G, T, P, E or eN)")
            })?;
            let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 4 {
                return Err(err("the exponent after 'e' is not a whole number"));
            }
            let value: i64 = exponent
                .parse()
                .map_err(|_| err("the exponent after 'e' is not a whole number"))?;
            (value, 0)
        }
    };
    if negative && mantissa != 0 {
        return Err(err("it is negative"));
    }
    let too_large = || err("the value is too large");
    // nanos = mantissa * 2^pow2 * 10^(9 + exp10 - frac_digits), rounded up.
    let scaled = mantissa.checked_mul(1u128 << pow2).ok_or_else(too_large)?;
    let shift = 9 + exp10 - frac_digits;
    let nanos = match shift.cmp(&0) {
        Ordering::Equal => scaled,
        Ordering::Greater => {
            let factor = u32::try_from(shift)
                .ok()
                .and_then(|s| 10u128.checked_pow(s))
                .ok_or_else(too_large)?;
            scaled.checked_mul(factor).ok_or_else(too_large)?
        }
        Ordering::Less => match u32::try_from(-shift).ok().and_then(|s| 10u128.checked_pow(s)) {
            Some(divisor) => scaled.div_ceil(divisor),
            // Finer than 1e-38 of a nano-unit: rounds up to one nano (or zero).
            None => u128::from(scaled != 0),
        },
    };
    Ok(Quantity { nanos })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(text: &str) -> Quantity {
        parse_quantity(text).unwrap()
    }

    #[test]
    fn cpu_forms_compare_exactly() {
        assert_eq!(q("2"), q("2000m"));
        assert_eq!(q("1.5"), q("1500m"));
        assert_eq!(q("0.5"), q("500m"));
        assert_eq!(q(".5"), q("500m"));
        assert_eq!(q("5."), q("5"));
        assert_eq!(q("+2"), q("2"));
        assert!(q("500m") < q("1"));
        assert!(q("1999m") < q("2"));
        assert_eq!(q("100m").ceil_millis(), 100);
        assert_eq!(q("1.5").ceil_millis(), 1500);
        assert_eq!(q("1n").nanos(), 1);
        assert_eq!(q("1u").nanos(), 1000);
        assert_eq!(q("0").nanos(), 0);
        assert_eq!(q("-0").nanos(), 0);
    }

    #[test]
    fn memory_forms_compare_exactly() {
        assert_eq!(q("1Gi").ceil_units(), 1 << 30);
        assert_eq!(q("512Mi").ceil_units(), 512 << 20);
        assert_eq!(q("1G").ceil_units(), 1_000_000_000);
        assert_eq!(q("1e9"), q("1G"));
        assert_eq!(q("1E9"), q("1G"));
        assert_eq!(q("1e+9"), q("1G"));
        assert_eq!(q("1073741824"), q("1Gi"));
        assert_eq!(q("1.5Gi"), q("1536Mi"));
        assert_eq!(q("1Ki"), q("1024"));
        assert_eq!(q("1k"), q("1000"));
        assert_eq!(q("1E"), q("1e18"));
        assert_eq!(q("1Ei").ceil_units(), 1 << 60);
        assert_eq!(q("2Ti"), q("2048Gi"));
        assert_eq!(q("1P"), q("1000T"));
        assert!(q("1G") < q("1Gi"));
        assert!(q("512Mi") < q("1Gi"));
        assert_eq!(q("1e-3"), q("1m"));
    }

    #[test]
    fn fractions_finer_than_a_nano_round_up() {
        assert_eq!(q("0.0000000001").nanos(), 1);
        assert_eq!(q("1.0000000001").nanos(), 1_000_000_001);
        assert_eq!(q("1e-40").nanos(), 1);
        assert_eq!(q("0e-40").nanos(), 0);
    }

    #[test]
    fn malformed_quantities_are_refused_with_a_reason() {
        for (text, words) in [
            ("", "empty"),
            ("abc", "does not start with a number"),
            ("Gi", "does not start with a number"),
            (".", "does not start with a number"),
            ("1.2.3", "more than one"),
            ("-1", "negative"),
            ("-500m", "negative"),
            ("1GB", "unknown suffix"),
            ("1 Gi", "unknown suffix"),
            ("1K", "unknown suffix"),
            ("1gi", "unknown suffix"),
            ("1e", "exponent"),
            ("1e1.5", "exponent"),
            ("1e+", "exponent"),
            ("1e99999", "exponent"),
            ("1e40", "too large"),
            ("99999999999999999999999999999999999999999", "too large"),
        ] {
            let error = parse_quantity(text).unwrap_err();
            assert!(error.to_string().contains(words), "{text:?}: {error}");
            assert!(error.to_string().contains(&format!("{text:?}")), "{error}");
        }
    }

    #[test]
    fn display_is_in_whole_units() {
        assert_eq!(q("1.5").to_string(), "1.5");
        assert_eq!(q("250m").to_string(), "0.25");
        assert_eq!(q("1Ki").to_string(), "1024");
        assert_eq!(q("1Ki").saturating_add(q("1Ki")), q("2Ki"));
        assert_eq!(Quantity::from_nanos(5).nanos(), 5);
        assert_eq!("2".parse::<Quantity>().unwrap(), q("2000m"));
    }
}
