//! The kubelet's share of the API side: start stored pods on the node (with their configMap and
//! secret data resolved), store the statuses the node reports, and record kubelet-like events.

use crate::errors::ApiError;
use crate::node::{ImageEvent, ImageHooks, Node, ResolvedVolumes, StatusSink};
use crate::state::Shared;
use crate::store::{EventType, Part, Store, meta, res};
use base64::Engine;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use tokio::sync::broadcast::error::RecvError;

/// Why a pod's configMap/secret data could not be gathered (the kubelet reports it as FailedMount
/// or CreateContainerConfigError and keeps trying).
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("MountVolume.SetUp failed for volume {volume:?} : {kind} {name:?} not found")]
    Missing { volume: String, kind: &'static str, name: String },
    #[error("MountVolume.SetUp failed for volume {volume:?} : {kind} {name:?} has no key {key:?}")]
    MissingKey { volume: String, kind: &'static str, name: String, key: String },
    #[error("secret {name:?} has data {key:?} that is not valid base64")]
    BadBase64 { name: String, key: String },
}

fn object_data(
    store: &Store,
    ns: &str,
    kind: &'static str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, ResolveError> {
    let plural = if kind == "configmap" { "configmaps" } else { "secrets" };
    let Ok(obj) = store.get(res(plural), Some(ns), name) else { return Ok(None) };
    let mut out = BTreeMap::new();
    if let Some(data) = obj.get("data").and_then(Value::as_object) {
        for (k, v) in data {
            let text = v.as_str().unwrap_or_default();
            let bytes = if kind == "secret" {
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|_| ResolveError::BadBase64 { name: name.to_owned(), key: k.clone() })?
            } else {
                text.as_bytes().to_vec()
            };
            out.insert(k.clone(), bytes);
        }
    }
    if let Some(data) = obj.get("binaryData").and_then(Value::as_object) {
        for (k, v) in data {
            if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or_default()) {
                out.insert(k.clone(), bytes);
            }
        }
    }
    Ok(Some(out))
}

/// Data for every configMap/secret volume (keys mapped through `items`), plus the
/// `configMap/<name>` / `secret/<name>` entries the node uses for env references.
pub fn resolve_volumes(store: &Store, pod: &Value) -> Result<ResolvedVolumes, ResolveError> {
    let ns = meta::namespace(pod);
    let mut out = ResolvedVolumes::new();
    for vol in pod.pointer("/spec/volumes").and_then(Value::as_array).into_iter().flatten() {
        let vname = vol.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
        let (kind, src, name_key) = if let Some(src) = vol.get("configMap") {
            ("configmap", src, "name")
        } else if let Some(src) = vol.get("secret") {
            ("secret", src, "secretName")
        } else {
            continue;
        };
        let name = src.get(name_key).and_then(Value::as_str).unwrap_or_default().to_owned();
        let optional = src.get("optional").and_then(Value::as_bool).unwrap_or(false);
        let data = match object_data(store, ns, kind, &name)? {
            Some(d) => d,
            None if optional => BTreeMap::new(),
            None => return Err(ResolveError::Missing { volume: vname, kind, name }),
        };
        let data = match src.get("items").and_then(Value::as_array) {
            Some(items) => {
                let mut mapped = BTreeMap::new();
                for item in items {
                    let key = item.get("key").and_then(Value::as_str).unwrap_or_default();
                    let path = item.get("path").and_then(Value::as_str).unwrap_or(key);
                    match data.get(key) {
                        Some(bytes) => {
                            mapped.insert(path.to_owned(), bytes.clone());
                        }
                        None if optional => {}
                        None => {
                            return Err(ResolveError::MissingKey { volume: vname, kind, name, key: key.to_owned() });
                        }
                    }
                }
                mapped
            }
            None => data,
        };
        out.insert(vname, data);
    }
    // Env references: missing ones are the node's to report (CreateContainerConfigError).
    let containers = ["initContainers", "containers"]
        .into_iter()
        .filter_map(|k| pod.pointer(&format!("/spec/{k}")).and_then(Value::as_array))
        .flatten();
    for c in containers {
        let env_refs = c.get("env").and_then(Value::as_array).into_iter().flatten().filter_map(|e| {
            let vf = e.get("valueFrom")?;
            vf.pointer("/configMapKeyRef/name")
                .map(|n| ("configmap", n))
                .or_else(|| vf.pointer("/secretKeyRef/name").map(|n| ("secret", n)))
        });
        let from_refs = c.get("envFrom").and_then(Value::as_array).into_iter().flatten().filter_map(|e| {
            e.pointer("/configMapRef/name")
                .map(|n| ("configmap", n))
                .or_else(|| e.pointer("/secretRef/name").map(|n| ("secret", n)))
        });
        for (kind, name) in env_refs.chain(from_refs) {
            let name = name.as_str().unwrap_or_default();
            let entry = format!("{}/{name}", if kind == "configmap" { "configMap" } else { "secret" });
            if let Some(data) = object_data(store, ns, kind, name)? {
                out.insert(entry, data);
            }
        }
    }
    Ok(out)
}

/// After a pod is stored: schedule it (event), then start it on the node once its volumes resolve.
pub fn pod_created(state: &Shared, pod: &Value) {
    record(
        &state.store,
        pod,
        "Normal",
        "Scheduled",
        &format!("Successfully assigned {}/{} to {}", meta::namespace(pod), meta::name(pod), state.store.node_name()),
        None,
    );
    let state = state.clone();
    let pod = pod.clone();
    // Subscribe before the first attempt so a configMap created in between is not missed.
    let mut rx = state.store.subscribe();
    match try_start(&state.store, &state.node, &pod) {
        Ok(()) => {}
        Err(err) => {
            record(&state.store, &pod, "Warning", "FailedMount", &err.to_string(), None);
            let cancel = state.cancel.clone();
            tokio::spawn(async move {
                // Like a kubelet, retry whenever a configMap/secret in the namespace changes; give
                // up when the pod goes away or the cluster stops.
                let ns = meta::namespace(&pod).to_owned();
                let uid = meta::uid(&pod).to_owned();
                loop {
                    let ev = tokio::select! {
                        _ = cancel.cancelled() => return,
                        ev = rx.recv() => ev,
                    };
                    let ev = match ev {
                        Ok(ev) => ev,
                        Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => return,
                    };
                    if meta::namespace(&ev.object) != ns {
                        continue;
                    }
                    if ev.resource == "pods" && ev.kind == EventType::Deleted && meta::uid(&ev.object) == uid {
                        return;
                    }
                    if ev.resource == "configmaps" || ev.resource == "secrets" {
                        let Some(current) = state.store.pod_by_uid(&uid) else { return };
                        if current.pointer("/metadata/deletionTimestamp").is_some() {
                            return;
                        }
                        match try_start(&state.store, &state.node, &current) {
                            Ok(()) => return,
                            Err(err) => {
                                record(&state.store, &current, "Warning", "FailedMount", &err.to_string(), None)
                            }
                        }
                    }
                }
            });
        }
    }
}

fn try_start(store: &Store, node: &Node, pod: &Value) -> Result<(), ResolveError> {
    let volumes = resolve_volumes(store, pod)?;
    match serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(pod.clone()) {
        Ok(typed) => node.run_pod(typed, volumes),
        // Unreachable in practice: the store decoded the same JSON into this type on create.
        Err(e) => tracing::error!(k8s.pod = meta::name(pod), error = %e, "stored pod does not decode"),
    }
    Ok(())
}

/// The node's status callback: store the status (new resourceVersion, MODIFIED) and record the
/// events a kubelet would for the transition. Holds the store weakly so the node (which owns
/// this closure) does not keep the store alive.
pub fn status_sink(store: Weak<Store>) -> StatusSink {
    Arc::new(move |uid: &str, status| {
        let Some(store) = store.upgrade() else { return };
        let Some(pod) = store.pod_by_uid(uid) else { return };
        let Ok(mut new_status) = serde_json::to_value(&status) else { return };
        if new_status.get("qosClass").is_none()
            && let Some(q) = pod.pointer("/status/qosClass")
        {
            new_status["qosClass"] = q.clone();
        }
        let name = meta::name(&pod).to_owned();
        let result = store.update_with(res("pods"), Some(meta::namespace(&pod)), &name, Part::Status, |o| {
            if meta::uid(o) != uid {
                return Err(ApiError::not_found("pods", &name));
            }
            o["status"] = new_status;
            Ok(())
        });
        match result {
            Ok(updated) => transition_events(&store, &pod, &updated),
            Err(e) => tracing::debug!(k8s.pod = %name, error = %e, "pod status not stored"),
        }
    })
}

/// The node's image hooks: the kubelet's image events (`Pulling`, `Pulled`) recorded on the
/// pod, and the pod's `imagePullSecrets` read from the store at each pull (a missing one is
/// skipped, as the kubelet skips it with a warning).
pub fn image_hooks(store: Weak<Store>) -> ImageHooks {
    let events_store = store.clone();
    let data_store = store.clone();
    let events = Arc::new(move |uid: &str, container: &str, image: &str, event: ImageEvent| {
        let Some(store) = events_store.upgrade() else { return };
        let Some(pod) = store.pod_by_uid(uid) else { return };
        let field = Some(format!("spec.containers{{{container}}}"));
        let (reason, message) = match event {
            ImageEvent::Pulling => ("Pulling", format!("Pulling image {image:?}")),
            ImageEvent::AlreadyPresent => ("Pulled", format!("Container image {image:?} already present on machine")),
            ImageEvent::Pulled { took, size } => {
                let took = crate::node::go_duration(took);
                (
                    "Pulled",
                    format!(
                        "Successfully pulled image {image:?} in {took} ({took} including waiting). Image size: {size} bytes."
                    ),
                )
            }
        };
        record(&store, &pod, "Normal", reason, &message, field);
    });
    let pull_secrets = Arc::new(move |uid: &str| {
        let Some(store) = store.upgrade() else { return Vec::new() };
        let Some(pod) = store.pod_by_uid(uid) else { return Vec::new() };
        let names = pod.pointer("/spec/imagePullSecrets").and_then(Value::as_array).into_iter().flatten();
        let mut out = Vec::new();
        for name in names.filter_map(|s| s.get("name").and_then(Value::as_str)) {
            match object_data(&store, meta::namespace(&pod), "secret", name) {
                Ok(Some(data)) => out.push((name.to_owned(), data)),
                Ok(None) => tracing::warn!(k8s.pod = meta::name(&pod), secret = name, "image pull secret not found"),
                Err(e) => {
                    tracing::warn!(k8s.pod = meta::name(&pod), secret = name, error = %e, "image pull secret unreadable")
                }
            }
        }
        out
    });
    let pod_data = Arc::new(move |uid: &str| {
        let store = data_store.upgrade()?;
        resolve_volumes(&store, &store.pod_by_uid(uid)?).ok()
    });
    ImageHooks { events, pull_secrets, pod_data }
}

fn container_states(pod: &Value) -> BTreeMap<String, Value> {
    ["initContainerStatuses", "containerStatuses"]
        .iter()
        .filter_map(|k| pod.pointer(&format!("/status/{k}")).and_then(Value::as_array))
        .flatten()
        .filter_map(|cs| Some((cs.get("name")?.as_str()?.to_owned(), cs.clone())))
        .collect()
}

fn transition_events(store: &Store, old: &Value, new: &Value) {
    let before = container_states(old);
    for (name, cs) in container_states(new) {
        let prev = before.get(&name);
        let image = cs.get("image").and_then(Value::as_str).unwrap_or_default().to_owned();
        let field = Some(format!("spec.containers{{{name}}}"));
        let state_key = |v: Option<&Value>| {
            v.and_then(|v| v.get("state"))
                .and_then(Value::as_object)
                .and_then(|s| s.keys().next().cloned())
                .unwrap_or_default()
        };
        let (was, is) = (state_key(prev), state_key(Some(&cs)));
        let restarts = |v: Option<&Value>| v.and_then(|v| v.get("restartCount")).and_then(Value::as_i64).unwrap_or(0);
        let restarted = restarts(Some(&cs)) > restarts(prev);
        let waiting_reason = |v: Option<&Value>| {
            v.and_then(|v| v.pointer("/state/waiting/reason")).and_then(Value::as_str).map(str::to_owned)
        };
        if (is == "running" || is == "terminated")
            && (was == "waiting" || was.is_empty() || restarted)
            && !(was == "running" && is == "terminated")
        {
            // `Pulled` (already present, or pulled) comes from the node's image hooks, before this.
            record(store, new, "Normal", "Created", &format!("Created container: {name}"), field.clone());
            record(store, new, "Normal", "Started", &format!("Started container {name}"), field.clone());
        }
        let (old_reason, new_reason) = (waiting_reason(prev), waiting_reason(Some(&cs)));
        if new_reason != old_reason {
            let message = cs.pointer("/state/waiting/message").and_then(Value::as_str).unwrap_or_default();
            match new_reason.as_deref() {
                Some("ErrImagePull") => {
                    // `Pulling` came from the node's image hooks when the pull started.
                    record(
                        store,
                        new,
                        "Warning",
                        "Failed",
                        &format!("Failed to pull image {image:?}: {message}"),
                        field.clone(),
                    );
                    record(store, new, "Warning", "Failed", "Error: ErrImagePull", field.clone());
                }
                Some("ImagePullBackOff") => {
                    record(
                        store,
                        new,
                        "Normal",
                        "BackOff",
                        &format!("Back-off pulling image {image:?}"),
                        field.clone(),
                    );
                    record(store, new, "Warning", "Failed", "Error: ImagePullBackOff", field.clone());
                }
                Some("CrashLoopBackOff") => {
                    record(
                        store,
                        new,
                        "Warning",
                        "BackOff",
                        &format!(
                            "Back-off restarting failed container {name} in pod {}_{}({})",
                            meta::name(new),
                            meta::namespace(new),
                            meta::uid(new)
                        ),
                        field.clone(),
                    );
                }
                Some("InvalidImageName") => {
                    record(store, new, "Warning", "InspectFailed", message, field.clone());
                    record(store, new, "Warning", "Failed", "Error: InvalidImageName", field.clone());
                }
                Some("ErrImageNeverPull") => {
                    record(store, new, "Warning", "ErrImageNeverPull", message, field.clone());
                    record(store, new, "Warning", "Failed", "Error: ErrImageNeverPull", field.clone());
                }
                Some("CreateContainerConfigError") | Some("CreateContainerError") => {
                    record(store, new, "Warning", "Failed", &format!("Error: {message}"), field.clone());
                }
                _ => {}
            }
        }
    }
}

/// `<pod>.<hex nanoseconds>` like the real event recorder; strictly increasing, so events of a
/// pod list (and `kubectl describe` shows them) in the order they happened.
fn event_name(pod: &str) -> String {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let prev = LAST.fetch_max(now, Ordering::SeqCst);
    let stamp = if now > prev { now } else { LAST.fetch_add(1, Ordering::SeqCst) + 1 };
    format!("{pod}.{stamp:x}")
}

/// Store a core/v1 Event about `pod`, as a kubelet on our node would.
pub fn record(store: &Store, pod: &Value, kind: &str, reason: &str, message: &str, field_path: Option<String>) {
    let now = meta::now_rfc3339();
    let mut involved = json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "namespace": meta::namespace(pod),
        "name": meta::name(pod),
        "uid": meta::uid(pod),
        "resourceVersion": meta::resource_version(pod),
    });
    if let Some(f) = &field_path {
        involved["fieldPath"] = json!(f);
    }
    // client-go's event correlator: a repeat of the same event (same object, field, type, reason
    // and message) bumps the existing event's count and lastTimestamp instead of adding a row.
    let ns = meta::namespace(pod);
    let same = |e: &Value| {
        e.pointer("/involvedObject/uid").and_then(Value::as_str) == Some(meta::uid(pod))
            && e.pointer("/involvedObject/fieldPath").and_then(Value::as_str) == field_path.as_deref()
            && e.get("reason").and_then(Value::as_str) == Some(reason)
            && e.get("message").and_then(Value::as_str) == Some(message)
            && e.get("type").and_then(Value::as_str) == Some(kind)
    };
    if let Some(existing) = store.list(res("events"), Some(ns), same).0.into_iter().next() {
        let bumped = store.update_with(res("events"), Some(ns), meta::name(&existing), Part::Main, |e| {
            let count = e.get("count").and_then(Value::as_i64).unwrap_or(1);
            e["count"] = json!(count + 1);
            e["lastTimestamp"] = json!(now);
            Ok(())
        });
        if bumped.is_ok() {
            return;
        }
    }
    let component = if reason == "Scheduled" { "default-scheduler" } else { "kubelet" };
    let event = json!({
        "metadata": {"name": event_name(meta::name(pod))},
        "involvedObject": involved,
        "reason": reason,
        "message": message,
        "source": if component == "kubelet" { json!({"component": component, "host": store.node_name()}) } else { json!({"component": component}) },
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "type": kind,
        "reportingComponent": component,
        "reportingInstance": if component == "kubelet" { store.node_name() } else { "" },
    });
    if let Err(e) = store.create(res("events"), Some(meta::namespace(pod)), event) {
        tracing::debug!(k8s.pod = meta::name(pod), event.reason = reason, error = %e, "event not recorded");
    }
}
