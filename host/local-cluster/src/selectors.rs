//! Label and field selectors (`?labelSelector=`, `?fieldSelector=`) with the grammar of
//! Kubernetes' `labels.Parse` / `fields.ParseSelector` for the operators clients actually send.

use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SelectorError {
    #[error("unable to parse requirement {requirement:?} in selector {selector:?}: {why}")]
    Requirement { selector: String, requirement: String, why: &'static str },
    #[error("unbalanced parenthesis in selector {0:?}")]
    Unbalanced(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

#[derive(Debug, Clone, PartialEq)]
struct Requirement {
    key: String,
    op: Op,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<Requirement>);

/// A parsed field selector over dotted object paths (`status.phase`, `involvedObject.name`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<Requirement>);

/// Split on commas that are not inside `( )`, as `in (a,b)` carries commas of its own.
fn split_top_level(s: &str) -> Result<Vec<&str>, SelectorError> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(SelectorError::Unbalanced(s.to_owned()));
                }
            }
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(SelectorError::Unbalanced(s.to_owned()));
    }
    parts.push(&s[start..]);
    Ok(parts.into_iter().map(str::trim).filter(|p| !p.is_empty()).collect())
}

fn valid_key(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn parse_set(selector: &str, req: &str, rest: &str) -> Result<Vec<String>, SelectorError> {
    let rest = rest.trim();
    let inner = rest.strip_prefix('(').and_then(|r| r.strip_suffix(')')).ok_or_else(|| SelectorError::Requirement {
        selector: selector.into(),
        requirement: req.into(),
        why: "expected a parenthesised value set",
    })?;
    Ok(inner.split(',').map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).collect())
}

fn parse_requirement(selector: &str, req: &str) -> Result<Requirement, SelectorError> {
    let bad = |why| SelectorError::Requirement { selector: selector.into(), requirement: req.into(), why };
    if let Some(key) = req.strip_prefix('!') {
        let key = key.trim();
        return if valid_key(key) {
            Ok(Requirement { key: key.into(), op: Op::NotExists })
        } else {
            Err(bad("invalid key"))
        };
    }
    for (token, is_neq) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((k, v)) = req.split_once(token) {
            let (k, v) = (k.trim(), v.trim());
            if !valid_key(k) {
                return Err(bad("invalid key"));
            }
            let op = if is_neq { Op::NotEq(v.into()) } else { Op::Eq(v.into()) };
            return Ok(Requirement { key: k.into(), op });
        }
    }
    let mut words = req.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or_default().trim();
    let rest = words.next().unwrap_or_default().trim();
    if !valid_key(key) {
        return Err(bad("invalid key"));
    }
    if rest.is_empty() {
        return Ok(Requirement { key: key.into(), op: Op::Exists });
    }
    if let Some(set) = rest.strip_prefix("notin") {
        return Ok(Requirement { key: key.into(), op: Op::NotIn(parse_set(selector, req, set)?) });
    }
    if let Some(set) = rest.strip_prefix("in") {
        return Ok(Requirement { key: key.into(), op: Op::In(parse_set(selector, req, set)?) });
    }
    Err(bad("unknown operator"))
}

impl Requirement {
    fn matches(&self, value: Option<&str>) -> bool {
        match (&self.op, value) {
            (Op::Eq(v), Some(x)) => v == x,
            (Op::Eq(_), None) => false,
            (Op::NotEq(v), x) => x != Some(v.as_str()),
            (Op::In(set), Some(x)) => set.iter().any(|v| v == x),
            (Op::In(_), None) => false,
            (Op::NotIn(set), x) => x.is_none_or(|x| !set.iter().any(|v| v == x)),
            (Op::Exists, x) => x.is_some(),
            (Op::NotExists, x) => x.is_none(),
        }
    }
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        split_top_level(s)?.into_iter().map(|r| parse_requirement(s, r)).collect::<Result<_, _>>().map(LabelSelector)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        self.0.iter().all(|r| r.matches(labels.and_then(|l| l.get(&r.key)).and_then(Value::as_str)))
    }
}

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let reqs = split_top_level(s)?
            .into_iter()
            .map(|r| match parse_requirement(s, r)? {
                req @ Requirement { op: Op::Eq(_) | Op::NotEq(_), .. } => Ok(req),
                _ => Err(SelectorError::Requirement {
                    selector: s.into(),
                    requirement: r.into(),
                    why: "field selectors support only =, == and !=",
                }),
            })
            .collect::<Result<_, _>>()?;
        Ok(FieldSelector(reqs))
    }

    /// Fields compare as strings; a missing field compares as "" like the real server's
    /// field sets (e.g. `spec.nodeName=` selects unscheduled pods).
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|r| {
            let pointer = format!("/{}", r.key.replace('.', "/"));
            let value = match obj.pointer(&pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            r.matches(Some(&value))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: Value) -> Value {
        json!({"metadata": {"name": "p1", "namespace": "ns", "labels": labels}, "status": {"phase": "Running"}, "spec": {"nodeName": "n"}})
    }

    #[test]
    fn label_operators() {
        let p = pod(json!({"app": "web", "tier": "front"}));
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app!=db", true),
            ("missing!=x", true),
            ("app in (db, web)", true),
            ("app in (db)", false),
            ("app notin (db,cache)", true),
            ("app notin (web)", false),
            ("missing notin (web)", true),
            ("tier", true),
            ("missing", false),
            ("!missing", true),
            ("!tier", false),
            ("app=web,tier in (front,back),!missing", true),
            ("app=web,tier=back", false),
        ] {
            assert_eq!(LabelSelector::parse(sel).unwrap().matches(&p), want, "selector {sel:?}");
        }
    }

    #[test]
    fn label_parse_errors_name_the_selector() {
        let err = LabelSelector::parse("app in (a").unwrap_err();
        assert_eq!(err, SelectorError::Unbalanced("app in (a".into()));
        let err = LabelSelector::parse("app ~ x").unwrap_err().to_string();
        assert!(err.contains("app ~ x"), "{err}");
    }

    #[test]
    fn field_selectors() {
        let p = pod(json!({}));
        for (sel, want) in [
            ("metadata.name=p1", true),
            ("metadata.name!=p1", false),
            ("metadata.namespace==ns,status.phase=Running", true),
            ("spec.nodeName=other", false),
            ("status.podIP=", true),
        ] {
            assert_eq!(FieldSelector::parse(sel).unwrap().matches(&p), want, "selector {sel:?}");
        }
        assert!(FieldSelector::parse("metadata.name in (a)").is_err());
    }
}
