//! `[runners.kubernetes]`: GitLab Runner's Kubernetes executor keywords, volumes, `pod_spec`
//! patches, and what the host derives from them (resources, the table handed to plugins).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::plugins::PluginConfig;
use crate::input::{Located, check_yaml, limits, show_bytes};
use crate::vocab::values::{OverwriteRegex, Quantity, VolumeName, many_pull_policies, one_or_many_pull_policies};
use crate::vocab::{PullPolicy, Resources};

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
    /// The uids a job may ask for with `image:kubernetes:user` (services too); empty: any.
    #[serde(default)]
    pub allowed_users: Vec<String>,
    /// The gids a job may ask for (the `:gid` of `image:kubernetes:user`); empty: any.
    #[serde(default)]
    pub allowed_groups: Vec<String>,

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

pub(super) fn check_patch(text: &str, patch_type: PatchType) -> Result<(), String> {
    parse_patch(text, patch_type).map(|_| ())
}

impl Kubernetes {
    /// Counts the pod is built from: each service and volume multiplies the pod's size.
    pub(super) fn check_counts(&self, path: &Path, runner: usize, global_plugins: usize) -> Result<(), ConfigError> {
        let over = |key: &str, message: String| ConfigError::Invalid {
            at: Located::key(path, format!("runners[{runner}].kubernetes.{key}")),
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
