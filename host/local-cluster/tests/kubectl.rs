//! Conformance as seen by kubectl (a client nobody here wrote), run as a subprocess against the
//! cluster's kubeconfig. Every command must succeed without printing warnings.

mod common;

use common::cluster;
use local_cluster::LocalCluster;
use std::process::Command;

/// Run kubectl; returns stdout, asserting success and an empty stderr (no warnings).
fn kubectl(c: &LocalCluster, args: &[&str]) -> String {
    kubectl_stdin(c, args, None)
}

fn kubectl_stdin(c: &LocalCluster, args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl_raw(c, args, stdin);
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "kubectl {args:?} failed ({}):\nstdout: {stdout}\nstderr: {stderr}", out.status);
    assert!(stderr.trim().is_empty(), "kubectl {args:?} printed to stderr: {stderr}");
    stdout
}

fn kubectl_raw(c: &LocalCluster, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig").arg(c.kubeconfig_path()).args(args);
    // kubectl caches discovery and OpenAPI per server URL; keep it inside the cluster's data dir
    // so tests never see each other's (or a developer's) cache.
    cmd.env("KUBECACHEDIR", c.data_dir().join("kubectl-cache"));
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("kubectl is installed");
    if let Some(input) = stdin {
        child.stdin.take().expect("piped").write_all(input.as_bytes()).expect("write kubectl stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("kubectl runs")
}

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: main
    image: busybox:1.36
    command: ["sh", "-c", "echo hello from web; exec sleep 3600"]
"#;

const CONFIGMAP: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  mode: fast
"#;

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_everyday_commands_work_without_warnings() {
    let c = cluster().await;
    let version = kubectl(&c, &["version", "-o", "json"]);
    assert!(version.contains("serverVersion"), "{version}");

    assert_eq!(kubectl_stdin(&c, &["create", "-f", "-"], Some(POD)).trim(), "pod/web created");
    assert!(kubectl(&c, &["wait", "--for=condition=Ready", "pod/web", "--timeout=120s"]).contains("condition met"));

    let table = kubectl(&c, &["get", "pods"]);
    let row = table.lines().find(|l| l.starts_with("web ")).unwrap_or_else(|| panic!("no row for web in:\n{table}"));
    assert!(row.contains("1/1") && row.contains("Running"), "{table}");
    assert!(kubectl(&c, &["get", "pods", "-l", "app=web", "-o", "name"]).contains("pod/web"));
    assert!(
        kubectl(&c, &["get", "pods", "--field-selector", "status.phase=Running", "-o", "name"]).contains("pod/web")
    );
    assert!(kubectl(&c, &["get", "pods", "-A"]).contains("default"));
    let json: serde_json::Value = serde_json::from_str(&kubectl(&c, &["get", "pod", "web", "-o", "json"])).unwrap();
    assert_eq!(json["status"]["phase"], "Running");
    assert_eq!(json["spec"]["containers"][0]["imagePullPolicy"], "IfNotPresent");

    let describe = kubectl(&c, &["describe", "pod", "web"]);
    assert!(describe.lines().any(|l| l.starts_with("Status:") && l.ends_with("Running")), "{describe}");
    for want in ["QoS Class:", "Scheduled", "Pulled", "Created", "Started"] {
        assert!(describe.contains(want), "describe lacks {want:?}:\n{describe}");
    }
    assert_eq!(kubectl(&c, &["logs", "web"]).trim(), "hello from web");
    assert_eq!(kubectl(&c, &["exec", "web", "--", "echo", "hi from exec"]).trim(), "hi from exec");

    assert!(kubectl(&c, &["label", "pod", "web", "tier=front"]).contains("labeled"));
    assert!(kubectl(&c, &["annotate", "pod", "web", "note=yes"]).contains("annotated"));
    assert!(kubectl(&c, &["get", "pods", "-l", "tier=front", "-o", "name"]).contains("pod/web"));

    assert!(kubectl_stdin(&c, &["apply", "-f", "-"], Some(CONFIGMAP)).contains("created"));
    assert!(kubectl_stdin(&c, &["apply", "-f", "-"], Some(&CONFIGMAP.replace("fast", "safe"))).contains("configured"));
    assert_eq!(kubectl(&c, &["get", "configmap", "settings", "-o", "jsonpath={.data.mode}"]), "safe");
    // These subcommands send protobuf bodies.
    assert!(kubectl(&c, &["create", "secret", "generic", "creds", "--from-literal=user=me"]).contains("created"));
    assert!(kubectl(&c, &["create", "configmap", "flags", "--from-literal=debug=true"]).contains("created"));
    assert_eq!(kubectl(&c, &["get", "configmap", "flags", "-o", "jsonpath={.data.debug}"]), "true");
    assert_eq!(kubectl(&c, &["get", "secret", "creds", "-o", "jsonpath={.data.user}"]), "bWU=");
    assert!(kubectl(&c, &["create", "namespace", "team"]).contains("created"));
    for kind in ["configmaps", "secrets", "services", "serviceaccounts", "namespaces", "nodes", "events"] {
        kubectl(&c, &["get", kind]);
    }
    assert!(kubectl(&c, &["get", "nodes"]).contains("Ready"));

    assert!(kubectl(&c, &["delete", "pod", "web"]).contains("deleted"));
    let gone = kubectl_raw(&c, &["get", "pod", "web"], None);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"), "{gone:?}");
    assert!(kubectl(&c, &["delete", "namespace", "team", "--wait=true"]).contains("deleted"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_reports_server_errors() {
    let c = cluster().await;
    let invalid = kubectl_raw(
        &c,
        &["create", "-f", "-"],
        Some("apiVersion: v1\nkind: Pod\nmetadata: {name: bad}\nspec: {containers: []}\n"),
    );
    assert!(!invalid.status.success());
    let err = String::from_utf8_lossy(&invalid.stderr);
    assert!(err.contains("is invalid") && err.contains("spec.containers"), "{err}");
    kubectl_stdin(&c, &["create", "-f", "-"], Some(CONFIGMAP));
    let dup = kubectl_raw(&c, &["create", "-f", "-"], Some(CONFIGMAP));
    assert!(String::from_utf8_lossy(&dup.stderr).contains("AlreadyExists"), "{dup:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_chunked_get_returns_every_object() {
    let c = cluster().await;
    let many: String = (0..10)
        .map(|i| format!("---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: chunk-{i}}}\ndata: {{i: \"{i}\"}}\n"))
        .collect();
    kubectl_stdin(&c, &["create", "-f", "-"], Some(&many));
    let table = kubectl(&c, &["get", "cm", "--chunk-size=3"]);
    for i in 0..10 {
        assert!(table.lines().any(|l| l.starts_with(&format!("chunk-{i} "))), "no row for chunk-{i}:\n{table}");
    }
    let names = kubectl(&c, &["get", "cm", "-A", "--chunk-size=3", "-o", "name"]);
    assert_eq!(names.lines().filter(|l| l.starts_with("configmap/chunk-")).count(), 10, "{names}");
    // It really paged: -v=6 logs each request URL.
    let verbose = kubectl_raw(&c, &["get", "cm", "--chunk-size=3", "-v=6"], None);
    let log = String::from_utf8_lossy(&verbose.stderr);
    assert!(verbose.status.success(), "{log}");
    assert!(log.matches("limit=3").count() >= 4 && log.contains("continue="), "{log}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_server_dry_run_changes_nothing() {
    let c = cluster().await;
    assert_eq!(
        kubectl_stdin(&c, &["create", "--dry-run=server", "-f", "-"], Some(CONFIGMAP)).trim(),
        "configmap/settings created (server dry run)"
    );
    let missing = kubectl_raw(&c, &["get", "configmap", "settings"], None);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NotFound"), "{missing:?}");
    kubectl_stdin(&c, &["create", "-f", "-"], Some(CONFIGMAP));
    assert!(kubectl(&c, &["label", "configmap", "settings", "tier=x", "--dry-run=server"]).contains("labeled"));
    assert_eq!(
        kubectl(&c, &["delete", "configmap", "settings", "--dry-run=server"]).trim(),
        "configmap \"settings\" deleted (server dry run)"
    );
    assert!(
        kubectl(&c, &["delete", "configmaps", "--all", "--dry-run=server"])
            .contains("configmap \"settings\" deleted (server dry run)")
    );
    let json: serde_json::Value =
        serde_json::from_str(&kubectl(&c, &["get", "configmap", "settings", "-o", "json"])).unwrap();
    assert!(json["metadata"].get("labels").is_none(), "{json}");
    assert!(json["metadata"].get("deletionTimestamp").is_none(), "{json}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_apply_server_side_and_client_side() {
    let c = cluster().await;
    let applied = |mode: &str| CONFIGMAP.replace("name: settings", "name: applied").replace("fast", mode);
    for mode in ["fast", "fast", "safe"] {
        assert_eq!(
            kubectl_stdin(&c, &["apply", "--server-side", "-f", "-"], Some(&applied(mode))).trim(),
            "configmap/applied serverside-applied"
        );
        assert_eq!(kubectl(&c, &["get", "configmap", "applied", "-o", "jsonpath={.data.mode}"]), mode);
    }
    let managers = kubectl(
        &c,
        &[
            "get",
            "configmap",
            "applied",
            "--show-managed-fields",
            "-o",
            "jsonpath={.metadata.managedFields[*].manager}",
        ],
    );
    assert_eq!(managers, "kubectl");
    let conflict =
        kubectl_raw(&c, &["apply", "--server-side", "--field-manager=other", "-f", "-"], Some(&applied("slow")));
    assert!(!conflict.status.success());
    let err = String::from_utf8_lossy(&conflict.stderr);
    assert!(err.contains("conflict") && err.contains(".data.mode"), "{err}");
    kubectl_stdin(
        &c,
        &["apply", "--server-side", "--field-manager=other", "--force-conflicts", "-f", "-"],
        Some(&applied("slow")),
    );
    assert_eq!(kubectl(&c, &["get", "configmap", "applied", "-o", "jsonpath={.data.mode}"]), "slow");
    // A pod created by apply runs; re-applying it (containers merged by name) changes nothing.
    let rv = || kubectl(&c, &["get", "pod", "web", "-o", "jsonpath={.metadata.resourceVersion}"]);
    assert_eq!(
        kubectl_stdin(&c, &["apply", "--server-side", "-f", "-"], Some(POD)).trim(),
        "pod/web serverside-applied"
    );
    assert!(kubectl(&c, &["wait", "--for=condition=Ready", "pod/web", "--timeout=120s"]).contains("condition met"));
    let before = rv();
    assert_eq!(
        kubectl_stdin(&c, &["apply", "--server-side", "-f", "-"], Some(POD)).trim(),
        "pod/web serverside-applied"
    );
    assert_eq!(rv(), before, "an identical apply is a no-op");

    // Client-side apply: create, change a key and drop another (three-way merge on the
    // last-applied annotation).
    let two_keys = CONFIGMAP.replace("name: settings", "name: csa").replace("mode: fast", "mode: fast\n  extra: \"1\"");
    assert_eq!(kubectl_stdin(&c, &["apply", "-f", "-"], Some(&two_keys)).trim(), "configmap/csa created");
    assert_eq!(kubectl_stdin(&c, &["apply", "-f", "-"], Some(&two_keys)).trim(), "configmap/csa unchanged");
    let one_key = CONFIGMAP.replace("name: settings", "name: csa").replace("fast", "safe");
    assert_eq!(kubectl_stdin(&c, &["apply", "-f", "-"], Some(&one_key)).trim(), "configmap/csa configured");
    assert_eq!(kubectl(&c, &["get", "configmap", "csa", "-o", "jsonpath={.data}"]), r#"{"mode":"safe"}"#);
    c.stop().await;
}

/// `kubectl create -f` of a `v1 List`: kubectl validates a List on the client against
/// `/openapi/v2`, then creates each item.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_creates_the_items_of_a_v1_list() {
    let c = cluster().await;
    let list = "apiVersion: v1\nkind: List\nitems:\n\
                - {apiVersion: v1, kind: ConfigMap, metadata: {name: listed-a}, data: {k: a}}\n\
                - {apiVersion: v1, kind: Secret, metadata: {name: listed-b}, stringData: {k: b}}\n";
    let out = tokio::task::block_in_place(|| kubectl_stdin(&c, &["create", "-f", "-"], Some(list)));
    assert_eq!(out, "configmap/listed-a created\nsecret/listed-b created\n");
    let names = tokio::task::block_in_place(|| kubectl(&c, &["get", "cm/listed-a", "secret/listed-b", "-o", "name"]));
    assert_eq!(names, "configmap/listed-a\nsecret/listed-b\n");
    c.stop().await;
}
