//! `template-overwrites`: keel overwrite rules. A job may move to a namespace with one of the configured
//! prefixes; every other requested overwrite is dropped (the host lists it as refused).

use keel_sdk::{Config, Context, Error, OverwriteRules, Overwrites, Plugin};

/// The plugin's settings: its table in the runner config, or `--plugin P.wasm=CONFIG`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Required: namespace prefixes a job may ask for (`KUBERNETES_NAMESPACE_OVERWRITE`).
    namespaces: Vec<String>,
}

pub struct TemplateOverwrites {
    settings: Settings,
}

impl Plugin for TemplateOverwrites {
    const NAME: &'static str = "template-overwrites";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(config: Config) -> Result<Self, Error> {
        Ok(TemplateOverwrites { settings: config.parse()? })
    }
}

impl OverwriteRules for TemplateOverwrites {
    fn review(&mut self, _ctx: &Context, requested: Overwrites) -> Result<Overwrites, Error> {
        let mut accepted = Overwrites::default();
        if let Some(namespace) = requested.namespace {
            if !self.settings.namespaces.iter().any(|prefix| namespace.starts_with(prefix.as_str())) {
                return Err(Error::denied(format!(
                    "KUBERNETES_NAMESPACE_OVERWRITE={namespace:?} does not start with any of {:?}",
                    self.settings.namespaces
                )));
            }
            accepted.namespace = Some(namespace);
        }
        Ok(accepted)
    }
}

keel_sdk::export!(TemplateOverwrites: OverwriteRules);

#[cfg(test)]
mod tests {
    use super::*;
    use keel_sdk::testing::{self, ContextBuilder};

    #[test]
    fn a_namespace_with_an_allowed_prefix_is_accepted_others_denied() {
        let mut plugin: TemplateOverwrites = testing::configure("namespaces = [\"ci-\"]").unwrap();
        let ctx = ContextBuilder::new().build();
        let ask = |ns: &str| Overwrites { namespace: Some(ns.into()), ..Default::default() };
        assert_eq!(testing::review(&mut plugin, &ctx, ask("ci-blue")).unwrap().namespace.as_deref(), Some("ci-blue"));
        assert!(matches!(testing::review(&mut plugin, &ctx, ask("kube-system")), Err(Error::Denied(_))));
    }
}
