//! The plugin side's conversions, one per direction a record crosses: the WIT types
//! wit-bindgen generates for this crate into the contract's records (`keel_contract`) the SDK
//! hands to plugin code, and back for what a plugin returns (pull policies, overwrites).

use std::collections::BTreeMap;

use crate::bindings::keel::plugin::types as wit;
use crate::{Context, Error, Image, Job, Overwrites, PullPolicy, Resources, Service, Variable};

impl From<wit::PullPolicy> for PullPolicy {
    fn from(p: wit::PullPolicy) -> Self {
        match p {
            wit::PullPolicy::Always => PullPolicy::Always,
            wit::PullPolicy::IfNotPresent => PullPolicy::IfNotPresent,
            wit::PullPolicy::Never => PullPolicy::Never,
        }
    }
}

impl From<PullPolicy> for wit::PullPolicy {
    fn from(p: PullPolicy) -> Self {
        match p {
            PullPolicy::Always => wit::PullPolicy::Always,
            PullPolicy::IfNotPresent => wit::PullPolicy::IfNotPresent,
            PullPolicy::Never => wit::PullPolicy::Never,
        }
    }
}

pub(crate) fn policies_from(ps: Vec<wit::PullPolicy>) -> Vec<PullPolicy> {
    ps.into_iter().map(Into::into).collect()
}

pub(crate) fn policies_to(ps: Vec<PullPolicy>) -> Vec<wit::PullPolicy> {
    ps.into_iter().map(Into::into).collect()
}

impl From<wit::Image> for Image {
    fn from(i: wit::Image) -> Self {
        Image { name: i.name, entrypoint: i.entrypoint, pull_policies: policies_from(i.pull_policies), user: None }
    }
}

impl From<wit::Job> for Job {
    fn from(j: wit::Job) -> Self {
        Job {
            id: j.id,
            name: j.name,
            image: j.image.into(),
            services: j
                .services
                .into_iter()
                .map(|s| Service { image: s.image.into(), alias: s.alias, command: s.command })
                .collect(),
            variables: j
                .variables
                .into_iter()
                .map(|v| Variable { key: v.key, value: v.value, masked: v.masked, public: v.public, file: v.file })
                .collect(),
            stages: j.stages,
        }
    }
}

/// The runner config crosses as JSON text; one that does not parse is the host's fault.
pub(crate) fn context_from(ctx: wit::Context) -> Result<Context, Error> {
    let runner_config = if ctx.runner_config.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&ctx.runner_config)
            .map_err(|e| Error::internal(format!("host sent a runner config that is not JSON: {e}")))?
    };
    Ok(Context { job: ctx.job.into(), runner_config })
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
