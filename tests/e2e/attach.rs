//! The attach strategy (the default) end to end: the real `host` binary and the real
//! `attach.wasm` against the embedded cluster, with a TCP proxy between the host and the API
//! server that cuts every connection. Every test ends by checking that nothing of the job is left.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use local_cluster::ClusterOptions;
use tokio::io::AsyncReadExt;

#[path = "../support/mod.rs"]
mod support;
use support::job::*;
use support::{kubectl, succeeded};

/// Reads of the host's stdout, each with the moment it came.
type Chunks = Arc<Mutex<Vec<(Instant, Vec<u8>)>>>;

/// The host's stdout as it arrives: each read with the moment it came.
#[derive(Clone, Default)]
struct Recorded(Chunks, Arc<Mutex<Vec<u8>>>);

impl Recorded {
    fn start(mut child: tokio::process::Child) -> (Recorded, tokio::task::JoinHandle<std::process::ExitStatus>) {
        let rec = Recorded::default();
        let sink = rec.clone();
        let mut out = child.stdout.take().expect("stdout");
        if let Some(mut err) = child.stderr.take() {
            let sink = rec.1.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = err.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.lock().expect("lock").extend_from_slice(&buf[..n]);
                }
            });
        }
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match out.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink.0.lock().expect("lock").push((Instant::now(), buf[..n].to_vec())),
                }
            }
            child.wait().await.expect("wait for host")
        });
        (rec, task)
    }

    fn text(&self) -> String {
        let chunks = self.0.lock().expect("lock");
        String::from_utf8_lossy(&chunks.iter().flat_map(|(_, c)| c.clone()).collect::<Vec<u8>>()).into_owned()
    }

    /// Waits until the output contains `needle` (a test hanging here fails at 5 minutes).
    async fn wait_for(&self, needle: &str) {
        let until = Instant::now() + Duration::from_secs(300);
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < until,
                "never saw {needle:?} in:\n{}\n--- stderr:\n{}",
                self.text(),
                String::from_utf8_lossy(&self.1.lock().expect("lock"))
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// When each of the five dots after the dots command's echo arrived.
    fn dot_arrivals(&self) -> Vec<Instant> {
        let chunks = self.0.lock().expect("lock");
        let bytes: Vec<(Instant, u8)> = chunks.iter().flat_map(|(at, c)| c.iter().map(|b| (*at, *b))).collect();
        let text: Vec<u8> = bytes.iter().map(|(_, b)| *b).collect();
        let echo = b"done; echo\n";
        let Some(start) = text.windows(echo.len()).position(|w| w == echo) else { return Vec::new() };
        bytes[start + echo.len()..].iter().take_while(|(_, b)| *b == b'.').map(|(at, _)| *at).collect()
    }
}

const LINES: usize = 600;

fn long_job(code: u8) -> String {
    format!(
        "image: alpine:3.20\nvariables:\n  SECRET: {{value: \"piece-one-piece-two\", masked: true}}\nscript:\n\
         \x20 - for i in 1 2 3 4 5; do printf .; sleep 1; done; echo\n\
         \x20 - printf '%s' \"$(echo \"$SECRET\" | cut -c1-9)\"; sleep 0.5; printf '%s\\n' \"$(echo \"$SECRET\" | cut -c10-)\"\n\
         \x20 - i=1; while [ $i -le {LINES} ]; do echo \"line $i\"; i=$((i+1)); sleep 0.1; done\n\
         \x20 - exit {code}\n"
    )
}

/// The numbered lines in the trace, in the order they appear.
fn numbered(text: &str) -> Vec<usize> {
    text.lines().filter_map(|l| l.strip_prefix("line ")?.trim().parse().ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_twenty_connection_cuts_with_every_line_once_and_in_order() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let proxy = CuttingProxy::start(f.cluster.addr()).await;
    let via_proxy = proxy.kubeconfig(&f);
    let pass = f.write("pass/job.yml", &long_job(0));
    let fail = f.write("fail/job.yml", &long_job(7));
    let (pass_out, pass_task) = Recorded::start(f.command_via(&via_proxy, &pass, &[]).spawn().expect("spawn host"));
    let (fail_out, fail_task) = Recorded::start(f.command_via(&via_proxy, &fail, &[]).spawn().expect("spawn host"));
    pass_out.wait_for("line 1\n").await;
    fail_out.wait_for("line 1\n").await;
    let before = proxy.accepted();
    for _ in 0..20 {
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    let reconnects = proxy.accepted() - before;
    let (pass_status, fail_status) = (pass_task.await.expect("host"), fail_task.await.expect("host"));
    for (name, out, status, code) in [("pass", &pass_out, pass_status, 0), ("fail", &fail_out, fail_status, 1)] {
        let text = out.text();
        eprintln!("--- {name} (exit {status:?}, {reconnects} connections after the first cut):\n{text}");
        assert_eq!(status.code(), Some(code), "{name}: {text}");
        assert_eq!(numbered(&text), (1..=LINES).collect::<Vec<_>>(), "{name}: every line once, in order");
        assert!(!text.contains("piece-one-piece-two") && !text.contains("piece-two"), "{name}: secret leaked");
        assert!(text.contains("[MASKED]"), "{name}: {text}");
        // The dots came one by one: five separate arrivals, none of them in a burst with the
        // next (each gap is at least a quarter of the average gap).
        let dots = out.dot_arrivals();
        assert_eq!(dots.len(), 5, "{name}: dots {dots:?}");
        let gaps: Vec<Duration> = dots.windows(2).map(|w| w[1] - w[0]).collect();
        let mean = gaps.iter().sum::<Duration>() / gaps.len() as u32;
        assert!(gaps.iter().all(|g| *g * 4 >= mean), "{name}: dots arrived in bursts: {gaps:?}");
    }
    assert!(fail_out.text().trim_end().ends_with("ERROR: Job failed: exit code 7"), "{}", fail_out.text());
    assert!(pass_out.text().trim_end().ends_with("Job succeeded"), "{}", pass_out.text());
    assert!(reconnects >= 20, "the proxy saw only {reconnects} connections after the cuts began");
    f.assert_clean().await;
}

/// Host pid of the build container's PID 1 (the attach strategy's shell wrapper, `sh`) in the
/// cluster whose data dir is `data_dir` (tests run in parallel, each with its own cluster).
fn build_pid1(data_dir: &std::path::Path) -> Option<u32> {
    let data_dir = data_dir.display().to_string();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if comm.trim() != "sh" || !String::from_utf8_lossy(&cmd).contains("keel attach: no shell in the build image") {
            continue;
        }
        // Its sandbox (bwrap, an ancestor) names the cluster's data dir in its command line.
        let mut ancestor = pid;
        for _ in 0..4 {
            let status = std::fs::read_to_string(format!("/proc/{ancestor}/status")).unwrap_or_default();
            let Some(ppid) = status.lines().find_map(|l| l.strip_prefix("PPid:")?.trim().parse::<u32>().ok()) else {
                break;
            };
            let cmd = std::fs::read(format!("/proc/{ppid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(&data_dir) {
                return Some(pid);
            }
            ancestor = ppid;
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_pid1_killed_mid_stage_fails_the_job_with_the_reason() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let job = f.write("job.yml", "image: alpine:3.20\nscript:\n  - echo stage-started\n  - sleep 300\n");
    let (out, task) = Recorded::start(f.command(&job, &[]).spawn().expect("spawn host"));
    out.wait_for("stage-started\n").await;
    let pid = build_pid1(f.cluster.data_dir()).expect("the build container's PID 1");
    assert!(std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill").success());
    let status = task.await.expect("host");
    let text = out.text();
    eprintln!("{text}");
    assert_eq!(status.code(), Some(2), "a system failure: {text}");
    assert!(text.contains("container build terminated with exit code 137"), "{text}");
    f.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_mid_stage_stops_the_stage_in_the_pod_and_runs_after_script() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let job = f.write(
        "job.yml",
        "image: alpine:3.20\nscript:\n  - echo stage-started\n  - sleep 4242\n\
         after_script:\n  - echo after-cancel\n  - sleep 5\n  - echo after-done\n",
    );
    let child = f.command(&job, &[]).spawn().expect("spawn host");
    let host_pid = child.id().expect("pid");
    let (out, task) = Recorded::start(child);
    out.wait_for("stage-started\n").await;
    let pod = out
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("Running on ")?.split_whitespace().next().map(str::to_string))
        .expect("pod name in the trace");
    let ps = |what: &str| {
        succeeded(kubectl(f.cluster.kubeconfig_path(), &["exec", &pod, "-c", "build", "--", "ps", "-eo", "args"]), what)
    };
    assert!(ps("ps before the cancel").contains("sleep 4242"), "the stage is not running");
    std::process::Command::new("kill").args(["-INT", &host_pid.to_string()]).status().expect("kill -INT");
    out.wait_for("after-cancel\n").await;
    // While after_script runs, the stage's processes are gone from the pod.
    let processes = ps("ps during after_script");
    assert!(!processes.contains("sleep 4242"), "the stage still runs: {processes}");
    assert!(processes.contains("sleep 5"), "after_script is not running: {processes}");
    let status = task.await.expect("host");
    let text = out.text();
    eprintln!("{text}");
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(text.contains("after-done"), "{text}");
    assert!(text.trim_end().ends_with("ERROR: Job failed: canceled"), "{text}");
    f.assert_clean().await;
}

/// The part of a trace that the job's own commands produced (from the first stage on), with the
/// pod's name, which differs per run, taken out.
fn job_part(text: &str) -> String {
    let from = text.find("Executing \"step_script\"").unwrap_or(0);
    let pod = text.lines().find_map(|l| l.strip_prefix("Running on ")?.split_whitespace().next()).unwrap_or("?");
    text[from..].replace(pod, "<pod>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_attach_and_nsenter_give_the_same_trace_and_exit_code() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let job = f.write(
        "job.yml",
        "image: alpine:3.20\nvariables:\n  TOKEN: {value: \"tok-0123456789\", masked: true}\n  GREETING: hello\n\
         before_script:\n  - echo \"$GREETING from before_script\"\nscript:\n\
         \x20 - for i in $(seq 50); do echo \"line $i\"; done\n  - echo to-stderr >&2\n  - printf 'no newline'\n\
         \x20 - echo \"token $TOKEN\"\n  - test -d \"$CI_PROJECT_DIR\" && echo in-project\n  - exit 7\n\
         after_script:\n  - echo after\n",
    );
    let mut traces = Vec::new();
    for strategy in ["exec", "attach", "nsenter"] {
        let out = f.run(&job, &["--strategy", strategy]).await;
        traces.push((strategy, out.status.code(), job_part(&stdout(&out))));
    }
    let (_, code, reference) = &traces[0];
    assert_eq!(*code, Some(1), "{reference}");
    assert!(reference.contains("line 50\n") && reference.contains("[MASKED]") && reference.ends_with("exit code 7\n"));
    for (strategy, c, trace) in &traces[1..] {
        assert_eq!(c, code, "{strategy}");
        assert_eq!(trace, reference, "{strategy} differs from exec");
    }
    f.assert_clean().await;
}
