//! The node behind the real API: kubectl, kube-rs and the official Python client as judges.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams, DeleteParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use local_cluster::{ClusterOptions, LocalCluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn cluster() -> LocalCluster {
    LocalCluster::start(ClusterOptions::on_host_rootfs()).await.expect("cluster starts")
}

fn kubectl(c: &LocalCluster, args: &[&str]) -> Output {
    Command::new("kubectl").arg("--kubeconfig").arg(c.kubeconfig_path()).args(args).output().expect("kubectl runs")
}

async fn create(c: &LocalCluster, pod: serde_json::Value) -> Pod {
    let api: Api<Pod> = Api::default_namespaced(c.client().unwrap());
    let pod: Pod = serde_json::from_value(pod).unwrap();
    let name = pod.metadata.name.clone().unwrap();
    let created = api.create(&PostParams::default(), &pod).await.expect("pod created");
    tokio::time::timeout(Duration::from_secs(60), await_condition(api, &name, is_running()))
        .await
        .expect("pod running in time")
        .expect("watch works");
    created
}

fn is_running() -> impl kube::runtime::wait::Condition<Pod> {
    |p: Option<&Pod>| p.and_then(|p| p.status.as_ref()?.phase.as_deref()).is_some_and(|ph| ph == "Running")
}

fn sleeper(name: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({"name": "c", "image": "alpine", "command": ["sh", "-c", "sleep 1000"]});
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {"containers": [c]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_reports_the_exit_code() {
    let c = cluster().await;
    create(&c, sleeper("ex", serde_json::json!({}))).await;
    let out = kubectl(&c, &["exec", "ex", "--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("err\n"));
    // stdin through kubectl -i, closed at EOF.
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(c.kubeconfig_path())
        .args(["exec", "-i", "ex", "--", "sh", "-c", "tr a-z A-Z"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"piped through\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "PIPED THROUGH\n");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_attach_writes_a_command_and_reads_its_output() {
    let c = cluster().await;
    create(&c, sleeper("att", serde_json::json!({"command": ["sh"], "stdin": true}))).await;
    let api: Api<Pod> = Api::default_namespaced(c.client().unwrap());
    let mut attached =
        api.attach("att", &AttachParams::default().stdin(true).stdout(true).stderr(false)).await.expect("attach");
    let mut stdin = attached.stdin().unwrap();
    let mut stdout = attached.stdout().unwrap();
    stdin.write_all(b"echo hello-from-$((40+2))\n").await.unwrap();
    let mut buf = vec![0u8; 64];
    let mut got = Vec::new();
    while !got.ends_with(b"\n") {
        let n = tokio::time::timeout(Duration::from_secs(30), stdout.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "attach output ended early");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"hello-from-42\n");
    // Ending the shell ends the container, the attach and the pod.
    stdin.write_all(b"exit 0\n").await.unwrap();
    drop(stdin);
    let _ = tokio::time::timeout(Duration::from_secs(30), attached.join()).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_follow_reads_to_the_end() {
    let c = cluster().await;
    let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "lg"},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "alpine",
            "command": ["sh", "-c", "for i in 1 2 3 4 5; do echo line $i; sleep 0.2; done"]}]}});
    create(&c, pod).await;
    let out = kubectl(&c, &["logs", "-f", "lg"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "line 1\nline 2\nline 3\nline 4\nline 5\n");
    let out = kubectl(&c, &["logs", "lg", "--tail=2"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "line 4\nline 5\n");
    let out = kubectl(&c, &["logs", "lg", "--timestamps", "--tail=1"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (ts, rest) = text.split_once(' ').unwrap();
    assert!(ts.ends_with('Z') && ts.contains('T'), "{text}");
    assert_eq!(rest, "line 5\n");
    c.stop().await;
}

async fn eventually_none(marker: &str) -> Vec<u32> {
    let mut left = common::processes_mentioning(marker);
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = common::processes_mentioning(marker);
    }
    left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_pod_and_stopping_or_dropping_the_cluster_leaves_no_process() {
    let marker = format!("keel-cluster-marker-{}", std::process::id());
    let env = serde_json::json!({"env": [{"name": "KEEL_TEST_MARKER", "value": marker}],
                                  "command": ["sh", "-c", "sleep 1000 & sleep 1000"]});
    let c = cluster().await;
    let pod = create(&c, sleeper("del", env.clone())).await;
    let uid = pod.metadata.uid.unwrap();
    assert!(!c.node().pod_processes(&uid).is_empty());
    assert!(!common::processes_mentioning(&marker).is_empty());
    let api: Api<Pod> = Api::default_namespaced(c.client().unwrap());
    api.delete("del", &DeleteParams { grace_period_seconds: Some(1), ..Default::default() }).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), await_condition(api, "del", conditions::is_deleted(&uid)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(eventually_none(&marker).await, Vec::<u32>::new(), "deletion killed the pod");

    // stop(): everything goes.
    create(&c, sleeper("s1", env.clone())).await;
    assert!(!common::processes_mentioning(&marker).is_empty());
    c.stop().await;
    assert_eq!(eventually_none(&marker).await, Vec::<u32>::new(), "stop killed every container");

    // Dropped without stop (as on a panic): everything goes too.
    let c = cluster().await;
    create(&c, sleeper("s2", env.clone())).await;
    assert!(!common::processes_mentioning(&marker).is_empty());
    drop(c);
    assert_eq!(eventually_none(&marker).await, Vec::<u32>::new(), "drop killed every container");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_stream_exec_works() {
    let c = cluster().await;
    create(&c, sleeper("py", serde_json::json!({}))).await;
    let script = r#"
import sys
from kubernetes import config, client
from kubernetes.stream import stream
config.load_kube_config(sys.argv[1])
v1 = client.CoreV1Api()
out = stream(v1.connect_get_namespaced_pod_exec, "py", "default",
             command=["sh", "-c", "echo py-$((1+1)); echo e >&2"], stderr=True, stdin=False, stdout=True, tty=False)
print(repr("".join(sorted(out.splitlines(keepends=True)))))
resp = stream(v1.connect_get_namespaced_pod_exec, "py", "default",
              command=["sh", "-c", "read x; echo got-$x; exit 7"], stderr=True, stdin=True, stdout=True,
              tty=False, _preload_content=False)
resp.write_stdin("abc\n")
resp.run_forever(timeout=30)
print(repr(resp.read_stdout()))
print(resp.returncode)
"#;
    let out = Command::new("python3").arg("-c").arg(script).arg(c.kubeconfig_path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, ["'e\\npy-2\\n'", "'got-abc\\n'", "7"], "{stdout}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_attach_drives_a_stdin_container() {
    let c = cluster().await;
    create(&c, sleeper("pya", serde_json::json!({"command": ["sh"], "stdin": true}))).await;
    let script = r#"
import sys
from kubernetes import config, client
from kubernetes.stream import stream
config.load_kube_config(sys.argv[1])
v1 = client.CoreV1Api()
resp = stream(v1.connect_get_namespaced_pod_attach, "pya", "default",
              stdin=True, stdout=True, stderr=True, tty=False, _preload_content=False)
resp.write_stdin("echo attached-$((2*21))\n")
out = ""
while "\n" not in out and resp.is_open():
    resp.update(timeout=30)
    out += resp.read_stdout() or ""
print(repr(out))
resp.close()
"#;
    let out = Command::new("python3").arg("-c").arg(script).arg(c.kubeconfig_path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), "'attached-42\\n'");
    // The container keeps running after the client detached (no stdinOnce).
    let api: Api<Pod> = Api::default_namespaced(c.client().unwrap());
    let p = api.get("pya").await.unwrap();
    assert_eq!(p.status.unwrap().phase.as_deref(), Some("Running"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_limit_through_the_api_throttles_and_leaves_no_cgroup() {
    let c = cluster().await;
    if !c.node().cpu_limits_enforced() {
        eprintln!("skipped: this user cannot make cpu cgroups");
        c.stop().await;
        return;
    }
    let busy = serde_json::json!({"command": ["sh", "-c", "while :; do :; done"],
                                  "resources": {"limits": {"cpu": "100m"}}});
    let pod = create(&c, sleeper("busy", busy)).await;
    let uid = pod.metadata.uid.unwrap();
    let cgroups = common::node_cpu_cgroups(&c.node().pod_processes(&uid));
    let dir = cgroups
        .get(&format!("{uid}-c-0"))
        .unwrap_or_else(|| panic!("no cpu cgroup for the container: {cgroups:?}"))
        .clone();
    assert_eq!(common::cpu_quota(&dir), (10_000, 100_000));
    assert!(common::until_throttled(&dir).await > 0);
    // A pod without CPU resources gets no cgroup, so no quota either.
    let free = create(&c, sleeper("free", serde_json::json!({}))).await;
    let free_uid = free.metadata.uid.unwrap();
    assert!(!c.node().pod_processes(&free_uid).is_empty());
    assert_eq!(common::node_cpu_cgroups(&c.node().pod_processes(&free_uid)).len(), 0);

    let api: Api<Pod> = Api::default_namespaced(c.client().unwrap());
    api.delete("busy", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), await_condition(api, "busy", conditions::is_deleted(&uid)))
        .await
        .unwrap()
        .unwrap();
    let node_dir = dir.parent().unwrap().to_path_buf();
    assert!(!dir.exists(), "deleting the pod removed its cgroup {}", dir.display());
    c.stop().await;
    assert!(!node_dir.exists(), "stopping the cluster removed the node's cgroup {}", node_dir.display());
}

/// The QoS class the API server computed at create survives the kubelet's status updates.
#[tokio::test(flavor = "multi_thread")]
async fn running_pods_keep_their_qos_class() {
    let c = cluster().await;
    let equal =
        serde_json::json!({"limits": {"cpu": "200m", "memory": "64Mi"}, "requests": {"cpu": "200m", "memory": "64Mi"}});
    let api: Api<Pod> = Api::default_namespaced(c.client().unwrap());
    for (name, resources, qos) in [
        ("guaranteed", equal, "Guaranteed"),
        ("burstable", serde_json::json!({"requests": {"cpu": "100m"}}), "Burstable"),
        ("besteffort", serde_json::json!({}), "BestEffort"),
    ] {
        create(&c, sleeper(name, serde_json::json!({"resources": resources}))).await;
        let running = api.get(name).await.unwrap();
        let status = running.status.unwrap();
        assert_eq!((status.phase.as_deref(), status.qos_class.as_deref()), (Some("Running"), Some(qos)), "{name}");
    }
    c.stop().await;
}
