//! Validation for the cases clients depend on: names, and pods' containers.

use crate::errors::Cause;
use crate::resources::Resource;
use regex::Regex;
use serde_json::Value;
use std::collections::HashSet;
use std::sync::LazyLock;

static DNS1123_SUBDOMAIN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$").expect("static regex")
});
static DNS1123_LABEL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$").expect("static regex"));

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

fn check_name(field: &str, name: &str, label: bool, causes: &mut Vec<Cause>) {
    if label {
        if name.len() > 63 || !DNS1123_LABEL.is_match(name) {
            causes.push(Cause::invalid(field, name, LABEL_MSG));
        }
    } else if name.len() > 253 || !DNS1123_SUBDOMAIN.is_match(name) {
        causes.push(Cause::invalid(field, name, SUBDOMAIN_MSG));
    }
}

/// `metadata.name` presence, before generateName is expanded.
pub fn name_present(obj: &Value) -> Option<Cause> {
    let has = |p: &str| obj.pointer(p).and_then(Value::as_str).is_some_and(|s| !s.is_empty());
    (!has("/metadata/name") && !has("/metadata/generateName"))
        .then(|| Cause::required("metadata.name", "name or generateName is required"))
}

/// Every problem with an object about to be stored (name already final).
pub fn object(res: &Resource, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    check_name("metadata.name", name, res.label_names, &mut causes);
    if let Some(labels) = obj.pointer("/metadata/labels") {
        match labels.as_object() {
            Some(map) => {
                for (k, v) in map {
                    if !v.is_string() {
                        causes.push(Cause::invalid(
                            format!("metadata.labels[{k}]"),
                            &v.to_string(),
                            "label values must be strings",
                        ));
                    }
                }
            }
            None => causes.push(Cause::invalid("metadata.labels", &labels.to_string(), "must be an object")),
        }
    }
    if res.is("pods") {
        pod(obj, &mut causes);
    }
    if res.is("services") {
        service(obj, &mut causes);
    }
    causes
}

/// A string field that must be one of `supported` when present (the real server's enum checks).
fn one_of(obj: &Value, pointer: &str, field: &str, supported: &[&str], causes: &mut Vec<Cause>) {
    if let Some(v) = obj.pointer(pointer).and_then(Value::as_str)
        && !supported.contains(&v)
    {
        causes.push(Cause::not_supported(field, v, supported));
    }
}

const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];

fn service(obj: &Value, causes: &mut Vec<Cause>) {
    one_of(obj, "/spec/type", "spec.type", &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"], causes);
    one_of(obj, "/spec/sessionAffinity", "spec.sessionAffinity", &["ClientIP", "None"], causes);
    one_of(obj, "/spec/externalTrafficPolicy", "spec.externalTrafficPolicy", &["Cluster", "Local"], causes);
    one_of(obj, "/spec/internalTrafficPolicy", "spec.internalTrafficPolicy", &["Cluster", "Local"], causes);
    one_of(
        obj,
        "/spec/ipFamilyPolicy",
        "spec.ipFamilyPolicy",
        &["PreferDualStack", "RequireDualStack", "SingleStack"],
        causes,
    );
    for (i, _) in obj.pointer("/spec/ports").and_then(Value::as_array).into_iter().flatten().enumerate() {
        one_of(obj, &format!("/spec/ports/{i}/protocol"), &format!("spec.ports[{i}].protocol"), PROTOCOLS, causes);
    }
}

fn pod(obj: &Value, causes: &mut Vec<Cause>) {
    let containers = obj.pointer("/spec/containers").and_then(Value::as_array);
    match containers {
        None => causes.push(Cause::required("spec.containers", "")),
        Some(list) if list.is_empty() => causes.push(Cause::required("spec.containers", "")),
        Some(_) => {}
    }
    let mut seen = HashSet::new();
    for key in ["initContainers", "containers"] {
        let Some(list) = obj.pointer(&format!("/spec/{key}")).and_then(Value::as_array) else { continue };
        for (i, c) in list.iter().enumerate() {
            let base = format!("spec.{key}[{i}]");
            match c.get("name").and_then(Value::as_str) {
                None | Some("") => causes.push(Cause::required(format!("{base}.name"), "")),
                Some(name) => {
                    check_name(&format!("{base}.name"), name, true, causes);
                    if !seen.insert(name.to_owned()) {
                        causes.push(Cause::duplicate(format!("{base}.name"), name));
                    }
                }
            }
            if c.get("image").and_then(Value::as_str).is_none_or(str::is_empty) {
                causes.push(Cause::required(format!("{base}.image"), ""));
            }
            let at = |f: &str| (format!("/spec/{key}/{i}/{f}"), format!("{base}.{f}"));
            let (p, f) = at("imagePullPolicy");
            one_of(obj, &p, &f, &["Always", "IfNotPresent", "Never"], causes);
            let (p, f) = at("terminationMessagePolicy");
            one_of(obj, &p, &f, &["FallbackToLogsOnError", "File"], causes);
            if key == "initContainers" {
                // Only sidecars (`restartPolicy: Always`) may set it on an init container.
                let (p, f) = at("restartPolicy");
                one_of(obj, &p, &f, &["Always"], causes);
            } else if let Some(v) = c.get("restartPolicy").and_then(Value::as_str) {
                causes.push(Cause::forbidden(
                    format!("{base}.restartPolicy"),
                    &format!("may not be set for non-init containers (value {v:?})"),
                ));
            }
            for (j, _) in c.get("ports").and_then(Value::as_array).into_iter().flatten().enumerate() {
                let (p, f) = (format!("/spec/{key}/{i}/ports/{j}/protocol"), format!("{base}.ports[{j}].protocol"));
                one_of(obj, &p, &f, PROTOCOLS, causes);
            }
        }
    }
    one_of(obj, "/spec/restartPolicy", "spec.restartPolicy", &["Always", "Never", "OnFailure"], causes);
    one_of(
        obj,
        "/spec/dnsPolicy",
        "spec.dnsPolicy",
        &["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"],
        causes,
    );
    one_of(obj, "/spec/preemptionPolicy", "spec.preemptionPolicy", &["Never", "PreemptLowerPriority"], causes);
    let mut vols = HashSet::new();
    if let Some(list) = obj.pointer("/spec/volumes").and_then(Value::as_array) {
        for (i, v) in list.iter().enumerate() {
            let name = v.get("name").and_then(Value::as_str).unwrap_or_default();
            if name.is_empty() {
                causes.push(Cause::required(format!("spec.volumes[{i}].name"), ""));
            } else if !vols.insert(name.to_owned()) {
                causes.push(Cause::duplicate(format!("spec.volumes[{i}].name"), name));
            }
        }
    }
}

/// Pod updates may change only a few spec fields (as on a real server).
pub fn pod_spec_update(old: &Value, new: &Value) -> Option<Cause> {
    let strip = |spec: &Value| {
        let mut spec = spec.clone();
        for key in ["containers", "initContainers"] {
            if let Some(list) = spec.get_mut(key).and_then(Value::as_array_mut) {
                for c in list.iter_mut().filter_map(Value::as_object_mut) {
                    c.remove("image");
                }
            }
        }
        if let Some(s) = spec.as_object_mut() {
            s.remove("activeDeadlineSeconds");
            s.remove("tolerations");
            s.remove("terminationGracePeriodSeconds");
        }
        spec
    };
    let (o, n) = (strip(old.get("spec").unwrap_or(&Value::Null)), strip(new.get("spec").unwrap_or(&Value::Null)));
    (o != n).then(|| {
        Cause::forbidden(
            "spec",
            "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
        )
    })
}

/// Fields of `obj` that the kind's type does not have, as the API server's strict decoding
/// names them (`spec.containers[0].foo`): what `fieldValidation=Strict` refuses, `Warn` warns
/// about and both `Warn` and `Ignore` drop. Found by decoding into the k8s-openapi type and
/// encoding again: whatever did not survive is unknown. (`events.k8s.io/v1` Events are checked
/// against their own type.)
pub fn unknown_fields(group_version: &str, plural: &str, obj: &Value) -> Vec<FieldPath> {
    use k8s_openapi::api::core::v1 as core;
    fn check<T: serde::de::DeserializeOwned + serde::Serialize>(obj: &Value) -> Vec<FieldPath> {
        let Ok(typed) = T::deserialize(obj) else { return Vec::new() };
        let Ok(known) = serde_json::to_value(typed) else { return Vec::new() };
        let mut out = Vec::new();
        missing(obj, &known, &mut Vec::new(), &mut out);
        out
    }
    match (group_version, plural) {
        ("events.k8s.io/v1", "events") => check::<k8s_openapi::api::events::v1::Event>(obj),
        (_, "pods") => check::<core::Pod>(obj),
        (_, "secrets") => check::<core::Secret>(obj),
        (_, "configmaps") => check::<core::ConfigMap>(obj),
        (_, "services") => check::<core::Service>(obj),
        (_, "serviceaccounts") => check::<core::ServiceAccount>(obj),
        (_, "events") => check::<core::Event>(obj),
        (_, "namespaces") => check::<core::Namespace>(obj),
        (_, "nodes") => check::<core::Node>(obj),
        (_, "endpoints") => check::<core::Endpoints>(obj),
        (_, "endpointslices") => check::<k8s_openapi::api::discovery::v1::EndpointSlice>(obj),
        _ => Vec::new(),
    }
}

/// Where a field is: object keys and list indexes from the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(Vec<Step>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, step) in self.0.iter().enumerate() {
            match step {
                Step::Key(k) if i == 0 => write!(f, "{k}")?,
                Step::Key(k) => write!(f, ".{k}")?,
                Step::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

impl FieldPath {
    /// Removes the field from `obj` (the decoder drops unknown fields).
    pub fn remove_from(&self, obj: &mut Value) {
        let Some((last, parents)) = self.0.split_last() else { return };
        let mut at = obj;
        for step in parents {
            let next = match step {
                Step::Key(k) => at.get_mut(k.as_str()),
                Step::Index(n) => at.get_mut(*n),
            };
            let Some(next) = next else { return };
            at = next;
        }
        if let (Step::Key(k), Some(o)) = (last, at.as_object_mut()) {
            o.remove(k);
        }
    }
}

/// Paths present (and not null) in `given` but absent from `known`.
fn missing(given: &Value, known: &Value, at: &mut Vec<Step>, out: &mut Vec<FieldPath>) {
    match (given, known) {
        (Value::Object(g), Value::Object(k)) => {
            for (key, value) in g {
                if value.is_null() {
                    continue;
                }
                at.push(Step::Key(key.clone()));
                match k.get(key) {
                    Some(kv) => missing(value, kv, at, out),
                    None => out.push(FieldPath(at.clone())),
                }
                at.pop();
            }
        }
        (Value::Array(g), Value::Array(k)) => {
            for (i, (gv, kv)) in g.iter().zip(k).enumerate() {
                at.push(Step::Index(i));
                missing(gv, kv, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

/// Decode into the k8s-openapi type of the kind, so wrongly typed fields (`"image": 5`) are
/// rejected with the decoder's message, as the real server's strict decoding does.
pub fn typed(plural: &str, obj: &Value) -> Result<(), String> {
    use k8s_openapi::api::core::v1 as core;
    fn decode<T: serde::de::DeserializeOwned>(v: &Value) -> Result<(), String> {
        match T::deserialize(v) {
            Ok(_) => Ok(()),
            // Absent required fields are reported by `object` as 422 causes instead.
            Err(e) if e.to_string().starts_with("missing field") => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
    match plural {
        "pods" => decode::<core::Pod>(obj),
        "secrets" => decode::<core::Secret>(obj),
        "configmaps" => decode::<core::ConfigMap>(obj),
        "services" => decode::<core::Service>(obj),
        "serviceaccounts" => decode::<core::ServiceAccount>(obj),
        "events" => decode::<core::Event>(obj),
        "namespaces" => decode::<core::Namespace>(obj),
        "nodes" => decode::<core::Node>(obj),
        "endpoints" => decode::<core::Endpoints>(obj),
        "endpointslices" => decode::<k8s_openapi::api::discovery::v1::EndpointSlice>(obj),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod unknown_field_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_fields_are_named_by_their_path_and_maps_and_nulls_are_not_unknown() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"any": "x"}, "bogus": 1},
            "spec": {"containers": [{"name": "c", "image": "i", "imagee": "typo", "env": null}], "foo": {"bar": 1}},
            "status": null});
        let names =
            |v: &Value, gv, plural| unknown_fields(gv, plural, v).iter().map(|p| p.to_string()).collect::<Vec<_>>();
        assert_eq!(names(&pod, "v1", "pods"), ["metadata.bogus", "spec.containers[0].imagee", "spec.foo"]);
        let mut stripped = pod.clone();
        for path in unknown_fields("v1", "pods", &pod) {
            path.remove_from(&mut stripped);
        }
        assert!(names(&stripped, "v1", "pods").is_empty());
        assert_eq!(stripped["spec"]["containers"][0]["image"], "i", "known fields stay");
        let fine =
            json!({"metadata": {"name": "s", "annotations": {"a": "b"}}, "data": {"k": "dg=="}, "type": "Opaque"});
        assert!(names(&fine, "v1", "secrets").is_empty());
        let ev = json!({"metadata": {"name": "e"}, "regarding": {"name": "p"}, "note": "n", "message": "core's name"});
        assert_eq!(names(&ev, "events.k8s.io/v1", "events"), ["message"]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::by_plural;
    use serde_json::json;

    #[test]
    fn pod_problems_are_all_reported() {
        let pods = by_plural("pods").unwrap();
        let p = json!({"metadata": {"name": "Bad_Name"}, "spec": {"containers": [{"name": "a", "image": "x"}, {"name": "a"}]}});
        let fields: Vec<_> = object(pods, &p).into_iter().map(|c| (c.field, c.reason)).collect();
        assert_eq!(
            fields,
            vec![
                ("metadata.name".to_owned(), "FieldValueInvalid"),
                ("spec.containers[1].name".to_owned(), "FieldValueDuplicate"),
                ("spec.containers[1].image".to_owned(), "FieldValueRequired"),
            ]
        );
        let odd = json!({"metadata": {"name": "ok"}, "spec": {"restartPolicy": "Sometimes",
            "containers": [{"name": "a", "image": "x", "imagePullPolicy": "Maybe", "ports": [{"containerPort": 1, "protocol": "ICMP"}]}]}});
        let found: Vec<_> = object(pods, &odd).into_iter().map(|c| (c.field, c.reason, c.message)).collect();
        assert_eq!(
            found,
            vec![
                (
                    "spec.containers[0].imagePullPolicy".to_owned(),
                    "FieldValueNotSupported",
                    "Unsupported value: \"Maybe\": supported values: \"Always\", \"IfNotPresent\", \"Never\""
                        .to_owned()
                ),
                (
                    "spec.containers[0].ports[0].protocol".to_owned(),
                    "FieldValueNotSupported",
                    "Unsupported value: \"ICMP\": supported values: \"SCTP\", \"TCP\", \"UDP\"".to_owned()
                ),
                (
                    "spec.restartPolicy".to_owned(),
                    "FieldValueNotSupported",
                    "Unsupported value: \"Sometimes\": supported values: \"Always\", \"Never\", \"OnFailure\""
                        .to_owned()
                ),
            ]
        );
        let empty = json!({"metadata": {"name": "ok"}, "spec": {"containers": []}});
        assert_eq!(object(pods, &empty)[0].field, "spec.containers");
        assert!(name_present(&json!({"metadata": {}})).is_some());
        assert!(name_present(&json!({"metadata": {"generateName": "x-"}})).is_none());
    }
}
