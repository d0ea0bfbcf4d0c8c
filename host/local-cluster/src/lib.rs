//! Embedded single-node Kubernetes API server.
//!
//! [`LocalCluster::start`] serves the core `v1` API on loopback (discovery, CRUD, watch, patch,
//! pod logs/exec/attach) so kube-rs, kubectl and the official Python client work unchanged;
//! pods run on the embedded [`node`] as sandboxed local processes.

pub mod api;
pub mod discovery;
pub mod endpoints;
pub mod errors;
pub mod kubeconfig;
pub mod kubelet;
pub mod lifecycle;
pub mod limits;
pub mod node;
pub mod openapi;
pub mod patch;
pub mod protobuf;
pub mod proxy;
pub mod resources;
pub mod selectors;
mod serve;
pub mod state;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The file that marks a directory as an embedded cluster's data directory.
pub const DATA_DIR_MARKER: &str = ".keel-cluster-data";

/// How to start a cluster. `Default` gives a random port, a temporary data dir, HTTPS that
/// requires the client certificate written into the kubeconfig (see [`LocalCluster::client`]),
/// and containers of images not in the node's store on the host's root filesystem.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Port on 127.0.0.1; `None` picks a free one.
    pub port: Option<u16>,
    /// Where pods' directories and the kubeconfig live; `None` makes a temp dir removed on stop.
    pub data_dir: Option<PathBuf>,
    /// Root filesystems by image name (see `node::NodeConfig::images_dir`).
    pub images_dir: Option<PathBuf>,
    /// Every image archive (docker-archive or OCI layout tarball: `.tar`, `.tar.gz`, `.tgz`) in
    /// this directory is loaded into the node's image store at start; more can be loaded into
    /// a running cluster with [`LocalCluster::load_image_archive`] or the API's
    /// `POST /keel/v1/images` (the archive as the body).
    pub images_from: Option<PathBuf>,
    /// An image not in the store runs on the host's root filesystem (read-only), only when asked
    /// for (`false` by default, see [`ClusterOptions::on_host_rootfs`]). Without it such an image
    /// is pulled from its registry, as on a real node, unless `images_dir` maps its name to a
    /// rootfs. A stored image always runs from the store.
    pub host_rootfs: bool,
    /// How the node reaches registries when it pulls (without `host_rootfs`): mirrors,
    /// plain-HTTP registries, extra CAs, the node's docker config.
    pub registries: node::RegistryOptions,
    /// How pods are networked: `None` (the default here) gives each pod only its own loopback
    /// and `127.0.0.1` as its IP; `Bridge` gives pods IPs of their own on the node's bridge and
    /// Services ClusterIPs that reach them; `Egress` also lets pods reach what the host reaches
    /// (through slirp4netns) and the host's loopback as `host.keel.internal`.
    pub pod_network: node::PodNetwork,
    /// When the node deletes unused images (the kubelet's image GC: 85 % / 80 % of the data
    /// dir's filesystem by default).
    pub image_gc: node::ImageGcPolicy,
    /// Images neither on the node nor pullable: ErrImagePull, then ImagePullBackOff, retried
    /// with the kubelet's back-off (ErrImageNeverPull with `imagePullPolicy: Never`).
    pub unavailable_images: Vec<String>,
    /// Images cached on the node that no registry serves: with `imagePullPolicy: Always` the
    /// pull fails as for `unavailable_images`; with IfNotPresent or Never the container runs.
    pub cached_unpullable_images: Vec<String>,
    /// Where the kubelet's back-off (image pulls, CrashLoopBackOff) starts; it doubles up to 30
    /// times this. `None`: 10 s (to 5 min), as a kubelet's. Tests shorten it.
    pub backoff_base: Option<std::time::Duration>,
    /// A bearer token accepted instead of the client certificate; the kubeconfig then carries it
    /// in place of the certificate. HTTPS only: kubectl does not send a token to an `http://`
    /// server.
    pub token: Option<String>,
    /// Watch events kept for replay from an old resourceVersion (default 10 000); older
    /// versions answer 410 Gone.
    pub watch_history: Option<usize>,
    /// Serve plain HTTP and answer every request, from anyone who can reach the port: any local
    /// user could then run processes as the cluster's user (as root, as root) and read its
    /// secrets. Off by default; the cluster logs a warning when it is on. Otherwise the cluster
    /// serves HTTPS with a CA and server certificate made at start (`ca.crt`, `server.crt`,
    /// `server.key` in the data dir) and requires a client certificate from that CA or the token.
    pub insecure_unauthenticated: bool,
}

impl ClusterOptions {
    /// The defaults, but every image not in the store runs on the host's root filesystem (no
    /// registry is asked): what tests use to run `busybox` or `alpine` without a network.
    pub fn on_host_rootfs() -> Self {
        ClusterOptions { host_rootfs: true, ..ClusterOptions::default() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot listen on 127.0.0.1:{port}: {source}")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the cluster data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the node: {0}")]
    Node(#[source] node::NodeError),
    #[error("cannot set up TLS for the API server")]
    Tls(#[source] tls::TlsError),
    #[error(
        "a bearer token needs HTTPS (kubectl does not send one to an http:// server); drop the token or the insecure unauthenticated mode"
    )]
    TokenWithoutTls,
    #[error("cannot build a client for {url}: {source}")]
    Client {
        url: String,
        #[source]
        source: kube::Error,
    },
}

/// What clients need to trust a TLS cluster, and to be trusted by it.
struct TlsInfo {
    ca_pem: String,
    ca_der: Vec<u8>,
    ca_path: PathBuf,
    client: tls::ClientIdentity,
}

pub const NODE_NAME: &str = "keel-local";
const DEFAULT_WATCH_HISTORY: usize = 10_000;

/// A running cluster. Stop it with [`LocalCluster::stop`]; dropping it also kills every
/// container and removes a temporary data dir.
pub struct LocalCluster {
    url: String,
    addr: SocketAddr,
    token: Option<String>,
    tls: Option<TlsInfo>,
    kubeconfig: PathBuf,
    data_dir: PathBuf,
    temp_dir: Option<tempfile::TempDir>,
    state: api::Shared,
    server: Option<tokio::task::JoinHandle<()>>,
    requests: Arc<std::sync::atomic::AtomicU64>,
}

impl LocalCluster {
    pub async fn start(opts: ClusterOptions) -> Result<LocalCluster, ClusterError> {
        if opts.insecure_unauthenticated && opts.token.is_some() {
            return Err(ClusterError::TokenWithoutTls);
        }
        let (data_dir, temp_dir) = match &opts.data_dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|source| ClusterError::DataDir { path: d.clone(), source })?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("keel-cluster-")
                    .tempdir()
                    .map_err(|source| ClusterError::DataDir { path: std::env::temp_dir(), source })?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        // Marks the directory as a cluster's, so a tool that copies a directory tree holding it
        // (keel's own sources copy) leaves it out: copying a pod's volumes into that pod would
        // never end.
        let marker = data_dir.join(DATA_DIR_MARKER);
        std::fs::write(
            &marker,
            "This directory holds an embedded keel cluster's state; copies of trees leave it out.\n",
        )
        .map_err(|source| ClusterError::DataDir { path: marker, source })?;
        let port = opts.port.unwrap_or(0);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(|source| ClusterError::Bind { port, source })?;
        let addr = listener.local_addr().map_err(|source| ClusterError::Bind { port, source })?;
        let server_tls = if opts.insecure_unauthenticated {
            None
        } else {
            Some(tls::ServerTls::generate().map_err(ClusterError::Tls)?)
        };
        let url = format!("{}://{addr}", if server_tls.is_some() { "https" } else { "http" });

        let store = store::Store::new(NODE_NAME, opts.watch_history.unwrap_or(DEFAULT_WATCH_HISTORY));
        let node_cfg = node::NodeConfig {
            data_dir: data_dir.join("node"),
            images_dir: opts.images_dir.clone(),
            unavailable_images: opts.unavailable_images.clone(),
            cached_unpullable_images: opts.cached_unpullable_images.clone(),
            backoff_base: opts.backoff_base.unwrap_or(node::DEFAULT_BACKOFF_BASE),
            node_name: NODE_NAME.to_owned(),
        };
        let node_images = node::NodeImages {
            images_from: opts.images_from.clone(),
            host_rootfs: opts.host_rootfs,
            registries: opts.registries.clone(),
            gc: opts.image_gc.clone(),
        };
        let node = node::Node::with_images(node_cfg, node_images, kubelet::status_sink(Arc::downgrade(&store)))
            .map_err(ClusterError::Node)?;
        node.set_image_hooks(kubelet::image_hooks(Arc::downgrade(&store)));
        node.load_images_from().await.map_err(ClusterError::Node)?;
        node.start_network(opts.pod_network).await.map_err(ClusterError::Node)?;
        if node.pod_network() {
            store.set_node_address(&node::network::BRIDGE_IP.to_string());
        }
        let cluster = Arc::new(state::Cluster { store, node, cancel: CancellationToken::new() });
        let state = Arc::new(api::ApiState {
            cluster: cluster.clone(),
            auth: if opts.insecure_unauthenticated {
                api::Authentication::Disabled
            } else {
                api::Authentication::Required { token: opts.token.clone() }
            },
            server_address: addr.to_string(),
        });
        let kubeconfig = data_dir.join("kubeconfig");
        let tls = match &server_tls {
            Some(t) => Some(TlsInfo {
                ca_path: t.write_to(&data_dir).map_err(ClusterError::Tls)?,
                ca_pem: t.ca_pem().to_owned(),
                ca_der: t.ca_der().to_vec(),
                client: t.client_identity().clone(),
            }),
            None => None,
        };
        let kubeconfig_tls =
            server_tls.as_ref().map(|t| kubeconfig::Tls { ca_pem: t.ca_pem(), client: t.client_identity() });
        kubeconfig::write(&kubeconfig, &url, opts.token.as_deref(), kubeconfig_tls)
            .map_err(|source| ClusterError::Kubeconfig { path: kubeconfig.clone(), source })?;

        lifecycle::run_garbage_collector(&cluster);
        endpoints::run(&cluster);
        proxy::run(&cluster);
        // Every API request counted, for benchmarks (requests per job) and diagnostics.
        let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = requests.clone();
        let app = api::router(state.clone()).layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                next.run(req)
            },
        ));
        let server = tokio::spawn(serve::serve(
            listener,
            serve::Apps::new(app),
            server_tls.map(|t| t.acceptor()),
            state.cancel.clone(),
        ));
        if opts.insecure_unauthenticated {
            tracing::warn!(
                cluster.url = %url,
                "the local cluster serves plain HTTP WITHOUT AUTHENTICATION: every local user can create pods and read secrets"
            );
        }
        tracing::info!(cluster.url = %url, cluster.data_dir = %data_dir.display(), "local cluster started");
        Ok(LocalCluster {
            url,
            addr,
            token: opts.token,
            tls,
            kubeconfig,
            data_dir,
            temp_dir,
            state,
            server: Some(server),
            requests,
        })
    }

    /// Base URL, e.g. `http://127.0.0.1:41234` (`https://` with TLS).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The CA certificate (PEM) a TLS cluster's clients must trust; `None` for plain HTTP.
    pub fn ca_pem(&self) -> Option<&str> {
        self.tls.as_ref().map(|t| t.ca_pem.as_str())
    }

    /// The same CA certificate as DER (what `kube::Config::root_cert` holds).
    pub fn ca_der(&self) -> Option<&[u8]> {
        self.tls.as_ref().map(|t| t.ca_der.as_slice())
    }

    /// Where that CA certificate is written (`ca.crt` in the data dir).
    pub fn ca_path(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca_path.as_path())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// API requests served since start (any client, any outcome).
    pub fn request_count(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The embedded node (tests inspect its processes).
    pub fn node(&self) -> &node::Node {
        &self.state.node
    }

    /// Loads the images of an archive (docker-archive or OCI layout tarball) into the node's store.
    pub async fn load_image_archive(&self, path: &Path) -> Result<Vec<node::LoadedImage>, node::NodeError> {
        self.state.node.load_image_archive(path).await
    }

    /// One image garbage collection now, under `ClusterOptions::image_gc` (the node also runs
    /// one every `period`).
    pub async fn collect_images(&self) -> Result<node::ImageGcReport, node::NodeError> {
        self.state.node.collect_images().await
    }

    /// A kube-rs client for this cluster, with the kubeconfig's credential (the client
    /// certificate, or the bearer token when one is set), trusting the cluster's CA and only it.
    pub fn client(&self) -> Result<kube::Client, ClusterError> {
        let url: axum::http::Uri = self.url.parse().expect("http(s)://<socket address> is a valid URI");
        let mut cfg = kube::Config::new(url);
        cfg.default_namespace = "default".into();
        if let Some(t) = &self.tls {
            cfg.root_cert = Some(vec![t.ca_der.clone()]);
        }
        match (&self.token, &self.tls) {
            (Some(token), _) => cfg.auth_info.token = Some(token.clone().into()),
            (None, Some(t)) => {
                use base64::Engine;
                let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
                cfg.auth_info.client_certificate_data = Some(b64(&t.client.cert_pem));
                cfg.auth_info.client_key_data = Some(b64(&t.client.key_pem).into());
            }
            (None, None) => {}
        }
        kube::Client::try_from(cfg).map_err(|source| ClusterError::Client { url: self.url.clone(), source })
    }

    /// Stop serving, kill every container and remove a temporary data dir.
    pub async fn stop(mut self) {
        self.shutdown_server().await;
        self.state.node.shutdown().await;
        if let Some(t) = self.temp_dir.take()
            && let Err(e) = t.close()
        {
            tracing::warn!(error = %e, "cannot remove the cluster's temp dir");
        }
    }

    async fn shutdown_server(&mut self) {
        self.state.cancel.cancel();
        if let Some(server) = self.server.take() {
            // Graceful shutdown waits for open connections; idle keep-alive ones could hold it,
            // so bound the wait and then cut them.
            let abort = server.abort_handle();
            if tokio::time::timeout(std::time::Duration::from_secs(2), server).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Not stopped explicitly (or stopped already: all of this is idempotent). Ending the
        // server and background tasks drops the last handles on the node, whose own Drop kills
        // every container synchronously; the temp dir removes itself.
        self.state.cancel.cancel();
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}
