//! `pull-policy`: GitLab's image pull policy rules.
//!
//! Inputs (the host parses them from config and job): the job's `image:pull_policy`, the
//! runner's `pull_policy` (a string or an ordered list) and `allowed_pull_policies`. The rule
//! is GitLab's, as `keel_sdk::pull_policy::decide` has it (the host applies the same one when
//! no plugin decides); the rule, with its one deliberate departure from GitLab, is documented
//! there.

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

impl PullPolicyRules for PullPolicies {
    fn decide(&mut self, _ctx: &Context, request: &PullPolicyRequest) -> Result<Vec<PullPolicy>, Error> {
        keel_sdk::pull_policy::decide(request).map_err(|e| Error::denied(e.to_string()))
    }
}

keel_sdk::export!(PullPolicies: PullPolicyRules);

#[cfg(test)]
mod tests {
    use super::*;
    use PullPolicy::{Always as A, IfNotPresent as I, Never as N};

    #[test]
    fn decides_with_gitlabs_rule_and_denies_naming_both_lists() {
        let mut p = PullPolicies;
        let ctx = keel_sdk::testing::context(serde_json::Value::Null);
        let request =
            PullPolicyRequest { image: "alpine".into(), job: vec![A, A, I], config: vec![N], allowed: vec![] };
        assert_eq!(keel_sdk::testing::decide(&mut p, &ctx, &request), Ok(vec![A, I]));
        let request = PullPolicyRequest { image: "alpine".into(), job: vec![N], config: vec![], allowed: vec![A, I] };
        assert_eq!(
            keel_sdk::testing::decide(&mut p, &ctx, &request),
            Err(Error::denied(
                "image alpine: the job's image:pull_policy [never] is not one of allowed_pull_policies [always, if-not-present]"
            ))
        );
    }

    #[test]
    fn own_settings_are_rejected() {
        assert!(matches!(
            PullPolicies::configure(Config::from_value(serde_json::json!({"pull_policy": "always"}))),
            Err(Error::InvalidConfig(_))
        ));
    }
}
