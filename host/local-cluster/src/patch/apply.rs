//! Server-side apply (`application/apply-patch+yaml`), simplified.
//!
//! What matches the real server: the object is created when missing; the applied fields are
//! merged into the live object (maps merged, lists with a merge key merged by key, other lists
//! replaced); each Apply manager's fields are recorded in `metadata.managedFields` (FieldsV1);
//! a field the manager applied before and omits now is removed unless another manager owns
//! it; applying a different value to a field another Apply manager owns is a 409 conflict
//! unless `force=true`, which takes the field over.
//!
//! Simplified: only Apply managers own fields. Create/update/patch requests record no
//! `Update` manager, so they never conflict with an apply; lists without a merge key are atomic
//! (owned whole); `status` is not applied through the main resource (as on the real server).

use super::{merge_key, strategic_merge};
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;

/// A field path in FieldsV1 spelling: `f:<field>` steps and `k:{"<key>":<value>}` list items.
type Path = Vec<String>;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("the apply body is not valid YAML or JSON: {0}")]
    BadBody(#[source] serde_yaml_ng::Error),
    #[error("the apply body must be an object, got {0}")]
    NotAnObject(&'static str),
    #[error("metadata.managedFields must be nil in an apply request")]
    ManagedFieldsSet,
    /// Fields another manager owns with a different value: (manager, field path).
    #[error("Apply failed with {} conflict{}: {}", .0.len(), if .0.len() == 1 { "" } else { "s" }, render_conflicts(.0))]
    Conflicts(Vec<(String, String)>),
    #[error("{0}")]
    Merge(#[from] super::PatchError),
}

fn render_conflicts(conflicts: &[(String, String)]) -> String {
    conflicts.iter().map(|(m, f)| format!("conflict with {m:?} using v1: {f}")).collect::<Vec<_>>().join("; ")
}

/// The dotted spelling of a path in conflict messages (`.data.mode`, `.spec.containers[name="c"].image`).
pub fn display(path: &[String]) -> String {
    path.iter()
        .map(|step| match step.strip_prefix("f:") {
            Some(f) => format!(".{f}"),
            None => {
                let key: Map<String, Value> = serde_json::from_str(step.trim_start_matches("k:")).unwrap_or_default();
                let inner: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("[{}]", inner.join(","))
            }
        })
        .collect()
}

/// Parse an apply body (YAML or JSON) into an object.
pub fn parse(body: &[u8]) -> Result<Value, ApplyError> {
    let v: Value = serde_yaml_ng::from_slice(body).map_err(ApplyError::BadBody)?;
    if !v.is_object() {
        return Err(ApplyError::NotAnObject(super::type_name(&v)));
    }
    if v.pointer("/metadata/managedFields").is_some_and(|m| !m.is_null()) {
        return Err(ApplyError::ManagedFieldsSet);
    }
    Ok(v)
}

/// Metadata the server owns, or that identifies the object: never part of a field set.
fn untracked(prefix: &[String], key: &str) -> bool {
    match prefix {
        [] => matches!(key, "apiVersion" | "kind" | "status"),
        [m] if m == "f:metadata" => {
            matches!(
                key,
                "name"
                    | "namespace"
                    | "uid"
                    | "resourceVersion"
                    | "generation"
                    | "creationTimestamp"
                    | "managedFields"
                    | "deletionTimestamp"
                    | "deletionGracePeriodSeconds"
                    | "selfLink"
            )
        }
        _ => false,
    }
}

fn item_step(mk: &str, item: &Value) -> Option<String> {
    let key = item.get(mk)?;
    Some(format!("k:{}", json!({ mk: key })))
}

/// The fields an applied configuration sets.
pub fn field_set(config: &Value) -> BTreeSet<Path> {
    fn walk(map: &Map<String, Value>, prefix: &Path, out: &mut BTreeSet<Path>) {
        for (k, v) in map {
            if untracked(prefix, k) {
                continue;
            }
            let mut path = prefix.clone();
            path.push(format!("f:{k}"));
            match v {
                Value::Object(m) if !m.is_empty() => walk(m, &path, out),
                Value::Array(items)
                    if merge_key(k).is_some()
                        && items.iter().all(|i| i.get(merge_key(k).unwrap_or_default()).is_some()) =>
                {
                    let mk = merge_key(k).unwrap_or_default();
                    if items.is_empty() {
                        out.insert(path.clone());
                    }
                    for item in items {
                        let Some(step) = item_step(mk, item) else { continue };
                        let mut ipath = path.clone();
                        ipath.push(step);
                        out.insert(ipath.clone());
                        if let Value::Object(m) = item {
                            walk(m, &ipath, out);
                        }
                    }
                }
                _ => {
                    out.insert(path);
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    if let Value::Object(m) = config {
        walk(m, &Vec::new(), &mut out);
    }
    out
}

/// FieldsV1 JSON (`{"f:data":{"f:mode":{}}}`, list items marked with `"."`) of a field set.
pub fn to_fields_v1(set: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for step in path {
            node = node.entry(step.clone()).or_insert_with(|| json!({})).as_object_mut().expect("nodes are objects");
        }
        if path.last().is_some_and(|s| s.starts_with("k:")) {
            node.insert(".".into(), json!({}));
        }
    }
    Value::Object(root)
}

pub fn from_fields_v1(fields: &Value) -> BTreeSet<Path> {
    fn walk(node: &Map<String, Value>, prefix: &Path, out: &mut BTreeSet<Path>) {
        for (k, child) in node {
            if k == "." {
                out.insert(prefix.clone());
                continue;
            }
            let mut path = prefix.clone();
            path.push(k.clone());
            match child.as_object() {
                Some(m) if !m.is_empty() => walk(m, &path, out),
                _ => {
                    out.insert(path);
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    if let Some(m) = fields.as_object() {
        walk(m, &Vec::new(), &mut out);
    }
    out
}

fn item_matches(item: &Value, step: &str) -> bool {
    let Ok(Value::Object(key)) = serde_json::from_str::<Value>(step.trim_start_matches("k:")) else { return false };
    key.iter().all(|(k, v)| item.get(k) == Some(v))
}

fn get_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(obj, |node, step| match step.strip_prefix("f:") {
        Some(f) => node.get(f),
        None => node.as_array()?.iter().find(|i| item_matches(i, step)),
    })
}

fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, parent_path)) = path.split_last() else { return };
    let Some(parent) = parent_path.iter().try_fold(obj, |node, step| match step.strip_prefix("f:") {
        Some(f) => node.get_mut(f),
        None => node.as_array_mut()?.iter_mut().find(|i| item_matches(i, step)),
    }) else {
        return;
    };
    match last.strip_prefix("f:") {
        Some(f) => {
            parent.as_object_mut().map(|m| m.remove(f));
        }
        None => {
            if let Some(list) = parent.as_array_mut() {
                list.retain(|i| !item_matches(i, last));
            }
        }
    }
}

struct Entry {
    manager: String,
    operation: String,
    raw: Value,
    fields: BTreeSet<Path>,
}

fn entries(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| Entry {
            manager: e.get("manager").and_then(Value::as_str).unwrap_or_default().to_owned(),
            operation: e.get("operation").and_then(Value::as_str).unwrap_or_default().to_owned(),
            fields: from_fields_v1(e.get("fieldsV1").unwrap_or(&Value::Null)),
            raw: e.clone(),
        })
        .collect()
}

/// Apply `config` for `manager` to `live` (an empty object when creating); returns the object
/// to store. `force` takes over conflicting fields instead of failing.
pub fn apply(live: &Value, mut config: Value, manager: &str, force: bool) -> Result<Value, ApplyError> {
    if let Some(md) = config.get_mut("metadata").and_then(Value::as_object_mut) {
        md.remove("managedFields");
    }
    let applied = field_set(&config);
    let mut all = entries(live);
    let ours_at = all.iter().position(|e| e.manager == manager && e.operation == "Apply");
    let ours_before = ours_at.map(|i| all.remove(i));
    let previous = ours_before.as_ref().map(|e| e.fields.clone()).unwrap_or_default();

    let mut conflicts = Vec::new();
    for other in &mut all {
        let contested: Vec<Path> = applied
            .iter()
            .filter(|p| !p.last().is_some_and(|s| s.starts_with("k:")))
            .filter(|p| other.fields.contains(*p) && get_at(live, p) != get_at(&config, p))
            .cloned()
            .collect();
        if force {
            for p in &contested {
                other.fields.remove(p);
            }
        } else {
            conflicts.extend(contested.iter().map(|p| (other.manager.clone(), display(p))));
        }
    }
    if !conflicts.is_empty() {
        return Err(ApplyError::Conflicts(conflicts));
    }

    let mut result = live.clone();
    // Shallowest first: a list item is found by its key fields, so it must go before them.
    let mut dropped: Vec<&Path> =
        previous.difference(&applied).filter(|p| !all.iter().any(|e| e.fields.contains(*p))).collect();
    dropped.sort_by_key(|p| p.len());
    for path in dropped {
        remove_at(&mut result, path);
    }
    if let Value::Object(patch) = config {
        strategic_merge(&mut result, patch, "")?;
    }

    let mut managed: Vec<Value> = Vec::new();
    let now = crate::store::meta::now_rfc3339();
    let mut ours_written = false;
    // Unchanged ownership keeps its entry (and time), so an identical apply is a no-op that
    // leaves the resourceVersion alone, as on the real server.
    let ours = match ours_before {
        Some(e) if e.fields == applied => e.raw,
        _ => json!({
            "manager": manager, "operation": "Apply", "apiVersion": "v1", "time": now,
            "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(&applied),
        }),
    };
    for (i, mut e) in all.into_iter().enumerate() {
        if ours_at == Some(i) {
            managed.push(ours.clone());
            ours_written = true;
        }
        if e.fields.is_empty() {
            continue;
        }
        e.raw["fieldsV1"] = to_fields_v1(&e.fields);
        managed.push(e.raw);
    }
    if !ours_written {
        managed.push(ours);
    }
    crate::store::meta::metadata_mut(&mut result).insert("managedFields".into(), Value::Array(managed));
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(data: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": {"app": "x"}}, "data": data})
    }

    #[test]
    fn field_sets_round_trip_through_fields_v1() {
        let pod =
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i", "args": ["a"]}]}});
        let set = field_set(&pod);
        let v1 = to_fields_v1(&set);
        assert_eq!(v1["f:spec"]["f:containers"]["k:{\"name\":\"c\"}"]["."], json!({}));
        assert_eq!(v1["f:spec"]["f:containers"]["k:{\"name\":\"c\"}"]["f:args"], json!({}));
        assert!(v1["f:metadata"].is_null(), "name is not a managed field: {v1}");
        assert_eq!(from_fields_v1(&v1), set);
    }

    #[test]
    fn reapply_updates_and_drops_fields_it_no_longer_sets() {
        let first = apply(&json!({}), cm(json!({"a": "1", "b": "2"})), "me", false).unwrap();
        assert_eq!(
            apply(&first, cm(json!({"a": "1", "b": "2"})), "me", false).unwrap(),
            first,
            "an identical apply changes nothing"
        );
        let mut live = first.clone();
        live["data"]["other"] = json!("kept: nobody applied it");
        let second = apply(&live, cm(json!({"a": "10"})), "me", false).unwrap();
        assert_eq!(second["data"], json!({"a": "10", "other": "kept: nobody applied it"}));
        let managed = second["metadata"]["managedFields"].as_array().unwrap();
        assert_eq!(managed.len(), 1);
        assert_eq!(managed[0]["fieldsV1"]["f:data"], json!({"f:a": {}}));
    }

    #[test]
    fn other_managers_conflict_unless_forced() {
        let live = apply(&json!({}), cm(json!({"a": "1"})), "alice", false).unwrap();
        let same = apply(&live, cm(json!({"a": "1"})), "bob", false).unwrap();
        assert_eq!(same["metadata"]["managedFields"].as_array().unwrap().len(), 2, "same value: shared ownership");
        let err = apply(&same, cm(json!({"a": "2"})), "bob", false).unwrap_err();
        assert_eq!(err.to_string(), "Apply failed with 1 conflict: conflict with \"alice\" using v1: .data.a");
        let forced = apply(&same, cm(json!({"a": "2"})), "bob", true).unwrap();
        assert_eq!(forced["data"]["a"], "2");
        // alice still owns metadata.labels.app; only data.a moved.
        let alice = &forced["metadata"]["managedFields"][0];
        assert_eq!(alice["manager"], "alice");
        assert!(alice["fieldsV1"]["f:data"].is_null(), "{alice}");
    }

    #[test]
    fn keyed_list_items_merge_and_leave() {
        let pod = |containers: Value| json!({"metadata": {"name": "p"}, "spec": {"containers": containers}});
        let live =
            apply(&json!({}), pod(json!([{"name": "a", "image": "1"}, {"name": "b", "image": "1"}])), "me", false)
                .unwrap();
        let next = apply(&live, pod(json!([{"name": "a", "image": "2"}])), "me", false).unwrap();
        assert_eq!(next["spec"]["containers"], json!([{"name": "a", "image": "2"}]));
    }
}
