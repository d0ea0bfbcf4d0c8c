//! `config.toml`: GitLab Runner's format (top level, `[[runners]]`, `[runners.kubernetes]`)
//! plus keel's own `[[runners.kubernetes.plugins]]`.
//!
//! Values are checked while they are deserialised (quantities, regexes, pull policies, patch
//! types...), so every error carries the TOML span of the offending value and the key path that
//! leads to it. Only the things that need the file system (plugin paths, `patch_path`) are
//! resolved afterwards, relative to the config file's directory.
//!
//! Sections: the top level and `[[runners]]` here, `[runners.kubernetes]` in `kubernetes`,
//! plugin entries in `plugins`, `[runners.cache]` in `cache`, keel's `[embedded_cluster]` in
//! `embedded`; the values they share are `crate::vocab::values`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, de};

use crate::input::{Located, check_toml_depth, cut_message, limits, line_col, read_text_file, show_bytes};
mod cache;
mod embedded;
mod kubernetes;
mod plugins;

use crate::vocab::RESERVED_VOLUMES;
pub use cache::*;
pub use embedded::EmbeddedCluster;
pub use kubernetes::*;
pub use plugins::*;

/// Everything that can go wrong loading a config file. Each message names the file, and where
/// it can the line, column and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{at}: {message}")]
    Invalid { at: Located, message: String },
    #[error("{at}: cannot read pod_spec patch file {patch_path}")]
    PatchRead {
        at: Located,
        patch_path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{at}: invalid {patch_type} patch: {message}")]
    PatchInvalid { at: Located, patch_type: PatchType, message: String },
    #[error("--plugin {arg:?}: {message}")]
    PluginArg { arg: String, message: String },
    #[error("{path}: no [[runners]] entry with executor = \"kubernetes\"")]
    NoKubernetesRunner { path: PathBuf },
    #[error("{path}: no [[runners]] entry named {name:?} (have: {available})")]
    UnknownRunner { path: PathBuf, name: String, available: String },
}

/// The whole `config.toml`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How many jobs may run at once, over all runners.
    pub concurrent: Option<u32>,
    /// Seconds between checks for new jobs.
    pub check_interval: Option<u64>,
    pub log_level: Option<LogLevel>,
    pub log_format: Option<LogFormat>,
    /// Seconds to wait for running jobs on shutdown.
    pub shutdown_timeout: Option<u64>,
    pub listen_address: Option<String>,
    /// GitLab's interactive web terminal server; accepted so existing files load, not used.
    #[serde(default, skip_serializing)]
    pub session_server: Option<toml::Table>,
    #[serde(default)]
    pub runners: Vec<Runner>,
    /// keel's WebAssembly plugins for every runner; they run before a runner's own
    /// `[[runners.kubernetes.plugins]]`, in file order.
    #[serde(default, skip_serializing)]
    pub plugins: Vec<PluginConfig>,
    /// keel's own: the cluster started when no cluster is configured.
    #[serde(default, skip_serializing)]
    pub embedded_cluster: Option<EmbeddedCluster>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
    Fatal,
    Panic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Runner,
    Text,
    Json,
}

/// One `[[runners]]` entry.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Runner {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub url: String,
    /// Runner authentication token; its first 8 characters name the job pods.
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub executor: String,
    /// Maximum jobs this runner handles at once (0: no limit).
    pub limit: Option<u32>,
    /// Where builds are checked out inside the build container (default `/builds`).
    pub builds_dir: Option<String>,
    pub cache_dir: Option<String>,
    /// Extra `KEY=value` variables for every job of this runner.
    #[serde(default)]
    pub environment: Vec<EnvEntry>,
    /// Maximum trace size in kilobytes.
    pub output_limit: Option<u64>,
    pub request_concurrency: Option<u32>,
    /// GitLab's `[runners.cache]`: where job caches are kept (s3, gcs, azure).
    #[serde(default, skip_serializing)]
    pub cache: Option<CacheConfig>,
    /// GitLab's `[runners.feature_flags]`, `[runners.custom_build_dir]`: accepted so existing
    /// files load; keel does not act on them (yet).
    #[serde(default, skip_serializing)]
    pub feature_flags: Option<toml::Table>,
    #[serde(default, skip_serializing)]
    pub custom_build_dir: Option<toml::Table>,
    pub kubernetes: Option<Kubernetes>,
}

/// A `KEY=value` entry of `environment`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct EnvEntry {
    pub key: String,
    pub value: String,
}

impl From<EnvEntry> for String {
    fn from(e: EnvEntry) -> String {
        format!("{}={}", e.key, e.value)
    }
}

impl<'de> Deserialize<'de> for EnvEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok(EnvEntry { key: k.to_string(), value: v.to_string() }),
            _ => Err(de::Error::custom(format!("expected KEY=value, got {s:?}"))),
        }
    }
}

impl Config {
    /// The configuration `host run`/`render` use without `--config`: one Kubernetes runner
    /// with GitLab's defaults (namespace `default`, the job's own image, no overwrites, no
    /// plugins).
    pub fn builtin() -> Config {
        Config {
            runners: vec![Runner {
                name: "default".into(),
                executor: "kubernetes".into(),
                kubernetes: Some(Kubernetes::default()),
                ..Runner::default()
            }],
            ..Config::default()
        }
    }

    /// Read and check `path`; relative paths inside (plugins, patch files) resolve against
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_text_file(path, limits::CONFIG_BYTES)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, path, &base)
    }

    /// Parse config text; `path` is only used in messages, `base` resolves relative paths.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Config, ConfigError> {
        let mut config = Self::deserialize_text(text, path)?;
        config.resolve(text, path, base)?;
        Ok(config)
    }

    fn deserialize_text(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |offset: usize, message: String| {
            let (line, column) = line_col(text, offset);
            ConfigError::Invalid { at: Located::at(path, line, column, "(document)"), message }
        };
        // Checked here too, not only in `load`, so text from any source is held to the same limits.
        if text.len() > limits::CONFIG_BYTES {
            return Err(invalid(
                limits::CONFIG_BYTES,
                format!("the file is {} bytes, over the limit of {}", text.len(), show_bytes(limits::CONFIG_BYTES)),
            ));
        }
        if let Err(offset) = check_toml_depth(text, limits::NESTING) {
            return Err(invalid(
                offset,
                format!("arrays and inline tables nest deeper than {} levels (the limit)", limits::NESTING),
            ));
        }
        let de = toml::Deserializer::parse(text).map_err(|e| toml_error(text, path, "", &e))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            toml_error(text, path, &key, e.inner())
        })
    }

    fn resolve(&mut self, text: &str, path: &Path, base: &Path) -> Result<(), ConfigError> {
        if let Some(embedded) = self.embedded_cluster.as_mut() {
            embedded.resolve(path, base)?;
        }
        let global_plugins = self.plugins.len();
        for (i, plugin) in self.plugins.iter_mut().enumerate() {
            plugin.resolve(text, path, base, format!("plugins[{i}]"));
        }
        for (ri, runner) in self.runners.iter_mut().enumerate() {
            let Some(k8s) = runner.kubernetes.as_mut() else { continue };
            // Before the per-entry work below, so a config with 100,000 patches fails at once.
            k8s.check_counts(path, ri, global_plugins)?;
            for (pi, patch) in k8s.pod_spec.iter_mut().enumerate() {
                let key = format!("runners[{ri}].kubernetes.pod_spec[{pi}]");
                match (&patch.patch, &patch.patch_path) {
                    (Some(_), Some(_)) => {
                        return Err(ConfigError::Invalid {
                            at: Located::key(path, key),
                            message: "set either `patch` or `patch_path`, not both".into(),
                        });
                    }
                    (None, None) => {
                        return Err(ConfigError::Invalid {
                            at: Located::key(path, key),
                            message: "one of `patch` or `patch_path` is required".into(),
                        });
                    }
                    (None, Some(p)) => {
                        let full = base.join(p);
                        let text =
                            read_text_file(&full, limits::YAML_BYTES).map_err(|source| ConfigError::PatchRead {
                                at: Located::key(path, format!("{key}.patch_path")),
                                patch_path: full.clone(),
                                source,
                            })?;
                        patch.patch = Some(text);
                    }
                    (Some(_), None) => {}
                }
                let text = patch.patch.as_deref().unwrap_or_default();
                check_patch(text, patch.patch_type).map_err(|message| ConfigError::PatchInvalid {
                    at: Located::key(path, format!("{key}.patch")),
                    patch_type: patch.patch_type,
                    message,
                })?;
            }
            let v = &k8s.volumes;
            let names = v
                .host_path
                .iter()
                .map(|x| ("host_path", &x.name))
                .chain(v.pvc.iter().map(|x| ("pvc", &x.name)))
                .chain(v.config_map.iter().map(|x| ("config_map", &x.name)))
                .chain(v.secret.iter().map(|x| ("secret", &x.name)))
                .chain(v.empty_dir.iter().map(|x| ("empty_dir", &x.name)));
            let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
            for (kind, name) in names {
                if RESERVED_VOLUMES.contains(&name.0.as_str()) {
                    return Err(ConfigError::Invalid {
                        at: Located::key(path, format!("runners[{ri}].kubernetes.volumes.{kind}")),
                        message: format!("volume name {:?} is reserved for the host's own volumes", name.0),
                    });
                }
                if let Some(first) = seen.insert(&name.0, kind) {
                    return Err(ConfigError::Invalid {
                        at: Located::key(path, format!("runners[{ri}].kubernetes.volumes.{kind}")),
                        message: format!(
                            "volume name {:?} is already used by a {first} volume; names must be unique",
                            name.0
                        ),
                    });
                }
            }
            for (pi, plugin) in k8s.plugins.iter_mut().enumerate() {
                plugin.resolve(text, path, base, format!("runners[{ri}].kubernetes.plugins[{pi}]"));
            }
        }
        Ok(())
    }

    /// The runner a job runs on: the one named `name`, or the first Kubernetes runner.
    pub fn runner(&self, name: Option<&str>, path: &Path) -> Result<&Runner, ConfigError> {
        match name {
            Some(name) => self.runners.iter().find(|r| r.name == name).ok_or_else(|| ConfigError::UnknownRunner {
                path: path.to_path_buf(),
                name: name.to_string(),
                available: self.runners.iter().map(|r| format!("{:?}", r.name)).collect::<Vec<_>>().join(", "),
            }),
            None => self
                .runners
                .iter()
                .find(|r| r.executor == "kubernetes")
                .ok_or_else(|| ConfigError::NoKubernetesRunner { path: path.to_path_buf() }),
        }
    }
}

pub(super) fn toml_error(text: &str, path: &Path, key: &str, e: &toml::de::Error) -> ConfigError {
    let message = cut_message(e.message().trim().to_string());
    let key = if key.is_empty() || key == "." { "(document)".to_string() } else { cut_message(key.to_string()) };
    match e.span() {
        Some(span) => {
            let (line, column) = line_col(text, span.start);
            ConfigError::Invalid { at: Located::at(path, line, column, key), message }
        }
        None => ConfigError::Invalid { at: Located::key(path, key), message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::PullPolicy;

    #[test]
    fn error_names_line_and_key() {
        let text = "concurrent = 1\n[[runners]]\nname = \"a\"\n[runners.kubernetes]\ncpu_limit = \"lots\"\n";
        let err = Config::parse(text, Path::new("c.toml"), Path::new(".")).unwrap_err().to_string();
        assert_eq!(
            err,
            "c.toml:5:13: key `runners[0].kubernetes.cpu_limit`: \"lots\" is not a Kubernetes quantity (examples: \"500m\", \"1Gi\", \"2\")"
        );
    }

    #[test]
    fn gitlab_tables_keel_does_not_use_still_load() {
        let text = "[session_server]\nlisten_address = \"[::]:8093\"\n[[runners]]\nexecutor = \"kubernetes\"\n\
                    [runners.cache]\nType = \"s3\"\n[runners.cache.s3]\nBucketName = \"b\"\n\
                    [runners.feature_flags]\nFF_USE_POD_ACTIVE_DEADLINE_SECONDS = true\n[runners.kubernetes]\n";
        let c = Config::parse(text, Path::new("c.toml"), Path::new(".")).unwrap();
        // They never reach plugins.
        let json = serde_json::to_value(&c.runners[0]).unwrap();
        assert!(json.get("cache").is_none() && json.get("feature_flags").is_none());
    }

    #[test]
    fn service_account_both_spellings() {
        for key in ["service_account", "service-account"] {
            let text = format!("[[runners]]\nexecutor = \"kubernetes\"\n[runners.kubernetes]\n{key} = \"ci\"\n");
            let c = Config::parse(&text, Path::new("c.toml"), Path::new(".")).unwrap();
            assert_eq!(c.runners[0].kubernetes.as_ref().unwrap().service_account.as_deref(), Some("ci"));
        }
    }

    #[test]
    fn pull_policy_string_or_list() {
        let text = "[[runners]]\n[runners.kubernetes]\npull_policy = \"always\"\nallowed_pull_policies = [\"always\", \"never\"]\n";
        let c = Config::parse(text, Path::new("c.toml"), Path::new(".")).unwrap();
        let k = c.runners[0].kubernetes.as_ref().unwrap();
        assert_eq!(k.pull_policy, vec![PullPolicy::Always]);
        assert_eq!(k.allowed_pull_policies, vec![PullPolicy::Always, PullPolicy::Never]);
        let text = "[[runners]]\n[runners.kubernetes]\npull_policy = [\"if-not-present\", \"always\"]\n";
        let c = Config::parse(text, Path::new("c.toml"), Path::new(".")).unwrap();
        assert_eq!(
            c.runners[0].kubernetes.as_ref().unwrap().pull_policy,
            vec![PullPolicy::IfNotPresent, PullPolicy::Always]
        );
    }
}
