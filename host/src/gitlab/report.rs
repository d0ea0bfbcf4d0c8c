//! Everything a running job tells GitLab: pickup (`state=running`), the trace as it grows
//! (`PATCH .../trace` every interval, resuming where GitLab says on 416), keep-alive updates for
//! quiet jobs, the final update with the trace's crc32 and size (retried on 202, trace resent
//! from 0 on 412, until GitLab takes it or refuses the job token) — and what GitLab says back:
//! `Job-Status: canceling|canceled|failed`, delivered to the pipeline as a [`Cancel`] watch.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{
    Client, GitlabError, JobCredentials, JobState, JobUpdate, RemoteStatus, Reply, TraceOutcome, UpdateOutcome,
};
use super::payload::JobPayload;

/// How the pipeline should stop a job. Only ever escalates: None < Graceful < Immediate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cancel {
    #[default]
    None,
    /// Stop the running stage, run `after_script`, report `failed`/`job_canceled`
    /// (GitLab's `canceling`, or the first SIGTERM).
    Graceful,
    /// Stop now, skip `after_script`; cleanup still runs (GitLab's `canceled`/`failed`/403, or a
    /// second signal).
    Immediate,
}

/// Why a job failed, as GitLab's `failure_reason` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    ScriptFailure,
    RunnerSystemFailure,
    JobExecutionTimeout,
    ImagePullFailure,
    JobCanceled,
    UnknownFailure,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::ScriptFailure => "script_failure",
            FailureReason::RunnerSystemFailure => "runner_system_failure",
            FailureReason::JobExecutionTimeout => "job_execution_timeout",
            FailureReason::ImagePullFailure => "image_pull_failure",
            FailureReason::JobCanceled => "job_canceled",
            FailureReason::UnknownFailure => "unknown_failure",
        }
    }

    /// The reason to send to a GitLab that supports `supported` (the job's
    /// `features.failure_reasons`): as is when listed; else as GitLab Runner maps it
    /// (`image_pull_failure` -> `runner_system_failure`, the rest -> `unknown_failure`).
    /// `script_failure` and `runner_system_failure` predate the list and are always understood.
    pub fn for_gitlab(self, supported: &[String]) -> &'static str {
        let listed = |r: FailureReason| supported.iter().any(|s| s == r.as_str());
        match self {
            r if listed(r) => r.as_str(),
            FailureReason::ScriptFailure | FailureReason::RunnerSystemFailure => self.as_str(),
            FailureReason::ImagePullFailure => FailureReason::RunnerSystemFailure.as_str(),
            _ => FailureReason::UnknownFailure.as_str(),
        }
    }
}

/// What the pipeline returns for a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobOutcome {
    /// None: success.
    pub failure: Option<FailureReason>,
    pub exit_code: Option<i32>,
}

impl JobOutcome {
    pub fn success() -> JobOutcome {
        JobOutcome { failure: None, exit_code: Some(0) }
    }

    pub fn failed(reason: FailureReason, exit_code: Option<i32>) -> JobOutcome {
        JobOutcome { failure: Some(reason), exit_code }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ReportOptions {
    /// Between trace patches, until GitLab asks for another (`X-GitLab-Trace-Update-Interval`).
    pub trace_interval: Duration,
    /// A quiet job still tells GitLab it runs this often.
    pub keepalive_interval: Duration,
    /// Largest trace patch.
    pub max_patch: usize,
    /// Back-off between final-update attempts that failed in transport or with 5xx.
    pub final_retry_min: Duration,
    pub final_retry_max: Duration,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            trace_interval: Duration::from_secs(3),
            keepalive_interval: Duration::from_secs(30),
            max_patch: 1 << 20,
            final_retry_min: Duration::from_secs(1),
            final_retry_max: Duration::from_secs(60),
        }
    }
}

/// GitLab Runner caps the interval GitLab may ask for.
const MAX_TRACE_INTERVAL: Duration = Duration::from_secs(15 * 60);
/// 416s in a row without progress before the flush gives up on the trace (the final update's
/// checksum then tells GitLab, which answers 412 and we start over from 0).
const MAX_RANGE_MISMATCHES: u32 = 10;

struct Shared {
    job_id: u64,
    trace: Mutex<TraceBytes>,
    cancel: watch::Sender<Cancel>,
    /// GitLab said the job is over for us (canceled, failed, 403/404/409): no more calls.
    aborted: AtomicBool,
    stage: Mutex<String>,
    on_stage: Option<StageHook>,
}

/// Called with (old, new) stage names, for the `gitlab_runner_jobs{stage}` gauge.
pub type StageHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

#[derive(Default)]
struct TraceBytes {
    /// The whole masked trace: a 412 resends it from byte 0. Bounded by the trace's output limit.
    bytes: Vec<u8>,
    crc: crc32fast::Hasher,
}

impl Shared {
    fn escalate(&self, to: Cancel) {
        self.cancel.send_if_modified(|c| {
            let raise = to > *c;
            if raise {
                *c = to;
            }
            raise
        });
    }

    fn checksum(&self) -> (u32, u64) {
        let t = self.trace.lock().expect("trace lock");
        (t.crc.clone().finalize(), t.bytes.len() as u64)
    }
}

/// The pipeline's side of a job: append the (already masked) trace, watch for cancels.
#[derive(Clone)]
pub struct JobReporter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for JobReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobReporter").field("job_id", &self.shared.job_id).finish()
    }
}

impl JobReporter {
    pub fn job_id(&self) -> u64 {
        self.shared.job_id
    }

    /// Appends masked trace bytes; they go up with the next patch.
    pub fn write(&self, bytes: &[u8]) {
        let mut t = self.shared.trace.lock().expect("trace lock");
        t.bytes.extend_from_slice(bytes);
        t.crc.update(bytes);
    }

    /// The same as an `io::Write`, for `trace::Trace`'s sink.
    pub fn sink(&self) -> TraceSink {
        TraceSink(self.clone())
    }

    /// Changes when GitLab or the operator cancels the job; never goes back.
    pub fn cancel(&self) -> watch::Receiver<Cancel> {
        self.shared.cancel.subscribe()
    }

    /// Asks the job to stop (shutdown): only raises, never lowers.
    pub fn request_cancel(&self, how: Cancel) {
        self.shared.escalate(how);
    }

    /// The pipeline's current stage (`prepare`, `step_script`, `after_script`...), for metrics.
    pub fn set_stage(&self, stage: &str) {
        let old = std::mem::replace(&mut *self.shared.stage.lock().expect("stage lock"), stage.to_string());
        if let Some(hook) = &self.shared.on_stage {
            hook(&old, stage);
        }
    }

    pub fn stage(&self) -> String {
        self.shared.stage.lock().expect("stage lock").clone()
    }

    /// The trace so far (tests, diagnostics).
    pub fn trace_len(&self) -> u64 {
        self.shared.checksum().1
    }
}

pub struct TraceSink(JobReporter);

impl io::Write for TraceSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// GitLab will not let this job run here (403, 404 or 409 to `state=running`).
    #[error("runner {runner:?}: job {job}: GitLab refused the pickup ({status})")]
    PickupRefused { runner: String, job: u64, status: u16 },
}

/// How the final update ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// GitLab took it (200) after `attempts` tries.
    Accepted { attempts: u32 },
    /// GitLab refused the job token (403/404/409): nothing more can be said.
    Refused { status: u16 },
    /// GitLab had already ended the job (`canceled`/`failed`/403 while it ran): no final update.
    AbortedByGitlab,
}

/// The runner's side of a job: owns the trace uploader, sends the final update.
pub struct JobSession {
    shared: Arc<Shared>,
    stop: CancellationToken,
    uploader: tokio::task::JoinHandle<Uploader>,
    failure_reasons: Vec<String>,
}

impl JobSession {
    /// Tells GitLab the job runs (`PUT state=running`, at once after the 201), then starts the
    /// trace uploader. A refused pickup means the job must not run.
    pub async fn start(
        client: Arc<Client>,
        job: &JobPayload,
        options: ReportOptions,
        on_stage: Option<StageHook>,
    ) -> Result<(JobSession, JobReporter), ReportError> {
        let (cancel, _) = watch::channel(Cancel::None);
        let shared = Arc::new(Shared {
            job_id: job.id,
            trace: Mutex::default(),
            cancel,
            aborted: AtomicBool::new(false),
            stage: Mutex::default(),
            on_stage,
        });
        let mut uploader = Uploader {
            client,
            creds: JobCredentials::from(job),
            shared: shared.clone(),
            sent: 0,
            interval: options.trace_interval,
            last_contact: Instant::now(),
            options,
        };
        let pickup = JobUpdate { state: JobState::Running, failure_reason: None, exit_code: None, output: None };
        match uploader.client.update_job(&uploader.creds, &pickup).await {
            Ok(reply) => {
                uploader.heard(&reply);
                if let UpdateOutcome::Refused { status } = reply.outcome {
                    return Err(ReportError::PickupRefused {
                        runner: uploader.client.runner_name().to_string(),
                        job: job.id,
                        status,
                    });
                }
            }
            // GitLab assigned the job to us already; the trace and final update will tell.
            Err(e) => tracing::warn!(job.id = job.id, error = %e, "gitlab.pickup_update_failed"),
        }
        let stop = CancellationToken::new();
        let handle = tokio::spawn(uploader.run(stop.clone()));
        let reporter = JobReporter { shared: shared.clone() };
        let session =
            JobSession { shared, stop, uploader: handle, failure_reasons: job.features.failure_reasons.clone() };
        Ok((session, reporter))
    }

    /// Flushes the trace and sends the final update until GitLab takes it or refuses the job
    /// token. Not bounded in time: a finished job's result is not dropped because GitLab is
    /// down for a while (the caller may stop waiting at shutdown).
    pub async fn finish(self, outcome: JobOutcome) -> Finish {
        self.stop.cancel();
        let mut up = match self.uploader.await {
            Ok(up) => up,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let update = JobUpdate {
            state: if outcome.failure.is_none() { JobState::Success } else { JobState::Failed },
            failure_reason: outcome.failure.map(|r| r.for_gitlab(&self.failure_reasons).to_string()),
            exit_code: outcome.exit_code,
            output: None,
        };
        let mut attempts = 0;
        let mut delay = up.options.final_retry_min;
        loop {
            up.flush().await;
            if up.aborted() {
                return Finish::AbortedByGitlab;
            }
            attempts += 1;
            let update = JobUpdate { output: Some(self.shared.checksum()), ..update.clone() };
            match up.client.update_job(&up.creds, &update).await {
                Ok(reply) => match reply.outcome {
                    UpdateOutcome::Accepted => return Finish::Accepted { attempts },
                    UpdateOutcome::NotYet => {
                        let wait = reply.retry_after.or(reply.update_interval).unwrap_or(up.interval);
                        tokio::time::sleep(wait).await;
                    }
                    UpdateOutcome::ResendTrace => {
                        tracing::info!(job.id = self.shared.job_id, "gitlab.trace_resend");
                        up.sent = 0;
                    }
                    UpdateOutcome::Refused { status } => return Finish::Refused { status },
                },
                Err(e) => {
                    tracing::warn!(job.id = self.shared.job_id, error = %e, retry_in = ?delay, "gitlab.final_update_failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(up.options.final_retry_max);
                }
            }
        }
    }
}

/// The trace uploader's state; lives in its task while the job runs, then in `finish`.
struct Uploader {
    client: Arc<Client>,
    creds: JobCredentials,
    shared: Arc<Shared>,
    /// Bytes GitLab has.
    sent: u64,
    interval: Duration,
    last_contact: Instant,
    options: ReportOptions,
}

impl Uploader {
    async fn run(mut self, stop: CancellationToken) -> Uploader {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return self,
                _ = tokio::time::sleep(self.interval) => {}
            }
            if self.aborted() {
                return self;
            }
            let pending = self.shared.checksum().1 > self.sent;
            let result = if pending {
                self.patch().await.map(|_| ())
            } else if self.last_contact.elapsed() >= self.options.keepalive_interval {
                self.keepalive().await
            } else {
                Ok(())
            };
            if let Err(e) = result {
                // Retried at the next tick; the final flush will not give up.
                tracing::warn!(job.id = self.creds.id, error = %e, "gitlab.trace_update_failed");
            }
        }
    }

    fn aborted(&self) -> bool {
        self.shared.aborted.load(Ordering::SeqCst)
    }

    /// Acts on what every answer carries: Job-Status and the interval GitLab wants.
    fn heard<T>(&mut self, reply: &Reply<T>) {
        self.last_contact = Instant::now();
        if let Some(interval) = reply.update_interval {
            self.interval = interval.min(MAX_TRACE_INTERVAL);
        }
        match &reply.job_status {
            Some(RemoteStatus::Canceling) => self.shared.escalate(Cancel::Graceful),
            Some(RemoteStatus::Canceled | RemoteStatus::Failed) => self.abort(),
            _ => {}
        }
    }

    fn abort(&self) {
        if !self.shared.aborted.swap(true, Ordering::SeqCst) {
            tracing::info!(job.id = self.creds.id, "gitlab.job_aborted");
        }
        self.shared.escalate(Cancel::Immediate);
    }

    /// One patch of what GitLab lacks. Ok(true) when GitLab's offset moved.
    async fn patch(&mut self) -> Result<bool, GitlabError> {
        let chunk = {
            let t = self.shared.trace.lock().expect("trace lock");
            let start = (self.sent as usize).min(t.bytes.len());
            let end = (start + self.options.max_patch).min(t.bytes.len());
            t.bytes[start..end].to_vec()
        };
        if chunk.is_empty() {
            return Ok(false);
        }
        let reply = self.client.patch_trace(&self.creds, self.sent, &chunk).await?;
        self.heard(&reply);
        match reply.outcome {
            TraceOutcome::Accepted { .. } => {
                self.sent += chunk.len() as u64;
                Ok(true)
            }
            TraceOutcome::RangeMismatch { resume_at } => {
                let len = self.shared.checksum().1;
                let at = resume_at.unwrap_or(0).min(len);
                tracing::info!(job.id = self.creds.id, from = self.sent, to = at, "gitlab.trace_resume");
                let moved = at != self.sent;
                self.sent = at;
                Ok(moved)
            }
            TraceOutcome::Refused { .. } => {
                self.abort();
                Ok(false)
            }
        }
    }

    async fn keepalive(&mut self) -> Result<(), GitlabError> {
        let update = JobUpdate {
            state: JobState::Running,
            failure_reason: None,
            exit_code: None,
            output: Some(self.shared.checksum()),
        };
        let reply = self.client.update_job(&self.creds, &update).await?;
        self.heard(&reply);
        if let UpdateOutcome::Refused { .. } = reply.outcome {
            self.abort();
        }
        Ok(())
    }

    /// Sends everything GitLab lacks, unless GitLab ends the job meanwhile.
    async fn flush(&mut self) {
        let mut delay = self.options.final_retry_min;
        let mut mismatches = 0;
        while self.sent < self.shared.checksum().1 && !self.aborted() {
            match self.patch().await {
                Ok(true) => mismatches = 0,
                Ok(false) => {
                    mismatches += 1;
                    if mismatches >= MAX_RANGE_MISMATCHES {
                        tracing::warn!(job.id = self.creds.id, "gitlab.trace_gave_up");
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(job.id = self.creds.id, error = %e, retry_in = ?delay, "gitlab.trace_flush_failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.options.final_retry_max);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_reasons_map_as_gitlab_runner_does() {
        let listed: Vec<String> = ["script_failure", "job_canceled"].map(String::from).to_vec();
        assert_eq!(FailureReason::JobCanceled.for_gitlab(&listed), "job_canceled");
        assert_eq!(FailureReason::JobCanceled.for_gitlab(&[]), "unknown_failure");
        assert_eq!(FailureReason::ImagePullFailure.for_gitlab(&listed), "runner_system_failure");
        assert_eq!(FailureReason::RunnerSystemFailure.for_gitlab(&[]), "runner_system_failure");
        assert_eq!(FailureReason::JobExecutionTimeout.for_gitlab(&listed), "unknown_failure");
    }
}
