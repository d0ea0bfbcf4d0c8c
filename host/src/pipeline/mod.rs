//! `host run .gitlab-ci.yml`: a whole pipeline on one cluster. Jobs start when what they wait for
//! has ended (every earlier stage, or their `needs:`), at most `--jobs N` at once; each is the
//! same job pipeline as `host run file#job` (`crate::run`), its artifacts kept in a local store
//! (`.keel/` beside the file: one folder per job, its trace and `artifacts.zip`) from which the
//! jobs that depend on it get them. Ctrl-C cancels every running job and starts no other.

pub mod plan;
pub mod rules;
pub mod store;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::cluster::Connection;
use crate::gitlab::payload::{ArtifactsFile, Dependency};
use crate::gitlab::secret::Secret;
use crate::plugins::Runtime;
use crate::prepare::PrepareRequest;
use crate::run::artifacts::JobArtifacts;
use crate::run::{ClusterChoice, Interrupts, Outcome, RunOptions, Sources};
pub use plan::{AllowFailure, Plan, PlannedJob, When};
use store::LocalStore;

/// Builds one job's prepare request (the command line's config, plugins and strategy; the job
/// from the file with its instance's variables, and its id).
pub type MakeRequest = Arc<dyn Fn(&PlannedJob, u64) -> PrepareRequest + Send + Sync>;

pub struct PipelineOptions {
    /// Jobs at once (`--jobs`), at least 1.
    pub parallel: usize,
    pub store: PathBuf,
    pub source_dir: PathBuf,
    pub connection: Arc<Connection>,
    pub timestamps: bool,
    pub color: bool,
    /// Where the jobs' `cache:` is kept when `[runners.cache]` names no store.
    pub cache_dir: Option<PathBuf>,
}

/// How a job of the pipeline ended.
#[derive(Debug, Clone)]
pub enum Status {
    Success,
    /// Failed; `allowed` when `allow_failure` lets the pipeline go on green.
    Failed {
        outcome: Outcome,
        allowed: bool,
    },
    /// Not run, and why.
    Skipped(&'static str),
    Cancelled,
}

impl Status {
    fn blocks(&self) -> bool {
        matches!(
            self,
            Status::Failed { allowed: false, .. } | Status::Cancelled | Status::Skipped(SKIPPED_AFTER_FAILURE)
        )
    }

    fn word(&self) -> &'static str {
        match self {
            Status::Success => "passed",
            Status::Failed { allowed: true, .. } => "failed (allowed)",
            Status::Failed { .. } => "failed",
            Status::Skipped(_) => "skipped",
            Status::Cancelled => "canceled",
        }
    }
}

const SKIPPED_AFTER_FAILURE: &str = "a job it waits for failed";

#[derive(Debug, Clone)]
pub struct JobResult {
    pub name: String,
    pub stage: String,
    pub status: Status,
    pub duration: Duration,
}

#[derive(Debug)]
pub struct PipelineResult {
    pub jobs: Vec<JobResult>,
}

impl PipelineResult {
    /// 0 when every job passed, was skipped or was allowed to fail; else the first failed job's
    /// status as `host run` gives it (1 script, 2 system, 3 timeout), 130 when cancelled.
    pub fn exit_status(&self) -> u8 {
        if self.jobs.iter().any(|j| matches!(j.status, Status::Cancelled)) {
            return 130;
        }
        self.jobs
            .iter()
            .find_map(|j| match &j.status {
                Status::Failed { outcome, allowed: false } => Some(outcome.exit_status()),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// The summary table: job, stage, result, duration.
    pub fn table(&self) -> String {
        let width = self.jobs.iter().map(|j| j.name.len()).max().unwrap_or(3).max(3);
        let stage_width = self.jobs.iter().map(|j| j.stage.len()).max().unwrap_or(5).max(5);
        let mut out = format!("{:<width$}  {:<stage_width$}  {:<16}  duration\n", "job", "stage", "result");
        for j in &self.jobs {
            let why = match &j.status {
                Status::Skipped(why) => format!(" ({why})"),
                _ => String::new(),
            };
            out.push_str(&format!(
                "{:<width$}  {:<stage_width$}  {:<16}  {:.1} s{why}\n",
                j.name,
                j.stage,
                j.status.word(),
                j.duration.as_secs_f64()
            ));
        }
        let verdict = match self.exit_status() {
            0 => "Pipeline succeeded",
            130 => "Pipeline canceled",
            _ => "Pipeline failed",
        };
        out.push_str(verdict);
        out.push('\n');
        out
    }
}

/// Runs `plan` to its end; the jobs' traces go to stdout (each line prefixed with the job's
/// name when more than one may run at once) and into the store.
pub async fn run(
    rt: Arc<Runtime>,
    plan: Plan,
    opts: PipelineOptions,
    make_request: MakeRequest,
    mut interrupts: Interrupts,
) -> PipelineResult {
    let store = Arc::new(LocalStore::new(opts.store.clone()));
    let ids: BTreeMap<String, u64> =
        plan.jobs.iter().enumerate().map(|(i, j)| (j.name.clone(), i as u64 + 1)).collect();
    let mut status: BTreeMap<String, (Status, Duration)> = BTreeMap::new();
    let mut running: JoinSet<(String, Status, Duration)> = JoinSet::new();
    let mut started: Vec<String> = Vec::new();
    let stdout = Arc::new(Mutex::new(()));
    let prefix_width = plan.jobs.iter().map(|j| j.name.len()).max().unwrap_or(0).min(30);

    loop {
        let cancelled = *interrupts.borrow() > 0;
        // Decide every job whose waits are over, in file order, while there is room.
        for job in &plan.jobs {
            if status.contains_key(&job.name) || started.contains(&job.name) {
                continue;
            }
            let waits = plan.waits_for(job);
            if !waits.iter().all(|w| status.contains_key(w)) {
                continue;
            }
            let failed_before = waits.iter().any(|w| status[w].0.blocks());
            let decided = if cancelled {
                Some(Status::Cancelled)
            } else {
                match job.when {
                    When::Manual => Some(Status::Skipped("manual job: keel has no one to start it")),
                    When::OnSuccess | When::Delayed(_) if failed_before => Some(Status::Skipped(SKIPPED_AFTER_FAILURE)),
                    When::OnFailure if !failed_before => Some(Status::Skipped("when: on_failure, nothing failed")),
                    _ => None,
                }
            };
            if let Some(s) = decided {
                status.insert(job.name.clone(), (s, Duration::ZERO));
                continue;
            }
            if running.len() >= opts.parallel.max(1) {
                continue;
            }
            started.push(job.name.clone());
            let dependencies = plan
                .artifact_sources(job)
                .into_iter()
                .filter(|d| matches!(status.get(d), Some((Status::Success | Status::Failed { .. }, _))))
                .filter_map(|d| {
                    let size = store.archive_size(&d)?;
                    Some(Dependency {
                        id: ids[&d],
                        name: d,
                        token: Secret::default(),
                        artifacts_file: Some(ArtifactsFile { filename: "artifacts.zip".into(), size }),
                    })
                })
                .collect();
            let sink: Box<dyn Write + Send> = if opts.parallel > 1 {
                Box::new(Prefixed::new(&job.name, prefix_width, stdout.clone()))
            } else {
                Box::new(std::io::stdout())
            };
            let run_opts = RunOptions {
                cluster: ClusterChoice::Shared(opts.connection.clone()),
                sources: Sources::Dir(opts.source_dir.clone()),
                timestamps: opts.timestamps,
                trace_file: Some(store.trace_path(&job.name)),
                color: opts.color,
                extra_secrets: Vec::new(),
                token_prefixes: Vec::new(),
                on_stage: None,
                on_outcome: None,
                artifacts: Some(JobArtifacts {
                    artifacts: job.artifacts.clone(),
                    dependencies,
                    store: store.for_job(&job.name),
                }),
                cache_dir: opts.cache_dir.clone(),
            };
            if let Err(e) = store.prepare_job(&job.name) {
                status.insert(
                    job.name.clone(),
                    (
                        Status::Failed { outcome: Outcome::SystemFailure { reason: e.to_string() }, allowed: false },
                        Duration::ZERO,
                    ),
                );
                continue;
            }
            let req = make_request(job, ids[&job.name]);
            let rt = rt.clone();
            let name = job.name.clone();
            let allow = job.allow_failure.clone();
            let mut job_interrupts = interrupts.clone();
            let delay = match job.when {
                When::Delayed(d) => Some(d),
                _ => None,
            };
            running.spawn(async move {
                let began = Instant::now();
                if let Some(d) = delay {
                    // GitLab's delayed job: its turn has come, it starts `start_in` later; a
                    // Ctrl-C meanwhile cancels it.
                    eprintln!("keel: job {name:?} is delayed (when: delayed): it starts in {d:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = job_interrupts.wait_for(|n| *n > 0) => return (name, Status::Cancelled, began.elapsed()),
                    }
                }
                let outcome = crate::run::run(&rt, req, run_opts, sink, job_interrupts).await;
                let status = match outcome {
                    Outcome::Success => Status::Success,
                    Outcome::Cancelled => Status::Cancelled,
                    other => {
                        let code = match &other {
                            Outcome::ScriptFailure { exit_code } => Some(*exit_code),
                            _ => None,
                        };
                        Status::Failed { allowed: allow.allows(code), outcome: other }
                    }
                };
                (name, status, began.elapsed())
            });
        }
        if status.len() == plan.jobs.len() {
            break;
        }
        if running.is_empty() {
            // Nothing runs and nothing could start: only possible if the plan's checks missed a
            // cycle; end rather than wait forever.
            for job in &plan.jobs {
                status.entry(job.name.clone()).or_insert((Status::Skipped("never ready"), Duration::ZERO));
            }
            break;
        }
        tokio::select! {
            done = running.join_next() => match done {
                Some(Ok((name, s, took))) => {
                    status.insert(name, (s, took));
                }
                Some(Err(e)) => {
                    // A job task that panicked: its name is lost with it, so fail whatever is
                    // started and not yet done.
                    tracing::error!(error = %e, "pipeline job task failed");
                    for name in &started {
                        status.entry(name.clone()).or_insert((
                            Status::Failed { outcome: Outcome::SystemFailure { reason: e.to_string() }, allowed: false },
                            Duration::ZERO,
                        ));
                    }
                }
                None => {}
            },
            _ = interrupts.changed() => {}
        }
    }
    // Stage by stage, as GitLab shows a pipeline; file order within a stage.
    let mut in_order: Vec<&PlannedJob> = plan.jobs.iter().collect();
    in_order.sort_by_key(|j| j.stage_index);
    let jobs = in_order
        .into_iter()
        .map(|j| {
            let (s, d) = status.remove(&j.name).unwrap_or((Status::Skipped("never ready"), Duration::ZERO));
            JobResult { name: j.name.clone(), stage: j.stage.clone(), status: s, duration: d }
        })
        .collect();
    PipelineResult { jobs }
}

/// A job's trace on a shared stdout: whole lines only, each prefixed with the job's name
/// (gitlab-ci-local's habit), so lines of jobs running at once never interleave mid-line.
struct Prefixed {
    prefix: String,
    partial: Vec<u8>,
    stdout: Arc<Mutex<()>>,
}

impl Prefixed {
    fn new(name: &str, width: usize, stdout: Arc<Mutex<()>>) -> Prefixed {
        Prefixed { prefix: format!("{name:<width$} | "), partial: Vec::new(), stdout }
    }

    fn emit(&mut self, upto: usize) -> std::io::Result<()> {
        let lines: Vec<u8> = self.partial.drain(..upto).collect();
        let _guard = self.stdout.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = std::io::stdout().lock();
        for line in lines.split_inclusive(|b| *b == b'\n') {
            out.write_all(self.prefix.as_bytes())?;
            out.write_all(line)?;
        }
        out.flush()
    }
}

impl Write for Prefixed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.partial.extend_from_slice(buf);
        if let Some(last) = self.partial.iter().rposition(|b| *b == b'\n') {
            self.emit(last + 1)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Prefixed {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            self.partial.push(b'\n');
            let n = self.partial.len();
            let _ = self.emit(n);
        }
    }
}
