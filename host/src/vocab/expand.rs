//! GitLab's `$VAR` expansion with the host's bound (the largest Kubernetes object).

pub use keel_contract::expand::{TooLong, expand_limited};

use crate::input::{limits, show_bytes};

/// Expand `$VAR` and `${VAR}` from `lookup`, GitLab style: unknown variables become empty,
/// `$$` is a literal `$`. The result is cut at [`limits::OBJECT_BYTES`] with a note: nothing
/// larger fits in a Kubernetes object, and `${A}` repeated 100,000 times once made the host
/// allocate 2 GB. Where an oversized value must be an error, use [`expand_limited`].
pub fn expand(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    expand_limited(s, lookup, limits::OBJECT_BYTES).unwrap_or_else(with_cut_note)
}

/// What an expansion over [`limits::OBJECT_BYTES`] produced, with a note saying it was cut.
pub fn with_cut_note(TooLong(mut out): TooLong) -> String {
    out.push_str(&format!("... [cut: the expansion exceeds {}]", show_bytes(limits::OBJECT_BYTES)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion() {
        let lookup = |k: &str| (k == "A").then(|| "x".to_string());
        assert_eq!(expand("$A-${A}-$B-$$A-$", &lookup), "x-x--$A-$");
    }
}
