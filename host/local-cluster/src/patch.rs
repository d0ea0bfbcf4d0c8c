//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902, via the `json-patch` crate)
//! and strategic merge patch for the core-type lists clients rely on (merge by name/key,
//! `$patch: delete|replace`, `$deleteFromPrimitiveList/…`, `$setElementOrder/…`).

pub mod apply;

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error(
        "unsupported patch content type {0:?}; use application/merge-patch+json, application/strategic-merge-patch+json or application/json-patch+json"
    )]
    UnsupportedType(String),
    #[error("patch body is not valid JSON: {0}")]
    BadJson(#[source] serde_json::Error),
    #[error("json patch body is not a list of operations: {0}")]
    BadJsonPatch(#[source] serde_json::Error),
    #[error("json patch could not be applied: {0}")]
    JsonPatch(#[source] json_patch::PatchError),
    #[error("The allowed maximum operations in a JSON patch is {max}, got {0}", max = crate::limits::MAX_JSON_PATCH_OPERATIONS)]
    TooManyOperations(usize),
    #[error(
        "Unable to complete the copy, the accumulated size increase of copy is {copied}, exceeding the limit {}",
        crate::limits::MAX_JSON_PATCH_COPIED
    )]
    CopyLimit { copied: usize },
    #[error("{kind} patch must be a JSON object, got {got}")]
    NotAnObject { kind: &'static str, got: &'static str },
    #[error("unknown strategic merge directive {directive:?} at {field:?}")]
    Directive { directive: String, field: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Strategic,
    Json,
    /// Server-side apply: see [`apply`] (not a plain patch: it needs the field manager).
    Apply,
}

impl PatchKind {
    pub fn from_content_type(ct: &str) -> Result<Self, PatchError> {
        let base = ct.split(';').next().unwrap_or_default().trim();
        match base {
            "application/merge-patch+json" => Ok(PatchKind::Merge),
            "application/strategic-merge-patch+json" => Ok(PatchKind::Strategic),
            "application/json-patch+json" => Ok(PatchKind::Json),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Ok(PatchKind::Apply),
            other => Err(PatchError::UnsupportedType(other.to_owned())),
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Apply a patch body of `kind` to `target` in place.
pub fn apply(kind: PatchKind, target: &mut Value, body: &[u8]) -> Result<(), PatchError> {
    match kind {
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_slice(body).map_err(PatchError::BadJsonPatch)?;
            if ops.0.len() > crate::limits::MAX_JSON_PATCH_OPERATIONS {
                return Err(PatchError::TooManyOperations(ops.0.len()));
            }
            // One operation at a time, so the sum of what `copy` adds is checked before each copy
            // (16 copies of a doubling value would be 64 MiB). The caller works on a copy of
            // the object, so a failure halfway leaves nothing behind.
            let mut copied = 0usize;
            for op in &ops.0 {
                if let json_patch::PatchOperation::Copy(c) = op
                    && let Some(from) = target.pointer(c.from.as_str())
                {
                    copied += serde_json::to_vec(from).map_or(0, |v| v.len());
                    if copied > crate::limits::MAX_JSON_PATCH_COPIED {
                        return Err(PatchError::CopyLimit { copied });
                    }
                }
                json_patch::patch(target, std::slice::from_ref(op)).map_err(PatchError::JsonPatch)?;
            }
            Ok(())
        }
        PatchKind::Merge => {
            let p: Value = serde_json::from_slice(body).map_err(PatchError::BadJson)?;
            if !p.is_object() {
                return Err(PatchError::NotAnObject { kind: "merge", got: type_name(&p) });
            }
            json_patch::merge(target, &p);
            Ok(())
        }
        PatchKind::Strategic => {
            let p: Value = serde_json::from_slice(body).map_err(PatchError::BadJson)?;
            match p {
                Value::Object(p) => strategic_merge(target, p, ""),
                other => Err(PatchError::NotAnObject { kind: "strategic merge", got: type_name(&other) }),
            }
        }
        PatchKind::Apply => Err(PatchError::UnsupportedType("application/apply-patch+yaml".into())),
    }
}

use keel_contract::merge_keys::merge_key;

/// Lists of scalars the Go types mark `patchStrategy:"merge"` (set union instead of replace).
fn merges_primitives(field: &str) -> bool {
    matches!(field, "finalizers")
}

fn strategic_merge(target: &mut Value, mut patch: Map<String, Value>, path: &str) -> Result<(), PatchError> {
    if let Some(directive) = patch.remove("$patch") {
        match directive.as_str() {
            Some("replace") => {
                *target = Value::Object(patch);
                return Ok(());
            }
            Some("delete") => {
                *target = Value::Object(Map::new());
                return Ok(());
            }
            Some("merge") => {}
            _ => return Err(PatchError::Directive { directive: directive.to_string(), field: path.to_owned() }),
        }
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    // Ordering hints and retainKeys only affect presentation or fields we do not model.
    patch.retain(|k, _| !k.starts_with("$setElementOrder/") && k != "$retainKeys");
    let deletions: Vec<(String, Value)> = patch
        .keys()
        .filter(|k| k.starts_with("$deleteFromPrimitiveList/"))
        .cloned()
        .collect::<Vec<_>>()
        .into_iter()
        .filter_map(|k| patch.remove(&k).map(|v| (k, v)))
        .collect();
    let obj = target.as_object_mut().expect("made an object above");
    for (key, value) in deletions {
        let field = key.trim_start_matches("$deleteFromPrimitiveList/");
        if let (Some(Value::Array(list)), Value::Array(remove)) = (obj.get_mut(field), value) {
            list.retain(|v| !remove.contains(v));
        }
    }
    for (key, pval) in patch {
        if key.starts_with('$') {
            return Err(PatchError::Directive { directive: key, field: path.to_owned() });
        }
        let child_path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
        match pval {
            Value::Null => {
                obj.remove(&key);
            }
            Value::Object(pmap) => {
                let slot = obj.entry(key).or_insert(Value::Null);
                strategic_merge(slot, pmap, &child_path)?;
            }
            Value::Array(items) => {
                let merged = match (merge_key(&key), obj.remove(&key)) {
                    (Some(mk), Some(Value::Array(current))) => merge_keyed_list(current, items, mk, &child_path)?,
                    (Some(mk), _) => merge_keyed_list(Vec::new(), items, mk, &child_path)?,
                    (None, Some(Value::Array(mut current))) if merges_primitives(&key) => {
                        for item in items {
                            if !current.contains(&item) {
                                current.push(item);
                            }
                        }
                        current
                    }
                    (None, _) => items,
                };
                obj.insert(key, Value::Array(merged));
            }
            scalar => {
                obj.insert(key, scalar);
            }
        }
    }
    Ok(())
}

fn merge_keyed_list(
    mut current: Vec<Value>,
    items: Vec<Value>,
    mk: &str,
    path: &str,
) -> Result<Vec<Value>, PatchError> {
    // A `$patch: replace` element replaces the whole list with the remaining elements.
    if items.iter().any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace")) {
        return Ok(items.into_iter().filter(|i| i.get("$patch").is_none()).collect());
    }
    for item in items {
        let Value::Object(mut pmap) = item else {
            // Not a keyed element: fall back to appending, like the server does for scalars.
            current.push(item);
            continue;
        };
        let key_val = pmap.get(mk).cloned();
        let pos = key_val.as_ref().and_then(|kv| current.iter().position(|c| c.get(mk) == Some(kv)));
        if pmap.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(pos) = pos {
                current.remove(pos);
            }
            continue;
        }
        match pos {
            Some(pos) => strategic_merge(&mut current[pos], pmap, path)?,
            None => {
                pmap.remove("$patch");
                let mut fresh = Value::Object(Map::new());
                strategic_merge(&mut fresh, pmap, path)?;
                current.push(fresh);
            }
        }
    }
    Ok(current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Value {
        json!({
            "metadata": {"name": "p", "labels": {"a": "1", "b": "2"}, "finalizers": ["x"]},
            "spec": {
                "containers": [
                    {"name": "build", "image": "alpine", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                    {"name": "helper", "image": "helper:1"}
                ],
                "volumes": [{"name": "v1", "emptyDir": {}}]
            }
        })
    }

    #[test]
    fn strategic_merges_containers_env_and_volumes_by_name() {
        let mut p = pod();
        let body = json!({
            "metadata": {"labels": {"a": null, "c": "3"}, "finalizers": ["y"]},
            "spec": {
                "containers": [{"name": "build", "image": "debian", "env": [{"name": "B", "value": "20"}, {"name": "C", "value": "3"}]}],
                "volumes": [{"name": "v2", "configMap": {"name": "cm"}}]
            }
        });
        apply(PatchKind::Strategic, &mut p, body.to_string().as_bytes()).unwrap();
        assert_eq!(p["metadata"]["labels"], json!({"b": "2", "c": "3"}));
        assert_eq!(p["metadata"]["finalizers"], json!(["x", "y"]));
        let c = &p["spec"]["containers"];
        assert_eq!(c.as_array().unwrap().len(), 2);
        assert_eq!(c[0]["image"], "debian");
        assert_eq!(
            c[0]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "20"}, {"name": "C", "value": "3"}])
        );
        assert_eq!(c[1]["image"], "helper:1");
        assert_eq!(p["spec"]["volumes"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn strategic_delete_and_replace_directives() {
        let mut p = pod();
        let body = json!({
            "metadata": {"$deleteFromPrimitiveList/finalizers": ["x"], "$setElementOrder/finalizers": []},
            "spec": {"containers": [{"name": "helper", "$patch": "delete"}], "volumes": [{"name": "only", "emptyDir": {}}, {"$patch": "replace"}]}
        });
        apply(PatchKind::Strategic, &mut p, body.to_string().as_bytes()).unwrap();
        assert_eq!(p["metadata"]["finalizers"], json!([]));
        assert_eq!(p["spec"]["containers"].as_array().unwrap().len(), 1);
        assert_eq!(p["spec"]["volumes"], json!([{"name": "only", "emptyDir": {}}]));
    }

    #[test]
    fn merge_patch_replaces_lists() {
        let mut p = pod();
        apply(PatchKind::Merge, &mut p, br#"{"spec":{"volumes":[]},"metadata":{"labels":{"b":null}}}"#).unwrap();
        assert_eq!(p["spec"]["volumes"], json!([]));
        assert_eq!(p["metadata"]["labels"], json!({"a": "1"}));
    }

    #[test]
    fn json_patch_ops_and_errors() {
        let mut p = pod();
        apply(PatchKind::Json, &mut p, br#"[{"op":"replace","path":"/spec/containers/1/image","value":"h:2"},{"op":"add","path":"/metadata/labels/z","value":"9"}]"#).unwrap();
        assert_eq!(p["spec"]["containers"][1]["image"], "h:2");
        assert_eq!(p["metadata"]["labels"]["z"], "9");
        let err =
            apply(PatchKind::Json, &mut p, br#"[{"op":"test","path":"/metadata/name","value":"other"}]"#).unwrap_err();
        assert!(matches!(err, PatchError::JsonPatch(_)), "{err}");
        assert!(matches!(apply(PatchKind::Merge, &mut p, b"{not json").unwrap_err(), PatchError::BadJson(_)));
        assert!(matches!(apply(PatchKind::Strategic, &mut p, b"[1]").unwrap_err(), PatchError::NotAnObject { .. }));
    }

    #[test]
    fn content_types() {
        assert_eq!(
            PatchKind::from_content_type("application/merge-patch+json; charset=utf-8").unwrap(),
            PatchKind::Merge
        );
        assert!(PatchKind::from_content_type("text/plain").is_err());
    }
}
