//! `host cluster up` end to end: the real binary serves the embedded cluster, kubectl runs a pod
//! through the kubeconfig it printed, and SIGINT (Ctrl-C) stops it with nothing left behind:
//! no container process and no data directory.

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

/// `host cluster up` with `extra` arguments; returns it and the kubeconfig path it printed.
fn cluster_up(extra: &[&str]) -> (std::process::Child, PathBuf) {
    let mut child = Command::new(host_bin())
        .args(["cluster", "up"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start host cluster up");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read kubeconfig path");
    (child, PathBuf::from(line.trim()))
}

#[test]
fn cluster_up_serves_kubectl_and_ctrl_c_leaves_nothing_behind() {
    let (mut child, kubeconfig) = cluster_up(&[]);
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
    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let status = child.wait().expect("wait for host cluster up");
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
fn cluster_up_tls_serves_verified_https() {
    let (mut child, kubeconfig) = cluster_up(&["--tls"]);
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
        assert!(data_dir.join("ca.crt").is_file());
        let out = kubectl(&kubeconfig, &["get", "ns", "default", "-o", "name"]);
        assert!(out.stderr.is_empty(), "kubectl warned: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(succeeded(out, "kubectl get ns over TLS").trim(), "namespace/default");
    });
    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let status = child.wait().expect("wait for host cluster up --tls");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    assert!(status.success(), "host cluster up --tls exited with {status:?} after SIGINT");
    assert!(!data_dir.exists(), "the cluster's data dir {} (with its key) was not removed", data_dir.display());
}
