//! Starting one container instance: its root (an image's overlay or the host's root), binds,
//! environment, limits and capabilities, the sandbox, the pumps of its output into the log and
//! attached sessions, and its end (TERM, then KILL, on a stop).

use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::api::core::v1::{Container, ContainerState, ContainerStateRunning, ContainerStateTerminated};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch};

use super::{ContainerRt, CreateFailure, Instance, PodRuntime, StdinWriter, now};
use crate::node::cgroup::{ContainerCgroup, Controller, CpuSettings, parse_cpu_millis, parse_memory};
use crate::node::env::{argv, build_env, build_env_over, expand};
use crate::node::image::{self, StoredImage};
use crate::node::logs::{LogFile, Pipe};
use crate::node::network;
use crate::node::sandbox::{self, Bind, ContainerSandbox, PodNamespaces, Rootfs, Stdios, exit_code};
use crate::node::{ResolvedVolumes, volumes};
use k8s_openapi::api::core::v1::HostAlias;

/// How long a started container is watched before it is reported running (see `run_instance`).
const EXIT_AT_ONCE: Duration = Duration::from_millis(2);

impl PodRuntime {
    /// Starts one instance and waits for it to end; returns its exit code.
    pub(super) async fn run_instance(
        &self,
        rt: &Arc<ContainerRt>,
        restarts: i32,
        ns: Option<Arc<PodNamespaces>>,
        data: &ResolvedVolumes,
        stored: Option<&Arc<StoredImage>>,
        stop: &mut watch::Receiver<Option<Duration>>,
    ) -> Result<i32, CreateFailure> {
        let Some(node) = self.node() else { return Ok(137) };
        let c = &rt.spec;
        let image = c.image.clone().unwrap_or_default();
        let writable_dir = self.dir.join("rootfs").join(format!("{}-{restarts}", c.name));
        let (env, argv, working_dir, identity, rootfs) = match stored {
            None => {
                let env = build_env(&self.pod_with_addresses(), c, data)?;
                let argv = argv(c, &env);
                let working_dir = c.working_dir.clone().unwrap_or_else(|| "/".into());
                let images_dir = node.cfg.images_dir.as_ref();
                let root = images_dir.map(|d| d.join(image.replace(['/', ':'], "_"))).filter(|p| p.is_dir());
                let identity = image::host_root_identity(&self.pod, c)
                    .map_err(|message| CreateFailure { reason: "CreateContainerError", message })?;
                (env, argv, working_dir, identity, Rootfs::ReadOnly(root))
            }
            Some(img) => {
                // The runtime's failures to apply the image's config: CreateContainerError.
                let runtime = |message: String| CreateFailure { reason: "CreateContainerError", message };
                let defaults = image::image_defaults(&self.pod, c, img).map_err(runtime)?;
                let mut env = build_env_over(&self.pod_with_addresses(), c, data, defaults.env)?;
                if !env.iter().any(|(k, _)| k == "HOME") {
                    env.push(("HOME".into(), defaults.home));
                }
                let argv = img.run.argv(c.command.as_deref(), c.args.as_deref()).map_err(runtime)?;
                let argv = argv.iter().map(|a| expand(a, &env)).collect();
                let dir = writable_dir.clone();
                let (img2, hosts, resolv) = (img.clone(), self.etc_hosts(), self.resolv_conf());
                let overlay =
                    tokio::task::spawn_blocking(move || image::writable_root(&img2, &dir, &hosts, resolv.as_deref()))
                        .await
                        .map_err(|e| runtime(e.to_string()))?
                        .map_err(|e| runtime(format!("cannot make the container's writable layer: {e}")))?;
                (env, argv, defaults.working_dir, defaults.identity, Rootfs::Overlay(overlay))
            }
        };
        let mut binds = self.binds(c)?;
        // A container on the host's root would see the host's /etc/hosts: like a kubelet, give
        // it the pod's when the pod asks for `hostAliases` or has an IP of its own (an image's
        // root gets it in its writable layer instead); the same for the pod network's
        // resolv.conf.
        let aliased = self.spec().host_aliases.is_some_and(|a| !a.is_empty());
        let networked = node.network.get().is_some();
        if matches!(rootfs, Rootfs::ReadOnly(_)) {
            let files = [
                ("/etc/hosts", "etc-hosts", (aliased || networked).then(|| self.etc_hosts())),
                ("/etc/resolv.conf", "etc-resolv.conf", self.resolv_conf()),
            ];
            for (dest, name, content) in files {
                let Some(content) = content else { continue };
                if binds.iter().any(|b| b.dest == dest) || !std::path::Path::new(dest).is_file() {
                    continue;
                }
                let path = self.dir.join(name);
                std::fs::write(&path, content).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                binds.push(Bind { source: path, dest: dest.into(), read_only: true });
            }
        }
        let share_pid = self.spec().share_process_namespace.unwrap_or(false);
        let mut user_mode = sandbox::UserMode::of(node.isolation, identity.user, share_pid, &rootfs);
        // A `Real` user builds its own sandbox (only on an image's overlay): it must reach the
        // image's root and every bind source, and finds the mount points already made.
        if let (sandbox::UserMode::Real, Rootfs::Overlay(o)) = (user_mode, &rootfs) {
            let barred = std::iter::once(o.merged.as_path())
                .chain(binds.iter().map(|b| b.source.as_path()))
                .find(|p| !sandbox::reachable_by_anyone(p));
            if let Some(barred) = barred {
                tracing::info!(
                    k8s.container = %c.name, path = %barred.display(),
                    "the container's user runs mapped to the pod's root, without supplementary groups: a directory above this path is closed to other users (chmod o+x to let it through)"
                );
                user_mode = sandbox::UserMode::Mapped;
            } else {
                let mut dests: Vec<(String, bool)> = vec![("/dev".into(), false), ("/proc".into(), false)];
                dests.extend(binds.iter().map(|b| (b.dest.clone(), b.source.is_file())));
                dests.push((working_dir.clone(), false));
                image::make_mount_points(o, &dests).map_err(|e| CreateFailure {
                    reason: "CreateContainerError",
                    message: format!("cannot make the container's mount points: {e}"),
                })?;
            }
        }
        let log_path = self.dir.join("logs").join(&c.name).join(format!("{restarts}.log"));
        let log = LogFile::create(&log_path).map_err(|e| format!("cannot create log {}: {e}", log_path.display()))?;
        let (memory, cpu) = resource_limits(c)?;
        let caps = crate::node::caps::for_container(c)?;
        // Said per container, not only once at node start, so the warning names the pod whose
        // limit is ignored (the span carries the pod).
        if memory.is_some() && !node.cgroups.enforces(Controller::Memory) {
            tracing::warn!(k8s.container = %c.name, "memory limit not enforced: the node has no memory cgroup (see the node's start-up warning)");
        }
        if cpu.is_some() && !node.cgroups.enforces(Controller::Cpu) {
            tracing::warn!(k8s.container = %c.name, "CPU limit and request not enforced: the node has no cpu cgroup (see the node's start-up warning)");
        }
        let cgroup: Option<ContainerCgroup> = node
            .cgroups
            .container(&format!("{}-{}-{restarts}", self.uid, c.name), memory, cpu)
            .map_err(|e| e.to_string())?;
        let tty = c.tty.unwrap_or(false);
        let want_stdin = c.stdin.unwrap_or(false);
        let (stdio, pty) = if tty {
            let p = sandbox::open_pty().map_err(|e| format!("cannot open a terminal: {e}"))?;
            let dup = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(|e| e.to_string());
            (Stdios { stdin: dup(&p.slave)?, stdout: dup(&p.slave)?, stderr: dup(&p.slave)? }, Some(p))
        } else {
            let stdin = if want_stdin { Stdio::piped() } else { Stdio::null() };
            (Stdios { stdin, stdout: Stdio::piped(), stderr: Stdio::piped() }, None)
        };
        let sb = ContainerSandbox {
            rootfs,
            identity: identity.clone(),
            user_mode,
            binds,
            env: env.clone(),
            working_dir: working_dir.clone(),
            argv: argv.clone(),
            hostname: self.name.clone(),
            pod_ns: ns,
            share_pid,
            cgroup_procs: match &cgroup {
                Some(g) => g.procs_files().map_err(|e| e.to_string())?,
                None => Vec::new(),
            },
            tty: None,
            caps,
        };
        let started = sandbox::start_container(&node.spawner, node.isolation, sb, stdio).await;
        drop(node);
        let mut started = match started {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("failed to start container {:?}: {e}", c.name);
                let t = now();
                self.set_container(&c.name, |cs| {
                    cs.restart_count = restarts;
                    cs.state = Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code: 128,
                            reason: Some("StartError".into()),
                            message: Some(msg),
                            started_at: Some(t.clone()),
                            finished_at: Some(t),
                            ..Default::default()
                        }),
                        ..Default::default()
                    });
                });
                return Ok(128);
            }
        };
        let (exited_tx, exited_rx) = watch::channel(false);
        let mut pumps = Vec::new();
        let (stdin, pty_master) = if let Some(p) = pty {
            drop(p.slave);
            let master = Arc::new(p.master);
            let rd = master.try_clone().map_err(|e| e.to_string())?;
            let wr = master.try_clone().map_err(|e| e.to_string())?;
            let w: StdinWriter = Box::new(tokio::fs::File::from_std(std::fs::File::from(wr)));
            pumps.push((
                Pipe::Stdout,
                Box::new(tokio::fs::File::from_std(std::fs::File::from(rd))) as Box<dyn AsyncRead + Send + Unpin>,
            ));
            (want_stdin.then(|| Arc::new(tokio::sync::Mutex::new(Some(w)))), Some(master))
        } else {
            if let Some(o) = started.child.stdout.take() {
                pumps.push((Pipe::Stdout, Box::new(o) as Box<dyn AsyncRead + Send + Unpin>));
            }
            if let Some(e) = started.child.stderr.take() {
                pumps.push((Pipe::Stderr, Box::new(e)));
            }
            let stdin =
                started.child.stdin.take().map(|w| Arc::new(tokio::sync::Mutex::new(Some(Box::new(w) as StdinWriter))));
            (stdin, None)
        };
        let inst = Arc::new(Instance {
            inner_pid: started.inner_pid,
            outer_pid: started.child.id(),
            env,
            working_dir,
            tty,
            stdin,
            stdin_once: c.stdin_once.unwrap_or(false),
            caps,
            identity,
            user_mode,
            cgroup_procs: cgroup.as_ref().map(ContainerCgroup::procs_paths).unwrap_or_default(),
            pty_master,
            exited: exited_rx,
            attachers: Mutex::new(Vec::new()),
            log: log.clone(),
        });
        if let Some(prev) = rt.current.lock().expect("current lock").replace(inst.clone()) {
            *rt.previous_log.lock().expect("previous log lock") = Some(prev.log.clone());
        }
        let started_at = now();
        let container_id = format!("keel://{}-{}-{restarts}", self.uid, c.name);
        // As a kubelet on containerd reports them: the name as stored, the repository's digest.
        let (status_image, image_id) = match stored {
            Some(img) => {
                let name = image::normalized(&image);
                let repo_digest = format!("{}@{}", image::repository(&name), img.repo_digest);
                (name, repo_digest)
            }
            None => (image.clone(), format!("keel-image://{image}")),
        };
        let init = rt.init;
        let pump_tasks: Vec<_> = pumps.into_iter().map(|(pipe, r)| tokio::spawn(pump(r, pipe, inst.clone()))).collect();
        let mut child = started.child;
        // A kubelet learns of a start at its runtime's next relist, when a command that exits at
        // once is already gone: it reports such a container terminated straight from waiting
        // (and clients such as `kubectl run -i` act on that). A short look at the process gives
        // the same for commands that end within it.
        let ended_at_once = tokio::time::timeout(EXIT_AT_ONCE, child.wait()).await.ok();
        self.set_container(&c.name, |cs| {
            if cs.state.as_ref().is_some_and(|s| s.terminated.is_some()) {
                cs.last_state = cs.state.take();
            }
            cs.restart_count = restarts;
            cs.container_id = Some(container_id.clone());
            cs.image = status_image.clone();
            cs.image_id = image_id.clone();
            if ended_at_once.is_none() {
                cs.started = Some(true);
                cs.ready = !init;
                cs.state = Some(ContainerState {
                    running: Some(ContainerStateRunning { started_at: Some(started_at.clone()) }),
                    ..Default::default()
                });
            }
        });
        tracing::info!(k8s.container = %c.name, container.pid = started.inner_pid, "container started");

        let status = match ended_at_once {
            Some(s) => s,
            None => tokio::select! {
                s = child.wait() => s,
                g = async { stop.wait_for(Option::is_some).await.map(|r| r.unwrap_or_default()) } => {
                    let grace = g.unwrap_or_default();
                    terminate(&mut child, inst.inner_pid, share_pid, grace).await
                }
            },
        };
        // Not running from now on: a new exec or attach is refused at once (the node answers
        // "container not found", and kubectl falls back to the log) instead of attaching to output
        // that has ended.
        exited_tx.send_replace(true);
        for t in pump_tasks {
            // With a shared PID namespace a background process may keep the pipe open after
            // the container's process exited; do not wait for it forever.
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), t).await.is_err() {
                abort.abort();
            }
        }
        log.close();
        inst.attachers.lock().expect("attachers lock").clear();
        let code = status.as_ref().map(|s| exit_code(*s)).unwrap_or(137);
        let oom = cgroup.as_ref().is_some_and(ContainerCgroup::oom_killed);
        if let Some(g) = cgroup {
            // Blocks while stray processes are killed and leave the cgroup.
            let _ = tokio::task::spawn_blocking(move || g.remove()).await;
        }
        if stored.is_some() {
            // A restart gets a fresh writable layer, as from a container runtime.
            let _ = tokio::task::spawn_blocking(move || image::remove_all(&writable_dir)).await;
        }
        let signal = status.as_ref().ok().and_then(|s| {
            use std::os::unix::process::ExitStatusExt;
            s.signal().or_else(|| (s.code()? > 128).then(|| s.code().unwrap_or(0) - 128))
        });
        let reason = if oom {
            "OOMKilled"
        } else if code == 0 {
            "Completed"
        } else {
            "Error"
        };
        // As a kubelet: a container that failed and asked for it has the end of its log as its
        // termination message (a `File` message is not read here: `/dev` is the sandbox's own).
        let message = if code != 0 && c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError") {
            let log = log.clone();
            tokio::task::spawn_blocking(move || log.fallback_message().ok())
                .await
                .ok()
                .flatten()
                .filter(|m| !m.is_empty())
        } else {
            None
        };
        let finished = now();
        self.set_container(&c.name, |cs| {
            cs.ready = false;
            cs.started = Some(false);
            cs.state = Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    reason: Some(reason.into()),
                    signal: signal.filter(|_| code > 128),
                    started_at: Some(started_at),
                    finished_at: Some(finished),
                    container_id: Some(container_id),
                    message,
                }),
                ..Default::default()
            });
        });
        tracing::info!(k8s.container = %c.name, exit.code = code, exit.reason = reason, "container ended");
        Ok(code)
    }

    /// The pod's `/etc/hosts`, as a kubelet writes it (its `hostAliases` included).
    pub(super) fn etc_hosts(&self) -> String {
        let mut aliases = self.spec().host_aliases.unwrap_or_default();
        if self.node().is_some_and(|n| n.network.get().is_some_and(|net| net.egress())) {
            // Where pods reach the host's loopback (see `network`), after the pod's own.
            aliases.push(HostAlias {
                ip: network::HOST_LOOPBACK_IP.to_string(),
                hostnames: Some(network::HOST_LOOPBACK_NAMES.iter().map(|n| n.to_string()).collect()),
            });
        }
        image::etc_hosts(&self.name, &self.ip_or_loopback(), &aliases)
    }

    /// The pod's `/etc/resolv.conf` with egress (the node's, see `network::resolv_conf`); none
    /// otherwise (a pod without a way out has no use for a nameserver).
    pub(super) fn resolv_conf(&self) -> Option<String> {
        let egress = self.node().is_some_and(|n| n.network.get().is_some_and(|net| net.egress()));
        if !egress {
            return None;
        }
        std::fs::read_to_string("/etc/resolv.conf").ok().map(|host| network::resolv_conf(&host))
    }

    pub(super) fn binds(&self, c: &Container) -> Result<Vec<Bind>, String> {
        let vols = self.volumes.lock().expect("volumes lock");
        let mut out = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let v = vols
                .by_name
                .get(&m.name)
                .ok_or_else(|| volumes::VolumeError::NoSuchVolume { mount: m.name.clone() }.to_string())?;
            let mut source = v.path.clone();
            if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                if !volumes::safe_relative(sub) {
                    return Err(
                        volumes::VolumeError::BadSubPath { mount: m.name.clone(), sub_path: sub.into() }.to_string()
                    );
                }
                source = source.join(sub);
                if !source.exists() {
                    std::fs::create_dir_all(&source).map_err(|e| e.to_string())?;
                }
            }
            out.push(Bind {
                source,
                dest: m.mount_path.clone(),
                read_only: v.read_only || m.read_only.unwrap_or(false),
            });
        }
        Ok(out)
    }
}

/// containerd's `max_container_log_line_size`: a longer line goes to the log in pieces of this.
const MAX_LOG_LINE: usize = 16 * 1024;

/// Copies one pipe of the container into its log and to the attached sessions. Like
/// containerd's log redirection, the log gets whole lines only: a partial line waits for its
/// newline (or `MAX_LOG_LINE` bytes, or the end of the output), so `logs -f` never shows half a
/// line, while attached sessions get the bytes at once.
async fn pump(mut r: Box<dyn AsyncRead + Send + Unpin>, pipe: Pipe, inst: Arc<Instance>) {
    let mut buf = vec![0u8; 128 * 1024];
    let mut partial: Vec<u8> = Vec::new();
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = Bytes::copy_from_slice(&buf[..n]);
        // One buffered write per chunk into the page cache: cheaper inline than a hand-off to
        // the blocking pool per chunk (measured: `logs -f` went from 0.38 to 0.51 of a pipe's throughput).
        match memchr::memrchr(b'\n', &chunk) {
            Some(last) if partial.is_empty() => {
                inst.log.append(pipe, &chunk[..=last]);
                partial.extend_from_slice(&chunk[last + 1..]);
            }
            Some(last) => {
                partial.extend_from_slice(&chunk[..=last]);
                inst.log.append(pipe, &partial);
                partial.clear();
                partial.extend_from_slice(&chunk[last + 1..]);
            }
            None => partial.extend_from_slice(&chunk),
        }
        while partial.len() >= MAX_LOG_LINE {
            inst.log.append(pipe, &partial[..MAX_LOG_LINE]);
            partial.drain(..MAX_LOG_LINE);
        }
        let targets: Vec<mpsc::Sender<Bytes>> = {
            let mut a = inst.attachers.lock().expect("attachers lock");
            a.retain(|(o, e)| o.as_ref().is_some_and(|s| !s.is_closed()) || e.as_ref().is_some_and(|s| !s.is_closed()));
            a.iter()
                .filter_map(|(o, e)| match pipe {
                    Pipe::Stdout => o.clone(),
                    Pipe::Stderr => e.clone(),
                })
                .collect()
        };
        for t in targets {
            // A slow attacher slows the container, as a full pipe would.
            let _ = t.send(chunk.clone()).await;
        }
    }
    // The output ended mid-line: containerd writes the rest as a partial entry.
    inst.log.append(pipe, &partial);
}

/// TERM, then KILL after `grace`.
async fn terminate(
    child: &mut tokio::process::Child,
    inner_pid: i32,
    share_pid: bool,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    use rustix::process::{Pid, Signal, kill_process, kill_process_group};
    let Some(pid) = Pid::from_raw(inner_pid) else { return child.wait().await };
    if !grace.is_zero() {
        let _ = if share_pid { kill_process_group(pid, Signal::TERM) } else { kill_process(pid, Signal::TERM) };
        if let Ok(s) = tokio::time::timeout(grace, child.wait()).await {
            return s;
        }
    }
    let _ = if share_pid { kill_process_group(pid, Signal::KILL) } else { kill_process(pid, Signal::KILL) };
    let _ = child.start_kill();
    child.wait().await
}

/// The container's memory limit in bytes and CPU settings (when it has a CPU limit or request),
/// as a kubelet reads its resources. An unparsable quantity is a config error naming it.
fn resource_limits(c: &Container) -> Result<(Option<u64>, Option<CpuSettings>), String> {
    let res = c.resources.as_ref();
    let get = |which: &str, name: &str| {
        let map = match which {
            "limits" => res.and_then(|r| r.limits.as_ref()),
            _ => res.and_then(|r| r.requests.as_ref()),
        };
        map.and_then(|m| m.get(name)).map(|q| q.0.as_str())
    };
    let invalid = |which: &str, name: &str, q: &str| format!("container {}: invalid {which}.{name} {q:?}", c.name);
    let memory = match get("limits", "memory") {
        Some(q) => Some(parse_memory(q).ok_or_else(|| invalid("limits", "memory", q))?),
        None => None,
    };
    let millis = |which: &str| match get(which, "cpu") {
        Some(q) => parse_cpu_millis(q).map(Some).ok_or_else(|| invalid(which, "cpu", q)),
        None => Ok(None),
    };
    let (limit, request) = (millis("limits")?, millis("requests")?);
    let cpu = (limit.is_some() || request.is_some()).then(|| CpuSettings::from_millicores(limit, request));
    Ok((memory, cpu))
}
