//! The host side's one `From` pair per record: the contract's records (`keel_contract`) and the
//! latest WIT version's types. What a plugin may see is decided before this, by
//! `keel_contract::context::Context::for_plugin`.

use std::collections::BTreeMap;

use keel_contract::context::{Context, Job, Service, Variable};
use keel_contract::job::{Image, Overwrites, PullPolicy, Resources};

use super::latest;

impl From<PullPolicy> for latest::PullPolicy {
    fn from(p: PullPolicy) -> Self {
        match p {
            PullPolicy::Always => latest::PullPolicy::Always,
            PullPolicy::IfNotPresent => latest::PullPolicy::IfNotPresent,
            PullPolicy::Never => latest::PullPolicy::Never,
        }
    }
}

impl From<latest::PullPolicy> for PullPolicy {
    fn from(p: latest::PullPolicy) -> Self {
        match p {
            latest::PullPolicy::Always => PullPolicy::Always,
            latest::PullPolicy::IfNotPresent => PullPolicy::IfNotPresent,
            latest::PullPolicy::Never => PullPolicy::Never,
        }
    }
}

impl From<Image> for latest::Image {
    fn from(i: Image) -> Self {
        latest::Image {
            name: i.name,
            entrypoint: i.entrypoint,
            pull_policies: i.pull_policies.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<Service> for latest::Service {
    fn from(s: Service) -> Self {
        latest::Service { image: s.image.into(), alias: s.alias, command: s.command }
    }
}

impl From<Variable> for latest::Variable {
    fn from(v: Variable) -> Self {
        latest::Variable { key: v.key, value: v.value, masked: v.masked, public: v.public, file: v.file }
    }
}

impl From<Job> for latest::Job {
    fn from(j: Job) -> Self {
        latest::Job {
            id: j.id,
            name: j.name,
            image: j.image.into(),
            services: j.services.into_iter().map(Into::into).collect(),
            variables: j.variables.into_iter().map(Into::into).collect(),
            stages: j.stages,
        }
    }
}

impl From<Context> for latest::Context {
    fn from(c: Context) -> Self {
        latest::Context { job: c.job.into(), runner_config: c.runner_config.to_string() }
    }
}

fn map_to(m: BTreeMap<String, String>) -> Vec<latest::KeyValue> {
    m.into_iter().map(|(key, value)| latest::KeyValue { key, value }).collect()
}

fn map_from(list: Vec<latest::KeyValue>) -> BTreeMap<String, String> {
    list.into_iter().map(|kv| (kv.key, kv.value)).collect()
}

impl From<Resources> for latest::Resources {
    fn from(r: Resources) -> Self {
        latest::Resources {
            cpu_request: r.cpu_request,
            cpu_limit: r.cpu_limit,
            memory_request: r.memory_request,
            memory_limit: r.memory_limit,
            ephemeral_storage_request: r.ephemeral_storage_request,
            ephemeral_storage_limit: r.ephemeral_storage_limit,
        }
    }
}

impl From<latest::Resources> for Resources {
    fn from(r: latest::Resources) -> Self {
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

impl From<Overwrites> for latest::Overwrites {
    fn from(o: Overwrites) -> Self {
        latest::Overwrites {
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

impl From<latest::Overwrites> for Overwrites {
    fn from(o: latest::Overwrites) -> Self {
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
