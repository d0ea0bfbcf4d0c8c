//! Embedded-cluster benchmarks, each against a baseline measured in the same run on the same
//! machine, at two levels:
//! * node (`Node` called directly): pod start -> Running, exec round trip, `logs -f` throughput;
//! * API (a real `LocalCluster` over HTTP, driven by kube-rs and kubectl): pod create -> Running
//!   seen through a watch, exec over WebSocket, `logs -f` as a streamed HTTP body.
//!
//! Baselines: spawning the same process directly, `echo ok` spawned bare, the same log bytes read
//! from a pipe. `cargo bench -p local-cluster --bench node` prints a Markdown table (median and
//! p90 over the samples; ratios are median / baseline median for latency and
//! throughput / pipe throughput for logs).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::api::{Api, AttachParams, DeleteParams, LogParams, PostParams};
use kube::runtime::wait::{Condition, await_condition, conditions};
use local_cluster::node::{ExecRequest, ExitStatus, LogOptions, Node, NodeConfig, PodNetwork, ResolvedVolumes};
use local_cluster::{ClusterOptions, LocalCluster};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

/// Samples for pod start (each one is a whole pod) and for the node-level exec.
const ITER: usize = 30;
/// Samples for the API-level exec: cheap, and the WebSocket path is noisier.
const EXEC_ITER: usize = 100;
/// kubectl is a 50+ MB Go binary; its start-up dominates, so fewer samples suffice.
const KUBECTL_ITER: usize = 15;
/// Samples for `logs -f` (each moves LOG_BYTES twice: through the cluster and through a pipe).
const LOG_ITER: usize = 5;
const LOG_BYTES: u64 = 256 * 1024 * 1024;
/// 99 characters + newline: the size of a typical line of a CI job's build log.
const LOG_LINE: &str =
    "2026-01-01T12:00:00Z INFO step 3/7: Compiling serde_json v1.0.140 (registry) with 2 jobs, cache hit";
/// Upper bound for anything the bench waits on, so a regression fails instead of hanging.
const WAIT: Duration = Duration::from_secs(60);

/// Median and p90 of a set of samples (nearest rank).
fn stats(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (rank(0.5), rank(0.9))
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn mibs(d: Duration) -> String {
    format!("{:.0} MiB/s", LOG_BYTES as f64 / 1048576.0 / d.as_secs_f64())
}

/// One line of the result table.
struct Row {
    what: String,
    median: String,
    p90: String,
    baseline: String,
    ratio: String,
}

impl Row {
    fn latency(what: String, samples: Vec<Duration>, baseline_name: &str, baseline: Duration) -> (Row, Duration) {
        let (m, p) = stats(samples);
        let ratio = format!("{:.1}x", m.as_secs_f64() / baseline.as_secs_f64());
        (Row { what, median: ms(m), p90: ms(p), baseline: format!("{baseline_name}: {}", ms(baseline)), ratio }, m)
    }

    /// Throughput rows: with a handful of samples the p90 column holds the slowest one.
    fn throughput(what: String, samples: Vec<Duration>, pipe: Duration) -> Row {
        let (m, _) = stats(samples.clone());
        let worst = samples.iter().max().copied().unwrap_or(m);
        let ratio = format!("{:.2} of pipe", pipe.as_secs_f64() / m.as_secs_f64());
        Row {
            what,
            median: mibs(m),
            p90: format!("slowest {}", mibs(worst)),
            baseline: format!("same bytes from a pipe: {}", mibs(pipe)),
            ratio,
        }
    }
}

fn node_pod(uid: &str, command: &str, policy: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("bench-{uid}"), "namespace": "default", "uid": uid},
        "spec": {"restartPolicy": policy, "containers": [{"name": "c", "image": "alpine", "command": ["sh", "-c", command]}]}
    }))
    .expect("valid pod")
}

fn api_pod(name: &str, command: &[&str]) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                 "containers": [{"name": "c", "image": "alpine", "command": command}]}
    }))
    .expect("valid pod")
}

fn log_producer() -> String {
    format!("yes '{LOG_LINE}' | head -c {LOG_BYTES}")
}

async fn wait_phase(rx: &mut watch::Receiver<BTreeMap<String, PodStatus>>, uid: &str, phase: &str) {
    rx.wait_for(|m| m.get(uid).and_then(|s| s.phase.as_deref()) == Some(phase)).await.expect("node status sink alive");
}

async fn read_to_end(mut r: impl AsyncRead + Unpin) -> u64 {
    let mut buf = vec![0u8; 128 * 1024];
    let mut n: u64 = 0;
    loop {
        let got = r.read(&mut buf).await.expect("stream reads");
        if got == 0 {
            return n;
        }
        n += got as u64;
    }
}

/// The baseline for `logs -f`: the same producer, its stdout piped straight into this process.
async fn pipe_read() -> Duration {
    let t = Instant::now();
    let mut child = tokio::process::Command::new("sh")
        .args(["-c", &log_producer()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("sh spawns");
    let n = read_to_end(child.stdout.take().expect("piped stdout")).await;
    child.wait().await.expect("producer exits");
    assert_eq!(n, LOG_BYTES);
    t.elapsed()
}

/// The baseline for pod start: spawning `sleep` directly. `spawn` returns once `execve`
/// succeeded (std reports exec failures through a CLOEXEC pipe), i.e. once `sleep` runs.
fn direct_start() -> Duration {
    let t = Instant::now();
    let mut child = std::process::Command::new("sleep").arg("infinity").spawn().expect("sleep spawns");
    let d = t.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    d
}

/// The baseline for exec: `echo ok` spawned bare, output collected.
fn bare_echo() -> Duration {
    let t = Instant::now();
    let o = std::process::Command::new("echo").arg("ok").output().expect("echo runs");
    let d = t.elapsed();
    assert_eq!(o.stdout, b"ok\n");
    d
}

struct NodeFigures {
    start: Duration,
    exec: Duration,
}

async fn node_level(rows: &mut Vec<Row>) -> NodeFigures {
    let dir = tempfile::tempdir().expect("temp dir");
    let (tx, mut rx) = watch::channel(BTreeMap::<String, PodStatus>::new());
    let tx = Arc::new(Mutex::new(tx));
    let node = Node::new(
        NodeConfig {
            data_dir: dir.path().join("node"),
            images_dir: None,
            unavailable_images: vec![],
            cached_unpullable_images: Vec::new(),
            backoff_base: local_cluster::node::DEFAULT_BACKOFF_BASE,
            node_name: "bench".into(),
        },
        Arc::new(move |uid: &str, st: PodStatus| {
            tx.lock().expect("status lock").send_modify(|m| {
                m.insert(uid.to_string(), st);
            });
        }),
    )
    .expect("node starts");

    eprintln!("node: pod start...");
    let (mut node_start, mut direct) = (Vec::new(), Vec::new());
    for i in 0..ITER {
        let uid = format!("start-{i}");
        let t = Instant::now();
        node.run_pod(node_pod(&uid, "exec sleep infinity", "Never"), ResolvedVolumes::new());
        wait_phase(&mut rx, &uid, "Running").await;
        node_start.push(t.elapsed());
        node.forget_pod(&uid).await;
        direct.push(direct_start());
    }
    let (direct, _) = stats(direct);
    let (row, start) =
        Row::latency(format!("node: `run_pod` -> Running ({ITER})"), node_start, "direct spawn of `sleep`", direct);
    rows.push(row);

    eprintln!("node: exec...");
    node.run_pod(node_pod("exec", "exec sleep infinity", "Never"), ResolvedVolumes::new());
    wait_phase(&mut rx, "exec", "Running").await;
    let (mut node_exec, mut bare, mut bwrap) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ITER {
        let t = Instant::now();
        let mut s = node
            .exec(
                "exec",
                "c",
                ExecRequest { command: vec!["echo".into(), "ok".into()], stdout: true, ..Default::default() },
            )
            .await
            .expect("exec starts");
        let mut out = Vec::new();
        let mut so = s.stdout.take().expect("stdout requested");
        while let Some(b) = so.recv().await {
            out.extend_from_slice(&b);
        }
        assert_eq!(s.exit.await.expect("exit status"), ExitStatus::Exited(0));
        assert_eq!(out, b"ok\n");
        node_exec.push(t.elapsed());

        bare.push(bare_echo());

        let t = Instant::now();
        let o = tokio::process::Command::new("bwrap")
            .args([
                "--die-with-parent",
                "--unshare-pid",
                "--ro-bind",
                "/",
                "/",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "--tmpfs",
                "/tmp",
                "--",
                "echo",
                "ok",
            ])
            .output()
            .await
            .expect("bwrap runs");
        assert_eq!(o.stdout, b"ok\n");
        bwrap.push(t.elapsed());
    }
    node.forget_pod("exec").await;
    let ((bare, _), (bwrap, _)) = (stats(bare), stats(bwrap));
    let (row, exec) =
        Row::latency(format!("node: `exec` `echo ok` ({ITER})"), node_exec.clone(), "bare spawn of `echo ok`", bare);
    rows.push(row);
    rows.push(
        Row::latency(
            format!("node: `exec` `echo ok` ({ITER})"),
            node_exec,
            "a new bwrap sandbox running `echo ok`",
            bwrap,
        )
        .0,
    );

    eprintln!("node: logs -f...");
    let (mut node_logs, mut pipe) = (Vec::new(), Vec::new());
    for i in 0..LOG_ITER {
        let uid = format!("logs-{i}");
        let t = Instant::now();
        node.run_pod(node_pod(&uid, &log_producer(), "Never"), ResolvedVolumes::new());
        // The log exists once the container has been started; until then `logs` says so.
        let mut s = loop {
            match node.logs(&uid, "c", LogOptions { follow: true, ..Default::default() }).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        };
        let mut n: u64 = 0;
        while let Some(b) = s.next().await {
            n += b.expect("log chunk").len() as u64;
        }
        assert_eq!(n, LOG_BYTES);
        node_logs.push(t.elapsed());
        node.forget_pod(&uid).await;
        pipe.push(pipe_read().await);
    }
    node.shutdown().await;
    rows.push(Row::throughput(
        format!("node: `logs` follow, {} MiB ({LOG_ITER})", LOG_BYTES >> 20),
        node_logs,
        stats(pipe).0,
    ));
    NodeFigures { start, exec }
}

fn phase_is(wanted: &'static [&'static str]) -> impl Condition<Pod> {
    move |p: Option<&Pod>| p.and_then(|p| p.status.as_ref()?.phase.as_deref()).is_some_and(|ph| wanted.contains(&ph))
}

async fn create_and_wait(pods: &Api<Pod>, pod: &Pod, cond: impl Condition<Pod>) -> Pod {
    let name = pod.metadata.name.clone().expect("named pod");
    let created = pods.create(&PostParams::default(), pod).await.expect("pod created");
    tokio::time::timeout(WAIT, await_condition(pods.clone(), &name, cond))
        .await
        .expect("pod reached the phase in time")
        .expect("watch works");
    created
}

/// Deletes a pod and waits until it is gone, so samples do not overlap with teardown.
async fn delete(pods: &Api<Pod>, pod: &Pod) {
    let name = pod.metadata.name.as_deref().expect("named pod");
    let uid = pod.metadata.uid.as_deref().expect("created pod has a uid");
    pods.delete(name, &DeleteParams::default().grace_period(0)).await.expect("pod deleted");
    tokio::time::timeout(WAIT, await_condition(pods.clone(), name, conditions::is_deleted(uid)))
        .await
        .expect("pod gone in time")
        .expect("watch works");
}

async fn api_level(rows: &mut Vec<Row>, node: &NodeFigures) {
    let cluster = LocalCluster::start(ClusterOptions::on_host_rootfs()).await.expect("cluster starts");
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().expect("kube client"));

    // (a) What a client sees: POST the pod, then a watch (await_condition lists and watches
    // the one pod by field selector) until it reports phase Running.
    eprintln!("api: pod create -> Running...");
    let (mut api_start, mut direct) = (Vec::new(), Vec::new());
    for i in 0..ITER {
        let pod = api_pod(&format!("start-{i}"), &["sleep", "infinity"]);
        let t = Instant::now();
        let created = create_and_wait(&pods, &pod, conditions::is_pod_running()).await;
        api_start.push(t.elapsed());
        delete(&pods, &created).await;
        direct.push(direct_start());
    }
    let (direct, _) = stats(direct);
    rows.push(
        Row::latency(
            format!("API: kube-rs create + watch -> Running ({ITER})"),
            api_start.clone(),
            "direct spawn of `sleep`",
            direct,
        )
        .0,
    );
    rows.push(
        Row::latency(
            format!("API: kube-rs create + watch -> Running ({ITER})"),
            api_start,
            "node-level `run_pod` (above)",
            node.start,
        )
        .0,
    );

    // (b) exec over WebSocket (v5.channel.k8s.io): connect, stdout to EOF, status frame.
    eprintln!("api: exec...");
    let exec_pod = create_and_wait(&pods, &api_pod("exec", &["sleep", "infinity"]), conditions::is_pod_running()).await;
    let (mut api_exec, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..EXEC_ITER {
        let t = Instant::now();
        let mut p = pods
            .exec("exec", ["echo", "ok"], &AttachParams::default().stdout(true).stderr(false))
            .await
            .expect("exec starts");
        let n = {
            let mut out = Vec::new();
            p.stdout().expect("stdout requested").read_to_end(&mut out).await.expect("stdout reads");
            assert_eq!(out, b"ok\n");
            out.len()
        };
        let status = p.take_status().expect("status channel").await.expect("status frame");
        api_exec.push(t.elapsed());
        assert_eq!((n, status.status.as_deref()), (3, Some("Success")), "{status:?}");
        p.join().await.expect("exec session ends");
        bare.push(bare_echo());
    }
    let (bare, _) = stats(bare);
    rows.push(
        Row::latency(
            format!("API: kube-rs `exec` `echo ok` ({EXEC_ITER})"),
            api_exec.clone(),
            "bare spawn of `echo ok`",
            bare,
        )
        .0,
    );
    rows.push(
        Row::latency(
            format!("API: kube-rs `exec` `echo ok` ({EXEC_ITER})"),
            api_exec,
            "node-level `exec` (above)",
            node.exec,
        )
        .0,
    );

    // The same through kubectl, against kubectl's own start-up (it reads the kubeconfig and
    // builds its client but sends no request).
    eprintln!("api: kubectl exec...");
    let kubectl = |args: &[&str]| {
        let t = Instant::now();
        let o = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(cluster.kubeconfig_path())
            .args(args)
            .output()
            .expect("kubectl runs");
        assert!(o.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        (t.elapsed(), o.stdout)
    };
    let (mut kexec, mut kversion) = (Vec::new(), Vec::new());
    for _ in 0..KUBECTL_ITER {
        let (d, out) = kubectl(&["exec", "exec", "--", "echo", "ok"]);
        assert_eq!(out, b"ok\n");
        kexec.push(d);
        kversion.push(kubectl(&["version", "--client", "-o", "json"]).0);
    }
    rows.push(
        Row::latency(
            format!("API: `kubectl exec` `echo ok` ({KUBECTL_ITER})"),
            kexec,
            "`kubectl version --client`",
            stats(kversion).0,
        )
        .0,
    );
    delete(&pods, &exec_pod).await;

    // (c) `logs -f`: from create to the end of the followed stream (chunked HTTP body).
    eprintln!("api: logs -f...");
    let (mut api_logs, mut pipe) = (Vec::new(), Vec::new());
    for i in 0..LOG_ITER {
        let name = format!("logs-{i}");
        let pod = api_pod(&name, &["sh", "-c", &log_producer()]);
        let t = Instant::now();
        // Logs exist once the container started: Running, or already Succeeded.
        let created = create_and_wait(&pods, &pod, phase_is(&["Running", "Succeeded"])).await;
        let stream =
            pods.log_stream(&name, &LogParams { follow: true, ..Default::default() }).await.expect("log stream opens");
        // kube-rs hands the body out as a `futures` reader, not a tokio one.
        let mut stream = Box::pin(stream);
        let (mut buf, mut n) = (vec![0u8; 128 * 1024], 0u64);
        loop {
            let got = futures::AsyncReadExt::read(&mut stream, &mut buf).await.expect("log stream reads");
            if got == 0 {
                break;
            }
            n += got as u64;
        }
        api_logs.push(t.elapsed());
        assert_eq!(n, LOG_BYTES);
        delete(&pods, &created).await;
        pipe.push(pipe_read().await);
    }
    rows.push(Row::throughput(
        format!("API: kube-rs `log_stream` follow, {} MiB ({LOG_ITER})", LOG_BYTES >> 20),
        api_logs,
        stats(pipe).0,
    ));

    cluster.stop().await;
}

/// A directory holding `keel-examples/busybox:bench`, built by `examples/images/busybox-archive.sh`.
fn busybox_image_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/images/busybox-archive.sh");
    let out = std::process::Command::new("sh")
        .arg(script)
        .arg(dir.path().join("busybox.tar"))
        .arg("keel-examples/busybox:bench")
        .output()
        .expect("sh runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir
}

/// Pods of a stored image (a busybox image from `examples/images/busybox-archive.sh`, on a
/// writable overlay of their own) against pods on the host's root, in the same cluster,
/// interleaved: create -> Running seen through a watch.
async fn image_level(rows: &mut Vec<Row>) {
    let dir = busybox_image_dir();
    let opts = ClusterOptions { images_from: Some(dir.path().to_path_buf()), ..ClusterOptions::on_host_rootfs() };
    let cluster = LocalCluster::start(opts).await.expect("cluster starts");
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().expect("kube client"));
    eprintln!("images: pod create -> Running, stored image (as root and as a user) and host rootfs...");
    let (mut stored, mut host, mut as_user) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..ITER {
        for (kind, image, samples) in [
            ("stored", "keel-examples/busybox:bench", &mut stored),
            ("host", "busybox", &mut host),
            ("user", "keel-examples/busybox:bench", &mut as_user),
        ] {
            let mut pod = api_pod(&format!("{kind}-{i}"), &["sleep", "3600"]);
            pod.spec.as_mut().expect("spec").containers[0].image = Some(image.into());
            if kind == "user" {
                // A real uid, gid and groups (the node's `UserMode::Real` when it runs as root).
                pod.spec.as_mut().expect("spec").containers[0].security_context = Some(
                    serde_json::from_value(serde_json::json!({"runAsUser": 1000, "runAsGroup": 1000})).expect("sc"),
                );
            }
            let t = Instant::now();
            let created = create_and_wait(&pods, &pod, conditions::is_pod_running()).await;
            samples.push(t.elapsed());
            delete(&pods, &created).await;
        }
    }
    let (host_median, _) = stats(host);
    let (row, stored_median) = Row::latency(
        format!("API: create -> Running, stored image on an overlay ({ITER})"),
        stored,
        "the same on the host rootfs",
        host_median,
    );
    rows.push(row);
    rows.push(
        Row::latency(
            format!("API: create -> Running, stored image as uid 1000 ({ITER})"),
            as_user,
            "the same image as root",
            stored_median,
        )
        .0,
    );
    cluster.stop().await;
}

/// Bytes each egress sample downloads.
const EGRESS_BYTES: u64 = 200 << 20;
const EGRESS_ITER: usize = 5;

/// The pod network's costs: create -> Running of a pod with an IP on the bridge (and slirp4netns
/// for egress) against the same pod with only its own loopback, two clusters side by side,
/// interleaved; and 200 MiB fetched by busybox's `wget` from a server on the host's loopback
/// through `host.keel.internal` (pod -> bridge -> NAT -> slirp4netns -> host socket) against the
/// same `wget` run on the host itself.
async fn network_level(rows: &mut Vec<Row>) {
    let dir = busybox_image_dir();
    let start = |pod_network| {
        let opts = ClusterOptions { images_from: Some(dir.path().to_path_buf()), pod_network, ..Default::default() };
        async move { LocalCluster::start(opts).await.expect("cluster starts") }
    };
    let (egress, none) = (start(PodNetwork::Egress).await, start(PodNetwork::None).await);
    let apis: [Api<Pod>; 2] = [
        Api::default_namespaced(egress.client().expect("kube client")),
        Api::default_namespaced(none.client().expect("kube client")),
    ];
    eprintln!("network: pod create -> Running with a pod network and without...");
    let mut samples = [Vec::new(), Vec::new()];
    for i in 0..ITER {
        for (pods, out) in apis.iter().zip(samples.iter_mut()) {
            let mut pod = api_pod(&format!("net-{i}"), &["sleep", "3600"]);
            pod.spec.as_mut().expect("spec").containers[0].image = Some("keel-examples/busybox:bench".into());
            let t = Instant::now();
            let created = create_and_wait(pods, &pod, conditions::is_pod_running()).await;
            out.push(t.elapsed());
            delete(pods, &created).await;
        }
    }
    let [with, without] = samples;
    let (without_median, _) = stats(without);
    rows.push(
        Row::latency(
            format!("API: create -> Running, pod network with egress ({ITER})"),
            with,
            "the same with --pod-network=none",
            without_median,
        )
        .0,
    );

    // The served file, and busybox's httpd serving it on the host's loopback.
    let www = tempfile::tempdir().expect("temp dir");
    let file = std::fs::File::create(www.path().join("big")).expect("file");
    file.set_len(EGRESS_BYTES).expect("sized");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
    let mut httpd = std::process::Command::new("busybox")
        .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
        .arg(www.path())
        .spawn()
        .expect("busybox httpd");
    std::thread::sleep(Duration::from_millis(200));
    eprintln!("network: {} MiB through egress and on the host...", EGRESS_BYTES >> 20);
    // busybox's `time` prints "real\t0m 0.42s" (10 ms resolution: 200 MiB take hundreds).
    let real = |text: &str| -> Duration {
        let line =
            text.lines().find(|l| l.trim_start().starts_with("real")).unwrap_or_else(|| panic!("no time in {text}"));
        let spec = line.trim_start().trim_start_matches("real").trim();
        let (m, s) = spec.split_once('m').expect("minutes");
        let secs: f64 = s.trim().trim_end_matches('s').parse().expect("seconds");
        Duration::from_secs_f64(m.trim().parse::<f64>().expect("minutes") * 60.0 + secs)
    };
    let (mut pod_times, mut host_times) = (Vec::new(), Vec::new());
    for i in 0..EGRESS_ITER {
        let cmd = format!("time wget -qO /dev/null http://host.keel.internal:{port}/big 2>&1");
        let mut pod = api_pod(&format!("egress-{i}"), &["sh", "-c", &cmd]);
        pod.spec.as_mut().expect("spec").containers[0].image = Some("keel-examples/busybox:bench".into());
        let created = create_and_wait(&apis[0], &pod, phase_is(&["Succeeded", "Failed"])).await;
        let log = apis[0].logs(&format!("egress-{i}"), &LogParams::default()).await.expect("logs");
        pod_times.push(real(&log));
        delete(&apis[0], &created).await;
        let out = std::process::Command::new("busybox")
            .args(["time", "busybox", "wget", "-qO", "/dev/null", &format!("http://127.0.0.1:{port}/big")])
            .output()
            .expect("busybox time");
        host_times.push(real(&String::from_utf8_lossy(&out.stderr)));
    }
    let _ = httpd.kill();
    let _ = httpd.wait();
    let rate = |d: Duration| format!("{:.0} MiB/s", (EGRESS_BYTES >> 20) as f64 / d.as_secs_f64());
    let (pod_median, _) = stats(pod_times.clone());
    let (host_median, _) = stats(host_times);
    rows.push(Row {
        what: format!("egress: wget {} MiB from the host's loopback ({EGRESS_ITER})", EGRESS_BYTES >> 20),
        median: rate(pod_median),
        p90: format!("slowest {}", rate(pod_times.iter().max().copied().unwrap_or(pod_median))),
        baseline: format!("the same wget on the host: {}", rate(host_median)),
        ratio: format!("{:.2} of the host's", host_median.as_secs_f64() / pod_median.as_secs_f64()),
    });
    egress.stop().await;
    none.stop().await;
}

/// Samples for a first pull (each one a fresh cluster and a 50 MB download and unpack).
const PULL_ITER: usize = 5;
/// Size of the incompressible layer of the pull bench's image (busybox is ~2 MB on top).
const PULL_LAYER_BYTES: usize = 48 << 20;

/// A distribution registry (Debian's `docker-registry`) on a free loopback port, killed on drop.
struct Registry {
    child: std::process::Child,
    host: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry() -> Registry {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
    let config = format!(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
        dir.path().join("data").display()
    );
    std::fs::write(dir.path().join("config.yml"), config).expect("registry config");
    let child = std::process::Command::new("docker-registry")
        .arg("serve")
        .arg(dir.path().join("config.yml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry (Debian package docker-registry) runs");
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the registry did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Registry { child, host: format!("127.0.0.1:{port}"), _dir: dir }
}

/// `busybox.tar` (a docker-archive of one layer) with a second layer of `PULL_LAYER_BYTES`
/// random bytes, written as another docker-archive: a 50 MB image no compression shrinks.
fn fifty_mb_archive(busybox: &std::path::Path, out: &std::path::Path) {
    use sha2::Digest;
    let mut files = BTreeMap::new();
    let mut archive = tar::Archive::new(std::fs::File::open(busybox).expect("busybox archive"));
    for e in archive.entries().expect("entries") {
        let mut e = e.expect("entry");
        let path = e.path().expect("path").to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).expect("read");
        files.insert(path, data);
    }
    let mut manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).expect("manifest");
    let config_name = manifest[0]["Config"].as_str().expect("config name").to_owned();
    let mut config: serde_json::Value = serde_json::from_slice(&files[&config_name]).expect("config");
    let mut rng = fastrand::Rng::with_seed(17);
    let mut payload = vec![0u8; PULL_LAYER_BYTES];
    rng.fill(&mut payload);
    let mut layer = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(payload.len() as u64);
    h.set_mtime(0);
    layer.append_data(&mut h, "data/random", payload.as_slice()).expect("layer");
    let layer = layer.into_inner().expect("layer tar");
    let diff_id = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&layer)));
    config["rootfs"]["diff_ids"].as_array_mut().expect("diff_ids").push(serde_json::json!(diff_id));
    let config = serde_json::to_vec(&config).expect("config json");
    let new_config = format!("{}.json", hex::encode(sha2::Sha256::digest(&config)));
    files.remove(&config_name);
    manifest[0]["Config"] = serde_json::json!(new_config);
    manifest[0]["Layers"].as_array_mut().expect("layers").push(serde_json::json!("big/layer.tar"));
    manifest[0]["RepoTags"] = serde_json::json!(["bench/big:1"]);
    files.insert(new_config, config);
    files.insert("big/layer.tar".into(), layer);
    files.insert("manifest.json".into(), serde_json::to_vec(&manifest).expect("manifest json"));
    let mut b = tar::Builder::new(std::fs::File::create(out).expect("archive"));
    for (path, data) in &files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, path, data.as_slice()).expect("append");
    }
    b.finish().expect("finish");
}

/// A first pull of a 50 MB image from a loopback registry (create -> Running of a pod of it on
/// a fresh cluster: resolve, fetch, verify, unpack, start) against `skopeo copy` of the same
/// image from the same registry to a directory (fetch and verify only), interleaved.
async fn pull_level(rows: &mut Vec<Row>) {
    let have = |bin: &str| std::process::Command::new(bin).arg("--version").output().is_ok_and(|o| o.status.success());
    if !have("skopeo") || !have("docker-registry") {
        eprintln!("pulls: skipped (needs the Debian packages docker-registry and skopeo)");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/images/busybox-archive.sh");
    let busybox = dir.path().join("busybox.tar");
    let out = std::process::Command::new("sh").arg(script).arg(&busybox).output().expect("sh runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let big = dir.path().join("big.tar");
    fifty_mb_archive(&busybox, &big);
    let registry = start_registry();
    let image = format!("{}/bench/big:1", registry.host);
    let pushed = std::process::Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("docker-archive:{}", big.display()))
        .arg(format!("docker://{image}"))
        .output()
        .expect("skopeo runs");
    assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));
    eprintln!("pulls: first pull of a 50 MB image against skopeo copy...");
    let (mut pulls, mut copies) = (Vec::new(), Vec::new());
    for i in 0..PULL_ITER {
        let opts = ClusterOptions { host_rootfs: false, ..ClusterOptions::default() };
        let cluster = LocalCluster::start(opts).await.expect("cluster starts");
        let pods: Api<Pod> = Api::default_namespaced(cluster.client().expect("kube client"));
        let mut pod = api_pod(&format!("pull-{i}"), &["sleep", "3600"]);
        pod.spec.as_mut().expect("spec").containers[0].image = Some(image.clone());
        let t = Instant::now();
        let created = pods.create(&PostParams::default(), &pod).await.expect("pod created");
        let running = tokio::time::timeout(
            WAIT,
            await_condition(pods.clone(), &format!("pull-{i}"), conditions::is_pod_running()),
        )
        .await;
        pulls.push(t.elapsed());
        if running.is_err() {
            let status = pods.get_status(&format!("pull-{i}")).await.map(|p| p.status);
            panic!("the pod of the pulled image did not run in {WAIT:?}: {status:#?}");
        }
        delete(&pods, &created).await;
        cluster.stop().await;

        let dest = dir.path().join(format!("copy-{i}"));
        let t = Instant::now();
        let copied = tokio::process::Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{image}"))
            .arg(format!("dir:{}", dest.display()))
            .output()
            .await
            .expect("skopeo runs");
        copies.push(t.elapsed());
        assert!(copied.status.success(), "{}", String::from_utf8_lossy(&copied.stderr));
        let _ = std::fs::remove_dir_all(&dest);
    }
    let (copy_median, _) = stats(copies);
    rows.push(
        Row::latency(
            format!("API: create -> Running with a first pull of a 50 MB image, loopback registry ({PULL_ITER})"),
            pulls,
            "`skopeo copy` of it to a dir",
            copy_median,
        )
        .0,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let started = Instant::now();
    let mut rows = Vec::new();
    // `KEEL_BENCH=images` runs only the image rows (and the network's), `network` only the network's.
    if std::env::var("KEEL_BENCH").is_err() {
        let node = node_level(&mut rows).await;
        api_level(&mut rows, &node).await;
    }
    // `KEEL_BENCH=network` runs only the pod network's rows.
    if std::env::var("KEEL_BENCH").as_deref() == Ok("network") {
        network_level(&mut rows).await;
    } else {
        image_level(&mut rows).await;
        pull_level(&mut rows).await;
        network_level(&mut rows).await;
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());

    println!("| measurement (samples) | median | p90 | baseline (median) | ratio |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} | {} | {} |", r.what, r.median, r.p90, r.baseline, r.ratio);
    }
}
