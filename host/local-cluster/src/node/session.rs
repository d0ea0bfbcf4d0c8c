//! exec and attach sessions: the streams of one interactive connection to a container.

use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::pod::{Instance, PodRuntime};
use super::sandbox::{self, exit_code};
use super::{AttachRequest, ExecRequest, NodeError, NodeInner};

/// A terminal size as sent on the resize channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct TerminalSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    /// The exec'd command exited (signals as 128 + signal number, like a shell).
    Exited(i32),
    /// An attach ended (the container stopped or its output ended).
    Detached,
    /// The session failed inside the node.
    Failed(String),
}

/// The streams of one exec or attach. `stream::serve` drives it over a WebSocket; other callers
/// (tests, benchmarks) may use the channels directly. Dropping the session of a running exec
/// kills the exec'd process.
pub struct Session {
    /// The exec'd command (empty for attach); named in the non-zero exit status message.
    pub command: Vec<String>,
    pub tty: bool,
    /// Bytes for the process's stdin; dropping the sender closes stdin (EOF).
    pub stdin: Option<mpsc::Sender<Bytes>>,
    pub stdout: Option<mpsc::Receiver<Bytes>>,
    /// Without a tty; with a tty everything arrives on stdout.
    pub stderr: Option<mpsc::Receiver<Bytes>>,
    pub resize: Option<mpsc::Sender<TerminalSize>>,
    /// Resolves once the process exited (exec) or the attach ended.
    pub exit: oneshot::Receiver<ExitStatus>,
    /// Held only so the exec is killed when the session goes away.
    pub(crate) _kill_on_drop: Option<oneshot::Sender<()>>,
}

impl Session {
    /// A session that ends at once with `ExitStatus::Failed(message)` and no output: what a
    /// client sees after the upgrade when the node cannot run it.
    pub fn failed(command: Vec<String>, message: String) -> Session {
        let (exit_tx, exit) = oneshot::channel();
        let _ = exit_tx.send(ExitStatus::Failed(message));
        Session {
            command,
            tty: false,
            stdin: None,
            stdout: None,
            stderr: None,
            resize: None,
            exit,
            _kill_on_drop: None,
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("command", &self.command).field("tty", &self.tty).finish()
    }
}

/// Copies a reader into a channel until EOF (a pty reports EIO once its slave side is closed).
pub(crate) fn pump_out<R: AsyncRead + Unpin + Send + 'static>(mut r: R, tx: mpsc::Sender<Bytes>) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Copies a channel into a writer; the writer is dropped (EOF) when the channel ends.
fn pump_in<W: AsyncWrite + Unpin + Send + 'static>(mut w: W, mut rx: mpsc::Receiver<Bytes>) {
    tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if w.write_all(&b).await.is_err() || w.flush().await.is_err() {
                break;
            }
        }
    });
}

fn pty_file(fd: &OwnedFd, container: &str) -> Result<tokio::fs::File, NodeError> {
    let f = fd.try_clone().map_err(|source| NodeError::Pty { container: container.into(), source })?;
    Ok(tokio::fs::File::from_std(std::fs::File::from(f)))
}

pub(crate) async fn exec(
    node: &NodeInner,
    pod: &Arc<PodRuntime>,
    container: &str,
    req: ExecRequest,
) -> Result<Session, NodeError> {
    if req.command.is_empty() {
        return Err(NodeError::EmptyCommand { pod: pod.name.clone() });
    }
    let inst = pod.running_instance(container)?;
    // A command that cannot be started is the runtime's failure, not the command's: a real
    // node answers InternalError without an exit code (a runner reads that as a system failure,
    // an exit code as a script failure).
    let path_env = inst.env.iter().rev().find(|(k, _)| k == "PATH").map_or(sandbox::DEFAULT_PATH, |(_, v)| v.as_str());
    if let Err(why) = sandbox::find_executable(inst.inner_pid, &req.command[0], path_env, &inst.working_dir) {
        return Ok(Session::failed(
            req.command,
            format!(
                "error executing command in container: failed to exec in container: failed to start exec: OCI runtime exec failed: exec failed: unable to start container process: {why}: unknown"
            ),
        ));
    }
    // The exec gets the container's capabilities, as runc gives an exec its container's. nsenter
    // needs its own to join the namespaces, so the drop happens after it, by the container's
    // `setpriv` (util-linux; a root process gets its bounding set on exec). A rootfs without
    // setpriv leaves the exec with the node's capabilities.
    let mut argv = req.command.clone();
    // A container of another user has no capabilities to drop.
    if let super::caps::Capabilities::Set(set) = inst.caps
        && inst.user_mode == sandbox::UserMode::PodRoot
    {
        const SETPRIV: &str = "/usr/bin/setpriv";
        if sandbox::find_executable(inst.inner_pid, SETPRIV, "", "/").is_ok() {
            let mut wrapped = vec![SETPRIV.to_owned()];
            wrapped.extend(super::caps::setpriv_args(set));
            wrapped.push("--".into());
            wrapped.append(&mut argv);
            argv = wrapped;
        } else {
            tracing::debug!(k8s.pod = %pod.name, k8s.container = container, "no setpriv in the container: the exec keeps the node's capabilities");
        }
    }
    let mut cmd = sandbox::exec_command(
        inst.inner_pid,
        node.isolation,
        inst.user_mode,
        &inst.identity,
        &inst.working_dir,
        &inst.env,
        &argv,
    );
    let spawn_err = |source| NodeError::ExecSpawn { container: container.into(), command: req.command.clone(), source };
    let pty = if req.tty {
        let p = sandbox::open_pty().map_err(|source| NodeError::Pty { container: container.into(), source })?;
        let dup = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
        cmd.stdin(dup(&p.slave).map_err(spawn_err)?);
        cmd.stdout(dup(&p.slave).map_err(spawn_err)?);
        cmd.stderr(dup(&p.slave).map_err(spawn_err)?);
        Some(p)
    } else {
        cmd.stdin(if req.stdin { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(if req.stdout { Stdio::piped() } else { Stdio::null() });
        cmd.stderr(if req.stderr { Stdio::piped() } else { Stdio::null() });
        None
    };
    // Opened here (not at container start) so no descriptor outlives the exec's spawn.
    let cgroup_procs: Vec<std::fs::File> =
        inst.cgroup_procs.iter().filter_map(|p| std::fs::OpenOptions::new().write(true).open(p).ok()).collect();
    sandbox::prepare_exec(&mut cmd, req.tty, &cgroup_procs, node.isolation, inst.user_mode, &inst.identity);
    let mut child = node.spawner.spawn(cmd).await.map_err(spawn_err)?;
    let pid = child.id().map(|p| p as i32);
    let (mut stdin_tx, mut stdout_rx, mut stderr_rx, mut resize_tx) = (None, None, None, None);
    if let Some(p) = pty {
        // Only the child may hold the slave, or reading the master never sees the end.
        drop(p.slave);
        if req.stdin {
            let (tx, rx) = mpsc::channel(16);
            pump_in(pty_file(&p.master, container)?, rx);
            stdin_tx = Some(tx);
        }
        let (tx, rx) = mpsc::channel(16);
        pump_out(pty_file(&p.master, container)?, tx);
        stdout_rx = Some(rx);
        let (rtx, mut rrx) = mpsc::channel::<TerminalSize>(4);
        let master = p.master;
        tokio::spawn(async move {
            while let Some(sz) = rrx.recv().await {
                let _ = sandbox::set_winsize(&master, sz.width, sz.height);
            }
        });
        resize_tx = Some(rtx);
    } else {
        if let Some(w) = child.stdin.take() {
            let (tx, rx) = mpsc::channel(16);
            pump_in(w, rx);
            stdin_tx = Some(tx);
        }
        if let Some(r) = child.stdout.take() {
            let (tx, rx) = mpsc::channel(16);
            pump_out(r, tx);
            stdout_rx = Some(rx);
        }
        if let Some(r) = child.stderr.take() {
            let (tx, rx) = mpsc::channel(16);
            pump_out(r, tx);
            stderr_rx = Some(rx);
        }
    }
    let (exit_tx, exit_rx) = oneshot::channel();
    let (kill_tx, mut kill_rx) = oneshot::channel::<()>();
    let mut container_gone = inst.exited.clone();
    let span = tracing::debug_span!("node.exec", k8s.pod = %pod.name, k8s.container = container);
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let status = tokio::select! {
                s = child.wait() => s,
                _ = &mut kill_rx => {
                    kill_group(pid);
                    child.wait().await
                }
                _ = async { let _ = container_gone.wait_for(|g| *g).await; } => {
                    kill_group(pid);
                    child.wait().await
                }
            };
            let status = match status {
                Ok(s) => ExitStatus::Exited(exit_code(s)),
                Err(e) => ExitStatus::Failed(format!("waiting for the exec failed: {e}")),
            };
            tracing::debug!(?status, "exec ended");
            let _ = exit_tx.send(status);
        },
        span,
    ));
    Ok(Session {
        command: req.command,
        tty: req.tty,
        stdin: stdin_tx,
        stdout: stdout_rx,
        stderr: stderr_rx,
        resize: resize_tx,
        exit: exit_rx,
        _kill_on_drop: Some(kill_tx),
    })
}

fn kill_group(pid: Option<i32>) {
    if let Some(pid) = pid.and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

pub(crate) async fn attach(pod: &Arc<PodRuntime>, container: &str, req: AttachRequest) -> Result<Session, NodeError> {
    let inst = pod.running_instance(container)?;
    attach_instance(&inst, req)
}

fn attach_instance(inst: &Arc<Instance>, req: AttachRequest) -> Result<Session, NodeError> {
    let tty = inst.tty;
    let (mut stdout_rx, mut stderr_rx) = (None, None);
    let (out_tx, err_tx) = {
        let (mut o, mut e) = (None, None);
        if req.stdout {
            let (tx, rx) = mpsc::channel(64);
            o = Some(tx);
            stdout_rx = Some(rx);
        }
        // With a tty there is only one output stream.
        if req.stderr && !tty {
            let (tx, rx) = mpsc::channel(64);
            e = Some(tx);
            stderr_rx = Some(rx);
        }
        (o, e)
    };
    inst.add_attacher(out_tx, err_tx);
    let mut stdin_tx = None;
    if req.stdin
        && let Some(shared) = inst.stdin.clone()
    {
        let (tx, mut rx) = mpsc::channel::<Bytes>(16);
        let once = inst.stdin_once;
        tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                let mut g = shared.lock().await;
                let Some(w) = g.as_mut() else { break };
                if w.write_all(&b).await.is_err() || w.flush().await.is_err() {
                    break;
                }
            }
            if once {
                // stdinOnce: the first attach session to end closes the container's stdin.
                shared.lock().await.take();
            }
        });
        stdin_tx = Some(tx);
    }
    let mut resize_tx = None;
    if tty && let Some(master) = inst.pty_master.clone() {
        let (tx, mut rx) = mpsc::channel::<TerminalSize>(4);
        tokio::spawn(async move {
            while let Some(sz) = rx.recv().await {
                let _ = sandbox::set_winsize(&*master, sz.width, sz.height);
            }
        });
        resize_tx = Some(tx);
    }
    let (exit_tx, exit_rx) = oneshot::channel();
    let mut gone = inst.exited.clone();
    tokio::spawn(async move {
        let _ = gone.wait_for(|g| *g).await;
        let _ = exit_tx.send(ExitStatus::Detached);
    });
    Ok(Session {
        command: Vec::new(),
        tty,
        stdin: stdin_tx,
        stdout: stdout_rx,
        stderr: stderr_rx,
        resize: resize_tx,
        exit: exit_rx,
        _kill_on_drop: None,
    })
}
