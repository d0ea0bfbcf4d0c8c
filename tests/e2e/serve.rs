//! `host serve` end to end: the real binary takes jobs from a fake GitLab (written from the wire
//! facts: GitLab itself cannot run here), fetches each job's sources from a real git server
//! (`git http-backend`) with the job token, runs them on the embedded cluster, and reports trace
//! and result; GitLab's cancel runs after_script; SIGTERM stops it; nothing is left behind and
//! no token shows in a trace, a log line or a Pod object.

use std::time::Duration;

use local_cluster::ClusterOptions;
use serde_json::json;

#[path = "../support/mod.rs"]
mod support;
use support::git_server::GitServer;
use support::job::Fixture;
use support::{host_bin, kubectl, workspace_root};

#[path = "../../host/src/gitlab/fake.rs"]
#[allow(dead_code)]
mod fake;
use fake::FakeGitlab;

const RUNNER_TOKEN: &str = "glrt-keeltestrunner0001";

fn is_job_token(t: &str) -> bool {
    t.strip_prefix("glcbt-job").and_then(|r| r.strip_suffix("secret")).is_some_and(|id| id.parse::<u64>().is_ok())
}

fn payload(
    name: &str,
    repo_url: &str,
    sha: &str,
    script: &[&str],
    after: &[&str],
    vars: serde_json::Value,
) -> serde_json::Value {
    let mut p = fake::job_payload(name);
    p["git_info"] = json!({"repo_url": repo_url, "ref": "main", "sha": sha, "ref_type": "branch", "depth": 1,
                           "refspecs": ["+refs/heads/main:refs/remotes/origin/main"]});
    p["image"] = json!({"name": "alpine:3.20"});
    let mut steps = vec![json!({"name": "script", "script": script, "timeout": 3600, "when": "on_success"})];
    if !after.is_empty() {
        steps.push(json!({"name": "after_script", "script": after, "timeout": 300, "when": "always"}));
    }
    p["steps"] = json!(steps);
    let mut variables = vec![
        json!({"key": "CI_PROJECT_PATH", "value": "group/app", "public": true}),
        json!({"key": "CI_JOB_NAME", "value": name, "public": true}),
    ];
    if let Some(extra) = vars.as_array() {
        variables.extend(extra.iter().cloned());
    }
    p["variables"] = json!(variables);
    p
}

/// `host serve` on the fixture's cluster, with its plugin and git caches in the fixture's dir.
fn serve_command(fx: &Fixture, config: &std::path::Path, log: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(host_bin());
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .arg("--kubeconfig")
        .arg(fx.cluster.kubeconfig_path())
        .arg("--plugin-cache")
        .arg(fx.dir.path().join(".cache"))
        .arg("--git-cache")
        .arg(fx.dir.path().join("git-cache"))
        .env_remove("KUBECONFIG")
        .env("KEEL_PLUGIN_PATH", workspace_root().join("target/plugins"))
        .env("KEEL_LOG", log)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn until(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(tokio::time::Instant::now() < give_up, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn trace_text(gitlab: &FakeGitlab, id: u64) -> String {
    String::from_utf8_lossy(&gitlab.job(id).trace).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_runs_gitlab_jobs_from_git_cancels_and_stops_cleanly() {
    // A real image for the job that asks for a user (the host's root filesystem has no users to
    // switch to).
    let images = tempfile::tempdir().unwrap();
    support::busybox_archive(images.path(), "keel-e2e/busybox:1");
    let fx = Fixture::new(ClusterOptions {
        images_from: Some(images.path().to_path_buf()),
        ..ClusterOptions::on_host_rootfs()
    })
    .await;
    let git = GitServer::start(is_job_token).await;
    let lib_sha = git.create_repo("lib", &[("lib.txt", "library v1\n")], None);
    let sha = git.create_repo(
        "app",
        &[("README.md", "hello from git\n"), (".gitignore", "*.log\n"), ("kept.log", "tracked anyway\n")],
        Some(("lib", &lib_sha)),
    );
    let gitlab = FakeGitlab::start(&[RUNNER_TOKEN]).await;
    gitlab.set_hold(Duration::from_millis(300));
    let url = git.job_url("app");

    let mut build = payload(
        "build",
        &url,
        &sha,
        &[
            "cat README.md lib/lib.txt kept.log",
            "echo \"head=$(cat .git/HEAD)\"",
            "echo \"commits=$(ls .git/shallow >/dev/null && echo shallow)\"",
            "echo \"token=$CI_JOB_TOKEN derived=$DERIVED\"",
            "echo \"dir=$CI_PROJECT_DIR sha=$CI_COMMIT_SHA\"",
            "echo custom=kltok-abc123xyz",
            // The service wrote its own variables where the job can compare them.
            "for i in $(seq 100); do [ -s /builds/svc-env ] && break; sleep 0.1; done",
            "[ \"$(cat /builds/svc-env)\" = \"svc-$SECRET|plain\" ] && echo service-env-ok",
        ],
        &[],
        json!([
            {"key": "GIT_SUBMODULE_STRATEGY", "value": "normal", "public": true},
            {"key": "SECRET", "value": "s3cr3t-value-42", "public": false, "masked": true},
            {"key": "DERIVED", "value": "x-$SECRET", "public": true}
        ]),
    );
    build["features"]["token_mask_prefixes"] = json!(["kltok-"]);
    build["services"] = json!([{
        "name": "alpine:3.20", "alias": "side",
        "command": ["sh", "-c", "echo \"$SVC_PASS|$SVC_PUB\" > /builds/svc-env; exec sleep 3600"],
        "variables": [{"key": "SVC_PASS", "value": "svc-$SECRET", "public": true},
                      {"key": "SVC_PUB", "value": "plain", "public": true}]
    }]);
    let ok = gitlab.enqueue(build);
    // `image:kubernetes:user` as GitLab sends it.
    let mut fail = payload("fail", &url, &sha, &["echo \"failing as $(id -u):$(id -g)\"", "exit 3"], &[], json!([]));
    fail["image"] = json!({"name": "keel-e2e/busybox:1", "executor_opts": {"kubernetes": {"user": "1000:1000"}}});
    let failing = gitlab.enqueue(fail);
    let cancelled = gitlab.enqueue(payload(
        "slow",
        &url,
        &sha,
        // Output keeps flowing, so GitLab's cancel comes back on a trace patch within ~3 s (an
        // idle job hears it with the keep-alive, every 30 s, as with GitLab Runner).
        &["echo started-slow", "while true; do sleep 1; echo tick; done"],
        &["echo after-script-ran"],
        json!([{"key": "GIT_STRATEGY", "value": "none", "public": true}]),
    ));

    let config = fx.write(
        "config.toml",
        &format!(
            "concurrent = 3\ncheck_interval = 1\nshutdown_timeout = 60\n\n\
             [[runners]]\nname = \"keel-e2e\"\nurl = \"{gl}\"\ntoken = \"{RUNNER_TOKEN}\"\nexecutor = \"kubernetes\"\n\n\
             [[runners]]\nname = \"revoked\"\nurl = \"{gl}\"\ntoken = \"glrt-revokedtoken000000\"\nexecutor = \"kubernetes\"\n",
            gl = gitlab.url()
        ),
    );
    let serve = serve_command(&fx, &config, "info").spawn().expect("start host serve");

    until("the two quick jobs to finish", 240, || {
        [ok, failing].iter().all(|id| matches!(gitlab.job(*id).state.as_str(), "success" | "failed"))
    })
    .await;
    until("the slow job to start its script", 120, || trace_text(&gitlab, cancelled).contains("started-slow")).await;

    // While it runs, its Pod object holds no token and no secret.
    let pods = kubectl(fx.cluster.kubeconfig_path(), &["get", "pods", "-A", "-o", "yaml"]);
    let pods = String::from_utf8_lossy(&pods.stdout).into_owned();
    assert!(pods.contains("kind: Pod"), "kubectl saw no pod:\n{pods}");
    for secret in [RUNNER_TOKEN, "glcbt-job", "s3cr3t-value-42"] {
        assert!(!pods.contains(secret), "{secret} is in a Pod object:\n{pods}");
    }
    gitlab.set_job_status(cancelled, "canceling");
    until("the cancelled job's final update", 120, || gitlab.job(cancelled).state != "running").await;

    let job = gitlab.job(ok);
    let trace = trace_text(&gitlab, ok);
    assert_eq!(job.state, "success", "{trace}");
    for want in [
        "hello from git",
        "library v1",
        "tracked anyway",
        &format!("head={sha}"),
        "commits=shallow",
        "token=[MASKED] derived=[MASKED]",
        &format!("dir=/builds/group/app sha={sha}"),
        "custom=kltok-[MASKED]",
        "service-env-ok",
        "Checking out",
    ] {
        assert!(trace.contains(want), "{want:?} is not in the trace:\n{trace}");
    }
    assert!(
        !trace.contains("glcbt-") && !trace.contains("s3cr3t") && !trace.contains("abc123xyz"),
        "a secret in the trace:\n{trace}"
    );

    let job = gitlab.job(failing);
    assert_eq!(job.state, "failed");
    assert!(trace_text(&gitlab, failing).contains("failing as 1000:1000"), "{}", trace_text(&gitlab, failing));
    let last = job.updates.last().expect("a final update");
    assert_eq!(last["failure_reason"], "script_failure", "{last}");
    assert_eq!(last["exit_code"], 3, "{last}");

    let job = gitlab.job(cancelled);
    let trace = trace_text(&gitlab, cancelled);
    assert_eq!(job.state, "failed", "{trace}");
    assert_eq!(job.updates.last().unwrap()["failure_reason"], "job_canceled");
    assert!(trace.contains("after-script-ran"), "after_script did not run:\n{trace}");
    assert!(trace.contains("Skipping Git repository setup"), "{trace}");

    // Both jobs went through one mirror of the repository on the host.
    let mirrors: Vec<_> = std::fs::read_dir(fx.dir.path().join("git-cache")).unwrap().flatten().collect();
    assert_eq!(mirrors.len(), 1, "one mirror per repository: {mirrors:?}");
    // Git saw only the jobs' own tokens; a request without one was refused, none let through.
    let seen = git.requests();
    assert!(seen.iter().any(|r| r.path.ends_with("/lib.git/info/refs")), "the submodule was not fetched: {seen:?}");
    assert!(seen.iter().filter(|r| r.status < 300).all(|r| r.token.as_deref().is_some_and(is_job_token)));

    // SIGTERM: stops asking, nothing running is left; the host exits on its own.
    let pid = serve.id().expect("pid").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let out = tokio::time::timeout(Duration::from_secs(120), serve.wait_with_output())
        .await
        .expect("host serve did not stop after SIGTERM")
        .expect("host serve output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- host serve stderr\n{stderr}");
    assert!(out.status.success(), "host serve exited {:?}", out.status);
    assert!(stderr.contains("revoked"), "the refused runner is not named:\n{stderr}");
    for secret in [RUNNER_TOKEN, "glrt-revokedtoken000000", "glcbt-job", "s3cr3t-value-42"] {
        assert!(!stderr.contains(secret), "{secret} in the log:\n{stderr}");
    }
    fx.assert_clean().await;
}

/// Pods of keel's jobs present at once on the cluster, the most seen (a watch, so no state is
/// missed between polls).
fn count_job_pods(
    client: kube::Client,
) -> (std::sync::Arc<std::sync::atomic::AtomicUsize>, tokio::task::JoinHandle<()>) {
    use futures::StreamExt;
    use kube::runtime::watcher::{self, Event};
    let max = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = max.clone();
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::all(client);
    let task = tokio::spawn(async move {
        let config = watcher::Config::default().labels("app.kubernetes.io/managed-by=keel");
        let mut events = watcher::watcher(pods, config).boxed();
        let mut present = std::collections::HashSet::new();
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Apply(p) | Event::InitApply(p)) => {
                    present.insert(p.metadata.uid.unwrap_or_default());
                }
                Ok(Event::Delete(p)) => {
                    present.remove(&p.metadata.uid.unwrap_or_default());
                }
                _ => {}
            }
            seen.fetch_max(present.len(), std::sync::atomic::Ordering::SeqCst);
        }
    });
    (max, task)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_jobs_at_concurrency_four_through_api_faults_then_sigquit_drains() {
    use fake::{Api, Fault};
    let fx = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let (max_pods, watching) = count_job_pods(fx.cluster.client().unwrap());
    let git = GitServer::start(is_job_token).await;
    // 128 KiB that compress poorly: what a fetch that carries the tree weighs.
    let mut state = 0x9e3779b97f4a7c15u64;
    let blob: String = (0..128 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'!' + (state % 90) as u8)
        })
        .collect();
    let sha = git.create_repo("app", &[("README.md", "twenty\n"), ("data.bin", &blob)], None);
    let gitlab = FakeGitlab::start(&[RUNNER_TOKEN]).await;
    gitlab.set_hold(Duration::from_millis(300));
    let url = git.job_url("app");
    let script = ["for i in 1 2 3 4 5; do echo \"job $CI_JOB_ID line $i key=$KEY\"; sleep 0.1; done"];
    let key = json!([{"key": "KEY", "value": "masked-key-9137", "public": false, "masked": true}]);
    let ids: Vec<(u64, bool)> = (0..20)
        .map(|n| {
            let fails = n % 5 == 4;
            let mut lines: Vec<&str> = script.to_vec();
            if fails {
                lines.push("exit 7");
            }
            (gitlab.enqueue(payload(&format!("job-{n}"), &url, &sha, &lines, &[], key.clone())), fails)
        })
        .collect();
    // Bursts the client must ride out: 429 with Retry-After and 502s asking for jobs, a 416 and
    // 502s on the trace, 502s on updates.
    gitlab.fault(Api::Request, Fault::RetryAfter(429, 1));
    for _ in 0..3 {
        gitlab.fault(Api::Request, Fault::Status(502));
        gitlab.fault(Api::Trace, Fault::Status(502));
        gitlab.fault(Api::Update, Fault::Status(502));
    }
    gitlab.fault(Api::Trace, Fault::RangeMismatch);

    let port = free_port();
    let config = fx.write(
        "config.toml",
        &format!(
            "concurrent = 4\ncheck_interval = 1\nlisten_address = \"127.0.0.1:{port}\"\n\n\
             [[runners]]\nname = \"keel-e2e\"\nurl = \"{}\"\ntoken = \"{RUNNER_TOKEN}\"\nexecutor = \"kubernetes\"\nlimit = 4\n",
            gitlab.url()
        ),
    );
    let serve = serve_command(&fx, &config, "warn").spawn().expect("start host serve");

    until("all twenty jobs to be reported", 600, || ids.iter().all(|(id, _)| gitlab.job(*id).finals_accepted > 0))
        .await;
    for (id, fails) in &ids {
        let job = gitlab.job(*id);
        let trace = String::from_utf8_lossy(&job.trace).into_owned();
        assert_eq!(job.finals_accepted, 1, "job {id} reported {} times", job.finals_accepted);
        assert_eq!(job.state, if *fails { "failed" } else { "success" }, "job {id}:\n{trace}");
        let last = job.updates.last().unwrap();
        if *fails {
            assert_eq!(last["failure_reason"], "script_failure");
            assert_eq!(last["exit_code"], 7);
        }
        // Complete, once, in order, masked.
        let positions: Vec<usize> = (1..=5)
            .map(|i| {
                let line = format!("job {id} line {i} key=[MASKED]");
                assert_eq!(trace.matches(&line).count(), 1, "{line:?} not exactly once in job {id}:\n{trace}");
                trace.find(&line).unwrap()
            })
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "job {id}'s lines out of order:\n{trace}");
        assert!(!trace.contains("masked-key-9137") && !trace.contains("glcbt-"), "a secret in job {id}:\n{trace}");
    }
    let most = max_pods.load(std::sync::atomic::Ordering::SeqCst);
    // The tree crossed from GitLab once, into the host's mirror; later jobs were sent no objects.
    let packs: Vec<usize> =
        git.requests().iter().filter(|r| r.path.ends_with("/git-upload-pack")).map(|r| r.bytes).collect();
    eprintln!("git-upload-pack responses for 20 jobs (bytes): {packs:?}");
    assert_eq!(packs.iter().filter(|b| **b > 64 * 1024).count(), 1, "{packs:?}");
    let faults: Vec<u16> = [Api::Request, Api::Trace, Api::Update]
        .iter()
        .flat_map(|a| gitlab.calls(*a))
        .map(|c| c.status)
        .filter(|s| *s >= 400)
        .collect();
    eprintln!("at most {most} job pods at once; GitLab answered {faults:?}");
    assert!((2..=4).contains(&most), "{most} job pods at once (concurrent = 4)");
    assert!(gitlab.max_running(RUNNER_TOKEN) <= 4);

    // /metrics, read by Prometheus' own Python parser.
    let script = r#"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen(sys.argv[1] + "/metrics").read().decode()
out = {}
for family in text_string_to_metric_families(text):
    for s in family.samples:
        key = s.name + "".join("|%s=%s" % kv for kv in sorted(s.labels.items()))
        out[key] = s.value
print(json.dumps(out))
"#;
    let output = tokio::process::Command::new("python3")
        .args(["-c", script, &format!("http://127.0.0.1:{port}")])
        .output()
        .await
        .expect("python3 runs (installed by .ci/run)");
    assert!(output.status.success(), "python: {}", String::from_utf8_lossy(&output.stderr));
    let samples: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(samples["gitlab_runner_jobs_total|runner=keel-e2e"], 20.0, "{samples}");
    assert_eq!(
        samples["gitlab_runner_failed_jobs_total|failure_reason=script_failure|runner=keel-e2e"], 4.0,
        "{samples}"
    );
    assert_eq!(samples["gitlab_runner_concurrent"], 4.0, "{samples}");
    // keel's own: every job's pod start, and the strategy plugin's calls (prepare + stages).
    assert_eq!(samples["keel_pod_start_duration_seconds_count"], 20.0, "{samples}");
    let strategy_calls = samples["keel_plugin_call_duration_seconds_count|plugin=attach|role=execution-strategy"]
        .as_f64()
        .unwrap_or_default();
    assert!(strategy_calls >= 40.0, "{strategy_calls} strategy calls for 20 jobs: {samples}");

    // SIGQUIT drains: the running job finishes and is reported, nothing new is taken, exit 0.
    let draining = gitlab.enqueue(payload(
        "drained",
        &url,
        &sha,
        &["echo drain-started", "sleep 3", "echo drain-finished"],
        &[],
        json!([]),
    ));
    until("the drained job to start", 120, || trace_text(&gitlab, draining).contains("drain-started")).await;
    let pid = serve.id().expect("pid").to_string();
    assert!(std::process::Command::new("kill").args(["-QUIT", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let late = gitlab.enqueue(payload("late", &url, &sha, &["echo late"], &[], json!([])));
    let out = tokio::time::timeout(Duration::from_secs(120), serve.wait_with_output())
        .await
        .expect("host serve did not stop after SIGQUIT")
        .expect("host serve output");
    assert!(out.status.success(), "host serve exited {:?}:\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    assert_eq!(gitlab.job(draining).state, "success", "{}", trace_text(&gitlab, draining));
    assert!(trace_text(&gitlab, draining).contains("drain-finished"));
    assert_eq!(gitlab.job(late).state, "pending", "a job was taken while draining");
    watching.abort();
    fx.assert_clean().await;
}

/// Artifacts and dependencies: `build` writes files, its artifacts (`out/` less `out/*.log`, and
/// a report) go up as a zip that Python's `zipfile` reads back exactly; `test` lists `build` in
/// its dependencies and finds its files in the project directory before its script runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_uploads_artifacts_and_extracts_dependencies() {
    let fx = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let git = GitServer::start(is_job_token).await;
    let sha = git.create_repo("app", &[("README.md", "artifacts\n")], None);
    let gitlab = FakeGitlab::start(&[RUNNER_TOKEN]).await;
    gitlab.set_hold(Duration::from_millis(300));
    let url = git.job_url("app");

    let mut build = payload(
        "build",
        &url,
        &sha,
        &[
            "mkdir -p out/sub",
            "printf 'app v1\\n' > out/app",
            "printf 'deep\\n' > out/sub/deep.txt",
            "echo noise > out/skip.log",
            "echo '<testsuite/>' > report.xml",
        ],
        &["echo after > out/after.txt"],
        json!([{"key": "OUT_DIR", "value": "out", "public": true}]),
    );
    // Variables are expanded in `name`, `paths` and `exclude`.
    build["artifacts"] = json!([
        {"name": "$CI_JOB_NAME-out", "paths": ["$OUT_DIR/", "report.xml", "missing/"], "exclude": ["${OUT_DIR}/*.log"],
         "when": "on_success", "expire_in": "1 week", "artifact_type": "archive", "artifact_format": "zip"},
        {"name": "junit", "paths": ["report.xml"], "when": "always", "artifact_type": "junit", "artifact_format": "gzip"}
    ]);
    let build = gitlab.enqueue(build);

    let config = fx.write(
        "config.toml",
        &format!(
            "concurrent = 2\ncheck_interval = 1\n\n\
             [[runners]]\nname = \"keel-e2e\"\nurl = \"{}\"\ntoken = \"{RUNNER_TOKEN}\"\nexecutor = \"kubernetes\"\n",
            gitlab.url()
        ),
    );
    let serve = serve_command(&fx, &config, "info").spawn().expect("start host serve");
    until("the build job to finish", 240, || {
        gitlab.job(build).state != "running" && gitlab.job(build).state != "pending"
    })
    .await;
    let job = gitlab.job(build);
    let trace = trace_text(&gitlab, build);
    assert_eq!(job.state, "success", "{trace}");
    for want in [
        "Uploading artifacts...",
        "out/: found 6 matching artifact files and directories",
        "report.xml: found 1 matching artifact files and directories",
        "WARNING: missing/: no matching files",
        "out/*.log: excluded 1 files",
        "Uploading artifacts as \"archive\" to coordinator... 201 Created",
    ] {
        assert!(trace.contains(want), "{want:?} is not in the trace:\n{trace}");
    }
    // after_script ran before the files were collected, as with GitLab Runner.
    assert!(trace.find("after_script").unwrap() < trace.find("Uploading artifacts...").unwrap(), "{trace}");
    assert_eq!(job.artifacts.len(), 2, "the archive and the junit report");
    // The report as GitLab Runner sends it: a gzip member per file, read here by Python's gzip.
    let junit = &job.artifacts[1];
    assert_eq!(
        (junit.filename.as_str(), junit.query.as_str()),
        ("junit.gz", "artifact_format=gzip&artifact_type=junit")
    );
    let gz_path = fx.dir.path().join("junit.gz");
    std::fs::write(&gz_path, &junit.bytes).unwrap();
    let read = std::process::Command::new("python3")
        .args(["-c", "import gzip, sys; sys.stdout.write(gzip.decompress(open(sys.argv[1], 'rb').read()).decode())"])
        .arg(&gz_path)
        .output()
        .expect("python3");
    assert_eq!(String::from_utf8_lossy(&read.stdout), "<testsuite/>\n", "{}", String::from_utf8_lossy(&read.stderr));
    assert!(trace.contains("Uploading artifacts as \"junit\" to coordinator... 201 Created"), "{trace}");
    let upload = &job.artifacts[0];
    assert_eq!(upload.filename, "build-out.zip");
    assert_eq!(upload.query, "artifact_format=zip&artifact_type=archive&expire_in=1+week");

    // An independent reader of the zip: Python's zipfile.
    let zip_path = fx.dir.path().join("artifacts.zip");
    std::fs::write(&zip_path, &upload.bytes).unwrap();
    let read = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import json, sys, zipfile\n\
             z = zipfile.ZipFile(sys.argv[1])\n\
             assert z.testzip() is None\n\
             print(json.dumps({n: (None if n.endswith('/') else z.read(n).decode()) for n in sorted(z.namelist())}))",
        )
        .arg(&zip_path)
        .output()
        .expect("python3");
    assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(
        listed,
        json!({"out/": null, "out/after.txt": "after\n", "out/app": "app v1\n", "out/sub/": null,
               "out/sub/deep.txt": "deep\n", "report.xml": "<testsuite/>\n"}),
    );

    // `test` depends on `build`: its artifacts are in the project directory before the script.
    let mut test = payload(
        "test",
        &url,
        &sha,
        &["cat out/app out/sub/deep.txt", "test ! -e out/skip.log && echo no-log", "cat README.md"],
        &[],
        json!([]),
    );
    test["dependencies"] = json!([{"id": build, "name": "build", "token": job.token,
                                   "artifacts_file": {"filename": "build-out.zip", "size": upload.bytes.len()}}]);
    let test = gitlab.enqueue(test);
    until("the test job to finish", 240, || !matches!(gitlab.job(test).state.as_str(), "running" | "pending")).await;
    let trace = trace_text(&gitlab, test);
    assert_eq!(gitlab.job(test).state, "success", "{trace}");
    let downloading = format!("Downloading artifacts for build ({build})...");
    for want in [downloading.as_str(), "app v1", "deep", "no-log", "artifacts"] {
        assert!(trace.contains(want), "{want:?} is not in the trace:\n{trace}");
    }
    assert!(!trace.contains("glcbt-"), "a token in the trace:\n{trace}");
    let downloads = gitlab.calls(fake::Api::DownloadArtifacts);
    assert_eq!(downloads.iter().map(|c| (c.job, c.status)).collect::<Vec<_>>(), [(Some(build), 200)]);

    // `when: on_failure` after a failing script; GitLab answers 413: the trace says so and the
    // job keeps its own failure (a successful job would fail as runner_system_failure).
    let mut failing = payload("fails", &url, &sha, &["echo partial > out.txt", "exit 4"], &[], json!([]));
    failing["artifacts"] = json!([{"paths": ["out.txt"], "when": "on_failure", "artifact_format": "zip"},
                                  {"paths": ["never.txt"], "when": "on_success", "artifact_format": "zip"}]);
    gitlab.fault(fake::Api::UploadArtifacts, fake::Fault::Status(413));
    let failing = gitlab.enqueue(failing);
    until("the failing job to finish", 240, || !matches!(gitlab.job(failing).state.as_str(), "running" | "pending"))
        .await;
    let job = gitlab.job(failing);
    let trace = trace_text(&gitlab, failing);
    assert_eq!(job.state, "failed", "{trace}");
    assert_eq!(job.updates.last().unwrap()["failure_reason"], "script_failure", "{trace}");
    assert!(trace.contains("out.txt: found 1 matching artifact files and directories"), "{trace}");
    assert!(trace.contains("413 Request Entity Too Large"), "{trace}");
    assert!(!trace.contains("never.txt"), "an on_success artifact after a failure:\n{trace}");
    assert!(job.artifacts.is_empty());

    let pid = serve.id().expect("pid").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let out = tokio::time::timeout(Duration::from_secs(120), serve.wait_with_output())
        .await
        .expect("host serve did not stop after SIGTERM")
        .expect("host serve output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "host serve exited {:?}:\n{stderr}", out.status);
    for secret in [RUNNER_TOKEN, "glcbt-job"] {
        assert!(!stderr.contains(secret), "{secret} in the log:\n{stderr}");
    }
    fx.assert_clean().await;
}
