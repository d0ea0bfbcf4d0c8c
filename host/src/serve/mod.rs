//! `host serve`: keel as a GitLab runner. Per `[[runners]]` entry: verify the token, then ask
//! for jobs (at most `request_concurrency` requests in flight, never more running jobs than
//! `limit` and `concurrent`: a slot is taken before asking, so GitLab never hands out a job we
//! cannot start), and run each job through the pipeline ([`JobExecutor`]) while its
//! [`JobSession`] reports to GitLab. Shutdown follows [`Controller`].

pub mod executor;
pub mod metrics;
pub mod settings;
pub mod shutdown;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Runner;
use crate::gitlab::{
    Cancel, Client, FailureReason, Finish, GitlabError, JobOutcome, JobPayload, JobReporter, JobRequest, JobSession,
    RunnerIdentity, VersionInfo,
};
pub use metrics::Metrics;
pub use settings::{RunnerSettings, ServeSettings};
pub use shutdown::{Controller, Shutdown};

/// What a job gets besides its payload.
pub struct JobContext {
    /// The `[[runners]]` entry the job was taken for (its `[runners.kubernetes]`, plugins...).
    pub runner: Arc<Runner>,
    /// Trace in, cancels out.
    pub reporter: JobReporter,
    /// The job's result as soon as it is known, before the pipeline's cleanup: GitLab hears it
    /// then, while the job's slot stays taken until the pipeline returns (its pods are gone).
    /// Dropped unsent, the pipeline's return value is the result.
    pub early_outcome: tokio::sync::oneshot::Sender<JobOutcome>,
}

/// The per-job pipeline. Must honour `ctx.reporter.cancel()` and clean up on every path.
pub trait JobExecutor: Send + Sync + 'static {
    fn run(&self, job: JobPayload, ctx: JobContext) -> BoxFuture<'static, JobOutcome>;
}

impl<F, Fut> JobExecutor for F
where
    F: Fn(JobPayload, JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = JobOutcome> + Send + 'static,
{
    fn run(&self, job: JobPayload, ctx: JobContext) -> BoxFuture<'static, JobOutcome> {
        Box::pin(self(job, ctx))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("no runner can be served: {}", .0.join("; "))]
    NoRunners(Vec<String>),
    #[error(transparent)]
    Listen(#[from] metrics::ListenError),
}

/// What a serve run did, for the caller's last words.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServeSummary {
    pub jobs_finished: usize,
    /// Jobs still running when the force grace ran out; their tasks were dropped.
    pub jobs_abandoned: Vec<u64>,
}

/// Jobs running now, so shutdown can cancel them.
#[derive(Default)]
struct Running {
    jobs: Mutex<HashMap<u64, RunningJob>>,
    finished: std::sync::atomic::AtomicUsize,
}

impl Running {
    fn cancel_all(&self, how: Cancel) {
        for job in self.jobs.lock().expect("jobs lock").values() {
            if let Some(reporter) = &job.reporter {
                reporter.request_cancel(how);
            }
        }
    }

    /// A job that starts while the shutdown already cancels is cancelled at once.
    fn register(&self, id: u64, reporter: &JobReporter, state: Shutdown) {
        if let Some(job) = self.jobs.lock().expect("jobs lock").get_mut(&id) {
            job.reporter = Some(reporter.clone());
        }
        match state {
            Shutdown::Cancelling => reporter.request_cancel(Cancel::Graceful),
            Shutdown::Forced => reporter.request_cancel(Cancel::Immediate),
            Shutdown::Running | Shutdown::Draining => {}
        }
    }
}

struct Shared {
    settings: ServeSettings,
    executor: Arc<dyn JobExecutor>,
    controller: Controller,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    running: Running,
    tasks: TaskTracker,
}

/// Runs until the controller's shutdown completes. Fails at once only when no runner can be
/// served (every token refused, or a client cannot be built) or the metrics address is taken.
pub async fn serve(
    settings: ServeSettings,
    executor: Arc<dyn JobExecutor>,
    controller: Controller,
    metrics: Arc<Metrics>,
) -> Result<ServeSummary, ServeError> {
    metrics.concurrent.set(settings.concurrent as i64);
    let http = match settings.listen_address {
        Some(address) => {
            let c = controller.clone();
            let (bound, task) =
                metrics::serve_http(address, metrics.clone(), async move { c.stopping().await }).await?;
            tracing::info!(address = %bound, "serve.metrics_listening");
            Some(task)
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        slots: Arc::new(Semaphore::new(settings.concurrent)),
        settings,
        executor,
        controller: controller.clone(),
        metrics,
        running: Running::default(),
        tasks: TaskTracker::new(),
    });

    let (verdicts, mut verdict_rx) = mpsc::unbounded_channel();
    let mut runner_tasks = Vec::new();
    for runner in &shared.settings.runners {
        shared.metrics.set_limit(&runner.name, runner.limit);
        let identity = RunnerIdentity {
            name: runner.name.clone(),
            url: runner.url.clone(),
            token: runner.token.clone(),
            system_id: shared.settings.system_id.clone(),
            info: VersionInfo::keel(shared.settings.features),
        };
        let mut options = shared.settings.client.clone();
        options.observer = Some(shared.metrics.clone());
        let client = match Client::new(identity, options) {
            Ok(client) => Arc::new(client),
            Err(e) => {
                tracing::error!(runner = %runner.name, error = %e, "serve.runner_unusable");
                let _ = verdicts.send(Err(e.to_string()));
                continue;
            }
        };
        let ctx = RunnerTask { shared: shared.clone(), runner: runner.clone(), client };
        runner_tasks.push(tokio::spawn(ctx.run(verdicts.clone())));
    }
    drop(verdicts);

    // Until every runner has a verdict: all refused is fatal; one verified is enough to serve.
    let mut refused = Vec::new();
    loop {
        tokio::select! {
            verdict = verdict_rx.recv() => match verdict {
                Some(Ok(())) => break,
                Some(Err(message)) => refused.push(message),
                None => {
                    controller.force();
                    shared.metrics.set_stopping();
                    if let Some(http) = http {
                        let _ = http.await;
                    }
                    return Err(ServeError::NoRunners(refused));
                }
            },
            _ = controller.stopping() => break,
        }
    }

    controller.stopping().await;
    shared.metrics.set_stopping();
    for task in runner_tasks {
        let _ = task.await;
    }
    let abandoned = wait_for_jobs(&shared).await;
    if let Some(http) = http {
        let _ = http.await;
    }
    let finished = shared.running.finished.load(std::sync::atomic::Ordering::SeqCst);
    Ok(ServeSummary { jobs_finished: finished, jobs_abandoned: abandoned })
}

/// Waits for the running jobs as the shutdown state says: all of them when draining; until
/// `shutdown_timeout` after a graceful cancel; `force_grace` after an immediate one. Returns
/// the jobs whose tasks had to be dropped.
async fn wait_for_jobs(shared: &Shared) -> Vec<u64> {
    shared.tasks.close();
    let mut state = shared.controller.subscribe();
    let mut cancel_deadline = None;
    loop {
        let current = *state.borrow_and_update();
        let deadline = match current {
            Shutdown::Running | Shutdown::Draining => None,
            Shutdown::Cancelling => {
                shared.running.cancel_all(Cancel::Graceful);
                Some(*cancel_deadline.get_or_insert_with(|| Instant::now() + shared.settings.shutdown_timeout))
            }
            Shutdown::Forced => {
                shared.running.cancel_all(Cancel::Immediate);
                let deadline = Instant::now() + shared.settings.force_grace;
                tokio::select! {
                    _ = shared.tasks.wait() => return Vec::new(),
                    _ = tokio::time::sleep_until(deadline) => {}
                }
                let jobs = shared.running.jobs.lock().expect("jobs lock");
                let ids: Vec<u64> = jobs.keys().copied().collect();
                for job in jobs.values() {
                    job.abort.abort();
                }
                tracing::error!(jobs = ?ids, "serve.jobs_abandoned");
                return ids;
            }
        };
        tokio::select! {
            _ = shared.tasks.wait() => return Vec::new(),
            _ = state.changed() => {}
            _ = sleep_until_opt(deadline) => {
                tracing::warn!(timeout = ?shared.settings.shutdown_timeout, "serve.shutdown_timeout");
                shared.controller.force();
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

struct RunnerTask {
    shared: Arc<Shared>,
    runner: RunnerSettings,
    client: Arc<Client>,
}

/// A runner's standing with GitLab, logged once per change.
#[derive(Default)]
struct Health {
    refusals: u32,
    errors: u32,
    last_problem: Option<String>,
}

impl RunnerTask {
    async fn run(self, verdict: mpsc::UnboundedSender<Result<(), String>>) {
        let this = Arc::new(self);
        if !this.verify(&verdict).await {
            return;
        }
        let limit = Arc::new(Semaphore::new(this.runner.limit.unwrap_or(Semaphore::MAX_PERMITS)));
        let health = Arc::new(Mutex::new(Health::default()));
        let last_update = Arc::new(Mutex::new(None::<String>));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..this.runner.request_concurrency {
            workers.spawn(this.clone().ask_for_jobs(limit.clone(), health.clone(), last_update.clone()));
        }
        while workers.join_next().await.is_some() {}
    }

    /// `runners/verify`, retried while GitLab is unreachable. False: do not serve.
    async fn verify(&self, verdict: &mpsc::UnboundedSender<Result<(), String>>) -> bool {
        let name = &self.runner.name;
        let mut delay = self.shared.settings.check_interval;
        let mut last_problem = None;
        loop {
            let attempt = tokio::select! {
                r = self.client.verify() => r,
                _ = self.shared.controller.stopping() => return false,
            };
            match attempt {
                Ok(_) => {
                    tracing::info!(runner = %name, url = %self.runner.url, "serve.runner_serving");
                    self.shared.metrics.runner_verified();
                    let _ = verdict.send(Ok(()));
                    return true;
                }
                Err(e @ GitlabError::TokenRefused { .. }) => {
                    tracing::error!(runner = %name, error = %e, "serve.runner_token_refused");
                    let _ = verdict.send(Err(e.to_string()));
                    return false;
                }
                Err(e) => {
                    if last_problem.as_ref() != Some(&e.kind()) {
                        tracing::warn!(runner = %name, error = %e, retry_in = ?delay, "serve.runner_verify_failed");
                        last_problem = Some(e.kind());
                    }
                    if self.pause(delay).await {
                        return false;
                    }
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    /// Sleeps, or returns true at once when the shutdown begins.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = self.shared.controller.stopping() => true,
        }
    }

    async fn ask_for_jobs(
        self: Arc<Self>,
        limit: Arc<Semaphore>,
        health: Arc<Mutex<Health>>,
        last_update: Arc<Mutex<Option<String>>>,
    ) {
        let stopping = || self.shared.controller.stopping();
        loop {
            // Slots first: a job GitLab hands out must be able to start at once.
            let runner_slot = tokio::select! {
                p = limit.clone().acquire_owned() => p.expect("never closed"),
                _ = stopping() => return,
            };
            let global_slot = tokio::select! {
                p = self.shared.slots.clone().acquire_owned() => p.expect("never closed"),
                _ = stopping() => return,
            };
            let since = last_update.lock().expect("last_update lock").clone();
            // A shutdown drops the request in flight, as GitLab Runner does.
            let answer = tokio::select! {
                r = self.client.request_job(since.as_deref()) => r,
                _ = stopping() => return,
            };
            let delay = match answer {
                Ok(JobRequest::Job(job)) => {
                    self.healthy(&health);
                    self.start_job(*job, [runner_slot, global_slot]);
                    continue;
                }
                Ok(JobRequest::NoJob { last_update: seen }) => {
                    self.healthy(&health);
                    *last_update.lock().expect("last_update lock") = seen;
                    self.shared.settings.check_interval
                }
                Err(e) => self.unhealthy(&health, &e),
            };
            drop((runner_slot, global_slot));
            if self.pause(delay).await {
                return;
            }
        }
    }

    fn healthy(&self, health: &Mutex<Health>) {
        let mut h = health.lock().expect("health lock");
        if let Some(problem) = h.last_problem.take() {
            tracing::info!(runner = %self.runner.name, was = %problem, "serve.runner_healthy");
        }
        h.refusals = 0;
        h.errors = 0;
    }

    /// Logs a new kind of problem once and returns how long to back off.
    fn unhealthy(&self, health: &Mutex<Health>, e: &GitlabError) -> Duration {
        let settings = &self.shared.settings;
        let mut h = health.lock().expect("health lock");
        let delay = if let GitlabError::TokenRefused { .. } = e {
            h.refusals += 1;
            if h.refusals >= settings.unhealthy_after { settings.unhealthy_interval } else { settings.check_interval }
        } else {
            h.errors = (h.errors + 1).min(16);
            (settings.check_interval * 2u32.pow(h.errors.min(6))).min(Duration::from_secs(60))
        };
        if h.last_problem.as_ref() != Some(&e.kind()) {
            tracing::warn!(runner = %self.runner.name, error = %e, retry_in = ?delay, "serve.runner_unhealthy");
            h.last_problem = Some(e.kind());
        }
        delay
    }

    fn start_job(self: &Arc<Self>, job: JobPayload, slots: [OwnedSemaphorePermit; 2]) {
        let span = tracing::info_span!(
            "job",
            job.id = job.id,
            job.project = job.job_info.project_id,
            job.name = %job.job_info.name,
            runner = %self.runner.name,
        );
        let id = job.id;
        let this = self.clone();
        // Held while spawning, so the task cannot unregister before it is registered.
        let mut jobs = self.shared.running.jobs.lock().expect("jobs lock");
        let task = self.shared.tasks.spawn(
            async move {
                let _unregister = Unregister(this.shared.clone(), id);
                this.run_job(job).await;
                drop(slots);
            }
            .instrument(span),
        );
        jobs.insert(id, RunningJob { reporter: None, abort: task.abort_handle() });
    }

    async fn run_job(&self, job: JobPayload) {
        let shared = &self.shared;
        let runner = self.runner.name.clone();
        let metrics = shared.metrics.clone();
        let on_stage: crate::gitlab::report::StageHook =
            Arc::new(move |old: &str, new: &str| metrics.stage_changed(&runner, old, new));
        let (session, reporter) =
            match JobSession::start(self.client.clone(), &job, shared.settings.report, Some(on_stage)).await {
                Ok(started) => started,
                Err(e) => {
                    tracing::warn!(error = %e, "serve.job_not_started");
                    return;
                }
            };
        shared.metrics.job_started(&self.runner.name);
        reporter.set_stage("prepare");
        shared.running.register(job.id, &reporter, shared.controller.state());
        tracing::info!("serve.job_started");
        let started = Instant::now();
        let (early_outcome, mut early) = tokio::sync::oneshot::channel();
        let ctx = JobContext { runner: self.runner.config.clone(), reporter: reporter.clone(), early_outcome };
        // A panicking pipeline is a runner failure GitLab must still hear about.
        let pipeline = async {
            std::panic::AssertUnwindSafe(shared.executor.run(job, ctx)).catch_unwind().await.unwrap_or_else(|_| {
                tracing::error!("serve.job_panicked");
                JobOutcome::failed(FailureReason::RunnerSystemFailure, None)
            })
        };
        tokio::pin!(pipeline);
        let (outcome, still_cleaning) = tokio::select! {
            Ok(outcome) = &mut early => (outcome, true),
            outcome = &mut pipeline => (outcome, false),
        };
        shared.metrics.job_finished(&self.runner.name, &outcome, started.elapsed());
        // The final update goes out while the pipeline deletes the job's objects.
        let finish = if still_cleaning {
            let (finish, _) = tokio::join!(session.finish(outcome), pipeline);
            finish
        } else {
            session.finish(outcome).await
        };
        reporter.set_stage("");
        shared.running.finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match finish {
            Finish::Accepted { attempts } => {
                tracing::info!(outcome = ?outcome.failure, exit_code = ?outcome.exit_code, attempts, "serve.job_reported")
            }
            Finish::Refused { status } => tracing::warn!(status, "serve.job_report_refused"),
            Finish::AbortedByGitlab => tracing::info!("serve.job_aborted_by_gitlab"),
        }
    }
}

struct RunningJob {
    /// Set once GitLab accepted the pickup.
    reporter: Option<JobReporter>,
    abort: AbortHandle,
}

/// Removes a job from [`Running`] however its task ends (finished, panicked, aborted).
struct Unregister(Arc<Shared>, u64);

impl Drop for Unregister {
    fn drop(&mut self) {
        self.0.running.jobs.lock().expect("jobs lock").remove(&self.1);
    }
}
