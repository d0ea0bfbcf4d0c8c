//! Overwrites as authors want them: maps, not lists of pairs.

use std::collections::BTreeMap;

use crate::bindings::keel::plugin::types as wit;

/// Kubernetes quantities for one container class; `None` = not requested / not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resources {
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
    pub ephemeral_storage_request: Option<String>,
    pub ephemeral_storage_limit: Option<String>,
}

/// Requested (input) or accepted (output) overwrites. Empty/`None` = not requested.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Overwrites {
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub bearer_token: Option<String>,
    pub pod_labels: BTreeMap<String, String>,
    pub pod_annotations: BTreeMap<String, String>,
    pub node_selector: BTreeMap<String, String>,
    /// `key` -> `value:effect` or `effect`.
    pub node_tolerations: BTreeMap<String, String>,
    pub build: Resources,
    pub helper: Resources,
    pub service: Resources,
}

fn map_from(list: Vec<wit::KeyValue>) -> BTreeMap<String, String> {
    list.into_iter().map(|kv| (kv.key, kv.value)).collect()
}

fn map_to(map: BTreeMap<String, String>) -> Vec<wit::KeyValue> {
    map.into_iter().map(|(key, value)| wit::KeyValue { key, value }).collect()
}

impl From<wit::Resources> for Resources {
    fn from(r: wit::Resources) -> Self {
        Resources {
            cpu_request: r.cpu_request,
            cpu_limit: r.cpu_limit,
            memory_request: r.memory_request,
            memory_limit: r.memory_limit,
            ephemeral_storage_request: r.ephemeral_storage_request,
            ephemeral_storage_limit: r.ephemeral_storage_limit,
        }
    }
}

impl From<Resources> for wit::Resources {
    fn from(r: Resources) -> Self {
        wit::Resources {
            cpu_request: r.cpu_request,
            cpu_limit: r.cpu_limit,
            memory_request: r.memory_request,
            memory_limit: r.memory_limit,
            ephemeral_storage_request: r.ephemeral_storage_request,
            ephemeral_storage_limit: r.ephemeral_storage_limit,
        }
    }
}

impl From<wit::Overwrites> for Overwrites {
    fn from(o: wit::Overwrites) -> Self {
        Overwrites {
            namespace: o.namespace,
            service_account: o.service_account,
            bearer_token: o.bearer_token,
            pod_labels: map_from(o.pod_labels),
            pod_annotations: map_from(o.pod_annotations),
            node_selector: map_from(o.node_selector),
            node_tolerations: map_from(o.node_tolerations),
            build: o.build.into(),
            helper: o.helper.into(),
            service: o.service.into(),
        }
    }
}

impl From<Overwrites> for wit::Overwrites {
    fn from(o: Overwrites) -> Self {
        wit::Overwrites {
            namespace: o.namespace,
            service_account: o.service_account,
            bearer_token: o.bearer_token,
            pod_labels: map_to(o.pod_labels),
            pod_annotations: map_to(o.pod_annotations),
            node_selector: map_to(o.node_selector),
            node_tolerations: map_to(o.node_tolerations),
            build: o.build.into(),
            helper: o.helper.into(),
            service: o.service.into(),
        }
    }
}
