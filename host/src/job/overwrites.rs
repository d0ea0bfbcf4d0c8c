//! The overwrites a job requests through GitLab's `KUBERNETES_*` variables.
//!
//! This only reads what is asked for; whether it is allowed is decided by the overwrite-rule
//! plugins (`*_overwrite_allowed`, `*_overwrite_max_allowed` in the runner config).

use super::{Job, Overwrites, Resources};
use keel_contract::quantity::is_quantity;

#[derive(Debug, thiserror::Error)]
pub enum OverwriteError {
    #[error("variable {variable}: expected `key=value`, got {value:?}")]
    NotKeyValue { variable: String, value: String },
    #[error("variable {variable}: {value:?} is not a Kubernetes quantity (examples: \"500m\", \"1Gi\")")]
    NotQuantity { variable: String, value: String },
    #[error("variable {variable}: toleration {value:?} has an empty key")]
    EmptyTolerationKey { variable: String, value: String },
    #[error(
        "variable {variable} is masked or a credential (or built from one): as an overwrite its value would be \
         readable in the Pod object"
    )]
    NotPublic { variable: String },
}

/// Whether `KUBERNETES_<name>` is an overwrite whose value goes into the Pod object.
fn lands_in_pod(name: &str) -> bool {
    matches!(name, "NAMESPACE_OVERWRITE" | "SERVICE_ACCOUNT_OVERWRITE")
        || ["POD_LABELS_", "POD_ANNOTATIONS_", "NODE_SELECTOR_", "NODE_TOLERATIONS_"]
            .iter()
            .any(|p| name.starts_with(p))
        || resource_slot(&mut Overwrites::default(), name).is_some()
}

/// The resource fields a `KUBERNETES_<CLASS>_<RESOURCE>` variable can set.
fn resource_slot<'a>(o: &'a mut Overwrites, name: &str) -> Option<&'a mut Option<String>> {
    let (class, rest): (&mut Resources, &str) = if let Some(r) = name.strip_prefix("HELPER_") {
        (&mut o.helper, r)
    } else if let Some(r) = name.strip_prefix("SERVICE_") {
        (&mut o.service, r)
    } else {
        (&mut o.build, name)
    };
    Some(match rest {
        "CPU_LIMIT" => &mut class.cpu_limit,
        "CPU_REQUEST" => &mut class.cpu_request,
        "MEMORY_LIMIT" => &mut class.memory_limit,
        "MEMORY_REQUEST" => &mut class.memory_request,
        "EPHEMERAL_STORAGE_LIMIT" => &mut class.ephemeral_storage_limit,
        "EPHEMERAL_STORAGE_REQUEST" => &mut class.ephemeral_storage_request,
        _ => return None,
    })
}

fn key_value(variable: &str, value: &str) -> Result<(String, String), OverwriteError> {
    match value.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(OverwriteError::NotKeyValue { variable: variable.to_string(), value: value.to_string() }),
    }
}

/// Parse one toleration as GitLab writes it (`key=value:Effect`, `key:Effect`, `key`) into
/// our `key -> "value:effect" | "effect"` form (see [`Overwrites::node_tolerations`]).
pub fn parse_toleration(variable: &str, spec: &str) -> Result<(String, String), OverwriteError> {
    let spec = spec.trim();
    // The effect is after the last ':' — keys may contain '/', never ':'.
    let (key_part, effect) = match spec.rsplit_once(':') {
        Some((k, e)) => (k, e),
        None => (spec, ""),
    };
    let (key, value) = match key_part.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (key_part, None),
    };
    if key.is_empty() {
        return Err(OverwriteError::EmptyTolerationKey { variable: variable.to_string(), value: spec.to_string() });
    }
    Ok(match value {
        Some(v) => (key.to_string(), format!("{v}:{effect}")),
        None => (key.to_string(), effect.to_string()),
    })
}

/// What the job's `KUBERNETES_*` variables ask to change. Later definitions win, as they do for
/// every variable.
pub fn requested(job: &Job) -> Result<Overwrites, OverwriteError> {
    let mut o = Overwrites::default();
    // The winning (last) value of each key, found once: a lookup per key (`variable()`)
    // made 200,000 variables take quadratic time.
    let mut winning: std::collections::HashMap<&str, &crate::job::Variable> = std::collections::HashMap::new();
    for var in &job.variables {
        winning.insert(var.key.as_str(), var);
    }
    // One pass over unique keys in definition order.
    let mut seen = std::collections::HashSet::new();
    for var in &job.variables {
        if !seen.insert(var.key.as_str()) {
            continue;
        }
        let key = var.key.as_str();
        let winner = winning[key];
        let value = winner.value.as_str();
        let Some(name) = key.strip_prefix("KUBERNETES_") else { continue };
        // Everything but the bearer token (the API client's credential) lands in the Pod
        // object, where anyone who may read pods sees it.
        if !winner.public && name != "BEARER_TOKEN" && lands_in_pod(name) {
            return Err(OverwriteError::NotPublic { variable: key.to_string() });
        }
        match name {
            "NAMESPACE_OVERWRITE" => o.namespace = Some(value.to_string()).filter(|v| !v.is_empty()),
            "SERVICE_ACCOUNT_OVERWRITE" => o.service_account = Some(value.to_string()).filter(|v| !v.is_empty()),
            "BEARER_TOKEN" => o.bearer_token = Some(value.to_string()).filter(|v| !v.is_empty()),
            _ if name.starts_with("POD_LABELS_") => {
                let (k, v) = key_value(key, value)?;
                o.pod_labels.insert(k, v);
            }
            _ if name.starts_with("POD_ANNOTATIONS_") => {
                let (k, v) = key_value(key, value)?;
                o.pod_annotations.insert(k, v);
            }
            _ if name.starts_with("NODE_SELECTOR_") => {
                let (k, v) = key_value(key, value)?;
                o.node_selector.insert(k, v);
            }
            _ if name.starts_with("NODE_TOLERATIONS_") => {
                let (k, v) = parse_toleration(key, value)?;
                o.node_tolerations.insert(k, v);
            }
            _ => {
                if let Some(slot) = resource_slot(&mut o, name) {
                    if !is_quantity(value) {
                        return Err(OverwriteError::NotQuantity {
                            variable: key.to_string(),
                            value: value.to_string(),
                        });
                    }
                    *slot = Some(value.to_string());
                }
            }
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Variable;

    fn job(vars: &[(&str, &str)]) -> Job {
        Job {
            id: 1,
            name: "t".into(),
            image: Default::default(),
            services: vec![],
            variables: vars
                .iter()
                .map(|(k, v)| Variable {
                    key: k.to_string(),
                    value: v.to_string(),
                    masked: false,
                    public: true,
                    file: false,
                })
                .collect(),
            stages: vec![],
            timeout: None,
        }
    }

    #[test]
    fn table_of_requests() {
        let o = requested(&job(&[
            ("KUBERNETES_NAMESPACE_OVERWRITE", "ci-main"),
            ("KUBERNETES_SERVICE_ACCOUNT_OVERWRITE", "builder"),
            ("KUBERNETES_BEARER_TOKEN", "tok"),
            ("KUBERNETES_POD_LABELS_1", "team=infra"),
            ("KUBERNETES_POD_ANNOTATIONS_x", "a.b/c = d=e"),
            ("KUBERNETES_NODE_SELECTOR_ARCH", "kubernetes.io/arch=amd64"),
            ("KUBERNETES_NODE_TOLERATIONS_1", "node-role.kubernetes.io/master:NoSchedule"),
            ("KUBERNETES_NODE_TOLERATIONS_2", "custom=value:NoExecute"),
            ("KUBERNETES_NODE_TOLERATIONS_3", "empty=:PreferNoSchedule"),
            ("KUBERNETES_NODE_TOLERATIONS_4", "onlykey"),
            ("KUBERNETES_CPU_LIMIT", "2"),
            ("KUBERNETES_MEMORY_REQUEST", "1Gi"),
            ("KUBERNETES_EPHEMERAL_STORAGE_LIMIT", "5Gi"),
            ("KUBERNETES_HELPER_CPU_REQUEST", "100m"),
            ("KUBERNETES_SERVICE_MEMORY_LIMIT", "256Mi"),
            ("KUBERNETES_CPU_LIMIT", "3"),
            ("UNRELATED", "x"),
        ]))
        .unwrap();
        assert_eq!(o.namespace.as_deref(), Some("ci-main"));
        assert_eq!(o.service_account.as_deref(), Some("builder"));
        assert_eq!(o.bearer_token.as_deref(), Some("tok"));
        assert_eq!(o.pod_labels["team"], "infra");
        assert_eq!(o.pod_annotations["a.b/c"], "d=e");
        assert_eq!(o.node_selector["kubernetes.io/arch"], "amd64");
        assert_eq!(o.node_tolerations["node-role.kubernetes.io/master"], "NoSchedule");
        assert_eq!(o.node_tolerations["custom"], "value:NoExecute");
        assert_eq!(o.node_tolerations["empty"], ":PreferNoSchedule");
        assert_eq!(o.node_tolerations["onlykey"], "");
        assert_eq!(o.build.cpu_limit.as_deref(), Some("3"), "last definition wins");
        assert_eq!(o.build.memory_request.as_deref(), Some("1Gi"));
        assert_eq!(o.build.ephemeral_storage_limit.as_deref(), Some("5Gi"));
        assert_eq!(o.helper.cpu_request.as_deref(), Some("100m"));
        assert_eq!(o.service.memory_limit.as_deref(), Some("256Mi"));
    }

    #[test]
    fn bad_requests_name_the_variable() {
        let e = requested(&job(&[("KUBERNETES_POD_LABELS_1", "novalue")])).unwrap_err();
        assert_eq!(e.to_string(), "variable KUBERNETES_POD_LABELS_1: expected `key=value`, got \"novalue\"");
        let e = requested(&job(&[("KUBERNETES_MEMORY_LIMIT", "lots")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "variable KUBERNETES_MEMORY_LIMIT: \"lots\" is not a Kubernetes quantity (examples: \"500m\", \"1Gi\")"
        );
    }

    #[test]
    fn empty_namespace_is_no_request() {
        let o = requested(&job(&[("KUBERNETES_NAMESPACE_OVERWRITE", "")])).unwrap();
        assert_eq!(o, Overwrites::default());
    }
}
