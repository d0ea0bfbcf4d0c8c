//! The node: runs a pod's containers as sandboxed local processes and reports their status.
//!
//! CONTRACT between the API layer (`crate::api`, `crate::store`) and the node. Owned by the node
//! side; the API side calls only what is listed here. Signatures may grow (new fields, new
//! methods) but existing ones change only by agreement.
//!
//! ```ignore
//! pub struct NodeConfig {
//!     pub data_dir: PathBuf,               // per-pod directories live under data_dir/pods/<uid>
//!     pub images_dir: Option<PathBuf>,     // images_dir/<image name with / and : mapped> = rootfs
//!     pub unavailable_images: Vec<String>, // image names that fail with ErrImagePull -> ImagePullBackOff
//!     pub cached_unpullable_images: Vec<String>, // present but not pullable (fail only with Always)
//!     pub backoff_base: Duration,          // kubelet back-off start (10 s), capped at 30x
//!     pub node_name: String,
//! }
//! /// Called (from any thread) whenever a pod's status changes; the API layer stores it
//! /// (new resourceVersion, MODIFIED watch event).
//! pub type StatusSink = Arc<dyn Fn(&str /* pod uid */, PodStatus) + Send + Sync>;
//!
//! #[derive(Clone)] pub struct Node { .. }
//! impl Node {
//!     pub fn new(cfg: NodeConfig, on_status: StatusSink) -> Result<Node, NodeError>;
//!     /// As `new`, with the image store's options (`images_from`, `host_rootfs`; see `NodeImages`).
//!     pub fn with_images(cfg: NodeConfig, images: NodeImages, on_status: StatusSink) -> Result<Node, NodeError>;
//!     /// Load every archive of `images_from`, or one archive, into the store.
//!     pub async fn load_images_from(&self) -> Result<Vec<LoadedImage>, NodeError>;
//!     pub async fn load_image_archive(&self, path: &Path) -> Result<Vec<LoadedImage>, NodeError>;
//!     /// The pod is stored, defaulted, has uid/name/namespace. `volumes` carries the data of its
//!     /// configMap and secret volumes (volume name -> key -> bytes), resolved by the API layer.
//!     /// Returns at once; progress is reported through the StatusSink.
//!     pub fn run_pod(&self, pod: Pod, volumes: ResolvedVolumes);
//!     /// TERM every container process, KILL after `grace`; returns once all are gone and the
//!     /// final statuses were reported. Directories are removed by `forget_pod`.
//!     pub async fn stop_pod(&self, uid: &str, grace: Duration);
//!     /// Drop the pod's logs and directories (after the API layer removed the pod).
//!     pub async fn forget_pod(&self, uid: &str);
//!     pub async fn exec(&self, uid: &str, container: &str, req: ExecRequest) -> Result<Session, NodeError>;
//!     pub async fn attach(&self, uid: &str, container: &str, req: AttachRequest) -> Result<Session, NodeError>;
//!     pub async fn logs(&self, uid: &str, container: &str, opts: LogOptions)
//!         -> Result<BoxStream<'static, Result<Bytes, NodeError>>, NodeError>;
//!     /// Kill everything, remove every directory. Idempotent; also run from Drop.
//!     pub async fn shutdown(&self);
//! }
//! /// node::stream::serve runs the k8s channel protocol (v4/v5.channel.k8s.io) over an upgraded
//! /// axum WebSocket for an exec/attach Session, including the final Status on the error channel.
//! pub async fn stream::serve(ws: axum::extract::ws::WebSocket, protocol: stream::Protocol, session: Session);
//! ```
//! NodeError maps to HTTP statuses via `NodeError::status_code()` (404 no such pod/container,
//! 400 bad request such as container not running, 500 otherwise).
//!
//! Shapes (agreed with the API side):
//!   Pod = k8s_openapi::api::core::v1::Pod; PodStatus = k8s_openapi::api::core::v1::PodStatus;
//!   `pub type ResolvedVolumes = BTreeMap<String /*volume*/, BTreeMap<String /*key*/, Vec<u8>>>`;
//!   ExecRequest { command, stdin, stdout, stderr, tty }, AttachRequest { stdin, stdout, stderr, tty },
//!   LogOptions { follow, timestamps, since_time: Option<SystemTime>, since_seconds, tail_lines,
//!   limit_bytes, previous }, `stream::Protocol { V4, V5 }` (negotiated by the API side; see
//!   `stream::Protocol::from_header`). The node reports no events; the API side derives them.
//!
//! Node-side extensions:
//!   * ResolvedVolumes may also carry the data for `env[].valueFrom.{configMapKeyRef,secretKeyRef}`
//!     and `envFrom`: under the entry names `configMap/<name>` and `secret/<name>` (a `/` cannot
//!     appear in a volume name, so these never clash). A missing referenced object or key makes the
//!     container wait with reason `CreateContainerConfigError`, as a kubelet does.
//!   * The StatusSink is called with an internal lock held so statuses arrive in order; it must not
//!     call back into the Node.
//!   * `Node::pod_processes(uid)` lists host pids of the pod's sandbox processes (tests, debugging).
//!   * `Node::memory_limits_enforced()` and `Node::cpu_limits_enforced()` say whether containers'
//!     memory and CPU resources can be enforced here (see "Resources" below).
//!
//! # Isolation: why bubblewrap
//! Every container is a `bwrap` sandbox (Debian package `bubblewrap`): new mount, PID, UTS and IPC
//! namespaces, the host's root (or the image's rootfs from `images_dir`) bound read-only, a private
//! tmpfs on `/tmp`, fresh `/dev` and `/proc`, the pod's volumes bound at their mountPaths. bwrap
//! already gets the fiddly parts right (pivot_root, mount propagation, `--die-with-parent`,
//! bringing up loopback), and works both as root and, where unprivileged user namespaces are
//! allowed, as an ordinary user. Doing the same in Rust would be several hundred lines of unsafe
//! code between fork and exec. The few things bwrap cannot do (join the pod's user and network
//! namespaces, join the container's cgroups, die with this process) are done in `pre_exec` before
//! bwrap starts; that is the crate's only `unsafe` (see `sandbox.rs`).
//!
//! # Images
//! The node keeps an image store in `data_dir/images` (see `image::store`): docker-archive and
//! OCI layout tarballs are loaded into it (at start from `NodeImages::images_from`, later by
//! `load_image_archive`, which the API serves as `POST /keel/v1/images`), every blob's digest
//! checked, each layer unpacked once, each image's root merged once from its layers. A container
//! of a stored image runs on an overlayfs of its own: the image's root as the read-only lower
//! layer, a writable upper layer in the pod's directory (a restart gets a fresh one), mounted in a
//! mount namespace made for the container before bwrap starts (bubblewrap 0.8 cannot mount
//! overlays), in the pod's user namespace as an ordinary user (Linux 5.11 or later). The image's
//! config applies as a kubelet on containerd applies it (`image::config`, `image::run`). A user
//! other than root (the image's `User`, or `runAsUser`/`runAsGroup`) runs, when the node is
//! root, really as that uid, gid and supplementary groups in a user namespace that maps every id
//! to itself and belongs to root (`sandbox::UserMode::Real`: bwrap's setuid mode, the maps
//! written by the node); as an ordinary user, with `shareProcessNamespace`, on the host's root,
//! or where the user could not reach the image's root or a bind source (a directory above them
//! closed to others) it gets a user namespace of its own in which only that uid and gid exist,
//! mapped to the pod's root (`UserMode::Mapped`): files appear owned by it, no supplementary
//! groups. An image not in the store is pulled from its
//! registry (or runs on the host's root, read-only, when `NodeImages::host_rootfs` asks for
//! that: tests without a network) (`image::pull`: oci-client for the protocol, mirrors and plain-HTTP registries as
//! `NodeImages::registries` says, credentials from the pod's `imagePullSecrets` and the node's
//! docker config, one pull per image and one fetch per blob at a time, digests checked), with
//! the kubelet's `Pulling`/`Pulled` events through `ImageHooks` and containerd's words when it
//! fails.
//!
//! # Resources: what a kubelet would set
//! Limits are enforced with per-container cgroups below a directory of the node's own
//! (`keel-node-<pid>-<n>`, created below this process's own cgroup in each hierarchy, so limits
//! set on us still apply). `limits.memory` becomes `memory.limit_in_bytes` (v1) or `memory.max`
//! (v2), swap off, and an OOM kill is reported as `OOMKilled`. `limits.cpu` becomes a CFS quota
//! of millicores × 100 µs per 100 ms period (at least 1 ms), `cpu.cfs_quota_us` on v1 and
//! `cpu.max` on v2; `requests.cpu` (or the limit when there is no request, as the API server
//! defaults it) becomes `cpu.shares` = millicores × 1024 / 1000 (2..=262144), or the `cpu.weight`
//! runc derives from that on v2. Quantities are parsed exactly as Kubernetes parses them and
//! rounded up (CPU to 1m). A container without those resources gets no cgroup of that
//! controller. The first process of the container joins its cgroups (one `cgroup.procs` per
//! hierarchy) before exec, so nothing of it ever runs outside them. When the container ends its
//! cgroups are removed, killing what is left in them as a container runtime does; the node's
//! directory goes at shutdown (and when the Node is dropped). Only cgroup v1 is tested here
//! (v2 is written for: the unified hierarchy is used for a controller no v1 hierarchy has).
//!
//! Each pod has a holder process (`bwrap --unshare-net --unshare-pid ... sleep`, the analogue of
//! the pause container) whose network namespace every container joins, so containers of a pod
//! share `localhost` and pods are separated from each other and from the host. With a pod
//! network (`Node::start_network`, see `network`) the holder's namespace gets an `eth0` on the
//! node's bridge before any container starts. With
//! `shareProcessNamespace` the containers also join the holder's PID namespace (bwrap `--pidns`,
//! so their `/proc` shows only the pod's processes). As an ordinary user the holder also gets a
//! user namespace (`--unshare-user --uid 0 --gid 0`; with a pod network the node network's, which
//! must own the pod's network namespace to move a link into it); containers join it first, which
//! gives them the capabilities to join the pod's other namespaces, and then run as uid 0 *of that
//! namespace*: to the host they are the node's user, and so are the files they write to volumes.
//! exec (`nsenter`) joins the same user namespace first. `Node::new` checks that the pod's
//! namespaces can be made and otherwise fails with `NodeError::NamespacesUnavailable`, naming the
//! kernel setting that forbids them and the remedy.
//!
//! Known limits: a container's `/dev` is bwrap's fresh one with its own devpts, so inside an exec
//! with a tty `[ -t 0 ]` and `stty` work but `tty`/ttyname cannot name the terminal; interactive
//! shells warn that they cannot set the tty process group. As an ordinary user memory and CPU
//! limits are enforced only where this user may create cgroups of that controller below its own
//! (a cgroup v2 subtree delegated with the controller passed down; not tested here); otherwise,
//! as always on cgroup v1, they are not enforced: the node warns at start and for every limited
//! container, and `Node::memory_limits_enforced()` / `Node::cpu_limits_enforced()` say so; the
//! pods run regardless. Unprivileged, emptyDir `medium: Memory` is a plain directory, and files of other host users (root) appear as `nobody` inside containers.
//! Readiness/liveness probes are not run: a running container is ready.
//!
//! Every sandbox is spawned from one long-lived "spawner" thread owned by the Node, with
//! `PR_SET_PDEATHSIG=SIGKILL` (bwrap's `--die-with-parent`): when the Node is dropped the thread
//! ends and the kernel kills every sandbox, even if this process dies by a panic or SIGKILL.

// API-SIDE REQUEST: stream::serve ends with `Message::Close(None)`; kubectl 1.32 (gorilla) reports
//   that as "error reading from error stream: next reader: websocket: close 1005 (no status)" after
//   every `kubectl exec`. Please close with a status: `Message::Close(Some(CloseFrame { code:
//   close_code::NORMAL, reason: "".into() }))` (1000), as the real server does. (Found with
//   `kubectl exec p1 -- echo hi` against examples/serve.)
// API-SIDE REQUEST: 50 pods created at once (`kubectl create -f` of 50 sleeper pods, or the kube_rs
//   test `fifty_pods_created_and_watched_concurrently`): ~15 of them end Waiting with
//   CreateContainerConfigError "cannot start the pod sandbox: No such file or directory (os error 2)".
//   Looks like a race in pod-holder/sandbox start-up under concurrency.
mod caps;
mod cgroup;
mod env;
mod image;
mod logs;
pub mod network;
mod pod;
mod sandbox;
mod session;
pub mod stream;
mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{Pod, PodStatus};

pub use image::{
    ImageEvent, ImageGcPolicy, ImageGcPolicyError, ImageGcReport, LoadedImage, RegistryOptions, RegistryOptionsError,
    StoreError, mirror_endpoint, parse_mirror,
};
pub use network::{PodNetwork, nft::ServicePort};
pub(crate) use pod::go_duration;
pub use session::{ExitStatus, Session, TerminalSize};

/// Configuration of the embedded node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Per-pod directories live under `data_dir/pods/<uid>`, claims under `data_dir/pvcs`.
    pub data_dir: PathBuf,
    /// `images_dir/<image name with '/' and ':' replaced by '_'>` is used as the rootfs of
    /// containers of that image; any other image runs on the host's root, read-only.
    pub images_dir: Option<PathBuf>,
    /// Images that are neither on the node nor pullable: ErrImagePull, then ImagePullBackOff
    /// (ErrImageNeverPull with `imagePullPolicy: Never`).
    pub unavailable_images: Vec<String>,
    /// Images on the node that no registry serves: with `imagePullPolicy: Always` the pull fails
    /// as for `unavailable_images`; IfNotPresent and Never run them.
    pub cached_unpullable_images: Vec<String>,
    /// The kubelet's back-off for image pulls and container restarts starts here and doubles up
    /// to 30 times it (10 s to 5 min, as a kubelet's); tests shorten it.
    pub backoff_base: Duration,
    pub node_name: String,
}

/// Where the node's containers get their root filesystems (see `image`).
#[derive(Debug, Clone, Default)]
pub struct NodeImages {
    /// Every image archive (docker-archive or OCI layout tarball) in this directory is loaded
    /// into the store at start.
    pub images_from: Option<PathBuf>,
    /// An image not in the store runs on the host's root filesystem (only when asked: `false` by
    /// default); `false`: it is pulled from its registry (see `image::pull`), unless
    /// `images_dir` maps its name to a rootfs. An image in the store always runs from the store.
    pub host_rootfs: bool,
    /// Mirrors, plain-HTTP registries, extra CAs, the node's docker config.
    pub registries: RegistryOptions,
    /// When unused images are deleted (the kubelet's image GC).
    pub gc: ImageGcPolicy,
}

/// Called with a pod's uid, a container's name and image for what the kubelet records about
/// the container's image before each start (see `ImageEvent`).
pub type ImageEventSink = Arc<dyn Fn(&str, &str, &str, ImageEvent) + Send + Sync>;

/// The data of a pod's image pull secrets (pod uid -> `(secret name, key -> bytes)`, in the
/// pod's order), read at each pull as the kubelet reads them: a Secret created after its pod
/// counts from the next pull on.
pub type PullSecretSource = Arc<dyn Fn(&str) -> Vec<(String, BTreeMap<String, Vec<u8>>)> + Send + Sync>;

/// A pod's configMap/secret data as the API side has it now (by the pod's uid); `None` when the
/// pod is gone or a volume's source is still missing.
pub type PodDataSource = Arc<dyn Fn(&str) -> Option<ResolvedVolumes> + Send + Sync>;

/// What the node asks of the API side: about images, and a pod's current configMap/secret
/// data when a container's config could not be made (a missing Secret or key is retried).
#[derive(Clone)]
pub struct ImageHooks {
    pub events: ImageEventSink,
    pub pull_secrets: PullSecretSource,
    pub pod_data: PodDataSource,
}

/// The kubelet's initial back-off (`backOffPeriod`); the cap is `MAX_BACKOFF_FACTOR` times it.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(10);
pub(crate) const MAX_BACKOFF_FACTOR: u32 = 30;

/// Called whenever a pod's status changes, with the pod's uid and the full new status.
pub type StatusSink = Arc<dyn Fn(&str, PodStatus) + Send + Sync>;

/// configMap/secret volume data: volume name -> key -> bytes (plus `configMap/<name>` and
/// `secret/<name>` entries for env references, see the module doc).
pub type ResolvedVolumes = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

/// An exec request (`pods/exec` query parameters).
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub command: Vec<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// An attach request (`pods/attach` query parameters).
#[derive(Debug, Clone, Default)]
pub struct AttachRequest {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// `pods/log` query parameters.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    pub follow: bool,
    pub timestamps: bool,
    pub since_time: Option<SystemTime>,
    pub since_seconds: Option<i64>,
    pub tail_lines: Option<i64>,
    pub limit_bytes: Option<i64>,
    pub previous: bool,
}

/// Everything that can go wrong on the node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("bubblewrap (`bwrap`) is needed to run containers but could not be run: {0}")]
    BwrapMissing(#[source] std::io::Error),
    /// The start-up probe could not create a pod's namespaces; `cause` is the likeliest reason
    /// (from the kernel settings), `bwrap` what bubblewrap itself said.
    #[error("bubblewrap cannot create a pod's namespaces here: {cause}; {remedy} (bwrap said: {bwrap})")]
    NamespacesUnavailable { cause: String, remedy: String, bwrap: String },
    #[error("cannot create node directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the node has no tokio runtime: Node::new must be called inside a runtime")]
    NoRuntime,
    #[error("the node is shut down")]
    ShutDown,
    #[error("pod {0} is not on this node")]
    NoSuchPod(String),
    #[error("container {container} not found in pod {pod}")]
    NoSuchContainer { pod: String, container: String },
    #[error("container {container} in pod {pod} is not running")]
    NotRunning { pod: String, container: String },
    #[error("container {container} in pod {pod} has no previous terminated instance")]
    NoPreviousLogs { pod: String, container: String },
    #[error("container {container} in pod {pod} was not started with stdin, cannot attach stdin")]
    NoStdin { pod: String, container: String },
    #[error("exec in pod {pod} needs a command")]
    EmptyCommand { pod: String },
    #[error("cannot start exec {command:?} in container {container}: {source}")]
    ExecSpawn {
        container: String,
        command: Vec<String>,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open a terminal for container {container}: {source}")]
    Pty {
        container: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the image store in {path}: {source}")]
    ImageStore {
        path: PathBuf,
        #[source]
        source: image::StoreError,
    },
    #[error(transparent)]
    Network(network::NetworkError),
    #[error("image garbage collection: {0}")]
    ImageGc(String),
    #[error("cannot load image archive {path}: {source}")]
    ImageLoad {
        path: PathBuf,
        #[source]
        source: image::StoreError,
    },
    #[error("invalid registry options: {0}")]
    Registries(#[source] image::RegistryOptionsError),
    #[error("cannot list image archives in {path}: {source}")]
    ImagesFrom {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read log file {path}: {source}")]
    LogRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl NodeError {
    /// The HTTP status the API layer answers with.
    pub fn status_code(&self) -> u16 {
        match self {
            NodeError::NoSuchPod(_) | NodeError::NoSuchContainer { .. } => 404,
            NodeError::NotRunning { .. }
            | NodeError::NoPreviousLogs { .. }
            | NodeError::NoStdin { .. }
            | NodeError::EmptyCommand { .. } => 400,
            _ => 500,
        }
    }
}

/// The embedded node. Cheap to clone; the last clone dropped kills every container.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

pub(crate) struct NodeInner {
    cfg: NodeConfig,
    sink: StatusSink,
    rt: tokio::runtime::Handle,
    spawner: sandbox::Spawner,
    isolation: sandbox::Isolation,
    cgroups: cgroup::NodeCgroups,
    images: image::Images,
    images_from: Option<PathBuf>,
    image_gc: ImageGcPolicy,
    image_hooks: std::sync::OnceLock<ImageHooks>,
    /// The pod network, once `start_network` made it (without it every pod has only its own
    /// loopback).
    network: std::sync::OnceLock<network::NodeNetwork>,
    pods: Mutex<HashMap<String, Arc<pod::PodRuntime>>>,
    shut_down: std::sync::atomic::AtomicBool,
}

impl Node {
    /// Checks that bwrap works here and prepares `data_dir`; every image not in the store runs
    /// on the host's root (`NodeImages::host_rootfs`: the node tests' set-up), with an empty
    /// store that `load_image_archive` fills.
    pub fn new(cfg: NodeConfig, on_status: StatusSink) -> Result<Node, NodeError> {
        Node::with_images(cfg, NodeImages { host_rootfs: true, ..NodeImages::default() }, on_status)
    }

    /// As `new`, with the image store's options. Archives in `images_from` are not loaded here
    /// (that takes a while): call `load_images_from`.
    pub fn with_images(cfg: NodeConfig, image_opts: NodeImages, on_status: StatusSink) -> Result<Node, NodeError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| NodeError::NoRuntime)?;
        for dir in [cfg.data_dir.join("pods"), cfg.data_dir.join("pvcs")] {
            std::fs::create_dir_all(&dir).map_err(|source| NodeError::DataDir { path: dir.clone(), source })?;
        }
        let isolation = sandbox::Isolation::probe()?;
        let cgroups = cgroup::NodeCgroups::create(&isolation);
        let spawner = sandbox::Spawner::start(rt.clone());
        let store_dir = cfg.data_dir.join("images");
        let store = Arc::new(
            image::Store::open(&store_dir, isolation.root)
                .map_err(|source| NodeError::ImageStore { path: store_dir.clone(), source })?,
        );
        let puller = image::Puller::new(store.clone(), &image_opts.registries).map_err(NodeError::Registries)?;
        let images = image::Images {
            store: Some(store),
            puller: Some(Arc::new(puller)),
            host_rootfs: image_opts.host_rootfs,
            images_dir: cfg.images_dir.clone(),
            unavailable: cfg.unavailable_images.clone(),
            cached_unpullable: cfg.cached_unpullable_images.clone(),
        };
        let node = Node {
            inner: Arc::new(NodeInner {
                images,
                images_from: image_opts.images_from,
                image_gc: image_opts.gc,
                image_hooks: std::sync::OnceLock::new(),
                network: std::sync::OnceLock::new(),
                cfg,
                sink: on_status,
                rt,
                spawner,
                isolation,
                cgroups,
                pods: Mutex::new(HashMap::new()),
                shut_down: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        // The kubelet's image GC loop; it ends with the node.
        let weak = Arc::downgrade(&node.inner);
        let period = node.inner.image_gc.period;
        node.inner.rt.spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(inner) = weak.upgrade() else { return };
                if let Err(e) = (Node { inner }).collect_images().await {
                    tracing::warn!(error = %e, "image garbage collection failed");
                }
            }
        });
        Ok(node)
    }

    /// Gives pods IPs of their own on a bridge, and with `PodNetwork::Egress` a way out (see
    /// `network`). Call before pods run; `PodNetwork::None` changes nothing.
    pub async fn start_network(&self, mode: PodNetwork) -> Result<(), NodeError> {
        if mode == PodNetwork::None || self.inner.network.get().is_some() {
            return Ok(());
        }
        let dir = self.inner.cfg.data_dir.join("network");
        std::fs::create_dir_all(&dir).map_err(|source| NodeError::DataDir { path: dir.clone(), source })?;
        let net =
            network::NodeNetwork::start(&self.inner.spawner, self.inner.isolation, &dir, mode == PodNetwork::Egress)
                .await
                .map_err(NodeError::Network)?;
        if let Err(net) = self.inner.network.set(net) {
            net.stop().await;
        }
        Ok(())
    }

    /// Whether pods have IPs of their own (`start_network` ran).
    pub fn pod_network(&self) -> bool {
        self.inner.network.get().is_some()
    }

    /// Makes the Services' ClusterIPs lead to these endpoints (kube-proxy's job); nothing
    /// without a pod network.
    pub async fn sync_services(&self, ports: Vec<ServicePort>) -> Result<(), NodeError> {
        let Some(net) = self.inner.network.get() else { return Ok(()) };
        net.sync_services(&self.inner.spawner, ports).await.map_err(NodeError::Network)
    }

    /// One image garbage collection now, under the node's policy (see `image::gc`).
    pub async fn collect_images(&self) -> Result<ImageGcReport, NodeError> {
        let store = self.inner.images.store.clone().expect("the node always has a store");
        let policy = self.inner.image_gc.clone();
        let dir = self.inner.cfg.data_dir.join("images");
        tokio::task::spawn_blocking(move || store.collect(&policy, &|| image::fs_space(&dir)))
            .await
            .map_err(|e| NodeError::ImageGc(e.to_string()))?
            .map_err(|e| NodeError::ImageGc(e.to_string()))
    }

    /// Where the kubelet's image events go and pull secrets come from; set once, before pods
    /// run (without: no events, anonymous pulls and the node's own credentials only).
    pub fn set_image_hooks(&self, hooks: ImageHooks) {
        if self.inner.image_hooks.set(hooks).is_err() {
            tracing::warn!("the node's image hooks were already set");
        }
    }

    /// Loads every archive in `NodeImages::images_from` (files ending in `.tar`, `.tar.gz` or
    /// `.tgz`, in name order) into the store.
    pub async fn load_images_from(&self) -> Result<Vec<image::LoadedImage>, NodeError> {
        let Some(dir) = self.inner.images_from.clone() else { return Ok(Vec::new()) };
        let list_err = |source| NodeError::ImagesFrom { path: dir.clone(), source };
        let mut archives: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(list_err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                p.is_file() && [".tar", ".tar.gz", ".tgz"].iter().any(|s| name.ends_with(s))
            })
            .collect();
        archives.sort();
        let mut loaded = Vec::new();
        for a in archives {
            loaded.extend(self.load_image_archive(&a).await?);
        }
        Ok(loaded)
    }

    /// Loads the images of one archive (docker-archive or OCI layout tarball) into the store.
    pub async fn load_image_archive(&self, path: &std::path::Path) -> Result<Vec<image::LoadedImage>, NodeError> {
        let store = self.inner.images.store.clone().expect("the node always has a store");
        let owned = path.to_path_buf();
        tokio::task::spawn_blocking(move || store.load(&owned))
            .await
            .unwrap_or_else(|e| Err(image::StoreError::Invalid { what: "image load".into(), why: e.to_string() }))
            .map_err(|source| NodeError::ImageLoad { path: path.to_path_buf(), source })
    }

    /// Where uploaded archives are staged before loading (on the store's file system).
    pub fn image_upload_dir(&self) -> PathBuf {
        self.inner.cfg.data_dir.join("images")
    }

    /// Starts the pod in the background; progress arrives through the StatusSink.
    pub fn run_pod(&self, pod: Pod, volumes: ResolvedVolumes) {
        if self.inner.shut_down.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::warn!("run_pod after shutdown ignored");
            return;
        }
        let runtime = pod::PodRuntime::new(&self.inner, pod);
        let uid = runtime.uid.clone();
        {
            let mut pods = self.inner.pods.lock().expect("pods lock");
            if pods.contains_key(&uid) {
                tracing::warn!(k8s.pod.uid = %uid, "run_pod for a pod that is already running");
                return;
            }
            pods.insert(uid, runtime.clone());
        }
        let inner = self.inner.clone();
        self.inner.rt.spawn(async move { runtime.run(inner, volumes).await });
    }

    /// TERM every container, KILL after `grace`; returns when all are gone.
    pub async fn stop_pod(&self, uid: &str, grace: Duration) {
        let Some(pod) = self.pod(uid) else { return };
        pod.stop(grace).await;
    }

    /// Drops the pod's logs and directories (stopping it first if needed).
    pub async fn forget_pod(&self, uid: &str) {
        let pod = self.inner.pods.lock().expect("pods lock").remove(uid);
        if let Some(pod) = pod {
            pod.stop(Duration::ZERO).await;
            // A session or log stream may still hold the pod: the images and its IP are free now.
            pod.release_images();
            pod.release_ip();
            pod.remove_dirs().await;
        }
    }

    pub async fn exec(&self, uid: &str, container: &str, req: ExecRequest) -> Result<Session, NodeError> {
        let pod = self.pod(uid).ok_or_else(|| NodeError::NoSuchPod(uid.to_string()))?;
        session::exec(&self.inner, &pod, container, req).await
    }

    pub async fn attach(&self, uid: &str, container: &str, req: AttachRequest) -> Result<Session, NodeError> {
        let pod = self.pod(uid).ok_or_else(|| NodeError::NoSuchPod(uid.to_string()))?;
        session::attach(&pod, container, req).await
    }

    pub async fn logs(
        &self,
        uid: &str,
        container: &str,
        opts: LogOptions,
    ) -> Result<BoxStream<'static, Result<Bytes, NodeError>>, NodeError> {
        let pod = self.pod(uid).ok_or_else(|| NodeError::NoSuchPod(uid.to_string()))?;
        let log = pod.log_for(container, opts.previous)?;
        logs::serve(log, opts).await
    }

    /// Whether containers' `resources.limits.memory` are enforced (a memory cgroup could be made
    /// at start). When not, a warning was logged at start and is logged per limited container.
    pub fn memory_limits_enforced(&self) -> bool {
        self.inner.cgroups.enforces(cgroup::Controller::Memory)
    }

    /// Whether containers' `resources.limits.cpu` (CFS quota) and `resources.requests.cpu` (CPU
    /// shares) are enforced (a cpu cgroup could be made at start). When not, a warning was logged
    /// at start and is logged per container that has either.
    pub fn cpu_limits_enforced(&self) -> bool {
        self.inner.cgroups.enforces(cgroup::Controller::Cpu)
    }

    /// Host pids of every sandbox process of the pod (bwrap processes and the pod holder).
    pub fn pod_processes(&self, uid: &str) -> Vec<u32> {
        self.pod(uid).map(|p| p.host_pids()).unwrap_or_default()
    }

    /// Kills everything and removes every directory. Idempotent.
    pub async fn shutdown(&self) {
        self.inner.shut_down.store(true, std::sync::atomic::Ordering::SeqCst);
        let pods: Vec<_> = self.inner.pods.lock().expect("pods lock").drain().collect();
        for (_, pod) in pods {
            pod.stop(Duration::ZERO).await;
            // A session or log stream may still hold the pod: the images are free now.
            pod.release_images();
            pod.remove_dirs().await;
        }
        if let Some(net) = self.inner.network.get() {
            net.stop().await;
        }
        let inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || inner.cgroups.remove()).await;
    }

    fn pod(&self, uid: &str) -> Option<Arc<pod::PodRuntime>> {
        self.inner.pods.lock().expect("pods lock").get(uid).cloned()
    }
}

impl Drop for NodeInner {
    fn drop(&mut self) {
        // Async shutdown may not have run (a test panicked, the runtime is going away): kill
        // synchronously. The spawner thread ending afterwards makes the kernel kill anything
        // left via PDEATHSIG.
        let pods: Vec<_> = self.pods.get_mut().map(|p| p.drain().collect()).unwrap_or_default();
        for (_, pod) in pods {
            pod.kill_now();
            pod.remove_dirs_sync();
        }
        self.cgroups.remove();
    }
}
