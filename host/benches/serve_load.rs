//! `host serve` under load, against `host run` in the same run as the baseline.
//!
//! One embedded cluster (`LocalCluster`), one fake GitLab (the tests' fake of the runner API),
//! one real git server (`git http-backend`). JOBS jobs (`echo hi`, sources fetched from git at
//! depth 1) are queued at once for `host serve` with `concurrent = CONCURRENT`; the same job runs
//! RUNS times through `host run` (sources copied from a local checkout of the same commit) one
//! after the other. Printed: jobs per second both ways and their ratio, queued -> first trace
//! byte (p50/p90), the serve process's peak RSS, and GitLab API calls per job.
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

const JOBS: usize = 24;
const CONCURRENT: usize = 4;
const RUNS: usize = 6;
const RUNNER_TOKEN: &str = "glrt-keelbenchrunner0001";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches(" kB").parse::<f64>().ok()))
        })
        .flatten()
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let host = Path::new(env!("CARGO_BIN_EXE_host"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let cluster = local_cluster::LocalCluster::start(local_cluster::ClusterOptions::default()).await.unwrap();
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
    let started = Instant::now();
    for _ in 0..RUNS {
        let out = run_once();
        assert!(out.status.success(), "host run failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let run_rate = RUNS as f64 / started.elapsed().as_secs_f64();

    // `host serve` with CONCURRENT slots.
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "concurrent = {CONCURRENT}\ncheck_interval = 1\n[[runners]]\nname = \"bench\"\nurl = \"{}\"\ntoken = \"{RUNNER_TOKEN}\"\nexecutor = \"kubernetes\"\n",
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
        .env("KEEL_PLUGIN_PATH", root.join("target/plugins"))
        .env("KEEL_LOG", "warn")
        .env_remove("KUBECONFIG")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = serve.id().unwrap();
    let payload = |name: &str| {
        let mut p = fake::job_payload(name);
        p["git_info"] = json!({"repo_url": git.job_url("app"), "ref": "main", "sha": sha, "depth": 1, "refspecs": []});
        p["variables"] = json!([{"key": "CI_PROJECT_PATH", "value": "bench/app", "public": true}]);
        p
    };
    // One job first, so the serve side is warm too (verify, plugin cache, first connection).
    let warm = gitlab.enqueue(payload("warm"));
    while gitlab.job(warm).state != "success" {
        assert!(
            gitlab.job(warm).state != "failed",
            "warm-up job failed:\n{}",
            String::from_utf8_lossy(&gitlab.job(warm).trace)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let calls_before: usize = [Api::Request, Api::Update, Api::Trace].iter().map(|a| gitlab.calls(*a).len()).sum();
    let queued_at = tokio::time::Instant::now();
    let started = Instant::now();
    let ids: Vec<u64> = (0..JOBS).map(|n| gitlab.enqueue(payload(&format!("job-{n}")))).collect();
    loop {
        let done = ids.iter().filter(|id| matches!(gitlab.job(**id).state.as_str(), "success" | "failed")).count();
        if done == JOBS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let serve_rate = JOBS as f64 / started.elapsed().as_secs_f64();
    let failed = ids.iter().filter(|id| gitlab.job(**id).state != "success").count();
    let traces = gitlab.calls(Api::Trace);
    let mut first_trace: Vec<f64> = ids
        .iter()
        .filter_map(|id| traces.iter().find(|c| c.job == Some(*id)).map(|c| (c.at - queued_at).as_secs_f64() * 1000.0))
        .collect();
    first_trace.sort_by(f64::total_cmp);
    let calls_after: usize = [Api::Request, Api::Update, Api::Trace].iter().map(|a| gitlab.calls(*a).len()).sum();
    let rss = peak_rss_mib(pid);
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = tokio::time::timeout(Duration::from_secs(60), serve.wait()).await;

    println!("serve_load: {JOBS} jobs at concurrent={CONCURRENT} (fetched from git) vs {RUNS} sequential `host run`");
    println!("  host serve:  {serve_rate:.2} jobs/s ({failed} failed)");
    println!("  host run:    {run_rate:.2} jobs/s (baseline, one at a time)");
    println!("  ratio:       {:.2}x", serve_rate / run_rate);
    if !first_trace.is_empty() {
        println!(
            "  queued -> first trace patch: p50 {:.0} ms, p90 {:.0} ms (trace interval 3 s)",
            percentile(&first_trace, 0.5),
            percentile(&first_trace, 0.9)
        );
    }
    println!("  host serve peak RSS: {rss:.1} MiB");
    println!("  GitLab API calls per job: {:.1}", (calls_after - calls_before) as f64 / JOBS as f64);
    cluster.stop().await;
}
