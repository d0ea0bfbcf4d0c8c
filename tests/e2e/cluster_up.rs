//! `host cluster up` end to end: the real binary serves the embedded cluster over HTTPS with a
//! required client certificate, kubectl runs a pod through the kubeconfig it printed, anonymous
//! requests get 401, and SIGINT (Ctrl-C) or SIGTERM stops it with nothing left behind: no
//! container process and no data directory. The open mode needs its loud flag.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../support/mod.rs"]
mod support;
use support::{host_bin, kubectl, succeeded};

/// Processes whose command line carries `marker` (our container's unique argument).
fn processes_with(marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(marker)
        {
            found.push(pid);
        }
    }
    found
}

/// Polls `cond` until it holds or `limit` passes; the limit only bounds a broken run.
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// `host cluster up` with `extra` arguments; returns it, the kubeconfig path it printed and its
/// stderr so far, read on by a thread (into the returned buffer).
fn cluster_up(extra: &[&str]) -> (std::process::Child, PathBuf, std::sync::Arc<std::sync::Mutex<String>>) {
    let mut child = Command::new(host_bin())
        .args(["cluster", "up"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start host cluster up");
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut pipe = BufReader::new(child.stderr.take().expect("stderr"));
    let sink = stderr.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        while pipe.read_line(&mut line).is_ok_and(|n| n > 0) {
            eprint!("{line}");
            sink.lock().expect("stderr buffer").push_str(&line);
            line.clear();
        }
    });
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read kubeconfig path");
    (child, PathBuf::from(line.trim()), stderr)
}

/// HTTP status of an anonymous GET (curl, no client certificate, server not verified).
fn anonymous_status(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "30", url])
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn server_of(kubeconfig: &std::path::Path) -> String {
    let doc: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(kubeconfig).expect("read kubeconfig")).unwrap();
    doc["clusters"][0]["cluster"]["server"].as_str().expect("a server URL").to_owned()
}

/// Sends `signal` and waits for the process; the guard only catches a hang.
fn stop(child: &mut std::process::Child, signal: &str) -> std::process::ExitStatus {
    let _ = Command::new("kill").args([signal, &child.id().to_string()]).status();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for host cluster up") {
            return status;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("host cluster up did not stop after {signal}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cluster_up_serves_kubectl_and_ctrl_c_leaves_nothing_behind() {
    // `busybox` is not pulled: the host's root filesystem stands in for it, as asked.
    let (mut child, kubeconfig, _) = cluster_up(&["--host-rootfs"]);
    let data_dir = kubeconfig.parent().expect("kubeconfig lives in the data dir").to_path_buf();

    // Run the body so a failed assertion still stops the cluster below.
    let marker = format!("keel-cluster-up-{}", std::process::id());
    let outcome = std::panic::catch_unwind(|| {
        assert!(kubeconfig.is_file(), "printed kubeconfig {} does not exist", kubeconfig.display());
        let sleeper = format!("echo {marker}; exec sleep 300 # {marker}");
        succeeded(
            kubectl(
                &kubeconfig,
                &["run", "sleeper", "--image=busybox", "--restart=Never", "--command", "--", "sh", "-c", &sleeper],
            ),
            "kubectl run",
        );
        succeeded(
            kubectl(&kubeconfig, &["wait", "--for=condition=Ready", "pod/sleeper", "--timeout=60s"]),
            "kubectl wait Ready",
        );
        let logs = succeeded(kubectl(&kubeconfig, &["logs", "sleeper"]), "kubectl logs");
        assert_eq!(logs.trim(), marker);
        assert!(!processes_with(&marker).is_empty(), "the container's process is not running");
    });

    // Ctrl-C, as a person would stop it.
    let status = stop(&mut child, "-INT");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    assert!(status.success(), "host cluster up exited with {status:?} after SIGINT");
    assert!(
        eventually(Duration::from_secs(10), || processes_with(&marker).is_empty()),
        "container processes outlived the cluster: {:?}",
        processes_with(&marker)
    );
    assert!(!data_dir.exists(), "the cluster's data dir {} was not removed", data_dir.display());
}

#[test]
fn cluster_up_requires_a_client_certificate_by_default() {
    let (mut child, kubeconfig, _) = cluster_up(&[]);
    let data_dir = kubeconfig.parent().expect("kubeconfig lives in the data dir").to_path_buf();
    let outcome = std::panic::catch_unwind(|| {
        let doc: serde_json::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(&kubeconfig).expect("read kubeconfig")).unwrap();
        let cluster = &doc["clusters"][0]["cluster"];
        assert!(cluster["server"].as_str().is_some_and(|s| s.starts_with("https://127.0.0.1:")), "{cluster}");
        assert!(
            cluster["certificate-authority-data"].is_string() && cluster.get("insecure-skip-tls-verify").is_none(),
            "{cluster}"
        );
        let user = &doc["users"][0]["user"];
        assert!(user["client-certificate-data"].is_string() && user["client-key-data"].is_string(), "{user}");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&kubeconfig).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        assert!(data_dir.join("ca.crt").is_file());
        let out = kubectl(&kubeconfig, &["get", "ns", "default", "-o", "name"]);
        assert!(out.stderr.is_empty(), "kubectl warned: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(succeeded(out, "kubectl get ns over TLS").trim(), "namespace/default");
        let server = server_of(&kubeconfig);
        for path in ["/version", "/api/v1/namespaces/default/pods", "/openapi/v3"] {
            assert_eq!(anonymous_status(&format!("{server}{path}")), "401", "{path}");
        }
    });
    let status = stop(&mut child, "-TERM");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    assert!(status.success(), "host cluster up exited with {status:?} after SIGTERM");
    assert!(!data_dir.exists(), "the cluster's data dir {} (with its key) was not removed", data_dir.display());
}

#[test]
fn cluster_up_open_mode_needs_its_flag_and_warns() {
    let (mut child, kubeconfig, stderr) = cluster_up(&["--insecure-no-auth"]);
    let outcome = std::panic::catch_unwind(|| {
        let server = server_of(&kubeconfig);
        assert!(server.starts_with("http://127.0.0.1:"), "{server}");
        assert_eq!(anonymous_status(&format!("{server}/api/v1/namespaces/default/pods")), "200");
        assert_eq!(
            succeeded(kubectl(&kubeconfig, &["get", "ns", "default", "-o", "name"]), "kubectl").trim(),
            "namespace/default"
        );
    });
    let status = stop(&mut child, "-INT");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    assert!(status.success());
    let said = stderr.lock().unwrap().clone();
    assert!(said.contains("WARNING") && said.contains("without authentication"), "{said}");

    // A token over plain HTTP (which kubectl would not send) is refused before anything starts.
    let out = Command::new(host_bin())
        .args(["cluster", "up", "--insecure-no-auth", "--token", "t"])
        .output()
        .expect("run host cluster up");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cluster_up_stops_promptly_after_hostile_requests() {
    let (mut child, kubeconfig, _) = cluster_up(&["--tls"]);
    let data_dir = kubeconfig.parent().expect("kubeconfig lives in the data dir").to_path_buf();
    let outcome = std::panic::catch_unwind(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let deep = dir.path().join("deep.yaml");
        std::fs::write(
            &deep,
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: deep}}\ndata: {}{}\n",
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
        )
        .expect("write probe");
        // The probe, as a server-side apply with the kubeconfig's certificate: refused
        // before any parser sees it. (kubectl itself would parse the file first.)
        let doc: serde_json::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(&kubeconfig).expect("read kubeconfig")).unwrap();
        let user = &doc["users"][0]["user"];
        let decode = |k: &str| {
            let b64 = user[k].as_str().expect("credential in the kubeconfig");
            let out = Command::new("base64").arg("-d").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().and_then(
                |mut c| {
                    use std::io::Write;
                    c.stdin.take().expect("stdin").write_all(b64.as_bytes())?;
                    c.wait_with_output()
                },
            );
            out.expect("base64 runs").stdout
        };
        let (cert, key) = (dir.path().join("c.crt"), dir.path().join("c.key"));
        std::fs::write(&cert, decode("client-certificate-data")).expect("write cert");
        std::fs::write(&key, decode("client-key-data")).expect("write key");
        let url = format!("{}/api/v1/namespaces/default/configmaps/deep?fieldManager=probe", server_of(&kubeconfig));
        let out = Command::new("curl")
            .args(["-sk", "--max-time", "60", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PATCH"])
            .args(["-H", "Content-Type: application/apply-patch+yaml", "--data-binary"])
            .arg(format!("@{}", deep.display()))
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg(&url)
            .output()
            .expect("curl runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "400");
        assert_eq!(
            succeeded(kubectl(&kubeconfig, &["get", "ns", "default", "-o", "name"]), "kubectl").trim(),
            "namespace/default"
        );
    });
    let status = stop(&mut child, "-TERM");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    assert!(status.success(), "{status:?}");
    assert!(!data_dir.exists());
}

#[test]
fn cluster_load_puts_an_archive_into_a_running_cluster_and_pods_run_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let archive = support::busybox_archive(dir.path(), "keel-e2e/busybox:1");
    // The default: an image not in the store is pulled, never taken from the host.
    let (mut child, kubeconfig, _) = cluster_up(&[]);
    let outcome = std::panic::catch_unwind(|| {
        let kc = kubeconfig.to_str().unwrap();
        let loaded = succeeded(
            Command::new(host_bin()).args(["cluster", "load", "--kubeconfig", kc]).arg(&archive).output().unwrap(),
            "host cluster load",
        );
        assert!(loaded.contains("keel-e2e/busybox:1") && loaded.contains("sha256:"), "{loaded}");
        let script = "test -e /etc/debian_version && echo host-rootfs || echo image-rootfs";
        succeeded(
            kubectl(
                &kubeconfig,
                &["run", "img", "--image=keel-e2e/busybox:1", "--restart=Never", "--", "sh", "-c", script],
            ),
            "kubectl run",
        );
        assert!(
            eventually(Duration::from_secs(60), || {
                String::from_utf8_lossy(&kubectl(&kubeconfig, &["logs", "img"]).stdout).contains("image-rootfs")
            }),
            "the pod did not run on the image's filesystem"
        );
        let image_id = succeeded(
            kubectl(&kubeconfig, &["get", "pod", "img", "-o", "jsonpath={.status.containerStatuses[0].imageID}"]),
            "kubectl get",
        );
        assert!(image_id.starts_with("docker.io/keel-e2e/busybox@sha256:"), "{image_id}");
        // Not in the store, and no host rootfs to fall back on: the pull fails.
        succeeded(
            kubectl(&kubeconfig, &["run", "missing", "--image=keel-e2e/absent:1", "--restart=Never", "--", "true"]),
            "kubectl run",
        );
        assert!(
            eventually(Duration::from_secs(60), || {
                let out = kubectl(
                    &kubeconfig,
                    &["get", "pod", "missing", "-o", "jsonpath={.status.containerStatuses[0].state.waiting.reason}"],
                );
                let reason = String::from_utf8_lossy(&out.stdout).into_owned();
                reason == "ErrImagePull" || reason == "ImagePullBackOff"
            }),
            "a missing image did not fail its pull"
        );
    });
    let status = stop(&mut child, "-INT");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    assert!(status.success());
}

/// A job in `dir` running `script` in the example busybox image, loaded from an archive that
/// the config's `[embedded_cluster] images_from` names (relative to the config, as
/// `--images-from` would); the helper container runs the same image, so no registry is asked.
/// Returns the `host run` command for it.
fn busybox_job(dir: &std::path::Path, script: &str) -> Command {
    let images = dir.join("images");
    std::fs::create_dir(&images).unwrap();
    support::busybox_archive(&images, "keel-e2e/busybox:1");
    let job = dir.join("job.yml");
    std::fs::write(&job, format!("image: keel-e2e/busybox:1\nscript:\n{script}")).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        "[embedded_cluster]\nimages_from = \"images\"\n\
         [[runners]]\nname = \"local\"\nexecutor = \"kubernetes\"\n[runners.kubernetes]\nhelper_image = \"keel-e2e/busybox:1\"\n",
    )
    .unwrap();
    let mut cmd = Command::new(host_bin());
    cmd.args(["run", "--config"])
        .arg(&config)
        .arg("--plugin-cache")
        .arg(dir.join(".cache"))
        .arg(&job)
        .env_remove("KUBECONFIG")
        .env("HOME", dir)
        .env("KEEL_PLUGIN_PATH", support::workspace_root().join("target/plugins"));
    cmd
}

#[test]
fn host_run_with_the_configs_images_runs_the_job_in_its_image() {
    let dir = tempfile::tempdir().unwrap();
    let script = "  - 'test -e /etc/debian_version && echo host-rootfs || echo image-rootfs'\n  - busybox | head -1\n";
    let out = busybox_job(dir.path(), script).output().unwrap();
    let trace = succeeded(out, "host run with [embedded_cluster] images_from");
    assert!(trace.contains("\nimage-rootfs\n") && trace.contains("BusyBox v1.35"), "{trace}");
}

/// The pod network through `host run`: the job's pod has an IP of its own, reaches a server on
/// the host's loopback as `host.keel.internal`, and once `host run` has returned no process of
/// the job is left (the embedded cluster's temporary directory, under our TMPDIR, is on every
/// sandbox's and slirp4netns' command line).
#[test]
fn host_run_jobs_reach_the_hosts_loopback_by_name_and_leave_no_process() {
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 17\r\n\r\nfrom-the-host-lo\n");
        }
    });
    let script =
        format!("  - echo \"ip:$(hostname -i)\"\n  - echo \"got:$(wget -qO- http://host.keel.internal:{port}/)\"\n");
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let out = busybox_job(dir.path(), &script).env("TMPDIR", &tmp).output().unwrap();
    let left = processes_with(&tmp.display().to_string());
    let trace = succeeded(out, "host run reaching the host's loopback");
    assert!(trace.contains("got:from-the-host-lo"), "{trace}");
    let ip = trace.lines().find_map(|l| l.strip_prefix("ip:")).unwrap_or_default();
    assert!(ip.starts_with("10.244."), "{trace}");
    assert!(left.is_empty(), "processes of the job outlived host run: {left:?}");
}
