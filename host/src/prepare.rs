//! Everything a job goes through before any API call: config -> job -> plugins (overwrites,
//! pull policies) -> pod -> mutators -> the strategy's `prepare`. `render` prints the result;
//! `run` creates it and keeps the job's plugin instances for the stages.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::Instrument;

use crate::config::{Config, ConfigError, Kubernetes, PluginConfig, Runner};
use crate::job::cache::JobCache;
use crate::job::overwrites::OverwriteError;
use crate::job::parse::{JobContext, JobError, JobSource};
use crate::job::{Job, Overwrites, PullPolicy};
use crate::plugins::{
    HostOwned, JobPlugins, Limits, Plugin, PluginError, PluginSpec, Role, Runtime, StrategyBinding, StrategyServices,
};
use crate::pod::{self, JobObjects, PodContext, PodError, PullPolicies};

/// Where `host` looks for first-party plugins (`exec.wasm`, ...) by name, after
/// `KEEL_PLUGIN_PATH`: next to the binary (`<bin>/plugins`, `<bin>/../plugins` — which is
/// `target/plugins` for a cargo build — and `<bin>/../lib/keel/plugins` for an install).
pub const PLUGIN_PATH_ENV: &str = "KEEL_PLUGIN_PATH";

/// The strategy used when nothing chooses one.
pub const DEFAULT_STRATEGY: &str = "attach";

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
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
    /// `what`: `` `name` (path) `` when the operator named it, else the path.
    #[error("cannot load plugin {what}")]
    LoadPlugin {
        what: String,
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
    #[error("execution strategy {wanted:?} (from {origin}): {reason}")]
    Strategy { wanted: String, origin: &'static str, reason: String },
    #[error(
        "more than one execution strategy is loaded ({names}); choose one with --strategy or `strategy` in [runners.kubernetes]"
    )]
    AmbiguousStrategy { names: String },
}

/// Where the job comes from: a YAML file (`host run`, `host render`) or GitLab (`host serve`).
#[derive(Debug, Clone)]
pub enum JobInput {
    File(JobSource),
    Gitlab(Arc<crate::gitlab::JobPayload>),
}

impl JobInput {
    /// What messages call the job's origin: the file, or `GitLab job N`.
    pub fn origin(&self) -> PathBuf {
        match self {
            JobInput::File(source) => source.path.clone(),
            JobInput::Gitlab(payload) => crate::job::from_gitlab::origin(payload),
        }
    }

    /// The job, under the same variable and secrecy rules whichever the source.
    fn load(&self, ctx: JobContext) -> Result<(Job, Vec<JobCache>), JobError> {
        match self {
            JobInput::File(source) => crate::job::parse::load_with_caches(source, &ctx),
            JobInput::Gitlab(payload) => {
                let ctx = crate::job::from_gitlab::context(payload, ctx);
                crate::job::from_gitlab::job_with_caches(payload, &ctx)
            }
        }
    }
}

impl From<JobSource> for JobInput {
    fn from(source: JobSource) -> JobInput {
        JobInput::File(source)
    }
}

/// Inputs of one prepare (the command line, as a library call).
#[derive(Debug, Clone)]
pub struct PrepareRequest {
    /// `None`: the built-in configuration ([`Config::builtin`]).
    pub config: Option<PathBuf>,
    /// Runner by `name`; default: the first runner with `executor = "kubernetes"`.
    pub runner: Option<String>,
    pub job: JobInput,
    /// Plugins run after the config's own, in this order (`--plugin P.wasm[=CONFIG]`).
    pub extra_plugins: Vec<PluginConfig>,
    /// `--strategy`: a strategy plugin's name or a `.wasm` path.
    pub strategy: Option<String>,
    pub job_id: u64,
    pub project_id: u64,
    pub project_path: String,
    /// See [`PodContext::object_suffix`]; empty = the job id.
    pub object_suffix: String,
    /// The commit of the sources (`CI_COMMIT_*`), when known.
    pub commit: Option<crate::job::variables::Commit>,
    /// Whether a missing strategy is an error (`run`) or only leaves the base pod (`render`).
    pub require_strategy: bool,
    /// The pipeline this job is part of (`CI_PIPELINE_ID`); `None`: a pipeline of its own.
    pub pipeline_id: Option<u64>,
    /// Set over the job's own variables (`parallel:` instances).
    pub instance_variables: Vec<(String, String)>,
}

/// A job ready to be created: its objects, its plugins' live instances, and what was decided.
pub struct PreparedJob {
    pub config_path: Option<PathBuf>,
    pub config: Config,
    pub runner: Runner,
    pub k8s: Kubernetes,
    pub job: Job,
    /// The job's `cache:` entries, keys expanded.
    pub caches: Vec<JobCache>,
    pub requested: Overwrites,
    pub accepted: Overwrites,
    pub policies: PullPolicies,
    pub objects: JobObjects,
    pub plugins: JobPlugins,
    /// Pod access and trace of the job's strategy (set up by `run` once the pod runs).
    pub services: Arc<StrategyServices>,
}

impl PreparedJob {
    /// The strategy plugin's name, for messages.
    pub fn strategy_name(&self) -> Option<&str> {
        self.plugins.strategy().map(Plugin::name)
    }
}

/// The labels the host finds its objects by; no plugin may change them.
pub fn host_owned() -> HostOwned {
    // The SDK's test harness checks mutators against the same rules.
    HostOwned::job_pod()
}

/// Turn a `[[runners.kubernetes.plugins]]` entry into the runtime's spec.
pub fn plugin_spec(p: &PluginConfig) -> PluginSpec {
    let defaults = Limits::default();
    PluginSpec {
        name: p.name.clone().unwrap_or_default(),
        path: p.path.clone(),
        config: p.config.clone(),
        origin: p.origin.clone(),
        limits: Limits {
            memory_bytes: p.memory_limit.map(|m| m.0).unwrap_or(defaults.memory_bytes),
            call_timeout: p.timeout.map(|t| t.0).unwrap_or(defaults.call_timeout),
        },
        grants: crate::plugins::Grants { secrets: p.grants.secrets },
    }
}

async fn load(rt: &Runtime, spec: PluginSpec) -> Result<Plugin, PrepareError> {
    let path = spec.path.clone();
    let what =
        if spec.name.is_empty() { path.display().to_string() } else { format!("`{}` ({})", spec.name, path.display()) };
    rt.load(spec).await.map_err(|source| PrepareError::LoadPlugin { what, path, source: Box::new(source) })
}

/// The config's plugins (top-level `[[plugins]]`, then the runner's), then `extra` ones
/// (`--plugin`), loaded: each is compiled, asked who it is and configured with its table.
pub async fn load_plugins(
    rt: &Runtime,
    config: &Config,
    k8s: &Kubernetes,
    extra: &[PluginConfig],
) -> Result<Vec<Plugin>, PrepareError> {
    let specs: Vec<PluginSpec> = config.plugins.iter().chain(&k8s.plugins).chain(extra).map(plugin_spec).collect();
    let mut plugins = Vec::with_capacity(specs.len());
    for spec in specs {
        plugins.push(load(rt, spec).await?);
    }
    Ok(plugins)
}

/// Directories searched for first-party plugins by name, in order.
pub fn plugin_search_path() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os(PLUGIN_PATH_ENV)
        .map(|v| std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()).collect())
        .unwrap_or_default();
    if let Some(bin_dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        dirs.push(bin_dir.join("plugins"));
        dirs.push(bin_dir.join("../plugins"));
        dirs.push(bin_dir.join("../lib/keel/plugins"));
    }
    dirs
}

/// A first-party plugin `name` (e.g. `exec`) from the search path.
pub fn find_first_party(name: &str) -> Option<PathBuf> {
    plugin_search_path().into_iter().map(|d| d.join(format!("{name}.wasm"))).find(|p| p.is_file())
}

/// Which strategy runs the job: `--strategy`, else the config's `strategy`, else the single
/// strategy plugin loaded, else the first-party default. `Ok(None)` only when nothing is
/// found and none was asked for by name.
async fn choose_strategy(
    rt: &Runtime,
    loaded: &[Plugin],
    wanted: Option<(&str, &'static str)>,
) -> Result<Option<Plugin>, PrepareError> {
    let strategies: Vec<&Plugin> = loaded.iter().filter(|p| p.has_role(Role::ExecutionStrategy)).collect();
    let (wanted, origin) = match wanted {
        Some(w) => w,
        None => match strategies.as_slice() {
            [one] => return Ok(Some((*one).clone())),
            [] => {
                if find_first_party(DEFAULT_STRATEGY).is_none() {
                    tracing::debug!(searched = %path_hint(), "no first-party strategy plugin found");
                    return Ok(None);
                }
                (DEFAULT_STRATEGY, "the built-in default")
            }
            many => {
                let names = many.iter().map(|p| format!("`{}`", p.name())).collect::<Vec<_>>().join(", ");
                return Err(PrepareError::AmbiguousStrategy { names });
            }
        },
    };
    let err = |reason: String| PrepareError::Strategy { wanted: wanted.to_string(), origin, reason };
    let as_path = Path::new(wanted);
    let path =
        if wanted.ends_with(".wasm") || as_path.components().count() > 1 { Some(as_path.to_path_buf()) } else { None };
    let plugin = match path {
        Some(path) => match loaded.iter().find(|p| p.path() == path) {
            Some(p) => p.clone(),
            None => load(rt, PluginSpec { path, ..PluginSpec::default() }).await?,
        },
        None => match loaded.iter().find(|p| p.name() == wanted) {
            Some(p) => p.clone(),
            None => match find_first_party(wanted) {
                Some(path) => load(rt, PluginSpec { name: wanted.to_string(), path, ..PluginSpec::default() }).await?,
                None => {
                    return Err(err(format!(
                        "no loaded plugin has that name and no {wanted}.wasm is in the plugin search path ({}; set {PLUGIN_PATH_ENV} or run `make plugins`)",
                        path_hint()
                    )));
                }
            },
        },
    };
    if !plugin.has_role(Role::ExecutionStrategy) {
        return Err(err(format!(
            "plugin `{}` ({}) does not have the execution-strategy role (roles: {})",
            plugin.name(),
            plugin.path().display(),
            plugin.roles().iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(Some(plugin))
}

fn path_hint() -> String {
    plugin_search_path().iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":")
}

/// GitLab's rule when no plugin decides ([`keel_contract::pull_policy::decide`], the rule the
/// `pull-policy` plugin applies too), with the runner config named when nothing is allowed.
pub fn default_pull_policies(
    image: &str,
    job: &[PullPolicy],
    config: &[PullPolicy],
    allowed: &[PullPolicy],
    config_path: &Path,
) -> Result<Vec<PullPolicy>, PrepareError> {
    let request = keel_contract::pull_policy::Request {
        image: image.to_string(),
        job: job.to_vec(),
        config: config.to_vec(),
        allowed: allowed.to_vec(),
    };
    keel_contract::pull_policy::decide(&request).map_err(|denied| PrepareError::PullPolicyNotAllowed {
        image: denied.image,
        policies: denied.requested,
        allowed: denied.allowed,
        config: config_path.to_path_buf(),
    })
}

/// Config -> job -> plugins -> pod -> mutators -> strategy `prepare`.
pub async fn prepare(rt: &Runtime, req: &PrepareRequest) -> Result<PreparedJob, PrepareError> {
    let (config, config_label) = match &req.config {
        Some(path) => (Config::load(path)?, path.clone()),
        None => (Config::builtin(), PathBuf::from("(built-in config)")),
    };
    let runner = config.runner(req.runner.as_deref(), &config_label)?.clone();
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
        // Alone, a job is a pipeline of its own.
        pipeline_id: req.pipeline_id.unwrap_or(req.job_id),
        commit: req.commit.clone(),
        instance_variables: req.instance_variables.clone(),
    };
    let (job, caches) = req.job.load(ctx)?;
    let span = tracing::info_span!("job", job.id = job.id, job.name = %job.name);
    async {
        let requested = crate::job::overwrites::requested(&job)
            .map_err(|source| PrepareError::Overwrites { path: req.job.origin(), source })?;
        let plugins = load_plugins(rt, &config, &k8s, &req.extra_plugins).await?;
        let wanted = match (&req.strategy, &k8s.strategy) {
            (Some(s), _) => Some((s.as_str(), "--strategy")),
            (None, Some(s)) => Some((s.as_str(), "[runners.kubernetes] strategy")),
            (None, None) => None,
        };
        let strategy = choose_strategy(rt, &plugins, wanted).await?;
        if strategy.is_none() && req.require_strategy {
            return Err(PrepareError::Strategy {
                wanted: DEFAULT_STRATEGY.to_string(),
                origin: "the built-in default",
                reason: format!(
                    "no {DEFAULT_STRATEGY}.wasm in the plugin search path ({}); build the first-party plugins with `make plugins` or set {PLUGIN_PATH_ENV}",
                    path_hint()
                ),
            });
        }
        let services = StrategyServices::new();
        let binding = strategy.map(|plugin| StrategyBinding { plugin, services: services.clone() });
        let mut jp = JobPlugins::with_strategy(rt, &plugins, &job, &k8s.to_json(), binding)
            .await
            .map_err(|source| PrepareError::Plugins { stage: "starting for the job", source: Box::new(source) })?;

        let decision = jp.overwrites(requested.clone()).await.map_err(|source| PrepareError::Plugins {
            stage: "reviewing the requested overwrites",
            source: Box::new(source),
        })?;
        let no_rules = matches!(decision, crate::plugins::OverwriteDecision::NoRulesLoaded);
        let accepted = decision.accepted_or_none();
        let refused = refused_overwrites(&requested, &accepted);
        if !refused.is_empty() {
            // Visible by default: a job author otherwise wonders why their variable did nothing.
            let reason = if no_rules {
                "no plugin with the overwrites role is loaded (deny by default)"
            } else {
                "not accepted by the overwrite rules"
            };
            tracing::warn!(job.id = job.id, overwrites.refused = %refused.join(", "), "requested overwrites refused: {reason}");
        }

        // Each distinct image once: build, services (config's and job's), helper.
        let mut images: Vec<(String, Vec<PullPolicy>)> = vec![(job.image.name.clone(), job.image.pull_policies.clone())];
        for s in &k8s.services {
            images.push((s.name.clone(), Vec::new()));
        }
        for s in &job.services {
            images.push((s.image.name.clone(), s.image.pull_policies.clone()));
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
                .map_err(|source| PrepareError::Plugins { stage: "deciding pull policies", source: Box::new(source) })?;
            let decided = match decided {
                Some(d) => d,
                None => default_pull_policies(&image, &own, &k8s.pull_policy, &k8s.allowed_pull_policies, &config_label)?,
            };
            policies.insert(image, decided);
        }

        let pod_ctx =
            PodContext { project_id: req.project_id, concurrent_id: 0, object_suffix: req.object_suffix.clone() };
        let mut objects = pod::build(&runner, &k8s, &job, &accepted, &policies, &pod_ctx)
            .map_err(|source| PrepareError::Pod { job: job.name.clone(), source })?;
        let rules = host_owned();
        objects.pod = jp
            .mutate_pod(objects.pod, &rules)
            .await
            .map_err(|source| PrepareError::Plugins { stage: "mutating the pod", source: Box::new(source) })?;
        objects.pod = jp.strategy_prepare(objects.pod, &rules).await.map_err(|source| PrepareError::Plugins {
            stage: "preparing the pod for the execution strategy",
            source: Box::new(source),
        })?;
        Ok(PreparedJob {
            config_path: req.config.clone(),
            config: config.clone(),
            runner: runner.clone(),
            k8s: k8s.clone(),
            job: job.clone(),
            caches: caches.clone(),
            requested,
            accepted,
            policies,
            objects,
            plugins: jp,
            services,
        })
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
