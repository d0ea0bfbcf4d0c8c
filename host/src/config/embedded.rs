//! `[embedded_cluster]`: keel's own table (GitLab Runner has none) for the cluster `host run`
//! and `host serve` start when no cluster is configured. The same settings as the flags of
//! `host cluster up`; a flag given on the command line wins over the file.
//!
//! ```toml
//! [embedded_cluster]
//!   images_from = "images"                 # relative to this file
//!   host_rootfs = false
//!   pod_network = "egress"                 # or "bridge", "none"
//!   registry_mirrors = { "docker.io" = "http://127.0.0.1:5000" }
//!   insecure_registries = ["registry.internal:5000"]
//!   registry_cas = ["certs/registry-ca.pem"] # relative to this file
//!   image_gc_high_threshold = 85
//!   image_gc_low_threshold = 80
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::input::Located;

/// `[embedded_cluster]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedCluster {
    /// Every image archive in this directory is loaded at start (`--images-from`).
    pub images_from: Option<PathBuf>,
    /// Images not in the store run on the host's root filesystem (`--host-rootfs`).
    pub host_rootfs: Option<bool>,
    /// How pods are networked (`--pod-network`): egress (the default), bridge or none.
    pub pod_network: Option<local_cluster::node::PodNetwork>,
    /// REGISTRY = URL: pull REGISTRY's images from URL first (`--registry-mirror`).
    #[serde(default)]
    pub registry_mirrors: BTreeMap<String, String>,
    /// HOST:PORT reached over plain HTTP (`--insecure-registry`).
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// PEM files trusted for registries' TLS (`--registry-ca`).
    #[serde(default)]
    pub registry_cas: Vec<PathBuf>,
    /// Percent of the store's filesystem at which unused images are deleted (`--image-gc-high-threshold`).
    pub image_gc_high_threshold: Option<u8>,
    /// Percent the deletion goes down to (`--image-gc-low-threshold`).
    pub image_gc_low_threshold: Option<u8>,
}

impl EmbeddedCluster {
    /// Paths relative to the config file's directory; mirrors and thresholds checked as the
    /// flags are, each error naming its key.
    pub(super) fn resolve(&mut self, path: &Path, base: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            at: Located::key(path, format!("embedded_cluster.{key}")),
            message,
        };
        if let Some(dir) = &self.images_from {
            self.images_from = Some(base.join(dir));
        }
        for ca in &mut self.registry_cas {
            *ca = base.join(&*ca);
        }
        // Checked as the node checks them when it starts (whether plain HTTP is allowed to the
        // host waits until then: flags may name it insecure).
        for (registry, url) in &self.registry_mirrors {
            let key = format!("registry_mirrors.{registry}");
            if registry.is_empty() {
                return Err(invalid(
                    &key,
                    format!("a mirror needs its registry's name (as \"docker.io\"), got {url:?}"),
                ));
            }
            local_cluster::node::mirror_endpoint(registry, url).map_err(|e| invalid(&key, e.to_string()))?;
        }
        let (high, low) = self.image_gc_thresholds();
        local_cluster::node::ImageGcPolicy::with_thresholds(high, low).map_err(|e| {
            let key = if high > 100 { "image_gc_high_threshold" } else { "image_gc_low_threshold" };
            invalid(key, e.to_string())
        })?;
        Ok(())
    }

    /// The thresholds, the kubelet's defaults (85, 80) where unset.
    pub fn image_gc_thresholds(&self) -> (u8, u8) {
        let defaults = local_cluster::node::ImageGcPolicy::default();
        (
            self.image_gc_high_threshold.unwrap_or(defaults.high_threshold),
            self.image_gc_low_threshold.unwrap_or(defaults.low_threshold),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use std::path::Path;

    #[test]
    fn paths_resolve_against_the_file_and_values_are_checked() {
        let text = "[embedded_cluster]\nimages_from = \"images\"\nhost_rootfs = true\npod_network = \"bridge\"\n\
                    registry_mirrors = { \"docker.io\" = \"http://127.0.0.1:5000\" }\n\
                    registry_cas = [\"ca.pem\"]\nimage_gc_high_threshold = 90\n";
        let c = Config::parse(text, Path::new("/etc/keel/config.toml"), Path::new("/etc/keel")).unwrap();
        let e = c.embedded_cluster.unwrap();
        assert_eq!(e.images_from.as_deref(), Some(Path::new("/etc/keel/images")));
        assert_eq!(e.registry_cas, [Path::new("/etc/keel/ca.pem")]);
        assert_eq!(e.host_rootfs, Some(true));
        assert_eq!(e.pod_network, Some(local_cluster::node::PodNetwork::Bridge));
        assert_eq!(e.image_gc_thresholds(), (90, 80));

        let err = |text: &str| Config::parse(text, Path::new("c.toml"), Path::new(".")).unwrap_err().to_string();
        assert_eq!(
            err("[embedded_cluster]\nimage_gc_high_threshold = 70\n"),
            "c.toml: key `embedded_cluster.image_gc_low_threshold`: invalid configuration: --image-gc-low-threshold (80) must be less than --image-gc-high-threshold (70)"
        );
        assert!(
            err("[embedded_cluster]\nregistry_mirrors = { \"docker.io\" = \"ftp://x\" }\n")
                .starts_with("c.toml: key `embedded_cluster.registry_mirrors.docker.io`: "),
        );
        assert!(err("[embedded_cluster]\nhost_root_fs = true\n").contains("unknown field `host_root_fs`"));
        let bad_network = err("[embedded_cluster]\npod_network = \"host\"\n");
        assert!(
            bad_network.contains("unknown variant `host`, expected one of `none`, `bridge`, `egress`"),
            "{bad_network}"
        );
        assert!(
            err("[embedded_cluster]\nregistry_mirrors = { \"\" = \"http://x\" }\n")
                .contains("needs its registry's name")
        );
        assert!(
            err("[embedded_cluster]\nregistry_mirrors = { \"docker.io\" = \"https://m.example/path\" }\n")
                .contains("no path"),
            "a mirror is checked as the node checks it"
        );
    }
}
