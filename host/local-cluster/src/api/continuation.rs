//! List continue tokens in the real server's format: unpadded URL-safe base64 of
//! `{"v":"meta.k8s.io/v1","rv":<snapshot version>,"start":"<key after the last item>\u0000"}`.
//! The key is `namespace/name` (or `name` for cluster-scoped kinds); `rv` -1 marks the
//! "inconsistent" token a 410 offers, which continues from the key at the latest version.

use crate::errors::ApiError;
use crate::store::Key;
use base64::Engine;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

const VERSION: &str = "meta.k8s.io/v1";

#[derive(Serialize, Deserialize)]
struct Token {
    v: String,
    rv: i64,
    start: String,
}

/// Where a continued list resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continue {
    /// The first page's snapshot; `None` for an inconsistent continuation (latest version).
    pub rv: Option<u64>,
    /// The last key already returned.
    pub after: Key,
}

pub fn encode(rv: Option<u64>, after: &Key, namespaced: bool) -> String {
    let start = if namespaced { format!("{}/{}\u{0}", after.0, after.1) } else { format!("{}\u{0}", after.1) };
    let token = Token { v: VERSION.into(), rv: rv.map_or(-1, |rv| rv as i64), start };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).expect("a token serializes"))
}

pub fn decode(raw: &str, namespaced: bool) -> Result<Continue, ApiError> {
    let bad = |why: &str| ApiError::BadRequest(format!("invalid continue token: {why}"));
    let bytes =
        URL_SAFE_NO_PAD.decode(raw).or_else(|_| URL_SAFE.decode(raw)).map_err(|e| bad(&format!("not base64: {e}")))?;
    let token: Token = serde_json::from_slice(&bytes).map_err(|e| bad(&format!("not a continue key: {e}")))?;
    if token.v != VERSION {
        return Err(bad(&format!("incorrect encoded start resourceVersion (version {VERSION})")));
    }
    let rv = match token.rv {
        -1 => None,
        rv if rv > 0 => Some(rv as u64),
        _ => return Err(bad("incorrect encoded start resourceVersion (version meta.k8s.io/v1)")),
    };
    let start = token.start.strip_suffix('\u{0}').unwrap_or(&token.start);
    if start.is_empty() {
        return Err(bad("continue key is not valid"));
    }
    let after = match (namespaced, start.split_once('/')) {
        (true, Some((ns, name))) if !name.contains('/') => (ns.to_owned(), name.to_owned()),
        (false, None) => (String::new(), start.to_owned()),
        _ => return Err(bad("continue key does not name an object of this resource")),
    };
    Ok(Continue { rv, after })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let key = ("default".to_owned(), "cm-07".to_owned());
        let token = encode(Some(42), &key, true);
        assert_eq!(decode(&token, true).unwrap(), Continue { rv: Some(42), after: key.clone() });
        assert_eq!(decode(&encode(None, &key, true), true).unwrap().rv, None);
        let node = (String::new(), "n1".to_owned());
        assert_eq!(decode(&encode(Some(3), &node, false), false).unwrap().after, node);
        for garbage in ["", "!!!", "e30", &URL_SAFE_NO_PAD.encode(br#"{"v":"v2","rv":1,"start":"a/b\u0000"}"#)] {
            assert!(matches!(decode(garbage, true), Err(ApiError::BadRequest(_))), "{garbage:?}");
        }
        assert!(decode(&token, false).is_err(), "a namespaced key on a cluster-scoped list");
    }
}
