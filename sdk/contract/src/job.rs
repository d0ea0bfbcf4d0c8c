//! The job as keel understands it, whatever it came from (a job file, `.gitlab-ci.yml`, later
//! GitLab's job payload), and what it may ask to change about its pod.

use std::collections::BTreeMap;
use std::time::Duration;

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

    /// The spelling GitLab uses in `pull_policy` (`always`, `if-not-present`, `never`).
    pub fn as_gitlab(self) -> &'static str {
        match self {
            PullPolicy::Always => "always",
            PullPolicy::IfNotPresent => "if-not-present",
            PullPolicy::Never => "never",
        }
    }

    /// Parse GitLab's spelling.
    pub fn from_gitlab(s: &str) -> Option<PullPolicy> {
        [PullPolicy::Always, PullPolicy::IfNotPresent, PullPolicy::Never].into_iter().find(|p| p.as_gitlab() == s)
    }
}

/// A container image reference with the job-level options GitLab allows on it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Image {
    /// As the job wrote it (see [`crate::image::ImageRef`] to compare images).
    pub name: String,
    /// Overrides the image's entrypoint when non-empty.
    pub entrypoint: Vec<String>,
    /// The job's own `image:pull_policy`, most preferred first. Empty: not set by the job.
    pub pull_policies: Vec<PullPolicy>,
    /// GitLab's `image:kubernetes:user` (`uid` or `uid:gid`), as the job wrote it; the host
    /// checks it against the runner's `allowed_users`/`allowed_groups`. Not in WIT 0.1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A `services:` entry: a sidecar container in the job's pod.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Service {
    pub image: Image,
    pub alias: Option<String>,
    pub command: Vec<String>,
    /// Ports the service exposes; each service with ports gets a Kubernetes Service object
    /// selecting the job's pod (GitLab's proxy services).
    pub ports: Vec<ServicePort>,
    /// The service's own `variables`, resolved over the job's (each keeps the secrecy of what
    /// it was built from); set in the service's container only. Not in WIT 0.1.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub variables: Vec<Variable>,
}

/// A port a `services:` entry exposes (`ports:` in GitLab's job syntax).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct ServicePort {
    pub number: u16,
    /// `TCP` (default) or `UDP`, as Kubernetes spells it.
    pub protocol: String,
    pub name: Option<String>,
}

/// A CI variable, resolved (see [`crate::variables`] for the one rule that sets `masked` and
/// `public`). A value that is not public reaches the job only through the variables Secret, a
/// plugin only with `grants.secrets`, the trace and `render` only masked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Variable {
    pub key: String,
    pub value: String,
    pub masked: bool,
    pub public: bool,
    /// GitLab "file" type variable: the value is written to a file and the env var holds its path.
    pub file: bool,
}

/// One named stage of the job's script, run in order in the build container.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stage {
    /// `before_script`, `script`, `after_script` (GitLab's names, lower-case with underscores).
    pub name: String,
    pub lines: Vec<String>,
}

/// A job ready to run: everything the host needs, nothing about where it came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Job {
    /// Numeric id (GitLab's `CI_JOB_ID`); used in pod names and labels.
    pub id: u64,
    pub name: String,
    pub image: Image,
    pub services: Vec<Service>,
    pub variables: Vec<Variable>,
    pub stages: Vec<Stage>,
    pub timeout: Option<Duration>,
}

impl Job {
    /// Look up a variable's value by key (last definition wins, like GitLab's precedence).
    pub fn variable(&self, key: &str) -> Option<&str> {
        self.variables.iter().rev().find(|v| v.key == key).map(|v| v.value.as_str())
    }

    /// The values the trace and `render` mask: every value that is not public, the services'
    /// own included.
    pub fn secret_values(&self) -> Vec<String> {
        self.variables
            .iter()
            .chain(self.services.iter().flat_map(|s| &s.variables))
            .filter(|v| !v.public)
            .map(|v| v.value.clone())
            .filter(|v| !v.is_empty())
            .collect()
    }
}

/// Kubernetes quantities for one container class; `None` = not requested / not accepted.
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

/// What a job asks to change about its pod through `KUBERNETES_*_OVERWRITE*` variables, and
/// (after the overwrite rules ran) what was accepted. The same shape serves both: a field that
/// is `None`/empty is not requested (or not accepted).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Overwrites {
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub bearer_token: Option<String>,
    pub pod_labels: BTreeMap<String, String>,
    pub pod_annotations: BTreeMap<String, String>,
    pub node_selector: BTreeMap<String, String>,
    /// `key` -> `value:effect` or `effect` as in GitLab's `KUBERNETES_NODE_TOLERATIONS_*`.
    /// `value:effect` (the value may be empty) means operator `Equal`; a bare `effect` (may be
    /// empty: any effect) means operator `Exists`.
    pub node_tolerations: BTreeMap<String, String>,
    pub build: Resources,
    pub helper: Resources,
    pub service: Resources,
}
