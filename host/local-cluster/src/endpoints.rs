//! The endpoints and endpointslice controllers: every Service with a selector has an Endpoints
//! object of the same name listing the pods it selects (ready ones under `addresses`, the others
//! under `notReadyAddresses`) and `discovery.k8s.io/v1` EndpointSlices with the same pods, kept
//! current as pods and services change, as kube-controller-manager's are. Services without a selector are left to their users, as on a real cluster.

use crate::state::Shared;
use crate::store::{EventType, Part, meta, res};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Watches the store and reconciles Endpoints until the cluster stops.
pub fn run(state: &Shared) {
    let mut rx = state.store.subscribe();
    let state = state.clone();
    let cancel = state.cancel.clone();
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                () = cancel.cancelled() => return,
                ev = rx.recv() => ev,
            };
            let ev = match ev {
                Ok(ev) => ev,
                // Missed changes: reconcile everything.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    for svc in state.store.list(res("services"), None, |_| true).0 {
                        reconcile(&state, meta::namespace(&svc), meta::name(&svc));
                    }
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let ns = meta::namespace(&ev.object).to_owned();
            match ev.resource {
                "services" => reconcile(&state, &ns, meta::name(&ev.object)),
                "pods" => {
                    for svc in state.store.list(res("services"), Some(&ns), |_| true).0 {
                        reconcile(&state, &ns, meta::name(&svc));
                    }
                }
                // Someone deleted or changed ours: put it back.
                "endpoints" if ev.kind == EventType::Deleted => reconcile(&state, &ns, meta::name(&ev.object)),
                _ => {}
            }
        }
    });
}

/// One subset being built: its addresses by readiness, and the ports they share.
#[derive(Default)]
struct Subset {
    ready: Vec<Value>,
    not_ready: Vec<Value>,
    ports: Vec<Value>,
}

/// The service's selected pods grouped by their resolved ports (one Endpoints subset, and one
/// EndpointSlice, per group).
fn groups(service: &Value, pods: &[Value], node: &str) -> Vec<Subset> {
    let ports = service.pointer("/spec/ports").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut groups: BTreeMap<String, Subset> = BTreeMap::new();
    for pod in pods {
        let resolved: Vec<Value> = ports
            .iter()
            .filter_map(|p| {
                let target = p.get("targetPort").or_else(|| p.get("port"))?;
                let number = match target {
                    Value::Number(n) => n.as_i64()?,
                    Value::String(name) => container_port(pod, name)?,
                    _ => return None,
                };
                let mut port = json!({"port": number, "protocol": p.get("protocol").cloned().unwrap_or(json!("TCP"))});
                if let Some(n) = p.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()) {
                    port["name"] = json!(n);
                }
                if let Some(a) = p.get("appProtocol") {
                    port["appProtocol"] = a.clone();
                }
                Some(port)
            })
            .collect();
        if resolved.is_empty() && !ports.is_empty() {
            continue;
        }
        let ip = pod.pointer("/status/podIP").and_then(Value::as_str).unwrap_or_default();
        let address = json!({
            "ip": ip,
            "nodeName": node,
            "targetRef": {
                "kind": "Pod",
                "namespace": meta::namespace(pod),
                "name": meta::name(pod),
                "uid": meta::uid(pod),
            },
        });
        let ready = pod.pointer("/status/conditions").and_then(Value::as_array).into_iter().flatten().any(|c| {
            c.get("type").and_then(Value::as_str) == Some("Ready")
                && c.get("status").and_then(Value::as_str) == Some("True")
        });
        let publish = service.pointer("/spec/publishNotReadyAddresses").and_then(Value::as_bool).unwrap_or(false);
        let key = serde_json::to_string(&resolved).unwrap_or_default();
        let entry = groups.entry(key).or_insert_with(|| Subset { ports: resolved, ..Subset::default() });
        if ready || publish { entry.ready.push(address) } else { entry.not_ready.push(address) }
    }
    groups.into_values().collect()
}

/// Endpoints' `subsets` for the groups.
fn subsets(groups: &[Subset]) -> Vec<Value> {
    groups
        .iter()
        .map(|Subset { ready, not_ready, ports }| {
            let mut subset = json!({});
            if !ready.is_empty() {
                subset["addresses"] = json!(ready);
            }
            if !not_ready.is_empty() {
                subset["notReadyAddresses"] = json!(not_ready);
            }
            if !ports.is_empty() {
                subset["ports"] = json!(ports);
            }
            subset
        })
        .collect()
}

fn container_port(pod: &Value, name: &str) -> Option<i64> {
    pod.pointer("/spec/containers")?.as_array()?.iter().find_map(|c| {
        c.get("ports")?.as_array()?.iter().find_map(|p| {
            (p.get("name").and_then(Value::as_str) == Some(name)).then(|| p.get("containerPort")?.as_i64()).flatten()
        })
    })
}

/// Makes the service's Endpoints match its pods (or removes them when the service is gone).
fn reconcile(state: &Shared, ns: &str, name: &str) {
    let store = &state.store;
    let eps = res("endpoints");
    let service =
        store.get(res("services"), Some(ns), name).ok().filter(|s| s.pointer("/metadata/deletionTimestamp").is_none());
    let selector = service
        .as_ref()
        .and_then(|s| s.pointer("/spec/selector"))
        .and_then(Value::as_object)
        .filter(|m| !m.is_empty())
        .cloned();
    let (Some(service), Some(selector)) = (service, selector) else {
        // Only Endpoints and slices this controller made go with their service.
        if store.get(res("services"), Some(ns), name).is_err() {
            if store.get(eps, Some(ns), name).is_ok_and(|e| managed(&e)) {
                let _ = store.remove(eps, Some(ns), name);
            }
            for slice in slices_of(state, ns, name) {
                let _ = store.remove(res("endpointslices"), Some(ns), meta::name(&slice));
            }
        }
        return;
    };
    let wanted: BTreeMap<String, String> =
        selector.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect();
    let mut pods = store
        .list(res("pods"), Some(ns), |p| {
            let labels = p.pointer("/metadata/labels").and_then(Value::as_object);
            let matches = wanted.iter().all(|(k, v)| labels.and_then(|l| l.get(k)).and_then(Value::as_str) == Some(v));
            let phase = p.pointer("/status/phase").and_then(Value::as_str).unwrap_or_default();
            let ip = p.pointer("/status/podIP").and_then(Value::as_str).is_some_and(|ip| !ip.is_empty());
            matches
                && ip
                && phase != "Succeeded"
                && phase != "Failed"
                && p.pointer("/metadata/deletionTimestamp").is_none()
        })
        .0;
    pods.sort_by(|a, b| meta::name(a).cmp(meta::name(b)));
    let groups = groups(&service, &pods, store.node_name());
    reconcile_slices(state, ns, &service, &groups);
    let subsets = subsets(&groups);
    let labels = service.pointer("/metadata/labels").cloned().unwrap_or(json!({}));
    match store.get(eps, Some(ns), name) {
        Ok(current) => {
            let current_subsets = current.get("subsets").cloned().unwrap_or(json!([]));
            if current_subsets == json!(subsets)
                && current.pointer("/metadata/labels").cloned().unwrap_or(json!({})) == labels
            {
                return;
            }
            let _ = store.update_with(eps, Some(ns), name, Part::Whole, |o| {
                o["subsets"] = json!(subsets);
                if subsets.is_empty() {
                    o.as_object_mut().map(|m| m.remove("subsets"));
                }
                meta::metadata_mut(o).insert("labels".into(), labels.clone());
                meta::metadata_mut(o).insert(
                    "annotations".into(),
                    json!({"endpoints.kubernetes.io/last-change-trigger-time": meta::now_rfc3339()}),
                );
                Ok(())
            });
        }
        Err(_) => {
            let mut obj = json!({
                "apiVersion": "v1",
                "kind": "Endpoints",
                "metadata": {
                    "name": name,
                    "namespace": ns,
                    "labels": labels,
                    "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": meta::now_rfc3339()},
                },
            });
            if !subsets.is_empty() {
                obj["subsets"] = json!(subsets);
            }
            if let Err(e) = store.create(eps, Some(ns), obj) {
                tracing::debug!(k8s.namespace = ns, k8s.service = name, error = %e, "endpoints not created");
            }
        }
    }
}

/// Endpoints this controller wrote (it always sets the trigger-time annotation).
fn managed(e: &Value) -> bool {
    e.pointer("/metadata/annotations/endpoints.kubernetes.io~1last-change-trigger-time").is_some()
}

const SERVICE_NAME: &str = "kubernetes.io/service-name";
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// The EndpointSlices this controller keeps for the service, oldest name first.
fn slices_of(state: &Shared, ns: &str, service: &str) -> Vec<Value> {
    let mut slices = state
        .store
        .list(res("endpointslices"), Some(ns), |s| {
            let label = |k: &str| s.pointer("/metadata/labels").and_then(|l| l.get(k)).and_then(Value::as_str);
            label(SERVICE_NAME) == Some(service) && label(MANAGED_BY) == Some(CONTROLLER)
        })
        .0;
    slices.sort_by(|a, b| meta::name(a).cmp(meta::name(b)));
    slices
}

/// `discovery.k8s.io/v1` EndpointSlices for the groups, as the endpointslice controller writes
/// them: one per port set (a placeholder without endpoints when no pod matches), labelled with the
/// service's name and owned by the service, so they go with it.
fn reconcile_slices(state: &Shared, ns: &str, service: &Value, groups: &[Subset]) {
    let store = &state.store;
    let name = meta::name(service);
    let mut labels = service.pointer("/metadata/labels").cloned().unwrap_or(json!({}));
    labels[SERVICE_NAME] = json!(name);
    labels[MANAGED_BY] = json!(CONTROLLER);
    let endpoint = |address: &Value, ready: bool| {
        json!({
            "addresses": [address.get("ip").cloned().unwrap_or(json!(""))],
            "conditions": {"ready": ready, "serving": ready, "terminating": false},
            "nodeName": address.get("nodeName").cloned().unwrap_or(json!("")),
            "targetRef": address.get("targetRef").cloned().unwrap_or(json!({})),
        })
    };
    let mut desired: Vec<(Vec<Value>, Vec<Value>)> = groups
        .iter()
        .map(|g| {
            let eps = g.ready.iter().map(|a| endpoint(a, true)).chain(g.not_ready.iter().map(|a| endpoint(a, false)));
            (eps.collect(), g.ports.clone())
        })
        .collect();
    if desired.is_empty() {
        desired.push((Vec::new(), Vec::new()));
    }
    let existing = slices_of(state, ns, name);
    let slices = res("endpointslices");
    let fill = |o: &mut Value, endpoints: &[Value], ports: &[Value]| {
        let m = o.as_object_mut().expect("a slice is an object");
        m.insert("addressType".into(), json!("IPv4"));
        for (key, list) in [("endpoints", endpoints), ("ports", ports)] {
            if list.is_empty() {
                m.remove(key);
            } else {
                m.insert(key.into(), json!(list));
            }
        }
    };
    for (i, (endpoints, ports)) in desired.iter().enumerate() {
        match existing.get(i) {
            Some(current) => {
                let mut wanted = current.clone();
                fill(&mut wanted, endpoints, ports);
                meta::metadata_mut(&mut wanted).insert("labels".into(), labels.clone());
                if wanted == *current {
                    continue;
                }
                let _ = store.update_with(slices, Some(ns), meta::name(current), Part::Whole, |o| {
                    *o = wanted.clone();
                    Ok(())
                });
            }
            None => {
                let mut obj = json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "generateName": format!("{name}-"),
                        "namespace": ns,
                        "labels": labels,
                        "ownerReferences": [{
                            "apiVersion": "v1", "kind": "Service", "name": name, "uid": meta::uid(service),
                            "controller": true, "blockOwnerDeletion": true,
                        }],
                    },
                });
                fill(&mut obj, endpoints, ports);
                if let Err(e) = store.create(slices, Some(ns), obj) {
                    tracing::debug!(k8s.namespace = ns, k8s.service = name, error = %e, "endpoint slice not created");
                }
            }
        }
    }
    for extra in existing.iter().skip(desired.len()) {
        let _ = store.remove(slices, Some(ns), meta::name(extra));
    }
}
