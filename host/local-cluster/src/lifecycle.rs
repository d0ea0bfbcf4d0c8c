//! Deletion as a real control plane does it: graceful pod termination through the node,
//! finalizers, namespace teardown, and ownerReference garbage collection with
//! Background / Foreground / Orphan propagation.

use crate::errors::ApiError;
use crate::kubelet;
use crate::resources::Resource;
use crate::state::Shared;
use crate::store::{Part, meta, res};
use serde_json::{Value, json};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use crate::kubelet::pod_created;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    Background,
    Foreground,
    Orphan,
}

#[derive(Debug, Clone)]
pub struct DeleteOptions {
    pub grace_seconds: Option<i64>,
    pub propagation: Propagation,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
}

impl Default for DeleteOptions {
    fn default() -> Self {
        DeleteOptions {
            grace_seconds: None,
            propagation: Propagation::Background,
            precondition_uid: None,
            precondition_rv: None,
        }
    }
}

const FOREGROUND: &str = "foregroundDeletion";

fn deletion_time(grace: i64) -> String {
    let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(grace);
    at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The delete's `preconditions` (uid, resourceVersion) against the stored object: 409 on a mismatch.
pub fn check_preconditions(r: &Resource, name: &str, obj: &Value, opts: &DeleteOptions) -> Result<(), ApiError> {
    let conflict = |what: &str, want: &str, have: &str| ApiError::Conflict {
        resource: r.plural.into(),
        name: name.into(),
        reason: format!("Precondition failed: {what}: {want}, {what} in object meta: {have}"),
    };
    if let Some(uid) = &opts.precondition_uid
        && uid != meta::uid(obj)
    {
        return Err(conflict("UID in precondition", uid, meta::uid(obj)));
    }
    if let Some(rv) = &opts.precondition_rv
        && rv != meta::resource_version(obj)
    {
        return Err(conflict("ResourceVersion in precondition", rv, meta::resource_version(obj)));
    }
    Ok(())
}

/// Delete one object; returns what the DELETE call answers (the object, possibly only marked
/// for deletion). Work that a real cluster does asynchronously runs in background tasks.
pub fn delete<'a>(
    state: &'a Shared,
    r: &'static Resource,
    ns: Option<&'a str>,
    name: &'a str,
    opts: DeleteOptions,
) -> Pin<Box<dyn Future<Output = Result<Value, ApiError>> + Send + 'a>> {
    Box::pin(async move {
        let obj = state.store.get(r, ns, name)?;
        check_preconditions(r, name, &obj, &opts)?;
        if obj.pointer("/metadata/deletionTimestamp").is_some() {
            // Already terminating: a forced (grace 0) delete of a pod still finishes it now.
            if r.is("pods") && opts.grace_seconds == Some(0) {
                finish_pod(state, &obj, Duration::ZERO).await;
            }
            return Ok(obj);
        }
        let uid = meta::uid(&obj).to_owned();
        if opts.propagation == Propagation::Orphan {
            orphan_dependents(state, &uid);
        }
        if r.is("namespaces") {
            return delete_namespace(state, name).await;
        }
        if opts.propagation == Propagation::Foreground && !state.store.dependents_of(&uid).is_empty() {
            let marked = state.store.update_with(r, ns, name, Part::Whole, |o| {
                let md = meta::metadata_mut(o);
                md.insert("deletionTimestamp".into(), json!(meta::now_rfc3339()));
                md.insert("deletionGracePeriodSeconds".into(), json!(0));
                let fin = md.entry("finalizers").or_insert_with(|| json!([]));
                if let Some(list) = fin.as_array_mut() {
                    list.push(json!(FOREGROUND));
                }
                Ok(())
            })?;
            let outer = state;
            let state = state.clone();
            let ns_owned = ns.map(str::to_owned);
            let grace = opts.grace_seconds;
            spawn(&state.clone(), async move {
                delete_dependents(&state, &uid, Propagation::Foreground).await;
                wait_until_gone(&state, &uid).await;
                if r.is("pods") {
                    if let Ok(pod) = state.store.get(r, ns_owned.as_deref(), meta::name(&marked)) {
                        let grace = grace.unwrap_or_else(|| pod_grace(&pod));
                        finish_pod(&state, &pod, Duration::from_secs(grace as u64)).await;
                    }
                } else {
                    let _ = state.store.update_with(r, ns_owned.as_deref(), meta::name(&marked), Part::Whole, |o| {
                        let keep: Vec<String> = meta::finalizers(o).into_iter().filter(|f| f != FOREGROUND).collect();
                        meta::metadata_mut(o).insert("finalizers".into(), json!(keep));
                        Ok(())
                    });
                }
            });
            return outer.store.get(r, ns, name).or(Ok(obj));
        }
        if r.is("pods") {
            return delete_pod(state, obj, opts).await;
        }
        if !meta::finalizers(&obj).is_empty() {
            // Removed once a client clears the finalizers (see Store::update_with).
            return state.store.update_with(r, ns, name, Part::Whole, |o| {
                meta::metadata_mut(o).insert("deletionTimestamp".into(), json!(meta::now_rfc3339()));
                meta::metadata_mut(o).insert("deletionGracePeriodSeconds".into(), json!(0));
                Ok(())
            });
        }
        let removed = state.store.remove(r, ns, name)?;
        collect_garbage(state, &removed, opts.propagation);
        Ok(removed)
    })
}

fn pod_grace(pod: &Value) -> i64 {
    pod.pointer("/spec/terminationGracePeriodSeconds").and_then(Value::as_i64).unwrap_or(30).max(0)
}

/// Mark the pod terminating, then in the background stop its containers through the node,
/// remove it and garbage-collect its dependants. With grace 0 the object goes at once, as the
/// API server deletes it immediately: watchers see the pod go from its last state (Running)
/// straight to DELETED, and its processes are stopped before the call answers.
async fn delete_pod(state: &Shared, pod: Value, opts: DeleteOptions) -> Result<Value, ApiError> {
    let grace = opts.grace_seconds.unwrap_or_else(|| pod_grace(&pod));
    let name = meta::name(&pod).to_owned();
    let ns = meta::namespace(&pod).to_owned();
    let propagation = opts.propagation;
    if grace == 0 {
        let uid = meta::uid(&pod).to_owned();
        let removed = state.store.remove(res("pods"), Some(&ns), &name)?;
        record_killing(state, &removed);
        state.node.stop_pod(&uid, Duration::ZERO).await;
        collect_garbage(state, &removed, propagation);
        state.node.forget_pod(&uid).await;
        return Ok(removed);
    }
    let marked = state.store.update_with(res("pods"), Some(&ns), &name, Part::Whole, |o| {
        let md = meta::metadata_mut(o);
        md.insert("deletionTimestamp".into(), json!(deletion_time(grace)));
        md.insert("deletionGracePeriodSeconds".into(), json!(grace));
        Ok(())
    })?;
    record_killing(state, &marked);
    let (state2, marked2) = (state.clone(), marked.clone());
    spawn(
        state,
        async move { finish_pod_with(&state2, &marked2, Duration::from_secs(grace as u64), propagation).await },
    );
    Ok(marked)
}

/// The kubelet's `Killing` event for each running container of a pod being deleted.
fn record_killing(state: &Shared, pod: &Value) {
    for cs in pod.pointer("/status/containerStatuses").and_then(Value::as_array).into_iter().flatten() {
        if cs.pointer("/state/running").is_some() {
            let cname = cs.get("name").and_then(Value::as_str).unwrap_or_default();
            kubelet::record(
                &state.store,
                pod,
                "Normal",
                "Killing",
                &format!("Stopping container {cname}"),
                Some(format!("spec.containers{{{cname}}}")),
            );
        }
    }
}

async fn finish_pod(state: &Shared, pod: &Value, grace: Duration) {
    finish_pod_with(state, pod, grace, Propagation::Background).await
}

async fn finish_pod_with(state: &Shared, pod: &Value, grace: Duration, propagation: Propagation) {
    let uid = meta::uid(pod).to_owned();
    state.node.stop_pod(&uid, grace).await;
    // As a kubelet, the node is done with the pod (its directories and its hold on images
    // released) before the object goes: a client that saw DELETED finds nothing left behind.
    state.node.forget_pod(&uid).await;
    // The node reported final statuses while stopping; the pod may also be gone already.
    if let Some(current) = state.store.pod_by_uid(&uid)
        && let Ok(removed) = state.store.remove(res("pods"), Some(meta::namespace(&current)), meta::name(&current))
    {
        collect_garbage(state, &removed, propagation);
    }
}

/// Background GC: once an owner is gone, its dependants go too (Orphan already cut them loose).
fn collect_garbage(state: &Shared, owner: &Value, propagation: Propagation) {
    if propagation == Propagation::Orphan {
        return;
    }
    let uid = meta::uid(owner).to_owned();
    if state.store.dependents_of(&uid).is_empty() {
        return;
    }
    let state2 = state.clone();
    spawn(state, async move { delete_dependents(&state2, &uid, Propagation::Background).await });
}

async fn delete_dependents(state: &Shared, owner_uid: &str, propagation: Propagation) {
    for (r, ns, name) in state.store.dependents_of(owner_uid) {
        let opts = DeleteOptions { propagation, ..DeleteOptions::default() };
        if let Err(e) = delete(state, r, ns.as_deref(), &name, opts).await
            && !matches!(e, ApiError::NotFound { .. })
        {
            tracing::warn!(k8s.owner.uid = owner_uid, k8s.name = %name, error = %e, "garbage collection failed");
        }
    }
}

/// Wait until no object is owned by `owner_uid` any more (Foreground deletion).
async fn wait_until_gone(state: &Shared, owner_uid: &str) {
    let mut rx = state.store.subscribe();
    while !state.store.dependents_of(owner_uid).is_empty() {
        if let Err(tokio::sync::broadcast::error::RecvError::Closed) = rx.recv().await {
            return;
        }
    }
}

fn orphan_dependents(state: &Shared, owner_uid: &str) {
    for (r, ns, name) in state.store.dependents_of(owner_uid) {
        let _ = state.store.update_with(r, ns.as_deref(), &name, Part::Whole, |o| {
            if let Some(refs) = o.pointer_mut("/metadata/ownerReferences").and_then(Value::as_array_mut) {
                refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid));
            }
            Ok(())
        });
    }
}

/// Terminating namespace: refuse new content, delete everything inside, then remove it.
async fn delete_namespace(state: &Shared, name: &str) -> Result<Value, ApiError> {
    let marked = state.store.update_with(res("namespaces"), None, name, Part::Whole, |o| {
        meta::metadata_mut(o).insert("deletionTimestamp".into(), json!(meta::now_rfc3339()));
        meta::metadata_mut(o).insert("deletionGracePeriodSeconds".into(), json!(0));
        o["status"] = json!({"phase": "Terminating"});
        Ok(())
    })?;
    let state2 = state.clone();
    let name = name.to_owned();
    spawn(state, async move {
        let mut rx = state2.store.subscribe();
        loop {
            let contents = state2.store.contents_of_namespace(&name);
            if contents.is_empty() {
                break;
            }
            for (r, obj_name) in contents {
                if let Err(e) = delete(&state2, r, Some(&name), &obj_name, DeleteOptions::default()).await
                    && !matches!(e, ApiError::NotFound { .. })
                {
                    tracing::warn!(k8s.namespace = %name, k8s.name = %obj_name, error = %e, "namespace cleanup failed");
                }
            }
            // Pods leave only after their grace period; wait for the store to change.
            let remaining = state2.store.contents_of_namespace(&name);
            let all_terminating = remaining.iter().all(|(r, n)| {
                state2.store.get(r, Some(&name), n).is_ok_and(|o| o.pointer("/metadata/deletionTimestamp").is_some())
            });
            if !remaining.is_empty()
                && all_terminating
                && let Err(tokio::sync::broadcast::error::RecvError::Closed) = rx.recv().await
            {
                return;
            }
        }
        let _ = state2.store.remove(res("namespaces"), None, &name);
    });
    Ok(marked)
}

/// Whether the owner an ownerReference names exists: an object of that kind (one this server
/// serves) with that name and uid, in the dependant's namespace unless the kind is cluster-wide.
/// `None` for kinds the server does not serve and references without a uid, which the garbage
/// collector cannot judge.
fn owner_exists(state: &Shared, dependant_ns: Option<&str>, owner: &Value) -> Option<bool> {
    let api_version = owner.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    let kind = owner.get("kind").and_then(Value::as_str).unwrap_or_default();
    let r = crate::resources::RESOURCES.iter().find(|r| r.kind == kind && r.group_version == api_version)?;
    let name = owner.get("name").and_then(Value::as_str).unwrap_or_default();
    // No uid names no object (a real server refuses such a reference; `host render` writes one
    // for a pod not yet created): nothing to judge by.
    let uid = owner.get("uid").and_then(Value::as_str).filter(|u| !u.is_empty())?;
    let ns = if r.namespaced { dependant_ns } else { None };
    Some(state.store.get(r, ns, name).is_ok_and(|o| meta::uid(&o) == uid))
}

/// The garbage collector's watch on every object: a dependant all of whose owners are absent
/// (a uid that never existed, or an owner deleted before the dependant was stored) is deleted in
/// the background, as the real collector does; owners of kinds this server does not serve are
/// left alone. Owners deleted later are handled by their deletion (`collect_garbage`).
pub fn run_garbage_collector(state: &Shared) {
    let mut rx = state.store.subscribe();
    let state2 = state.clone();
    spawn(state, async move {
        loop {
            let ev = match rx.recv().await {
                Ok(ev) => ev,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            if ev.kind == crate::store::EventType::Deleted || ev.object.pointer("/metadata/deletionTimestamp").is_some()
            {
                continue;
            }
            if ev.object.pointer("/metadata/ownerReferences").is_none() {
                continue;
            }
            let Some(r) = crate::resources::by_plural(ev.resource) else { continue };
            let ns = r.namespaced.then(|| meta::namespace(&ev.object).to_owned());
            let name = meta::name(&ev.object).to_owned();
            // The event may be stale (an orphaning delete may have cut the dependant loose since):
            // decide on the object as it is now, and delete only that version of it.
            let Ok(current) = state2.store.get(r, ns.as_deref(), &name) else { continue };
            if meta::uid(&current) != meta::uid(&ev.object) {
                continue;
            }
            let owners =
                current.pointer("/metadata/ownerReferences").and_then(Value::as_array).cloned().unwrap_or_default();
            let verdicts: Vec<Option<bool>> = owners.iter().map(|o| owner_exists(&state2, ns.as_deref(), o)).collect();
            if verdicts.is_empty() || !verdicts.iter().all(|v| *v == Some(false)) {
                continue;
            }
            tracing::debug!(k8s.kind = r.kind, k8s.name = %name, "deleting a dependant whose owners do not exist");
            let opts = DeleteOptions {
                precondition_rv: Some(meta::resource_version(&current).to_owned()),
                ..DeleteOptions::default()
            };
            if let Err(e) = delete(&state2, r, ns.as_deref(), &name, opts).await
                && !matches!(e, ApiError::NotFound { .. } | ApiError::Conflict { .. })
            {
                tracing::warn!(k8s.name = %name, error = %e, "garbage collection of a dangling dependant failed");
            }
        }
    });
}

/// Run deletion work in the background, ending it when the cluster stops.
fn spawn(state: &Shared, work: impl Future<Output = ()> + Send + 'static) {
    let cancel = state.cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = work => {}
        }
    });
}
