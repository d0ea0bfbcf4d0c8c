//! `cache:` end to end with the real binary on the embedded cluster: under `host serve` through a
//! real S3 server on loopback (moto, request signatures checked), and under `host run` through
//! the local cache directory. The host moves the bytes; the store's secret key never shows in a
//! trace, a log line or a Pod object.

use std::time::Duration;

use local_cluster::ClusterOptions;
use serde_json::json;

#[path = "../support/mod.rs"]
mod support;
use support::git_server::GitServer;
use support::job::{Fixture, last_line, stdout};
use support::moto::Moto;
use support::{host_bin, kubectl, workspace_root};

#[path = "../../host/src/gitlab/fake.rs"]
#[allow(dead_code)]
mod fake;
use fake::FakeGitlab;

const RUNNER_TOKEN: &str = "glrt-keeltestrunner0001";

fn is_job_token(t: &str) -> bool {
    t.strip_prefix("glcbt-job").and_then(|r| r.strip_suffix("secret")).is_some_and(|id| id.parse::<u64>().is_ok())
}

fn payload(name: &str, repo_url: &str, sha: &str, script: &[&str], cache: serde_json::Value) -> serde_json::Value {
    let mut p = fake::job_payload(name);
    p["git_info"] = json!({"repo_url": repo_url, "ref": "main", "sha": sha, "ref_type": "branch", "depth": 1,
                           "refspecs": ["+refs/heads/main:refs/remotes/origin/main"]});
    p["image"] = json!({"name": "alpine:3.20"});
    p["steps"] = json!([{"name": "script", "script": script, "timeout": 3600, "when": "on_success"}]);
    p["variables"] = json!([{"key": "CI_PROJECT_PATH", "value": "group/app", "public": true},
                            {"key": "CI_JOB_NAME", "value": name, "public": true}]);
    p["cache"] = cache;
    p
}

fn serve_command(fx: &Fixture, config: &std::path::Path) -> tokio::process::Command {
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
        // Debug logs go to a file: a pipe nobody reads until the end would fill and stall the host.
        .env("KEEL_LOG", "debug")
        .stdout(std::fs::File::create(fx.dir.path().join("serve.log")).expect("log file"))
        .stderr(std::fs::File::create(fx.dir.path().join("serve.err")).expect("log file"))
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

async fn finished(gitlab: &FakeGitlab, id: u64) -> (String, String) {
    until("the job to finish", 240, || !matches!(gitlab.job(id).state.as_str(), "running" | "pending")).await;
    (gitlab.job(id).state, String::from_utf8_lossy(&gitlab.job(id).trace).into_owned())
}

fn assert_has(trace: &str, wants: &[&str]) {
    for want in wants {
        assert!(trace.contains(want), "{want:?} is not in the trace:\n{trace}");
    }
}

/// Saved by one job, restored by the next; `policy: pull` never uploads; a fallback key is used
/// when the main key has nothing; wrong credentials warn and the job still succeeds; the secret
/// key is nowhere but in the host's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_saves_and_restores_caches_through_s3() {
    let fx = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let moto = Moto::start().await;
    let git = GitServer::start(is_job_token).await;
    let sha = git.create_repo("app", &[("README.md", "cache\n")], None);
    let gitlab = FakeGitlab::start(&[RUNNER_TOKEN]).await;
    gitlab.set_hold(Duration::from_millis(300));
    let url = git.job_url("app");
    let runner = format!(
        "concurrent = 1\ncheck_interval = 1\n\n[[runners]]\nname = \"keel-e2e\"\nurl = \"{}\"\ntoken = \"{RUNNER_TOKEN}\"\n\
         executor = \"kubernetes\"\n",
        gitlab.url()
    );
    let config = fx.write("config.toml", &format!("{runner}{}", moto.config(&moto.secret_key)));
    let serve = serve_command(&fx, &config).spawn().expect("start host serve");
    let object = "ci/runner/keeltest/project/7/deps-main";

    // 1. Saved: the job waits a moment so its Pod can be read while it runs.
    let save = gitlab.enqueue(payload(
        "save",
        &url,
        &sha,
        &["mkdir -p vendor/sub", "echo cached-v1 > vendor/sub/lib.txt", "echo not-cached > other.txt", "sleep 3"],
        json!([{"key": "deps-main", "paths": ["vendor/"], "policy": "pull-push", "when": "on_success"}]),
    ));
    let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let job = gitlab.job(save);
        let trace = String::from_utf8_lossy(&job.trace).into_owned();
        assert!(matches!(job.state.as_str(), "running" | "pending"), "the job ended ({}) first:\n{trace}", job.state);
        let out = kubectl(fx.cluster.kubeconfig_path(), &["get", "pods", "-A", "-o", "name"]);
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "no pod for the save job ({}): {}\n{trace}",
            job.state,
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let objects = kubectl(fx.cluster.kubeconfig_path(), &["get", "pods,secrets", "-A", "-o", "yaml"]);
    let objects = String::from_utf8_lossy(&objects.stdout).into_owned();
    assert!(objects.contains("kind: Pod"), "{objects}");
    assert!(
        !objects.contains(&moto.secret_key) && !objects.contains(&moto.access_key),
        "a cache credential in:\n{objects}"
    );
    let (state, trace) = finished(&gitlab, save).await;
    assert_eq!(state, "success", "{trace}");
    let upload_line = format!("Uploading cache.zip to {}/keel-cache/{object}", moto.endpoint());
    assert_has(
        &trace,
        &[
            "Restoring cache",
            "Checking cache for deps-main...",
            "WARNING: file does not exist",
            "Failed to extract cache",
            "Saving cache for successful job",
            "Creating cache deps-main...",
            "vendor/: found 3 matching artifact files and directories",
            &upload_line,
            "Created cache",
        ],
    );
    let listed = moto.objects();
    assert_eq!(listed.keys().collect::<Vec<_>>(), [object], "{listed:?}");

    // The object is GitLab Runner's cache.zip: Python's zipfile reads it.
    let zip = fx.dir.path().join("cache.zip");
    let fetch = std::process::Command::new("python3")
        .args(["-c", "import boto3,sys,zipfile\ns3=boto3.client('s3',endpoint_url=sys.argv[1],region_name='us-east-1',aws_access_key_id=sys.argv[2],aws_secret_access_key=sys.argv[3])\ns3.download_file('keel-cache',sys.argv[4],sys.argv[5])\nz=zipfile.ZipFile(sys.argv[5])\nprint(sorted(z.namelist()), z.read('vendor/sub/lib.txt').decode().strip())"])
        .args([&moto.endpoint(), &moto.access_key, &moto.secret_key, object])
        .arg(&zip)
        .output()
        .expect("python3");
    assert_eq!(
        String::from_utf8_lossy(&fetch.stdout).trim(),
        "['vendor/', 'vendor/sub/', 'vendor/sub/lib.txt'] cached-v1",
        "{}",
        String::from_utf8_lossy(&fetch.stderr)
    );

    // 2. Restored by the next job; `policy: pull` does not upload what it changed.
    let pull = gitlab.enqueue(payload(
        "pull",
        &url,
        &sha,
        &["cat vendor/sub/lib.txt", "echo changed > vendor/sub/lib.txt", "echo new > vendor/new.txt"],
        json!([{"key": "deps-main", "paths": ["vendor/"], "policy": "pull", "when": "on_success"}]),
    ));
    let (state, trace) = finished(&gitlab, pull).await;
    assert_eq!(state, "success", "{trace}");
    assert_has(&trace, &["Checking cache for deps-main...", "Successfully extracted cache", "cached-v1"]);
    assert!(!trace.contains("Creating cache") && !trace.contains("Uploading cache.zip"), "{trace}");
    assert_eq!(moto.objects(), listed, "policy: pull uploaded");

    // 3. A key with nothing under it falls back to `fallback_keys`.
    let fallback = gitlab.enqueue(payload(
        "fallback",
        &url,
        &sha,
        &["cat vendor/sub/lib.txt"],
        json!([{"key": "feature-x", "paths": ["vendor/"], "policy": "pull", "when": "on_success",
                "fallback_keys": ["deps-main"]}]),
    ));
    let (state, trace) = finished(&gitlab, fallback).await;
    assert_eq!(state, "success", "{trace}");
    assert_has(
        &trace,
        &["Checking cache for feature-x...", "WARNING: file does not exist", "Checking cache for deps-main..."],
    );
    assert!(trace.find("Checking cache for deps-main").unwrap() < trace.find("cached-v1").unwrap(), "{trace}");

    // 4. Wrong credentials (the config is read again for each job): warnings, and the job runs.
    let wrong = "WrongSecretKeyValue123";
    std::fs::write(&config, format!("{runner}{}", moto.config(wrong))).unwrap();
    let denied = gitlab.enqueue(payload(
        "denied",
        &url,
        &sha,
        &["mkdir -p vendor", "echo job-ran > vendor/x.txt", "cat vendor/x.txt"],
        json!([{"key": "deps-main", "paths": ["vendor/"], "policy": "pull-push", "when": "on_success"}]),
    ));
    let (state, trace) = finished(&gitlab, denied).await;
    eprintln!("--- the job with wrong credentials\n{trace}");
    assert_eq!(state, "success", "{trace}");
    assert_has(&trace, &["job-ran", "Failed to extract cache", "Failed to create cache", "access denied"]);
    assert_eq!(moto.objects(), listed, "nothing was written with wrong credentials");

    let pid = serve.id().expect("pid").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let out = tokio::time::timeout(Duration::from_secs(120), serve.wait_with_output())
        .await
        .expect("host serve did not stop after SIGTERM")
        .expect("host serve output");
    assert!(out.status.success(), "host serve exited {:?}", out.status);
    let log = ["serve.log", "serve.err"].map(|f| std::fs::read_to_string(fx.dir.path().join(f)).unwrap()).concat();
    assert!(log.contains("cache.save") || log.contains("Created cache") || log.len() > 1000, "debug logs were written");
    for id in [save, pull, fallback, denied] {
        let trace = String::from_utf8_lossy(&gitlab.job(id).trace).into_owned();
        for secret in [moto.secret_key.as_str(), wrong] {
            assert!(!trace.contains(secret), "the secret key in job {id}'s trace:\n{trace}");
        }
    }
    for secret in [moto.secret_key.as_str(), wrong] {
        assert!(!log.contains(secret), "the secret key in the log:\n{log}");
    }
    fx.assert_clean().await;
}

/// `host run`: the local cache directory, a key from `files:`; saved by one run and restored
/// by the next, a changed file means a new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_saves_and_restores_a_files_keyed_cache_locally() {
    let fx = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    fx.write("proj/Cargo.lock", "lock v1\n");
    let job = fx.write(
        "proj/job.yml",
        "image: alpine:3.20\n\
         cache:\n  key:\n    files: [Cargo.lock]\n    prefix: $CI_JOB_NAME\n  paths: [deps/]\n\
         script:\n  - cat deps/built.txt 2>/dev/null || echo nothing-cached\n  - mkdir -p deps && echo built-once > deps/built.txt\n",
    );
    let out = fx.run(&job, &[]).await;
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert_has(&text, &["\nnothing-cached\n", "Creating cache job-", "Created cache"]);
    let cache_dir = fx.dir.path().join("proj/.keel/cache/project/1");
    let keys: Vec<String> = std::fs::read_dir(&cache_dir)
        .expect("the cache directory beside the job file")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].starts_with("job-") && cache_dir.join(&keys[0]).join("cache.zip").exists(), "{keys:?}");

    let out = fx.run(&job, &[]).await;
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert_has(
        &text,
        &[&format!("Checking cache for {}...", keys[0]), "Successfully extracted cache", "\nbuilt-once\n"],
    );
    assert!(!text.contains("\nnothing-cached\n"), "{text}");
    assert!(text.contains("Copied 2 files"), "only Cargo.lock and job.yml, not .keel/, are sources:\n{text}");

    // Another lock file, another key: nothing to restore, and a second archive.
    fx.write("proj/Cargo.lock", "lock v2\n");
    let other = fx.dir.path().join("elsewhere");
    let out = fx.run(&job, &["--cache-dir", other.to_str().unwrap()]).await;
    assert_eq!(last_line(&out), "Job succeeded");
    assert!(stdout(&out).contains("\nnothing-cached\n"));
    assert!(other.join("project/1").read_dir().unwrap().count() == 1);
    fx.assert_clean().await;
}

/// A pipeline's jobs share the cache: `build` pushes it, `test` (a later stage) pulls it and
/// `policy: pull` leaves what it changed unsaved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelines_jobs_share_the_cache() {
    let fx = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let file = fx.write(
        "pipe/.gitlab-ci.yml",
        "stages: [build, test]\nimage: alpine:3.20\n\
         build:\n  stage: build\n  cache: {key: deps, paths: [deps/], policy: push}\n\
         \x20 script:\n    - mkdir -p deps && echo from-build > deps/x.txt\n\
         test:\n  stage: test\n  cache: {key: deps, paths: [deps/], policy: pull}\n\
         \x20 script:\n    - cat deps/x.txt\n    - echo changed > deps/x.txt\n",
    );
    let out = fx.run(&file, &[]).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_has(
        &text,
        &["Creating cache deps...", "Not downloading cache deps due to policy", "Successfully extracted cache"],
    );
    assert_has(&text, &["\nfrom-build\n", "Not uploading cache deps due to policy"]);
    let zip = fx.dir.path().join("pipe/.keel/cache/project/1/deps/cache.zip");
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&zip).expect("the pipeline's cache")).unwrap();
    let mut x = String::new();
    std::io::Read::read_to_string(&mut archive.by_name("deps/x.txt").unwrap(), &mut x).unwrap();
    assert_eq!(x, "from-build\n", "policy: pull saved nothing");
    fx.assert_clean().await;
}

/// `cache:untracked`: what the job made is cached, what the sources brought is not; the next
/// run gets it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untracked_files_are_cached_and_sources_are_not() {
    let fx = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    fx.write("proj/kept.txt", "a source\n");
    let job = fx.write(
        "proj/job.yml",
        "image: alpine:3.20\ncache: {key: made, untracked: true}\n\
         script:\n  - cat sub/made.txt 2>/dev/null || echo nothing-cached\n  - mkdir -p sub && echo made-here > sub/made.txt\n",
    );
    let out = fx.run(&job, &[]).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_has(
        &text,
        &["\nnothing-cached\n", "untracked: found 1 matching artifact files and directories", "Created cache"],
    );
    let zip = fx.dir.path().join("proj/.keel/cache/project/1/made/cache.zip");
    let archive = zip::ZipArchive::new(std::fs::File::open(&zip).expect("the untracked cache")).unwrap();
    let names: Vec<&str> = archive.file_names().collect();
    assert_eq!(names, ["sub/made.txt"], "only what the job made");

    let out = fx.run(&job, &[]).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_has(&text, &["Successfully extracted cache", "\nmade-here\n"]);
    fx.assert_clean().await;
}
