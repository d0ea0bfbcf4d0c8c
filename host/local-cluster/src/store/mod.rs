//! The object store: every object as Kubernetes JSON, one global resourceVersion counter,
//! and an event history ring buffer that watches replay from.
//!
//! One mutex guards objects, counter and history together, and live events are broadcast while
//! it is held, so "snapshot + subscribe" is atomic and a watch never misses or repeats an event.

pub mod defaults;
pub mod meta;
pub mod validate;
pub mod views;

use crate::errors::{ApiError, Cause};
use crate::resources::{RESOURCES, Resource};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::broadcast;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as stored in the history and sent to live watchers.
#[derive(Debug)]
pub struct WatchEvent {
    pub rv: u64,
    pub resource: &'static str,
    pub kind: EventType,
    pub object: Value,
    /// The object before a MODIFIED or DELETED change: selector-filtered watches turn a change
    /// into ADDED/DELETED when the object starts/stops matching (as the real server does), and
    /// chunked lists undo changes newer than their snapshot with it.
    pub previous: Option<Value>,
}

/// Which part of an object an update may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Everything but `status` (for kinds with a status subresource).
    Main,
    /// Only `status`.
    Status,
    /// Internal bookkeeping (deletion marks, finalizers): everything.
    Whole,
}

/// (namespace, name); namespace is empty for cluster-scoped kinds. Lists are in this order.
pub type Key = (String, String);

/// One page of a (possibly chunked) list.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<Value>,
    /// The resourceVersion of the snapshot the page was read from.
    pub rv: u64,
    /// Where the next page starts (after this key), when more items match.
    pub continue_after: Option<Key>,
    /// Matching items after this page.
    pub remaining: u64,
}

/// Merge the live objects with the undone ones (which take precedence) in key order.
fn merge_sorted<'a>(
    live: impl Iterator<Item = (&'a Key, &'a Value)>,
    undone: impl Iterator<Item = (&'a Key, &'a Option<Value>)>,
) -> impl Iterator<Item = (&'a Key, &'a Value)> {
    let mut live = live.peekable();
    let mut undone = undone.peekable();
    std::iter::from_fn(move || {
        loop {
            let order = match (live.peek(), undone.peek()) {
                (None, None) => return None,
                (Some(_), None) => std::cmp::Ordering::Greater,
                (None, Some(_)) => std::cmp::Ordering::Less,
                (Some((lk, _)), Some((uk, _))) => uk.cmp(lk),
            };
            if order == std::cmp::Ordering::Equal {
                // The undone state replaces the live one.
                live.next();
            }
            let take_undone = order != std::cmp::Ordering::Greater;
            if take_undone {
                let (k, v) = undone.next().expect("peeked");
                if let Some(v) = v {
                    return Some((k, v));
                }
            } else {
                return live.next();
            }
        }
    })
}

/// Live events from the moment of subscription.
pub type Subscription = broadcast::Receiver<Arc<WatchEvent>>;

struct Inner {
    rv: u64,
    /// Highest resourceVersion whose event fell out of the history.
    compacted: u64,
    objects: HashMap<&'static str, BTreeMap<Key, Value>>,
    history: VecDeque<Arc<WatchEvent>>,
    next_ip: u32,
}

pub struct Store {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<WatchEvent>>,
    history_len: usize,
    node_name: String,
}

/// Watchers further behind than this are cut off and must re-watch (clients do that).
const BROADCAST_CAPACITY: usize = 16 * 1024;

fn has_status_subresource(res: &Resource) -> bool {
    res.subresources.contains(&"status")
}

impl Store {
    pub fn new(node_name: &str, history_len: usize) -> Arc<Store> {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        let store = Arc::new(Store {
            inner: Mutex::new(Inner {
                rv: 0,
                compacted: 0,
                objects: HashMap::new(),
                history: VecDeque::new(),
                next_ip: 1,
            }),
            tx,
            history_len: history_len.max(1),
            node_name: node_name.to_owned(),
        });
        store.bootstrap();
        store
    }

    fn bootstrap(&self) {
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            self.create(res("namespaces"), None, json!({"metadata": {"name": ns}}))
                .expect("bootstrap namespace is valid");
        }
        let kubernetes_svc = json!({
            "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"ports": [{"name": "https", "port": 443, "targetPort": 6443}]}
        });
        self.create(res("services"), Some("default"), kubernetes_svc).expect("bootstrap service is valid");
        self.create(res("nodes"), None, node_object(&self.node_name)).expect("bootstrap node is valid");
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the maps consistent (we never panic mid-update),
        // so keep serving rather than poisoning every later request.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    fn emit(&self, inner: &mut Inner, res: &'static Resource, kind: EventType, object: Value, previous: Option<Value>) {
        let ev = Arc::new(WatchEvent { rv: inner.rv, resource: res.plural, kind, object, previous });
        inner.history.push_back(ev.clone());
        while inner.history.len() > self.history_len {
            if let Some(old) = inner.history.pop_front() {
                inner.compacted = old.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(ev);
    }

    fn key(res: &Resource, ns: Option<&str>, name: &str) -> Key {
        (if res.namespaced { ns.unwrap_or_default().to_owned() } else { String::new() }, name.to_owned())
    }

    pub fn create(&self, res: &'static Resource, ns: Option<&str>, obj: Value) -> Result<Value, ApiError> {
        self.create_inner(res, ns, obj, false)
    }

    /// `dryRun=All` create: named, defaulted and validated like `create` (uid and
    /// creationTimestamp filled, no resourceVersion, as the real server answers), but nothing
    /// is stored, no event is emitted and no cluster IP is used up.
    pub fn create_dry_run(&self, res: &'static Resource, ns: Option<&str>, obj: Value) -> Result<Value, ApiError> {
        self.create_inner(res, ns, obj, true)
    }

    fn create_inner(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        obj: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if !views::is_view(res) {
            return self.create_stored(res, ns, obj, dry_run);
        }
        views::typed(res, &obj).map_err(|e| ApiError::BadRequest(format!("{} in body: {e}", res.kind)))?;
        let created = self.create_stored(views::storage(res), ns, views::to_storage(res, obj), dry_run)?;
        Ok(views::to_view(res, created))
    }

    fn create_stored(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::BadRequest(format!("the body of a {} create must be a JSON object", res.kind)));
        }
        if let Some(kind) = obj.get("kind").and_then(Value::as_str)
            && kind != res.kind
        {
            return Err(ApiError::BadRequest(format!(
                "the kind of the object ({kind}) does not match the resource ({})",
                res.plural
            )));
        }
        if let Some(c) = validate::name_present(&obj) {
            return Err(invalid(res, "", vec![c]));
        }
        let mut inner = self.lock();
        let ns = if res.namespaced {
            let ns = ns.unwrap_or("default");
            let body_ns = meta::namespace(&obj);
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::BadRequest(
                    "the namespace of the provided object does not match the namespace sent on the request".into(),
                ));
            }
            match inner.objects.get("namespaces").and_then(|m| m.get(&(String::new(), ns.to_owned()))) {
                None => return Err(ApiError::not_found("namespaces", ns)),
                Some(n) if n.pointer("/metadata/deletionTimestamp").is_some() => {
                    return Err(ApiError::Forbidden(format!(
                        "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                        res.plural,
                        meta::name(&obj)
                    )));
                }
                Some(_) => {}
            }
            Some(ns.to_owned())
        } else {
            None
        };
        {
            let md = meta::metadata_mut(&mut obj);
            if md.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
                let prefix = md.get("generateName").and_then(Value::as_str).unwrap_or_default().to_owned();
                md.insert("name".into(), json!(format!("{prefix}{}", meta::name_suffix())));
            }
            match &ns {
                Some(ns) => md.insert("namespace".into(), json!(ns)),
                None => md.remove("namespace"),
            };
            md.insert("uid".into(), json!(meta::new_uid()));
            md.insert("creationTimestamp".into(), json!(meta::now_rfc3339()));
            md.remove("resourceVersion");
            md.remove("deletionTimestamp");
            md.remove("deletionGracePeriodSeconds");
        }
        obj["apiVersion"] = json!(res.group_version);
        obj["kind"] = json!(res.kind);
        let node_name = self.node_name.clone();
        // Node ports in use by other Services, and those this one asks for: a new one is a
        // random free port of the range, as the API server's allocator picks them.
        let in_use: BTreeSet<u64> = if res.is("services") {
            inner.objects.get("services").into_iter().flat_map(|m| m.values()).flat_map(node_ports).collect()
        } else {
            BTreeSet::new()
        };
        let mut taken: BTreeSet<u64> = in_use.iter().copied().chain(node_ports(&obj)).collect();
        let ip_before = inner.next_ip;
        let mut next_ip = || {
            inner.next_ip += 1;
            format!("10.96.{}.{}", inner.next_ip / 256, inner.next_ip % 256)
        };
        if meta::name(&obj) == "kubernetes" && res.is("services") && ns.as_deref() == Some("default") {
            obj["spec"]["clusterIP"] = json!("10.96.0.1");
        }
        let mut next_node_port = || {
            let free: Vec<u16> = NODE_PORTS.filter(|p| !taken.contains(&u64::from(*p))).collect();
            let port = fastrand::choice(free)?;
            taken.insert(u64::from(port));
            Some(port)
        };
        defaults::apply(
            res.plural,
            &mut obj,
            &mut defaults::Context {
                node_name: &node_name,
                next_cluster_ip: &mut next_ip,
                next_node_port: &mut next_node_port,
            },
        );
        validate::typed(res.plural, &obj).map_err(|e| ApiError::BadRequest(format!("{} in body: {e}", res.kind)))?;
        let mut causes = validate::object(res, &obj);
        if res.is("services") {
            causes.extend(node_port_causes(&obj, &in_use));
        }
        if !causes.is_empty() {
            return Err(invalid(res, meta::name(&obj), causes));
        }
        check_size(&obj)?;
        let key = Self::key(res, ns.as_deref(), meta::name(&obj));
        if inner.objects.get(res.plural).is_some_and(|m| m.contains_key(&key)) {
            return Err(ApiError::AlreadyExists { resource: res.plural.into(), name: key.1 });
        }
        if dry_run {
            inner.next_ip = ip_before;
            return Ok(obj);
        }
        inner.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        inner.objects.entry(res.plural).or_default().insert(key, obj.clone());
        self.emit(&mut inner, res, EventType::Added, obj.clone(), None);
        if res.is("namespaces") {
            // Like the service-account controller: every namespace gets a `default` account.
            let name = meta::name(&obj).to_owned();
            drop(inner);
            self.create(
                crate::resources::by_plural("serviceaccounts").expect("known"),
                Some(&name),
                json!({"metadata": {"name": "default"}}),
            )?;
        }
        Ok(obj)
    }

    pub fn get(&self, res: &Resource, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        self.lock()
            .objects
            .get(res.plural)
            .and_then(|m| m.get(&Self::key(res, ns, name)))
            .cloned()
            .map(|o| views::to_view(res, o))
            .ok_or_else(|| ApiError::not_found(res.plural, name))
    }

    /// Objects of `res` (in `ns`, or everywhere) passing `keep`, and the resourceVersion of the snapshot.
    pub fn list(&self, res: &Resource, ns: Option<&str>, keep: impl Fn(&Value) -> bool) -> (Vec<Value>, u64) {
        let inner = self.lock();
        (Self::list_locked(&inner, res, ns, keep), inner.rv)
    }

    fn list_locked(inner: &Inner, res: &Resource, ns: Option<&str>, keep: impl Fn(&Value) -> bool) -> Vec<Value> {
        let Some(map) = inner.objects.get(res.plural) else { return Vec::new() };
        map.iter()
            .filter(|((ons, _), _)| !res.namespaced || ns.is_none_or(|ns| ns == ons))
            .map(|(_, v)| v)
            .filter(|v| keep(v))
            .map(|v| views::to_view(res, v.clone()))
            .collect()
    }

    /// One page of a list as the store looked at `at` (a resourceVersion; `None` is now), in key
    /// order, starting after `after`. Past versions are rebuilt by undoing the history's events
    /// newer than `at`, so every page of a chunked list shows the same snapshot, as etcd's MVCC
    /// does for the real server; a version older than the history answers 410 Gone.
    pub fn list_page(
        &self,
        res: &Resource,
        ns: Option<&str>,
        keep: impl Fn(&Value) -> bool,
        at: Option<u64>,
        after: Option<&Key>,
        limit: Option<usize>,
    ) -> Result<Page, ApiError> {
        let inner = self.lock();
        let rv = at.unwrap_or(inner.rv);
        if rv > inner.rv {
            return Err(ApiError::TooLargeResourceVersion { requested: rv, current: inner.rv });
        }
        if rv < inner.compacted {
            return Err(ApiError::Gone { requested: rv, oldest: inner.compacted + 1 });
        }
        // The state before the oldest event newer than `rv`, per touched key (None: absent).
        let mut undone: BTreeMap<Key, Option<Value>> = BTreeMap::new();
        for ev in inner.history.iter().rev().take_while(|e| e.rv > rv).filter(|e| e.resource == res.plural) {
            let key = Self::key(res, Some(meta::namespace(&ev.object)), meta::name(&ev.object));
            let before = match ev.kind {
                EventType::Added => None,
                EventType::Modified | EventType::Deleted => ev.previous.clone(),
            };
            undone.insert(key, before);
        }
        let empty = BTreeMap::new();
        let current = inner.objects.get(res.plural).unwrap_or(&empty);
        let lower = match after {
            Some(k) => std::ops::Bound::Excluded(k.clone()),
            None => std::ops::Bound::Unbounded,
        };
        let range = (lower, std::ops::Bound::Unbounded);
        let in_ns = |k: &Key| !res.namespaced || ns.is_none_or(|ns| ns == k.0);
        let mut items = Vec::new();
        let mut last: Option<Key> = None;
        let mut remaining = 0u64;
        for (key, obj) in merge_sorted(current.range(range.clone()), undone.range(range)) {
            if !in_ns(key) || !keep(obj) {
                continue;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                remaining += 1;
            } else {
                items.push(views::to_view(res, obj.clone()));
                last = Some(key.clone());
            }
        }
        let continue_after = if remaining > 0 { last } else { None };
        Ok(Page { items, rv, continue_after, remaining })
    }

    /// Like `list`, plus a live receiver subscribed atomically with the snapshot.
    pub fn list_and_subscribe(
        &self,
        res: &Resource,
        ns: Option<&str>,
    ) -> (Vec<Value>, u64, broadcast::Receiver<Arc<WatchEvent>>) {
        let inner = self.lock();
        let items = Self::list_locked(&inner, res, ns, |_| true);
        (items, inner.rv, self.tx.subscribe())
    }

    /// Live events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<WatchEvent>> {
        let _inner = self.lock();
        self.tx.subscribe()
    }

    /// History after `rv` and a live receiver; 410 Gone when `rv` fell out of the history.
    pub fn replay_and_subscribe(&self, rv: u64) -> Result<(Vec<Arc<WatchEvent>>, Subscription), ApiError> {
        let inner = self.lock();
        if rv < inner.compacted {
            return Err(ApiError::Gone { requested: rv, oldest: inner.compacted + 1 });
        }
        let events = inner.history.iter().filter(|e| e.rv > rv).cloned().collect();
        Ok((events, self.tx.subscribe()))
    }

    /// Read-modify-write of one object. `change` sees a copy of the current object; the result is
    /// checked (identity, optimistic concurrency, validation) and stored with a new resourceVersion
    /// unless nothing changed. An object marked for deletion whose finalizers are now all gone is
    /// removed instead (DELETED), as on a real server.
    pub fn update_with(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        name: &str,
        part: Part,
        change: impl FnOnce(&mut Value) -> Result<(), ApiError>,
    ) -> Result<Value, ApiError> {
        self.update_inner(res, ns, name, part, false, change)
    }

    /// `dryRun=All` update: every check of `update_with`, and the object as it would be stored
    /// (with its current resourceVersion), but nothing changes.
    pub fn update_dry_run(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        name: &str,
        part: Part,
        change: impl FnOnce(&mut Value) -> Result<(), ApiError>,
    ) -> Result<Value, ApiError> {
        self.update_inner(res, ns, name, part, true, change)
    }

    fn update_inner(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        name: &str,
        part: Part,
        dry_run: bool,
        change: impl FnOnce(&mut Value) -> Result<(), ApiError>,
    ) -> Result<Value, ApiError> {
        if !views::is_view(res) {
            return self.update_stored(res, ns, name, part, dry_run, change);
        }
        // The change is made to the object as the view shows it.
        let through_view = |o: &mut Value| {
            let mut shown = views::to_view(res, o.clone());
            change(&mut shown)?;
            views::typed(res, &shown).map_err(|e| ApiError::BadRequest(format!("{} in body: {e}", res.kind)))?;
            *o = views::to_storage(res, shown);
            Ok(())
        };
        let updated = self.update_stored(views::storage(res), ns, name, part, dry_run, through_view)?;
        Ok(views::to_view(res, updated))
    }

    fn update_stored(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        name: &str,
        part: Part,
        dry_run: bool,
        change: impl FnOnce(&mut Value) -> Result<(), ApiError>,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = Self::key(res, ns, name);
        let old = inner
            .objects
            .get(res.plural)
            .and_then(|m| m.get(&key))
            .cloned()
            .ok_or_else(|| ApiError::not_found(res.plural, name))?;
        let mut new = old.clone();
        change(&mut new)?;
        if !new.is_object() {
            return Err(ApiError::BadRequest(format!("the updated {} must be a JSON object", res.kind)));
        }
        let new_name = meta::name(&new);
        if new_name != name {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({new_name}) does not match the name on the URL ({name})"
            )));
        }
        if res.namespaced {
            let new_ns = meta::namespace(&new);
            if !new_ns.is_empty() && new_ns != key.0 {
                return Err(ApiError::BadRequest(
                    "the namespace of the provided object does not match the namespace sent on the request".into(),
                ));
            }
        }
        let new_rv = meta::resource_version(&new);
        if !new_rv.is_empty() && new_rv != meta::resource_version(&old) {
            return Err(ApiError::Conflict {
                resource: res.plural.into(),
                name: name.into(),
                reason: "the object has been modified; please apply your changes to the latest version and try again"
                    .into(),
            });
        }
        // Identity and server-owned metadata cannot be changed by clients.
        {
            let md = meta::metadata_mut(&mut new);
            for k in ["uid", "creationTimestamp", "namespace", "generateName"] {
                match old["metadata"].get(k) {
                    Some(v) => md.insert(k.into(), v.clone()),
                    None => md.remove(k),
                };
            }
            if part != Part::Whole {
                for k in ["deletionTimestamp", "deletionGracePeriodSeconds"] {
                    match old["metadata"].get(k) {
                        Some(v) => md.insert(k.into(), v.clone()),
                        None => md.remove(k),
                    };
                }
            }
        }
        new["apiVersion"] = json!(res.group_version);
        new["kind"] = json!(res.kind);
        match part {
            Part::Main if has_status_subresource(res) => match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    new.as_object_mut().map(|o| o.remove("status"));
                }
            },
            Part::Status => {
                let status = new.get("status").cloned();
                new = old.clone();
                match status {
                    Some(s) => new["status"] = s,
                    None => {
                        new.as_object_mut().map(|o| o.remove("status"));
                    }
                }
            }
            _ => {}
        }
        validate::typed(res.plural, &new).map_err(|e| ApiError::BadRequest(format!("{} in body: {e}", res.kind)))?;
        let mut causes = validate::object(res, &new);
        if res.is("pods") && part == Part::Main {
            causes.extend(validate::pod_spec_update(&old, &new));
        }
        if !causes.is_empty() {
            return Err(invalid(res, name, causes));
        }
        check_size(&new)?;
        meta::metadata_mut(&mut new).insert("resourceVersion".into(), old["metadata"]["resourceVersion"].clone());
        if new == old || dry_run {
            return Ok(new);
        }
        inner.rv += 1;
        new["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        // Pods finish through the node and namespaces through their cleanup (lifecycle.rs).
        let finished = new.pointer("/metadata/deletionTimestamp").is_some()
            && meta::finalizers(&new).is_empty()
            && !res.is("pods")
            && !res.is("namespaces");
        if finished {
            inner.objects.entry(res.plural).or_default().remove(&key);
            self.emit(&mut inner, res, EventType::Deleted, new.clone(), Some(old));
        } else {
            inner.objects.entry(res.plural).or_default().insert(key, new.clone());
            self.emit(&mut inner, res, EventType::Modified, new.clone(), Some(old));
        }
        Ok(new)
    }

    /// Remove an object now; the DELETED event carries a fresh resourceVersion.
    pub fn remove(&self, res: &'static Resource, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = Self::key(res, ns, name);
        let mut obj = inner
            .objects
            .get_mut(res.plural)
            .and_then(|m| m.remove(&key))
            .ok_or_else(|| ApiError::not_found(res.plural, name))?;
        let before = obj.clone();
        inner.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        self.emit(&mut inner, views::storage(res), EventType::Deleted, obj.clone(), Some(before));
        Ok(views::to_view(res, obj))
    }

    /// Every stored object (any kind) that has an ownerReference to `owner_uid`.
    pub fn dependents_of(&self, owner_uid: &str) -> Vec<(&'static Resource, Option<String>, String)> {
        let inner = self.lock();
        let mut out = Vec::new();
        for res in RESOURCES.iter().filter(|r| !views::is_view(r)) {
            if let Some(map) = inner.objects.get(res.plural) {
                for ((ns, name), obj) in map {
                    if meta::owner_uids(obj).contains(&owner_uid) {
                        out.push((res, res.namespaced.then(|| ns.clone()), name.clone()));
                    }
                }
            }
        }
        out
    }

    /// Names of every namespaced object in `ns`, per kind.
    pub fn contents_of_namespace(&self, ns: &str) -> Vec<(&'static Resource, String)> {
        let inner = self.lock();
        let mut out = Vec::new();
        for res in RESOURCES.iter().filter(|r| r.namespaced && !views::is_view(r)) {
            if let Some(map) = inner.objects.get(res.plural) {
                out.extend(map.keys().filter(|(n, _)| n == ns).map(|(_, name)| (res, name.clone())));
            }
        }
        out
    }

    /// The pod with this uid, if it is still stored.
    pub fn pod_by_uid(&self, uid: &str) -> Option<Value> {
        let inner = self.lock();
        inner.objects.get("pods")?.values().find(|p| meta::uid(p) == uid).cloned()
    }
}

pub fn res(plural: &str) -> &'static Resource {
    crate::resources::by_plural(plural).expect("resource known at compile time")
}

/// The API server's default `--service-node-port-range`.
const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

/// The node ports a Service's ports hold.
fn node_ports(svc: &Value) -> Vec<u64> {
    svc.pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("nodePort").and_then(Value::as_u64))
        .filter(|n| *n != 0)
        .collect()
}

/// A Service's node ports outside the range, or held by another Service (or twice by this
/// one), in the API server's words.
fn node_port_causes(svc: &Value, in_use: &BTreeSet<u64>) -> Vec<Cause> {
    let mut seen = BTreeSet::new();
    let mut causes = Vec::new();
    let ports = svc.pointer("/spec/ports").and_then(Value::as_array).cloned().unwrap_or_default();
    for (i, p) in ports.iter().enumerate() {
        let Some(n) = p.get("nodePort").and_then(Value::as_u64).filter(|n| *n != 0) else { continue };
        let message = if !(u64::from(*NODE_PORTS.start())..=u64::from(*NODE_PORTS.end())).contains(&n) {
            format!(
                "Invalid value: {n}: provided port is not in the valid range. The range of valid ports is {}-{}",
                NODE_PORTS.start(),
                NODE_PORTS.end()
            )
        } else if in_use.contains(&n) || !seen.insert(n) {
            format!("Invalid value: {n}: provided port is already allocated")
        } else {
            continue;
        };
        causes.push(Cause { reason: "FieldValueInvalid", field: format!("spec.ports[{i}].nodePort"), message });
    }
    causes
}

fn invalid(res: &Resource, name: &str, causes: Vec<Cause>) -> ApiError {
    ApiError::Invalid { kind: res.kind.into(), name: name.into(), causes }
}

impl Store {
    /// The node's InternalIP (its address on the pod network), as the kubelet reports it.
    pub fn set_node_address(&self, ip: &str) {
        let name = self.node_name.clone();
        let result = self.update_with(res("nodes"), None, &name, Part::Whole, |o| {
            o["status"]["addresses"] =
                json!([{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]);
            Ok(())
        });
        if let Err(e) = result {
            tracing::warn!(error = ?e, "cannot record the node's address");
        }
    }
}

fn node_object(name: &str) -> Value {
    let now = meta::now_rfc3339();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let condition = |t: &str, s: &str, reason: &str, msg: &str| json!({"type": t, "status": s, "reason": reason, "message": msg, "lastHeartbeatTime": now, "lastTransitionTime": now});
    json!({
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": std::env::consts::ARCH,
            "node-role.kubernetes.io/control-plane": ""
        }},
        "spec": {},
        "status": {
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            "capacity": {"cpu": cpus.to_string(), "memory": "16Gi", "pods": "110"},
            "allocatable": {"cpu": cpus.to_string(), "memory": "16Gi", "pods": "110"},
            "nodeInfo": {
                "architecture": std::env::consts::ARCH, "operatingSystem": "linux", "osImage": "keel local node",
                "kubeletVersion": crate::discovery::GIT_VERSION, "kubeProxyVersion": "", "containerRuntimeVersion": "keel://0.1.0",
                "kernelVersion": "", "machineID": "", "systemUUID": "", "bootID": ""
            }
        }
    })
}

/// An object must fit in one etcd request (`limits::MAX_OBJECT`), as on a real cluster.
fn check_size(obj: &Value) -> Result<(), ApiError> {
    let size = serde_json::to_vec(obj).map_or(0, |v| v.len());
    if size > crate::limits::MAX_OBJECT {
        return Err(ApiError::RequestEntityTooLarge(format!(
            "the object would be {size} bytes; limit is {}",
            crate::limits::MAX_OBJECT
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> Value {
        json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    }

    #[test]
    fn rv_increases_and_history_replays_and_expires() {
        let store = Store::new("n", 4);
        let start = store.current_rv();
        let a = store.create(res("pods"), Some("default"), pod("a")).unwrap();
        assert_eq!(meta::resource_version(&a), (start + 1).to_string());
        let (events, _rx) = store.replay_and_subscribe(start).unwrap();
        assert_eq!(events.len(), 1);
        for i in 0..5 {
            store.create(res("configmaps"), Some("default"), json!({"metadata": {"name": format!("c{i}")}})).unwrap();
        }
        assert!(matches!(store.replay_and_subscribe(start), Err(ApiError::Gone { .. })));
    }

    #[test]
    fn conflicts_and_generate_name() {
        let store = Store::new("n", 100);
        let mut p = pod("");
        p["metadata"] = json!({"generateName": "job-"});
        let created = store.create(res("pods"), Some("default"), p).unwrap();
        let name = meta::name(&created).to_owned();
        assert!(name.starts_with("job-") && name.len() == 9, "{name}");
        let mut stale = created.clone();
        store
            .update_with(res("pods"), Some("default"), &name, Part::Main, |o| {
                o["metadata"]["labels"] = json!({"x": "1"});
                Ok(())
            })
            .unwrap();
        stale["metadata"]["labels"] = json!({"x": "2"});
        let err = store.update_with(res("pods"), Some("default"), &name, Part::Main, |o| {
            *o = stale;
            Ok(())
        });
        assert!(matches!(err, Err(ApiError::Conflict { .. })));
        assert!(matches!(store.create(res("pods"), Some("nope"), pod("x")), Err(ApiError::NotFound { .. })));
        assert!(matches!(store.create(res("pods"), Some("default"), pod(&name)), Err(ApiError::AlreadyExists { .. })));
    }

    #[test]
    fn pages_read_one_snapshot_until_it_leaves_the_history() {
        let store = Store::new("n", 20);
        let cms = res("configmaps");
        let cm = |n: &str| json!({"metadata": {"name": n}});
        for n in ["a", "b", "c", "d"] {
            store.create(cms, Some("default"), cm(n)).unwrap();
        }
        let names = |p: &Page| p.items.iter().map(|o| meta::name(o).to_owned()).collect::<Vec<_>>();
        let first = store.list_page(cms, Some("default"), |_| true, None, None, Some(2)).unwrap();
        assert_eq!((names(&first), first.remaining), (vec!["a".to_owned(), "b".to_owned()], 2));
        // Changes after the first page: a new object, a deletion and a modification.
        store.create(cms, Some("default"), cm("bb")).unwrap();
        store.remove(cms, Some("default"), "c").unwrap();
        store
            .update_with(cms, Some("default"), "d", Part::Main, |o| {
                o["data"] = json!({"k": "v"});
                Ok(())
            })
            .unwrap();
        let second = store
            .list_page(cms, Some("default"), |_| true, Some(first.rv), first.continue_after.as_ref(), Some(2))
            .unwrap();
        assert_eq!(names(&second), ["c", "d"]);
        assert!(second.items[1].get("data").is_none(), "d as it was at the snapshot");
        assert_eq!((second.rv, second.continue_after.as_ref()), (first.rv, None));
        for i in 0..20 {
            store.create(cms, Some("default"), cm(&format!("x{i}"))).unwrap();
        }
        let gone =
            store.list_page(cms, Some("default"), |_| true, Some(first.rv), first.continue_after.as_ref(), Some(2));
        assert!(matches!(gone, Err(ApiError::Gone { .. })), "{gone:?}");
    }

    #[test]
    fn dry_runs_store_nothing() {
        let store = Store::new("n", 100);
        let rv = store.current_rv();
        let would_be = store.create_dry_run(res("pods"), Some("default"), pod("p")).unwrap();
        assert_eq!((meta::uid(&would_be).len(), meta::resource_version(&would_be)), (36, ""));
        assert!(store.get(res("pods"), Some("default"), "p").is_err());
        store.create(res("pods"), Some("default"), pod("p")).unwrap();
        let changed = store
            .update_dry_run(res("pods"), Some("default"), "p", Part::Main, |o| {
                o["metadata"]["labels"] = json!({"x": "1"});
                Ok(())
            })
            .unwrap();
        assert_eq!(changed["metadata"]["labels"]["x"], "1");
        assert!(store.get(res("pods"), Some("default"), "p").unwrap()["metadata"].get("labels").is_none());
        assert_eq!(store.current_rv(), rv + 1, "only the real create wrote");
    }

    #[test]
    fn namespaces_get_a_default_service_account() {
        let store = Store::new("n", 100);
        store.create(res("namespaces"), None, json!({"metadata": {"name": "team"}})).unwrap();
        assert!(store.get(res("serviceaccounts"), Some("team"), "default").is_ok());
    }
}
