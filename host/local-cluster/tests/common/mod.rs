//! Shared helpers for the conformance tests: a real cluster per test, pods that run real
//! processes on the embedded node.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use local_cluster::node::{LogOptions, Node, NodeConfig};
use local_cluster::{ClusterOptions, LocalCluster};
use serde_json::json;
use tokio::sync::watch;

/// The kubelet back-off the fixtures use: the sequence a real node shows, in a fraction of the time.
pub const TEST_BACKOFF: Duration = Duration::from_millis(300);

pub async fn cluster() -> LocalCluster {
    cluster_with(ClusterOptions::on_host_rootfs()).await
}

pub async fn cluster_with(opts: ClusterOptions) -> LocalCluster {
    LocalCluster::start(opts).await.expect("local cluster starts")
}

/// A pod whose single container sleeps until it is stopped.
pub fn sleeper(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"suite": "conformance"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": "busybox", "command": ["sleep", "3600"]}]
        }
    }))
    .expect("valid pod")
}

/// Every process whose command line or environment mentions `marker`.
pub fn processes_mentioning(marker: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            ["cmdline", "environ"].iter().any(|f| {
                std::fs::read(format!("/proc/{pid}/{f}"))
                    .map(|b| b.windows(marker.len()).any(|w| w == marker.as_bytes()))
                    .unwrap_or(false)
            })
        })
        .collect()
}

/// The node-made cgroups in the cpu hierarchy (cgroup v1 `cpu`, or v2) that these processes are
/// in, by directory name (`<pod uid>-<container>-<restart>`). A process the node made no cpu
/// cgroup for is in none of them (the node's own directories are named `keel-node-*`).
pub fn node_cpu_cgroups(pids: &[u32]) -> std::collections::BTreeMap<String, std::path::PathBuf> {
    use std::path::{Path, PathBuf};
    let dir_of = |pid: &u32| -> Option<PathBuf> {
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let v1 = own.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
            ctrls.split(',').any(|c| c == "cpu").then(|| format!("/sys/fs/cgroup/cpu{path}"))
        });
        let dir = v1.or_else(|| {
            let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
            ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
                .into_iter()
                .find(|m| Path::new(m).join("cgroup.controllers").exists())
                .map(|m| format!("{m}{path}"))
        })?;
        Some(PathBuf::from(dir))
    };
    pids.iter()
        .filter_map(dir_of)
        .filter(|d| {
            d.parent().and_then(|p| p.file_name()).is_some_and(|n| n.to_string_lossy().starts_with("keel-node-"))
        })
        .map(|d| (d.file_name().unwrap().to_string_lossy().into_owned(), d))
        .collect()
}

/// A cpu cgroup's CFS quota in µs (-1: none) and period, from v1's `cpu.cfs_quota_us` and
/// `cpu.cfs_period_us` or v2's `cpu.max`.
pub fn cpu_quota(dir: &std::path::Path) -> (i64, u64) {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("{}/{f}: {e}", dir.display()));
    if dir.join("cpu.cfs_quota_us").exists() {
        (read("cpu.cfs_quota_us").trim().parse().unwrap(), read("cpu.cfs_period_us").trim().parse().unwrap())
    } else {
        let max = read("cpu.max");
        let (quota, period) = max.trim().split_once(' ').unwrap();
        (if quota == "max" { -1 } else { quota.parse().unwrap() }, period.parse().unwrap())
    }
}

/// How many CFS periods the cgroup's processes were throttled in (`cpu.stat` `nr_throttled`,
/// in both versions).
pub fn cpu_nr_throttled(dir: &std::path::Path) -> u64 {
    let stat = std::fs::read_to_string(dir.join("cpu.stat")).unwrap();
    stat.lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no nr_throttled in {}/cpu.stat: {stat}", dir.display()))
}

/// Waits until the busy loop in `dir` has been throttled at least once. Throttling is the
/// kernel's own record that the quota took effect; the deadline only keeps a broken quota from
/// hanging the test.
pub async fn until_throttled(dir: &std::path::Path) -> u64 {
    for _ in 0..600 {
        let n = cpu_nr_throttled(dir);
        if n > 0 {
            return n;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{} was never throttled: the quota does not hold", dir.display());
}

/// Whether the tests run as root (effective uid 0).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A node on its own (no API server) whose status reports land in a watch channel, with its
/// data dir; dropping it kills every container and removes the dir.
pub struct Fixture {
    pub node: Node,
    pub statuses: watch::Receiver<BTreeMap<String, PodStatus>>,
    pub dir: tempfile::TempDir,
}

/// A node that treats the `unavailable` images as unpullable.
pub fn fixture_with(unavailable: Vec<String>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = watch::channel(BTreeMap::new());
    let tx = Arc::new(Mutex::new(tx));
    let node = Node::new(
        NodeConfig {
            data_dir: dir.path().join("node"),
            images_dir: None,
            unavailable_images: unavailable,
            cached_unpullable_images: Vec::new(),
            backoff_base: TEST_BACKOFF,
            node_name: "test-node".into(),
        },
        Arc::new(move |uid: &str, st: PodStatus| {
            tx.lock().unwrap().send_modify(|m| {
                m.insert(uid.to_string(), st);
            });
        }),
    )
    .expect("node starts (is bwrap installed, are user namespaces allowed?)");
    Fixture { node, statuses: rx, dir }
}

pub fn fixture() -> Fixture {
    fixture_with(Vec::new())
}

impl Fixture {
    /// The pod's status once `f` holds for it (60 s bound only for a broken run).
    pub async fn wait_for(&mut self, uid: &str, what: &str, f: impl Fn(&PodStatus) -> bool) -> PodStatus {
        let mut rx = self.statuses.clone();
        let r = tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|m| m.get(uid).is_some_and(&f))).await;
        match r {
            Ok(m) => m.unwrap()[uid].clone(),
            Err(_) => panic!("pod {uid} never reached: {what}; last status {:#?}", self.statuses.borrow().get(uid)),
        }
    }

    pub async fn wait_phase(&mut self, uid: &str, phase: &str) -> PodStatus {
        self.wait_for(uid, phase, |s| s.phase.as_deref() == Some(phase)).await
    }

    /// The container's whole log (ends once it has exited).
    pub async fn logs(&self, uid: &str, c: &str, opts: LogOptions) -> String {
        let mut s = self.node.logs(uid, c, opts).await.unwrap();
        let mut out = Vec::new();
        while let Some(b) = s.next().await {
            out.extend_from_slice(&b.unwrap());
        }
        String::from_utf8(out).unwrap()
    }
}

/// A test host in a network namespace of its own, reached from the host's namespace through a
/// veth pair (10.250.0.1 <-> 10.250.0.2): a holder process owns the namespace, and with it go the
/// namespace, the pair and the server.
pub struct TestHost {
    holder: std::process::Child,
    server: std::process::Child,
    _www: tempfile::TempDir,
}

impl TestHost {
    /// Serves `body` at `http://10.250.0.2:8000/` (needs root).
    pub fn start(body: &str) -> TestHost {
        let run = |cmd: &[&str]| {
            let out = std::process::Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
            assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let holder = std::process::Command::new("unshare").args(["--net", "sleep", "600"]).spawn().unwrap();
        let pid = holder.id().to_string();
        // unshare has made the namespace once its own /proc/PID/ns/net differs from ours.
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        while std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|l| l == ours) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let link = format!("kt{pid}");
        run(&["ip", "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &pid]);
        run(&["ip", "addr", "add", "10.250.0.1/30", "dev", &link]);
        run(&["ip", "link", "set", &link, "up"]);
        let netns = format!("--net=/proc/{pid}/ns/net");
        run(&["nsenter", &netns, "ip", "addr", "add", "10.250.0.2/30", "dev", "eth0"]);
        run(&["nsenter", &netns, "ip", "link", "set", "eth0", "up"]);
        run(&["nsenter", &netns, "ip", "link", "set", "lo", "up"]);
        let www = tempfile::tempdir().unwrap();
        std::fs::write(www.path().join("index.html"), format!("{body}\n")).unwrap();
        let server = std::process::Command::new("nsenter")
            .args([netns.as_str(), "busybox", "httpd", "-f", "-p", "8000", "-h"])
            .arg(www.path())
            .spawn()
            .unwrap();
        TestHost { holder, server, _www: www }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        for c in [&mut self.server, &mut self.holder] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
