//! Checks a mutator's output: the host, not the plugin, owns the pod's identity.

use k8s_openapi::api::core::v1::Pod;

use super::sandbox::{MAX_PLUGIN_TEXT, plugin_text};
use super::wit::latest;
use super::{PluginError, PluginInner};
use crate::input::{limits, show_bytes};

pub use keel_contract::pod::HostOwned;
/// Host-owned values of the pod before any plugin ran; the same code the SDK's test harness
/// checks a mutator's result with.
pub(crate) use keel_contract::pod::{Snapshot, Violation};

/// A violation as the host reports it: the plugin's text in it escaped and cut.
pub(crate) fn violation_error(violation: Violation, plugin: &PluginInner) -> PluginError {
    let (name, version, call) = (plugin.label(), plugin.version.clone(), "pod-mutator.mutate");
    let text = |s: &str| plugin_text(s, MAX_PLUGIN_TEXT);
    match violation {
        Violation::Changed { field, before, after } => PluginError::HostOwnedChanged {
            plugin: name,
            version,
            field: text(&field),
            before: plugin_text(&before, 256),
            after: plugin_text(&after, 256),
        },
        Violation::TooLarge(size) => PluginError::Malformed {
            plugin: name,
            version,
            call,
            reason: format!(
                "the pod is {size} bytes of JSON, over the limit of {} (the largest object the API server stores)",
                show_bytes(limits::OBJECT_BYTES)
            ),
        },
        other => PluginError::Malformed { plugin: name, version, call, reason: text(&other.to_string()) },
    }
}

/// What the host makes of a pod mutator's output `output` given the pod `before` it: the
/// checked Pod, or why it is refused. The same checks as a plugin call, for fuzzing and tests.
pub fn check_pod_output(before: &Pod, rules: &HostOwned, output: &str) -> Result<Pod, String> {
    let snapshot = Snapshot::of(before, rules);
    snapshot.check(output).map_err(|violation| match violation {
        Violation::TooLarge(size) => format!("too large: {size} bytes"),
        Violation::NotJson(reason) => format!("not JSON: {}", plugin_text(&reason, MAX_PLUGIN_TEXT)),
        Violation::NotAPod(reason) => format!("not a pod: {}", plugin_text(&reason, MAX_PLUGIN_TEXT)),
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
        plugin: plugin.label(),
        version: plugin.version.clone(),
        call: "overwrites.review",
        reason: format!(
            "the overwrites hold {size} bytes of text, over the limit of {} (the largest object the API server stores)",
            show_bytes(limits::OBJECT_BYTES)
        ),
    })
}
