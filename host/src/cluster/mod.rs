//! The cluster side of a job: connecting, creating the job's objects (with owner references
//! and rollback), watching the pod, exec/attach sessions, and deleting everything again.

pub mod leftovers;
pub mod session;
pub mod watch;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};

use crate::config::Kubernetes;
use crate::pod::JobObjects;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot use the cluster configuration from {origin}")]
    Config {
        origin: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot start the embedded cluster")]
    Embedded(#[source] local_cluster::ClusterError),
    #[error("{call} failed")]
    Api {
        call: String,
        #[source]
        source: kube::Error,
    },
    #[error("{call}: the API server's answer has no {field}")]
    Incomplete { call: String, field: &'static str },
}

/// Retries `call` on transient errors as GitLab does: 5 tries, 0.5 s doubling to 2 s.
pub async fn retry<T, F, Fut>(call: &str, f: F) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(4);
    f.retry(backoff)
        .when(is_transient)
        .notify(|error, delay| tracing::warn!(k8s.call = call, %error, ?delay, "transient API error; retrying"))
        .await
        .map_err(|source| ClusterError::Api { call: call.to_string(), source })
}

/// Connection resets, EOFs, TLS handshake failures, lost HTTP/2 connections, 5xx, 429.
pub fn is_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code >= 500 || s.code == 429,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// Which cluster the job runs on, and how that was decided.
pub struct Connection {
    pub client: Client,
    /// For the trace: "kubeconfig /home/x/.kube/config (context kind-ci)", "the embedded cluster".
    pub via: String,
    /// The cluster this run started, stopped by [`Connection::close`].
    pub embedded: Option<local_cluster::LocalCluster>,
}

impl Connection {
    pub async fn close(self) {
        if let Some(cluster) = self.embedded {
            cluster.stop().await;
        }
    }
}

/// How to find a cluster, from the command line.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    /// Options for the embedded cluster started when nothing else is configured.
    pub embedded: local_cluster::ClusterOptions,
}

fn config_error(origin: impl Into<String>, e: impl std::error::Error + Send + Sync + 'static) -> ClusterError {
    ClusterError::Config { origin: origin.into(), source: Box::new(e) }
}

/// kube's own client stack (the cluster's base URI, credentials, extra headers, connect/read/
/// write timeouts, an `HTTP` span per request) over a connector with TCP_NODELAY. kube 5 leaves
/// Nagle's algorithm on (kube-rs/kube#2056): an exec that writes stdin and then closes it sends
/// two small frames, and the second waits for the API server's delayed ACK, ~40 ms per exec
/// on Linux (measured: the attach strategy's script upload took 45 ms, 4 ms with it). Go's
/// clients, kubectl's included, set it by default. A proxy in the kubeconfig keeps kube's stack.
async fn client_for(config: kube::Config, origin: &str) -> Result<Client, ClusterError> {
    use hyper_util::client::legacy::connect::HttpConnector;
    use kube::client::ConfigExt;
    use tower::ServiceBuilder;
    if config.proxy_url.is_some() {
        return Client::try_from(config).map_err(|e| config_error(origin, e));
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = config.rustls_https_connector_with_connector(http).map_err(|e| config_error(origin, e))?;
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let http_client: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().map_err(|e| config_error(origin, e))?)
        .layer(config.extra_headers_layer().map_err(|e| config_error(origin, e))?)
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(
            |req: &http::Request<kube::client::Body>| {
                tracing::debug_span!("HTTP", http.method = %req.method(), http.url = %req.uri())
            },
        ))
        .map_err(tower::BoxError::from)
        .service(http_client);
    Ok(Client::new(service, config.default_namespace))
}

async fn from_kubeconfig(path: &std::path::Path, context: Option<&String>) -> Result<kube::Config, ClusterError> {
    let kubeconfig =
        Kubeconfig::read_from(path).map_err(|source| ClusterError::Kubeconfig { path: path.to_path_buf(), source })?;
    let options = KubeConfigOptions { context: context.cloned(), ..KubeConfigOptions::default() };
    kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|source| ClusterError::Kubeconfig { path: path.to_path_buf(), source })
}

fn default_kubeconfig() -> Option<PathBuf> {
    if let Some(v) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        return std::env::split_paths(&v).find(|p| p.is_file());
    }
    let home = std::env::var_os("HOME")?;
    Some(PathBuf::from(home).join(".kube/config")).filter(|p| p.is_file())
}

/// The config's `host` (with seed 001's `cert_file`/`key_file`/`ca_file`/`bearer_token`);
/// else `--kubeconfig`, `KUBECONFIG` or `~/.kube/config` (current context or `--context`);
/// else the in-cluster service account; else an embedded cluster started for this run.
pub async fn connect(k8s: &Kubernetes, opts: &ConnectOptions) -> Result<Connection, ClusterError> {
    if let Some(host) = k8s.host.as_deref().filter(|h| !h.is_empty()) {
        let origin = format!("[runners.kubernetes] host = {host:?}");
        let uri: http::Uri = host.parse().map_err(|e| config_error(&origin, e))?;
        let mut config = kube::Config::new(uri);
        config.default_namespace = "default".into();
        config.root_cert_file = k8s.ca_file.clone();
        config.auth_info.client_certificate = k8s.cert_file.as_ref().map(|p| p.display().to_string());
        config.auth_info.client_key = k8s.key_file.as_ref().map(|p| p.display().to_string());
        if let Some(token) = k8s.bearer_token.as_ref().filter(|t| !t.is_empty()) {
            config.auth_info.token = Some(token.clone().into());
        }
        return Ok(Connection {
            client: client_for(config, &origin).await?,
            via: format!("{host} (runner config)"),
            embedded: None,
        });
    }
    if let Some(path) = opts.kubeconfig.clone().or_else(default_kubeconfig) {
        let config = from_kubeconfig(&path, opts.context.as_ref()).await?;
        let via = match &opts.context {
            Some(c) => format!("{} from kubeconfig {} (context {c})", config.cluster_url, path.display()),
            None => format!("{} from kubeconfig {}", config.cluster_url, path.display()),
        };
        return Ok(Connection { client: client_for(config, &path.display().to_string()).await?, via, embedded: None });
    }
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        let config = kube::Config::incluster().map_err(|e| config_error("the in-cluster service account", e))?;
        let via = format!("{} (in-cluster service account)", config.cluster_url);
        return Ok(Connection {
            client: client_for(config, "the in-cluster service account").await?,
            via,
            embedded: None,
        });
    }
    let cluster = local_cluster::LocalCluster::start(opts.embedded.clone()).await.map_err(ClusterError::Embedded)?;
    // Connect like any other client: through the kubeconfig the cluster wrote, with the
    // credentials it issued.
    let config = match from_kubeconfig(cluster.kubeconfig_path(), None).await {
        Ok(c) => c,
        Err(e) => {
            cluster.stop().await;
            return Err(e);
        }
    };
    let via = format!("the embedded cluster at {} (started by this host, removed at exit)", cluster.url());
    match client_for(config, "the embedded cluster's kubeconfig").await {
        Ok(client) => Ok(Connection { client, via, embedded: Some(cluster) }),
        Err(e) => {
            cluster.stop().await;
            Err(e)
        }
    }
}

/// What exists in the cluster for one job, so it can all be deleted again.
#[derive(Debug, Clone, Default)]
pub struct Created {
    pub namespace: String,
    pub pod: Option<(String, String)>,
    pub secrets: Vec<String>,
    pub services: Vec<String>,
}

fn name_of(meta: &kube::api::ObjectMeta, call: &str) -> Result<String, ClusterError> {
    meta.name.clone().ok_or_else(|| ClusterError::Incomplete { call: call.to_string(), field: "metadata.name" })
}

/// Creates the job's Secrets, Pod and Services in that order, then points the Secrets' owner
/// references at the pod. Everything created is recorded in `created` as it happens, so a
/// failure half way leaves the caller able to delete exactly that.
pub async fn create(client: &Client, objects: &mut JobObjects, created: &mut Created) -> Result<Pod, ClusterError> {
    let namespace = objects.pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    created.namespace = namespace.clone();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let pp = PostParams::default();

    let mut to_create: Vec<Secret> = objects.secret.iter().cloned().collect();
    to_create.push(objects.variables.clone());
    for mut secret in to_create {
        // Owner references are set once the pod exists (its uid is unknown until then).
        secret.metadata.owner_references = None;
        let call = format!("creating secret {namespace}/{}", secret.metadata.name.clone().unwrap_or_default());
        let made = retry(&call, || secrets.create(&pp, &secret)).await?;
        created.secrets.push(name_of(&made.metadata, &call)?);
    }

    let call = format!("creating pod in namespace {namespace}");
    let pod = retry(&call, || pods.create(&pp, &objects.pod)).await?;
    let pod_name = name_of(&pod.metadata, &call)?;
    let uid = pod
        .metadata
        .uid
        .clone()
        .ok_or_else(|| ClusterError::Incomplete { call: call.clone(), field: "metadata.uid" })?;
    created.pod = Some((pod_name.clone(), uid.clone()));
    objects.pod.metadata.name = Some(pod_name.clone());
    objects.set_owner(&pod_name, &uid);

    let owner = serde_json::json!({"metadata": {"ownerReferences": objects.variables.metadata.owner_references}});
    let (patch, params) = (Patch::Merge(&owner), PatchParams::default());
    for name in &created.secrets {
        let call = format!("setting the owner of secret {namespace}/{name}");
        retry(&call, || secrets.patch(name, &params, &patch)).await?;
    }
    for service in &objects.services {
        let call = format!("creating service in namespace {namespace}");
        let made = retry(&call, || services.create(&pp, service)).await?;
        created.services.push(name_of(&made.metadata, &call)?);
    }
    Ok(pod)
}

/// Deletes one object; already gone counts as done.
async fn delete_one<K>(client: &Client, ns: &str, name: &str, dp: &DeleteParams) -> Result<(), ClusterError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let call = format!("deleting {} {ns}/{name}", K::kind(&K::DynamicType::default()).to_lowercase());
    retry(&call, || async {
        match api.delete(name, dp).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    })
    .await
}

/// Deletes what `created` lists: the pod (explicit background propagation, the given grace
/// period), then its dependants (they carry owner references, but a deleted owner's garbage
/// collection is not instant and some clusters have none for us). Returns the first error
/// after trying everything.
pub async fn delete(client: &Client, created: &Created, grace_seconds: Option<i64>) -> Result<(), ClusterError> {
    let ns = &created.namespace;
    let mut first_error = None;
    let mut keep = |r: Result<(), ClusterError>| {
        if let Err(e) = r
            && first_error.is_none()
        {
            first_error = Some(e);
        }
    };
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        grace_period_seconds: grace_seconds.and_then(|g| u32::try_from(g).ok()),
        ..DeleteParams::default()
    };
    if let Some((name, _)) = &created.pod {
        keep(delete_one::<Pod>(client, ns, name, &dp).await);
    }
    for name in &created.secrets {
        keep(delete_one::<Secret>(client, ns, name, &dp).await);
    }
    for name in &created.services {
        keep(delete_one::<Service>(client, ns, name, &dp).await);
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Waits until the pod `name` with `uid` no longer exists (a watch, not polling).
pub async fn wait_deleted(client: &Client, ns: &str, name: &str, uid: &str) -> Result<(), ClusterError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    kube::runtime::wait::await_condition(pods, name, kube::runtime::conditions::is_deleted(uid))
        .await
        .map(|_| ())
        .map_err(|e| ClusterError::Config {
            origin: format!("watching pod {ns}/{name} being deleted"),
            source: Box::new(e),
        })
}

/// Objects keel created (label `app.kubernetes.io/managed-by=keel`) in every namespace.
pub async fn list_managed<K>(client: &Client) -> Result<Vec<K>, ClusterError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::all(client.clone());
    let lp = ListParams::default().labels(&format!("{}={}", crate::pod::MANAGED_BY_LABEL, crate::pod::MANAGED_BY));
    let call = format!("listing keel's {}s", K::kind(&K::DynamicType::default()).to_lowercase());
    retry(&call, || api.list(&lp)).await.map(|l| l.items)
}
