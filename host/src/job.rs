//! The job as the host understands it, independent of the file format it came from.
//!
//! Parsing (GitLab CI YAML, a single job file or `.gitlab-ci.yml` + job name) lives in
//! `job::parse`; everything downstream (pod building, plugins, strategies) sees only these types.

pub mod overwrites;
pub mod parse;

use std::collections::BTreeMap;
use std::time::Duration;

pub use crate::vocab::{PullPolicy, Resources};

/// A container image reference with the job-level options GitLab allows on it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Image {
    pub name: String,
    /// Overrides the image's entrypoint when non-empty.
    pub entrypoint: Vec<String>,
    /// The job's own `image:pull_policy`, in order of preference. Empty: not set by the job.
    pub pull_policy: Vec<PullPolicy>,
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
}

/// A port a `services:` entry exposes (`ports:` in GitLab's job syntax).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct ServicePort {
    pub number: u16,
    /// `TCP` (default) or `UDP`, as Kubernetes spells it.
    pub protocol: String,
    pub name: Option<String>,
}

/// A CI variable. `masked` values are replaced in the trace; `public: false` values are never
/// shown to plugins' logs or rendered output in clear (they still reach the container env).
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
}

/// What a job asks to change about its pod through `KUBERNETES_*_OVERWRITE*` variables,
/// and (after the overwrite plugins ran) what was accepted. The same shape serves both: a
/// field that is `None`/empty is not requested (or not accepted).
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
