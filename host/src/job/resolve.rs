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

/// A service's own `variables` (`key` names them in errors), resolved over the job's resolved
/// ones as GitLab Runner expands them: a value built from one that is not public is not public
/// either, and reaches the service only through the variables Secret.
pub fn service_variables(job: &[Variable], own: Variables, key: &str, path: &Path) -> Result<Vec<Variable>, JobError> {
    if own.is_empty() {
        return Ok(Vec::new());
    }
    let own_keys: Vec<String> = own.keys().map(str::to_string).collect();
    let mut all = Variables::new();
    for v in job {
        // Already resolved: taken as they are, with their secrecy.
        all.set(
            v.key.clone(),
            variables::Definition {
                value: v.value.clone(),
                expand: false,
                masked: v.masked,
                public: v.public,
                file: v.file,
            },
        );
    }
    all.extend(own);
    let resolved = all.resolve(limits::OBJECT_BYTES).map_err(|over| JobError::Invalid {
        at: Located::key(path, format!("{key}.variables.{}", over.key)),
        message: format!("the service's variables expand to more than {}", show_bytes(limits::OBJECT_BYTES)),
    })?;
    Ok(resolved.into_iter().filter(|v| own_keys.contains(&v.key)).collect())
}
