//! Watching the job's pod: one kube-runtime watcher per job feeds the latest state to the
//! stage loop, which fails the job within moments of a terminal change (seed 004) instead of
//! waiting out `poll_timeout` or the job timeout.

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

use crate::pod::{BUILD_CONTAINER, HELPER_CONTAINER};

/// What the host knows about the pod right now.
#[derive(Debug, Clone)]
pub enum PodState {
    /// Nothing seen yet.
    Unknown,
    Seen(Box<Pod>),
    /// A delete event: the pod is gone (with its last known state).
    Deleted(Box<Pod>),
}

/// Why a pod cannot (or can no longer) run the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodFailure {
    /// An image cannot be pulled; the pull-policy fallback may try the next policy.
    ImagePull {
        container: String,
        image: String,
        reason: String,
        message: String,
    },
    /// Any other waiting reason that never resolves by itself.
    Waiting {
        container: String,
        reason: String,
        message: String,
    },
    /// build or helper terminated while the job needs them.
    Terminated {
        container: String,
        exit_code: i32,
        reason: String,
        message: String,
    },
    Deleted,
    Disrupted {
        reason: String,
        message: String,
    },
    Phase {
        phase: String,
        reason: String,
        message: String,
    },
}

impl std::fmt::Display for PodFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let with = |m: &str| if m.is_empty() { String::new() } else { format!(": {m}") };
        match self {
            PodFailure::ImagePull { container, image, reason, message } => {
                write!(f, "container {container} cannot pull image {image:?} ({reason}){}", with(message))
            }
            PodFailure::Waiting { container, reason, message } => {
                write!(f, "container {container} cannot start ({reason}){}", with(message))
            }
            PodFailure::Terminated { container, exit_code, reason, message } => {
                write!(f, "container {container} terminated with exit code {exit_code} ({reason}){}", with(message))
            }
            PodFailure::Deleted => write!(f, "the pod was deleted"),
            PodFailure::Disrupted { reason, message } => {
                write!(f, "the pod is being disrupted ({reason}){}", with(message))
            }
            PodFailure::Phase { phase, reason, message } => {
                write!(
                    f,
                    "the pod is {phase}{}{}",
                    if reason.is_empty() { String::new() } else { format!(" ({reason})") },
                    with(message)
                )
            }
        }
    }
}

/// Waiting reasons a kubelet never recovers from without a change to the pod.
const TERMINAL_WAITING: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];
const PULL_REASONS: &[&str] = &["ErrImagePull", "ImagePullBackOff"];

fn statuses(pod: &Pod) -> impl Iterator<Item = &ContainerStatus> {
    let status = pod.status.as_ref();
    status
        .and_then(|s| s.init_container_statuses.as_ref())
        .into_iter()
        .flatten()
        .chain(status.and_then(|s| s.container_statuses.as_ref()).into_iter().flatten())
}

/// Whether the pod can no longer run the job. `started`: the stages run, so build or helper
/// terminating is fatal too.
pub fn failure(state: &PodState, started: bool) -> Option<PodFailure> {
    let (pod, deleted) = match state {
        PodState::Unknown => return None,
        PodState::Deleted(pod) => (pod, true),
        PodState::Seen(pod) => (pod, false),
    };
    // The reason of a terminated container comes first: a pod deleted after an OOM kill must
    // still say OOMKilled (users lose that with GitLab today).
    for cs in statuses(pod) {
        let Some(state) = cs.state.as_ref() else { continue };
        if let Some(w) = &state.waiting {
            let reason = w.reason.clone().unwrap_or_default();
            if TERMINAL_WAITING.contains(&reason.as_str()) {
                let message = w.message.clone().unwrap_or_default();
                if PULL_REASONS.contains(&reason.as_str()) {
                    return Some(PodFailure::ImagePull {
                        container: cs.name.clone(),
                        image: cs.image.clone(),
                        reason,
                        message,
                    });
                }
                return Some(PodFailure::Waiting { container: cs.name.clone(), reason, message });
            }
        }
        if let Some(t) = &state.terminated
            && (started || t.exit_code != 0)
            && [BUILD_CONTAINER, HELPER_CONTAINER].contains(&cs.name.as_str())
        {
            return Some(PodFailure::Terminated {
                container: cs.name.clone(),
                exit_code: t.exit_code,
                reason: t.reason.clone().unwrap_or_default(),
                message: t.message.clone().unwrap_or_default(),
            });
        }
    }
    if deleted || pod.metadata.deletion_timestamp.is_some() {
        return Some(PodFailure::Deleted);
    }
    let status = pod.status.as_ref();
    if let Some(c) = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")
    {
        return Some(PodFailure::Disrupted {
            reason: c.reason.clone().unwrap_or_default(),
            message: c.message.clone().unwrap_or_default(),
        });
    }
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
    if phase == "Failed" || phase == "Succeeded" {
        return Some(PodFailure::Phase {
            phase: phase.to_string(),
            reason: status.and_then(|s| s.reason.clone()).unwrap_or_default(),
            message: status.and_then(|s| s.message.clone()).unwrap_or_default(),
        });
    }
    None
}

/// Running, with build and helper started: the stages can begin.
pub fn is_ready(state: &PodState) -> bool {
    let PodState::Seen(pod) = state else { return false };
    let running = |name: &str| {
        pod.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .any(|cs| cs.name == name && cs.state.as_ref().is_some_and(|s| s.running.is_some()))
    };
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        && running(BUILD_CONTAINER)
        && running(HELPER_CONTAINER)
}

/// `Pending: ContainerCreating`: the phase and the first waiting reason, GitLab style.
pub fn describe(state: &PodState) -> String {
    let PodState::Seen(pod) = state else { return "Unknown".into() };
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_else(|| "Pending".into());
    let waiting = statuses(pod).find_map(|cs| cs.state.as_ref()?.waiting.as_ref()?.reason.clone());
    match waiting {
        Some(w) => format!("{phase}: {w}"),
        None => phase,
    }
}

/// A running watch on one pod. Dropping it stops the watcher.
pub struct PodWatch {
    pub rx: watch::Receiver<PodState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PodWatch {
    /// Watches `name` (a field selector, so only this pod's events travel). The watcher
    /// re-lists and resumes by itself after a dropped connection, with back-off.
    pub fn start(api: Api<Pod>, name: &str) -> PodWatch {
        let (tx, rx) = watch::channel(PodState::Unknown);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let name = name.to_string();
        let task = tokio::spawn(async move {
            let mut events = watcher::watcher(api, config).default_backoff().boxed();
            while let Some(event) = events.next().await {
                match event {
                    Ok(Event::Apply(pod) | Event::InitApply(pod)) => {
                        let _ = tx.send(PodState::Seen(Box::new(pod)));
                    }
                    Ok(Event::Delete(pod)) => {
                        let _ = tx.send(PodState::Deleted(Box::new(pod)));
                    }
                    Ok(Event::Init | Event::InitDone) => {}
                    Err(error) => tracing::warn!(k8s.pod = %name, %error, "pod watch interrupted; resuming"),
                }
            }
        });
        PodWatch { rx, task }
    }

    pub fn current(&self) -> PodState {
        self.rx.borrow().clone()
    }

    /// Resolves with the first failure seen (never, while the pod is healthy).
    pub async fn failed(&mut self, started: bool) -> PodFailure {
        loop {
            if let Some(f) = failure(&self.rx.borrow_and_update(), started) {
                return f;
            }
            if self.rx.changed().await.is_err() {
                // The watcher ended (it retries forever, so only when aborted).
                std::future::pending::<()>().await;
            }
        }
    }
}
