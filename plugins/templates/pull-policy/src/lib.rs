//! `template-pull-policy`: keel pull-policy rules. Every image gets the configured policy, except where
//! the job asks for one the configuration allows.

use keel_sdk::{Config, Context, Error, Plugin, PullPolicy, PullPolicyRequest, PullPolicyRules};

/// The plugin's settings: its table in the runner config, or `--plugin P.wasm=CONFIG`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Required: `always`, `if-not-present` or `never`.
    policy: String,
    /// Let the job's own `image:pull_policy` win when it is one of these.
    #[serde(default)]
    job_may_choose: Vec<String>,
}

fn parse(policy: &str) -> Result<PullPolicy, Error> {
    PullPolicy::from_gitlab(policy)
        .ok_or_else(|| Error::invalid_config(format!("unknown pull policy {policy:?} (always, if-not-present, never)")))
}

pub struct TemplatePullPolicy {
    policy: PullPolicy,
    job_may_choose: Vec<PullPolicy>,
}

impl Plugin for TemplatePullPolicy {
    const NAME: &'static str = "template-pull-policy";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(config: Config) -> Result<Self, Error> {
        let settings: Settings = config.parse()?;
        let job_may_choose = settings.job_may_choose.iter().map(|p| parse(p)).collect::<Result<_, _>>()?;
        Ok(TemplatePullPolicy { policy: parse(&settings.policy)?, job_may_choose })
    }
}

impl PullPolicyRules for TemplatePullPolicy {
    fn decide(&mut self, _ctx: &Context, request: &PullPolicyRequest) -> Result<Vec<PullPolicy>, Error> {
        let chosen: Vec<PullPolicy> = request.job.iter().copied().filter(|p| self.job_may_choose.contains(p)).collect();
        Ok(if chosen.is_empty() { vec![self.policy] } else { chosen })
    }
}

keel_sdk::export!(TemplatePullPolicy: PullPolicyRules);

#[cfg(test)]
mod tests {
    use super::*;
    use keel_sdk::testing::{self, ContextBuilder};

    #[test]
    fn the_configured_policy_unless_the_job_may_choose() {
        let mut plugin: TemplatePullPolicy =
            testing::configure("policy = \"if-not-present\"\njob_may_choose = [\"always\"]").unwrap();
        let ctx = ContextBuilder::new().build();
        let mut request = PullPolicyRequest { image: "alpine:3.20".into(), ..Default::default() };
        assert_eq!(testing::decide(&mut plugin, &ctx, &request).unwrap(), [PullPolicy::IfNotPresent]);
        request.job = vec![PullPolicy::Always];
        assert_eq!(testing::decide(&mut plugin, &ctx, &request).unwrap(), [PullPolicy::Always]);
    }

    #[test]
    fn an_unknown_policy_is_a_config_error() {
        assert!(matches!(
            testing::configure::<TemplatePullPolicy>("policy = \"sometimes\""),
            Err(Error::InvalidConfig(_))
        ));
    }
}
