//! One pod's lifecycle: image "pull", volumes, holder, init containers, containers with their
//! restart policy, and the kubelet-like status reported after every change.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::io::AsyncWrite;
use tokio::sync::{mpsc, watch};

use super::caps::Capabilities;
use super::env::POD_IP;
use super::image::{self, ImageCheck, StoredImage};
use super::logs::LogFile;
use super::sandbox::{self, PodNamespaces};
use super::volumes::{self, PodVolumes};
use super::{MAX_BACKOFF_FACTOR, NodeError, NodeInner, ResolvedVolumes};

mod launch;

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

type StdinWriter = Box<dyn AsyncWrite + Send + Unpin>;
type Attacher = (Option<mpsc::Sender<Bytes>>, Option<mpsc::Sender<Bytes>>);

/// One run of a container (a restart makes a new instance).
pub(crate) struct Instance {
    /// Host pid of the sandbox's first process (the command, PID 1 in its namespace).
    pub inner_pid: i32,
    outer_pid: Option<u32>,
    pub env: Vec<(String, String)>,
    pub working_dir: String,
    pub tty: bool,
    /// The stdin the node holds open for `stdin: true` containers; `None` inside once closed.
    pub stdin: Option<Arc<tokio::sync::Mutex<Option<StdinWriter>>>>,
    pub stdin_once: bool,
    /// The container's capabilities, which its execs get too.
    pub caps: Capabilities,
    /// Who the container's process is, and how (its execs are the same).
    pub identity: crate::node::sandbox::Identity,
    pub user_mode: crate::node::sandbox::UserMode,
    /// `cgroup.procs` files of the container's cgroups, which its execs join too.
    pub cgroup_procs: Vec<std::path::PathBuf>,
    pub pty_master: Option<Arc<OwnedFd>>,
    pub exited: watch::Receiver<bool>,
    attachers: Mutex<Vec<Attacher>>,
    log: Arc<LogFile>,
}

impl Instance {
    /// Adds a live copy of stdout/stderr from now on.
    pub fn add_attacher(&self, out: Option<mpsc::Sender<Bytes>>, err: Option<mpsc::Sender<Bytes>>) {
        if *self.exited.borrow() {
            return; // dropping the senders ends the attach's output at once
        }
        self.attachers.lock().expect("attachers lock").push((out, err));
    }

    fn is_running(&self) -> bool {
        !*self.exited.borrow()
    }
}

struct ContainerRt {
    spec: Container,
    init: bool,
    /// The image it last started from, held while the pod exists: the image is in use (the
    /// kubelet counts exited containers too) and no collection deletes it.
    image: Mutex<Option<Arc<StoredImage>>>,
    current: Mutex<Option<Arc<Instance>>>,
    previous_log: Mutex<Option<Arc<LogFile>>>,
}

/// Mutable, reported state.
struct PodState {
    start_time: Time,
    /// Set once the pod is over (or can never start): Succeeded / Failed.
    terminal: Option<&'static str>,
    /// The pod's sandbox (its holder and namespaces) is up.
    sandbox_ready: bool,
    statuses: BTreeMap<String, ContainerStatus>,
    conditions: BTreeMap<&'static str, PodCondition>,
}

pub(crate) struct PodRuntime {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pod: Pod,
    dir: PathBuf,
    node: Weak<NodeInner>,
    state: Mutex<PodState>,
    containers: BTreeMap<String, Arc<ContainerRt>>,
    stop: watch::Sender<Option<Duration>>,
    done: watch::Sender<bool>,
    holder: Mutex<Option<(u32, i32)>>,
    /// The pod's IP on the node's bridge, once its sandbox is connected (pod network only).
    ip: Mutex<Option<std::net::Ipv4Addr>>,
    volumes: Mutex<PodVolumes>,
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting { reason: Some(reason.into()), message }),
        ..Default::default()
    }
}

impl PodRuntime {
    pub fn new(node: &Arc<NodeInner>, pod: Pod) -> Arc<PodRuntime> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let spec = pod.spec.clone().unwrap_or_default();
        let has_init = spec.init_containers.as_ref().is_some_and(|c| !c.is_empty());
        let mut containers = BTreeMap::new();
        let mut statuses = BTreeMap::new();
        let all =
            spec.init_containers.iter().flatten().map(|c| (c, true)).chain(spec.containers.iter().map(|c| (c, false)));
        for (c, init) in all {
            let reason = if has_init { "PodInitializing" } else { "ContainerCreating" };
            statuses.insert(
                c.name.clone(),
                ContainerStatus {
                    name: c.name.clone(),
                    image: c.image.clone().unwrap_or_default(),
                    image_id: String::new(),
                    ready: false,
                    started: Some(false),
                    restart_count: 0,
                    state: Some(waiting(reason, None)),
                    ..Default::default()
                },
            );
            containers.insert(
                c.name.clone(),
                Arc::new(ContainerRt {
                    spec: c.clone(),
                    init,
                    image: Mutex::new(None),
                    current: Mutex::new(None),
                    previous_log: Mutex::new(None),
                }),
            );
        }
        Arc::new(PodRuntime {
            dir: node.cfg.data_dir.join("pods").join(&uid),
            uid,
            name,
            namespace,
            pod,
            node: Arc::downgrade(node),
            state: Mutex::new(PodState {
                start_time: now(),
                terminal: None,
                sandbox_ready: false,
                statuses,
                conditions: BTreeMap::new(),
            }),
            containers,
            stop: watch::Sender::new(None),
            done: watch::Sender::new(false),
            holder: Mutex::new(None),
            ip: Mutex::new(None),
            volumes: Mutex::new(PodVolumes::default()),
        })
    }

    fn spec(&self) -> k8s_openapi::api::core::v1::PodSpec {
        self.pod.spec.clone().unwrap_or_default()
    }

    fn node(&self) -> Option<Arc<NodeInner>> {
        self.node.upgrade()
    }

    /// Applies a change to the state and reports the resulting status (in order: the sink is
    /// called with the state lock held).
    fn update(&self, f: impl FnOnce(&mut PodState)) {
        let Some(node) = self.node() else { return };
        let mut st = self.state.lock().expect("pod state lock");
        f(&mut st);
        let status = self.build_status(&mut st);
        (node.sink)(&self.uid, status);
    }

    fn set_container(&self, name: &str, f: impl FnOnce(&mut ContainerStatus)) {
        self.update(|st| {
            if let Some(cs) = st.statuses.get_mut(name) {
                f(cs);
            }
        });
    }

    /// The pod's IP (`None` before its sandbox is connected) and its node's, as the pod's
    /// status reports them. Without a pod network every pod shares the node's loopback.
    pub(super) fn addresses(&self) -> (Option<String>, String) {
        let networked = self.node().is_some_and(|n| n.network.get().is_some());
        if !networked {
            return (Some(POD_IP.into()), POD_IP.into());
        }
        let ip = self.ip.lock().expect("ip lock").map(|ip| ip.to_string());
        (ip, crate::node::network::BRIDGE_IP.to_string())
    }

    /// The pod with its addresses in its status, for the `status.podIP`/`hostIP` fieldRefs.
    pub(super) fn pod_with_addresses(&self) -> Pod {
        let mut pod = self.pod.clone();
        let (pod_ip, host_ip) = self.addresses();
        let status = pod.status.get_or_insert_with(Default::default);
        status.pod_ip = pod_ip;
        status.host_ip = Some(host_ip);
        pod
    }

    /// The pod's IP once connected, else the one every pod has without a pod network.
    pub(super) fn ip_or_loopback(&self) -> String {
        self.addresses().0.unwrap_or_else(|| POD_IP.into())
    }

    /// Gives the pod's IP back to the node network.
    pub fn release_ip(&self) {
        let ip = self.ip.lock().expect("ip lock").take();
        if let (Some(ip), Some(node)) = (ip, self.node())
            && let Some(network) = node.network.get()
        {
            network.release(ip);
        }
    }

    fn build_status(&self, st: &mut PodState) -> PodStatus {
        let (pod_ip, host_ip) = self.addresses();
        let spec = self.spec();
        let init_names: Vec<&str> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
        let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        let term_ok = |cs: &ContainerStatus| {
            cs.state.as_ref().and_then(|s| s.terminated.as_ref()).is_some_and(|t| t.exit_code == 0)
        };
        let initialized = init_names.iter().all(|n| st.statuses.get(*n).is_some_and(term_ok));
        let ready = !names.is_empty() && names.iter().all(|n| st.statuses.get(*n).is_some_and(|c| c.ready));
        let mut set = |kind: &'static str, value: bool, reason: Option<&str>| {
            let status = if value { "True" } else { "False" };
            match st.conditions.get_mut(kind) {
                // Same status: only the reason may move on (ContainersNotReady -> PodCompleted).
                Some(c) if c.status == status => c.reason = reason.map(str::to_string),
                _ => {
                    st.conditions.insert(
                        kind,
                        PodCondition {
                            type_: kind.into(),
                            status: status.into(),
                            last_transition_time: Some(now()),
                            reason: reason.map(str::to_string),
                            ..Default::default()
                        },
                    );
                }
            }
        };
        // A finished pod's containers are not ready because the pod is over, and its sandbox is
        // gone, as a kubelet reports them.
        let not_ready = match st.terminal {
            Some("Succeeded") => "PodCompleted",
            Some(_) => "PodFailed",
            None => "ContainersNotReady",
        };
        set("PodReadyToStartContainers", st.sandbox_ready && st.terminal.is_none(), None);
        set("PodScheduled", true, None);
        let init_reason = if !initialized {
            Some("ContainersNotInitialized")
        } else if !init_names.is_empty() && st.terminal == Some("Succeeded") {
            Some("PodCompleted")
        } else {
            None
        };
        set("Initialized", initialized, init_reason);
        set("ContainersReady", ready, (!ready).then_some(not_ready));
        set("Ready", ready, (!ready).then_some(not_ready));
        let running_or_restarted = names.iter().any(|n| {
            st.statuses.get(*n).is_some_and(|c| {
                c.state.as_ref().is_some_and(|s| s.running.is_some() || s.terminated.is_some()) || c.restart_count > 0
            })
        });
        let phase = match st.terminal {
            Some(p) => p,
            None if initialized && running_or_restarted => "Running",
            None => "Pending",
        };
        // The order a v1.34 kubelet lists them in.
        let order = ["PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"];
        PodStatus {
            phase: Some(phase.into()),
            conditions: Some(order.iter().filter_map(|k| st.conditions.get(k).cloned()).collect()),
            host_ip: Some(host_ip.clone()),
            host_ips: Some(vec![k8s_openapi::api::core::v1::HostIP { ip: host_ip }]),
            pod_ips: pod_ip.clone().map(|ip| vec![PodIP { ip }]),
            pod_ip,
            start_time: Some(st.start_time.clone()),
            // The API server computed it from the resources at create; the kubelet keeps it.
            qos_class: None,
            init_container_statuses: (!init_names.is_empty())
                .then(|| init_names.iter().filter_map(|n| st.statuses.get(*n).cloned()).collect()),
            container_statuses: Some(names.iter().filter_map(|n| st.statuses.get(*n).cloned()).collect()),
            message: None,
            reason: None,
            nominated_node_name: None,
            ..Default::default()
        }
    }

    /// The whole life of the pod; ends when every process is gone.
    pub async fn run(self: Arc<Self>, node: Arc<NodeInner>, data: ResolvedVolumes) {
        let span = tracing::info_span!("node.pod", k8s.pod = %self.name, k8s.namespace = %self.namespace, k8s.pod.uid = %self.uid);
        let _ = tracing::Instrument::instrument(self.clone().lifecycle(node, data), span).await;
        self.cleanup();
        self.done.send_replace(true);
    }

    async fn lifecycle(self: Arc<Self>, node: Arc<NodeInner>, data: ResolvedVolumes) {
        self.update(|_| {});
        let mut stop = self.stop.subscribe();
        let (pod, dir, data_dir, root) =
            (self.pod.clone(), self.dir.clone(), node.cfg.data_dir.clone(), node.isolation.root);
        let prepared = tokio::task::spawn_blocking(move || {
            // The pod directory must exist even without volumes: the holder runs in it.
            std::fs::create_dir_all(&dir).map_err(|source| volumes::VolumeError::Io {
                volume: "(pod directory)".into(),
                path: dir.clone(),
                source,
            })?;
            volumes::prepare(&pod, &data, &dir, &data_dir, root).map(|v| (v, data))
        })
        .await;
        let data = match prepared {
            Ok(Ok((v, data))) => {
                *self.volumes.lock().expect("volumes lock") = v;
                data
            }
            Ok(Err(e)) => {
                drop(node);
                return self.config_error(e.to_string(), &mut stop).await;
            }
            Err(e) => {
                drop(node);
                return self.config_error(e.to_string(), &mut stop).await;
            }
        };

        let network = node.network.get();
        let node_user = network.and_then(|n| n.user_ns());
        let pod_ns = match sandbox::start_holder(&node.spawner, node.isolation, &self.dir, &self.name, node_user).await
        {
            Ok((started, ns)) => {
                *self.holder.lock().expect("holder lock") = Some((started.child.id().unwrap_or(0), started.inner_pid));
                if let Some(network) = network {
                    match network.attach(&node.spawner, started.inner_pid, &ns.net).await {
                        Ok(link) => *self.ip.lock().expect("ip lock") = Some(link.ip),
                        Err(e) => {
                            drop(node);
                            return self.config_error(format!("cannot start the pod sandbox: {e}"), &mut stop).await;
                        }
                    }
                }
                self.update(|st| st.sandbox_ready = true);
                // The holder lives as long as this task; kill_on_drop ends it.
                (Arc::new(ns), started.child)
            }
            Err(e) => {
                drop(node);
                return self.config_error(format!("cannot start the pod sandbox: {e}"), &mut stop).await;
            }
        };
        let ns = Some(pod_ns.0.clone());
        drop(node);
        let spec = self.spec();
        let policy = spec.restart_policy.clone().unwrap_or_else(|| "Always".into());
        let data = Arc::new(data);

        for c in spec.init_containers.iter().flatten() {
            let rt = self.containers[&c.name].clone();
            // Init containers restart on failure unless the policy is Never.
            let init_policy = if policy == "Never" { "Never" } else { "OnFailure" };
            let ok = self.supervise(&rt, init_policy, ns.clone(), data.clone(), &mut stop).await;
            if !ok {
                let stopped = stop.borrow().is_some();
                self.update(|st| {
                    st.terminal = Some("Failed");
                    for n in spec.containers.iter().map(|c| &c.name) {
                        if let Some(cs) = st.statuses.get_mut(n) {
                            cs.state = Some(waiting("PodInitializing", None));
                        }
                    }
                });
                if !stopped {
                    tracing::info!("init container {} failed; pod failed", c.name);
                }
                return;
            }
        }
        let tasks = spec.containers.iter().map(|c| {
            let rt = self.containers[&c.name].clone();
            let this = self.clone();
            let (policy, ns, data, mut stop) = (policy.clone(), ns.clone(), data.clone(), self.stop.subscribe());
            async move { this.supervise(&rt, &policy, ns, data, &mut stop).await }
        });
        let results = futures::future::join_all(tasks).await;
        let all_ok = results.iter().all(|ok| *ok);
        self.update(|st| st.terminal = Some(if all_ok { "Succeeded" } else { "Failed" }));
        // Kill the holder and reap it before the pod counts as done: a stopped pod has no
        // process left (dropping the child would only send the signal).
        let (_ns, mut holder) = pod_ns;
        let inner = self.holder.lock().expect("holder lock").map_or(0, |(_, inner)| inner);
        sandbox::end_holder(&mut holder, inner).await;
    }

    async fn config_error(&self, msg: String, stop: &mut watch::Receiver<Option<Duration>>) {
        tracing::warn!(error = %msg, "pod cannot start");
        let names: Vec<String> = self.containers.keys().cloned().collect();
        self.update(|st| {
            for n in &names {
                if let Some(cs) = st.statuses.get_mut(n) {
                    cs.state = Some(waiting("CreateContainerConfigError", Some(msg.clone())));
                }
            }
        });
        let _ = stop.wait_for(Option::is_some).await;
    }

    /// Runs a container per restart policy until it is done or the pod stops. Returns whether
    /// it ended successfully (exit 0).
    async fn supervise(
        &self,
        rt: &Arc<ContainerRt>,
        policy: &str,
        ns: Option<Arc<PodNamespaces>>,
        mut data: Arc<ResolvedVolumes>,
        stop: &mut watch::Receiver<Option<Duration>>,
    ) -> bool {
        let name = rt.spec.name.clone();
        let Some((base, max)) = self.node().map(|n| (n.cfg.backoff_base, n.cfg.backoff_base * MAX_BACKOFF_FACTOR))
        else {
            return false;
        };
        let mut restarts: i32 = 0;
        let mut backoff = base;
        loop {
            if stop.borrow().is_some() {
                return false;
            }
            // As a kubelet: the image is ensured before every start, restarts included.
            let Some(image) = self.ensure_image(rt, stop).await else {
                return false;
            };
            *rt.image.lock().expect("image lock") = image.clone();
            let code = match self.run_instance(rt, restarts, ns.clone(), &data, image.as_ref(), stop).await {
                Ok(code) => code,
                Err(CreateFailure { reason, message }) => {
                    self.set_container(&name, |cs| cs.state = Some(waiting(reason, Some(message))));
                    // A missing Secret or ConfigMap (or key) goes away once it exists: like a
                    // kubelet, try again after each back-off with the API side's current data.
                    // An image's config the runtime cannot apply (CreateContainerError) stays.
                    if reason == "CreateContainerConfigError" {
                        if tokio::time::timeout(backoff, stop.wait_for(Option::is_some)).await.is_ok() {
                            return false;
                        }
                        backoff = (backoff * 2).min(max);
                        let hooks = self.node().and_then(|n| n.image_hooks.get().cloned());
                        if let Some(fresh) = hooks.and_then(|h| (h.pod_data)(&self.uid)) {
                            data = Arc::new(fresh);
                        }
                        continue;
                    }
                    let _ = stop.wait_for(Option::is_some).await;
                    return false;
                }
            };
            let restart = match policy {
                "Always" => true,
                "OnFailure" => code != 0,
                _ => false,
            };
            if !restart || stop.borrow().is_some() {
                return code == 0;
            }
            // The kubelet's `doBackOff`: the first restart is immediate, then CrashLoopBackOff
            // doubling up to the cap.
            if restarts > 0 {
                let msg = format!(
                    "back-off {} restarting failed container={name} pod={}_{}({})",
                    go_duration(backoff),
                    self.name,
                    self.namespace,
                    self.uid
                );
                self.set_container(&name, |cs| {
                    cs.last_state = cs.state.take();
                    cs.state = Some(waiting("CrashLoopBackOff", Some(msg)));
                });
                if tokio::time::timeout(backoff, stop.wait_for(Option::is_some)).await.is_ok() {
                    return false;
                }
                backoff = (backoff * 2).min(max);
            }
            restarts += 1;
        }
    }

    /// The kubelet's `EnsureImageExists` for one start: returns once the image is there (the
    /// stored image, or `None` for the host's root), or `None` when the pod stops first. A
    /// failed pull shows ErrImagePull for one back-off base (the kubelet's next sync), then
    /// ImagePullBackOff for the current back-off, then pulls again; the back-off doubles up to
    /// its cap.
    async fn ensure_image(
        &self,
        rt: &Arc<ContainerRt>,
        stop: &mut watch::Receiver<Option<Duration>>,
    ) -> Option<Option<Arc<StoredImage>>> {
        let name = rt.spec.name.as_str();
        let image = rt.spec.image.clone().unwrap_or_default();
        let (images, base, hooks) =
            self.node().map(|n| (n.images.clone(), n.cfg.backoff_base, n.image_hooks.get().cloned()))?;
        let on_pull = |e: image::ImageEvent| {
            if let Some(h) = &hooks {
                (h.events)(&self.uid, name, &image, e);
            }
        };
        let max = base * MAX_BACKOFF_FACTOR;
        let mut backoff = base;
        loop {
            let secret_data = hooks.as_ref().map(|h| (h.pull_secrets)(&self.uid)).unwrap_or_default();
            let secrets = image::pod_configs(secret_data.iter().map(|(n, d)| (n.as_str(), d)));
            let policy = rt.spec.image_pull_policy.as_deref();
            let check = tokio::select! {
                c = images.ensure(&image, policy, &secrets, &on_pull) => c,
                _ = stop.wait_for(Option::is_some) => return None,
            };
            let (reason, msg) = match check {
                ImageCheck::Ready(stored) => return Some(stored),
                ImageCheck::InvalidName(msg) => ("InvalidImageName", msg),
                ImageCheck::NeverPull(msg) => ("ErrImageNeverPull", msg),
                ImageCheck::PullFailed(msg) => {
                    self.set_container(name, |cs| cs.state = Some(waiting("ErrImagePull", Some(msg))));
                    if tokio::time::timeout(base, stop.wait_for(Option::is_some)).await.is_ok() {
                        return None;
                    }
                    let msg = format!("Back-off pulling image {image:?}");
                    self.set_container(name, |cs| cs.state = Some(waiting("ImagePullBackOff", Some(msg))));
                    if tokio::time::timeout(backoff, stop.wait_for(Option::is_some)).await.is_ok() {
                        return None;
                    }
                    backoff = (backoff * 2).min(max);
                    continue;
                }
            };
            // Neither goes away by retrying: the kubelet reports the same on every sync.
            self.set_container(name, |cs| cs.state = Some(waiting(reason, Some(msg))));
            let _ = stop.wait_for(Option::is_some).await;
            return None;
        }
    }

    /// Signals stop and waits until every process of the pod is gone.
    /// Stops every container (TERM, then KILL after `grace`) and returns once none of the pod's
    /// processes runs any more: a caller that goes on (a deletion reported done, a node stopped)
    /// must not race processes still dying.
    pub async fn stop(&self, grace: Duration) {
        // Taken first: once stopped the pod forgets its pids.
        let procs: Vec<(u32, String)> =
            self.host_pids().into_iter().filter_map(|pid| process_start(pid).map(|start| (pid, start))).collect();
        self.stop.send_if_modified(|s| {
            if s.is_none() {
                *s = Some(grace);
                true
            } else {
                false
            }
        });
        let mut done = self.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
        wait_gone(&procs, PROCESS_EXIT_WAIT).await;
    }

    fn cleanup(&self) {
        self.kill_now();
    }

    /// SIGKILL to everything still running (synchronous: used from Drop too).
    pub fn kill_now(&self) {
        use rustix::process::{Pid, Signal, kill_process};
        for pid in self.host_pids() {
            if let Some(p) = Pid::from_raw(pid as i32) {
                let _ = kill_process(p, Signal::KILL);
            }
        }
        self.holder.lock().expect("holder lock").take();
    }

    pub fn host_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        if let Some((outer, inner)) = *self.holder.lock().expect("holder lock") {
            pids.extend([outer, inner as u32]);
        }
        for c in self.containers.values() {
            if let Some(i) = c.current.lock().expect("current lock").as_ref()
                && i.is_running()
            {
                pids.extend(i.outer_pid);
                pids.push(i.inner_pid as u32);
            }
        }
        pids.retain(|p| *p > 0);
        pids
    }

    /// Drops the pod's hold on the images its containers started from.
    pub fn release_images(&self) {
        for c in self.containers.values() {
            c.image.lock().expect("image lock").take();
        }
    }

    pub async fn remove_dirs(&self) {
        let tmpfs = std::mem::take(&mut self.volumes.lock().expect("volumes lock").tmpfs);
        let dir = self.dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            volumes::unmount_all(&tmpfs);
            remove_pod_dir(&dir);
        })
        .await;
    }

    pub fn remove_dirs_sync(&self) {
        let tmpfs = std::mem::take(&mut self.volumes.lock().expect("volumes lock").tmpfs);
        volumes::unmount_all(&tmpfs);
        remove_pod_dir(&self.dir);
    }

    fn container(&self, name: &str) -> Result<&Arc<ContainerRt>, NodeError> {
        self.containers
            .get(name)
            .ok_or_else(|| NodeError::NoSuchContainer { pod: self.name.clone(), container: name.into() })
    }

    pub fn running_instance(&self, name: &str) -> Result<Arc<Instance>, NodeError> {
        let c = self.container(name)?;
        let cur = c.current.lock().expect("current lock").clone();
        cur.filter(|i| i.is_running())
            .ok_or_else(|| NodeError::NotRunning { pod: self.name.clone(), container: name.into() })
    }

    pub fn log_for(&self, name: &str, previous: bool) -> Result<Arc<LogFile>, NodeError> {
        let c = self.container(name)?;
        if previous {
            return c
                .previous_log
                .lock()
                .expect("previous log lock")
                .clone()
                .ok_or_else(|| NodeError::NoPreviousLogs { pod: self.name.clone(), container: name.into() });
        }
        let cur = c.current.lock().expect("current lock").clone();
        cur.map(|i| i.log.clone())
            .ok_or_else(|| NodeError::NotRunning { pod: self.name.clone(), container: name.into() })
    }
}

/// Why a container could not be created: the kubelet's waiting reason and message.
#[derive(Debug)]
struct CreateFailure {
    reason: &'static str,
    message: String,
}

/// What the kubelet finds wrong in the pod's spec (a missing Secret, a bad quantity).
impl From<String> for CreateFailure {
    fn from(message: String) -> Self {
        CreateFailure { reason: "CreateContainerConfigError", message }
    }
}

/// Removes a pod's directory, including containers' writable layers, whose overlayfs work
/// directories (mode 000) only their owner's chmod lets us remove as an ordinary user.
fn remove_pod_dir(dir: &std::path::Path) {
    if std::fs::remove_dir_all(dir).is_err() {
        let _ = image::remove_all(dir);
    }
}

/// A duration as Go's `time.Duration.String` writes it (`10s`, `2m40s`, `5m0s`, `100ms`), the
/// form of the kubelet's back-off messages.
pub(crate) fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (m, s, frac) = (ms / 60_000, (ms / 1000) % 60, ms % 1000);
    let secs = if frac == 0 { format!("{s}s") } else { format!("{s}.{}s", format!("{frac:03}").trim_end_matches('0')) };
    if m == 0 { secs } else { format!("{m}m{secs}") }
}

/// How long [`PodRuntime::stop`] waits for KILLed processes to be gone (they normally take
/// microseconds; a process stuck in uninterruptible sleep can take longer, and is then left).
const PROCESS_EXIT_WAIT: Duration = Duration::from_secs(5);

/// A process's start time (field 22 of `/proc/PID/stat`), which tells it apart from a later
/// process with the same pid; `None` when it is gone or a zombie (which runs nothing).
fn process_start(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19).map(|s| s.to_string())
}

async fn wait_gone(procs: &[(u32, String)], limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while procs.iter().any(|(pid, start)| process_start(*pid).as_deref() == Some(start.as_str())) {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(pids = ?procs.iter().map(|(p, _)| p).collect::<Vec<_>>(), "pod processes still alive after KILL");
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_go_prints_them() {
        let s = |ms| go_duration(Duration::from_millis(ms));
        assert_eq!([s(100), s(10_000), s(160_000), s(300_000), s(1_500)], ["100ms", "10s", "2m40s", "5m0s", "1.5s"]);
    }
}
