//! Node benchmarks, each against a baseline measured in the same run on the same machine:
//! * pod created -> Running, vs spawning the same process directly;
//! * exec round trip of `echo ok`, vs a bare `sh -c 'echo ok'` and vs the same through bwrap;
//! * `logs -f` throughput, vs reading the same bytes straight from a pipe.
//!
//! `cargo bench -p local-cluster --bench node` prints a Markdown table (medians over the
//! iterations; ratios are node / baseline for latency and node / baseline for throughput).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use local_cluster::node::{ExecRequest, ExitStatus, LogOptions, Node, NodeConfig, ResolvedVolumes};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

const ITER: usize = 30;
const LOG_BYTES: u64 = 256 * 1024 * 1024;
const LOG_LINE: &str = "the quick brown fox jumps over the lazy dog, a line of a typical CI job log";

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn pod(uid: &str, command: &str, policy: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("bench-{uid}"), "namespace": "default", "uid": uid},
        "spec": {"restartPolicy": policy, "containers": [{"name": "c", "image": "alpine", "command": ["sh", "-c", command]}]}
    }))
    .unwrap()
}

async fn wait_phase(rx: &mut watch::Receiver<BTreeMap<String, PodStatus>>, uid: &str, phase: &str) {
    rx.wait_for(|m| m.get(uid).and_then(|s| s.phase.as_deref()) == Some(phase)).await.unwrap();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = watch::channel(BTreeMap::<String, PodStatus>::new());
    let tx = Arc::new(Mutex::new(tx));
    let node = Node::new(
        NodeConfig { data_dir: dir.path().join("node"), images_dir: None, unavailable_images: vec![], node_name: "bench".into() },
        Arc::new(move |uid: &str, st: PodStatus| {
            tx.lock().unwrap().send_modify(|m| {
                m.insert(uid.to_string(), st);
            });
        }),
    )
    .expect("node starts");

    // 1. Pod start latency.
    eprintln!("pod start...");
    let mut node_start = Vec::new();
    let mut direct_start = Vec::new();
    for i in 0..ITER {
        let uid = format!("start-{i}");
        let t = Instant::now();
        node.run_pod(pod(&uid, "sleep 1000", "Never"), ResolvedVolumes::new());
        wait_phase(&mut rx, &uid, "Running").await;
        node_start.push(t.elapsed());
        node.forget_pod(&uid).await;

        let t = Instant::now();
        let mut child =
            tokio::process::Command::new("sh").args(["-c", "sleep 1000"]).process_group(0).kill_on_drop(true).spawn().unwrap();
        direct_start.push(t.elapsed());
        // The whole group: `sh` may have forked `sleep`, which must not outlive the benchmark.
        if let Some(pid) = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        child.wait().await.unwrap();
    }

    // 2. exec round trip.
    eprintln!("exec...");
    node.run_pod(pod("exec", "sleep 1000", "Never"), ResolvedVolumes::new());
    wait_phase(&mut rx, "exec", "Running").await;
    let (mut node_exec, mut bare, mut bwrap) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ITER {
        let t = Instant::now();
        let mut s = node
            .exec("exec", "c", ExecRequest { command: vec!["echo".into(), "ok".into()], stdout: true, ..Default::default() })
            .await
            .unwrap();
        let mut out = Vec::new();
        let mut so = s.stdout.take().unwrap();
        while let Some(b) = so.recv().await {
            out.extend_from_slice(&b);
        }
        assert_eq!(s.exit.await.unwrap(), ExitStatus::Exited(0));
        assert_eq!(out, b"ok\n");
        node_exec.push(t.elapsed());

        let t = Instant::now();
        let o = tokio::process::Command::new("sh").args(["-c", "echo ok"]).output().await.unwrap();
        assert_eq!(o.stdout, b"ok\n");
        bare.push(t.elapsed());

        let t = Instant::now();
        let o = tokio::process::Command::new("bwrap")
            .args(["--die-with-parent", "--unshare-pid", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--", "sh", "-c", "echo ok"])
            .output()
            .await
            .unwrap();
        assert_eq!(o.stdout, b"ok\n");
        bwrap.push(t.elapsed());
    }
    node.forget_pod("exec").await;

    // 3. logs -f throughput.
    eprintln!("logs -f...");
    let producer = format!("yes '{LOG_LINE}' | head -c {LOG_BYTES}");
    let mut node_logs = Vec::new();
    let mut pipe = Vec::new();
    for i in 0..3 {
        let uid = format!("logs-{i}");
        let t = Instant::now();
        node.run_pod(pod(&uid, &producer, "Never"), ResolvedVolumes::new());
        let mut s = loop {
            match node.logs(&uid, "c", LogOptions { follow: true, ..Default::default() }).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        };
        let mut n: u64 = 0;
        while let Some(b) = s.next().await {
            n += b.unwrap().len() as u64;
        }
        assert_eq!(n, LOG_BYTES);
        node_logs.push(t.elapsed());
        node.forget_pod(&uid).await;

        let t = Instant::now();
        let mut child = tokio::process::Command::new("sh").args(["-c", &producer]).stdout(Stdio::piped()).spawn().unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut buf = vec![0u8; 128 * 1024];
        let mut n: u64 = 0;
        loop {
            let r = out.read(&mut buf).await.unwrap();
            if r == 0 {
                break;
            }
            n += r as u64;
        }
        child.wait().await.unwrap();
        assert_eq!(n, LOG_BYTES);
        pipe.push(t.elapsed());
    }
    node.shutdown().await;

    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
    let mibs = |d: Duration| format!("{:.0} MiB/s", LOG_BYTES as f64 / 1048576.0 / d.as_secs_f64());
    let (ns, ds) = (median(node_start), median(direct_start));
    let (ne, be, we) = (median(node_exec), median(bare), median(bwrap));
    let (nl, pl) = (median(node_logs), median(pipe));
    println!("| measurement | node | baseline | ratio |");
    println!("|---|---|---|---|");
    println!("| pod run_pod -> Running (median of {ITER}) | {} | direct spawn of `sh -c 'sleep 1000'`: {} | {:.1}x |", ms(ns), ms(ds), ns.as_secs_f64() / ds.as_secs_f64());
    println!("| exec `echo ok` round trip (median of {ITER}) | {} | bare `sh -c 'echo ok'`: {} | {:.1}x |", ms(ne), ms(be), ne.as_secs_f64() / be.as_secs_f64());
    println!("| exec `echo ok` round trip (median of {ITER}) | {} | same through bwrap alone: {} | {:.1}x |", ms(ne), ms(we), ne.as_secs_f64() / we.as_secs_f64());
    println!("| `logs -f` of {} MiB of lines (median of 3) | {} | same bytes from a pipe: {} | {:.2} of pipe throughput |", LOG_BYTES >> 20, mibs(nl), mibs(pl), pl.as_secs_f64() / nl.as_secs_f64());
}
