//! The serve loop against the fake GitLab with test pipelines: limits counted in the fake,
//! every job reported once, bad tokens, 403 back-off, drain and cancel, /metrics parsed by
//! Python's prometheus_client.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;
use crate::gitlab::fake::{Api, FakeGitlab, Fault, job_payload};
use crate::gitlab::tests::fast_reports;
use crate::gitlab::{ClientOptions, Features, RetryPolicy, Secret};

fn runner(name: &str, url: &str, token: &str, limit: Option<usize>, request_concurrency: usize) -> RunnerSettings {
    RunnerSettings {
        name: name.into(),
        url: url.into(),
        token: Secret::new(token),
        limit,
        request_concurrency,
        config: Arc::new(Runner::default()),
    }
}

fn settings(concurrent: usize, runners: Vec<RunnerSettings>) -> ServeSettings {
    ServeSettings {
        concurrent,
        check_interval: Duration::from_millis(20),
        shutdown_timeout: Duration::from_secs(30),
        listen_address: None,
        runners,
        features: Features::client(),
        system_id: "r_0123456789ab".into(),
        client: ClientOptions {
            retry: RetryPolicy {
                attempts: 5,
                min_delay: Duration::from_millis(5),
                max_delay: Duration::from_millis(50),
            },
            ..ClientOptions::default()
        },
        report: fast_reports(),
        unhealthy_after: 3,
        unhealthy_interval: Duration::from_secs(3600),
        force_grace: Duration::from_secs(10),
    }
}

/// Polls the fake until `done`; the bound only turns a hang into a failure.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(tokio::time::Instant::now() < give_up, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn expected_trace(id: u64) -> Vec<u8> {
    (0..5).map(|i| format!("job {id} line {i}\n")).collect::<String>().into_bytes()
}

/// A pipeline that writes five lines over ~50 ms, fails jobs whose name starts with `fail`,
/// and counts how many run at once.
fn counting_pipeline(now: Arc<AtomicUsize>, max: Arc<AtomicUsize>) -> Arc<dyn JobExecutor> {
    Arc::new(move |job: JobPayload, ctx: JobContext| {
        let (now, max) = (now.clone(), max.clone());
        async move {
            let running = now.fetch_add(1, Ordering::SeqCst) + 1;
            max.fetch_max(running, Ordering::SeqCst);
            ctx.reporter.set_stage("step_script");
            for line in expected_trace(job.id).split_inclusive(|&b| b == b'\n') {
                ctx.reporter.write(line);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            now.fetch_sub(1, Ordering::SeqCst);
            if job.job_info.name.starts_with("fail") {
                JobOutcome::failed(FailureReason::ScriptFailure, Some(1))
            } else {
                JobOutcome::success()
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_every_job_once_within_limit_and_concurrent() {
    let fake = FakeGitlab::start(&["glrt-a", "glrt-b"]).await;
    fake.set_hold(Duration::from_secs(30));
    let name = |i: usize| if i.is_multiple_of(4) { format!("fail{i}") } else { format!("ok{i}") };
    let mut ids: Vec<u64> = (0..8).map(|i| fake.enqueue(job_payload(&name(i)))).collect();
    let (now, max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let runners = vec![runner("a", &fake.url(), "glrt-a", Some(2), 2), runner("b", &fake.url(), "glrt-b", None, 3)];
    let controller = Controller::new();
    let metrics = Arc::new(Metrics::new());
    let serving = tokio::spawn(serve(
        settings(3, runners),
        counting_pipeline(now, max.clone()),
        controller.clone(),
        metrics.clone(),
    ));
    until("the first jobs reported", || fake.jobs().iter().all(|j| j.finals_accepted == 1)).await;
    // Every runner now polls with the last_update it was given; the fake holds those requests
    // (long polling) and the next jobs go out through them.
    until("held requests", || fake.held() >= 2).await;
    ids.extend((8..16).map(|i| fake.enqueue(job_payload(&name(i)))));
    until("every job reported", || fake.jobs().iter().all(|j| j.finals_accepted == 1)).await;
    controller.drain();
    let summary = serving.await.unwrap().unwrap();
    assert_eq!(summary, ServeSummary { jobs_finished: 16, jobs_abandoned: vec![] });

    for id in ids {
        let job = fake.job(id);
        assert_eq!(job.trace, expected_trace(id), "job {id}: the whole trace, once, in order");
        assert_eq!(job.finals_accepted, 1);
        let fails = job.payload["job_info"]["name"].as_str().unwrap().starts_with("fail");
        assert_eq!(job.state, if fails { "failed" } else { "success" });
    }
    assert!(fake.max_running_total() <= 3, "concurrent = 3, GitLab saw {}", fake.max_running_total());
    assert!(max.load(Ordering::SeqCst) <= 3);
    assert!(fake.max_running("glrt-a") <= 2, "limit = 2 for runner a");
    assert!(fake.max_in_flight("glrt-a") <= 2, "request_concurrency = 2 for a");
    assert!(fake.max_in_flight("glrt-b") <= 3, "request_concurrency = 3 for b");
    let held = fake.calls(Api::Request).into_iter().filter(|c| c.status == 201 && c.last_update.is_some()).count();
    assert!(held > 0, "jobs went out through held requests (long polling)");
    let text = metrics.render();
    assert!(text.contains("gitlab_runner_failed_jobs_total{failure_reason=\"script_failure\""), "{text}");
}

#[tokio::test]
async fn a_refused_token_names_its_runner_while_the_other_serves() {
    let fake = FakeGitlab::start(&["glrt-good"]).await;
    let id = fake.enqueue(job_payload("ok"));
    let runners = vec![
        runner("bad-one", &fake.url(), "glrt-revoked", None, 1),
        runner("good-one", &fake.url(), "glrt-good", None, 1),
    ];
    let controller = Controller::new();
    let metrics = Arc::new(Metrics::new());
    let (now, max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let serving =
        tokio::spawn(serve(settings(2, runners), counting_pipeline(now, max), controller.clone(), metrics.clone()));
    until("the job reported", || fake.job(id).finals_accepted == 1).await;
    assert!(metrics.ready());
    controller.drain();
    assert_eq!(serving.await.unwrap().unwrap().jobs_finished, 1);
    assert!(fake.calls(Api::Request).iter().all(|c| c.status != 403), "the refused runner never asked for jobs");

    let runners = vec![runner("only", &fake.url(), "glrt-revoked", None, 1)];
    let (now, max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let err = serve(settings(1, runners), counting_pipeline(now, max), Controller::new(), Arc::new(Metrics::new()))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "no runner can be served: runner \"only\": POST runners/verify: GitLab refused the runner token (403)"
    );
}

#[tokio::test]
async fn repeated_403_pauses_the_runner_for_the_unhealthy_interval() {
    let fake = FakeGitlab::start(&["glrt-a"]).await;
    for _ in 0..2 {
        fake.fault(Api::Request, Fault::Status(403));
    }
    let mut s = settings(1, vec![runner("a", &fake.url(), "glrt-a", None, 1)]);
    s.unhealthy_after = 2;
    s.unhealthy_interval = Duration::from_secs(1);
    let controller = Controller::new();
    let (now, max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let serving = tokio::spawn(serve(s, counting_pipeline(now, max), controller.clone(), Arc::new(Metrics::new())));
    until("a request after the pause", || fake.calls(Api::Request).len() >= 3).await;
    controller.drain();
    serving.await.unwrap().unwrap();
    let calls = fake.calls(Api::Request);
    assert_eq!((calls[0].status, calls[1].status), (403, 403));
    // check_interval is 20 ms; the pause after the second 403 is the unhealthy interval.
    assert!(calls[2].at - calls[1].at >= Duration::from_secs(1));
}

/// A pipeline that runs until cancelled: graceful -> "after_script" and job_canceled;
/// `ignore_graceful` waits for the immediate cancel instead.
fn cancellable_pipeline(ignore_graceful: bool, started: Arc<AtomicUsize>) -> Arc<dyn JobExecutor> {
    Arc::new(move |_job: JobPayload, ctx: JobContext| {
        let started = started.clone();
        async move {
            let mut cancel = ctx.reporter.cancel();
            ctx.reporter.write(b"started\n");
            started.fetch_add(1, Ordering::SeqCst);
            let wanted = if ignore_graceful { Cancel::Immediate } else { Cancel::Graceful };
            let got = *cancel.wait_for(|c| *c >= wanted).await.unwrap();
            if got == Cancel::Graceful {
                ctx.reporter.write(b"after_script\n");
            }
            JobOutcome::failed(FailureReason::JobCanceled, None)
        }
    })
}

#[tokio::test]
async fn sigterm_cancels_gracefully_and_reports_job_canceled() {
    let fake = FakeGitlab::start(&["glrt-a"]).await;
    let ids = [fake.enqueue(job_payload("x")), fake.enqueue(job_payload("y"))];
    let controller = Controller::new();
    let started = Arc::new(AtomicUsize::new(0));
    let s = settings(2, vec![runner("a", &fake.url(), "glrt-a", None, 2)]);
    let serving = tokio::spawn(serve(
        s,
        cancellable_pipeline(false, started.clone()),
        controller.clone(),
        Arc::new(Metrics::new()),
    ));
    until("both jobs running", || started.load(Ordering::SeqCst) == 2).await;
    controller.terminate();
    let summary = serving.await.unwrap().unwrap();
    assert_eq!(summary.jobs_finished, 2);
    for id in ids {
        let job = fake.job(id);
        assert_eq!(job.trace, b"started\nafter_script\n");
        assert_eq!((job.state.as_str(), job.finals_accepted), ("failed", 1));
        assert_eq!(job.updates.last().unwrap()["failure_reason"], "job_canceled");
    }
}

#[tokio::test]
async fn shutdown_timeout_escalates_to_an_immediate_cancel() {
    let fake = FakeGitlab::start(&["glrt-a"]).await;
    let id = fake.enqueue(job_payload("stubborn"));
    let controller = Controller::new();
    let started = Arc::new(AtomicUsize::new(0));
    let mut s = settings(1, vec![runner("a", &fake.url(), "glrt-a", None, 1)]);
    s.shutdown_timeout = Duration::from_millis(200);
    let serving = tokio::spawn(serve(
        s,
        cancellable_pipeline(true, started.clone()),
        controller.clone(),
        Arc::new(Metrics::new()),
    ));
    until("the job running", || started.load(Ordering::SeqCst) == 1).await;
    controller.terminate();
    let summary = serving.await.unwrap().unwrap();
    assert_eq!(summary, ServeSummary { jobs_finished: 1, jobs_abandoned: vec![] });
    let job = fake.job(id);
    assert_eq!(job.trace, b"started\n", "no after_script on an immediate cancel");
    assert_eq!(job.finals_accepted, 1, "still reported");
}

#[tokio::test]
async fn drain_lets_running_jobs_finish_and_takes_no_new_ones() {
    let fake = FakeGitlab::start(&["glrt-a"]).await;
    let first = fake.enqueue(job_payload("first"));
    let controller = Controller::new();
    let started = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let pipeline: Arc<dyn JobExecutor> = {
        let (started, release) = (started.clone(), release.clone());
        Arc::new(move |_job: JobPayload, ctx: JobContext| {
            let (started, release) = (started.clone(), release.clone());
            async move {
                let notified = release.notified();
                started.fetch_add(1, Ordering::SeqCst);
                notified.await;
                ctx.reporter.write(b"done\n");
                JobOutcome::success()
            }
        })
    };
    let s = settings(2, vec![runner("a", &fake.url(), "glrt-a", None, 1)]);
    let serving = tokio::spawn(serve(s, pipeline, controller.clone(), Arc::new(Metrics::new())));
    until("the job running", || started.load(Ordering::SeqCst) == 1).await;
    controller.drain();
    let second = fake.enqueue(job_payload("second"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    release.notify_waiters();
    let summary = serving.await.unwrap().unwrap();
    assert_eq!(summary.jobs_finished, 1);
    assert_eq!(fake.job(first).state, "success");
    assert_eq!(fake.job(second).state, "pending", "no job taken after the drain began");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_read_by_prometheus_client() {
    let fake = FakeGitlab::start(&["glrt-a"]).await;
    for name in ["ok1", "ok2", "fail3"] {
        fake.enqueue(job_payload(name));
    }
    fake.fault(Api::Request, Fault::Status(502));
    let controller = Controller::new();
    let metrics = Arc::new(Metrics::new());
    let (now, max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut s = settings(2, vec![runner("a", &fake.url(), "glrt-a", Some(5), 1)]);
    s.listen_address = None;
    let serving = tokio::spawn(serve(s, counting_pipeline(now, max), controller.clone(), metrics.clone()));
    until("three jobs reported", || fake.jobs().iter().all(|j| j.finals_accepted == 1)).await;

    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = stop.clone();
    let (address, http) =
        metrics::serve_http("127.0.0.1:0".parse().unwrap(), metrics.clone(), async move { stopped.notified().await })
            .await
            .unwrap();
    // The parser and the HTTP client are Python's, not ours.
    let script = r#"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
base = sys.argv[1]
ready = urllib.request.urlopen(base + "/readyz").status
text = urllib.request.urlopen(base + "/metrics").read().decode()
out = {"ready": ready, "samples": []}
for family in text_string_to_metric_families(text):
    for s in family.samples:
        out["samples"].append([family.name, family.type, s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let output = tokio::process::Command::new("python3")
        .args(["-c", script, &format!("http://{address}")])
        .output()
        .await
        .expect("python3 runs (installed by .ci/run)");
    assert!(output.status.success(), "python: {}", String::from_utf8_lossy(&output.stderr));
    let parsed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    stop.notify_one();
    http.await.unwrap();
    controller.drain();
    serving.await.unwrap().unwrap();

    assert_eq!(parsed["ready"], 200);
    let samples = parsed["samples"].as_array().unwrap();
    let value = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        samples.iter().find_map(|s| {
            let matches = s[2] == name && labels.iter().all(|(k, v)| s[3][*k] == *v);
            matches.then(|| s[4].as_f64().unwrap())
        })
    };
    // Python names a counter's family without `_total`, so look types up by sample name.
    let kind = |sample: &str| samples.iter().find(|s| s[2] == sample).map(|s| s[1].as_str().unwrap().to_string());
    assert_eq!(value("gitlab_runner_jobs_total", &[("runner", "a")]), Some(3.0));
    assert_eq!(
        value("gitlab_runner_failed_jobs_total", &[("runner", "a"), ("failure_reason", "script_failure")]),
        Some(1.0)
    );
    assert_eq!(value("gitlab_runner_job_duration_seconds_count", &[("runner", "a")]), Some(3.0));
    assert_eq!(kind("gitlab_runner_job_duration_seconds_count").as_deref(), Some("histogram"));
    assert_eq!(kind("gitlab_runner_jobs_total").as_deref(), Some("counter"));
    assert_eq!(
        value("gitlab_runner_jobs", &[("runner", "a"), ("state", "running"), ("stage", "step_script")]),
        Some(0.0)
    );
    assert_eq!(kind("gitlab_runner_jobs").as_deref(), Some("gauge"));
    assert_eq!(value("gitlab_runner_concurrent", &[]), Some(2.0));
    assert_eq!(value("gitlab_runner_limit", &[("runner", "a")]), Some(5.0));
    assert_eq!(value("gitlab_runner_version_info", &[("name", "keel")]), Some(1.0));
    let statuses = |endpoint: &str, status: &str| {
        value(
            "gitlab_runner_api_request_statuses_total",
            &[("runner", "a"), ("endpoint", endpoint), ("status", status)],
        )
    };
    assert_eq!(statuses("request_job", "201"), Some(3.0));
    assert_eq!(statuses("request_job", "502"), Some(1.0));
    assert_eq!(statuses("verify_runner", "200"), Some(1.0));
    assert!(statuses("patch_trace", "202").unwrap() >= 3.0);
    assert!(!metrics.ready(), "not ready once draining");
}
