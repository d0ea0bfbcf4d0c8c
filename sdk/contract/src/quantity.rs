//! Kubernetes resource quantities, compared exactly.
//!
//! Values are held as integer nano-units (i128), which covers every suffix from `n` to `Ei`
//! without floating point rounding: `0.1` and `100m` compare equal, `1Gi` > `1000Mi`.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity {
    nanos: i128,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantityError(String);

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

const NANO: i128 = 1_000_000_000;

/// Whether `text` is a quantity Kubernetes accepts in a resource request or limit: well formed,
/// not negative, no surrounding space (`500m`, `1Gi`, `2`, `1e3`).
pub fn is_quantity(text: &str) -> bool {
    text == text.trim() && Quantity::parse(text).is_ok_and(|q| q.nanos >= 0)
}

impl Quantity {
    pub fn parse(text: &str) -> Result<Self, QuantityError> {
        let s = text.trim();
        let err = |why: &str| QuantityError(format!("{text:?} is not a Kubernetes quantity ({why})"));
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(s.len());
        let (number, suffix) = s.split_at(split);
        if number.is_empty() {
            return Err(err("no number"));
        }
        let (negative, number) = match number.as_bytes()[0] {
            b'-' => (true, &number[1..]),
            b'+' => (false, &number[1..]),
            _ => (false, number),
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && frac.is_empty() || !whole.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return Err(err("bad number"));
        }
        // (multiplier numerator in nano-units, decimal exponent applied after)
        let (multiplier, exp10): (i128, i32) = match suffix {
            "" => (NANO, 0),
            "n" => (1, 0),
            "u" => (1_000, 0),
            "m" => (1_000_000, 0),
            "k" => (NANO, 3),
            "M" => (NANO, 6),
            "G" => (NANO, 9),
            "T" => (NANO, 12),
            "P" => (NANO, 15),
            "E" => (NANO, 18),
            "Ki" => (NANO << 10, 0),
            "Mi" => (NANO << 20, 0),
            "Gi" => (NANO << 30, 0),
            "Ti" => (NANO << 40, 0),
            "Pi" => (NANO << 50, 0),
            "Ei" => (NANO << 60, 0),
            s if s.starts_with(['e', 'E']) => {
                let e: i32 = s[1..].parse().map_err(|_| err("bad exponent"))?;
                if !(-9..=18).contains(&e) {
                    return Err(err("exponent out of range"));
                }
                (NANO, e)
            }
            _ => return Err(err("unknown suffix")),
        };
        // value = (whole.frac) * multiplier * 10^exp10, computed as integer / 10^len(frac).
        let digits: String = format!("{whole}{frac}");
        let digits = digits.trim_start_matches('0');
        let mantissa: i128 = if digits.is_empty() { 0 } else { digits.parse().map_err(|_| err("number too large"))? };
        let mut value = mantissa.checked_mul(multiplier).ok_or_else(|| err("too large"))?;
        let mut scale = exp10 - frac.len() as i32;
        while scale > 0 {
            value = value.checked_mul(10).ok_or_else(|| err("too large"))?;
            scale -= 1;
        }
        while scale < 0 {
            // Round up, as Kubernetes does for sub-nano precision.
            value = (value + 9) / 10;
            scale += 1;
        }
        Ok(Quantity { nanos: if negative { -value } else { value } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Quantity {
        Quantity::parse(s).unwrap()
    }

    #[test]
    fn comparisons() {
        assert!(q("500m") < q("1"));
        assert_eq!(q("0.1"), q("100m"));
        assert!(q("1Gi") > q("1000Mi"));
        assert!(q("1G") < q("1Gi"));
        assert_eq!(q("1Ki"), q("1024"));
        assert_eq!(q("1e3"), q("1k"));
        assert_eq!(q("2"), q("2000m"));
        assert_eq!(q("1.5Gi"), q("1536Mi"));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "lots", "1.2.3", "5X", "Gi", "1e99"] {
            assert!(Quantity::parse(bad).is_err(), "{bad}");
        }
    }
}
