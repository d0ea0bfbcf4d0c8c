//! What a plugin sees of the job: the job with every value it may not see taken out.
//!
//! [`Context::for_plugin`] is the one place that decides it: a variable that is not public
//! (masked, a credential, or built from one, see [`crate::variables`]) keeps its key and flags
//! but loses its value unless the operator granted the plugin `secrets`. The host builds every
//! plugin's context with it, and the SDK's test harness builds test contexts with it.

use crate::job::{self, Image};

/// A `services:` entry as a plugin sees it (ports are not part of the plugin contract).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Service {
    pub image: Image,
    pub alias: Option<String>,
    pub command: Vec<String>,
}

/// A CI variable as a plugin sees it. `value` is `None` for a non-public variable unless the
/// operator granted the plugin `secrets`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Variable {
    pub key: String,
    pub value: Option<String>,
    pub masked: bool,
    pub public: bool,
    pub file: bool,
}

/// The job as a plugin sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Job {
    pub id: u64,
    pub name: String,
    pub image: Image,
    pub services: Vec<Service>,
    pub variables: Vec<Variable>,
    /// The stages' names, in order.
    pub stages: Vec<String>,
}

impl Job {
    /// The value of variable `key` (last definition wins); `None` if absent or hidden.
    pub fn variable(&self, key: &str) -> Option<&str> {
        self.variables.iter().rev().find(|v| v.key == key).and_then(|v| v.value.as_deref())
    }
}

/// The job and the runner's `[runners.kubernetes]` table.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Context {
    pub job: Job,
    /// The runner's `[runners.kubernetes]` table (JSON object; `Null` when not given).
    pub runner_config: serde_json::Value,
}

/// The runner config does not have the shape a plugin asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerConfigError(pub String);

impl std::fmt::Display for RunnerConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[runners.kubernetes]: {}", self.0)
    }
}

impl std::error::Error for RunnerConfigError {}

impl Context {
    /// Deserialize the runner config (or the part of it you care about) into your own type.
    pub fn runner_config<T: serde::de::DeserializeOwned>(&self) -> Result<T, RunnerConfigError> {
        let value = if self.runner_config.is_null() {
            serde_json::Value::Object(Default::default())
        } else {
            self.runner_config.clone()
        };
        T::deserialize(value).map_err(|e| RunnerConfigError(e.to_string()))
    }

    /// What a plugin granted `secrets` (or not) may see of `job`.
    pub fn for_plugin(job: &job::Job, runner_config: serde_json::Value, secrets: bool) -> Context {
        Context {
            job: Job {
                id: job.id,
                name: job.name.clone(),
                image: job.image.clone(),
                services: job
                    .services
                    .iter()
                    .map(|s| Service { image: s.image.clone(), alias: s.alias.clone(), command: s.command.clone() })
                    .collect(),
                variables: job
                    .variables
                    .iter()
                    .map(|v| Variable {
                        key: v.key.clone(),
                        value: (v.public || secrets).then(|| v.value.clone()),
                        masked: v.masked,
                        public: v.public,
                        file: v.file,
                    })
                    .collect(),
                stages: job.stages.iter().map(|s| s.name.clone()).collect(),
            },
            runner_config,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::variables::{Definition, Variables};

    #[test]
    fn derived_secrets_are_hidden_without_the_grant() {
        let mut vars = Variables::new();
        vars.set("A", Definition { masked: true, ..Definition::expanded("topsecret") });
        vars.set("B", Definition::expanded("prefix-$A"));
        vars.set("C", Definition::expanded("plain"));
        let job = job::Job {
            id: 1,
            name: "t".into(),
            image: Image::default(),
            services: vec![],
            variables: vars.resolve(1 << 20).unwrap(),
            stages: vec![],
            timeout: None,
        };
        let hidden = Context::for_plugin(&job, serde_json::Value::Null, false);
        assert_eq!(hidden.job.variable("A"), None);
        assert_eq!(hidden.job.variable("B"), None);
        assert_eq!(hidden.job.variable("C"), Some("plain"));
        let b = hidden.job.variables.iter().find(|v| v.key == "B").unwrap();
        assert!(b.masked && !b.public);
        let granted = Context::for_plugin(&job, serde_json::Value::Null, true);
        assert_eq!(granted.job.variable("B"), Some("prefix-topsecret"));
    }
}
