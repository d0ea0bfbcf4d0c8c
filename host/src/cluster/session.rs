//! Exec and attach sessions on the job's pod over the Kubernetes WebSocket API, as the
//! strategy host services ([`PodAccess`]) hand them to a strategy plugin.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use kube::Api;
use kube::api::{AttachParams, AttachedProcess};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch};

use crate::plugins::strategy_host::{Channel, HostError, PodAccess, Session};

/// Bytes per chunk read from the stream; also the buffer kube-rs keeps per stream.
const CHUNK: usize = 16 * 1024;

/// The job's pod as its strategy may reach it.
pub struct JobPod {
    pub api: Api<Pod>,
    pub name: String,
    pub containers: Vec<String>,
}

impl JobPod {
    pub fn new(api: Api<Pod>, name: String, pod: &Pod) -> Arc<Self> {
        let containers =
            pod.spec.as_ref().map(|s| s.containers.iter().map(|c| c.name.clone()).collect()).unwrap_or_default();
        Arc::new(JobPod { api, name, containers })
    }
}

/// The exit code a finished exec's Status carries. A Failure without an exit code (the
/// command could not be started, the container is gone) is not an exit code: it is the
/// session failing, as a real kubelet reports it.
pub fn exit_code(status: &Status) -> Result<i32, HostError> {
    if status.status.as_deref() == Some("Success") {
        return Ok(0);
    }
    let reason = status.reason.as_deref().unwrap_or("");
    if reason == "NonZeroExitCode"
        && let Some(code) = status
            .details
            .as_ref()
            .and_then(|d| d.causes.as_ref())
            .and_then(|c| c.iter().find(|c| c.reason.as_deref() == Some("ExitCode")))
            .and_then(|c| c.message.as_deref()?.parse::<i32>().ok())
    {
        return Ok(code);
    }
    Err(HostError::Other(format!("{} ({reason})", status.message.as_deref().unwrap_or("exec failed"))))
}

/// After the session's status arrived (or the stream failed), output still in flight is read
/// until this long passes without any: kube-rs closes the output pipes only on a clean end,
/// so after a dropped connection they would otherwise never report EOF.
const DRAIN_IDLE: Duration = Duration::from_millis(250);

/// How long a session the strategy dropped stays connected, so that bytes it wrote to stdin
/// just before are still delivered (they are queued behind the message loop).
const CLOSE_GRACE: Duration = Duration::from_millis(500);

async fn ended_signal(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn pump(
    reader: Option<impl AsyncRead + Unpin + Send + 'static>,
    channel: Channel,
    tx: mpsc::Sender<(Channel, Vec<u8>)>,
    mut ended: watch::Receiver<bool>,
) {
    let Some(mut reader) = reader else { return };
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = tokio::select! {
                r = reader.read(&mut buf) => r.unwrap_or(0),
                _ = ended_signal(&mut ended) => match tokio::time::timeout(DRAIN_IDLE, reader.read(&mut buf)).await {
                    Ok(Ok(n)) => n,
                    _ => 0,
                },
            };
            if n == 0 || tx.send((channel, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    });
}

fn into_session(mut process: AttachedProcess, what: String) -> Session {
    let (tx, rx) = mpsc::channel(64);
    let (ended_tx, ended_rx) = watch::channel(false);
    pump(process.stdout(), Channel::Stdout, tx.clone(), ended_rx.clone());
    pump(process.stderr(), Channel::Stderr, tx, ended_rx);
    let stdin = process.stdin().map(|w| Box::pin(w) as _);
    let status = process.take_status();
    let (closed, mut dropped) = tokio::sync::oneshot::channel::<()>();
    // The status is awaited at once (not when the strategy asks), so the output pumps learn
    // that the stream ended even while nobody waits for the exit code.
    let status_task = tokio::spawn(async move {
        // Keeps the process (its message loop) alive until the status arrives, or until the
        // strategy dropped the session: then stdin (dropped with it) gets a moment to deliver
        // what was written, and the connection closes.
        let process = process;
        let result = match status {
            Some(status) => tokio::select! {
                s = status => match s {
                    Some(s) => exit_code(&s),
                    None => Err(HostError::Disconnected(format!("{what}: the stream ended without an exit status"))),
                },
                _ = &mut dropped => {
                    tokio::time::sleep(CLOSE_GRACE).await;
                    Err(HostError::Other(format!("{what}: closed by the strategy")))
                }
            },
            None => Err(HostError::Other(format!("{what}: no status channel"))),
        };
        drop(process);
        let _ = ended_tx.send(true);
        result
    });
    let exit =
        async move { status_task.await.unwrap_or_else(|e| Err(HostError::Other(format!("session task failed: {e}")))) }
            .boxed();
    Session { stdin, output: rx, exit: Some(exit), exit_code: None, closed: Some(closed) }
}

fn connect_error(what: &str, e: kube::Error) -> HostError {
    match &e {
        kube::Error::Api(s) if s.code == 404 => HostError::NoSuchContainer(format!("{what}: {}", s.message)),
        kube::Error::Api(s) => HostError::Other(format!("{what}: {} ({})", s.message, s.reason)),
        _ => HostError::Disconnected(format!("{what}: {e}")),
    }
}

impl PodAccess for JobPod {
    fn exec(
        &self,
        container: &str,
        command: Vec<String>,
        stdin: bool,
    ) -> BoxFuture<'static, Result<Session, HostError>> {
        let (api, name, container) = (self.api.clone(), self.name.clone(), container.to_string());
        async move {
            let what = format!("exec in {name}/{container}");
            let params = AttachParams::default()
                .container(container.clone())
                .stdin(stdin)
                .stdout(true)
                .stderr(true)
                .max_stdout_buf_size(CHUNK)
                .max_stderr_buf_size(CHUNK);
            let process = api.exec(&name, command, &params).await.map_err(|e| connect_error(&what, e))?;
            Ok(into_session(process, what))
        }
        .boxed()
    }

    fn attach(&self, container: &str) -> BoxFuture<'static, Result<Session, HostError>> {
        let (api, name, container) = (self.api.clone(), self.name.clone(), container.to_string());
        async move {
            let what = format!("attach to {name}/{container}");
            let params = AttachParams::default().container(container.clone()).stdin(true).stdout(true).stderr(false);
            let process = api.attach(&name, &params).await.map_err(|e| connect_error(&what, e))?;
            Ok(into_session(process, what))
        }
        .boxed()
    }

    fn pod_json(&self) -> BoxFuture<'static, Result<String, HostError>> {
        let (api, name) = (self.api.clone(), self.name.clone());
        async move {
            let pod = api.get(&name).await.map_err(|e| connect_error(&format!("reading pod {name}"), e))?;
            serde_json::to_string(&pod).map_err(|e| HostError::Other(format!("encoding pod {name}: {e}")))
        }
        .boxed()
    }

    fn containers(&self) -> Vec<String> {
        self.containers.clone()
    }
}
