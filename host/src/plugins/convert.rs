//! Conversions between the host's job types and the latest WIT types.

use super::*;
pub fn pull_policy_to_wit(p: PullPolicy) -> latest::PullPolicy {
    match p {
        PullPolicy::Always => latest::PullPolicy::Always,
        PullPolicy::IfNotPresent => latest::PullPolicy::IfNotPresent,
        PullPolicy::Never => latest::PullPolicy::Never,
    }
}

pub fn pull_policy_from_wit(p: latest::PullPolicy) -> PullPolicy {
    match p {
        latest::PullPolicy::Always => PullPolicy::Always,
        latest::PullPolicy::IfNotPresent => PullPolicy::IfNotPresent,
        latest::PullPolicy::Never => PullPolicy::Never,
    }
}

fn image(i: &crate::job::Image) -> latest::Image {
    latest::Image {
        name: i.name.clone(),
        entrypoint: i.entrypoint.clone(),
        pull_policies: i.pull_policy.iter().copied().map(pull_policy_to_wit).collect(),
    }
}

/// `secrets`: whether values of non-public variables are handed over in clear.
pub fn context(job: &Job, runner_config: &str, secrets: bool) -> latest::Context {
    latest::Context {
        job: latest::Job {
            id: job.id,
            name: job.name.clone(),
            image: image(&job.image),
            services: job
                .services
                .iter()
                .map(|s| latest::Service { image: image(&s.image), alias: s.alias.clone(), command: s.command.clone() })
                .collect(),
            variables: job
                .variables
                .iter()
                .map(|v| latest::Variable {
                    key: v.key.clone(),
                    value: (v.public || secrets).then(|| v.value.clone()),
                    masked: v.masked,
                    public: v.public,
                    file: v.file,
                })
                .collect(),
            stages: job.stages.iter().map(|s| s.name.clone()).collect(),
        },
        runner_config: runner_config.to_string(),
    }
}

fn map_to_wit(m: &BTreeMap<String, String>) -> Vec<latest::KeyValue> {
    m.iter().map(|(k, v)| latest::KeyValue { key: k.clone(), value: v.clone() }).collect()
}

fn map_from_wit(list: Vec<latest::KeyValue>) -> BTreeMap<String, String> {
    list.into_iter().map(|kv| (kv.key, kv.value)).collect()
}

fn resources_to_wit(r: &Resources) -> latest::Resources {
    latest::Resources {
        cpu_request: r.cpu_request.clone(),
        cpu_limit: r.cpu_limit.clone(),
        memory_request: r.memory_request.clone(),
        memory_limit: r.memory_limit.clone(),
        ephemeral_storage_request: r.ephemeral_storage_request.clone(),
        ephemeral_storage_limit: r.ephemeral_storage_limit.clone(),
    }
}

fn resources_from_wit(r: latest::Resources) -> Resources {
    Resources {
        cpu_request: r.cpu_request,
        cpu_limit: r.cpu_limit,
        memory_request: r.memory_request,
        memory_limit: r.memory_limit,
        ephemeral_storage_request: r.ephemeral_storage_request,
        ephemeral_storage_limit: r.ephemeral_storage_limit,
    }
}

pub fn overwrites_to_wit(o: &Overwrites) -> latest::Overwrites {
    latest::Overwrites {
        namespace: o.namespace.clone(),
        service_account: o.service_account.clone(),
        bearer_token: o.bearer_token.clone(),
        pod_labels: map_to_wit(&o.pod_labels),
        pod_annotations: map_to_wit(&o.pod_annotations),
        node_selector: map_to_wit(&o.node_selector),
        node_tolerations: map_to_wit(&o.node_tolerations),
        build: resources_to_wit(&o.build),
        helper: resources_to_wit(&o.helper),
        service: resources_to_wit(&o.service),
    }
}

pub fn overwrites_from_wit(o: latest::Overwrites) -> Overwrites {
    Overwrites {
        namespace: o.namespace,
        service_account: o.service_account,
        bearer_token: o.bearer_token,
        pod_labels: map_from_wit(o.pod_labels),
        pod_annotations: map_from_wit(o.pod_annotations),
        node_selector: map_from_wit(o.node_selector),
        node_tolerations: map_from_wit(o.node_tolerations),
        build: resources_from_wit(o.build),
        helper: resources_from_wit(o.helper),
        service: resources_from_wit(o.service),
    }
}
