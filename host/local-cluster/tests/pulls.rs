//! Pulls from a real OCI registry: Debian's `docker-registry` (distribution 2.8) started by each
//! test on a free loopback port, images pushed into it with `skopeo` from the busybox archive
//! `examples/images/busybox-archive.sh` builds (variants pushed with oci-client), pods of them
//! on a cluster without the host rootfs, judged through kube-rs and kubectl.

mod common;
#[path = "pulls/token.rs"]
mod token;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::core::v1::{Event, Pod, Secret};
use kube::api::{Api, ListParams, LogParams, PostParams};
use kube::runtime::wait::await_condition;
use local_cluster::node::RegistryOptions;
use local_cluster::{ClusterOptions, LocalCluster};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(90);

enum Auth<'a> {
    None,
    Basic(&'a str, &'a str),
    Token(&'a token::TokenServer),
}

/// A distribution registry on 127.0.0.1, its storage and access log in a temp dir.
struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        Registry::start_with(Auth::None)
    }

    /// With distribution's htpasswd auth (Basic, a bcrypt file) or token auth (Bearer).
    fn start_with(auth: Auth) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let auth = match auth {
            Auth::Basic(user, password) => {
                let hash = bcrypt::hash(password, 5).unwrap();
                std::fs::write(dir.path().join("htpasswd"), format!("{user}:{hash}\n")).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: keel-test\n    path: {}\n",
                    dir.path().join("htpasswd").display()
                )
            }
            Auth::Token(server) => {
                std::fs::write(dir.path().join("token.crt"), &server.cert_pem).unwrap();
                format!(
                    "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    server.realm,
                    token::SERVICE,
                    token::ISSUER,
                    dir.path().join("token.crt").display()
                )
            }
            Auth::None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (Debian package docker-registry) runs");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "the registry did not listen: {}", Registry::log_of(&dir));
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry { child, port, dir }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_of(dir: &tempfile::TempDir) -> String {
        std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default()
    }

    fn log(&self) -> String {
        Registry::log_of(&self.dir)
    }

    /// `skopeo copy` of an archive (any skopeo transport) to `repo:tag`, with extra flags.
    fn push(&self, from: &str, to: &str, extra: &[&str]) {
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .args(extra)
            .arg(from)
            .arg(format!("docker://{}/{to}", self.host()))
            .output()
            .expect("skopeo (Debian package skopeo) runs");
        assert!(out.status.success(), "skopeo copy {from} {to}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// GETs of the blob `digest` in the access log.
    fn blob_gets(&self, digest: &str) -> usize {
        self.log().lines().filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest}"))).count()
    }

    /// The registry's file holding blob `digest`.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir.path().join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }

    /// An oci-client for pushing variants (plain HTTP, anonymous).
    fn client(&self) -> oci_client::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        oci_client::Client::new(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::Http,
            ..Default::default()
        })
    }

    /// The manifest (raw JSON) and digest of `repo:tag`.
    async fn manifest(&self, repo: &str, tag: &str) -> (Value, String) {
        let r: oci_client::Reference = format!("{}/{repo}:{tag}", self.host()).parse().unwrap();
        let (bytes, digest) = self
            .client()
            .pull_manifest_raw(
                &r,
                &oci_client::secrets::RegistryAuth::Anonymous,
                &["application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"],
            )
            .await
            .unwrap();
        (serde_json::from_slice(&bytes).unwrap(), digest)
    }

    /// Pushes `repo:to`, the image `repo:from` with its config changed by `edit` (same layers).
    /// Returns the new manifest's digest and size and its media type.
    async fn push_variant(
        &self,
        repo: &str,
        from: &str,
        to: &str,
        edit: impl Fn(&mut Value),
    ) -> (String, usize, String) {
        let client = self.client();
        let anon = oci_client::secrets::RegistryAuth::Anonymous;
        let (mut manifest, _) = self.manifest(repo, from).await;
        let base: oci_client::Reference = format!("{}/{repo}:{from}", self.host()).parse().unwrap();
        let mut config = Vec::new();
        let cfg_digest = manifest["config"]["digest"].as_str().unwrap().to_owned();
        client.pull_blob(&base, cfg_digest.as_str(), &mut config).await.unwrap();
        let mut config: Value = serde_json::from_slice(&config).unwrap();
        edit(&mut config);
        let config = serde_json::to_vec(&config).unwrap();
        let target: oci_client::Reference = format!("{}/{repo}:{to}", self.host()).parse().unwrap();
        let digest = sha256(&config);
        client.auth(&target, &anon, oci_client::RegistryOperation::Push).await.unwrap();
        client.push_blob(&target, config.clone(), &digest).await.unwrap();
        manifest["config"]["digest"] = json!(digest);
        manifest["config"]["size"] = json!(config.len());
        let media_type = manifest["mediaType"].as_str().unwrap().to_owned();
        let bytes = serde_json::to_vec(&manifest).unwrap();
        client.push_manifest_raw(&target, bytes.clone(), media_type.parse().unwrap()).await.unwrap();
        (sha256(&bytes), bytes.len(), media_type)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

/// The busybox image `make run` uses, as a docker-archive in `dir`.
fn busybox_archive(dir: &Path) -> PathBuf {
    let path = dir.join("busybox.tar");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/images/busybox-archive.sh");
    let out = Command::new("sh").arg(script).arg(&path).arg("keel-test/busybox:1").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    path
}

/// A cluster that pulls (no host rootfs), with these registry options.
async fn pulling_cluster(registries: RegistryOptions) -> LocalCluster {
    common::cluster_with(ClusterOptions {
        host_rootfs: false,
        registries,
        backoff_base: Some(common::TEST_BACKOFF),
        ..Default::default()
    })
    .await
}

fn pod(name: &str, image: &str, extra: Value) -> Pod {
    let mut spec = json!({
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "main", "image": image, "command": ["sh", "-c", "echo \"env:$PLATFORM$VERSION\"; cat /etc/passwd | head -1"]}]
    });
    spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

/// Runs the pod to success; returns its log and the pod.
async fn run(pods: &Api<Pod>, p: Pod) -> (String, Pod) {
    let name = p.metadata.name.clone().unwrap();
    pods.create(&PostParams::default(), &p).await.unwrap();
    let done = await_condition(pods.clone(), &name, |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref()?.phase.as_deref()).is_some_and(|ph| ph == "Succeeded" || ph == "Failed")
    });
    let pod = match tokio::time::timeout(TIMEOUT, done).await {
        Ok(p) => p.unwrap().unwrap(),
        Err(_) => panic!("pod {name} did not end: {:?}", pods.get(&name).await.map(|p| p.status)),
    };
    let log = pods.logs(&name, &LogParams::default()).await.unwrap();
    assert_eq!(pod.status.as_ref().unwrap().phase.as_deref(), Some("Succeeded"), "{log}\n{pod:?}");
    (log, pod)
}

/// Waits for the container to wait with `reason`; returns the message.
async fn waiting_with(pods: &Api<Pod>, name: &str, reason: &'static str) -> String {
    let cond = move |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref()?.container_statuses.as_ref()?.first()?.state.as_ref()?.waiting.clone())
            .is_some_and(|w| w.reason.as_deref() == Some(reason))
    };
    let p = tokio::time::timeout(TIMEOUT, await_condition(pods.clone(), name, cond))
        .await
        .unwrap_or_else(|_| panic!("{name} never waited with {reason}"))
        .unwrap()
        .unwrap();
    container(&p).state.clone().unwrap().waiting.unwrap().message.unwrap_or_default()
}

fn container(p: &Pod) -> &k8s_openapi::api::core::v1::ContainerStatus {
    &p.status.as_ref().unwrap().container_statuses.as_ref().unwrap()[0]
}

async fn events_of(cluster: &LocalCluster, pod: &str) -> Vec<(String, String)> {
    let events: Api<Event> = Api::default_namespaced(cluster.client().unwrap());
    let list = events.list(&ListParams::default().fields(&format!("involvedObject.name={pod}"))).await.unwrap();
    list.items.into_iter().map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default())).collect()
}

fn kubectl(cluster: &LocalCluster, args: &[&str]) -> String {
    let out = Command::new("kubectl").arg("--kubeconfig").arg(cluster.kubeconfig_path()).args(args).output().unwrap();
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_anonymous_pull_runs_the_pod_in_the_image_with_gzip_zstd_and_plain_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = format!("docker-archive:{}", busybox_archive(tmp.path()).display());
    let registry = Registry::start();
    registry.push(&archive, "team/busybox:gzip", &[]);
    registry.push(&archive, "team/busybox:zstd", &["--dest-compress-format", "zstd"]);
    registry.push(&archive, "team/busybox:plain", &["--dest-decompress"]);
    let cluster = pulling_cluster(RegistryOptions::default()).await;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());

    let image = format!("{}/team/busybox:gzip", registry.host());
    let (log, p) = run(&pods, pod("gzip", &image, json!({}))).await;
    assert!(log.contains("root:x:0:0:root:/root:/bin/sh"), "{log}");
    let (_, digest) = registry.manifest("team/busybox", "gzip").await;
    let cs = container(&p);
    assert_eq!(cs.image, image);
    assert_eq!(cs.image_id, format!("{}/team/busybox@{digest}", registry.host()));
    // kubectl sees what a kubelet reports.
    let seen = kubectl(&cluster, &["get", "pod", "gzip", "-o", "jsonpath={.status.containerStatuses[0].imageID}"]);
    assert_eq!(seen, cs.image_id);
    // The kubelet's events for a pull, with size and duration.
    let events = events_of(&cluster, "gzip").await;
    assert!(events.contains(&("Pulling".into(), format!("Pulling image {image:?}"))), "{events:?}");
    let pulled = events.iter().find(|(r, _)| r == "Pulled").map(|(_, m)| m.clone()).unwrap_or_default();
    let prefix = format!("Successfully pulled image {image:?} in ");
    assert!(pulled.starts_with(&prefix) && pulled.contains(" including waiting). Image size: "), "{pulled}");
    assert!(pulled.ends_with(" bytes."), "{pulled}");

    for tag in ["zstd", "plain"] {
        let image = format!("{}/team/busybox:{tag}", registry.host());
        let (log, _) = run(&pods, pod(tag, &image, json!({}))).await;
        assert!(log.contains("root:x:0:0"), "{tag}: {log}");
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_image_pulls_with_the_pods_pull_secret_and_is_unauthorized_without() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = format!("docker-archive:{}", busybox_archive(tmp.path()).display());
    let registry = Registry::start_with(Auth::Basic("keel", "s3cret"));
    registry.push(&archive, "private/busybox:1", &["--dest-creds", "keel:s3cret"]);
    let cluster = pulling_cluster(RegistryOptions::default()).await;
    let client = cluster.client().unwrap();
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for (name, creds) in [("good", "keel:s3cret"), ("bad", "keel:wrong")] {
        // As keel's registry Secret writes it (GitLab's DOCKER_AUTH_CONFIG).
        let config = json!({"auths": {registry.host(): {"auth": b64(creds)}}}).to_string();
        let secret = serde_json::from_value(json!({
            "metadata": {"name": name},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": b64(&config)}
        }))
        .unwrap();
        secrets.create(&PostParams::default(), &secret).await.unwrap();
    }
    let pods: Api<Pod> = Api::default_namespaced(client);
    let image = format!("{}/private/busybox:1", registry.host());
    for (name, extra) in [("anonymous", json!({})), ("wrong", json!({"imagePullSecrets": [{"name": "bad"}]}))] {
        pods.create(&PostParams::default(), &pod(name, &image, extra)).await.unwrap();
        let msg = waiting_with(&pods, name, "ErrImagePull").await;
        let want = format!("failed to pull and unpack image {image:?}: failed to resolve reference {image:?}: ");
        assert!(msg.starts_with(&want) && msg.ends_with("401 Unauthorized"), "{name}: {msg}");
        waiting_with(&pods, name, "ImagePullBackOff").await;
    }
    let (log, _) = run(&pods, pod("authorized", &image, json!({"imagePullSecrets": [{"name": "good"}]}))).await;
    assert!(log.contains("root:x:0:0"), "{log}");
    cluster.stop().await;
}

/// The Bearer flow: the registry's challenge names a token server, which grants the pull to the
/// pod's credentials (sent to it as Basic) and nothing to anonymous requests.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_server_grants_the_pull_to_the_pods_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = format!("docker-archive:{}", busybox_archive(tmp.path()).display());
    let server = token::start("keel", "t0ken").await;
    let registry = Registry::start_with(Auth::Token(&server));
    registry.push(&archive, "bearer/busybox:1", &["--dest-creds", "keel:t0ken"]);
    let cluster = pulling_cluster(RegistryOptions::default()).await;
    let client = cluster.client().unwrap();
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let config = json!({"auths": {registry.host(): {"username": "keel", "password": "t0ken"}}}).to_string();
    let secret = serde_json::from_value(json!({
        "metadata": {"name": "registry"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": b64(&config)}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client);
    let image = format!("{}/bearer/busybox:1", registry.host());
    pods.create(&PostParams::default(), &pod("anonymous", &image, json!({}))).await.unwrap();
    let msg = waiting_with(&pods, "anonymous", "ErrImagePull").await;
    assert!(msg.ends_with("401 Unauthorized"), "{msg}");
    let (log, _) = run(&pods, pod("bearer", &image, json!({"imagePullSecrets": [{"name": "registry"}]}))).await;
    assert!(log.contains("root:x:0:0"), "{log}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mirror_serves_docker_hub_images_and_an_absent_tag_is_not_found() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = format!("docker-archive:{}", busybox_archive(tmp.path()).display());
    let registry = Registry::start();
    registry.push(&archive, "library/busybox:1.36", &[]);
    let mirror = local_cluster::node::parse_mirror(&format!("docker.io=http://{}", registry.host())).unwrap();
    let cluster = pulling_cluster(RegistryOptions { mirrors: vec![mirror], ..Default::default() }).await;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    let (log, p) = run(&pods, pod("hub", "busybox:1.36", json!({}))).await;
    assert!(log.contains("root:x:0:0"), "{log}");
    let (_, digest) = registry.manifest("library/busybox", "1.36").await;
    assert_eq!(container(&p).image, "docker.io/library/busybox:1.36");
    assert_eq!(container(&p).image_id, format!("docker.io/library/busybox@{digest}"));
    assert!(registry.log().contains("ns=docker.io"), "the mirror was asked on docker.io's behalf");

    // No such tag, on a registry without mirrors: containerd's words, then the back-off.
    let absent = format!("{}/nope/busybox:404", registry.host());
    pods.create(&PostParams::default(), &pod("absent", &absent, json!({}))).await.unwrap();
    let msg = waiting_with(&pods, "absent", "ErrImagePull").await;
    assert_eq!(
        msg,
        format!(
            "failed to pull and unpack image {absent:?}: failed to resolve reference {absent:?}: {absent}: not found"
        )
    );
    waiting_with(&pods, "absent", "ImagePullBackOff").await;
    let events = events_of(&cluster, "absent").await;
    assert!(events.contains(&("Failed".into(), format!("Failed to pull image {absent:?}: {msg}"))), "{events:?}");
    assert!(events.contains(&("Failed".into(), "Error: ErrImagePull".into())), "{events:?}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_multi_arch_index_resolves_to_the_nodes_platform() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = format!("docker-archive:{}", busybox_archive(tmp.path()).display());
    let registry = Registry::start();
    registry.push(&archive, "multi/busybox:native", &["--format", "oci"]);
    // The same layers under another platform's config, which says so in its environment.
    let (other, other_size, media_type) = registry
        .push_variant("multi/busybox", "native", "other", |c| {
            c["architecture"] = json!("s390x");
            c["config"]["Env"].as_array_mut().unwrap().push(json!("PLATFORM=s390x"));
        })
        .await;
    let (native_manifest, native) = registry.manifest("multi/busybox", "native").await;
    let native_size = serde_json::to_vec(&native_manifest).unwrap().len();
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    // The other platform first: the node must pick, not take the first.
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": media_type, "digest": other, "size": other_size, "platform": {"architecture": "s390x", "os": "linux"}},
            {"mediaType": media_type, "digest": native, "size": native_size, "platform": {"architecture": arch, "os": "linux"}}
        ]
    });
    let index = serde_json::to_vec(&index).unwrap();
    let target: oci_client::Reference = format!("{}/multi/busybox:1", registry.host()).parse().unwrap();
    registry
        .client()
        .push_manifest_raw(&target, index.clone(), "application/vnd.oci.image.index.v1+json".parse().unwrap())
        .await
        .unwrap();

    let cluster = pulling_cluster(RegistryOptions::default()).await;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    let image = format!("{}/multi/busybox:1", registry.host());
    let (log, p) = run(&pods, pod("multi", &image, json!({}))).await;
    assert!(log.contains("env:\n"), "the other platform's config was used: {log}");
    // The kubelet reports the index's digest, as containerd stores it.
    assert_eq!(container(&p).image_id, format!("{}/multi/busybox@{}", registry.host(), sha256(&index)));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn always_re_resolves_a_moved_tag_and_if_not_present_keeps_the_stored_image() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = format!("docker-archive:{}", busybox_archive(tmp.path()).display());
    let registry = Registry::start();
    registry.push(&archive, "moving/busybox:base", &[]);
    registry
        .push_variant("moving/busybox", "base", "1", |c| {
            c["config"]["Env"].as_array_mut().unwrap().push(json!("VERSION=one"))
        })
        .await;
    let cluster = pulling_cluster(RegistryOptions::default()).await;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    let image = format!("{}/moving/busybox:1", registry.host());
    let always = json!({"containers": [{"name": "main", "image": image, "imagePullPolicy": "Always",
        "command": ["sh", "-c", "echo \"env:$VERSION\""]}]});
    let if_not_present = json!({"containers": [{"name": "main", "image": image, "imagePullPolicy": "IfNotPresent",
        "command": ["sh", "-c", "echo \"env:$VERSION\""]}]});
    let (log, _) = run(&pods, pod("first", &image, always.clone())).await;
    assert_eq!(log.trim(), "env:one");
    let manifest_gets =
        |r: &Registry| r.log().lines().filter(|l| l.contains("\"GET /v2/moving/busybox/manifests/")).count();

    // The tag moves; Always asks the registry and gets the new image.
    registry
        .push_variant("moving/busybox", "base", "1", |c| {
            c["config"]["Env"].as_array_mut().unwrap().push(json!("VERSION=two"))
        })
        .await;
    let (log, _) = run(&pods, pod("second", &image, always.clone())).await;
    assert_eq!(log.trim(), "env:two");
    // Unchanged: Always resolves the digest (a HEAD) and fetches nothing.
    let gets = manifest_gets(&registry);
    let (log, _) = run(&pods, pod("third", &image, always)).await;
    assert_eq!(log.trim(), "env:two");
    assert_eq!(manifest_gets(&registry), gets, "an unchanged digest fetched the manifest again");
    // IfNotPresent uses the store, even after the tag moved again.
    registry
        .push_variant("moving/busybox", "base", "1", |c| {
            c["config"]["Env"].as_array_mut().unwrap().push(json!("VERSION=three"))
        })
        .await;
    let (log, _) = run(&pods, pod("fourth", &image, if_not_present)).await;
    assert_eq!(log.trim(), "env:two");
    let events = events_of(&cluster, "fourth").await;
    assert!(
        events.contains(&("Pulled".into(), format!("Container image {image:?} already present on machine"))),
        "{events:?}"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_pulling_one_image_at_once_fetch_each_blob_once() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = format!("docker-archive:{}", busybox_archive(tmp.path()).display());
    let registry = Registry::start();
    registry.push(&archive, "shared/busybox:1", &[]);
    let cluster = pulling_cluster(RegistryOptions::default()).await;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    let image = format!("{}/shared/busybox:1", registry.host());
    let names: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
    let runs = names.iter().map(|n| run(&pods, pod(n, &image, json!({}))));
    futures::future::join_all(runs).await;
    let (manifest, _) = registry.manifest("shared/busybox", "1").await;
    let mut blobs = vec![manifest["config"]["digest"].as_str().unwrap().to_owned()];
    blobs.extend(manifest["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_owned()));
    for b in &blobs {
        assert_eq!(registry.blob_gets(b), 1, "{b} fetched {} times", registry.blob_gets(b));
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_blob_fails_the_pull_and_is_never_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = format!("docker-archive:{}", busybox_archive(tmp.path()).display());
    let registry = Registry::start();
    registry.push(&archive, "corrupt/busybox:1", &[]);
    let (manifest, _) = registry.manifest("corrupt/busybox", "1").await;
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
    // Same length, other bytes: only the digest can tell.
    let file = registry.blob_file(&layer);
    let mut bytes = Vec::new();
    std::fs::File::open(&file).unwrap().read_to_end(&mut bytes).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();

    let cluster = pulling_cluster(RegistryOptions::default()).await;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    let image = format!("{}/corrupt/busybox:1", registry.host());
    pods.create(&PostParams::default(), &pod("corrupt", &image, json!({}))).await.unwrap();
    let msg = waiting_with(&pods, "corrupt", "ErrImagePull").await;
    assert!(msg.starts_with(&format!("failed to pull and unpack image {image:?}: failed to copy: ")), "{msg}");
    assert!(msg.contains(&layer), "{msg}");
    let stored = cluster.data_dir().join("node/images/blobs").join(layer.replacen(':', "/", 1));
    assert!(!stored.exists(), "the corrupt blob was stored at {}", stored.display());
    let leftovers: Vec<_> = std::fs::read_dir(cluster.data_dir().join("node/images/blobs/sha256"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".pull-"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    cluster.stop().await;
}
