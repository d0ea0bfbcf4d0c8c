//! Checks a mutator's output: the host, not the plugin, owns the pod's identity.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use super::sandbox::{MAX_PLUGIN_TEXT, plugin_text};
use super::wit::latest;
use super::{PluginError, PluginInner};
use crate::config::{limits, show_bytes};

/// Labels the host relies on to find its pods; mutators may not change or remove them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostOwned {
    pub labels: Vec<String>,
}

impl HostOwned {
    pub fn label(key: impl Into<String>) -> Self {
        HostOwned { labels: vec![key.into()] }
    }
}

/// The container every pod must keep: the job's script runs there.
pub const BUILD_CONTAINER: &str = "build";

/// Host-owned values of the pod before any plugin ran.
pub(crate) struct Snapshot {
    namespace: Option<String>,
    name: Option<String>,
    generate_name: Option<String>,
    labels: BTreeMap<String, Option<String>>,
}

pub(crate) enum Violation {
    TooLarge(usize),
    NotJson(String),
    NotAPod(String),
    NoBuildContainer,
    Changed { field: String, before: String, after: String },
}

impl Violation {
    pub(crate) fn into_error(self, plugin: &PluginInner) -> PluginError {
        let (name, version, call) = (plugin.name.to_string(), plugin.version.clone(), "pod-mutator.mutate");
        match self {
            Violation::TooLarge(size) => PluginError::Malformed {
                plugin: name,
                version,
                call,
                reason: format!(
                    "the pod is {size} bytes of JSON, over the limit of {} (the largest object the API server stores)",
                    show_bytes(limits::OBJECT_BYTES)
                ),
            },
            Violation::NotJson(reason) => {
                PluginError::Malformed { plugin: name, version, call, reason: format!("output is not JSON: {reason}") }
            }
            Violation::NotAPod(reason) => PluginError::Malformed {
                plugin: name,
                version,
                call,
                reason: format!("output is not a Kubernetes v1 Pod: {reason}"),
            },
            Violation::NoBuildContainer => PluginError::Malformed {
                plugin: name,
                version,
                call,
                reason: format!("the pod no longer has the `{BUILD_CONTAINER}` container (spec.containers)"),
            },
            Violation::Changed { field, before, after } => {
                PluginError::HostOwnedChanged { plugin: name, version, field, before, after }
            }
        }
    }
}

fn show(v: &Option<String>) -> String {
    match v {
        Some(s) => plugin_text(&format!("{s:?}"), 256),
        None => "unset".to_string(),
    }
}

impl Snapshot {
    pub(crate) fn of(pod: &Pod, rules: &HostOwned) -> Self {
        let labels = pod.metadata.labels.as_ref();
        Snapshot {
            namespace: pod.metadata.namespace.clone(),
            name: pod.metadata.name.clone(),
            generate_name: pod.metadata.generate_name.clone(),
            labels: rules.labels.iter().map(|k| (k.clone(), labels.and_then(|l| l.get(k)).cloned())).collect(),
        }
    }

    pub(crate) fn check(&self, output: &str) -> Result<Pod, Violation> {
        // Checked before parsing: a 100 MB annotation once passed and rendered 104 MB of YAML.
        if output.len() > limits::OBJECT_BYTES {
            return Err(Violation::TooLarge(output.len()));
        }
        // serde's messages quote the plugin's text (unknown enum variants, field names).
        let quoted = |e: serde_json::Error| plugin_text(&e.to_string(), MAX_PLUGIN_TEXT);
        let value: serde_json::Value = serde_json::from_str(output).map_err(|e| Violation::NotJson(quoted(e)))?;
        let field = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_string);
        if field("apiVersion").as_deref() != Some("v1") || field("kind").as_deref() != Some("Pod") {
            return Err(Violation::NotAPod(format!(
                "apiVersion/kind is {}/{}, expected v1/Pod",
                show(&field("apiVersion")),
                show(&field("kind"))
            )));
        }
        let pod: Pod = serde_json::from_value(value).map_err(|e| Violation::NotAPod(quoted(e)))?;
        let same = |field: &str, before: &Option<String>, after: &Option<String>| {
            if before == after {
                Ok(())
            } else {
                Err(Violation::Changed { field: field.to_string(), before: show(before), after: show(after) })
            }
        };
        same("metadata.namespace", &self.namespace, &pod.metadata.namespace)?;
        same("metadata.name", &self.name, &pod.metadata.name)?;
        same("metadata.generateName", &self.generate_name, &pod.metadata.generate_name)?;
        for (key, before) in &self.labels {
            let after = pod.metadata.labels.as_ref().and_then(|l| l.get(key)).cloned();
            same(&format!("metadata.labels[{key}]"), before, &after)?;
        }
        let has_build = pod.spec.as_ref().is_some_and(|s| s.containers.iter().any(|c| c.name == BUILD_CONTAINER));
        if !has_build {
            return Err(Violation::NoBuildContainer);
        }
        Ok(pod)
    }
}

/// What the host makes of a pod mutator's output `output` given the pod `before` it: the
/// checked Pod, or why it is refused. The same checks as a plugin call, for fuzzing and tests.
pub fn check_pod_output(before: &Pod, rules: &HostOwned, output: &str) -> Result<Pod, String> {
    let snapshot = Snapshot::of(before, rules);
    snapshot.check(output).map_err(|violation| match violation {
        Violation::TooLarge(size) => format!("too large: {size} bytes"),
        Violation::NotJson(reason) => format!("not JSON: {reason}"),
        Violation::NotAPod(reason) => format!("not a pod: {reason}"),
        Violation::NoBuildContainer => "no build container".to_string(),
        Violation::Changed { field, before, after } => format!("changed {field} from {before} to {after}"),
    })
}

/// Bounds what an overwrite-rule plugin returns: the accepted overwrites become the pod's
/// labels, annotations and resources, so together they get the same bound as a pod.
pub(crate) fn check_overwrites(o: &latest::Overwrites, plugin: &PluginInner) -> Result<(), PluginError> {
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let pairs = |l: &[latest::KeyValue]| l.iter().map(|kv| kv.key.len() + kv.value.len()).sum::<usize>();
    let resources = |r: &latest::Resources| {
        opt(&r.cpu_request)
            + opt(&r.cpu_limit)
            + opt(&r.memory_request)
            + opt(&r.memory_limit)
            + opt(&r.ephemeral_storage_request)
            + opt(&r.ephemeral_storage_limit)
    };
    let size = opt(&o.namespace)
        + opt(&o.service_account)
        + opt(&o.bearer_token)
        + pairs(&o.pod_labels)
        + pairs(&o.pod_annotations)
        + pairs(&o.node_selector)
        + pairs(&o.node_tolerations)
        + resources(&o.build)
        + resources(&o.helper)
        + resources(&o.service);
    if size <= limits::OBJECT_BYTES {
        return Ok(());
    }
    Err(PluginError::Malformed {
        plugin: plugin.name.to_string(),
        version: plugin.version.clone(),
        call: "overwrites.review",
        reason: format!(
            "the overwrites hold {size} bytes of text, over the limit of {} (the largest object the API server stores)",
            show_bytes(limits::OBJECT_BYTES)
        ),
    })
}
