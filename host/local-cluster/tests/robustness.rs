//! No single request takes the cluster down (issue 11, section 3): bodies, objects, patch results
//! and nesting are bounded, slow or silent connections are dropped, and after each probe a normal
//! kubectl call still works and the cluster stops at once.

mod common;

use std::time::Duration;

use axum::http::{Method, Request};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use local_cluster::{ClusterOptions, LocalCluster};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends a raw request with the cluster's own credentials; returns the status code and body.
async fn send(c: &LocalCluster, method: Method, path: &str, content_type: &str, body: Vec<u8>) -> (u16, String) {
    let req = Request::builder().method(method).uri(path).header("Content-Type", content_type).body(body).unwrap();
    match c.client().unwrap().request_text(req).await {
        Ok(text) => (200, text),
        Err(kube::Error::Api(s)) => (s.code, s.message),
        Err(other) => panic!("{path}: {other:?}"),
    }
}

fn kubectl_still_works(c: &LocalCluster) {
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(c.kubeconfig_path())
        .args(["get", "ns", "default", "-o", "name"])
        .env("KUBECACHEDIR", c.data_dir().join("kubectl-cache"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "namespace/default",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `stop` ends, bounded: the guard only catches a hang.
async fn stops_promptly(c: LocalCluster) {
    tokio::time::timeout(Duration::from_secs(60), c.stop()).await.expect("the cluster stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn deep_bodies_are_refused_before_parsing() {
    let c = common::cluster_with(ClusterOptions::on_host_rootfs()).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(c.client().unwrap());
    cms.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "cm"}})).unwrap())
        .await
        .unwrap();
    let path = "/api/v1/namespaces/default/configmaps/cm?fieldManager=probe";
    // The probe from the issue: 100k nested flow sequences as a server-side apply (about 200 KB).
    let deep = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm}}\ndata: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let (code, msg) = send(&c, Method::PATCH, path, "application/apply-patch+yaml", deep.into_bytes()).await;
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("nests 100001 levels deep; at most 128"), "{msg}");
    // Deep block nesting as a YAML create.
    let mut block = String::from("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: deep\n  annotations:\n");
    for i in 0..500 {
        block.push_str(&" ".repeat(4 + 2 * i));
        block.push_str("k:\n");
    }
    let (code, msg) =
        send(&c, Method::POST, "/api/v1/namespaces/default/configmaps", "application/yaml", block.into_bytes()).await;
    assert_eq!(code, 400, "{msg}");
    // And deep JSON: the decoder's own limit.
    let json_deep =
        format!("{{\"metadata\":{{\"name\":\"j\"}},\"data\":{}1{}}}", "[".repeat(100_000), "]".repeat(100_000));
    let (code, msg) =
        send(&c, Method::POST, "/api/v1/namespaces/default/configmaps", "application/json", json_deep.into_bytes())
            .await;
    assert_eq!(code, 400, "{msg}");
    tokio::task::block_in_place(|| kubectl_still_works(&c));
    stops_promptly(c).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_objects_and_patch_results_are_bounded() {
    let c = common::cluster_with(ClusterOptions::on_host_rootfs()).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(c.client().unwrap());
    let create = "/api/v1/namespaces/default/configmaps";

    // A body over 3 MiB: 413 as from kube-apiserver.
    let big = json!({"metadata": {"name": "big"}, "data": {"x": "a".repeat(3 * 1024 * 1024 + 1)}}).to_string();
    let (code, msg) = send(&c, Method::POST, create, "application/json", big.into_bytes()).await;
    assert_eq!((code, msg.as_str()), (413, "Request entity too large: limit is 3145728"));

    // A body under that limit whose object is over etcd's 1.5 MiB.
    let large = json!({"metadata": {"name": "large"}, "data": {"x": "a".repeat(2 * 1024 * 1024)}}).to_string();
    let (code, msg) = send(&c, Method::POST, create, "application/json", large.into_bytes()).await;
    assert_eq!(code, 413, "{msg}");
    assert!(cms.get_opt("large").await.unwrap().is_none());

    // The probe: `copy` operations that double the object each time.
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "seed"}, "data": {"a": "x".repeat(1024)}})).unwrap(),
    )
    .await
    .unwrap();
    let mut ops = vec![json!({"op": "add", "path": "/metadata/annotations", "value": {"k": ["x".repeat(1024)]}})];
    for _ in 0..30 {
        ops.push(json!({"op": "copy", "from": "/metadata/annotations/k", "path": "/metadata/annotations/k/-"}));
        ops.push(json!({"op": "copy", "from": "/metadata/annotations/k", "path": "/metadata/annotations/k2"}));
    }
    let body = serde_json::to_vec(&ops).unwrap();
    assert!(body.len() < 8 * 1024, "the probe itself is small");
    let seed = "/api/v1/namespaces/default/configmaps/seed";
    let (code, msg) = send(&c, Method::PATCH, seed, "application/json-patch+json", body).await;
    assert_eq!(code, 422, "{msg}");
    assert!(msg.contains("accumulated size increase of copy"), "{msg}");
    // Merge patches that would make the object too large are refused too.
    let grow = json!({"data": {"b": "y".repeat(2 * 1024 * 1024)}}).to_string();
    let (code, msg) = send(&c, Method::PATCH, seed, "application/merge-patch+json", grow.into_bytes()).await;
    assert_eq!(code, 413, "{msg}");
    let stored = cms.get("seed").await.unwrap();
    assert!(stored.metadata.annotations.is_none() && !stored.data.unwrap().contains_key("b"), "nothing was applied");

    // More JSON patch operations than the real server allows.
    let many: Vec<_> = (0..10_001).map(|_| json!({"op": "test", "path": "/metadata/name", "value": "seed"})).collect();
    let (code, msg) =
        send(&c, Method::PATCH, seed, "application/json-patch+json", serde_json::to_vec(&many).unwrap()).await;
    assert_eq!(
        (code, msg.as_str()),
        (413, "Request entity too large: The allowed maximum operations in a JSON patch is 10000, got 10001")
    );

    tokio::task::block_in_place(|| kubectl_still_works(&c));
    stops_promptly(c).await;
}

/// Reads until the server closes the connection (or resets it); the guard only catches a hang.
async fn closed_by_server(mut s: tokio::net::TcpStream) {
    let mut buf = [0u8; 1024];
    let r = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(r.is_ok(), "the server kept an idle connection open");
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_and_slow_connections_are_dropped() {
    let tls = common::cluster_with(ClusterOptions::on_host_rootfs()).await;
    let plain =
        common::cluster_with(ClusterOptions { insecure_unauthenticated: true, ..ClusterOptions::on_host_rootfs() })
            .await;
    let mut idle = Vec::new();
    for c in [&tls, &plain] {
        for _ in 0..100 {
            idle.push(tokio::net::TcpStream::connect(c.addr()).await.unwrap());
        }
    }
    // A few bytes and then nothing: not even enough to tell HTTP/1 from HTTP/2.
    let mut few = tokio::net::TcpStream::connect(plain.addr()).await.unwrap();
    few.write_all(b"GE").await.unwrap();
    // A finished TLS handshake and then silence (openssl exits when the server closes).
    let mut handshaken = tokio::process::Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &tls.addr().to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl runs");
    // Headers started and never finished (slowloris), on plain HTTP.
    let mut slow = tokio::net::TcpStream::connect(plain.addr()).await.unwrap();
    slow.write_all(b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ").await.unwrap();
    // A kept-alive connection after one request.
    let mut kept = tokio::net::TcpStream::connect(plain.addr()).await.unwrap();
    kept.write_all(b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
    let mut first = [0u8; 16];
    kept.read_exact(&mut first).await.unwrap();
    assert_eq!(&first[..12], b"HTTP/1.1 200");

    // Meanwhile everyone else is served.
    tokio::task::block_in_place(|| kubectl_still_works(&tls));
    let all = idle.into_iter().chain([few, slow, kept]).map(closed_by_server);
    futures::future::join_all(all).await;
    let ended = tokio::time::timeout(Duration::from_secs(120), handshaken.wait()).await;
    assert!(ended.is_ok(), "the server kept a silent TLS connection open");
    tokio::task::block_in_place(|| kubectl_still_works(&tls));
    stops_promptly(tls).await;
    stops_promptly(plain).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_is_bounded_with_requests_in_flight() {
    let c = common::cluster_with(ClusterOptions::on_host_rootfs()).await;
    let client = c.client().unwrap();
    // A watch and a followed log that never end on their own, and a request mid-body.
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let watch = cms.watch(&kube::api::WatchParams::default(), "0").await.unwrap();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::default_namespaced(client.clone());
    pods.create(&PostParams::default(), &common::sleeper("s")).await.unwrap();
    kube::runtime::wait::await_condition(pods.clone(), "s", kube::runtime::wait::conditions::is_pod_running())
        .await
        .unwrap();
    let logs = pods.log_stream("s", &kube::api::LogParams { follow: true, ..Default::default() }).await.unwrap();
    let mut raw = tokio::net::TcpStream::connect(c.addr()).await.unwrap();
    raw.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    stops_promptly(c).await;
    drop((watch, logs, raw));
}
