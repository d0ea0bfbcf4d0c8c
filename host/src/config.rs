//! `config.toml`: GitLab Runner's format (top level, `[[runners]]`, `[runners.kubernetes]`)
//! plus keel's own `[[runners.kubernetes.plugins]]`.
//!
//! Values are checked while they are deserialised (quantities, regexes, pull policies, patch
//! types...), so every error carries the TOML span of the offending value and the key path that
//! leads to it. Only the things that need the file system (plugin paths, `patch_path`) are
//! resolved afterwards, relative to the config file's directory.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, de};

use crate::input::{
    check_toml_depth, check_yaml, compile_overwrite_regex, cut_message, limits, line_col, read_text_file, show_bytes,
};
use crate::vocab::{PullPolicy, RESERVED_VOLUMES, Resources};

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
    #[error("{path}:{line}:{column}: key `{key}`: {message}")]
    Invalid { path: PathBuf, line: usize, column: usize, key: String, message: String },
    #[error("{path}: key `{key}`: {message}")]
    InvalidNoSpan { path: PathBuf, key: String, message: String },
    #[error("{path}: key `{key}`: cannot read pod_spec patch file {patch_path}")]
    PatchRead {
        path: PathBuf,
        key: String,
        patch_path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: key `{key}`: invalid {patch_type} patch: {message}")]
    PatchInvalid { path: PathBuf, key: String, patch_type: PatchType, message: String },
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
    /// GitLab's `[runners.cache]`, `[runners.feature_flags]`, `[runners.custom_build_dir]`:
    /// accepted so existing files load; keel does not act on them (yet).
    #[serde(default, skip_serializing)]
    pub cache: Option<toml::Table>,
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

/// `[runners.kubernetes]`: every keyword of GitLab Runner's Kubernetes executor we know of.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Kubernetes {
    // Connecting to the API.
    pub host: Option<String>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub bearer_token: Option<String>,
    #[serde(default)]
    pub bearer_token_overwrite_allowed: bool,

    /// Default image when the job names none.
    pub image: Option<String>,
    #[serde(default)]
    pub namespace: String,
    pub namespace_overwrite_allowed: Option<OverwriteRegex>,
    #[serde(default)]
    pub privileged: bool,
    pub allow_privilege_escalation: Option<bool>,

    // Build container resources.
    pub cpu_limit: Option<Quantity>,
    pub cpu_limit_overwrite_max_allowed: Option<Quantity>,
    pub cpu_request: Option<Quantity>,
    pub cpu_request_overwrite_max_allowed: Option<Quantity>,
    pub memory_limit: Option<Quantity>,
    pub memory_limit_overwrite_max_allowed: Option<Quantity>,
    pub memory_request: Option<Quantity>,
    pub memory_request_overwrite_max_allowed: Option<Quantity>,
    pub ephemeral_storage_limit: Option<Quantity>,
    pub ephemeral_storage_limit_overwrite_max_allowed: Option<Quantity>,
    pub ephemeral_storage_request: Option<Quantity>,
    pub ephemeral_storage_request_overwrite_max_allowed: Option<Quantity>,

    // Service container resources.
    pub service_cpu_limit: Option<Quantity>,
    pub service_cpu_limit_overwrite_max_allowed: Option<Quantity>,
    pub service_cpu_request: Option<Quantity>,
    pub service_cpu_request_overwrite_max_allowed: Option<Quantity>,
    pub service_memory_limit: Option<Quantity>,
    pub service_memory_limit_overwrite_max_allowed: Option<Quantity>,
    pub service_memory_request: Option<Quantity>,
    pub service_memory_request_overwrite_max_allowed: Option<Quantity>,
    pub service_ephemeral_storage_limit: Option<Quantity>,
    pub service_ephemeral_storage_limit_overwrite_max_allowed: Option<Quantity>,
    pub service_ephemeral_storage_request: Option<Quantity>,
    pub service_ephemeral_storage_request_overwrite_max_allowed: Option<Quantity>,

    // Helper container resources.
    pub helper_cpu_limit: Option<Quantity>,
    pub helper_cpu_limit_overwrite_max_allowed: Option<Quantity>,
    pub helper_cpu_request: Option<Quantity>,
    pub helper_cpu_request_overwrite_max_allowed: Option<Quantity>,
    pub helper_memory_limit: Option<Quantity>,
    pub helper_memory_limit_overwrite_max_allowed: Option<Quantity>,
    pub helper_memory_request: Option<Quantity>,
    pub helper_memory_request_overwrite_max_allowed: Option<Quantity>,
    pub helper_ephemeral_storage_limit: Option<Quantity>,
    pub helper_ephemeral_storage_limit_overwrite_max_allowed: Option<Quantity>,
    pub helper_ephemeral_storage_request: Option<Quantity>,
    pub helper_ephemeral_storage_request_overwrite_max_allowed: Option<Quantity>,

    // Pod-level resources (`spec.resources`).
    pub pod_cpu_limit: Option<Quantity>,
    pub pod_cpu_limit_overwrite_max_allowed: Option<Quantity>,
    pub pod_cpu_request: Option<Quantity>,
    pub pod_cpu_request_overwrite_max_allowed: Option<Quantity>,
    pub pod_memory_limit: Option<Quantity>,
    pub pod_memory_limit_overwrite_max_allowed: Option<Quantity>,
    pub pod_memory_request: Option<Quantity>,
    pub pod_memory_request_overwrite_max_allowed: Option<Quantity>,

    /// One policy or a list tried in order on pull failures.
    #[serde(default, deserialize_with = "one_or_many_pull_policies")]
    pub pull_policy: Vec<PullPolicy>,
    #[serde(default, deserialize_with = "many_pull_policies")]
    pub allowed_pull_policies: Vec<PullPolicy>,

    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    pub node_selector_overwrite_allowed: Option<OverwriteRegex>,
    /// `"key=value" = "effect"` or `"key" = "effect"` (effect may be empty).
    #[serde(default)]
    pub node_tolerations: BTreeMap<String, String>,
    pub node_tolerations_overwrite_allowed: Option<OverwriteRegex>,
    #[serde(default)]
    pub image_pull_secrets: Vec<String>,
    pub helper_image: Option<String>,
    #[serde(rename = "terminationGracePeriodSeconds", alias = "termination_grace_period_seconds")]
    pub termination_grace_period_seconds: Option<i64>,
    /// Seconds between pod status checks (default 3).
    pub poll_interval: Option<u64>,
    /// Seconds to wait for the pod to start running (default 180).
    pub poll_timeout: Option<u64>,
    /// Grace period (seconds) given to the pod when the job's objects are deleted at the end.
    pub cleanup_grace_period_seconds: Option<i64>,
    /// keel: the execution strategy (`exec`, a plugin name, or a `.wasm` path) when the
    /// command line names none.
    pub strategy: Option<String>,
    #[serde(default)]
    pub pod_labels: BTreeMap<String, String>,
    pub pod_labels_overwrite_allowed: Option<OverwriteRegex>,
    #[serde(default)]
    pub pod_annotations: BTreeMap<String, String>,
    pub pod_annotations_overwrite_allowed: Option<OverwriteRegex>,
    #[serde(alias = "service-account")]
    pub service_account: Option<String>,
    pub service_account_overwrite_allowed: Option<OverwriteRegex>,
    pub pod_security_context: Option<PodSecurityContext>,
    /// Extra sidecar services for every job (seed 000's `Config.Kubernetes.Services`).
    #[serde(default)]
    pub services: Vec<ConfigService>,
    #[serde(default)]
    pub volumes: Volumes,
    /// Admin-side patches applied to the built pod spec.
    #[serde(default)]
    pub pod_spec: Vec<PodSpecPatch>,
    /// keel's WebAssembly plugins for this runner, in the order they run.
    #[serde(default, skip_serializing)]
    pub plugins: Vec<PluginConfig>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PodSecurityContext {
    pub fs_group: Option<i64>,
    pub run_as_group: Option<i64>,
    pub run_as_non_root: Option<bool>,
    pub run_as_user: Option<i64>,
    #[serde(default)]
    pub supplemental_groups: Vec<i64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigService {
    pub name: String,
    pub alias: Option<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub command: Vec<String>,
}

/// `[runners.kubernetes.volumes]`: the five volume types, each a list.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Volumes {
    #[serde(default)]
    pub host_path: Vec<HostPathVolume>,
    #[serde(default)]
    pub pvc: Vec<PvcVolume>,
    #[serde(default)]
    pub config_map: Vec<ConfigMapVolume>,
    #[serde(default)]
    pub secret: Vec<SecretVolume>,
    #[serde(default)]
    pub empty_dir: Vec<EmptyDirVolume>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HostPathVolume {
    pub name: VolumeName,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
    /// Defaults to `mount_path` (GitLab's pre-9.3 behaviour).
    pub host_path: Option<String>,
    pub sub_path: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PvcVolume {
    /// Volume name and claim name at once.
    pub name: VolumeName,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
    pub sub_path: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigMapVolume {
    /// Volume name and ConfigMap name at once.
    pub name: VolumeName,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
    pub sub_path: Option<String>,
    /// Key -> path relative to the mount; when set only these keys are mounted.
    #[serde(default)]
    pub items: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecretVolume {
    /// Volume name and Secret name at once.
    pub name: VolumeName,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
    pub sub_path: Option<String>,
    #[serde(default)]
    pub items: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyDirVolume {
    pub name: VolumeName,
    pub mount_path: String,
    pub sub_path: Option<String>,
    /// `""` (node disk, default) or `Memory`.
    #[serde(default)]
    pub medium: EmptyDirMedium,
    pub size_limit: Option<Quantity>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum EmptyDirMedium {
    #[default]
    #[serde(rename = "")]
    Disk,
    Memory,
}

/// `[[runners.kubernetes.pod_spec]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpecPatch {
    #[serde(default)]
    pub name: String,
    /// Patch text (YAML or JSON). After loading, `patch_path` has been read into it.
    pub patch: Option<String>,
    /// File holding the patch, relative to the config file. Resolved at load time because
    /// plugins, which apply patches, have no file access.
    #[serde(skip_serializing)]
    pub patch_path: Option<PathBuf>,
    #[serde(default)]
    pub patch_type: PatchType,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PatchType {
    Json,
    Merge,
    #[default]
    Strategic,
}

impl fmt::Display for PatchType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PatchType::Json => "json",
            PatchType::Merge => "merge",
            PatchType::Strategic => "strategic",
        })
    }
}

/// `[[runners.kubernetes.plugins]]`: one WebAssembly component.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Path to the `.wasm` component, relative to the config file (resolved at load).
    #[serde(rename = "path")]
    raw_path: toml::Spanned<PathBuf>,
    #[serde(skip)]
    pub path: PathBuf,
    /// Overrides the name the plugin gives itself (its metadata) in errors and logs.
    pub name: Option<String>,
    /// The table as written, with its place in the file.
    #[serde(default, rename = "config")]
    raw_config: Option<toml::Spanned<toml::Table>>,
    /// Handed to the plugin as-is; its meaning is the plugin's business. Checked by the
    /// plugin's `configure` when the plugin loads.
    #[serde(skip)]
    pub config: toml::Table,
    /// Where `config` is in the file (set when the file is read), for the plugin's rejections.
    #[serde(skip)]
    pub origin: Option<ConfigOrigin>,
    /// Maximum linear memory, e.g. `"64Mi"` or a number of bytes.
    pub memory_limit: Option<ByteSize>,
    /// Maximum time per call, e.g. `"2s"`, `"500ms"`.
    pub timeout: Option<GitlabDuration>,
    /// Capabilities beyond the default sandbox. Nothing is granted unless listed here.
    #[serde(default)]
    pub grants: PluginGrants,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginGrants {
    /// See the values of masked/non-public variables (otherwise they arrive empty).
    #[serde(default)]
    pub secrets: bool,
}

impl PluginConfig {
    /// An entry made in code (tests, benchmarks) rather than read from a file.
    pub fn new(path: PathBuf, name: Option<String>, config: toml::Table) -> Self {
        PluginConfig {
            raw_path: toml::Spanned::new(0..0, path.clone()),
            path,
            name,
            raw_config: None,
            config,
            origin: None,
            memory_limit: None,
            timeout: None,
            grants: PluginGrants::default(),
        }
    }

    /// A plugin from the command line: `P.wasm`, `P.wasm=CONFIG.toml` (the file is the
    /// plugin's table, what `[runners.kubernetes.plugins.config]` would hold) or
    /// `P.wasm={ key = "value" }` (an inline TOML table). The value splits at the first
    /// `.wasm=`, so paths with `=` elsewhere still work.
    pub fn from_arg(arg: &str) -> Result<PluginConfig, ConfigError> {
        let invalid = |message: String| ConfigError::PluginArg { arg: cut_message(arg.to_string()), message };
        let Some(at) = arg.find(".wasm=") else {
            return Ok(PluginConfig::new(PathBuf::from(arg), None, toml::Table::new()));
        };
        let (path, given) = (PathBuf::from(&arg[..at + ".wasm".len()]), &arg[at + ".wasm=".len()..]);
        if given.trim_start().starts_with('{') {
            let doc = format!("config = {given}");
            let mut table: toml::Table = toml::from_str(&doc)
                .map_err(|e| invalid(format!("not an inline TOML table: {}", e.message().trim())))?;
            let Some(toml::Value::Table(config)) = table.remove("config") else {
                return Err(invalid("not an inline TOML table".into()));
            };
            return Ok(PluginConfig::new(path, None, config));
        }
        let file = PathBuf::from(given);
        let text = read_text_file(&file, limits::CONFIG_BYTES)
            .map_err(|source| ConfigError::Read { path: file.clone(), source })?;
        let de = toml::Deserializer::parse(&text).map_err(|e| toml_error(&text, &file, "", &e))?;
        let config: toml::Table = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            toml_error(&text, &file, &key, e.inner())
        })?;
        let mut plugin = PluginConfig::new(path, None, config);
        plugin.origin = Some(ConfigOrigin::of_file(&text, &file));
        Ok(plugin)
    }

    /// Resolves the path against `base` and records where the entry's table is in `text`.
    fn resolve(&mut self, text: &str, file: &Path, base: &Path, key: String) {
        self.path = base.join(self.raw_path.get_ref());
        let key = format!("{key}.config");
        self.origin = Some(match &self.raw_config {
            Some(table) => {
                self.config = table.get_ref().clone();
                ConfigOrigin::of_table(text, file, table.span(), key)
            }
            // No table: a rejection (a required key) points at the entry's `path`.
            None => {
                let (line, column) = line_col(text, self.raw_path.span().start);
                ConfigOrigin { path: file.to_path_buf(), line, column, key, keys: BTreeMap::new() }
            }
        });
    }
}

/// Where a plugin's configuration table is in a file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigOrigin {
    pub path: PathBuf,
    /// 1-based position of the table (its `[...config]` header or inline `{`).
    pub line: usize,
    pub column: usize,
    /// The table's key path, e.g. `runners[0].kubernetes.plugins[1].config`; empty when the
    /// table is the whole file.
    pub key: String,
    /// 1-based positions of the table's own keys, so an error naming one points at its line.
    pub keys: BTreeMap<String, (usize, usize)>,
}

impl ConfigOrigin {
    /// `file:line:col: key `...`: ` for a rejection whose reason is `reason`: at the key the
    /// reason names (serde's messages quote it in backticks) when the table has it, else at
    /// the table.
    pub fn locate(&self, reason: &str) -> String {
        let named = reason.split('`').skip(1).step_by(2).find_map(|k| self.keys.get_key_value(k));
        let (key, (line, column)) = match named {
            Some((k, pos)) if self.key.is_empty() => (k.clone(), *pos),
            Some((k, pos)) => (format!("{}.{k}", self.key), *pos),
            None if self.key.is_empty() => ("(document)".to_string(), (self.line, self.column)),
            None => (self.key.clone(), (self.line, self.column)),
        };
        format!("{}:{line}:{column}: key `{key}`", self.path.display())
    }
}

impl ConfigOrigin {
    /// The table at byte range `span` of `text`: an inline `{ ... }`, or a `[...config]`
    /// header whose keys are the lines after it, up to the next header.
    pub fn of_table(text: &str, file: &Path, span: std::ops::Range<usize>, key: String) -> Self {
        let (line, column) = line_col(text, span.start);
        let inline = text.get(span.clone()).is_some_and(|t| t.trim_start().starts_with('{'));
        let region = if inline {
            span.clone()
        } else {
            let rest = &text[span.end.min(text.len())..];
            let end = rest
                .match_indices('\n')
                .map(|(i, _)| i + 1)
                .find(|&i| rest[i..].trim_start().starts_with('['))
                .unwrap_or(rest.len());
            span.end..span.end + end
        };
        ConfigOrigin { path: file.to_path_buf(), line, column, key, keys: key_positions(text, region, inline) }
    }

    /// A whole file that is one plugin's table (`--plugin P.wasm=FILE.toml`).
    pub fn of_file(text: &str, file: &Path) -> Self {
        ConfigOrigin {
            path: file.to_path_buf(),
            line: 1,
            column: 1,
            key: String::new(),
            keys: key_positions(text, 0..text.len(), false),
        }
    }
}

/// 1-based positions of the keys written directly in a table (`key =` at a line start, or
/// after `{`/`,` inline). A heuristic for messages only: a nested inline table's keys may be
/// taken for the outer table's, in which case the message points one key off, never nowhere.
fn key_positions(text: &str, region: std::ops::Range<usize>, inline: bool) -> BTreeMap<String, (usize, usize)> {
    static HEADER: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    static INLINE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = if inline {
        INLINE.get_or_init(|| {
            regex::Regex::new(r#"[{,]\s*(?:"([^"\n]+)"|'([^'\n]+)'|([A-Za-z0-9_-]+))\s*="#).expect("static regex")
        })
    } else {
        HEADER.get_or_init(|| {
            regex::Regex::new(r#"(?m)^[ \t]*(?:"([^"\n]+)"|'([^'\n]+)'|([A-Za-z0-9_-]+))[ \t]*="#)
                .expect("static regex")
        })
    };
    let Some(slice) = text.get(region.clone()) else { return BTreeMap::new() };
    let mut keys = BTreeMap::new();
    for caps in re.captures_iter(slice) {
        let Some(m) = caps.get(1).or_else(|| caps.get(2)).or_else(|| caps.get(3)) else { continue };
        keys.entry(m.as_str().to_string()).or_insert_with(|| line_col(text, region.start + m.start()));
    }
    keys
}

/// A Kubernetes resource quantity (`500m`, `1Gi`, `2`), checked when the config is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Quantity(pub String);

/// Whether `s` is a Kubernetes quantity. Shared with the job's overwrite variables.
pub use keel_contract::quantity::is_quantity;

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Quantity;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a Kubernetes quantity such as \"500m\", \"1Gi\" or 2")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Quantity, E> {
                if is_quantity(s) {
                    Ok(Quantity(s.to_string()))
                } else {
                    Err(E::custom(format!("{s:?} is not a Kubernetes quantity (examples: \"500m\", \"1Gi\", \"2\")")))
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Quantity, E> {
                if n < 0 {
                    return Err(E::custom(format!("quantity {n} is negative")));
                }
                Ok(Quantity(n.to_string()))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Quantity, E> {
                Ok(Quantity(n.to_string()))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Quantity, E> {
                if n < 0.0 || !n.is_finite() {
                    return Err(E::custom(format!("quantity {n} is not a non-negative number")));
                }
                Ok(Quantity(n.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A pod volume name: a DNS-1123 label (lower-case letters, digits, '-'; at most 63).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct VolumeName(pub String);

/// Whether `s` is a DNS-1123 label, as Kubernetes requires for volume and container names.
pub use keel_contract::pod::is_dns_label;

impl<'de> Deserialize<'de> for VolumeName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if !is_dns_label(&s) {
            return Err(de::Error::custom(format!(
                "{s:?} is not a valid volume name (lower-case letters, digits and '-', at most 63 characters)"
            )));
        }
        Ok(VolumeName(s))
    }
}

/// An `*_overwrite_allowed` regular expression. Empty means the overwrite is disabled.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct OverwriteRegex(pub String);

impl<'de> Deserialize<'de> for OverwriteRegex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        compile_overwrite_regex(&s).map_err(de::Error::custom)?;
        Ok(OverwriteRegex(s))
    }
}

struct PullPolicyVisitor {
    allow_single: bool,
}

impl<'de> de::Visitor<'de> for PullPolicyVisitor {
    type Value = Vec<PullPolicy>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.allow_single {
            f.write_str("a pull policy (\"always\", \"if-not-present\", \"never\") or a list of them")
        } else {
            f.write_str("a list of pull policies (\"always\", \"if-not-present\", \"never\")")
        }
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        if !self.allow_single {
            return Err(E::invalid_type(de::Unexpected::Str(s), &self));
        }
        // GitLab treats an empty string as "not set".
        if s.is_empty() {
            return Ok(Vec::new());
        }
        PullPolicy::from_gitlab(s).map(|p| vec![p]).ok_or_else(|| {
            E::custom(format!("unknown pull policy {s:?}, expected \"always\", \"if-not-present\" or \"never\""))
        })
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(s) = seq.next_element::<String>()? {
            let p = PullPolicy::from_gitlab(&s).ok_or_else(|| {
                de::Error::custom(format!(
                    "unknown pull policy {s:?}, expected \"always\", \"if-not-present\" or \"never\""
                ))
            })?;
            if !out.contains(&p) {
                out.push(p);
            }
        }
        Ok(out)
    }
}

/// `"always"` or `["always", "if-not-present"]`; shared with the job's `image:pull_policy`.
pub fn one_or_many_pull_policies<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PullPolicy>, D::Error> {
    d.deserialize_any(PullPolicyVisitor { allow_single: true })
}

fn many_pull_policies<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PullPolicy>, D::Error> {
    d.deserialize_any(PullPolicyVisitor { allow_single: false })
}

/// A byte count: an integer or a quantity-like string (`64Mi`, `1G`, `512k`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

pub fn parse_byte_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"64Mi\" or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<ByteSize, E> {
                u64::try_from(n).map(ByteSize).map_err(|_| E::custom(format!("size {n} is negative")))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ByteSize, E> {
                parse_byte_size(s)
                    .map(ByteSize)
                    .ok_or_else(|| E::custom(format!("{s:?} is not a size (examples: \"64Mi\", \"1G\", 1048576)")))
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration in GitLab's human style: `"1h 30m"`, `"90 minutes"`, `"2s"`, `"500ms"`, or a
/// bare number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GitlabDuration(pub Duration);

/// Parse `"1h 30m"`, `"3 hours 30 minutes"`, `"1 day"`, `"500ms"`, `"3600"` (seconds).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
        if rest.is_empty() {
            break;
        }
        if let Some(r) = rest.strip_prefix("and ") {
            rest = r;
            continue;
        }
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_end == 0 {
            return None;
        }
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = rest[num_end..].trim_start();
        let unit_end = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let secs: f64 = match unit {
            "ms" | "msec" | "millisecond" | "milliseconds" => 0.001,
            "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
            "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3600.0,
            "d" | "day" | "days" => 86_400.0,
            "w" | "week" | "weeks" => 604_800.0,
            _ => return None,
        };
        total += Duration::try_from_secs_f64(n * secs).ok()?;
    }
    Some(total)
}

impl<'de> Deserialize<'de> for GitlabDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = GitlabDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"2s\", \"1h 30m\" or a number of seconds")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<GitlabDuration, E> {
                Ok(GitlabDuration(Duration::from_secs(n)))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<GitlabDuration, E> {
                u64::try_from(n)
                    .map(|n| GitlabDuration(Duration::from_secs(n)))
                    .map_err(|_| E::custom(format!("duration {n} is negative")))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<GitlabDuration, E> {
                parse_duration(s).map(GitlabDuration).ok_or_else(|| {
                    E::custom(format!("{s:?} is not a duration (examples: \"2s\", \"1h 30m\", \"90 minutes\")"))
                })
            }
        }
        d.deserialize_any(V)
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
            ConfigError::Invalid { path: path.to_path_buf(), line, column, key: "(document)".into(), message }
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
                        return Err(ConfigError::InvalidNoSpan {
                            path: path.to_path_buf(),
                            key,
                            message: "set either `patch` or `patch_path`, not both".into(),
                        });
                    }
                    (None, None) => {
                        return Err(ConfigError::InvalidNoSpan {
                            path: path.to_path_buf(),
                            key,
                            message: "one of `patch` or `patch_path` is required".into(),
                        });
                    }
                    (None, Some(p)) => {
                        let full = base.join(p);
                        let text =
                            read_text_file(&full, limits::YAML_BYTES).map_err(|source| ConfigError::PatchRead {
                                path: path.to_path_buf(),
                                key: format!("{key}.patch_path"),
                                patch_path: full.clone(),
                                source,
                            })?;
                        patch.patch = Some(text);
                    }
                    (Some(_), None) => {}
                }
                let text = patch.patch.as_deref().unwrap_or_default();
                check_patch(text, patch.patch_type).map_err(|message| ConfigError::PatchInvalid {
                    path: path.to_path_buf(),
                    key: format!("{key}.patch"),
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
                    return Err(ConfigError::InvalidNoSpan {
                        path: path.to_path_buf(),
                        key: format!("runners[{ri}].kubernetes.volumes.{kind}"),
                        message: format!("volume name {:?} is reserved for the host's own volumes", name.0),
                    });
                }
                if let Some(first) = seen.insert(&name.0, kind) {
                    return Err(ConfigError::InvalidNoSpan {
                        path: path.to_path_buf(),
                        key: format!("runners[{ri}].kubernetes.volumes.{kind}"),
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

/// Parse a pod_spec patch as GitLab does (YAML, which includes JSON) and check its shape.
pub fn parse_patch(text: &str, patch_type: PatchType) -> Result<serde_json::Value, String> {
    if text.len() > limits::YAML_BYTES {
        return Err(format!("the patch is {} bytes, over the limit of {}", text.len(), show_bytes(limits::YAML_BYTES)));
    }
    if let Err(limit) = check_yaml(text) {
        return Err(format!("{} (line {} column {})", limit.message, limit.line, limit.column));
    }
    let value: serde_json::Value = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    match patch_type {
        PatchType::Json => {
            serde_json::from_value::<json_patch::Patch>(value.clone())
                .map_err(|e| format!("not a JSON patch (RFC 6902): {e}"))?;
        }
        PatchType::Merge | PatchType::Strategic => {
            if !value.is_object() {
                return Err("expected a mapping of pod spec fields".into());
            }
        }
    }
    Ok(value)
}

fn check_patch(text: &str, patch_type: PatchType) -> Result<(), String> {
    parse_patch(text, patch_type).map(|_| ())
}

impl Kubernetes {
    /// Counts the pod is built from: each service and volume multiplies the pod's size.
    fn check_counts(&self, path: &Path, runner: usize, global_plugins: usize) -> Result<(), ConfigError> {
        let over = |key: &str, message: String| ConfigError::InvalidNoSpan {
            path: path.to_path_buf(),
            key: format!("runners[{runner}].kubernetes.{key}"),
            message,
        };
        if self.services.len() > limits::SERVICES {
            return Err(over(
                "services",
                format!("{} services, over the limit of {}", self.services.len(), limits::SERVICES),
            ));
        }
        let plugins = global_plugins + self.plugins.len();
        if plugins > limits::PLUGINS {
            return Err(over(
                "plugins",
                format!("{plugins} plugins (with the top-level [[plugins]]), over the limit of {}", limits::PLUGINS),
            ));
        }
        if self.pod_spec.len() > limits::PATCHES {
            return Err(over(
                "pod_spec",
                format!("{} patches, over the limit of {}", self.pod_spec.len(), limits::PATCHES),
            ));
        }
        let v = &self.volumes;
        let volumes = v.host_path.len() + v.pvc.len() + v.config_map.len() + v.secret.len() + v.empty_dir.len();
        if volumes > limits::VOLUMES {
            return Err(over("volumes", format!("{volumes} volumes, over the limit of {}", limits::VOLUMES)));
        }
        let annotations: usize = self.pod_annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
        if annotations > limits::ANNOTATION_BYTES {
            return Err(over(
                "pod_annotations",
                format!(
                    "{annotations} bytes of annotations, over Kubernetes' limit of {}",
                    show_bytes(limits::ANNOTATION_BYTES)
                ),
            ));
        }
        Ok(())
    }
}

fn toml_error(text: &str, path: &Path, key: &str, e: &toml::de::Error) -> ConfigError {
    let message = cut_message(e.message().trim().to_string());
    let key = if key.is_empty() || key == "." { "(document)".to_string() } else { cut_message(key.to_string()) };
    match e.span() {
        Some(span) => {
            let (line, column) = line_col(text, span.start);
            ConfigError::Invalid { path: path.to_path_buf(), line, column, key, message }
        }
        None => ConfigError::InvalidNoSpan { path: path.to_path_buf(), key, message },
    }
}

impl Kubernetes {
    /// `[runners.kubernetes]` as JSON with GitLab's key names, as handed to plugins.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    pub fn build_resources(&self) -> Resources {
        resources(
            &self.cpu_request,
            &self.cpu_limit,
            &self.memory_request,
            &self.memory_limit,
            &self.ephemeral_storage_request,
            &self.ephemeral_storage_limit,
        )
    }

    pub fn helper_resources(&self) -> Resources {
        resources(
            &self.helper_cpu_request,
            &self.helper_cpu_limit,
            &self.helper_memory_request,
            &self.helper_memory_limit,
            &self.helper_ephemeral_storage_request,
            &self.helper_ephemeral_storage_limit,
        )
    }

    pub fn service_resources(&self) -> Resources {
        resources(
            &self.service_cpu_request,
            &self.service_cpu_limit,
            &self.service_memory_request,
            &self.service_memory_limit,
            &self.service_ephemeral_storage_request,
            &self.service_ephemeral_storage_limit,
        )
    }

    pub fn pod_resources(&self) -> Resources {
        resources(
            &self.pod_cpu_request,
            &self.pod_cpu_limit,
            &self.pod_memory_request,
            &self.pod_memory_limit,
            &None,
            &None,
        )
    }
}

fn resources(
    cpu_request: &Option<Quantity>,
    cpu_limit: &Option<Quantity>,
    memory_request: &Option<Quantity>,
    memory_limit: &Option<Quantity>,
    es_request: &Option<Quantity>,
    es_limit: &Option<Quantity>,
) -> Resources {
    let q = |v: &Option<Quantity>| v.as_ref().map(|q| q.0.clone());
    Resources {
        cpu_request: q(cpu_request),
        cpu_limit: q(cpu_limit),
        memory_request: q(memory_request),
        memory_limit: q(memory_limit),
        ephemeral_storage_request: q(es_request),
        ephemeral_storage_limit: q(es_limit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h 30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("3 hours 30 minutes"), Some(Duration::from_secs(12600)));
        assert_eq!(parse_duration("2h30m"), Some(Duration::from_secs(9000)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("3600"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1 day"), Some(Duration::from_secs(86400)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("5 fortnights"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn quantities() {
        for ok in ["1", "500m", "1Gi", "0.5", "1e3", "100Mi", "2k"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "1 Gi", "one", "1GB", "-1", "1.2.3"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("64Mi"), Some(64 << 20));
        assert_eq!(parse_byte_size("1G"), Some(1_000_000_000));
        assert_eq!(parse_byte_size("12"), Some(12));
        assert_eq!(parse_byte_size("12 parsecs"), None);
    }

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
