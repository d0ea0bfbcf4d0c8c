//! `labels`: the tutorial plugin. It adds labels and a node selector to every job pod.
//!
//! Configure it in the host config:
//!
//! ```toml
//! [[plugins]]
//! name = "labels"
//! path = "target/plugins/labels.wasm"
//! [plugins.config]
//! labels = { team = "platform", "cost-center" = "ci" }
//! node_selector = { "kubernetes.io/arch" = "amd64" }
//! ```
//!
//! A plugin is three things: a type, the `Plugin` trait (name, version, how to read the
//! configuration), and one trait per role it plays. `keel_sdk::export!` at the bottom turns
//! that into a WebAssembly component the host can load.

use std::collections::BTreeMap;

use keel_sdk::{Config, Context, Error, Plugin, Pod, PodMutator};

/// The plugin's configuration: exactly the table under `[plugins.config]`.
/// `deny_unknown_fields` turns a typo (`lables = ...`) into a clear error at job start
/// instead of a silently ignored setting.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Labels {
    /// Labels to add to the pod. Existing labels with the same key are left alone: the host
    /// owns some labels (its selector) and refuses a pod where they changed.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Added to `spec.nodeSelector`; here the operator's value wins over the job's.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
}

impl Plugin for Labels {
    // Shown by `host plugin inspect` and in every error about this plugin.
    const NAME: &'static str = "labels";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    /// Called once per job, before any role call. `Config::parse` deserialises the table and
    /// turns serde's message into an `invalid-config` error naming the key.
    fn configure(config: Config) -> Result<Self, Error> {
        config.parse()
    }
}

impl PodMutator for Labels {
    /// Gets the pod as a typed k8s-openapi `Pod` and returns the pod to create.
    fn mutate(&mut self, ctx: &Context, mut pod: Pod) -> Result<Pod, Error> {
        let labels = pod.metadata.labels.get_or_insert_with(Default::default);
        for (key, value) in &self.labels {
            // `entry().or_insert` keeps what is already there, including host-owned labels.
            labels.entry(key.clone()).or_insert_with(|| value.clone());
        }
        if !self.node_selector.is_empty() {
            let spec = pod.spec.get_or_insert_with(Default::default);
            let selector = spec.node_selector.get_or_insert_with(Default::default);
            selector.extend(self.node_selector.clone());
        }
        // Logs go to the host's log, tagged with this plugin's name and the job id.
        keel_sdk::debug!("labelled pod for job {}", ctx.job.id);
        Ok(pod)
    }
}

// Registers `Labels` as the component's implementation, playing the pod-mutator role.
keel_sdk::export!(Labels: PodMutator);

#[cfg(test)]
mod tests {
    use super::*;
    use keel_sdk::testing;

    #[test]
    fn adds_labels_and_node_selector_but_keeps_existing_labels() {
        let mut plugin: Labels = testing::configure(
            r#"
            labels = { team = "platform", "keel.dev/job-id" = "hijack" }
            node_selector = { "kubernetes.io/arch" = "amd64" }
            "#,
        )
        .unwrap();
        let pod = testing::mutate(&mut plugin, &testing::context(serde_json::Value::Null), testing::pod()).unwrap();
        let labels = pod.metadata.labels.unwrap();
        assert_eq!(labels["team"], "platform");
        assert_eq!(labels["keel.dev/job-id"], "1", "an existing label is not overwritten");
        assert_eq!(pod.spec.unwrap().node_selector.unwrap()["kubernetes.io/arch"], "amd64");
    }

    #[test]
    fn a_typo_in_the_table_is_an_invalid_config_error() {
        let err = testing::configure::<Labels>("lables = { a = \"b\" }").unwrap_err();
        match err {
            Error::InvalidConfig(msg) => assert!(msg.contains("unknown field `lables`"), "{msg}"),
            other => panic!("expected invalid config, got {other:?}"),
        }
    }
}
