//! The steps every job source ends with (a YAML file or GitLab's payload), under the same limits
//! and the same secrecy rule, so the two cannot drift apart.

use std::path::Path;

use super::Variable;
use super::parse::JobError;
use crate::input::{Located, limits, show_bytes};
use keel_contract::variables::{self, Variables, expand_tracked};

/// The job's variables resolved (expanded, each with the secrecy it inherits), after the counts
/// that multiply into every container are checked: variables and `services`.
pub fn variables(vars: &Variables, services: usize, path: &Path) -> Result<Vec<Variable>, JobError> {
    let invalid = |key: &str, message: String| JobError::Invalid { at: Located::key(path, key.to_string()), message };
    // Every variable reaches every container's env: counts multiply, so they are capped.
    if vars.len() > limits::VARIABLES {
        return Err(invalid(
            "variables",
            format!(
                "{} variables (with predefined and runner ones), over the limit of {}",
                vars.len(),
                limits::VARIABLES
            ),
        ));
    }
    if services > limits::SERVICES {
        return Err(invalid("services", format!("{services} services, over the limit of {}", limits::SERVICES)));
    }
    // All expanded values together must fit in one Kubernetes object: they all land in the pod.
    vars.resolve(limits::OBJECT_BYTES).map_err(|over| {
        invalid(
            &format!("variables.{}", over.key),
            format!(
                "the job's variables expand to more than {} together (the largest object Kubernetes stores)",
                show_bytes(limits::OBJECT_BYTES)
            ),
        )
    })
}

/// `text` with the job's variables expanded, for a Pod field (`key`) anyone who may read the pod
/// sees: a value that is not public must not reach one, so using one fails naming the field and
/// the variable, never the value. `what` names the field in the size error.
pub fn public_field(
    text: &str,
    key: &str,
    what: &str,
    variables: &[Variable],
    path: &Path,
) -> Result<String, JobError> {
    let expanded =
        expand_tracked(text, &|k| variables::source_in(variables, k), limits::OBJECT_BYTES).map_err(|_| {
            JobError::Invalid {
                at: Located::key(path, key.to_string()),
                message: format!("{what} expands to more than {}", show_bytes(limits::OBJECT_BYTES)),
            }
        })?;
    match expanded.secret_sources.first() {
        Some(variable) => Err(JobError::SecretInPodField {
            path: path.to_path_buf(),
            field: key.to_string(),
            variable: variable.clone(),
        }),
        None => Ok(expanded.value),
    }
}
