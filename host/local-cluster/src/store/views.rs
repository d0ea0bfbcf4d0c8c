//! Resources that are another group's view of stored objects. `events.k8s.io/v1` Events are
//! the core `v1` Events, as in kube-apiserver, which keeps one copy and converts: an event a
//! kube-rs `Recorder` or client-go's new broadcaster writes through `events.k8s.io/v1` is the
//! one `kubectl describe` lists through `v1`, and the other way round. The store holds the core
//! form; the view's fields are renamed on the way in and out (kube-apiserver's
//! `pkg/apis/events/v1` conversion).

use serde_json::{Map, Value};

use crate::resources::{self, Resource};

/// `(events.k8s.io/v1 name, core v1 name)` of the fields that differ; the others (`metadata`,
/// `eventTime`, `series`, `action`, `reason`, `related`, `reportingInstance`, `type`) are the
/// same in both.
const EVENT_FIELDS: [(&str, &str); 7] = [
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

/// Whether `res` is a view of another resource's objects.
pub fn is_view(res: &Resource) -> bool {
    res.group_version == "events.k8s.io/v1"
}

/// The resource whose objects the store holds for `res` (itself unless a view).
pub fn storage(res: &'static Resource) -> &'static Resource {
    if is_view(res) { resources::by_plural("events").expect("core events are served") } else { res }
}

/// A stored object as the view `res` shows it (one already shown so is left as it is).
pub fn to_view(res: &Resource, mut obj: Value) -> Value {
    if !is_view(res) || obj.get("apiVersion").and_then(Value::as_str) == Some(res.group_version) {
        return obj;
    }
    if let Some(o) = obj.as_object_mut() {
        rename(o, |(view, core)| (core, view));
        o.insert("apiVersion".into(), res.group_version.into());
    }
    obj
}

/// An object written through the view `res`, in the form the store holds (one already in that
/// form is left as it is).
pub fn to_storage(res: &Resource, mut obj: Value) -> Value {
    if !is_view(res) || obj.get("apiVersion").and_then(Value::as_str) == Some("v1") {
        return obj;
    }
    if let Some(o) = obj.as_object_mut() {
        rename(o, |(view, core)| (view, core));
        o.insert("apiVersion".into(), "v1".into());
    }
    obj
}

/// Checks an object written through a view against the view's own type (field types), before
/// it is converted.
pub fn typed(res: &Resource, obj: &Value) -> Result<(), String> {
    if !is_view(res) {
        return Ok(());
    }
    match k8s_openapi::api::events::v1::Event::deserialize(obj) {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().starts_with("missing field") => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

use serde::Deserialize as _;

fn rename(
    o: &mut Map<String, Value>,
    direction: impl Fn((&'static str, &'static str)) -> (&'static str, &'static str),
) {
    for pair in EVENT_FIELDS {
        let (from, to) = direction(pair);
        // A field of the other form that is also present would shadow the converted one: the
        // real conversion has no such field either.
        o.remove(to);
        if let Some(v) = o.remove(from) {
            o.insert(to.into(), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_convert_both_ways() {
        let view = resources::find("events.k8s.io/v1", "events").unwrap();
        let core = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "e"},
            "involvedObject": {"kind": "Pod", "name": "p"}, "message": "hi", "reportingComponent": "ctl",
            "reportingInstance": "i", "count": 2, "reason": "Started", "type": "Normal"});
        let shown = to_view(view, core.clone());
        assert_eq!(
            shown,
            json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"},
                "regarding": {"kind": "Pod", "name": "p"}, "note": "hi", "reportingController": "ctl",
                "reportingInstance": "i", "deprecatedCount": 2, "reason": "Started", "type": "Normal"})
        );
        assert_eq!(to_view(view, shown.clone()), shown, "shown once");
        assert_eq!(to_storage(view, shown), core);
        let core_res = resources::by_plural("events").unwrap();
        assert_eq!(to_view(core_res, core.clone()), core, "the core resource is no view");
        assert!(std::ptr::eq(storage(view), core_res));
    }
}
