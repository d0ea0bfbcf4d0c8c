//! `overwrites`: GitLab's rules for `KUBERNETES_*_OVERWRITE*` job variables, driven by the
//! runner's `[runners.kubernetes]` table.
//!
//! - `namespace_overwrite_allowed`, `service_account_overwrite_allowed`: regexes the whole
//!   value must match (we anchor them; GitLab does not, which lets `ci` allow `not-ci-at-all`).
//! - `pod_labels_overwrite_allowed`, `pod_annotations_overwrite_allowed`,
//!   `node_selector_overwrite_allowed`, `node_tolerations_overwrite_allowed`: regexes matched
//!   against `key=value`.
//! - `bearer_token_overwrite_allowed`: a bool.
//! - `[helper_|service_](cpu|memory|ephemeral_storage)_(limit|request)_overwrite_max_allowed`:
//!   upper bounds, compared as Kubernetes quantities (`500m` < `1`, `1Gi` > `1000Mi`).
//!
//! An empty or absent regex / bound disables that overwrite. Any requested overwrite that is
//! not allowed denies the job with a message naming the variable, the value and the rule:
//! running a job somewhere its author did not intend is worse than failing it.

use std::collections::BTreeMap;

use keel_sdk::{Config, Context, Error, OverwriteRules, Overwrites, Plugin, Resources};
use regex::Regex;

use keel_sdk::quantity::Quantity;

/// The `[runners.kubernetes]` keys this plugin reads (the table has many more; ignored here).
#[derive(Debug, Default, serde::Deserialize)]
pub struct RunnerRules {
    #[serde(default)]
    pub namespace_overwrite_allowed: Option<String>,
    #[serde(default)]
    pub service_account_overwrite_allowed: Option<String>,
    #[serde(default)]
    pub bearer_token_overwrite_allowed: Option<bool>,
    #[serde(default)]
    pub pod_labels_overwrite_allowed: Option<String>,
    #[serde(default)]
    pub pod_annotations_overwrite_allowed: Option<String>,
    #[serde(default)]
    pub node_selector_overwrite_allowed: Option<String>,
    #[serde(default)]
    pub node_tolerations_overwrite_allowed: Option<String>,
    /// Every `*_overwrite_max_allowed` key, by name.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

pub struct OverwritesPlugin;

impl Plugin for OverwritesPlugin {
    const NAME: &'static str = "overwrites";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(config: Config) -> Result<Self, Error> {
        match config.as_json() {
            serde_json::Value::Object(map) if map.is_empty() => Ok(OverwritesPlugin),
            serde_json::Value::Null => Ok(OverwritesPlugin),
            other => Err(Error::invalid_config(format!(
                "overwrites takes no settings of its own (the rules are the *_overwrite_allowed keys of [runners.kubernetes]), got {other}"
            ))),
        }
    }
}

/// An anchored regex from a config key; `None` when absent or empty (= overwrite disabled).
fn rule(key: &str, pattern: &Option<String>) -> Result<Option<Regex>, Error> {
    match pattern.as_deref() {
        None | Some("") => Ok(None),
        Some(p) => Regex::new(&format!("^(?:{p})$")).map(Some).map_err(|e| {
            Error::invalid_config(format!("[runners.kubernetes] {key} = {p:?} is not a valid regex: {e}"))
        }),
    }
}

fn check_value(variable: &str, value: &str, key: &str, pattern: &Option<String>) -> Result<(), Error> {
    match rule(key, pattern)? {
        None => {
            Err(Error::denied(format!("{variable}={value:?} is not allowed: overwrite disabled ({key} is not set)")))
        }
        Some(re) if re.is_match(value) => Ok(()),
        Some(_) => Err(Error::denied(format!(
            "{variable}={value:?} is not allowed: does not match {key} = {:?}",
            pattern.as_deref().unwrap_or("")
        ))),
    }
}

fn check_map(prefix: &str, map: &BTreeMap<String, String>, key: &str, pattern: &Option<String>) -> Result<(), Error> {
    for (k, v) in map {
        let pair = format!("{k}={v}");
        match rule(key, pattern)? {
            None => {
                return Err(Error::denied(format!(
                    "{prefix} {pair:?} is not allowed: overwrite disabled ({key} is not set)"
                )));
            }
            Some(re) if re.is_match(&pair) => {}
            Some(_) => {
                return Err(Error::denied(format!(
                    "{prefix} {pair:?} is not allowed: does not match {key} = {:?}",
                    pattern.as_deref().unwrap_or("")
                )));
            }
        }
    }
    Ok(())
}

/// `(class prefix in config keys, class prefix in variable names)`.
const CLASSES: [(&str, &str); 3] = [("", ""), ("helper_", "HELPER_"), ("service_", "SERVICE_")];

fn check_resources(rules: &RunnerRules, class: usize, requested: &Resources) -> Result<(), Error> {
    let (key_prefix, var_prefix) = CLASSES[class];
    let fields: [(&str, &Option<String>); 6] = [
        ("cpu_limit", &requested.cpu_limit),
        ("cpu_request", &requested.cpu_request),
        ("memory_limit", &requested.memory_limit),
        ("memory_request", &requested.memory_request),
        ("ephemeral_storage_limit", &requested.ephemeral_storage_limit),
        ("ephemeral_storage_request", &requested.ephemeral_storage_request),
    ];
    for (field, value) in fields {
        let Some(value) = value else { continue };
        let variable = format!("KUBERNETES_{var_prefix}{}", field.to_ascii_uppercase());
        let key = format!("{key_prefix}{field}_overwrite_max_allowed");
        let max = match rules.other.get(&key) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) if s.is_empty() => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            Some(other) => {
                return Err(Error::invalid_config(format!("[runners.kubernetes] {key} = {other} is not a quantity")));
            }
        };
        let Some(max) = max else {
            return Err(Error::denied(format!(
                "{variable}={value:?} is not allowed: overwrite disabled ({key} is not set)"
            )));
        };
        let max_q = Quantity::parse(&max)
            .map_err(|e| Error::invalid_config(format!("[runners.kubernetes] {key} = {max:?}: {e}")))?;
        let want = Quantity::parse(value)
            .map_err(|e| Error::denied(format!("{variable}={value:?} is not a valid quantity: {e}")))?;
        if want > max_q {
            return Err(Error::denied(format!("{variable}={value:?} is not allowed: exceeds {key} = {max:?}")));
        }
    }
    Ok(())
}

/// The decision, independent of the plugin plumbing: accepted overwrites, or the first denial.
pub fn review(rules: &RunnerRules, requested: Overwrites) -> Result<Overwrites, Error> {
    if let Some(ns) = &requested.namespace {
        check_value(
            "KUBERNETES_NAMESPACE_OVERWRITE",
            ns,
            "namespace_overwrite_allowed",
            &rules.namespace_overwrite_allowed,
        )?;
    }
    if let Some(sa) = &requested.service_account {
        check_value(
            "KUBERNETES_SERVICE_ACCOUNT_OVERWRITE",
            sa,
            "service_account_overwrite_allowed",
            &rules.service_account_overwrite_allowed,
        )?;
    }
    if requested.bearer_token.is_some() && rules.bearer_token_overwrite_allowed != Some(true) {
        // The token itself is a secret: never echo it.
        return Err(Error::denied(
            "KUBERNETES_BEARER_TOKEN is not allowed: bearer_token_overwrite_allowed is not true".to_string(),
        ));
    }
    check_map(
        "KUBERNETES_POD_LABELS_*",
        &requested.pod_labels,
        "pod_labels_overwrite_allowed",
        &rules.pod_labels_overwrite_allowed,
    )?;
    check_map(
        "KUBERNETES_POD_ANNOTATIONS_*",
        &requested.pod_annotations,
        "pod_annotations_overwrite_allowed",
        &rules.pod_annotations_overwrite_allowed,
    )?;
    check_map(
        "KUBERNETES_NODE_SELECTOR_*",
        &requested.node_selector,
        "node_selector_overwrite_allowed",
        &rules.node_selector_overwrite_allowed,
    )?;
    check_map(
        "KUBERNETES_NODE_TOLERATIONS_*",
        &requested.node_tolerations,
        "node_tolerations_overwrite_allowed",
        &rules.node_tolerations_overwrite_allowed,
    )?;
    check_resources(rules, 0, &requested.build)?;
    check_resources(rules, 1, &requested.helper)?;
    check_resources(rules, 2, &requested.service)?;
    // Everything requested passed its rule, so everything requested is accepted.
    Ok(requested)
}

impl OverwriteRules for OverwritesPlugin {
    fn review(&mut self, ctx: &Context, requested: Overwrites) -> Result<Overwrites, Error> {
        let rules: RunnerRules = ctx.runner_config()?;
        review(&rules, requested)
    }
}

keel_sdk::export!(OverwritesPlugin: OverwriteRules);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(v: serde_json::Value) -> RunnerRules {
        serde_json::from_value(v).unwrap()
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn table() {
        let cfg = json!({
            "namespace_overwrite_allowed": "ci-.*",
            "service_account_overwrite_allowed": "",
            "bearer_token_overwrite_allowed": false,
            "pod_labels_overwrite_allowed": "team=.*|tier=(dev|test)",
            "node_selector_overwrite_allowed": "kubernetes.io/arch=(amd64|arm64)",
            "node_tolerations_overwrite_allowed": "gpu=.*",
            "cpu_limit_overwrite_max_allowed": "2",
            "memory_request_overwrite_max_allowed": "1Gi",
            "helper_memory_limit_overwrite_max_allowed": "512Mi",
            "service_cpu_request_overwrite_max_allowed": "500m",
            "privileged": true,
        });
        let r = rules(cfg);
        type Row = (&'static str, Overwrites, Result<(), &'static str>);
        let rows: Vec<Row> = vec![
            ("nothing requested", Overwrites::default(), Ok(())),
            ("namespace matches", Overwrites { namespace: Some("ci-team".into()), ..Default::default() }, Ok(())),
            (
                "namespace anchored",
                Overwrites { namespace: Some("prod-ci-x".into()), ..Default::default() },
                Err(
                    "KUBERNETES_NAMESPACE_OVERWRITE=\"prod-ci-x\" is not allowed: does not match namespace_overwrite_allowed = \"ci-.*\"",
                ),
            ),
            (
                "empty regex disables",
                Overwrites { service_account: Some("admin".into()), ..Default::default() },
                Err(
                    "KUBERNETES_SERVICE_ACCOUNT_OVERWRITE=\"admin\" is not allowed: overwrite disabled (service_account_overwrite_allowed is not set)",
                ),
            ),
            (
                "bearer token refused without echoing it",
                Overwrites { bearer_token: Some("s3cr3t".into()), ..Default::default() },
                Err("KUBERNETES_BEARER_TOKEN is not allowed: bearer_token_overwrite_allowed is not true"),
            ),
            (
                "labels key=value allowed",
                Overwrites { pod_labels: map(&[("team", "a"), ("tier", "dev")]), ..Default::default() },
                Ok(()),
            ),
            (
                "label value not allowed",
                Overwrites { pod_labels: map(&[("tier", "prod")]), ..Default::default() },
                Err(
                    "KUBERNETES_POD_LABELS_* \"tier=prod\" is not allowed: does not match pod_labels_overwrite_allowed",
                ),
            ),
            (
                "annotations absent regex disables",
                Overwrites { pod_annotations: map(&[("a", "b")]), ..Default::default() },
                Err("overwrite disabled (pod_annotations_overwrite_allowed is not set)"),
            ),
            (
                "node selector allowed",
                Overwrites { node_selector: map(&[("kubernetes.io/arch", "arm64")]), ..Default::default() },
                Ok(()),
            ),
            (
                "toleration allowed",
                Overwrites { node_tolerations: map(&[("gpu", "true:NoSchedule")]), ..Default::default() },
                Ok(()),
            ),
            (
                "toleration key not allowed",
                Overwrites { node_tolerations: map(&[("spot", "NoSchedule")]), ..Default::default() },
                Err("\"spot=NoSchedule\" is not allowed"),
            ),
            (
                "cpu limit 500m under 2",
                Overwrites {
                    build: Resources { cpu_limit: Some("500m".into()), ..Default::default() },
                    ..Default::default()
                },
                Ok(()),
            ),
            (
                "cpu limit equal to max",
                Overwrites {
                    build: Resources { cpu_limit: Some("2000m".into()), ..Default::default() },
                    ..Default::default()
                },
                Ok(()),
            ),
            (
                "cpu limit over max",
                Overwrites {
                    build: Resources { cpu_limit: Some("2.5".into()), ..Default::default() },
                    ..Default::default()
                },
                Err("KUBERNETES_CPU_LIMIT=\"2.5\" is not allowed: exceeds cpu_limit_overwrite_max_allowed = \"2\""),
            ),
            (
                "memory 1000Mi under 1Gi",
                Overwrites {
                    build: Resources { memory_request: Some("1000Mi".into()), ..Default::default() },
                    ..Default::default()
                },
                Ok(()),
            ),
            (
                "memory 1.1G over 1Gi",
                Overwrites {
                    build: Resources { memory_request: Some("1.1G".into()), ..Default::default() },
                    ..Default::default()
                },
                Err("exceeds memory_request_overwrite_max_allowed = \"1Gi\""),
            ),
            (
                "no bound disables",
                Overwrites {
                    build: Resources { memory_limit: Some("1Mi".into()), ..Default::default() },
                    ..Default::default()
                },
                Err(
                    "KUBERNETES_MEMORY_LIMIT=\"1Mi\" is not allowed: overwrite disabled (memory_limit_overwrite_max_allowed is not set)",
                ),
            ),
            (
                "helper bound",
                Overwrites {
                    helper: Resources { memory_limit: Some("1Gi".into()), ..Default::default() },
                    ..Default::default()
                },
                Err(
                    "KUBERNETES_HELPER_MEMORY_LIMIT=\"1Gi\" is not allowed: exceeds helper_memory_limit_overwrite_max_allowed = \"512Mi\"",
                ),
            ),
            (
                "service bound ok",
                Overwrites {
                    service: Resources { cpu_request: Some("0.5".into()), ..Default::default() },
                    ..Default::default()
                },
                Ok(()),
            ),
            (
                "garbage quantity",
                Overwrites {
                    service: Resources { cpu_request: Some("lots".into()), ..Default::default() },
                    ..Default::default()
                },
                Err("KUBERNETES_SERVICE_CPU_REQUEST=\"lots\" is not a valid quantity"),
            ),
        ];
        for (what, requested, want) in rows {
            match (review(&r, requested.clone()), want) {
                (Ok(accepted), Ok(())) => assert_eq!(accepted, requested, "{what}: accepted = requested"),
                (Err(Error::Denied(msg)), Err(want)) => assert!(msg.contains(want), "{what}: {msg}"),
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn bad_regex_is_a_config_error_naming_the_key() {
        let r = rules(json!({"namespace_overwrite_allowed": "ci-("}));
        let err = review(&r, Overwrites { namespace: Some("ci-x".into()), ..Default::default() }).unwrap_err();
        assert!(matches!(&err, Error::InvalidConfig(m) if m.contains("namespace_overwrite_allowed")), "{err:?}");
    }
}
