//! A job directory with a cluster of its own, for the `host run` end-to-end tests: write the
//! job, run the real `host` binary against the cluster, and check that nothing is left.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::Api;
use kube::api::ListParams;
use local_cluster::{ClusterOptions, LocalCluster};

use super::host_bin;

/// A job directory (job file, sources, config) and a cluster of its own.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub cluster: LocalCluster,
}

impl Fixture {
    pub async fn new(opts: ClusterOptions) -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let cluster = LocalCluster::start(opts).await.expect("start the embedded cluster");
        Fixture { dir, cluster }
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, text).expect("write");
        path
    }

    pub fn command(&self, job: &Path, extra: &[&str]) -> tokio::process::Command {
        self.command_via(self.cluster.kubeconfig_path(), job, extra)
    }

    pub fn command_via(&self, kubeconfig: &Path, job: &Path, extra: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(host_bin());
        cmd.arg("run")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--plugin-cache")
            .arg(self.dir.path().join(".cache"))
            .args(extra)
            .arg(job)
            .env_remove("KUBECONFIG")
            .env("KEEL_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    pub async fn run(&self, job: &Path, extra: &[&str]) -> Output {
        let out = self.command(job, extra).output().await.expect("run host");
        eprintln!(
            "--- host run {extra:?} exited {:?}\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Nothing of any job is left: no object labelled by keel, no container process.
    pub async fn assert_clean(&self) {
        let client = self.cluster.client().expect("client");
        let lp = ListParams::default().labels("app.kubernetes.io/managed-by=keel");
        let pods = Api::<Pod>::all(client.clone()).list(&lp).await.expect("list pods");
        let secrets = Api::<Secret>::all(client.clone()).list(&lp).await.expect("list secrets");
        let services = Api::<Service>::all(client).list(&lp).await.expect("list services");
        let names = |v: Vec<Option<String>>| v.into_iter().flatten().collect::<Vec<_>>();
        assert!(
            pods.items.is_empty(),
            "pods left: {:?}",
            names(pods.items.iter().map(|p| p.metadata.name.clone()).collect())
        );
        assert!(
            secrets.items.is_empty(),
            "secrets left: {:?}",
            names(secrets.items.iter().map(|p| p.metadata.name.clone()).collect())
        );
        assert!(
            services.items.is_empty(),
            "services left: {:?}",
            names(services.items.iter().map(|p| p.metadata.name.clone()).collect())
        );
        let left = processes_mentioning(&self.cluster.data_dir().display().to_string());
        assert!(left.is_empty(), "container processes left: {left:?}");
    }
}

/// Processes whose command line mentions `needle` (the cluster's data dir is in every sandbox's).
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                out.push(format!("{}: {cmd}", name.to_string_lossy()));
            }
        }
    }
    out
}

/// Reads the host's stdout lines into `seen` until one equals `until` (or to the end: `None`).
pub async fn read_lines<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut tokio::io::Lines<R>,
    seen: &mut String,
    until: Option<&str>,
) {
    while let Some(line) = reader.next_line().await.expect("read the host's stdout") {
        seen.push_str(&line);
        seen.push('\n');
        if Some(line.as_str()) == until {
            return;
        }
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn last_line(o: &Output) -> String {
    stdout(o).lines().last().unwrap_or_default().to_string()
}

pub const CONFIG_HELPER: &str = "[[runners]]\nname = \"t\"\nexecutor = \"kubernetes\"\ntoken = \"glrt-e2e\"\n[runners.kubernetes]\nhelper_image = \"alpine:3.20\"\n";

/// A TCP proxy that forwards to `target` until `cut` is called, which closes every
/// connection open at that moment (new ones still go through).
pub struct CuttingProxy {
    pub addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<u32>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CuttingProxy {
    pub async fn start(target: std::net::SocketAddr) -> CuttingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let (cut, rx) = tokio::sync::watch::channel(0u32);
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut rx = rx.clone();
                rx.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = rx.changed() => {}
                    }
                });
            }
        });
        CuttingProxy { addr, cut, accepted }
    }

    /// Connections accepted so far (each reconnect is one).
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A copy of the fixture's kubeconfig that goes through this proxy.
    pub fn kubeconfig(&self, f: &Fixture) -> PathBuf {
        let kubeconfig = std::fs::read_to_string(f.cluster.kubeconfig_path()).expect("kubeconfig");
        f.write("proxied-kubeconfig", &kubeconfig.replace(&f.cluster.addr().to_string(), &self.addr.to_string()))
    }

    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

/// Runs `job` through a [`CuttingProxy`], cuts every connection once the trace shows
/// `ticking`, and returns the host's exit status, its stdout and how long it took to end
/// after the cut. For strategies that must fail (never succeed) when the connection drops.
pub async fn run_and_cut_once(
    f: &Fixture,
    job: &Path,
    extra: &[&str],
) -> (std::process::ExitStatus, String, std::time::Duration) {
    use tokio::io::AsyncReadExt;
    let proxy = CuttingProxy::start(f.cluster.addr()).await;
    let via_proxy = proxy.kubeconfig(f);
    let mut child = f.command_via(&via_proxy, job, extra).spawn().expect("spawn host");
    let mut out = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("ticking\n") {
        let n = out.read(&mut buf).await.expect("read");
        assert!(n > 0, "host ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let cut_at = std::time::Instant::now();
    proxy.cut();
    out.read_to_end(&mut seen).await.expect("read");
    let status = child.wait().await.expect("wait");
    (status, String::from_utf8_lossy(&seen).into_owned(), cut_at.elapsed())
}
