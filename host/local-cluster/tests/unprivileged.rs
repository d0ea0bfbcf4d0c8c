//! The node as an ordinary user: every pod gets a user namespace of its own, and with it its own
//! network namespace (containers share loopback), a shared PID namespace on request, exec and
//! attach; files the containers write belong to that user on the host.
//!
//! As root (CI) the scenario runs in a copy of this test binary started under `setpriv` as uid
//! 65534 (`nobody`), which needs no user account and no access to the build directory; as an
//! ordinary user it runs in-process. Also as root: where user namespaces are disabled the node
//! refuses to start with an error naming the cause and the remedy.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use local_cluster::node::PodNetwork;
use local_cluster::node::{
    AttachRequest, ExecRequest, ExitStatus, LogOptions, Node, NodeConfig, NodeError, ResolvedVolumes,
};
use local_cluster::{ClusterOptions, LocalCluster};

const NOBODY: u32 = 65534;
/// Set for the child: the uid it must be running as, checked so a broken `setpriv` cannot make
/// the scenario silently run as root.
const EXPECT_UID: &str = "KEEL_TEST_EXPECT_UID";
/// Put into every pod's environment, so leftovers can be found after the child is gone.
const MARKER: &str = "KEEL_TEST_MARKER";
/// Set for the child when the parent made a test host for it to reach (egress).
const EGRESS_BODY: &str = "KEEL_TEST_EGRESS_BODY";

#[test]
fn node_runs_pods_with_their_own_namespaces_as_an_unprivileged_user() {
    if !common::is_root() {
        return runtime().block_on(scenario());
    }
    let marker = format!("keel-unprivileged-{}", std::process::id());
    // A host for the child's pods to reach through slirp4netns, which opens /dev/net/tun: the
    // device is root's only on some machines (0600), so the child gets a copy it may open, bound
    // over the device in a mount namespace of its own (the host's stays as it is).
    let body = "hello-from-the-test-host";
    let _test_host = common::TestHost::start(body);
    run_as_nobody("scenario_as_this_user", &marker, Some(TUN_FOR_THE_CHILD), &[(EGRESS_BODY, body)]);
    // Nothing of the child's pods survives it.
    assert!(common::processes_mentioning(&marker).is_empty(), "sandboxes outlived the node");
}

/// The scenario itself; started by the test above (as uid 65534 when that runs as root).
#[test]
#[ignore = "run by node_runs_pods_with_their_own_namespaces_as_an_unprivileged_user"]
fn scenario_as_this_user() {
    runtime().block_on(scenario());
}

/// Where user namespaces are disabled, the node refuses to start and says why and what to do.
/// Simulated without touching the host: a user namespace of our own (every host uid mapped)
/// whose `user.max_user_namespaces` is 0, which binds everything inside it.
#[test]
fn node_start_names_the_cause_when_user_namespaces_are_disabled() {
    if !common::is_root() {
        eprintln!("skipped: making a user namespace with user namespaces disabled needs root");
        return;
    }
    let marker = format!("keel-no-userns-{}", std::process::id());
    run_as_nobody("start_without_user_namespaces", &marker, Some(NO_USER_NAMESPACES), &[]);
}

#[test]
#[ignore = "run by node_start_names_the_cause_when_user_namespaces_are_disabled"]
fn start_without_user_namespaces() {
    let rt = runtime();
    let _enter = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let cfg = NodeConfig {
        data_dir: dir.path().join("node"),
        images_dir: None,
        unavailable_images: Vec::new(),
        cached_unpullable_images: Vec::new(),
        backoff_base: local_cluster::node::DEFAULT_BACKOFF_BASE,
        node_name: "no-userns".into(),
    };
    let err = Node::new(cfg, Arc::new(|_: &str, _: PodStatus| {})).err().expect("the node must not start");
    assert!(matches!(err, NodeError::NamespacesUnavailable { .. }), "{err:?}");
    let msg = err.to_string();
    for want in [
        "user.max_user_namespaces = 0",
        "sysctl -w user.max_user_namespaces=",
        "run the node as root",
        "bwrap said: bwrap:",
    ] {
        assert!(msg.contains(want), "the error lacks {want:?}: {msg}");
    }
}

/// `python3 -c` program that runs its arguments in a new user namespace mapping every host
/// uid/gid below 65536 to itself, as root there, with `user.max_user_namespaces` set to 0.
/// (The parent writes the maps: a process may map only its own uid into its namespace.)
const NO_USER_NAMESPACES: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
go_r, go_w = os.pipe(); ready_r, ready_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(go_w); os.close(ready_r)
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        sys.exit("unshare(CLONE_NEWUSER) failed: " + os.strerror(ctypes.get_errno()))
    os.write(ready_w, b"x"); os.read(go_r, 1)
    os.setgid(0); os.setuid(0)
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    os.execvp(sys.argv[1], sys.argv[1:])
os.close(go_r); os.close(ready_w)
os.read(ready_r, 1)
for name, line in [("uid_map", "0 0 65536"), ("setgroups", "allow"), ("gid_map", "0 0 65536")]:
    with open(f"/proc/{pid}/{name}", "w") as f:
        f.write(line)
os.write(go_w, b"x")
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"#;

/// `python3 -c` program that runs its arguments in a mount namespace of its own in which
/// `/dev/net/tun` is a copy of the device that everyone may open.
const TUN_FOR_THE_CHILD: &str = r#"
import ctypes, os, stat, sys, tempfile
libc = ctypes.CDLL(None, use_errno=True)
def check(r, what):
    if r != 0:
        sys.exit(what + " failed: " + os.strerror(ctypes.get_errno()))
check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
check(libc.mount(b"none", b"/", None, 0x40000 | 0x4000, None), "making / private")  # MS_PRIVATE | MS_REC
d = tempfile.mkdtemp()
tun = os.path.join(d, "tun")
os.mknod(tun, stat.S_IFCHR | 0o666, os.makedev(10, 200))
os.chmod(tun, 0o666)
check(libc.mount(tun.encode(), b"/dev/net/tun", None, 0x1000, None), "binding the tun copy")  # MS_BIND
os.unlink(tun); os.rmdir(d)
os.execvp(sys.argv[1], sys.argv[1:])
"#;

/// Runs the ignored test `name` of a copy of this binary as uid 65534 (through `python3 -c
/// wrapper` when given, which gets the command line as arguments) and asserts that it passed
/// and left no files behind.
fn run_as_nobody(name: &str, marker: &str, wrapper: Option<&str>, env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The build directory may sit where uid 65534 cannot reach (under /root): run a copy.
    let exe = dir.path().join("unprivileged-test");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();

    let mut cmd = match wrapper {
        Some(program) => {
            let mut c = Command::new("python3");
            c.args(["-c", program, "setpriv"]);
            c
        }
        None => Command::new("setpriv"),
    };
    let out = cmd
        .args([format!("--reuid={NOBODY}"), format!("--regid={NOBODY}")])
        .args(["--clear-groups", "--inh-caps=-all"])
        .arg(&exe)
        .args(["--exact", name, "--ignored", "--nocapture", "--test-threads=1"])
        .current_dir(&home)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &home)
        .env("TMPDIR", &home)
        .env("RUST_BACKTRACE", "1")
        .env(EXPECT_UID, NOBODY.to_string())
        .env(MARKER, marker)
        .envs(env.iter().copied())
        .output()
        .expect("setpriv (util-linux) runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name} failed as uid {NOBODY} ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("1 passed"), "{name} did not run:\n{stdout}\n{stderr}");
    let left: Vec<_> = std::fs::read_dir(&home).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "{name} left files behind: {left:?}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn scenario() {
    if let Ok(uid) = std::env::var(EXPECT_UID) {
        assert_eq!(rustix::process::geteuid().as_raw().to_string(), uid, "the scenario must run as uid {uid}");
    }
    let marker = std::env::var(MARKER).unwrap_or_else(|_| format!("keel-unprivileged-{}", std::process::id()));
    node_scenario(&marker).await;
    cluster_scenario(&marker).await;
}

fn pod(uid: &str, marker: &str, mut spec: serde_json::Value) -> Pod {
    for c in spec["containers"].as_array_mut().unwrap() {
        c["env"] = serde_json::json!([{"name": MARKER, "value": marker}]);
    }
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("pod-{uid}"), "namespace": "default", "uid": uid},
        "spec": spec,
    }))
    .unwrap()
}

fn terminated(s: &PodStatus, c: &str) -> Option<i32> {
    let cs = s.container_statuses.as_ref()?.iter().find(|x| x.name == c)?;
    Some(cs.state.as_ref()?.terminated.as_ref()?.exit_code)
}

async fn collect(rx: Option<tokio::sync::mpsc::Receiver<Bytes>>) -> String {
    let mut out = Vec::new();
    if let Some(mut rx) = rx {
        while let Some(b) = rx.recv().await {
            out.extend_from_slice(&b);
        }
    }
    String::from_utf8(out).unwrap()
}

async fn exec(node: &Node, uid: &str, c: &str, script: &str) -> (String, String, ExitStatus) {
    let req = ExecRequest {
        command: vec!["sh".into(), "-c".into(), script.into()],
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    let mut s = node.exec(uid, c, req).await.unwrap_or_else(|e| panic!("exec {script:?}: {e}"));
    let (out, err) = tokio::join!(collect(s.stdout.take()), collect(s.stderr.take()));
    (out, err, s.exit.await.unwrap())
}

const FETCH: &str = "import urllib.request as u, time\n\
                     for _ in range(200):\n\
                     \x20   try:\n\
                     \x20       print(u.urlopen('http://127.0.0.1:18933/').status); break\n\
                     \x20   except OSError: time.sleep(0.05)\n";

async fn node_scenario(marker: &str) {
    let mut f = common::fixture();

    // Two containers share loopback and (shareProcessNamespace) their processes; a third writes
    // into an emptyDir.
    let server =
        "import http.server as h; h.HTTPServer(('127.0.0.1', 18933), h.SimpleHTTPRequestHandler).serve_forever()";
    f.node.run_pod(
        pod("net", marker, serde_json::json!({
            "restartPolicy": "Never",
            "shareProcessNamespace": true,
            "volumes": [{"name": "data", "emptyDir": {}}],
            "containers": [
                {"name": "server", "image": "alpine", "command": ["python3", "-c", server], "workingDir": "/tmp"},
                {"name": "client", "image": "alpine", "command": ["sh", "-c", format!(
                    "python3 -c \"{FETCH}\"; ps -e -o comm= | sort | tr '\\n' ' '; echo hi > /data/from-client; id -u; \
                    [ $(readlink /proc/1/ns/pid) = $(readlink /proc/self/ns/pid) ] && echo own-proc")],
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]}
            ]
        })),
        ResolvedVolumes::new(),
    );
    let st = f.wait_for("net", "client done", |s| terminated(s, "client").is_some()).await;
    let out = f.logs("net", "client", LogOptions::default()).await;
    if terminated(&st, "client") != Some(0) {
        // What CI shows is all there is to go on: both containers' output and the pod's status.
        let server = f.logs("net", "server", LogOptions::default()).await;
        panic!("the client failed\nclient's log:\n{out}\nserver's log:\n{server}\nstatus: {st:#?}");
    }
    assert!(out.starts_with("200\n"), "the client reaches the server on 127.0.0.1: {out}");
    assert!(out.contains("python3"), "shareProcessNamespace: the server's process is visible: {out}");
    assert!(
        out.ends_with(" 0\nown-proc\n"),
        "uid 0 inside the pod's user namespace, /proc of the pod's PID namespace: {out}"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", 18933)).is_err(), "the pod's port leaked into the host network");
    // The file belongs to this user on the host, not to root.
    let file = f.dir.path().join("node/pods/net/volumes/data/from-client");
    assert_eq!(std::fs::metadata(&file).unwrap().uid(), rustix::process::geteuid().as_raw());

    // exec joins the container's namespaces: a network and user namespace that are not ours,
    // where the server answers on loopback; exit codes come back.
    let ns = |kind: &str| std::fs::read_link(format!("/proc/self/ns/{kind}")).unwrap().display().to_string();
    let (out, err, code) = exec(
        &f.node,
        "net",
        "server",
        &format!("readlink /proc/self/ns/net /proc/self/ns/user; python3 -c \"{FETCH}\""),
    )
    .await;
    assert_eq!(code, ExitStatus::Exited(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}{err}");
    assert_ne!(lines[0], ns("net"), "the pod has its own network namespace");
    assert_ne!(lines[1], ns("user"), "the pod has its own user namespace");
    assert_eq!(lines[2], "200");
    assert_eq!(exec(&f.node, "net", "server", "exit 3").await.2, ExitStatus::Exited(3));

    // attach reaches a running container's stdin and output.
    f.node.run_pod(
        pod(
            "att",
            marker,
            serde_json::json!({
                "restartPolicy": "Never",
                "containers": [{"name": "c", "image": "alpine", "command": ["sh"], "stdin": true, "stdinOnce": true}]
            }),
        ),
        ResolvedVolumes::new(),
    );
    f.wait_for("att", "Running", |s| s.phase.as_deref() == Some("Running")).await;
    let mut s =
        f.node.attach("att", "c", AttachRequest { stdin: true, stdout: true, stderr: true, tty: false }).await.unwrap();
    let stdin = s.stdin.take().unwrap();
    stdin.send(Bytes::from_static(b"echo attached-$((6*7))\n")).await.unwrap();
    let mut out = s.stdout.take().unwrap();
    assert_eq!(&out.recv().await.unwrap()[..], b"attached-42\n");
    drop((stdin, out, s));
    f.wait_for("att", "Succeeded", |s| s.phase.as_deref() == Some("Succeeded")).await;

    // Memory and CPU limits this user cannot enforce (no writable memory or cpu cgroup) are
    // reported by the node and do not keep the pod from running.
    f.node.run_pod(
        pod(
            "mem",
            marker,
            serde_json::json!({
                "restartPolicy": "Never",
                "containers": [{"name": "c", "image": "alpine", "command": ["echo", "ran"],
                                "resources": {"limits": {"memory": "64Mi", "cpu": "100m"}, "requests": {"cpu": "50m"}}}]
            }),
        ),
        ResolvedVolumes::new(),
    );
    f.wait_for("mem", "Succeeded", |s| s.phase.as_deref() == Some("Succeeded")).await;
    assert_eq!(f.logs("mem", "c", LogOptions::default()).await, "ran\n");
    assert_eq!(
        f.node.memory_limits_enforced(),
        cgroup_writable("memory"),
        "memory enforcement as reported matches what the cgroups allow"
    );
    assert_eq!(
        f.node.cpu_limits_enforced(),
        cgroup_writable("cpu"),
        "CPU enforcement as reported matches what the cgroups allow"
    );

    f.node.shutdown().await;
    let common::Fixture { node, dir, .. } = f;
    drop(node);
    dir.close().unwrap();
}

/// Whether this process may create a cgroup below its own in the hierarchy of `controller` (v1)
/// or the unified one (v2): the precondition for enforcing that controller's limits.
fn cgroup_writable(controller: &str) -> bool {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let dir = own
        .lines()
        .find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
            ctrls.split(',').any(|c| c == controller).then(|| format!("/sys/fs/cgroup/{controller}{path}"))
        })
        .or_else(|| own.lines().find_map(|l| l.strip_prefix("0::")).map(|p| format!("/sys/fs/cgroup{p}")))
        .unwrap();
    rustix::fs::access(dir.as_str(), rustix::fs::Access::WRITE_OK).is_ok()
}

/// The same through the API server, judged by kubectl.
async fn cluster_scenario(marker: &str) {
    // With a pod network; with egress where the parent made a host to reach (as root, above).
    let egress = std::env::var(EGRESS_BODY).ok();
    let pod_network = if egress.is_some() { PodNetwork::Egress } else { PodNetwork::Bridge };
    let opts = ClusterOptions { pod_network, ..ClusterOptions::on_host_rootfs() };
    let c = LocalCluster::start(opts).await.expect("the cluster starts for an ordinary user");
    let kubectl = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(c.kubeconfig_path())
            .args(args)
            .env("KUBECACHEDIR", c.data_dir().join("kubectl-cache"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl is installed");
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    };
    // Two pods: `web` serves its /etc (the pod's own hosts file among it) with busybox's httpd.
    for (name, command) in [("web", "[busybox, httpd, -f, -p, '8080', -h, /etc]"), ("other", "[sleep, '3600']")] {
        let manifest = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: busybox\n    command: {command}\n    env: [{{name: {MARKER}, value: {marker}}}]\n"
        );
        let out = tokio::task::block_in_place(|| kubectl(&["create", "-f", "-"], Some(&manifest)));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    for pod in ["pod/web", "pod/other"] {
        let out =
            tokio::task::block_in_place(|| kubectl(&["wait", "--for=condition=Ready", pod, "--timeout=60s"], None));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // Each has an IP of its own on the node's bridge, and one reaches the other.
    let out = tokio::task::block_in_place(|| kubectl(&["get", "pod", "web", "-o", "jsonpath={.status.podIP}"], None));
    let web_ip = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(web_ip.starts_with("10.244."), "{web_ip:?}");
    let url = format!("http://{web_ip}:8080/hosts");
    let out = tokio::task::block_in_place(|| kubectl(&["exec", "other", "--", "busybox", "wget", "-qO-", &url], None));
    let hosts = String::from_utf8_lossy(&out.stdout);
    assert!(hosts.contains(&format!("{web_ip}\tweb")), "{hosts}{}", String::from_utf8_lossy(&out.stderr));
    let out = tokio::task::block_in_place(|| kubectl(&["exec", "web", "--", "sh", "-c", "echo in-pod; id -u"], None));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "in-pod\n0\n", "{}", String::from_utf8_lossy(&out.stderr));
    if let Some(body) = &egress {
        // A server on this user's loopback, which pods reach as host.keel.internal.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            while let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nlocal\n");
            }
        });
        let script = format!(
            "echo far:$(timeout 10 wget -qO- http://10.250.0.2:8000/); \
             echo near:$(timeout 10 wget -qO- http://host.keel.internal:{port}/)"
        );
        let out = tokio::task::block_in_place(|| kubectl(&["exec", "other", "--", "sh", "-c", &script], None));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("far:{body}")), "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("near:local"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let out = tokio::task::block_in_place(|| kubectl(&["exec", "web", "--", "sh", "-c", "exit 3"], None));
    assert_eq!(
        out.status.code(),
        Some(3),
        "kubectl exec passes on the exit code: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.stop().await;
}
