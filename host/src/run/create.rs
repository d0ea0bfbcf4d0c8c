//! Creating the job's pod and waiting for it to run: one trace line per status change, terminal
//! states at once, and another pull policy tried when an image pull fails and the decided list
//! has one.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use super::{Interrupts, Outcome, interrupted};
use crate::cluster::watch::{self, PodFailure, PodWatch};
use crate::job::PullPolicy;
use crate::prepare::PreparedJob;
use crate::trace::Trace;

/// The next pull policy for `image` after `tried` failed, if the decided list has one.
pub(super) fn next_policy(prepared: &PreparedJob, image: &str, tried: &[PullPolicy]) -> Option<PullPolicy> {
    prepared.policies.get(image)?.iter().copied().find(|p| !tried.contains(p))
}

pub(super) fn set_pull_policy(pod: &mut Pod, image: &str, policy: PullPolicy) {
    if let Some(spec) = pod.spec.as_mut() {
        for c in spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten()) {
            if c.image.as_deref() == Some(image) {
                c.image_pull_policy = Some(policy.as_k8s().to_string());
            }
        }
    }
}

pub(super) fn current_policy(pod: &Pod, image: &str) -> Option<PullPolicy> {
    let spec = pod.spec.as_ref()?;
    let c = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.image.as_deref() == Some(image))?;
    match c.image_pull_policy.as_deref()? {
        "Always" => Some(PullPolicy::Always),
        "IfNotPresent" => Some(PullPolicy::IfNotPresent),
        "Never" => Some(PullPolicy::Never),
        _ => None,
    }
}

pub(super) enum Wait {
    Ready(PodWatch),
    Failed(Outcome),
    PullFailed { image: String, failure: PodFailure },
}

/// Waits for the pod to run: one trace line per status change, a terminal state at once.
pub(super) async fn wait_running(
    api: &Api<Pod>,
    name: &str,
    namespace: &str,
    timeout: Duration,
    trace: &Trace,
    interrupts: &mut Interrupts,
) -> Wait {
    let pod_watch = PodWatch::start(api.clone(), name);
    let mut rx = pod_watch.rx.clone();
    let mut last = String::new();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        let state = rx.borrow_and_update().clone();
        if let Some(failure) = watch::failure(&state, false) {
            if let PodFailure::ImagePull { image, .. } = &failure {
                return Wait::PullFailed { image: image.clone(), failure };
            }
            return Wait::Failed(Outcome::SystemFailure { reason: format!("pod {namespace}/{name}: {failure}") });
        }
        if watch::is_ready(&state) {
            return Wait::Ready(pod_watch);
        }
        let now = watch::describe(&state);
        if now != last && !matches!(state, watch::PodState::Unknown) {
            trace.line(&format!("Waiting for pod {namespace}/{name} to be running, status is {now}"));
            last = now;
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() {
                return Wait::Failed(Outcome::SystemFailure { reason: format!("pod {namespace}/{name}: the watch ended") });
            },
            _ = &mut deadline => {
                return Wait::Failed(Outcome::SystemFailure {
                    reason: format!("timed out after {}s waiting for pod {namespace}/{name} to be running (poll_timeout), status is {last}", timeout.as_secs()),
                });
            }
            _ = interrupted(interrupts, 1) => return Wait::Failed(Outcome::Cancelled),
        }
    }
}
