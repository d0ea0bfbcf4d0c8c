//! `template-pod-mutator`: a keel pod mutator. It annotates every job pod with the owning team and adds
//! labels, keeping labels that are already there (the host owns some).

use std::collections::BTreeMap;

use keel_sdk::{Config, Context, Error, Plugin, Pod, PodMutator};

/// The plugin's settings: its table in the runner config, or `--plugin P.wasm=CONFIG`.
/// `deny_unknown_fields` turns a typo into an error when the plugin loads.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Required: the team owning the jobs (annotation `example.com/team`).
    team: String,
    /// Labels to add to the pod.
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

pub struct TemplatePodMutator {
    settings: Settings,
}

impl Plugin for TemplatePodMutator {
    // The name in every error and log line about this plugin.
    const NAME: &'static str = "template-pod-mutator";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(config: Config) -> Result<Self, Error> {
        let settings: Settings = config.parse()?;
        if settings.team.is_empty() {
            return Err(Error::invalid_config("`team` must not be empty"));
        }
        Ok(TemplatePodMutator { settings })
    }
}

impl PodMutator for TemplatePodMutator {
    fn mutate(&mut self, ctx: &Context, mut pod: Pod) -> Result<Pod, Error> {
        let annotations = pod.metadata.annotations.get_or_insert_with(Default::default);
        annotations.insert("example.com/team".into(), self.settings.team.clone());
        let labels = pod.metadata.labels.get_or_insert_with(Default::default);
        for (key, value) in &self.settings.labels {
            labels.entry(key.clone()).or_insert_with(|| value.clone());
        }
        keel_sdk::debug!("annotated the pod of job {}", ctx.job.id);
        Ok(pod)
    }
}

keel_sdk::export!(TemplatePodMutator: PodMutator);

#[cfg(test)]
mod tests {
    use super::*;
    use keel_sdk::testing::{self, ContextBuilder};

    #[test]
    fn annotates_the_pod_the_host_builds() {
        let mut plugin: TemplatePodMutator = testing::configure(r#"team = "platform""#).unwrap();
        let ctx = ContextBuilder::new().variable("DEPLOY_ENV", "staging").build();
        let pod = testing::mutate(&mut plugin, &ctx, testing::pod_for(&ctx)).unwrap();
        assert_eq!(pod.metadata.annotations.unwrap()["example.com/team"], "platform");
    }

    #[test]
    fn host_owned_labels_are_kept() {
        // The host's label names are constants to import (keel_sdk's CHANGELOG lists renames).
        let job_id_label = keel_sdk::pod::JOB_ID_LABEL;
        let config = format!("team = \"platform\"\nlabels = {{ \"{job_id_label}\" = \"other\", tier = \"ci\" }}");
        let mut plugin: TemplatePodMutator = testing::configure(&config).unwrap();
        let ctx = ContextBuilder::new().job_id(7).build();
        let labels = testing::mutate(&mut plugin, &ctx, testing::pod_for(&ctx)).unwrap().metadata.labels.unwrap();
        assert_eq!((labels[job_id_label].as_str(), labels["tier"].as_str()), ("7", "ci"));
    }

    #[test]
    fn a_missing_team_is_a_config_error() {
        match testing::configure::<TemplatePodMutator>("") {
            Err(Error::InvalidConfig(message)) => assert!(message.contains("missing field `team`"), "{message}"),
            other => panic!("expected invalid config, got {:?}", other.err()),
        }
    }
}
