//! `host run`: a job's whole life on a cluster. Prepare (as `render`), connect, create the
//! objects, wait for the pod (failing fast on terminal states), copy the sources, run
//! `step_script` and then `after_script` through the strategy plugin, and always clean up.

pub mod artifacts;
pub mod cache;
pub mod cleanup;
mod create;
pub mod script;
mod sources;
mod stage;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tracing::Instrument;

use crate::cluster::session::JobPod;
use crate::cluster::{self, ConnectOptions, Connection};
use crate::job::PullPolicy;
use crate::plugins::Runtime;
use crate::prepare::{PrepareRequest, PreparedJob, prepare};
use crate::trace::{Trace, TraceOptions};
pub use cleanup::CLEANUP_TIMEOUT;
use cleanup::Cleanup;
use create::{Wait, current_policy, next_policy, set_pull_policy, wait_running};
use script::STEP_SCRIPT;
use sources::get_sources;
use stage::{StageEnd, run_stage};

/// GitLab's default job timeout (a project setting there).
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(3600);
/// GitLab's `RUNNER_AFTER_SCRIPT_TIMEOUT` default.
pub const AFTER_SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);
/// GitLab's `poll_timeout` default.
pub const DEFAULT_POLL_TIMEOUT: Duration = Duration::from_secs(180);

/// How a job ended. The process exit status follows from it ([`Outcome::exit_status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The job's script failed with this exit code.
    ScriptFailure {
        exit_code: i32,
    },
    /// The job's timeout stopped it.
    Timeout {
        after: Duration,
    },
    /// Ctrl-C or SIGTERM.
    Cancelled,
    /// Anything that is not the script's doing: the pod, a plugin, the API, a timeout waiting.
    SystemFailure {
        reason: String,
    },
    /// An image could not be pulled with any allowed pull policy (GitLab's `image_pull_failure`).
    ImagePullFailure {
        reason: String,
    },
}

impl Outcome {
    /// 0 success, 1 script failure, 2 system failure, 3 timeout, 130 cancelled.
    pub fn exit_status(&self) -> u8 {
        match self {
            Outcome::Success => 0,
            Outcome::ScriptFailure { .. } => 1,
            Outcome::SystemFailure { .. } | Outcome::ImagePullFailure { .. } => 2,
            Outcome::Timeout { .. } => 3,
            Outcome::Cancelled => 130,
        }
    }

    /// The job's last trace line, in GitLab's words.
    pub fn last_line(&self) -> String {
        match self {
            Outcome::Success => "Job succeeded".into(),
            Outcome::ScriptFailure { exit_code } => format!("ERROR: Job failed: exit code {exit_code}"),
            Outcome::Timeout { after } => {
                format!("ERROR: Job failed: execution took longer than {} seconds", after.as_secs())
            }
            Outcome::Cancelled => "ERROR: Job failed: canceled".into(),
            Outcome::SystemFailure { reason } | Outcome::ImagePullFailure { reason } => {
                format!("ERROR: Job failed (system failure): {reason}")
            }
        }
    }
}

/// Where a run's time went, logged at the end (target `keel::timings`, level info) with the
/// process's peak RSS: what the benchmark reads to break a job's time down.
#[derive(Debug)]
pub struct Phases {
    last: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn new(start: Instant) -> Self {
        Phases { last: start, done: Vec::new() }
    }

    fn mark(&mut self, phase: &'static str) -> Duration {
        let now = Instant::now();
        let took = now - self.last;
        self.done.push((phase, took));
        self.last = now;
        took
    }

    fn log(&self) {
        let phases: Vec<String> =
            self.done.iter().map(|(p, d)| format!("{p}={:.1}ms", d.as_secs_f64() * 1000.0)).collect();
        let peak_rss_kib = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches(" kB").to_string()))
            })
            .unwrap_or_default();
        tracing::info!(target: "keel::timings", phases = %phases.join(" "), peak_rss_kib = %peak_rss_kib, "job timings");
    }
}

/// Which cluster a job runs on.
pub enum ClusterChoice {
    /// Connect for this job (and close after): `host run`.
    Connect(Box<ConnectOptions>),
    /// A connection shared by many jobs: `host serve`.
    Shared(Arc<Connection>),
}

/// Where the project's files come from.
#[derive(Debug, Clone)]
pub enum Sources {
    /// A local directory, copied less `.git` and ignored files (`host run`).
    Dir(PathBuf),
    /// Fetched from GitLab with the job token, as the job's `GIT_*` variables ask (`host serve`),
    /// through the mirrors of `cache` when given.
    Git { info: crate::gitlab::payload::GitInfo, cache: Option<crate::sources::git::GitCache> },
}

/// How a job is run besides the prepare request.
pub struct RunOptions {
    pub cluster: ClusterChoice,
    pub sources: Sources,
    pub timestamps: bool,
    pub trace_file: Option<PathBuf>,
    /// ANSI colours in the trace (stdout is a terminal).
    pub color: bool,
    /// Masked in the trace besides the job's own secrets (the runner and job tokens).
    pub extra_secrets: Vec<String>,
    /// Token prefixes masked besides GitLab's defaults (the payload's `token_mask_prefixes`).
    pub token_prefixes: Vec<String>,
    /// Told each stage as it starts (GitLab Runner's names: `prepare_executor`, `get_sources`,
    /// `step_script`, `after_script`, `cleanup`), for `host serve`'s metrics.
    pub on_stage: Option<OnStage>,
    /// Told the outcome once it is known, before the cleanup (`host serve` reports it to GitLab
    /// then, while the pod is being deleted).
    pub on_outcome: Option<OnOutcome>,
    /// The job's artifacts and dependencies, and where they go (`host serve`: GitLab).
    pub artifacts: Option<artifacts::JobArtifacts>,
    /// `host run`'s cache directory: where caches go when `[runners.cache]` names no store.
    pub cache_dir: Option<PathBuf>,
}

pub type OnOutcome = Box<dyn FnOnce(&Outcome) + Send + Sync>;
pub type OnStage = Arc<dyn Fn(&str) + Send + Sync>;

impl RunOptions {
    fn stage(&self, name: &str) {
        if let Some(hook) = &self.on_stage {
            hook(name);
        }
    }
}

/// Ctrl-C/SIGTERM count: 1 cancels the job (after_script still runs), 2 skips after_script.
pub type Interrupts = tokio::sync::watch::Receiver<u32>;

async fn interrupted(rx: &mut Interrupts, at_least: u32) {
    loop {
        if *rx.borrow_and_update() >= at_least {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Runs one job to its end. The trace goes to `sink` (stdout for the command line); the
/// outcome's last line is written to it, and `opts.on_outcome` told, as soon as the job's
/// result is known: before its objects are deleted, which on a real cluster takes seconds.
/// Returns after the cleanup.
pub async fn run(
    rt: &Runtime,
    req: PrepareRequest,
    mut opts: RunOptions,
    sink: Box<dyn std::io::Write + Send>,
    mut interrupts: Interrupts,
) -> Outcome {
    let started = Instant::now();
    let mut phases = Phases::new(started);
    let prepared = prepare(rt, &req).await;
    phases.mark("prepare");
    let mut prepared = match prepared {
        Ok(p) => p,
        Err(e) => {
            // No trace yet (its masking needs the job): this line carries no job values.
            let outcome = Outcome::SystemFailure { reason: chain(&e) };
            let mut sink = sink;
            let _ = std::io::Write::write_all(&mut sink, format!("{}\n", outcome.last_line()).as_bytes());
            return outcome;
        }
    };
    let trace_opts = TraceOptions {
        timestamps: opts.timestamps,
        output_limit: prepared.runner.output_limit.unwrap_or(4096).saturating_mul(1024),
        trace_file: opts.trace_file.clone(),
        color: opts.color,
        token_prefixes: opts.token_prefixes.clone(),
    };
    let mut secrets = prepared.job.secret_values();
    secrets.extend(opts.extra_secrets.iter().filter(|s| !s.is_empty()).cloned());
    // The cache store's credentials are the host's alone; masked should a store's error echo one.
    secrets.extend(prepared.runner.cache.as_ref().map(|c| c.secrets()).unwrap_or_default());
    let trace = match Trace::new(trace_opts, secrets, sink) {
        Ok(t) => t,
        Err(e) => return Outcome::SystemFailure { reason: chain(&e) },
    };
    let write = trace.clone();
    prepared.services.set_trace(Arc::new(move |bytes: &[u8]| write.write(bytes)));
    let span = tracing::info_span!("job", job.id = prepared.job.id, job.name = %prepared.job.name);
    let mut on_outcome = opts.on_outcome.take();
    let outcome = async {
        trace.info(&format!("Running with keel {} (host {})", env!("CARGO_PKG_VERSION"), hostname()));
        trace.info("Preparing the \"kubernetes\" executor");
        opts.stage("prepare_executor");
        let connection = match &opts.cluster {
            ClusterChoice::Shared(c) => c.clone(),
            ClusterChoice::Connect(connect) => match cluster::connect(&prepared.k8s, connect).await {
                Ok(c) => {
                    if c.embedded.is_some() {
                        eprintln!(
                            "keel: no cluster configured (runner host, kubeconfig, in-cluster); started an embedded one for this job"
                        );
                    }
                    Arc::new(c)
                }
                Err(e) => {
                    let outcome =
                        Outcome::SystemFailure { reason: format!("cannot connect to a cluster: {}", chain(&e)) };
                    report(&trace, on_outcome.take(), &outcome);
                    return outcome;
                }
            },
        };
        trace.info(&format!("Using Kubernetes cluster {}", connection.via));
        phases.mark("connect");
        // From here on whatever the job creates is deleted, whichever way this ends.
        let mut cleanup = Cleanup::new(connection.clone(), prepared.k8s.cleanup_grace_period_seconds);
        let outcome = run_on(
            &mut prepared,
            &connection,
            &mut cleanup,
            &opts,
            opts.artifacts.as_ref(),
            &trace,
            &mut interrupts,
            &mut phases,
        )
        .await;
        report(&trace, on_outcome.take(), &outcome);
        opts.stage("cleanup");
        cleanup.run(&trace).await;
        phases.mark("cleanup");
        // Only a connection made for this job is closed (a shared one has other owners).
        if matches!(opts.cluster, ClusterChoice::Connect(_))
            && let Ok(connection) = Arc::try_unwrap(connection)
        {
            connection.close().await;
        }
        phases.mark("close");
        outcome
    }
    .instrument(span)
    .await;
    phases.log();
    outcome
}

/// The job's last trace line, and whoever waits for the outcome told.
fn report(trace: &Trace, on_outcome: Option<OnOutcome>, outcome: &Outcome) {
    match outcome {
        Outcome::Success => trace.success(&outcome.last_line()),
        _ => trace.error(&outcome.last_line()),
    }
    if let Some(tell) = on_outcome {
        tell(outcome);
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
}

#[allow(clippy::too_many_arguments)]
async fn run_on(
    prepared: &mut PreparedJob,
    connection: &Connection,
    cleanup: &mut Cleanup,
    opts: &RunOptions,
    artifacts: Option<&artifacts::JobArtifacts>,
    trace: &Trace,
    interrupts: &mut Interrupts,
    phases: &mut Phases,
) -> Outcome {
    let client = &connection.client;
    let namespace = prepared.objects.pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    trace.info(&format!("Using Kubernetes namespace: {namespace}"));
    trace.info(&format!(
        "Using Kubernetes executor with image {} and strategy {} ...",
        prepared.job.image.name,
        prepared.strategy_name().unwrap_or("-")
    ));
    let poll_timeout = prepared.k8s.poll_timeout.map(Duration::from_secs).unwrap_or(DEFAULT_POLL_TIMEOUT);
    trace.info("Preparing environment");

    // Create, wait; on a pull failure with another policy in the decided list, start over.
    let mut tried: Vec<(String, PullPolicy)> = Vec::new();
    let (pod_name, mut pod_watch) = loop {
        let pod = match cluster::create(client, &mut prepared.objects, &mut cleanup.created).await {
            Ok(p) => p,
            Err(e) => return Outcome::SystemFailure { reason: chain(&e) },
        };
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        match wait_running(&api, &name, &namespace, poll_timeout, trace, interrupts).await {
            Wait::Ready(w) => break (name, w),
            Wait::Failed(outcome) => return outcome,
            Wait::PullFailed { image, failure } => {
                let policy = current_policy(&prepared.objects.pod, &image);
                if let Some(p) = policy {
                    tried.push((image.clone(), p));
                }
                let tried_here: Vec<PullPolicy> = tried.iter().filter(|(i, _)| *i == image).map(|(_, p)| *p).collect();
                let Some(next) = policy.and_then(|_| next_policy(prepared, &image, &tried_here)) else {
                    return Outcome::ImagePullFailure { reason: format!("pod {namespace}/{name}: {failure}") };
                };
                trace.warning(&format!(
                    "WARNING: Failed to pull image {image:?} with policy {:?}: {failure}",
                    policy.map(|p| p.as_k8s()).unwrap_or("")
                ));
                trace.info(&format!("Attempt to pull image {image:?} again with policy {:?}", next.as_k8s()));
                // Everything goes (the Secrets are owned by the old pod), then is made anew.
                cleanup.now(trace).await;
                prepared.objects.pod.metadata.name = None;
                set_pull_policy(&mut prepared.objects.pod, &image, next);
            }
        }
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let job_pod = JobPod::new(pods.clone(), pod_name.clone(), &prepared.objects.pod);
    prepared.services.set_pod(job_pod.clone());
    trace.info(&format!("Running on {pod_name} via {}...", hostname()));
    crate::metrics::POD_START_SECONDS.observe(phases.mark("create->running").as_secs_f64());

    opts.stage("get_sources");
    let project_dir = prepared.job.variable("CI_PROJECT_DIR").unwrap_or("/builds/project").to_string();
    let copied = {
        let copy = get_sources(&prepared.job, &opts.sources, &job_pod, &project_dir, trace);
        tokio::pin!(copy);
        tokio::select! {
            r = &mut copy => r,
            f = pod_watch.failed(true) => Err(format!("pod {namespace}/{pod_name}: {f}")),
            _ = interrupted(interrupts, 1) => return Outcome::Cancelled,
        }
    };
    let tracked = match copied {
        Ok(t) => t,
        Err(reason) => return Outcome::SystemFailure { reason },
    };

    phases.mark("sources");
    if let Some(job_artifacts) = artifacts.filter(|a| a.dependencies.iter().any(|d| d.artifacts_file.is_some())) {
        opts.stage("download_artifacts");
        let downloaded = {
            let download = artifacts::download_dependencies(job_artifacts, &job_pod, &project_dir, trace);
            tokio::pin!(download);
            tokio::select! {
                r = &mut download => r,
                f = pod_watch.failed(true) => Err(format!("pod {namespace}/{pod_name}: {f}")),
                _ = interrupted(interrupts, 1) => return Outcome::Cancelled,
            }
        };
        if let Err(reason) = downloaded {
            return Outcome::SystemFailure { reason };
        }
        phases.mark("download_artifacts");
    }
    // The store is set up once per job (its client is cheap); a store that cannot be set up
    // is a warning, as a store that fails later is.
    let cache_store = if prepared.caches.is_empty() {
        None
    } else {
        match cache::CacheStore::from_config(
            prepared.runner.cache.as_ref(),
            opts.cache_dir.as_deref(),
            &prepared.runner.token,
        ) {
            Ok(s) => s,
            Err(e) => {
                trace.warning(&format!("WARNING: {}: caches are neither restored nor saved", chain(&e)));
                None
            }
        }
    };
    // Owned: the stages below borrow the prepared job mutably.
    let caches = prepared.caches.clone();
    let job_caches = cache::JobCaches {
        caches: &caches,
        store: cache_store.as_ref(),
        project_id: prepared.job.variable("CI_PROJECT_ID").and_then(|v| v.parse().ok()).unwrap_or(0),
        source_dir: match &opts.sources {
            Sources::Dir(d) => Some(d.as_path()),
            Sources::Git { .. } => None,
        },
        fallback_key: prepared.job.variable("CACHE_FALLBACK_KEY").map(str::to_string),
        compression: prepared.job.variable("CACHE_COMPRESSION_LEVEL").map(str::to_string),
    };
    if !caches.is_empty() {
        opts.stage("restore_cache");
        let restore = cache::restore(&job_caches, &job_pod, &project_dir, trace);
        tokio::pin!(restore);
        tokio::select! {
            _ = &mut restore => {}
            f = pod_watch.failed(true) => return Outcome::SystemFailure { reason: format!("pod {namespace}/{pod_name}: {f}") },
            _ = interrupted(interrupts, 1) => return Outcome::Cancelled,
        }
        phases.mark("restore_cache");
    }
    let (step, after) = script::job_scripts(&prepared.job.stages, opts.color);
    let timeout = prepared.job.timeout.unwrap_or(DEFAULT_JOB_TIMEOUT);
    let deadline = Instant::now() + timeout;

    trace.info(&format!("Executing \"{STEP_SCRIPT}\" stage of the job script"));
    opts.stage(STEP_SCRIPT);
    let step_result = run_stage(prepared, &job_pod, &step, deadline, &mut pod_watch, trace, interrupts, 1).await;
    phases.mark("step_script");
    let pod_dead = matches!(step_result, StageEnd::PodFailed(_));
    let outcome = match step_result {
        StageEnd::Exited(0) => Outcome::Success,
        StageEnd::Exited(code) => Outcome::ScriptFailure { exit_code: code },
        StageEnd::TimedOut => Outcome::Timeout { after: timeout },
        StageEnd::Cancelled => Outcome::Cancelled,
        StageEnd::Failed(reason) => Outcome::SystemFailure { reason },
        StageEnd::PodFailed(f) => Outcome::SystemFailure { reason: format!("pod {namespace}/{pod_name}: {f}") },
    };

    if let Some(after) = after {
        if *interrupts.borrow() >= 2 {
            trace.warning("WARNING: after_script skipped: interrupted twice");
        } else if pod_dead {
            trace.warning("WARNING: after_script skipped: the pod cannot run it");
        } else {
            trace.info("Running after_script");
            opts.stage("after_script");
            // GitLab Runner's knob, a job variable; the payload's step timeout is the job's.
            let limit = prepared
                .job
                .variable("RUNNER_AFTER_SCRIPT_TIMEOUT")
                .and_then(crate::vocab::values::parse_duration)
                .unwrap_or(AFTER_SCRIPT_TIMEOUT);
            let deadline = Instant::now() + limit;
            match run_stage(prepared, &job_pod, &after, deadline, &mut pod_watch, trace, interrupts, 2).await {
                StageEnd::Exited(0) => {}
                StageEnd::Exited(code) => trace.warning(&format!("WARNING: after_script failed with exit code {code}")),
                StageEnd::TimedOut => {
                    trace.warning(&format!("WARNING: after_script timed out after {}s", limit.as_secs()))
                }
                StageEnd::Cancelled => trace.warning("WARNING: after_script interrupted"),
                StageEnd::Failed(reason) => trace.warning(&format!("WARNING: after_script failed: {reason}")),
                StageEnd::PodFailed(f) => trace.warning(&format!("WARNING: after_script failed: {f}")),
            }
        }
    }
    phases.mark("after_script");
    // GitLab Runner's order: after_script, then the cache, then artifacts.
    if !caches.is_empty() && !pod_dead && *interrupts.borrow() < 2 {
        opts.stage("archive_cache");
        let save = cache::save(&job_caches, &job_pod, &project_dir, &tracked, &outcome, trace);
        tokio::select! {
            _ = save => {}
            _ = interrupted(interrupts, 2) => trace.warning("WARNING: saving the cache interrupted"),
        }
        phases.mark("archive_cache");
    }
    let outcome = match artifacts {
        Some(job_artifacts) if !pod_dead && *interrupts.borrow() < 2 && !job_artifacts.artifacts.is_empty() => {
            // GitLab Runner's stage names.
            opts.stage(if outcome == Outcome::Success {
                "upload_artifacts_on_success"
            } else {
                "upload_artifacts_on_failure"
            });
            let lookup = |k: &str| prepared.job.variable(k).map(str::to_string);
            let expand = |s: &str| crate::vocab::expand::expand(s, &lookup);
            let upload =
                artifacts::upload_artifacts(job_artifacts, &job_pod, &project_dir, &tracked, outcome, &expand, trace);
            // A second cancel stops an upload as it skips after_script.
            let outcome = tokio::select! {
                o = upload => o,
                _ = interrupted(interrupts, 2) => {
                    trace.warning("WARNING: uploading artifacts interrupted");
                    Outcome::Cancelled
                }
            };
            phases.mark("upload_artifacts");
            outcome
        }
        _ => outcome,
    };
    trace.info("Cleaning up project directory and file based variables");
    outcome
}
