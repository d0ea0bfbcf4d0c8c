//! Authentication by default: a cluster started with `ClusterOptions::on_host_rootfs()` serves HTTPS and
//! answers 401 to every request without the kubeconfig's client certificate (or the token, when
//! one is set), on every path. Probed as another local user would: as root the anonymous requests
//! are sent by curl running as uid 65534 (`setpriv`), which also cannot read the kubeconfig.

mod common;

use std::path::Path;
use std::process::Command;

use common::cluster_with;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use local_cluster::{ClusterError, ClusterOptions, LocalCluster};
use serde_json::json;

const NOBODY: &str = "65534";

/// A command run as uid/gid 65534 when the tests run as root, as this user otherwise.
fn as_other_user(program: &str) -> Command {
    if common::is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--", program]);
        c
    } else {
        Command::new(program)
    }
}

/// curl over HTTP/1.1 without verifying the server (an attacker would not care); returns the
/// HTTP status and the body.
fn curl(cmd: Command, url: &str, extra: &[&str]) -> (u16, String) {
    let mut cmd = cmd;
    let out = cmd
        .args(["-sk", "--http1.1", "--max-time", "30", "-w", "\n%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn assert_unauthorized(what: &str, (code, body): (u16, String)) {
    assert_eq!(code, 401, "{what}: {body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
    assert_eq!((status["kind"].as_str(), status["reason"].as_str()), (Some("Status"), Some("Unauthorized")), "{what}");
}

async fn running_sleeper(c: &LocalCluster, name: &str) {
    let pods: Api<Pod> = Api::default_namespaced(c.client().unwrap());
    pods.create(&PostParams::default(), &common::sleeper(name)).await.unwrap();
    await_condition(pods, name, conditions::is_pod_running()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_requests_get_401_on_every_path_and_change_nothing() {
    let c = cluster_with(ClusterOptions::on_host_rootfs()).await;
    assert!(c.url().starts_with("https://"), "{}", c.url());
    running_sleeper(&c, "victim").await;
    let witness = tempfile::tempdir().unwrap();
    let target = witness.path().join("owned");
    let hostile = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "intruder"},
        "spec": {"containers": [{"name": "c", "image": "busybox",
            "command": ["sh", "-c", format!("touch /host/{}", target.file_name().unwrap().to_str().unwrap())],
            "volumeMounts": [{"name": "h", "mountPath": "/host"}]}],
            "volumes": [{"name": "h", "hostPath": {"path": witness.path()}}]}
    })
    .to_string();
    let base = c.url().to_owned();
    let ws = [
        "-H",
        "Connection: Upgrade",
        "-H",
        "Upgrade: websocket",
        "-H",
        "Sec-WebSocket-Version: 13",
        "-H",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "-H",
        "Sec-WebSocket-Protocol: v5.channel.k8s.io",
    ];
    let json_body = ["-H", "Content-Type: application/json", "--data-binary", hostile.as_str()];
    let pods = format!("{base}/api/v1/namespaces/default/pods");
    let probes: Vec<(String, Vec<&str>)> = vec![
        (format!("{base}/version"), vec![]),
        (format!("{base}/healthz"), vec![]),
        (format!("{base}/api"), vec![]),
        (format!("{base}/apis"), vec![]),
        (format!("{base}/apis/discovery.k8s.io/v1"), vec![]),
        (format!("{base}/apis/discovery.k8s.io/v1/endpointslices"), vec![]),
        (format!("{base}/api/v1"), vec![]),
        (format!("{base}/openapi/v3"), vec![]),
        (format!("{base}/openapi/v3/api/v1"), vec![]),
        (format!("{base}/no/such/path"), vec![]),
        (pods.clone(), vec![]),
        (format!("{pods}?watch=true"), vec![]),
        (format!("{base}/api/v1/secrets"), vec![]),
        (pods.clone(), json_body.to_vec()),
        (format!("{pods}/victim/log?follow=true"), vec![]),
        (format!("{pods}/victim/exec?command=id&stdout=true"), ws.to_vec()),
        (format!("{pods}/victim/attach?stdout=true"), [&ws[..], &["-X", "POST"]].concat()),
        (format!("{pods}/victim"), vec!["-X", "DELETE"]),
        (
            format!("{base}/api/v1/namespaces/default"),
            vec!["-X", "PATCH", "-H", "Content-Type: application/merge-patch+json", "-d", "{\"metadata\":{}}"],
        ),
        // A guessed token is no better than none.
        (pods.clone(), [&["-H", "Authorization: Bearer guess"][..], &json_body[..]].concat()),
    ];
    tokio::task::block_in_place(|| {
        for (url, extra) in &probes {
            assert_unauthorized(&format!("{url} {extra:?}"), curl(as_other_user("curl"), url, extra));
        }
        if common::is_root() {
            // The credentials are out of the other user's reach.
            for file in [c.kubeconfig_path().to_path_buf(), c.data_dir().join("server.key")] {
                let out = as_other_user("cat").arg(&file).output().unwrap();
                assert!(!out.status.success(), "uid {NOBODY} read {}", file.display());
            }
        }
    });

    // Nothing was created, deleted or run.
    let names: Vec<String> = Api::<Pod>::default_namespaced(c.client().unwrap())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert_eq!(names, ["victim"]);
    assert!(!target.exists(), "the anonymous pod ran");
    c.stop().await;
}

/// The client certificate and key from the cluster's kubeconfig, as PEM files for curl.
fn kubeconfig_identity(c: &LocalCluster, dir: &Path) -> (String, String) {
    use base64::Engine;
    let doc: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(c.kubeconfig_path()).unwrap()).unwrap();
    let user = &doc["users"][0]["user"];
    let decode = |k: &str| base64::engine::general_purpose::STANDARD.decode(user[k].as_str().unwrap()).unwrap();
    let (cert, key) = (dir.join("client.crt"), dir.join("client.key"));
    std::fs::write(&cert, decode("client-certificate-data")).unwrap();
    std::fs::write(&key, decode("client-key-data")).unwrap();
    (cert.to_string_lossy().into_owned(), key.to_string_lossy().into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn only_certificates_from_the_clusters_ca_are_accepted() {
    let c = cluster_with(ClusterOptions::on_host_rootfs()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = c.ca_path().unwrap().to_string_lossy().into_owned();
    let version = format!("{}/version", c.url());

    // The kubeconfig's certificate, with the server verified against the cluster's CA.
    let (cert, key) = kubeconfig_identity(&c, dir.path());
    let (code, body) = tokio::task::block_in_place(|| {
        curl(Command::new("curl"), &version, &["--cacert", &ca, "--cert", &cert, "--key", &key])
    });
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("gitVersion"), "{body}");

    // A certificate for the same name from another CA: the handshake fails, no HTTP answer.
    let stranger_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, "keel-local-admin");
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "system:masters");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let stranger = params.self_signed(&stranger_key).unwrap();
    let (scert, skey) = (dir.path().join("stranger.crt"), dir.path().join("stranger.key"));
    std::fs::write(&scert, stranger.pem()).unwrap();
    std::fs::write(&skey, stranger_key.serialize_pem()).unwrap();
    let (scert, skey) = (scert.to_string_lossy().into_owned(), skey.to_string_lossy().into_owned());
    let (code, body) = tokio::task::block_in_place(|| {
        curl(Command::new("curl"), &version, &["--cacert", &ca, "--cert", &scert, "--key", &skey])
    });
    assert_eq!(code, 0, "a foreign client certificate got an HTTP answer: {body}");

    // kube-rs with that certificate instead of the cluster's: refused as well.
    let mut cfg = kube::Config::new(c.url().parse().unwrap());
    cfg.root_cert = Some(vec![c.ca_der().unwrap().to_vec()]);
    let b64 = |pem: String| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pem);
    cfg.auth_info.client_certificate_data = Some(b64(stranger.pem()));
    cfg.auth_info.client_key_data = Some(b64(stranger_key.serialize_pem()).into());
    let impostor = kube::Client::try_from(cfg).unwrap();
    assert!(Api::<Namespace>::all(impostor).get("default").await.is_err());

    // The cluster still serves its own client after the refused handshakes.
    Api::<Namespace>::all(c.client().unwrap()).get("default").await.unwrap();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kube_rs_loads_the_kubeconfig_as_any_client_does() {
    let c = cluster_with(ClusterOptions::on_host_rootfs()).await;
    let kc = kube::config::Kubeconfig::read_from(c.kubeconfig_path()).unwrap();
    let cfg =
        kube::Config::from_custom_kubeconfig(kc.clone(), &kube::config::KubeConfigOptions::default()).await.unwrap();
    assert_eq!(cfg.default_namespace, "default");
    let client = kube::Client::try_from(cfg).unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "via-kubeconfig"}})).unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    assert!(cms.list(&ListParams::default()).await.unwrap().items.iter().any(|c| c.metadata.name.is_some()));

    // The same kubeconfig without its client certificate: TLS still verifies, the API says 401.
    let mut kc = kc;
    for user in &mut kc.auth_infos {
        let info = user.auth_info.as_mut().unwrap();
        info.client_certificate_data = None;
        info.client_key_data = None;
    }
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.unwrap();
    match Api::<Namespace>::all(kube::Client::try_from(cfg).unwrap()).get("default").await.unwrap_err() {
        kube::Error::Api(s) => assert_eq!((s.code, s.reason.as_str()), (401, "Unauthorized")),
        other => panic!("expected a 401 Status, got {other:?}"),
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_over_tls_replaces_the_certificate() {
    let c =
        cluster_with(ClusterOptions { token: Some("s3cret-t0ken".into()), ..ClusterOptions::on_host_rootfs() }).await;
    running_sleeper(&c, "p").await;
    let pods = format!("{}/api/v1/namespaces/default/pods", c.url());
    tokio::task::block_in_place(|| {
        let (code, body) = curl(as_other_user("curl"), &pods, &["-H", "Authorization: Bearer s3cret-t0ken"]);
        assert_eq!(code, 200, "{body}");
        assert_unauthorized("no token", curl(as_other_user("curl"), &pods, &[]));
        assert_unauthorized(
            "a prefix of the token",
            curl(as_other_user("curl"), &pods, &["-H", "Authorization: Bearer s3cret"]),
        );
        assert_unauthorized(
            "the token as basic auth",
            curl(as_other_user("curl"), &pods, &["-u", "admin:s3cret-t0ken"]),
        );
    });
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_open_mode_is_explicit_and_plain_http() {
    let c = cluster_with(ClusterOptions { insecure_unauthenticated: true, ..ClusterOptions::on_host_rootfs() }).await;
    assert!(c.url().starts_with("http://") && c.ca_pem().is_none());
    let (code, body) = tokio::task::block_in_place(|| {
        curl(as_other_user("curl"), &format!("{}/api/v1/namespaces/default/pods", c.url()), &[])
    });
    assert_eq!(code, 200, "{body}");
    Api::<Namespace>::all(c.client().unwrap()).get("default").await.unwrap();
    c.stop().await;

    // A token that kubectl would never send over plain HTTP is refused up front.
    let opts =
        ClusterOptions { insecure_unauthenticated: true, token: Some("t".into()), ..ClusterOptions::on_host_rootfs() };
    assert!(matches!(LocalCluster::start(opts).await, Err(ClusterError::TokenWithoutTls)));
}
