//! The API server over TLS (the default), judged by real clients: kube-rs, kubectl and the
//! official Python client each verify the server against the CA in the kubeconfig; clients that
//! do not trust that CA are refused, and malformed input does not hurt the server.

mod common;

use common::cluster_with;
use futures::AsyncBufReadExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, AttachParams, ListParams, LogParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use local_cluster::{ClusterOptions, LocalCluster};
use serde_json::json;
use std::process::{Command, Output};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn tls_cluster() -> LocalCluster {
    cluster_with(ClusterOptions::on_host_rootfs()).await
}

fn talker(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", "echo hello over tls; exec sleep 3600"]}]
        }
    }))
    .unwrap()
}

fn kubectl_with(kubeconfig: &std::path::Path, c: &LocalCluster, args: &[&str]) -> Output {
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        // Discovery cache inside the cluster's data dir: no test sees another's.
        .env("KUBECACHEDIR", c.data_dir().join("kubectl-cache"))
        .output()
        .expect("kubectl is installed")
}

/// kubectl through the cluster's own kubeconfig; must succeed and print nothing on stderr.
fn kubectl(c: &LocalCluster, args: &[&str]) -> String {
    let out = kubectl_with(c.kubeconfig_path(), c, args);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubectl {args:?} failed ({}):\nstdout: {stdout}\nstderr: {stderr}", out.status);
    assert!(stderr.trim().is_empty(), "kubectl {args:?} printed to stderr: {stderr}");
    stdout.into_owned()
}

fn python(script: &str, arg: &std::path::Path) -> (String, String, std::process::ExitStatus) {
    let out = Command::new("python3").arg("-c").arg(script).arg(arg).output().expect("python3 runs");
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned(), out.status)
}

#[tokio::test(flavor = "multi_thread")]
async fn files_and_kubeconfig_carry_the_ca_and_never_skip_verification() {
    use base64::Engine;
    let c = tls_cluster().await;
    assert_eq!(c.url(), format!("https://{}", c.addr()));
    let ca_pem = c.ca_pem().expect("a TLS cluster has a CA");
    assert_eq!(c.ca_path(), Some(c.data_dir().join("ca.crt").as_path()));
    assert_eq!(std::fs::read_to_string(c.data_dir().join("ca.crt")).unwrap(), ca_pem);
    assert!(
        std::fs::read_to_string(c.data_dir().join("server.crt")).unwrap().starts_with("-----BEGIN CERTIFICATE-----")
    );
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(c.data_dir().join("server.key")).unwrap().permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);

    let text = std::fs::read_to_string(c.kubeconfig_path()).unwrap();
    assert!(!text.contains("insecure"), "{text}");
    let doc: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    let cluster = &doc["clusters"][0]["cluster"];
    assert_eq!(cluster["server"], c.url());
    let ca_data = base64::engine::general_purpose::STANDARD
        .decode(cluster["certificate-authority-data"].as_str().unwrap())
        .unwrap();
    assert_eq!(String::from_utf8(ca_data).unwrap(), ca_pem);
    // No token: a client certificate names the user, so kubectl does not prompt for one.
    let user = &doc["users"][0]["user"];
    assert!(user["client-certificate-data"].is_string() && user["client-key-data"].is_string(), "{user}");

    // Only the explicitly insecure mode is plain HTTP, with no certificate files and no CA or
    // credential in the kubeconfig.
    let plain =
        cluster_with(ClusterOptions { insecure_unauthenticated: true, ..ClusterOptions::on_host_rootfs() }).await;
    assert!(plain.url().starts_with("http://") && plain.ca_pem().is_none());
    assert!(!plain.data_dir().join("ca.crt").exists());
    let plain_kc = std::fs::read_to_string(plain.kubeconfig_path()).unwrap();
    assert!(!plain_kc.contains("certificate") && !plain_kc.contains("token"), "{plain_kc}");
    plain.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kube_rs_creates_watches_execs_and_reads_logs_over_tls() {
    let c = tls_cluster().await;
    let pods: Api<Pod> = Api::default_namespaced(c.client().unwrap());
    pods.create(&PostParams::default(), &talker("talker")).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(120),
        await_condition(pods.clone(), "talker", conditions::is_pod_running()),
    )
    .await
    .expect("pod running in time")
    .expect("watch works over TLS");

    // exec: a WebSocket upgrade on the TLS connection, with the exit code in the final status.
    let ap = AttachParams::default().stdin(false).stdout(true).stderr(true);
    let mut proc = pods.exec("talker", ["sh", "-c", "echo from exec; echo oops >&2; exit 3"], &ap).await.unwrap();
    let (mut stdout, mut stderr) = (proc.stdout().unwrap(), proc.stderr().unwrap());
    let (mut out, mut err) = (String::new(), String::new());
    let (o, e) = tokio::join!(stdout.read_to_string(&mut out), stderr.read_to_string(&mut err));
    o.unwrap();
    e.unwrap();
    let status = proc.take_status().unwrap().await.expect("a final status");
    proc.join().await.unwrap();
    assert_eq!((out.as_str(), err.as_str()), ("from exec\n", "oops\n"));
    assert_eq!(status.reason.as_deref(), Some("NonZeroExitCode"));
    let causes = status.details.and_then(|d| d.causes).unwrap_or_default();
    assert_eq!(causes[0].message.as_deref(), Some("3"), "{causes:?}");

    // Logs, whole and followed.
    assert_eq!(pods.logs("talker", &LogParams::default()).await.unwrap(), "hello over tls\n");
    let mut follow =
        pods.log_stream("talker", &LogParams { follow: true, ..LogParams::default() }).await.unwrap().lines();
    assert_eq!(futures::TryStreamExt::try_next(&mut follow).await.unwrap().as_deref(), Some("hello over tls"));
    drop(follow);

    let names: Vec<String> = Api::<Namespace>::all(c.client().unwrap())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert!(names.contains(&"default".to_owned()), "{names:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_works_over_tls_without_warnings() {
    let c = tls_cluster().await;
    assert!(kubectl(&c, &["get", "ns"]).contains("default"));
    assert_eq!(
        kubectl(
            &c,
            &["run", "web", "--image=busybox", "--command", "--", "sh", "-c", "echo hello over tls; exec sleep 3600"]
        )
        .trim(),
        "pod/web created"
    );
    assert!(kubectl(&c, &["wait", "--for=condition=Ready", "pod/web", "--timeout=120s"]).contains("condition met"));
    assert_eq!(kubectl(&c, &["logs", "web"]), "hello over tls\n");
    assert_eq!(kubectl(&c, &["exec", "web", "--", "sh", "-c", "echo in-pod"]), "in-pod\n");

    // A failing command: kubectl reports its exit code, and says only that on stderr.
    let out = kubectl_with(c.kubeconfig_path(), &c, &["exec", "web", "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "command terminated with exit code 3");

    kubectl(&c, &["delete", "pod", "web", "--wait=true"]);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_client_lists_and_execs_over_tls() {
    let c = tls_cluster().await;
    let pods: Api<Pod> = Api::default_namespaced(c.client().unwrap());
    pods.create(&PostParams::default(), &talker("py")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(120), await_condition(pods.clone(), "py", conditions::is_pod_running()))
        .await
        .expect("pod running in time")
        .unwrap();
    let script = r#"
import sys
from kubernetes import config, client
from kubernetes.stream import stream
config.load_kube_config(config_file=sys.argv[1])
v1 = client.CoreV1Api()
print(sorted(n.metadata.name for n in v1.list_namespace().items))
resp = stream(v1.connect_get_namespaced_pod_exec, "py", "default",
              command=["sh", "-c", "echo py-$((40+2)); exit 5"], stderr=True, stdin=False, stdout=True,
              tty=False, _preload_content=False)
resp.run_forever(timeout=30)
print(repr(resp.read_stdout()))
print(resp.returncode)
"#;
    let (stdout, stderr, status) = python(script, c.kubeconfig_path());
    assert!(status.success(), "python failed: {stderr}\n{stdout}");
    // urllib3 warns on stderr when verification is off; there must be no warning at all.
    assert!(stderr.trim().is_empty(), "python printed: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, ["['default', 'kube-node-lease', 'kube-public', 'kube-system']", "'py-42\\n'", "5"], "{stdout}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_that_do_not_trust_the_ca_are_refused() {
    let c = tls_cluster().await;

    // kubectl with the cluster's kubeconfig minus its CA data: Go's verifier rejects the server.
    let mut doc: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(c.kubeconfig_path()).unwrap()).unwrap();
    doc["clusters"][0]["cluster"].as_object_mut().unwrap().remove("certificate-authority-data").unwrap();
    let untrusting = c.data_dir().join("kubeconfig-without-ca");
    std::fs::write(&untrusting, serde_yaml_ng::to_string(&doc).unwrap()).unwrap();
    let out = kubectl_with(&untrusting, &c, &["get", "ns"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("x509: certificate signed by unknown authority"), "{stderr}");

    // The other way round: a client certificate some other CA issued is refused by the server.
    let stranger = rcgen::generate_simple_self_signed(vec!["stranger".to_owned()]).unwrap();
    let mut doc: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(c.kubeconfig_path()).unwrap()).unwrap();
    let b64 = |pem: String| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pem);
    doc["users"][0]["user"]["client-certificate-data"] = json!(b64(stranger.cert.pem()));
    doc["users"][0]["user"]["client-key-data"] = json!(b64(stranger.signing_key.serialize_pem()));
    let impostor = c.data_dir().join("kubeconfig-foreign-client-cert");
    std::fs::write(&impostor, serde_yaml_ng::to_string(&doc).unwrap()).unwrap();
    let out = kubectl_with(&impostor, &c, &["get", "ns"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("remote error: tls:"), "{stderr}");

    // The Python client with a fresh configuration (verification on, system CAs only).
    let script = r#"
import sys, urllib3
from kubernetes import client
cfg = client.Configuration()
cfg.host = sys.argv[1]
cfg.retries = urllib3.Retry(0)
try:
    client.CoreV1Api(client.ApiClient(cfg)).list_namespace()
    print("trusted")
except urllib3.exceptions.MaxRetryError as e:
    print(type(e.reason).__name__, e.reason)
"#;
    let (stdout, stderr, status) = python(script, std::path::Path::new(c.url()));
    assert!(status.success(), "python failed: {stderr}\n{stdout}");
    assert!(stdout.starts_with("SSLError") && stdout.contains("CERTIFICATE_VERIFY_FAILED"), "{stdout}");

    // kube-rs without the root certificate: the system store does not know the CA either.
    let anonymous = kube::Client::try_from(kube::Config::new(c.url().parse().unwrap())).unwrap();
    let err = Api::<Namespace>::all(anonymous).list(&ListParams::default()).await.unwrap_err();
    assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");

    // And the cluster's own client still works after all those failed handshakes.
    Api::<Namespace>::all(c.client().unwrap()).get("default").await.unwrap();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_and_bearer_token_together() {
    let c = cluster_with(ClusterOptions { token: Some("t0ken".into()), ..ClusterOptions::on_host_rootfs() }).await;
    Api::<Namespace>::all(c.client().unwrap()).get("default").await.unwrap();
    assert!(kubectl(&c, &["get", "ns", "default", "-o", "name"]).contains("namespace/default"));
    // The token is the credential; no client key is written beside it.
    let text = std::fs::read_to_string(c.kubeconfig_path()).unwrap();
    assert!(
        text.contains("token: t0ken")
            && text.contains("certificate-authority-data")
            && !text.contains("client-key-data"),
        "{text}"
    );

    // The cluster's kubeconfig read by kube-rs (CA from certificate-authority-data), minus the token.
    let mut kc = kube::config::Kubeconfig::read_from(c.kubeconfig_path()).unwrap();
    for user in &mut kc.auth_infos {
        user.auth_info.as_mut().unwrap().token = None;
    }
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.unwrap();
    let tokenless = kube::Client::try_from(cfg).unwrap();
    match Api::<Namespace>::all(tokenless).get("default").await.unwrap_err() {
        kube::Error::Api(s) => assert_eq!(
            (s.code, s.reason.as_str(), s.status),
            (401, "Unauthorized", Some(kube::core::response::StatusSummary::Failure))
        ),
        other => panic!("expected a 401 Status, got {other:?}"),
    }
    c.stop().await;
}

/// Send `bytes` on a fresh connection and read until the server closes it (each input below
/// makes it close: an error, or `Connection: close`).
async fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut reply = Vec::new();
    // A reset after the server's alert is an acceptable end too; what was read before counts.
    let _ = s.read_to_end(&mut reply).await;
    reply
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_input_on_the_tls_port_does_not_hurt_the_server() {
    let c = tls_cluster().await;
    let addr = c.addr();

    // Connections that stay mid-handshake (silent, or a TLS record header and then nothing) while
    // another client is served: handshakes run beside the accept loop, not in it.
    let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.unwrap();
    Api::<Namespace>::all(c.client().unwrap()).get("default").await.unwrap();

    // Plain HTTP by mistake: told so, like kube-apiserver does.
    let reply = String::from_utf8(exchange(addr, b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await).unwrap();
    assert!(reply.starts_with("HTTP/1.0 400 Bad Request\r\n"), "{reply}");
    assert!(reply.ends_with("Client sent an HTTP request to an HTTPS server.\n"), "{reply}");

    // A TLS record of garbage: rustls answers with an alert record (content type 21) and closes.
    // (A ClientHello record whose body is four zero bytes.)
    let reply = exchange(addr, &[0x16, 0x03, 0x03, 0x00, 0x08, 0x01, 0x00, 0x00, 0x04, 0, 0, 0, 0]).await;
    assert_eq!(reply.first(), Some(&0x15), "{reply:?}");
    // Binary noise and an empty connection.
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    assert!(String::from_utf8_lossy(&exchange(addr, &noise).await).starts_with("HTTP/1.0 400 Bad Request"));
    // A client that connects and leaves at once.
    drop(tokio::net::TcpStream::connect(addr).await.unwrap());

    // Still serving, over a fresh TLS connection, as every client above had.
    let pods: Api<Pod> = Api::default_namespaced(c.client().unwrap());
    assert!(pods.list(&ListParams::default()).await.unwrap().items.is_empty());
    assert!(kubectl(&c, &["get", "ns", "default", "-o", "name"]).contains("namespace/default"));

    // Stopping does not wait on the stuck handshakes, and leaves the port closed.
    c.stop().await;
    drop((silent, stalled));
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the port still accepts after stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_input_on_the_plain_port_does_not_hurt_the_server() {
    let c = cluster_with(ClusterOptions { insecure_unauthenticated: true, ..ClusterOptions::on_host_rootfs() }).await;
    let addr = c.addr();
    // A TLS ClientHello-looking start on plain HTTP, then binary noise.
    let reply = String::from_utf8_lossy(&exchange(addr, &[0x16, 0x03, 0x01, 0x02, 0x00, 1, 2, 3]).await).into_owned();
    assert!(reply.starts_with("HTTP/1.1 400 Bad Request"), "{reply:?}");
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    assert!(String::from_utf8_lossy(&exchange(addr, &noise).await).starts_with("HTTP/1.1 400 Bad Request"));
    let version = String::from_utf8(
        exchange(addr, b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await,
    )
    .unwrap();
    assert!(version.starts_with("HTTP/1.1 200 OK\r\n") && version.contains("gitVersion"), "{version}");
    c.stop().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the port still accepts after stop");
}
