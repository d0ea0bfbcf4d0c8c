//! One stage of the job's script through the strategy plugin, raced against the deadline, the
//! pod watch and interrupts; a stage stopped from outside has its processes killed in the pod.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::script::{self, StageScript};
use super::{Interrupts, chain, interrupted};
use crate::cluster::session::JobPod;
use crate::cluster::watch::{self, PodFailure, PodWatch};
use crate::prepare::PreparedJob;
use crate::trace::Trace;

/// After a cancel or timeout, how long the strategy may take to notice its stage ended.
const STAGE_STOP_GRACE: Duration = Duration::from_secs(15);

pub(super) enum StageEnd {
    Exited(i32),
    TimedOut,
    Cancelled,
    /// The strategy failed (plugin error, lost connection).
    Failed(String),
    PodFailed(PodFailure),
}

/// Runs one stage through the strategy, racing it against the deadline, the pod watch and
/// interrupts. When it is stopped from outside, the stage's processes in the pod are killed
/// (and checked) before the strategy's call is awaited for a little longer.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run_stage(
    prepared: &mut PreparedJob,
    job_pod: &Arc<JobPod>,
    stage: &StageScript,
    deadline: Instant,
    pod_watch: &mut PodWatch,
    trace: &Trace,
    interrupts: &mut Interrupts,
    interrupt_level: u32,
) -> StageEnd {
    prepared.services.allow();
    let remaining = deadline.saturating_duration_since(Instant::now());
    let services = prepared.services.clone();
    let span = tracing::info_span!("stage", stage = stage.name);
    let call = prepared.plugins.run_stage(stage.name, &stage.script, remaining).instrument(span);
    tokio::pin!(call);
    let stopped = tokio::select! {
        r = &mut call => {
            trace.flush_stage();
            return match r {
                Ok(0) => StageEnd::Exited(0),
                // A stage killed with its container (the pod deleted, an OOM kill of PID 1) ends
                // with 137 or the like, often before the watch delivers why: read the pod once.
                Ok(code) => match pod_failure_now(job_pod, pod_watch).await {
                    Some(f) => StageEnd::PodFailed(f),
                    None => StageEnd::Exited(code),
                },
                Err(e) => {
                    // A pod failure often shows as a dropped session first: prefer its reason.
                    let pod_failure = watch::failure(&pod_watch.current(), true);
                    match pod_failure {
                        Some(f) => StageEnd::PodFailed(f),
                        None => StageEnd::Failed(chain(&e)),
                    }
                }
            };
        }
        _ = tokio::time::sleep_until(deadline.into()) => StageEnd::TimedOut,
        f = pod_watch.failed(true) => StageEnd::PodFailed(f),
        _ = interrupted(interrupts, interrupt_level) => StageEnd::Cancelled,
    };
    services.refuse(match &stopped {
        StageEnd::TimedOut => "the stage timed out",
        StageEnd::PodFailed(_) => "the pod failed",
        _ => "the job was cancelled",
    });
    if !matches!(stopped, StageEnd::PodFailed(_)) {
        match kill_stage(job_pod, stage.name).await {
            Ok(alive) if alive.is_empty() => {}
            Ok(alive) => {
                trace.warning(&format!("WARNING: stage processes still alive after KILL: {}", alive.join(", ")))
            }
            Err(e) => trace.warning(&format!("WARNING: cannot stop the stage's processes: {e}")),
        }
    }
    // A failed pod ends the job: the strategy may be waiting on a container that is gone, and
    // nothing it could still report matters, so its call is dropped at once. After a timeout
    // or cancel it gets to see the stopped stage end and return.
    if matches!(stopped, StageEnd::PodFailed(_)) {
        trace.flush_stage();
        return stopped;
    }
    if tokio::time::timeout(STAGE_STOP_GRACE, &mut call).await.is_err() {
        tracing::warn!(stage = stage.name, "the strategy did not return after its stage was stopped");
    }
    trace.flush_stage();
    stopped
}

/// The pod's failure, if it has one right now: from a fresh read (gone = deleted), else the watch.
pub(super) async fn pod_failure_now(job_pod: &JobPod, pod_watch: &PodWatch) -> Option<PodFailure> {
    let state = match job_pod.api.get_opt(&job_pod.name).await {
        Ok(Some(pod)) => watch::PodState::Seen(Box::new(pod)),
        Ok(None) => return Some(PodFailure::Deleted),
        Err(_) => pod_watch.current(),
    };
    watch::failure(&state, true).or_else(|| watch::failure(&pod_watch.current(), true))
}

/// All of a host-side session's output (stdout and stderr together), then its exit.
pub(super) async fn finish(
    session: &mut crate::plugins::strategy_host::Session,
) -> (Vec<u8>, Result<i32, crate::plugins::strategy_host::HostError>) {
    let mut out = Vec::new();
    let mut pending = None;
    while let Some((_, chunk)) = session.read_output(64 * 1024, &mut pending).await {
        out.extend(chunk);
    }
    (out, session.wait_exit().await)
}

/// Runs [`script::kill_script`] in the build container; returns the PIDs still alive.
pub(super) async fn kill_stage(job_pod: &JobPod, stage: &str) -> Result<Vec<String>, String> {
    use crate::plugins::strategy_host::PodAccess;
    let command = vec!["sh".to_string(), "-c".to_string(), script::kill_script(stage)];
    let mut session = job_pod.exec(crate::pod::BUILD_CONTAINER, command, false).await.map_err(|e| e.to_string())?;
    let (out, _) = finish(&mut session).await;
    Ok(String::from_utf8_lossy(&out).lines().filter_map(|l| l.strip_prefix("alive ")).map(str::to_string).collect())
}
