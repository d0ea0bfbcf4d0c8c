//! `host run` end to end: the real `host` binary with the real first-party plugins
//! (`target/plugins/*.wasm`) against the embedded cluster. Every test ends by checking that no
//! pod, secret, service or container process of the job is left.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use local_cluster::ClusterOptions;
use tokio::io::{AsyncBufReadExt, BufReader};

#[path = "../support/mod.rs"]
mod support;
use support::job::*;
use support::{host_bin, workspace_root};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_failure_and_after_script() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let ok = f.write("ok/job.yml", "image: alpine:3.20\nscript:\n  - echo hi\n");
    let out = f.run(&ok, &[]).await;
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(text.contains("$ echo hi\nhi\n"), "{text}");
    assert!(text.contains("Waiting for pod default/"), "{text}");
    assert_eq!(last_line(&out), "Job succeeded");

    let failing = f.write(
        "fail/job.yml",
        "image: alpine:3.20\nscript:\n  - echo before\n  - exit 3\n  - echo never\nafter_script:\n  - echo \"after ran\"\n",
    );
    let out = f.run(&failing, &[]).await;
    assert_eq!(out.status.code(), Some(1), "a script failure exits 1");
    let text = stdout(&out);
    assert!(text.contains("$ exit 3") && !text.contains("never"), "{text}");
    assert!(text.contains("after ran"), "after_script ran: {text}");
    assert_eq!(last_line(&out), "ERROR: Job failed: exit code 3");

    let before = f.write(
        "before/job.yml",
        "image: alpine:3.20\nbefore_script:\n  - sh -c 'exit 4'\nscript:\n  - echo script-ran\nafter_script: echo after-ran\n",
    );
    let out = f.run(&before, &[]).await;
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(!text.contains("script-ran") && text.contains("after-ran"), "{text}");
    assert_eq!(last_line(&out), "ERROR: Job failed: exit code 4");
    f.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_masked_and_never_in_the_pod_and_sources_are_copied() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    f.write("src/.gitignore", "ignored.txt\n");
    f.write("src/ignored.txt", "must not be copied\n");
    f.write("src/data/hello.txt", "hello from the sources\n");
    let job = f.write(
        "src/job.yml",
        "image: alpine:3.20\nvariables:\n  TOKEN: {value: \"tok-abcdef-123456\", masked: true}\n  PLAIN: visible\n\
         script:\n  - cat data/hello.txt\n  - test ! -e ignored.txt\n\
         \x20 - printf 'tok-abc'; sleep 1; printf 'def-123456\\n'\n  - echo \"$TOKEN\" | cut -c1-3\n  - echo \"plain is $PLAIN\"\n\
         \x20 - cat /proc/1/environ | tr '\\0' '\\n' | grep -c '^TOKEN=' || true\n",
    );
    let out = f.run(&job, &[]).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("hello from the sources"), "{text}");
    assert!(!text.contains("tok-abcdef-123456") && !text.contains("abcdef"), "secret leaked: {text}");
    assert!(text.contains("[MASKED]"), "{text}");
    assert!(text.contains("plain is visible"), "{text}");
    // The secret is not in the container's env either (only public variables are).
    assert!(text.contains("\n0\n"), "TOKEN in PID 1's environment: {text}");
    f.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_timeout_stops_the_stage_and_runs_after_script() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let job = f.write(
        "job.yml",
        "image: alpine:3.20\ntimeout: 3s\nscript:\n  - echo started\n  - sleep 300\nafter_script:\n  - echo after-timeout\n",
    );
    let out = f.run(&job, &[]).await;
    assert_eq!(out.status.code(), Some(3), "a timeout exits 3");
    let text = stdout(&out);
    assert!(text.contains("started") && text.contains("after-timeout"), "{text}");
    assert_eq!(last_line(&out), "ERROR: Job failed: execution took longer than 3 seconds");
    f.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_mid_stage_stops_it_runs_after_script_and_cleans_up() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let job = f.write(
        "job.yml",
        "image: alpine:3.20\nscript:\n  - echo stage-started\n  - sleep 300\nafter_script:\n  - echo after-cancel\n  - ps -o pid,args 2>/dev/null || ls /proc\n",
    );
    let mut child = f.command(&job, &[]).spawn().expect("spawn host");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = String::new();
    read_lines(&mut reader, &mut seen, Some("stage-started")).await;
    assert!(seen.contains("stage-started"), "{seen}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = child.id().expect("pid") as i32;
    std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status().expect("kill -INT");
    read_lines(&mut reader, &mut seen, None).await;
    let status = child.wait().await.expect("wait");
    eprintln!("{seen}");
    assert_eq!(status.code(), Some(130), "cancelled exits 130");
    assert!(seen.contains("after-cancel"), "{seen}");
    // The stage's `sleep 300` was stopped before after_script listed the processes.
    let after = seen.split("after-cancel").nth(1).unwrap_or_default();
    assert!(!after.contains("sleep 300"), "the stage still runs: {after}");
    assert!(seen.trim_end().ends_with("ERROR: Job failed: canceled"), "{seen}");
    f.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_failure_with_no_other_policy_fails_fast() {
    let f = Fixture::new(ClusterOptions {
        unavailable_images: vec!["registry.example.com/missing:1".into()],
        ..ClusterOptions::on_host_rootfs()
    })
    .await;
    let job = f.write(
        "job.yml",
        "image:\n  name: registry.example.com/missing:1\n  pull_policy: [always]\nscript: [echo never]\n",
    );
    let started = Instant::now();
    let out = f.run(&job, &[]).await;
    assert_eq!(out.status.code(), Some(2), "a pull failure is a system failure");
    let last = last_line(&out);
    assert!(last.starts_with("ERROR: Job failed (system failure): pod default/"), "{last}");
    assert!(last.contains("registry.example.com/missing:1") && last.contains("ErrImagePull"), "{last}");
    // Fails fast instead of waiting out poll_timeout (180 s); no tight bound (noisy machines).
    assert!(started.elapsed() < Duration::from_secs(120), "took {:?}", started.elapsed());
    f.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_container_config_error_and_a_pod_deleted_from_outside() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let config = f.write(
        "config.toml",
        &format!(
            "{CONFIG_HELPER}[[runners.kubernetes.pod_spec]]\nname = \"missing-secret\"\npatch_type = \"strategic\"\n\
             patch = '''\ncontainers:\n  - name: build\n    env:\n      - name: FROM_SECRET\n        valueFrom:\n          secretKeyRef: {{name: nope, key: k}}\n'''\n\
             [[runners.kubernetes.plugins]]\npath = \"{}\"\n",
            workspace_root().join("target/plugins/pod-spec.wasm").display()
        ),
    );
    let job = f.write("job.yml", "image: alpine:3.20\nscript: [echo never]\n");
    let out = f.run(&job, &["--config", config.to_str().expect("utf-8")]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(last_line(&out).contains("CreateContainerConfigError"), "{}", last_line(&out));

    // Deleted from outside mid-stage: the job fails at once with the reason.
    let job = f.write("job2.yml", "image: alpine:3.20\nscript:\n  - echo running\n  - sleep 300\n");
    let mut child = f.command(&job, &[]).spawn().expect("spawn host");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = String::new();
    read_lines(&mut reader, &mut seen, Some("running")).await;
    let pods: Api<Pod> = Api::namespaced(f.cluster.client().expect("client"), "default");
    let list = pods.list(&ListParams::default().labels("app.kubernetes.io/managed-by=keel")).await.expect("list");
    let name = list.items[0].metadata.name.clone().expect("name");
    pods.delete(&name, &Default::default()).await.expect("delete the pod");
    read_lines(&mut reader, &mut seen, None).await;
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait()).await.expect("host ends").expect("wait");
    eprintln!("{seen}");
    assert_eq!(status.code(), Some(2), "{seen}");
    assert!(seen.contains("(system failure)") && seen.contains(&name), "{seen}");
    f.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_killed_by_the_memory_limit_fails_the_job() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    if !f.cluster.node().memory_limits_enforced() {
        eprintln!("memory limits cannot be enforced on this node: OOM test not meaningful here");
        return;
    }
    let config = f.write("config.toml", &format!("{CONFIG_HELPER}memory_limit = \"64Mi\"\n"));
    let job = f.write(
        "job.yml",
        "image: alpine:3.20\nscript:\n  - echo filling\n  - head -c 400000000 /dev/zero | tail > /dev/null\n",
    );
    let out = f.run(&job, &["--config", config.to_str().expect("utf-8")]).await;
    assert_ne!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(text.contains("OOMKilled") || text.contains("exit code 137"), "{text}");
    f.assert_clean().await;
}

/// A config with one plugin `wasm` (from target/plugins) in `mode`, plus `extra` plugin keys.
fn fault_config(f: &Fixture, name: &str, wasm: &str, mode: &str, extra: &str) -> PathBuf {
    let path = workspace_root().join("target/plugins").join(wasm);
    f.write(
        name,
        &format!(
            "{CONFIG_HELPER}[[runners.kubernetes.plugins]]\npath = \"{}\"\n{extra}[runners.kubernetes.plugins.config]\nmode = \"{mode}\"\n",
            path.display()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_plugins_fail_the_job_as_system_failures() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let job = f.write("job.yml", "image: alpine:3.20\nscript: [echo hi]\n");
    let cases = [
        // A pod mutator that traps: nothing is created.
        (fault_config(&f, "trap.toml", "fixture-fault.wasm", "panic", ""), ["fixture-fault", "panics"]),
        // A strategy that loops forever inside wasm: its CPU budget ends it, cleanup still runs.
        (
            fault_config(&f, "loop.toml", "fixture-fault-strategy.wasm", "endless-loop", "timeout = \"1s\"\n"),
            ["fixture-fault-strategy", "time limit"],
        ),
        // A strategy reaching outside the job's pod is refused.
        (
            fault_config(&f, "foreign.toml", "fixture-fault-strategy.wasm", "foreign-container", ""),
            ["refused as expected", "NoSuchContainer"],
        ),
    ];
    for (config, wanted) in cases {
        let out = f.run(&job, &["--config", config.to_str().expect("utf-8")]).await;
        assert_eq!(out.status.code(), Some(2), "a plugin fault is a system failure");
        let last = last_line(&out);
        assert!(last.starts_with("ERROR: Job failed (system failure): "), "{last}");
        for w in wanted {
            assert!(last.contains(w), "{w:?} missing in {last}");
        }
    }
    f.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_strategy_connection_cut_mid_stage_fails_never_succeeds() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let job = f.write(
        "job.yml",
        "image: alpine:3.20\nscript:\n  - echo ticking\n  - for i in $(seq 600); do sleep 0.1; done\n  - echo finished\n",
    );
    let (status, text, failed_after) = run_and_cut_once(&f, &job, &["--strategy", "exec"]).await;
    eprintln!("{text}\nconnection cut -> job failed in {failed_after:?} (aim: < 5 s)");
    assert_eq!(status.code(), Some(2), "{text}");
    assert!(!text.contains("finished") && !text.contains("Job succeeded"), "{text}");
    assert!(text.contains("lost the connection"), "{text}");
    f.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_is_reachable_from_the_build_container() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let job = f.write(
        "job.yml",
        // The embedded node runs every image on the host's root filesystem, so python3 serves
        // and fetches here. Containers share the pod's network, so the build container reaches
        // the service on 127.0.0.1 (the embedded node does not write hostAliases into /etc/hosts).
        "image: alpine:3.20\nservices:\n  - name: python:3\n    alias: web\n    command: [\"sh\", \"-c\", \"mkdir -p /tmp/w && echo from-service > /tmp/w/index.html && exec python3 -m http.server 8080 -d /tmp/w\"]\n\
         script:\n  - cat /etc/hosts\n  - for i in $(seq 100); do python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/').read().decode())\" 2>/dev/null && exit 0; sleep 0.2; done; exit 1\n",
    );
    let out = f.run(&job, &[]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("from-service"), "{}", stdout(&out));
    f.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_runs_at_once_against_one_cluster() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let job = f.write("job.yml", "image: alpine:3.20\nscript:\n  - echo \"job $CI_JOB_ID\"\n");
    let runs: Vec<_> = (0..10).map(|_| f.command(&job, &[]).output()).collect();
    let outs = futures::future::join_all(runs).await;
    for out in outs {
        let out = out.expect("host");
        assert_eq!(out.status.code(), Some(0), "{}\n{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
        assert_eq!(last_line(&out), "Job succeeded");
    }
    f.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_cleanup_removes_what_a_killed_host_left() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let job = f.write("job.yml", "image: alpine:3.20\nscript:\n  - echo running\n  - sleep 300\n");
    let mut child = f.command(&job, &[]).spawn().expect("spawn host");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout")).lines();
    read_lines(&mut reader, &mut String::new(), Some("running")).await;
    child.kill().await.expect("kill -9");
    let out = tokio::process::Command::new(host_bin())
        .arg("cleanup")
        .arg("--kubeconfig")
        .arg(f.cluster.kubeconfig_path())
        .output()
        .await
        .expect("host cleanup");
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("pod/") && text.contains("secret/"), "{text}");
    // The pod's processes end with it; give the node a moment to finish the deletion.
    let client = f.cluster.client().expect("client");
    let pods: Api<Pod> = Api::all(client);
    for _ in 0..100 {
        if pods.list(&ListParams::default()).await.expect("list").items.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_cluster_configured_an_embedded_one_is_started_and_removed() {
    let home = tempfile::tempdir().expect("home");
    let dir = tempfile::tempdir().expect("dir");
    let job = dir.path().join("job.yml");
    std::fs::write(&job, "image: alpine:3.20\nscript: [echo embedded-ok]\n").expect("write");
    // No registry here: the embedded cluster is asked to run images on the host's root. Run
    // under a subreaper, which inherits whatever the host leaves as an orphan (a process it
    // started and did not wait for, alive or a zombie).
    let out = tokio::process::Command::new("python3")
        .args(["-c", SUBREAPER])
        .arg(host_bin())
        .args(["run", "--host-rootfs"])
        .arg(&job)
        .env("HOME", home.path())
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .await
        .expect("host run");
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("embedded-ok") && text.contains("the embedded cluster"), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("started an embedded one"), "said so on stderr");
    let left = processes_mentioning("keel-cluster-");
    assert!(left.iter().all(|p| !p.contains(&dir.path().display().to_string())), "{left:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("orphans: none\n"), "the host left processes it did not reap: {stderr}");
}

/// `python3 -c` program: runs its arguments as a child subreaper, then says on stderr which
/// processes were left to it (`orphans: none`, or their pids and states).
const SUBREAPER: &str = r#"
import ctypes, os, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
rc = subprocess.call(sys.argv[1:])
left = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        continue
    if fields[1] == str(os.getpid()):
        left.append(f"{pid} ({fields[0]})")
print("orphans: " + (", ".join(left) or "none"), file=sys.stderr)
sys.exit(rc)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pull_falls_back_to_the_next_policy() {
    let image = "registry.example.com/cached-only:1";
    let f = Fixture::new(ClusterOptions {
        cached_unpullable_images: vec![image.into()],
        ..ClusterOptions::on_host_rootfs()
    })
    .await;
    let job = f.write(
        "job.yml",
        &format!("image:\n  name: {image}\n  pull_policy: [always, if-not-present]\nscript: [echo ran-from-cache]\n"),
    );
    let out = f.run(&job, &[]).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("WARNING: Failed to pull image") && text.contains("\"Always\""), "{text}");
    assert!(text.contains("again with policy \"IfNotPresent\""), "{text}");
    assert!(text.contains("ran-from-cache"), "{text}");
    f.assert_clean().await;
}

/// A `host cluster up` in its own process (TLS, bearer token), reached only through the
/// kubeconfig it prints: the path a user with a real cluster takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_through_a_kubeconfig_against_a_tls_and_token_cluster() {
    let data = tempfile::tempdir().expect("data dir");
    let mut up = tokio::process::Command::new(host_bin())
        .args(["cluster", "up", "--host-rootfs", "--token", "e2e-secret-token", "--data-dir"])
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("host cluster up");
    let mut lines = BufReader::new(up.stdout.take().expect("stdout")).lines();
    let kubeconfig = PathBuf::from(lines.next_line().await.expect("read").expect("kubeconfig path"));
    let text = std::fs::read_to_string(&kubeconfig).expect("kubeconfig");
    assert!(text.contains("https://") && text.contains("e2e-secret-token"), "{text}");
    let dir = tempfile::tempdir().expect("dir");
    let job = dir.path().join("job.yml");
    std::fs::write(&job, "image: alpine:3.20\nscript: [echo over-tls]\n").expect("write");
    let out = tokio::process::Command::new(host_bin())
        .arg("run")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg(&job)
        .output()
        .await
        .expect("host run");
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("over-tls") && text.contains(&format!("from kubeconfig {}", kubeconfig.display())), "{text}");
    // Nothing of the job is left in that cluster either.
    let pods = support::kubectl(
        &kubeconfig,
        &["get", "pods,secrets,services", "-A", "-l", "app.kubernetes.io/managed-by=keel", "-o", "name"],
    );
    assert_eq!(support::succeeded(pods, "kubectl get").trim(), "");
    let pid = up.id().expect("pid");
    std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status().expect("kill");
    let _ = tokio::time::timeout(Duration::from_secs(30), up.wait()).await;
}

/// `host run .gitlab-ci.yml`: a three-stage pipeline, two jobs at a time. `build`'s artifacts
/// reach `test` through the local store; `early` (`needs: [build]`) runs before the test stage
/// has ended; a failing `allow_failure` job leaves the pipeline green; the `on_failure` job runs
/// only when something failed; `--job` runs a job and what it needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_runs_stages_needs_and_artifacts_through_the_local_store() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let pipeline = "stages: [build, test, deploy]\nimage: alpine:3.20\n\
        build:\n  stage: build\n  script:\n    - mkdir -p out && echo \"app v1\" > out/app && echo skip > out/skip.tmp\n\
        \x20   - echo '<testsuite/>' > report.xml && echo loose > loose.txt\n\
        \x20 artifacts:\n    paths: [out/]\n    exclude: [out/*.tmp, report.xml]\n    untracked: true\n\
        \x20   reports: {junit: report.xml}\n\
        test:\n  stage: test\n  script:\n    - cat out/app\n    - test ! -e out/skip.tmp\n    - sleep 4\n    - echo test-done\n\
        flaky:\n  stage: test\n  allow_failure: true\n  script: [exit 4]\n\
        early:\n  stage: deploy\n  needs: [build]\n  script: [\"echo early-sees-$(cat out/app)\"]\n\
        nothing-from-build:\n  stage: deploy\n  dependencies: []\n  script: [\"test ! -e out/app && echo no-artifacts\"]\n\
        on-fail:\n  stage: .post\n  when: on_failure\n  script: [echo on-failure-ran]\n\
        flavors:\n  stage: test\n  parallel: {matrix: [{FLAVOR: [a, b]}]}\n  script: [\"echo flavor-$FLAVOR-$CI_NODE_INDEX-of-$CI_NODE_TOTAL\"]\n\
        ruled-out:\n  script: [echo ruled-out-ran]\n  rules: [{if: '$NOPE == \"x\"'}]\n\
        ruled-in:\n  script: [echo ruled-in-ran]\n  rules: [{exists: [.gitlab-ci.yml], when: always}]\n";
    let file = f.write("project/.gitlab-ci.yml", pipeline);
    let out = f.run(&file, &["--jobs", "2"]).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    // Two jobs at once: each line is its job's, prefixed with the job's name.
    assert!(text.lines().any(|l| l.starts_with("test ") && l.ends_with("| app v1")), "{text}");
    for want in [
        "early-sees-app v1",
        "no-artifacts",
        "flavor-a-1-of-2",
        "flavor-b-2-of-2",
        "ruled-in-ran",
        "Pipeline succeeded",
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
    assert!(!text.contains("on-failure-ran"), "{text}");
    // `early` waited only for build: it finished while `test` still slept.
    let at = |s: &str| text.find(s).unwrap_or_else(|| panic!("{s:?} missing:\n{text}"));
    assert!(at("early-sees-") < at("test-done"), "{text}");
    let row = |job: &str| summary_row(&text, job);
    assert!(row("flaky").contains("failed (allowed)"), "{text}");
    assert!(row("on-fail").contains("skipped"), "{text}");
    assert!(!text.contains("ruled-out"), "rules left it out, not even in the table:\n{text}");
    assert!(summary_row(&text, "flavors:").contains("passed"), "matrix instances are `flavors: [a]`...:\n{text}");
    // The store keeps each job's trace and the archive, and ignores itself.
    let store = f.dir.path().join("project/.keel");
    assert!(std::fs::read_to_string(store.join("test/trace.log")).unwrap().contains("Job succeeded"));
    let zip = std::fs::read(store.join("build/artifacts.zip")).unwrap();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip)).expect("a zip");
    let names: Vec<String> = archive.file_names().map(str::to_string).collect();
    assert!(names.iter().any(|n| n == "out/app") && !names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    // `untracked`: what the job made outside `paths` (not the sources it was given), less `exclude`.
    assert!(names.iter().any(|n| n == "loose.txt"), "{names:?}");
    assert!(!names.iter().any(|n| n == ".gitlab-ci.yml" || n == "report.xml"), "{names:?}");
    let mut junit = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::MultiGzDecoder::new(std::fs::File::open(store.join("build/junit.gz")).unwrap()),
        &mut junit,
    )
    .unwrap();
    assert_eq!(junit, "<testsuite/>\n");
    let mut app = String::new();
    std::io::Read::read_to_string(&mut archive.by_name("out/app").unwrap(), &mut app).unwrap();
    assert_eq!(app, "app v1\n");

    // A failing build: its dependants are skipped, the on_failure job runs, the pipeline fails
    // with the job's status. `--job test` runs test and what it needs, nothing else.
    let failing = f.write("failing/.gitlab-ci.yml", &pipeline.replace("mkdir -p out", "exit 7; mkdir -p out"));
    let out = f.run(&failing, &["--jobs", "2"]).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("on-failure-ran") && text.contains("Pipeline failed"), "{text}");
    assert!(summary_row(&text, "test").contains("skipped"), "{text}");
    let out = f.run(&file, &["--job", "test"]).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let jobs: Vec<&str> = summary(&text).iter().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(jobs, ["build", "test"], "{text}");

    // Ctrl-C: the running jobs stop (after_script runs), no other starts, exit 130.
    let slow = f.write(
        "slow/.gitlab-ci.yml",
        "image: alpine:3.20\nsleepy:\n  stage: build\n  script: [echo sleepy-started, sleep 300]\n\
         \x20 after_script: [echo sleepy-after]\nlater:\n  stage: test\n  script: [echo later-ran]\n",
    );
    let mut child = f.command(&slow, &[]).spawn().expect("spawn host");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = String::new();
    read_lines(&mut reader, &mut seen, Some("sleepy-started")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = child.id().expect("pid").to_string();
    std::process::Command::new("kill").args(["-INT", &pid]).status().expect("kill -INT");
    read_lines(&mut reader, &mut seen, None).await;
    let status = child.wait().await.expect("wait");
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(seen.contains("sleepy-after") && !seen.contains("later-ran"), "{seen}");
    assert!(summary_row(&seen, "later").contains("canceled") && seen.contains("Pipeline canceled"), "{seen}");
    f.assert_clean().await;
}

/// The rows of the pipeline's summary table (after its `job  stage` header).
fn summary(text: &str) -> Vec<&str> {
    text.lines().skip_while(|l| !l.starts_with("job ")).skip(1).take_while(|l| !l.starts_with("Pipeline")).collect()
}

fn summary_row(text: &str, job: &str) -> String {
    summary(text).into_iter().find(|l| l.split_whitespace().next() == Some(job)).unwrap_or_default().to_string()
}

/// `include: local` as GitLab merges it: the included file's jobs and templates, the
/// including file's values over them, nested includes, a pattern; and a `when: delayed` job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_with_local_includes_runs_their_jobs() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    f.write(
        "project/ci/templates.yml",
        "include: ci/jobs/lint.yml\n.base:\n  image: alpine:3.20\n  variables: {WHO: template}\n",
    );
    f.write("project/ci/jobs/lint.yml", "lint:\n  extends: .base\n  script: [\"echo lint-by-$WHO\"]\n");
    f.write("project/ci/jobs/extra.yml", "extra:\n  extends: .base\n  script: [echo extra-ran]\n");
    let file = f.write(
        "project/.gitlab-ci.yml",
        "include:\n  - local: /ci/templates.yml\n  - 'ci/jobs/*.yml'\n\
         .base:\n  variables: {WHO: main}\n\
         build:\n  extends: .base\n  script: [\"echo build-by-$WHO\"]\n\
         later:\n  extends: .base\n  stage: deploy\n  when: delayed\n  start_in: 1 second\n  script: [echo later-ran]\n",
    );
    let out = f.run(&file, &[]).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    for want in ["build-by-main", "lint-by-main", "extra-ran", "later-ran", "Pipeline succeeded"] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("keel: job \"later\" is delayed (when: delayed): it starts in 1s"), "{log}");
    f.assert_clean().await;
}
