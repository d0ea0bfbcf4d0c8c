//! `host render`: every stage a real run goes through up to the API calls — config, job,
//! plugins (overwrites, pull policies, pod mutators), pod building — then the objects are
//! printed instead of created.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Pod, Secret};
use tracing::Instrument;

use crate::config::{Config, ConfigError, Kubernetes, PluginConfig};
use crate::job::overwrites::OverwriteError;
use crate::job::parse::{JobContext, JobError, JobSource};
use crate::job::{Job, Overwrites, PullPolicy};
use crate::plugins::{HostOwned, JobPlugins, Limits, Plugin, PluginError, PluginSpec, Runtime};
use crate::pod::{self, JobObjects, PodContext, PodError, PullPolicies};

/// What replaces secret values in rendered output unless `--show-secrets` is given.
pub const MASKED: &str = "[MASKED]";

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("{path}: job requests invalid overwrites")]
    Overwrites {
        path: PathBuf,
        #[source]
        source: OverwriteError,
    },
    #[error("cannot load plugin `{name}` ({path})")]
    LoadPlugin {
        name: String,
        path: PathBuf,
        #[source]
        source: Box<PluginError>,
    },
    #[error("plugins failed while {stage}")]
    Plugins {
        stage: &'static str,
        #[source]
        source: Box<PluginError>,
    },
    #[error(
        "pull_policy {policies:?} for image {image} is not one of the allowed_pull_policies {allowed:?} of runner config {config}"
    )]
    PullPolicyNotAllowed { image: String, policies: Vec<PullPolicy>, allowed: Vec<PullPolicy>, config: PathBuf },
    #[error("cannot build the pod for job {job:?}")]
    Pod {
        job: String,
        #[source]
        source: PodError,
    },
    #[error("cannot encode the rendered objects")]
    Encode(#[source] serde_json::Error),
    #[error("cannot write the rendered objects as YAML")]
    Yaml(#[source] yaml_rust2::EmitError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    #[default]
    Yaml,
    Json,
}

/// Inputs of one render (the command line, as a library call).
#[derive(Debug, Clone)]
pub struct RenderRequest {
    pub config: PathBuf,
    /// Runner by `name`; default: the first runner with `executor = "kubernetes"`.
    pub runner: Option<String>,
    pub job: JobSource,
    /// Plugins run after the config's own, in this order.
    pub extra_plugins: Vec<PathBuf>,
    pub job_id: u64,
    pub project_id: u64,
    pub project_path: String,
    pub show_secrets: bool,
    pub plugin_cache: Option<PathBuf>,
}

/// The outcome: the objects plus what happened to the requested overwrites.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub job: Job,
    pub requested: Overwrites,
    pub accepted: Overwrites,
    pub objects: JobObjects,
}

/// Turn a `[[runners.kubernetes.plugins]]` entry into the runtime's spec.
pub fn plugin_spec(p: &PluginConfig) -> PluginSpec {
    let defaults = Limits::default();
    PluginSpec {
        name: p.plugin_name(),
        path: p.path.clone(),
        config: p.config.clone(),
        limits: Limits {
            memory_bytes: p.memory_limit.map(|m| m.0).unwrap_or(defaults.memory_bytes),
            call_timeout: p.timeout.map(|t| t.0).unwrap_or(defaults.call_timeout),
        },
        grants: crate::plugins::Grants { secrets: p.grants.secrets },
    }
}

/// The config's plugins (top-level `[[plugins]]`, then the runner's), then `extra` ones
/// (named by file stem), loaded.
pub async fn load_plugins(
    rt: &Runtime,
    config: &Config,
    k8s: &Kubernetes,
    extra: &[PathBuf],
) -> Result<Vec<Plugin>, RenderError> {
    let mut specs: Vec<PluginSpec> = config.plugins.iter().chain(&k8s.plugins).map(plugin_spec).collect();
    for path in extra {
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        specs.push(PluginSpec { name, path: path.clone(), ..PluginSpec::default() });
    }
    let mut plugins = Vec::with_capacity(specs.len());
    for spec in specs {
        let (name, path) = (spec.name.clone(), spec.path.clone());
        let plugin =
            rt.load(spec).await.map_err(|source| RenderError::LoadPlugin { name, path, source: Box::new(source) })?;
        plugins.push(plugin);
    }
    Ok(plugins)
}

/// GitLab's rule when no plugin decides: the image's own policy, else the config's; with an
/// allow-list only allowed policies survive, and none surviving is an error.
pub fn default_pull_policies(
    image: &str,
    job: &[PullPolicy],
    config: &[PullPolicy],
    allowed: &[PullPolicy],
    config_path: &Path,
) -> Result<Vec<PullPolicy>, RenderError> {
    let wanted = if job.is_empty() { config } else { job };
    if allowed.is_empty() {
        return Ok(wanted.to_vec());
    }
    if wanted.is_empty() {
        // Only an allow-list: its first entry is the policy (GitLab's behaviour).
        return Ok(allowed.to_vec());
    }
    let kept: Vec<PullPolicy> = wanted.iter().copied().filter(|p| allowed.contains(p)).collect();
    if kept.is_empty() {
        return Err(RenderError::PullPolicyNotAllowed {
            image: image.to_string(),
            policies: wanted.to_vec(),
            allowed: allowed.to_vec(),
            config: config_path.to_path_buf(),
        });
    }
    Ok(kept)
}

/// Config -> job -> plugins -> pod. `rt` is shared so callers can reuse compiled plugins.
pub async fn render(rt: &Runtime, req: &RenderRequest) -> Result<Rendered, RenderError> {
    let config = Config::load(&req.config)?;
    let runner = config.runner(req.runner.as_deref(), &req.config)?;
    let k8s = runner.kubernetes.clone().unwrap_or_default();
    let ctx = JobContext {
        job_id: req.job_id,
        project_id: req.project_id,
        project_path: req.project_path.clone(),
        builds_dir: runner.builds_dir.clone().unwrap_or_else(|| "/builds".into()),
        concurrent_id: 0,
        runner_token: runner.token.clone(),
        environment: runner.environment.iter().map(|e| (e.key.clone(), e.value.clone())).collect(),
        default_image: k8s.image.clone().filter(|i| !i.is_empty()),
    };
    let job = crate::job::parse::load(&req.job, &ctx)?;
    let span = tracing::info_span!("job", job.id = job.id, job.name = %job.name);
    async {
        let requested = job
            .requested_overwrites()
            .map_err(|source| RenderError::Overwrites { path: req.job.path.clone(), source })?;
        let plugins = load_plugins(rt, &config, &k8s, &req.extra_plugins).await?;
        let mut jp = JobPlugins::new(rt, &plugins, &job, &k8s.to_json())
            .await
            .map_err(|source| RenderError::Plugins { stage: "starting for the job", source: Box::new(source) })?;

        let decision = jp
            .overwrites(requested.clone())
            .await
            .map_err(|source| RenderError::Plugins { stage: "reviewing the requested overwrites", source: Box::new(source) })?;
        let no_rules = matches!(decision, crate::plugins::OverwriteDecision::NoRulesLoaded);
        let accepted = decision.accepted_or_none();
        let refused = refused_overwrites(&requested, &accepted);
        if !refused.is_empty() {
            // Visible by default: a job author otherwise wonders why their variable did nothing.
            let reason = if no_rules { "no plugin with the overwrites role is loaded (deny by default)" } else { "not accepted by the overwrite rules" };
            tracing::warn!(job.id = job.id, overwrites.refused = %refused.join(", "), "requested overwrites refused: {reason}");
        }

        // Each distinct image once: build, services (config's and job's), helper.
        let mut images: Vec<(String, Vec<PullPolicy>)> = vec![(job.image.name.clone(), job.image.pull_policy.clone())];
        for s in &k8s.services {
            images.push((s.name.clone(), Vec::new()));
        }
        for s in &job.services {
            images.push((s.image.name.clone(), s.image.pull_policy.clone()));
        }
        images.push((pod::helper_image(&k8s), Vec::new()));
        let mut policies = PullPolicies::new();
        for (image, own) in images {
            if policies.contains_key(&image) {
                continue;
            }
            let decided = jp
                .pull_policies(&image, &own, &k8s.pull_policy, &k8s.allowed_pull_policies)
                .await
                .map_err(|source| RenderError::Plugins { stage: "deciding pull policies", source: Box::new(source) })?;
            let decided = match decided {
                Some(d) => d,
                None => default_pull_policies(&image, &own, &k8s.pull_policy, &k8s.allowed_pull_policies, &req.config)?,
            };
            policies.insert(image, decided);
        }

        let pod_ctx = PodContext { project_id: req.project_id, concurrent_id: 0 };
        let mut objects = pod::build(runner, &k8s, &job, &accepted, &policies, &pod_ctx)
            .map_err(|source| RenderError::Pod { job: job.name.clone(), source })?;
        let host_owned = HostOwned {
            labels: vec![pod::JOB_ID_LABEL.to_string(), pod::MANAGED_BY_LABEL.to_string(), "pod".to_string()],
        };
        objects.pod = jp
            .mutate_pod(objects.pod, &host_owned)
            .await
            .map_err(|source| RenderError::Plugins { stage: "mutating the pod", source: Box::new(source) })?;
        Ok(Rendered { job: job.clone(), requested, accepted, objects })
    }
    .instrument(span)
    .await
}

/// Names of the requested overwrites that did not come back accepted as requested.
pub fn refused_overwrites(requested: &Overwrites, accepted: &Overwrites) -> Vec<String> {
    let mut out = Vec::new();
    let mut opt = |name: &str, r: &Option<String>, a: &Option<String>| {
        if r.is_some() && r != a {
            out.push(name.to_string());
        }
    };
    opt("namespace", &requested.namespace, &accepted.namespace);
    opt("service_account", &requested.service_account, &accepted.service_account);
    opt("bearer_token", &requested.bearer_token, &accepted.bearer_token);
    for (class, r, a) in [
        ("build", &requested.build, &accepted.build),
        ("helper", &requested.helper, &accepted.helper),
        ("service", &requested.service, &accepted.service),
    ] {
        opt(&format!("{class}.cpu_request"), &r.cpu_request, &a.cpu_request);
        opt(&format!("{class}.cpu_limit"), &r.cpu_limit, &a.cpu_limit);
        opt(&format!("{class}.memory_request"), &r.memory_request, &a.memory_request);
        opt(&format!("{class}.memory_limit"), &r.memory_limit, &a.memory_limit);
        opt(&format!("{class}.ephemeral_storage_request"), &r.ephemeral_storage_request, &a.ephemeral_storage_request);
        opt(&format!("{class}.ephemeral_storage_limit"), &r.ephemeral_storage_limit, &a.ephemeral_storage_limit);
    }
    for (name, r, a) in [
        ("pod_labels", &requested.pod_labels, &accepted.pod_labels),
        ("pod_annotations", &requested.pod_annotations, &accepted.pod_annotations),
        ("node_selector", &requested.node_selector, &accepted.node_selector),
        ("node_tolerations", &requested.node_tolerations, &accepted.node_tolerations),
    ] {
        for (k, v) in r {
            if a.get(k) != Some(v) {
                out.push(format!("{name}.{k}"));
            }
        }
    }
    out
}

/// Replace secret values: env values of non-public variables and registry credentials.
pub fn redact(rendered: &mut Rendered) {
    let secret_keys: Vec<&str> = rendered.job.variables.iter().filter(|v| !v.public).map(|v| v.key.as_str()).collect();
    if let Some(spec) = rendered.objects.pod.spec.as_mut() {
        for c in spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten()) {
            for e in c.env.iter_mut().flatten() {
                if secret_keys.contains(&e.name.as_str()) && e.value.is_some() {
                    e.value = Some(MASKED.to_string());
                }
            }
        }
    }
    if let Some(secret) = rendered.objects.secret.as_mut() {
        redact_secret(secret);
    }
}

fn redact_secret(secret: &mut Secret) {
    // stringData keeps the placeholder readable instead of base64 of a placeholder.
    if let Some(data) = secret.data.take() {
        let string_data: BTreeMap<String, String> = data.into_keys().map(|k| (k, MASKED.to_string())).collect();
        secret.string_data = Some(string_data);
    }
}

/// The objects as JSON values, in creation order: Secret, Pod, Services.
pub fn to_values(objects: &JobObjects) -> Result<Vec<serde_json::Value>, RenderError> {
    let mut out = Vec::new();
    if let Some(s) = &objects.secret {
        out.push(serde_json::to_value(s).map_err(RenderError::Encode)?);
    }
    out.push(serde_json::to_value::<&Pod>(&objects.pod).map_err(RenderError::Encode)?);
    for s in &objects.services {
        out.push(serde_json::to_value(s).map_err(RenderError::Encode)?);
    }
    Ok(out)
}

/// Multi-document YAML (`---` before each object) or one JSON `v1/List`.
pub fn format(objects: &JobObjects, format: OutputFormat) -> Result<String, RenderError> {
    let values = to_values(objects)?;
    match format {
        OutputFormat::Yaml => {
            let mut out = String::new();
            for v in values {
                yaml::emit(&v, &mut out).map_err(RenderError::Yaml)?;
            }
            Ok(out)
        }
        OutputFormat::Json => {
            let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": values});
            let mut s = serde_json::to_string_pretty(&list).map_err(RenderError::Encode)?;
            s.push('\n');
            Ok(s)
        }
    }
}

/// YAML output for rendered objects, written by yaml-rust2's emitter.
///
/// serde_yaml_ng writes YAML 1.2, where `yes`, `on` or `y` are plain strings; kubectl and most
/// Kubernetes tooling read YAML 1.1, where they are booleans. yaml-rust2's emitter quotes every
/// string a YAML 1.1 reader could take for a bool, null or number, so the output means the same
/// to both.
mod yaml {
    use serde_json::Value;
    use yaml_rust2::{Yaml, YamlEmitter, yaml::Hash};

    fn to_yaml(v: &Value) -> Yaml {
        match v {
            Value::Null => Yaml::Null,
            Value::Bool(b) => Yaml::Boolean(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Yaml::Integer(i),
                // u64 above i64::MAX and floats keep their JSON spelling, which is valid YAML.
                None => Yaml::Real(n.to_string()),
            },
            Value::String(s) => Yaml::String(s.clone()),
            Value::Array(items) => Yaml::Array(items.iter().map(to_yaml).collect()),
            Value::Object(map) => {
                let mut hash = Hash::new();
                for (k, v) in map {
                    hash.insert(Yaml::String(k.clone()), to_yaml(v));
                }
                Yaml::Hash(hash)
            }
        }
    }

    /// Appends one YAML document (with its `---` header) to `out`.
    pub fn emit(v: &Value, out: &mut String) -> Result<(), yaml_rust2::EmitError> {
        let doc = to_yaml(v);
        YamlEmitter::new(out).dump(&doc)?;
        out.push('\n');
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trips_and_quotes_yaml11_specials() {
            let v = serde_json::json!({
                "a": "yes", "b": "on", "c": "12", "d": "plain-text/x.y", "e": "has space",
                "f": [1, "two", {"g": "h", "i": ["j"]}, [], {}], "k": {"l": null, "m": true},
                "n": "multi\nline", "o": "", "p": "-", "q": "1e3", "r": [["x"]]
            });
            let mut out = String::new();
            emit(&v, &mut out).expect("emits");
            for quoted in ["a: \"yes\"", "b: \"on\"", "c: \"12\"", "o: \"\"", "q: \"1e3\""] {
                assert!(out.contains(quoted), "{quoted} missing in\n{out}");
            }
            let back: Value = serde_yaml_ng::from_str(&out).unwrap_or_else(|e| panic!("invalid YAML {e}:\n{out}"));
            assert_eq!(back, v, "\n{out}");
        }
    }
}
