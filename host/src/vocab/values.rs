//! Values GitLab's config and job files spell their own way (quantities, volume names,
//! overwrite patterns, pull policies, byte sizes, durations), checked while they are
//! deserialised so an error points at the value.

use std::fmt;
use std::time::Duration;

use keel_contract::pod::is_dns_label;
use keel_contract::quantity::is_quantity;
use serde::{Deserialize, Deserializer, Serialize, de};

use super::PullPolicy;
use crate::input::compile_overwrite_regex;

/// A Kubernetes resource quantity (`500m`, `1Gi`, `2`), checked when the config is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Quantity(pub String);

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Quantity;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a Kubernetes quantity such as \"500m\", \"1Gi\" or 2")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Quantity, E> {
                if is_quantity(s) {
                    Ok(Quantity(s.to_string()))
                } else {
                    Err(E::custom(format!("{s:?} is not a Kubernetes quantity (examples: \"500m\", \"1Gi\", \"2\")")))
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Quantity, E> {
                if n < 0 {
                    return Err(E::custom(format!("quantity {n} is negative")));
                }
                Ok(Quantity(n.to_string()))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Quantity, E> {
                Ok(Quantity(n.to_string()))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Quantity, E> {
                if n < 0.0 || !n.is_finite() {
                    return Err(E::custom(format!("quantity {n} is not a non-negative number")));
                }
                Ok(Quantity(n.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A pod volume name: a DNS-1123 label (lower-case letters, digits, '-'; at most 63).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct VolumeName(pub String);

impl<'de> Deserialize<'de> for VolumeName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if !is_dns_label(&s) {
            return Err(de::Error::custom(format!(
                "{s:?} is not a valid volume name (lower-case letters, digits and '-', at most 63 characters)"
            )));
        }
        Ok(VolumeName(s))
    }
}

/// An `*_overwrite_allowed` regular expression. Empty means the overwrite is disabled.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct OverwriteRegex(pub String);

impl<'de> Deserialize<'de> for OverwriteRegex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        compile_overwrite_regex(&s).map_err(de::Error::custom)?;
        Ok(OverwriteRegex(s))
    }
}

struct PullPolicyVisitor {
    allow_single: bool,
}

impl<'de> de::Visitor<'de> for PullPolicyVisitor {
    type Value = Vec<PullPolicy>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.allow_single {
            f.write_str("a pull policy (\"always\", \"if-not-present\", \"never\") or a list of them")
        } else {
            f.write_str("a list of pull policies (\"always\", \"if-not-present\", \"never\")")
        }
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        if !self.allow_single {
            return Err(E::invalid_type(de::Unexpected::Str(s), &self));
        }
        // GitLab treats an empty string as "not set".
        if s.is_empty() {
            return Ok(Vec::new());
        }
        PullPolicy::from_gitlab(s).map(|p| vec![p]).ok_or_else(|| {
            E::custom(format!("unknown pull policy {s:?}, expected \"always\", \"if-not-present\" or \"never\""))
        })
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(s) = seq.next_element::<String>()? {
            let p = PullPolicy::from_gitlab(&s).ok_or_else(|| {
                de::Error::custom(format!(
                    "unknown pull policy {s:?}, expected \"always\", \"if-not-present\" or \"never\""
                ))
            })?;
            if !out.contains(&p) {
                out.push(p);
            }
        }
        Ok(out)
    }
}

/// `"always"` or `["always", "if-not-present"]`; shared with the job's `image:pull_policy`.
pub fn one_or_many_pull_policies<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PullPolicy>, D::Error> {
    d.deserialize_any(PullPolicyVisitor { allow_single: true })
}

pub fn many_pull_policies<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PullPolicy>, D::Error> {
    d.deserialize_any(PullPolicyVisitor { allow_single: false })
}

/// A byte count: an integer or a quantity-like string (`64Mi`, `1G`, `512k`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

pub fn parse_byte_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"64Mi\" or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<ByteSize, E> {
                u64::try_from(n).map(ByteSize).map_err(|_| E::custom(format!("size {n} is negative")))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ByteSize, E> {
                parse_byte_size(s)
                    .map(ByteSize)
                    .ok_or_else(|| E::custom(format!("{s:?} is not a size (examples: \"64Mi\", \"1G\", 1048576)")))
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration in GitLab's human style: `"1h 30m"`, `"90 minutes"`, `"2s"`, `"500ms"`, or a
/// bare number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GitlabDuration(pub Duration);

/// Parse `"1h 30m"`, `"3 hours 30 minutes"`, `"1 day"`, `"500ms"`, `"3600"` (seconds).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
        if rest.is_empty() {
            break;
        }
        if let Some(r) = rest.strip_prefix("and ") {
            rest = r;
            continue;
        }
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_end == 0 {
            return None;
        }
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = rest[num_end..].trim_start();
        let unit_end = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let secs: f64 = match unit {
            "ms" | "msec" | "millisecond" | "milliseconds" => 0.001,
            "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
            "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3600.0,
            "d" | "day" | "days" => 86_400.0,
            "w" | "week" | "weeks" => 604_800.0,
            _ => return None,
        };
        total += Duration::try_from_secs_f64(n * secs).ok()?;
    }
    Some(total)
}

impl<'de> Deserialize<'de> for GitlabDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = GitlabDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"2s\", \"1h 30m\" or a number of seconds")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<GitlabDuration, E> {
                Ok(GitlabDuration(Duration::from_secs(n)))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<GitlabDuration, E> {
                u64::try_from(n)
                    .map(|n| GitlabDuration(Duration::from_secs(n)))
                    .map_err(|_| E::custom(format!("duration {n} is negative")))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<GitlabDuration, E> {
                parse_duration(s).map(GitlabDuration).ok_or_else(|| {
                    E::custom(format!("{s:?} is not a duration (examples: \"2s\", \"1h 30m\", \"90 minutes\")"))
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h 30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("3 hours 30 minutes"), Some(Duration::from_secs(12600)));
        assert_eq!(parse_duration("2h30m"), Some(Duration::from_secs(9000)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("3600"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1 day"), Some(Duration::from_secs(86400)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("5 fortnights"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn quantities() {
        for ok in ["1", "500m", "1Gi", "0.5", "1e3", "100Mi", "2k"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "1 Gi", "one", "1GB", "-1", "1.2.3"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("64Mi"), Some(64 << 20));
        assert_eq!(parse_byte_size("1G"), Some(1_000_000_000));
        assert_eq!(parse_byte_size("12"), Some(12));
        assert_eq!(parse_byte_size("12 parsecs"), None);
    }
}
