//! `host serve` with many jobs at once, and `host run` in the same run as the baseline.
//!
//! One embedded cluster (`LocalCluster`), one fake GitLab (the tests' fake of the runner API: no
//! GitLab can run here), one real git server (`git http-backend`). Baseline: `host run` of
//! `echo hi` RUNS times, one after the other (API requests per job counted at the cluster).
//! Then `host serve` with `concurrent = JOBS` takes JOBS jobs queued at once, each fetching its
//! sources from git at depth 1 and then sleeping; while all of them sleep, the serve process's
//! RSS and CPU are sampled. Printed: RSS per running job (GitLab's sizing guide: ~2.5 MB per
//! job), CPU per running job, API requests per job (serve against run), and the time from a job
//! being queued to its first trace patch (p50/p90) against `check_interval` and the 3 s trace
//! interval.
//!
//! `cargo bench -p host --bench serve_load` (uses the `host` binary cargo built for benches).

#[path = "../src/gitlab/fake.rs"]
#[allow(dead_code)]
mod fake;
#[path = "../../tests/support/git_server.rs"]
#[allow(dead_code)]
mod git_server;

use std::path::Path;
use std::time::{Duration, Instant};

use fake::{Api, FakeGitlab};
use serde_json::json;

const JOBS: usize = 50;
const RUNS: usize = 6;
const SLEEP_SECS: u64 = 25;
const RUNNER_TOKEN: &str = "glrt-keelbenchrunner0001";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Memory of a process in MiB: resident in all, and the anonymous part (heap, stacks, wasm
/// linear memories) apart from file-backed pages (the binary, compiled plugins), which do not
/// grow with jobs the way a job's own allocations do.
#[derive(Debug, Clone, Copy)]
struct Rss {
    all: f64,
    anon: f64,
}

/// (RSS, user+system CPU seconds) of a process.
fn usage(pid: u32) -> (Rss, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().trim_end_matches(" kB").parse::<f64>().ok()))
            .unwrap_or(f64::NAN)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat[stat.rfind(')').map(|i| i + 2).unwrap_or(0)..].split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    // utime and stime are fields 14 and 15 of stat; USER_HZ is 100 on Linux.
    (Rss { all: kib("VmRSS:") / 1024.0, anon: kib("RssAnon:") / 1024.0 }, (ticks(11) + ticks(12)) / 100.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let host = Path::new(env!("CARGO_BIN_EXE_host"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let cluster = local_cluster::LocalCluster::start(local_cluster::ClusterOptions::on_host_rootfs()).await.unwrap();
    let kubeconfig = cluster.kubeconfig_path().to_path_buf();
    let git = git_server::GitServer::start(|t| t.starts_with("glcbt-job")).await;
    let sha = git.create_repo("app", &[("README.md", "bench\n")], None);
    let gitlab = FakeGitlab::start(&[RUNNER_TOKEN]).await;
    gitlab.set_hold(Duration::from_millis(200));

    // Baseline: `host run`, one job after the other, sources from a local checkout.
    let checkout = dir.path().join("checkout");
    git_server::git(
        dir.path(),
        &["clone", "-q", git.root.path().join("app.git").to_str().unwrap(), checkout.to_str().unwrap()],
    );
    std::fs::write(checkout.join("job.yml"), "image: alpine:3.20\nscript: [echo hi]\n").unwrap();
    let run_once = || {
        std::process::Command::new(host)
            .args(["run", "--kubeconfig"])
            .arg(&kubeconfig)
            .arg("--plugin-cache")
            .arg(dir.path().join(".cache"))
            .arg(checkout.join("job.yml"))
            .env("KEEL_PLUGIN_PATH", root.join("target/plugins"))
            .env_remove("KUBECONFIG")
            .output()
            .unwrap()
    };
    assert!(run_once().status.success(), "host run warm-up failed");
    let requests_before = cluster.request_count();
    let started = Instant::now();
    for _ in 0..RUNS {
        let out = run_once();
        assert!(out.status.success(), "host run failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let run_wall = started.elapsed().as_secs_f64() / RUNS as f64;
    let run_requests = (cluster.request_count() - requests_before) as f64 / RUNS as f64;

    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "concurrent = {JOBS}\ncheck_interval = 1\n[[runners]]\nname = \"bench\"\nurl = \"{}\"\ntoken = \"{RUNNER_TOKEN}\"\nexecutor = \"kubernetes\"\nrequest_concurrency = 4\n",
            gitlab.url()
        ),
    )
    .unwrap();
    let mut serve = tokio::process::Command::new(host)
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--plugin-cache")
        .arg(dir.path().join(".cache"))
        .arg("--git-cache")
        .arg(dir.path().join("git-cache"))
        .env("KEEL_PLUGIN_PATH", root.join("target/plugins"))
        .env("KEEL_LOG", "warn")
        .env_remove("KUBECONFIG")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = serve.id().unwrap();
    let payload = |name: &str, script: &str| {
        let mut p = fake::job_payload(name);
        p["git_info"] = json!({"repo_url": git.job_url("app"), "ref": "main", "sha": sha, "depth": 1, "refspecs": []});
        p["variables"] = json!([{"key": "CI_PROJECT_PATH", "value": "bench/app", "public": true}]);
        p["steps"] = json!([{"name": "script", "script": [script], "timeout": 3600}]);
        p
    };
    let finished = |id: u64| matches!(gitlab.job(id).state.as_str(), "success" | "failed");
    // One job first, so the serve side is warm too (verify, plugin cache, the connection).
    let warm = gitlab.enqueue(payload("warm", "echo hi"));
    while !finished(warm) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gitlab.job(warm).state, "success", "{}", String::from_utf8_lossy(&gitlab.job(warm).trace));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (idle_rss, _) = usage(pid);

    let requests_before = cluster.request_count();
    let queued_at = tokio::time::Instant::now();
    let script = format!("echo sleeping; sleep {SLEEP_SECS}");
    let ids: Vec<u64> = (0..JOBS).map(|n| gitlab.enqueue(payload(&format!("job-{n}"), &script))).collect();
    let sleeping = |id: &u64| String::from_utf8_lossy(&gitlab.job(*id).trace).contains("sleeping");
    while !ids.iter().all(sleeping) {
        assert!(queued_at.elapsed() < Duration::from_secs(SLEEP_SECS), "not all {JOBS} jobs were running in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_running = queued_at.elapsed();
    let (rss_a, cpu_a) = usage(pid);
    if let Some(to) = std::env::var_os("KEEL_BENCH_SMAPS") {
        // Where the memory is, mapping by mapping, for a closer look.
        let _ = std::fs::copy(format!("/proc/{pid}/smaps"), to);
    }
    let window = Duration::from_secs(8);
    tokio::time::sleep(window).await;
    let (rss_b, cpu_b) = usage(pid);
    while !ids.iter().all(|id| finished(*id)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failed = ids.iter().filter(|id| gitlab.job(**id).state != "success").count();
    let serve_requests = (cluster.request_count() - requests_before) as f64 / JOBS as f64;
    let traces = gitlab.calls(Api::Trace);
    let mut first_trace: Vec<f64> = ids
        .iter()
        .filter_map(|id| traces.iter().find(|c| c.job == Some(*id)).map(|c| (c.at - queued_at).as_secs_f64() * 1000.0))
        .collect();
    first_trace.sort_by(f64::total_cmp);
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = tokio::time::timeout(Duration::from_secs(60), serve.wait()).await;

    let rss = (rss_a.all + rss_b.all) / 2.0;
    let anon = (rss_a.anon + rss_b.anon) / 2.0;
    println!(
        "serve_load: {JOBS} jobs at once under `host serve` (each: git fetch at depth 1, then `sleep {SLEEP_SECS}`)"
    );
    println!("  all {JOBS} running after {:.1} s ({failed} failed)", all_running.as_secs_f64());
    println!(
        "  serve RSS: idle {:.1} MiB, with {JOBS} running {rss:.1} MiB -> {:.2} MiB per running job \
         (anonymous: idle {:.1}, running {anon:.1} -> {:.2} MiB per job)",
        idle_rss.all,
        (rss - idle_rss.all) / JOBS as f64,
        idle_rss.anon,
        (anon - idle_rss.anon) / JOBS as f64
    );
    println!(
        "  serve CPU while {JOBS} jobs sleep: {:.2}% of a core in all, {:.3}% per job",
        (cpu_b - cpu_a) / window.as_secs_f64() * 100.0,
        (cpu_b - cpu_a) / window.as_secs_f64() * 100.0 / JOBS as f64
    );
    println!(
        "  Kubernetes API requests per job: serve {serve_requests:.1}, `host run` {run_requests:.1} (baseline; ratio {:.2})",
        serve_requests / run_requests
    );
    println!("  `host run` of `echo hi`: {:.0} ms per job (baseline wall time)", run_wall * 1000.0);
    if !first_trace.is_empty() {
        println!(
            "  queued -> first trace patch: p50 {:.0} ms, p90 {:.0} ms (check_interval 1 s, trace interval 3 s)",
            percentile(&first_trace, 0.5),
            percentile(&first_trace, 0.9)
        );
    }
    cluster.stop().await;
}
