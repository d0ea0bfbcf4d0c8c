//! What every role call can see about the job.

use serde::de::DeserializeOwned;

use crate::bindings::keel::plugin::types as wit;
use crate::{Error, PullPolicy};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Image {
    pub name: String,
    pub entrypoint: Vec<String>,
    pub pull_policies: Vec<PullPolicy>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Service {
    pub image: Image,
    pub alias: Option<String>,
    pub command: Vec<String>,
}

/// A CI variable. `value` is `None` for a non-public variable unless the operator granted
/// this plugin `secrets`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Variable {
    pub key: String,
    pub value: Option<String>,
    pub masked: bool,
    pub public: bool,
    pub file: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Job {
    pub id: u64,
    pub name: String,
    pub image: Image,
    pub services: Vec<Service>,
    pub variables: Vec<Variable>,
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

impl Context {
    /// Deserialize the runner config (or the part of it you care about) into your own type.
    pub fn runner_config<T: DeserializeOwned>(&self) -> Result<T, Error> {
        let value = if self.runner_config.is_null() {
            serde_json::Value::Object(Default::default())
        } else {
            self.runner_config.clone()
        };
        T::deserialize(value).map_err(|e| Error::invalid_config(format!("[runners.kubernetes]: {e}")))
    }

    pub(crate) fn from_wit(ctx: wit::Context) -> Result<Self, Error> {
        let runner_config = if ctx.runner_config.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&ctx.runner_config)
                .map_err(|e| Error::internal(format!("host sent a runner config that is not JSON: {e}")))?
        };
        let image = |i: wit::Image| Image { name: i.name, entrypoint: i.entrypoint, pull_policies: i.pull_policies };
        Ok(Context {
            job: Job {
                id: ctx.job.id,
                name: ctx.job.name,
                image: image(ctx.job.image),
                services: ctx
                    .job
                    .services
                    .into_iter()
                    .map(|s| Service { image: image(s.image), alias: s.alias, command: s.command })
                    .collect(),
                variables: ctx
                    .job
                    .variables
                    .into_iter()
                    .map(|v| Variable { key: v.key, value: v.value, masked: v.masked, public: v.public, file: v.file })
                    .collect(),
                stages: ctx.job.stages,
            },
            runner_config,
        })
    }
}
