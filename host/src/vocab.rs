//! Leaf vocabulary shared along the flow (config, job, pod): Kubernetes spellings GitLab's
//! config and job files use. It imports nothing of the host, so no module needs to reach
//! backwards for these.

/// Image pull policy, as Kubernetes spells it in a container spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// The spelling Kubernetes uses in `imagePullPolicy`.
    pub fn as_k8s(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Resource quantities for one container class, as Kubernetes quantity strings.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Resources {
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
    pub ephemeral_storage_request: Option<String>,
    pub ephemeral_storage_limit: Option<String>,
}

/// Volume names the host's base pod and the strategies use; operators cannot take them.
pub const RESERVED_VOLUMES: &[&str] = &["repo", "scripts", "logs", "keel-vars"];
