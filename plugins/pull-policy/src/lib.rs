//! `pull-policy`: GitLab's image pull policy rules.
//!
//! Inputs (the host parses them from config and job): the job's `image:pull_policy`, the
//! runner's `pull_policy` (a string or an ordered list) and `allowed_pull_policies`.
//!
//! - The requested list is the job's when it sets one, else the runner's.
//! - With no allow-list, the requested list is the answer (empty = the cluster's default).
//! - With an allow-list, the answer is requested ∩ allowed, in requested order; when nothing
//!   remains the job is denied, naming both lists (GitLab fails such jobs too).
//! - Foot-gun: an allow-list but no `pull_policy` anywhere. GitLab then checks its implicit
//!   default against the list and fails jobs the operator meant to allow. We instead use the
//!   allow-list itself, in its order: the operator said which policies are acceptable, so
//!   trying them in that order is the least surprising reading.

use keel_sdk::{Config, Context, Error, Plugin, PullPolicy, PullPolicyRequest, PullPolicyRules};

pub struct PullPolicies;

impl Plugin for PullPolicies {
    const NAME: &'static str = "pull-policy";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(config: Config) -> Result<Self, Error> {
        // Everything comes from the runner config; an own table would only be a second place
        // to configure the same thing.
        match config.as_json() {
            serde_json::Value::Object(map) if map.is_empty() => Ok(PullPolicies),
            serde_json::Value::Null => Ok(PullPolicies),
            other => Err(Error::invalid_config(format!(
                "pull-policy takes no settings of its own (use pull_policy / allowed_pull_policies in [runners.kubernetes]), got {other}"
            ))),
        }
    }
}

fn name(p: PullPolicy) -> &'static str {
    match p {
        PullPolicy::Always => "always",
        PullPolicy::IfNotPresent => "if-not-present",
        PullPolicy::Never => "never",
    }
}

fn list(ps: &[PullPolicy]) -> String {
    format!("[{}]", ps.iter().map(|p| name(*p)).collect::<Vec<_>>().join(", "))
}

/// The decision, independent of the plugin plumbing.
pub fn decide(request: &PullPolicyRequest) -> Result<Vec<PullPolicy>, Error> {
    let (requested, source) = if !request.job.is_empty() {
        (&request.job, "the job's image:pull_policy")
    } else {
        (&request.config, "the runner's pull_policy")
    };
    if request.allowed.is_empty() {
        return Ok(dedup(requested));
    }
    if requested.is_empty() {
        return Ok(dedup(&request.allowed));
    }
    let kept: Vec<PullPolicy> = dedup(requested).into_iter().filter(|p| request.allowed.contains(p)).collect();
    if kept.is_empty() {
        return Err(Error::denied(format!(
            "image {}: {source} {} is not one of allowed_pull_policies {}",
            request.image,
            list(requested),
            list(&request.allowed)
        )));
    }
    Ok(kept)
}

fn dedup(ps: &[PullPolicy]) -> Vec<PullPolicy> {
    let mut out = Vec::new();
    for p in ps {
        if !out.contains(p) {
            out.push(*p);
        }
    }
    out
}

impl PullPolicyRules for PullPolicies {
    fn decide(&mut self, _ctx: &Context, request: &PullPolicyRequest) -> Result<Vec<PullPolicy>, Error> {
        decide(request)
    }
}

keel_sdk::export!(PullPolicies: PullPolicyRules);

#[cfg(test)]
mod tests {
    use super::*;
    use PullPolicy::{Always as A, IfNotPresent as I, Never as N};

    #[test]
    fn table() {
        type Row =
            (&'static str, Vec<PullPolicy>, Vec<PullPolicy>, Vec<PullPolicy>, Result<Vec<PullPolicy>, &'static str>);
        let rows: Vec<Row> = vec![
            ("nothing set: cluster default", vec![], vec![], vec![], Ok(vec![])),
            ("runner policy only", vec![], vec![A], vec![], Ok(vec![A])),
            ("runner list keeps order", vec![], vec![A, I], vec![], Ok(vec![A, I])),
            ("job wins over runner", vec![N], vec![A], vec![], Ok(vec![N])),
            ("job wins when allowed", vec![I], vec![A], vec![A, I], Ok(vec![I])),
            (
                "job not allowed: denied",
                vec![N],
                vec![A],
                vec![A, I],
                Err("the job's image:pull_policy [never] is not one of allowed_pull_policies [always, if-not-present]"),
            ),
            ("runner list narrowed by allow-list", vec![], vec![A, I, N], vec![N, I], Ok(vec![I, N])),
            (
                "runner policy not allowed",
                vec![],
                vec![A],
                vec![I],
                Err("the runner's pull_policy [always] is not one of allowed_pull_policies [if-not-present]"),
            ),
            ("foot-gun: allow-list only uses it", vec![], vec![], vec![I, A], Ok(vec![I, A])),
            ("duplicates collapse", vec![A, A, I], vec![], vec![], Ok(vec![A, I])),
        ];
        for (what, job, config, allowed, want) in rows {
            let got = decide(&PullPolicyRequest { image: "alpine".into(), job, config, allowed });
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{what}"),
                (Err(Error::Denied(msg)), Err(want)) => assert!(msg.contains(want), "{what}: {msg}"),
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn own_settings_are_rejected() {
        assert!(matches!(
            PullPolicies::configure(Config::from_value(serde_json::json!({"pull_policy": "always"}))),
            Err(Error::InvalidConfig(_))
        ));
    }
}
