//! The `strategy-host` imports: how an execution strategy plugin reaches the job's pod.
//!
//! A strategy gets no network and no credentials. Everything it does to the pod goes through
//! these calls, which the host scopes to the job's own pod and its containers, and refuses
//! once the running stage was cancelled. The cluster side (exec/attach over the Kubernetes
//! WebSocket API) sits behind [`PodAccess`], implemented by `crate::cluster`, so this module
//! does not reach forward into the cluster code.

use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};

use futures::future::BoxFuture;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Why a host service failed (WIT `host-error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("no such container: {0}")]
    NoSuchContainer(String),
    #[error("connection lost: {0}")]
    Disconnected(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Other(String),
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Stdout,
    Stderr,
}

/// Output of a session: chunks as they arrive, then the end of the stream.
pub type OutputRx = mpsc::Receiver<(Channel, Vec<u8>)>;

/// A running exec or attach session in the job's pod.
pub struct Session {
    pub stdin: Option<Pin<Box<dyn AsyncWrite + Send>>>,
    pub output: OutputRx,
    /// Resolves with the process's exit code, or `Disconnected` when the stream ended without
    /// a status. Taken by the first `wait-exit`.
    pub exit: Option<BoxFuture<'static, Result<i32, HostError>>>,
    /// The exit code once known (a second `wait-exit` returns it again).
    pub exit_code: Option<Result<i32, HostError>>,
    /// Dropped with the session: tells the connection to close (the WIT contract), instead of
    /// staying open until the process exits, which for an attach is the container's end.
    pub closed: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The job's pod, as the cluster code exposes it to strategies.
pub trait PodAccess: Send + Sync {
    fn exec(
        &self,
        container: &str,
        command: Vec<String>,
        stdin: bool,
    ) -> BoxFuture<'static, Result<Session, HostError>>;
    fn attach(&self, container: &str) -> BoxFuture<'static, Result<Session, HostError>>;
    /// The pod freshly read, as Kubernetes JSON.
    fn pod_json(&self) -> BoxFuture<'static, Result<String, HostError>>;
    /// Containers a strategy may address (spec.containers names).
    fn containers(&self) -> Vec<String>;
}

/// Where `trace-write` bytes go (the host masks them there).
pub type TraceWrite = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// What one job offers its strategy. Shared between the host's stage loop (which sets the pod
/// once it runs and flags cancellation) and the plugin's store.
pub struct StrategyServices {
    pod: RwLock<Option<Arc<dyn PodAccess>>>,
    trace: RwLock<Option<TraceWrite>>,
    refusal: Mutex<Option<String>>,
}

impl StrategyServices {
    /// No pod and no trace yet: the strategy's `prepare` runs before either exists.
    pub fn new() -> Arc<Self> {
        Arc::new(StrategyServices { pod: RwLock::new(None), trace: RwLock::new(None), refusal: Mutex::new(None) })
    }

    /// Where `trace-write` goes from now on.
    pub fn set_trace(&self, trace: TraceWrite) {
        *self.trace.write().unwrap_or_else(|e| e.into_inner()) = Some(trace);
    }

    /// The pod exists and runs: from now on sessions reach it.
    pub fn set_pod(&self, pod: Arc<dyn PodAccess>) {
        *self.pod.write().unwrap_or_else(|e| e.into_inner()) = Some(pod);
    }

    /// Refuse new sessions (the stage was cancelled or timed out) until [`Self::allow`].
    pub fn refuse(&self, reason: impl Into<String>) {
        *self.refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.into());
    }

    /// A new stage starts (after_script runs even after a cancel).
    pub fn allow(&self) {
        *self.refusal.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn refused(&self) -> Option<String> {
        self.refusal.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn pod(&self) -> Result<Arc<dyn PodAccess>, HostError> {
        if let Some(reason) = self.refused() {
            return Err(HostError::Refused(reason));
        }
        self.pod
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| HostError::Refused("the job's pod is not running yet".into()))
    }

    /// The pod, checked that `container` belongs to it.
    fn pod_for(&self, container: &str) -> Result<Arc<dyn PodAccess>, HostError> {
        let pod = self.pod()?;
        if !pod.containers().iter().any(|c| c == container) {
            return Err(HostError::NoSuchContainer(format!(
                "`{container}` is not a container of the job's pod (it has {})",
                pod.containers().join(", ")
            )));
        }
        Ok(pod)
    }

    pub async fn exec(&self, container: &str, command: Vec<String>, stdin: bool) -> Result<Session, HostError> {
        if command.is_empty() {
            return Err(HostError::Other("exec needs a command".into()));
        }
        self.pod_for(container)?.exec(container, command, stdin).await
    }

    pub async fn attach(&self, container: &str) -> Result<Session, HostError> {
        self.pod_for(container)?.attach(container).await
    }

    pub async fn pod_json(&self) -> Result<String, HostError> {
        self.pod()?.pod_json().await
    }

    pub fn trace_write(&self, data: &[u8]) {
        if let Some(trace) = self.trace.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            trace(data)
        }
    }
}

impl Session {
    pub async fn write_stdin(&mut self, data: &[u8]) -> Result<(), HostError> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(HostError::Other(
                "stdin is not open (closed, or the session was started without stdin)".into(),
            ));
        };
        stdin.write_all(data).await.map_err(|e| HostError::Disconnected(format!("writing stdin: {e}")))?;
        stdin.flush().await.map_err(|e| HostError::Disconnected(format!("writing stdin: {e}")))
    }

    pub async fn close_stdin(&mut self) -> Result<(), HostError> {
        match self.stdin.take() {
            Some(mut stdin) => {
                stdin.shutdown().await.map_err(|e| HostError::Disconnected(format!("closing stdin: {e}")))
            }
            None => Ok(()),
        }
    }

    /// The next chunk, split to at most `max` bytes (the rest is kept for the next read).
    pub async fn read_output(
        &mut self,
        max: usize,
        pending: &mut Option<(Channel, Vec<u8>)>,
    ) -> Option<(Channel, Vec<u8>)> {
        let (channel, mut data) = match pending.take() {
            Some(p) => p,
            None => self.output.recv().await?,
        };
        let max = max.max(1);
        if data.len() > max {
            let rest = data.split_off(max);
            *pending = Some((channel, rest));
        }
        Some((channel, data))
    }

    pub async fn wait_exit(&mut self) -> Result<i32, HostError> {
        if let Some(code) = &self.exit_code {
            return code.clone();
        }
        let exit = self.exit.take().ok_or_else(|| HostError::Other("the session has no exit status".into()))?;
        let code = exit.await;
        self.exit_code = Some(code.clone());
        code
    }
}

/// A session as the plugin's resource table holds it: the session plus a partly read chunk.
pub struct SessionSlot {
    pub session: Session,
    pub pending: Option<(Channel, Vec<u8>)>,
}
