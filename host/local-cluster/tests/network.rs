//! The pod network, judged by kube-rs and by the pods themselves (busybox's `wget` and `httpd`
//! in an image built from Debian's busybox package, as `make run` builds it): pods have IPs of
//! their own and reach each other, a Service's ClusterIP reaches its pod, and with egress a pod
//! reaches a host in another network namespace (made by the test, never an outside address)
//! and a server on the host's loopback as `host.keel.internal` (a closed port there refuses).

mod common;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, LogParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use local_cluster::node::PodNetwork;
use local_cluster::{ClusterOptions, LocalCluster};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);
const IMAGE: &str = "keel-examples/busybox:1";

/// A cluster with the example busybox image loaded, networked as `mode` says.
async fn cluster(mode: PodNetwork) -> (LocalCluster, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/images/busybox-archive.sh");
    let out =
        std::process::Command::new("sh").arg(script).arg(dir.path().join("busybox.tar")).arg(IMAGE).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c = common::cluster_with(ClusterOptions {
        images_from: Some(dir.path().to_path_buf()),
        pod_network: mode,
        ..ClusterOptions::default()
    })
    .await;
    (c, dir)
}

fn pod(name: &str, labels: serde_json::Value, script: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "main", "image": IMAGE, "command": ["sh", "-c", script]}]}
    }))
    .unwrap()
}

/// A pod serving `body` over HTTP on port 8080 with busybox's httpd, running.
async fn server(pods: &Api<Pod>, name: &str, body: &str) -> Pod {
    let script = format!("mkdir -p /tmp/www && echo {body} > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www");
    pods.create(&PostParams::default(), &pod(name, json!({"app": name}), &script)).await.unwrap();
    tokio::time::timeout(TIMEOUT, await_condition(pods.clone(), name, conditions::is_pod_running()))
        .await
        .expect("the server runs")
        .unwrap()
        .unwrap()
}

/// Runs a client pod to its end; returns its log, and asserts it succeeded.
async fn client(pods: &Api<Pod>, name: &str, script: &str) -> String {
    pods.create(&PostParams::default(), &pod(name, json!({}), script)).await.unwrap();
    let done = await_condition(pods.clone(), name, |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref()?.phase.as_deref()).is_some_and(|ph| ph == "Succeeded" || ph == "Failed")
    });
    let p = tokio::time::timeout(TIMEOUT, done).await.expect("the client ends").unwrap().unwrap();
    let log = pods.logs(name, &LogParams::default()).await.unwrap();
    assert_eq!(p.status.unwrap().phase.as_deref(), Some("Succeeded"), "{name}: {log}");
    log
}

fn pod_ip(p: &Pod) -> String {
    p.status.as_ref().unwrap().pod_ip.clone().unwrap()
}

#[tokio::test]
async fn pods_have_ips_of_their_own_and_a_services_cluster_ip_reaches_its_pod() {
    let (cluster, _dir) = cluster(PodNetwork::Bridge).await;
    let client_api = cluster.client().unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client_api.clone());
    let a = server(&pods, "web-a", "hello-from-a").await;
    let b = server(&pods, "web-b", "hello-from-b").await;
    let (ip_a, ip_b) = (pod_ip(&a), pod_ip(&b));
    assert_ne!(ip_a, ip_b);
    for ip in [&ip_a, &ip_b] {
        assert!(ip.starts_with("10.244."), "{ip}");
    }
    let status = a.status.as_ref().unwrap();
    assert_eq!(status.pod_ips.as_ref().unwrap()[0].ip, ip_a);
    assert_eq!(status.host_ip.as_deref(), Some("10.244.0.1"));
    let node = Api::<Node>::all(client_api.clone()).list(&Default::default()).await.unwrap().items.remove(0);
    let internal = node.status.unwrap().addresses.unwrap().into_iter().find(|a| a.type_ == "InternalIP").unwrap();
    assert_eq!(internal.address, "10.244.0.1");

    let services: Api<Service> = Api::default_namespaced(client_api);
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web-a"},
        "spec": {"selector": {"app": "web-a"}, "ports": [{"port": 80, "targetPort": 8080}]}
    }))
    .unwrap();
    let svc = services.create(&PostParams::default(), &svc).await.unwrap();
    let cluster_ip = svc.spec.unwrap().cluster_ip.unwrap();
    assert_ne!(cluster_ip, "10.96.0.1");

    // The Service's rules follow its Endpoints: retried until they are there.
    let script = format!(
        // (Debian busybox 1.35's `wget -T` crashes: `timeout` bounds each try instead.)
        "echo ip:$(hostname -i); echo b:$(wget -qO- http://{ip_b}:8080/); \
         for i in $(seq 100); do out=$(timeout 2 wget -qO- http://{cluster_ip}/) && break; sleep 0.1; done; echo svc:$out"
    );
    let log = client(&pods, "client", &script).await;
    assert!(log.contains("b:hello-from-b"), "{log}");
    assert!(log.contains("svc:hello-from-a"), "{log}");
    let own = log.lines().find_map(|l| l.strip_prefix("ip:")).unwrap().to_owned();
    assert!(own.starts_with("10.244.") && own != ip_a && own != ip_b, "{log}");
    // A pod reaches itself through its own Service (the hairpin).
    let log = client(&pods, "hairpin-check", &format!("wget -qO- http://{cluster_ip}/")).await;
    assert!(log.contains("hello-from-a"), "{log}");
    // Without egress nothing outside the node answers.
    let log =
        client(&pods, "no-egress", "timeout 3 wget -qO- http://192.0.2.1/ && echo reached || echo unreachable").await;
    assert!(log.contains("unreachable"), "{log}");
    cluster.stop().await;
}

#[tokio::test]
async fn with_egress_pods_reach_a_host_elsewhere_and_the_hosts_loopback_by_name() {
    if !common::is_root() {
        eprintln!("skipped: making the test host's network namespace and veth pair needs root");
        return;
    }
    let _test_host = common::TestHost::start("hello-from-the-test-host");
    // A server on the host's loopback, which pods reach as host.keel.internal.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let body = "hello-from-the-hosts-loopback\n";
            let _ = s
                .write_all(format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
                .await;
        }
    });
    // A port nobody listens on: a connection to it is refused at once, not left to time out
    // (a job's "wait until the database listens" loop depends on that).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (cluster, _dir) = cluster(PodNetwork::Egress).await;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    let script = format!(
        "echo far:$(timeout 10 wget -qO- http://10.250.0.2:8000/); echo local:$(timeout 10 wget -qO- http://host.keel.internal:{port}/); \
         timeout 10 wget -qO- http://host.keel.internal:{closed}/ 2>&1; echo closed:$?"
    );
    let log = client(&pods, "egress", &script).await;
    assert!(log.contains("far:hello-from-the-test-host"), "{log}");
    assert!(log.contains("local:hello-from-the-hosts-loopback"), "{log}");
    assert!(log.contains("Connection refused") && log.contains("closed:1"), "{log}");
    cluster.stop().await;
}
