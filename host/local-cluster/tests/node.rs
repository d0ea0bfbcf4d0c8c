//! The node on its own (no API server): real bwrap sandboxes, real processes.

mod common;

use common::{Fixture, fixture, fixture_with};

use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use local_cluster::node::{AttachRequest, ExecRequest, ExitStatus, LogOptions, ResolvedVolumes};

fn pod(uid: &str, spec: serde_json::Value) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("pod-{uid}"), "namespace": "default", "uid": uid, "labels": {"app": "t"}},
        "spec": spec,
    }))
    .unwrap()
}

fn terminated(s: &PodStatus, c: &str) -> Option<(i32, String)> {
    let cs = s.container_statuses.as_ref()?.iter().find(|x| x.name == c)?;
    let t = cs.state.as_ref()?.terminated.as_ref()?;
    Some((t.exit_code, t.reason.clone().unwrap_or_default()))
}

async fn collect(rx: &mut Option<tokio::sync::mpsc::Receiver<Bytes>>) -> String {
    let mut out = Vec::new();
    if let Some(rx) = rx {
        while let Some(b) = rx.recv().await {
            out.extend_from_slice(&b);
        }
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_share_an_empty_dir_and_see_config_map_and_secret_files() {
    let mut f = fixture();
    let p = pod(
        "u1",
        serde_json::json!({
            "restartPolicy": "Never",
            "volumes": [
                {"name": "shared", "emptyDir": {}},
                {"name": "cfg", "configMap": {"name": "cm", "items": [{"key": "greeting", "path": "sub/hello.txt"}]}},
                {"name": "sec", "secret": {"secretName": "s", "defaultMode": 0o400}}
            ],
            "containers": [
                {"name": "writer", "image": "alpine", "command": ["sh", "-c", "echo from-writer > /shared/x; sleep 0.2"],
                 "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]},
                {"name": "reader", "image": "alpine",
                 "command": ["sh", "-c", "while [ ! -s /data/x ]; do sleep 0.05; done; cat /data/x; cat /cfg/sub/hello.txt; echo; stat -c %a /sec/token; cat /sec/token; echo; echo $MY_POD $APP; pwd; touch /etc/nope 2>/dev/null || echo ro-root"],
                 "workingDir": "/work/dir",
                 "env": [{"name": "MY_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                         {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}}],
                 "volumeMounts": [{"name": "shared", "mountPath": "/data"}, {"name": "cfg", "mountPath": "/cfg"},
                                  {"name": "sec", "mountPath": "/sec"}]}
            ]
        }),
    );
    let mut data = ResolvedVolumes::new();
    data.insert("cfg".into(), [("greeting".to_string(), b"hello".to_vec())].into_iter().collect());
    data.insert("sec".into(), [("token".to_string(), b"t0k".to_vec())].into_iter().collect());
    f.node.run_pod(p, data);
    let st = f.wait_phase("u1", "Succeeded").await;
    assert_eq!(terminated(&st, "reader"), Some((0, "Completed".into())));
    let out = f.logs("u1", "reader", LogOptions::default()).await;
    assert_eq!(out, "from-writer\nhello\n400\nt0k\npod-u1 t\n/work/dir\nro-root\n");
    let conds: Vec<_> = st.conditions.unwrap().iter().map(|c| (c.type_.clone(), c.status.clone())).collect();
    assert!(conds.contains(&("PodScheduled".into(), "True".into())), "{conds:?}");
    assert!(conds.contains(&("Initialized".into(), "True".into())), "{conds:?}");
    f.node.shutdown().await;
    assert!(!f.dir.path().join("node/pods/u1").exists(), "pod dir removed on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_reports_exit_codes_and_runs_in_the_container() {
    let mut f = fixture();
    let p = pod(
        "u2",
        serde_json::json!({
            "containers": [{"name": "c", "image": "alpine", "command": ["sh", "-c", "echo $$$$ > /tmp/pid1; sleep 1000"],
                            "workingDir": "/tmp", "env": [{"name": "FOO", "value": "bar"}]}]
        }),
    );
    f.node.run_pod(p, ResolvedVolumes::new());
    f.wait_phase("u2", "Running").await;
    let req = |cmd: &str| ExecRequest {
        command: vec!["sh".into(), "-c".into(), cmd.into()],
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    let mut s = f.node.exec("u2", "c", req("exit 3")).await.unwrap();
    assert_eq!(collect(&mut s.stdout).await, "");
    assert_eq!(collect(&mut s.stderr).await, "");
    assert_eq!(s.exit.await.unwrap(), ExitStatus::Exited(3));
    // Same mount namespace (the container's private /tmp), PID namespace (the command is 1),
    // env and working directory.
    let mut s = f.node.exec("u2", "c", req("cat /tmp/pid1; echo $FOO; pwd; echo err >&2")).await.unwrap();
    assert_eq!(collect(&mut s.stdout).await, "1\nbar\n/tmp\n");
    assert_eq!(collect(&mut s.stderr).await, "err\n");
    assert_eq!(s.exit.await.unwrap(), ExitStatus::Exited(0));
    // stdin reaches the process; closing it is EOF.
    let mut s = f.node.exec("u2", "c", ExecRequest { stdin: true, ..req("tr a-z A-Z") }).await.unwrap();
    let stdin = s.stdin.take().unwrap();
    stdin.send(Bytes::from_static(b"shout\n")).await.unwrap();
    drop(stdin);
    assert_eq!(collect(&mut s.stdout).await, "SHOUT\n");
    assert_eq!(s.exit.await.unwrap(), ExitStatus::Exited(0));
    // The host's /tmp is not the container's.
    assert!(!std::path::Path::new("/tmp/pid1").exists() || std::fs::read_to_string("/tmp/pid1").unwrap() != "1\n");
    let err = f.node.exec("u2", "nope", req("true")).await.unwrap_err();
    assert_eq!(err.status_code(), 404);
    f.node.stop_pod("u2", Duration::from_secs(0)).await;
    let st = f.wait_phase("u2", "Failed").await;
    assert_eq!(terminated(&st, "c").map(|t| t.0), Some(137));
    f.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_writes_to_stdin_and_reads_live_output() {
    let mut f = fixture();
    let p = pod(
        "u3",
        serde_json::json!({
            "restartPolicy": "Never",
            "containers": [{"name": "c", "image": "alpine", "command": ["sh"], "stdin": true, "stdinOnce": true}]
        }),
    );
    f.node.run_pod(p, ResolvedVolumes::new());
    f.wait_phase("u3", "Running").await;
    let mut s =
        f.node.attach("u3", "c", AttachRequest { stdin: true, stdout: true, stderr: true, tty: false }).await.unwrap();
    let stdin = s.stdin.take().unwrap();
    stdin.send(Bytes::from_static(b"echo attached-$((6*7))\n")).await.unwrap();
    let mut out = s.stdout.take().unwrap();
    assert_eq!(&out.recv().await.unwrap()[..], b"attached-42\n");
    // stdinOnce: the end of the first attach closes stdin, so `sh` exits 0.
    drop(stdin);
    drop(out);
    drop(s);
    let st = f.wait_phase("u3", "Succeeded").await;
    assert_eq!(terminated(&st, "c"), Some((0, "Completed".into())));
    let logs = f.logs("u3", "c", LogOptions::default()).await;
    assert_eq!(logs, "attached-42\n");
    f.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_containers_run_first_and_restart_policy_on_failure_restarts() {
    let mut f = fixture();
    let p = pod(
        "u4",
        serde_json::json!({
            "restartPolicy": "OnFailure",
            "volumes": [{"name": "w", "emptyDir": {}}],
            "initContainers": [{"name": "init", "image": "alpine", "command": ["sh", "-c", "echo init > /w/order"],
                                "volumeMounts": [{"name": "w", "mountPath": "/w"}]}],
            "containers": [{"name": "c", "image": "alpine",
                            "command": ["sh", "-c", "echo run >> /w/order; [ $(wc -l < /w/order) -ge 3 ]"],
                            "volumeMounts": [{"name": "w", "mountPath": "/w"}]}]
        }),
    );
    f.node.run_pod(p, ResolvedVolumes::new());
    // Fails once (2 lines), restarts immediately, succeeds (3 lines).
    let st = f.wait_phase("u4", "Succeeded").await;
    let cs = &st.container_statuses.as_ref().unwrap()[0];
    assert_eq!(cs.restart_count, 1);
    assert_eq!(cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap().exit_code, 1);
    assert_eq!(
        st.init_container_statuses.as_ref().unwrap()[0].state.as_ref().unwrap().terminated.as_ref().unwrap().exit_code,
        0
    );
    let prev = f.logs("u4", "c", LogOptions { previous: true, ..Default::default() }).await;
    assert_eq!(prev, "");
    f.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_images_back_off() {
    let mut f = fixture_with(vec!["registry.example/missing:1".into()]);
    let p = pod(
        "u5",
        serde_json::json!({
            "containers": [{"name": "c", "image": "registry.example/missing:1"}]
        }),
    );
    f.node.run_pod(p, ResolvedVolumes::new());
    let reason = |s: &PodStatus| s.container_statuses.as_ref()?[0].state.as_ref()?.waiting.as_ref()?.reason.clone();
    f.wait_for("u5", "ErrImagePull", |s| reason(s).as_deref() == Some("ErrImagePull")).await;
    let st = f.wait_for("u5", "ImagePullBackOff", |s| reason(s).as_deref() == Some("ImagePullBackOff")).await;
    assert_eq!(st.phase.as_deref(), Some("Pending"));
    f.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_is_enforced_as_oom_killed() {
    if !common::is_root() {
        eprintln!("skipped: memory cgroups need root");
        return;
    }
    let mut f = fixture();
    let p = pod(
        "u6",
        serde_json::json!({
            "restartPolicy": "Never",
            "containers": [{"name": "c", "image": "alpine",
                "command": ["sh", "-c", "x=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa; while true; do x=$x$x; done"],
                "resources": {"limits": {"memory": "32Mi"}}}]
        }),
    );
    f.node.run_pod(p, ResolvedVolumes::new());
    let st = f.wait_phase("u6", "Failed").await;
    assert_eq!(terminated(&st, "c"), Some((137, "OOMKilled".into())));
    f.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_limits_are_cfs_quotas_and_requests_are_shares_in_cgroups_that_go_away() {
    if !common::is_root() {
        eprintln!("skipped: cpu cgroups need root");
        return;
    }
    let mut f = fixture();
    assert!(f.node.cpu_limits_enforced(), "root can make cpu cgroups here");
    let p = pod(
        "cpu1",
        serde_json::json!({
            "containers": [
                {"name": "busy", "image": "alpine", "command": ["sh", "-c", "while :; do :; done"],
                 "resources": {"limits": {"cpu": "100m"}}},
                {"name": "idle", "image": "alpine", "command": ["sleep", "1000"],
                 "resources": {"requests": {"cpu": "0.25"}}}
            ]
        }),
    );
    f.node.run_pod(p, ResolvedVolumes::new());
    f.wait_for("cpu1", "both containers running", |s| {
        s.container_statuses.iter().flatten().filter(|c| c.state.as_ref().is_some_and(|s| s.running.is_some())).count()
            == 2
    })
    .await;
    let cgroups = common::node_cpu_cgroups(&f.node.pod_processes("cpu1"));
    let names: Vec<&str> = cgroups.keys().map(String::as_str).collect();
    assert_eq!(names, ["cpu1-busy-0", "cpu1-idle-0"], "each container has a cpu cgroup of its own");
    let (busy, idle) = (&cgroups["cpu1-busy-0"], &cgroups["cpu1-idle-0"]);
    // 100m: 10 ms of CPU per 100 ms period. No limit (requests only): no quota.
    assert_eq!(common::cpu_quota(busy), (10_000, 100_000));
    assert_eq!(common::cpu_quota(idle).0, -1);
    // Shares from the requests (a missing request is the limit): 100m -> 102, 250m -> 256 (v2:
    // the weights runc derives from those shares).
    let weight = |d: &std::path::Path| {
        let v1 = std::fs::read_to_string(d.join("cpu.shares"));
        v1.or_else(|_| std::fs::read_to_string(d.join("cpu.weight"))).unwrap().trim().to_string()
    };
    let v1 = busy.join("cpu.shares").exists();
    assert_eq!((weight(busy), weight(idle)), if v1 { ("102".into(), "256".into()) } else { ("4".into(), "10".into()) });
    // The busy loop wants the whole CPU and gets 10% of it: the kernel throttles it.
    assert!(common::until_throttled(busy).await > 0);
    assert_eq!(common::cpu_nr_throttled(idle), 0, "a sleeping container without a limit is never throttled");

    // A container that ends takes its cgroup with it (it was in it: it printed it).
    let node_dir = busy.parent().unwrap().to_path_buf();
    let p = pod(
        "cpu2",
        serde_json::json!({
            "restartPolicy": "Never",
            "containers": [{"name": "c", "image": "alpine", "command": ["cat", "/proc/self/cgroup"],
                            "resources": {"limits": {"cpu": "2"}}}]
        }),
    );
    f.node.run_pod(p, ResolvedVolumes::new());
    f.wait_phase("cpu2", "Succeeded").await;
    let out = f.logs("cpu2", "c", LogOptions::default()).await;
    assert!(out.contains("/cpu2-c-0\n"), "the container ran in its cgroup: {out}");
    assert!(!node_dir.join("cpu2-c-0").exists(), "the ended container's cgroup is removed");

    // Deleting a pod removes its containers' cgroups; shutting down removes the node's.
    f.node.stop_pod("cpu1", Duration::ZERO).await;
    f.node.forget_pod("cpu1").await;
    assert!(!busy.exists() && !idle.exists(), "the deleted pod's cgroups are removed");
    assert!(node_dir.exists());
    f.node.shutdown().await;
    assert!(!node_dir.exists(), "the node's cgroup {} is removed at shutdown", node_dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparsable_cpu_quantity_is_a_config_error_naming_it() {
    let mut f = fixture();
    let p = pod(
        "cpu3",
        serde_json::json!({
            "containers": [{"name": "c", "image": "alpine", "command": ["true"],
                            "resources": {"requests": {"cpu": "1.5.0"}}}]
        }),
    );
    f.node.run_pod(p, ResolvedVolumes::new());
    let st = f
        .wait_for("cpu3", "a waiting reason", |s| {
            s.container_statuses
                .iter()
                .flatten()
                .any(|c| c.state.as_ref().is_some_and(|s| s.waiting.as_ref().is_some_and(|w| w.message.is_some())))
        })
        .await;
    let w = st.container_statuses.unwrap()[0].state.clone().unwrap().waiting.unwrap();
    assert_eq!(w.reason.as_deref(), Some("CreateContainerConfigError"));
    assert_eq!(w.message.as_deref(), Some(r#"container c: invalid requests.cpu "1.5.0""#));
    f.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_outlives_a_dropped_node() {
    let mut f = fixture();
    let marker = format!("keel-marker-{}", std::process::id());
    for uid in ["d1", "d2"] {
        let p = pod(
            uid,
            serde_json::json!({
                "containers": [{"name": "c", "image": "alpine", "command": ["sh", "-c", "sleep 1000 & sleep 1000"],
                                "env": [{"name": "KEEL_TEST_MARKER", "value": marker}]}]
            }),
        );
        f.node.run_pod(p, ResolvedVolumes::new());
        f.wait_phase(uid, "Running").await;
    }
    let before = common::processes_mentioning(&marker);
    assert!(before.len() >= 4, "expected the sandboxes and their sleeps, found {before:?}");
    // Deleting one pod kills its processes.
    f.node.stop_pod("d1", Duration::from_millis(100)).await;
    f.node.forget_pod("d1").await;
    assert!(f.node.pod_processes("d1").is_empty());
    // Dropping the node (no shutdown call, as after a panic) kills the rest.
    let Fixture { node, statuses, dir } = f;
    drop(node);
    drop(statuses);
    let mut left = common::processes_mentioning(&marker);
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = common::processes_mentioning(&marker);
    }
    assert!(left.is_empty(), "processes outlived the node: {left:?}");
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_have_their_own_network_and_containers_share_it() {
    let mut f = fixture();
    let server =
        "import http.server as h; h.HTTPServer(('127.0.0.1', 18931), h.SimpleHTTPRequestHandler).serve_forever()";
    let client = "import urllib.request as u, time\n\
                  for _ in range(200):\n\
                  \x20   try:\n\
                  \x20       print(u.urlopen('http://127.0.0.1:18931/').status); break\n\
                  \x20   except OSError: time.sleep(0.05)\n";
    let p = pod(
        "n1",
        serde_json::json!({
            "restartPolicy": "Never",
            "shareProcessNamespace": true,
            "containers": [
                {"name": "server", "image": "alpine", "command": ["python3", "-c", server], "workingDir": "/tmp"},
                // The /proc of the shared PID namespace, not the host's: PID 1 is the pod's.
                {"name": "client", "image": "alpine", "command": ["sh", "-c", format!("python3 -c \"{client}\"; ps -e -o comm= | sort | tr '\\n' ' '; \
                    [ $(readlink /proc/1/ns/pid) = $(readlink /proc/self/ns/pid) ] && echo own-proc")]}
            ]
        }),
    );
    f.node.run_pod(p, ResolvedVolumes::new());
    f.wait_for("n1", "client done", |s| terminated(s, "client").is_some()).await;
    let out = f.logs("n1", "client", LogOptions::default()).await;
    // Same localhost; and with shareProcessNamespace the client sees the server's process.
    assert!(out.starts_with("200\n"), "{out}");
    assert!(out.contains("python3"), "processes of the other container visible: {out}");
    assert!(out.ends_with("own-proc\n"), "a /proc of the pod's PID namespace: {out}");
    // The host (and so any other pod) does not see the pod's listener.
    let host = std::net::TcpStream::connect(("127.0.0.1", 18931));
    assert!(host.is_err(), "the pod's port leaked into the host network namespace");
    f.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policy_always_restarts_then_backs_off() {
    let mut f = fixture();
    let p = pod(
        "r1",
        serde_json::json!({
            "restartPolicy": "Always",
            "containers": [{"name": "c", "image": "alpine", "command": ["sh", "-c", "echo run; exit 2"]}]
        }),
    );
    f.node.run_pod(p, ResolvedVolumes::new());
    let st = f
        .wait_for("r1", "CrashLoopBackOff", |s| {
            s.container_statuses.as_ref().and_then(|c| c[0].state.as_ref()?.waiting.as_ref()?.reason.clone()).as_deref()
                == Some("CrashLoopBackOff")
        })
        .await;
    let cs = &st.container_statuses.as_ref().unwrap()[0];
    assert_eq!(cs.restart_count, 1);
    assert_eq!(cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap().exit_code, 2);
    assert_eq!(st.phase.as_deref(), Some("Running"));
    assert_eq!(f.logs("r1", "c", LogOptions { previous: true, ..Default::default() }).await, "run\n");
    f.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_with_a_tty_gets_a_terminal_and_resizes() {
    let mut f = fixture();
    f.node.run_pod(pod("t1", serde_json::json!({"containers": [{"name": "c", "image": "alpine", "command": ["sh", "-c", "sleep 1000"]}]})), ResolvedVolumes::new());
    f.wait_phase("t1", "Running").await;
    let mut s = f
        .node
        .exec(
            "t1",
            "c",
            ExecRequest {
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    "read line; [ -t 0 ] && [ -t 1 ] && echo is-a-$((1+1))tty; stty size; exit 5".into(),
                ],
                stdin: true,
                stdout: true,
                tty: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    s.resize.as_ref().unwrap().send(local_cluster::node::TerminalSize { width: 123, height: 45 }).await.unwrap();
    let stdin = s.stdin.take().unwrap();
    // Give the resize a moment to land before asking; the pty echoes input, so look for output.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stdin.send(Bytes::from_static(b"go\n")).await.unwrap();
    let out = collect(&mut s.stdout).await;
    assert!(out.contains("is-a-2tty"), "{out}");
    assert!(out.contains("45 123"), "{out}");
    assert!(s.stderr.is_none(), "a tty has a single output stream");
    assert_eq!(s.exit.await.unwrap(), ExitStatus::Exited(5));
    f.node.shutdown().await;
}
