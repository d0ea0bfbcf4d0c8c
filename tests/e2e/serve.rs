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
    let fx = Fixture::new(ClusterOptions::default()).await;
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

    let ok = gitlab.enqueue(payload(
        "build",
        &url,
        &sha,
        &[
            "cat README.md lib/lib.txt kept.log",
            "echo \"head=$(cat .git/HEAD)\"",
            "echo \"commits=$(ls .git/shallow >/dev/null && echo shallow)\"",
            "echo \"token=$CI_JOB_TOKEN derived=$DERIVED\"",
            "echo \"dir=$CI_PROJECT_DIR sha=$CI_COMMIT_SHA\"",
        ],
        &[],
        json!([
            {"key": "GIT_SUBMODULE_STRATEGY", "value": "normal", "public": true},
            {"key": "SECRET", "value": "s3cr3t-value-42", "public": false, "masked": true},
            {"key": "DERIVED", "value": "x-$SECRET", "public": true}
        ]),
    ));
    let failing = gitlab.enqueue(payload("fail", &url, &sha, &["echo failing", "exit 3"], &[], json!([])));
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
    let serve = tokio::process::Command::new(host_bin())
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--kubeconfig")
        .arg(fx.cluster.kubeconfig_path())
        .arg("--plugin-cache")
        .arg(fx.dir.path().join(".cache"))
        .env_remove("KUBECONFIG")
        .env("KEEL_PLUGIN_PATH", workspace_root().join("target/plugins"))
        .env("KEEL_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start host serve");

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
        "Checking out",
    ] {
        assert!(trace.contains(want), "{want:?} is not in the trace:\n{trace}");
    }
    assert!(!trace.contains("glcbt-") && !trace.contains("s3cr3t"), "a secret in the trace:\n{trace}");

    let job = gitlab.job(failing);
    assert_eq!(job.state, "failed");
    let last = job.updates.last().expect("a final update");
    assert_eq!(last["failure_reason"], "script_failure", "{last}");
    assert_eq!(last["exit_code"], 3, "{last}");

    let job = gitlab.job(cancelled);
    let trace = trace_text(&gitlab, cancelled);
    assert_eq!(job.state, "failed", "{trace}");
    assert_eq!(job.updates.last().unwrap()["failure_reason"], "job_canceled");
    assert!(trace.contains("after-script-ran"), "after_script did not run:\n{trace}");
    assert!(trace.contains("Skipping Git repository setup"), "{trace}");

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
