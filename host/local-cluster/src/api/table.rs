//! `meta.k8s.io/v1` Table rendering, which `kubectl get` asks for (`Accept: ...;as=Table`).

use super::query::Query;
use crate::resources::Resource;
use crate::store::meta;
use axum::http::{HeaderMap, header};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowObject {
    None,
    Metadata,
    Object,
}

/// Whether the client asked for a Table (any listed media type with `as=Table`).
pub fn requested(headers: &HeaderMap) -> Option<RowObject> {
    let accept = headers.get(header::ACCEPT)?.to_str().ok()?;
    accept.split(',').any(|t| t.contains("as=Table") && t.contains("g=meta.k8s.io")).then_some(RowObject::Metadata)
}

fn row_object_mode(mode: RowObject, query: &Query) -> RowObject {
    match query.get("includeObject") {
        Some("Object") => RowObject::Object,
        Some("None") => RowObject::None,
        Some("Metadata") => RowObject::Metadata,
        _ => mode,
    }
}

/// Human age like kubectl's (`42s`, `5m3s`, `3h`, `2d`).
pub fn age(created: &str) -> String {
    let Ok(ts) = created.parse::<jiff::Timestamp>() else { return "<unknown>".into() };
    let secs = (jiff::Timestamp::now().as_second() - ts.as_second()).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 8 * 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn col(name: &str, ty: &str, priority: u8) -> Value {
    json!({"name": name, "type": ty, "format": if name == "Name" { "name" } else { "" }, "description": name, "priority": priority})
}

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    meta::str_at(v, p).unwrap_or_default()
}

/// kubectl's pod STATUS column: deletion, then container reasons, then the phase.
fn pod_status(pod: &Value) -> String {
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        return "Terminating".into();
    }
    let mut reason =
        pod.pointer("/status/reason").and_then(Value::as_str).unwrap_or(s(pod, "/status/phase")).to_owned();
    for cs in pod.pointer("/status/containerStatuses").and_then(Value::as_array).into_iter().flatten() {
        if let Some(r) = cs.pointer("/state/waiting/reason").and_then(Value::as_str) {
            reason = r.to_owned();
        } else if let Some(t) = cs.pointer("/state/terminated") {
            reason = t.get("reason").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| {
                format!("ExitCode:{}", t.get("exitCode").and_then(Value::as_i64).unwrap_or_default())
            });
        }
    }
    reason
}

fn cells(res: &Resource, o: &Value) -> (Vec<Value>, Vec<Value>) {
    let name = json!(meta::name(o));
    let age_cell = json!(age(s(o, "/metadata/creationTimestamp")));
    let count = |p: &str| o.pointer(p).and_then(Value::as_object).map_or(0, |m| m.len());
    match res.plural {
        "pods" => {
            let statuses =
                o.pointer("/status/containerStatuses").and_then(Value::as_array).cloned().unwrap_or_default();
            let total = o.pointer("/spec/containers").and_then(Value::as_array).map_or(0, Vec::len);
            let ready = statuses.iter().filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true)).count();
            let restarts: i64 = statuses.iter().filter_map(|c| c.get("restartCount").and_then(Value::as_i64)).sum();
            let ip = o.pointer("/status/podIP").and_then(Value::as_str).unwrap_or("<none>");
            let node = o.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or("<none>");
            (
                vec![
                    col("Name", "string", 0),
                    col("Ready", "string", 0),
                    col("Status", "string", 0),
                    col("Restarts", "string", 0),
                    col("Age", "string", 0),
                    col("IP", "string", 1),
                    col("Node", "string", 1),
                ],
                vec![
                    name,
                    json!(format!("{ready}/{total}")),
                    json!(pod_status(o)),
                    json!(restarts.to_string()),
                    age_cell,
                    json!(ip),
                    json!(node),
                ],
            )
        }
        "namespaces" => (
            vec![col("Name", "string", 0), col("Status", "string", 0), col("Age", "string", 0)],
            vec![name, json!(s(o, "/status/phase")), age_cell],
        ),
        "nodes" => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|c| s(c, "/type") == "Ready" && s(c, "/status") == "True");
            (
                vec![
                    col("Name", "string", 0),
                    col("Status", "string", 0),
                    col("Roles", "string", 0),
                    col("Age", "string", 0),
                    col("Version", "string", 0),
                ],
                vec![
                    name,
                    json!(if ready { "Ready" } else { "NotReady" }),
                    json!("control-plane"),
                    age_cell,
                    json!(s(o, "/status/nodeInfo/kubeletVersion")),
                ],
            )
        }
        "services" => {
            let ports: Vec<String> = o
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| format!("{}/{}", p.get("port").cloned().unwrap_or_default(), s(p, "/protocol")))
                .collect();
            (
                vec![
                    col("Name", "string", 0),
                    col("Type", "string", 0),
                    col("Cluster-IP", "string", 0),
                    col("External-IP", "string", 0),
                    col("Port(s)", "string", 0),
                    col("Age", "string", 0),
                ],
                vec![
                    name,
                    json!(s(o, "/spec/type")),
                    json!(s(o, "/spec/clusterIP")),
                    json!("<none>"),
                    json!(if ports.is_empty() { "<none>".into() } else { ports.join(",") }),
                    age_cell,
                ],
            )
        }
        "secrets" => (
            vec![col("Name", "string", 0), col("Type", "string", 0), col("Data", "string", 0), col("Age", "string", 0)],
            vec![name, json!(s(o, "/type")), json!(count("/data").to_string()), age_cell],
        ),
        "configmaps" => (
            vec![col("Name", "string", 0), col("Data", "string", 0), col("Age", "string", 0)],
            vec![name, json!((count("/data") + count("/binaryData")).to_string()), age_cell],
        ),
        "events" => {
            let last = json!(age(o
                .pointer("/lastTimestamp")
                .and_then(Value::as_str)
                .unwrap_or(s(o, "/metadata/creationTimestamp"))));
            let object =
                json!(format!("{}/{}", s(o, "/involvedObject/kind").to_lowercase(), s(o, "/involvedObject/name")));
            (
                vec![
                    col("Last Seen", "string", 0),
                    col("Type", "string", 0),
                    col("Reason", "string", 0),
                    col("Object", "string", 0),
                    col("Message", "string", 0),
                ],
                vec![last, json!(s(o, "/type")), json!(s(o, "/reason")), object, json!(s(o, "/message"))],
            )
        }
        _ => (vec![col("Name", "string", 0), col("Age", "string", 0)], vec![name, age_cell]),
    }
}

pub fn render(res: &Resource, items: &[Value], rv: Option<u64>, mode: RowObject, query: &Query) -> Value {
    let mode = row_object_mode(mode, query);
    let mut columns = None;
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let (cols, cells) = cells(res, o);
            columns.get_or_insert(cols);
            let object = match mode {
                RowObject::Object => o.clone(),
                RowObject::Metadata => json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o.get("metadata")}),
                RowObject::None => Value::Null,
            };
            json!({"cells": cells, "object": object})
        })
        .collect();
    let columns = columns.unwrap_or_else(|| cells(res, &json!({})).0);
    let mut table = json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {}, "columnDefinitions": columns, "rows": rows});
    if let Some(rv) = rv {
        table["metadata"]["resourceVersion"] = json!(rv.to_string());
    }
    table
}
