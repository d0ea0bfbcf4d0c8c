//! What a job created, and the guarantee that it goes: [`Cleanup::run`] deletes it and waits
//! until the pod is gone (bounded by [`CLEANUP_TIMEOUT`]); a guard dropped without that (the
//! job's task aborted, e.g. by `host serve`'s forced shutdown) still starts the deletion.

use std::sync::Arc;
use std::time::Duration;

use crate::cluster::{self, Connection, Created};
use crate::trace::Trace;

/// Deleting the job's objects (and seeing the pod gone) may take this long at most.
pub const CLEANUP_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Cleanup {
    connection: Arc<Connection>,
    /// Filled in by `cluster::create` as objects are made.
    pub created: Created,
    grace: Option<i64>,
}

impl Cleanup {
    pub fn new(connection: Arc<Connection>, grace: Option<i64>) -> Cleanup {
        Cleanup { connection, created: Created::default(), grace }
    }

    /// Deletes everything now (grace 0: a pod being replaced), ready to be filled again.
    pub async fn now(&mut self, trace: &Trace) {
        let created = std::mem::take(&mut self.created);
        delete(&self.connection, &created, Some(0), trace).await;
    }

    /// The job's normal end: deletes with the configured grace and waits for the pod to go.
    pub async fn run(mut self, trace: &Trace) {
        let created = std::mem::take(&mut self.created);
        delete(&self.connection, &created, self.grace, trace).await;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if is_empty(&self.created) {
            return;
        }
        let created = std::mem::take(&mut self.created);
        let (connection, grace) = (self.connection.clone(), self.grace);
        tracing::warn!(pod = ?created.pod.as_ref().map(|(name, _)| name), "job ended without its cleanup; deleting in the background");
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(e) = cluster::delete(&connection.client, &created, grace).await {
                    tracing::warn!(error = %e, "background cleanup failed; `host cleanup` removes what is left");
                }
            });
        }
    }
}

fn is_empty(created: &Created) -> bool {
    created.pod.is_none() && created.secrets.is_empty() && created.services.is_empty()
}

/// Deletes `created`, bounded by [`CLEANUP_TIMEOUT`]; the pod is waited for so no container
/// outlives the job.
async fn delete(connection: &Connection, created: &Created, grace: Option<i64>, trace: &Trace) {
    if is_empty(created) {
        return;
    }
    let work = async {
        if let Err(e) = cluster::delete(&connection.client, created, grace).await {
            trace.warning(&format!("WARNING: cleanup: {}", super::chain(&e)));
        }
        if let Some((name, uid)) = &created.pod
            && let Err(e) = cluster::wait_deleted(&connection.client, &created.namespace, name, uid).await
        {
            trace.warning(&format!("WARNING: cleanup: {}", super::chain(&e)));
        }
    };
    if tokio::time::timeout(CLEANUP_TIMEOUT, work).await.is_err() {
        trace.warning(&format!(
            "WARNING: cleanup did not finish within {}s; `host cleanup` removes what is left",
            CLEANUP_TIMEOUT.as_secs()
        ));
    }
}
