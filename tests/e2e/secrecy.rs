//! The one secrecy rule, end to end with the real `host` binary: a variable built from a masked
//! one (`B: "prefix-$A"`) is as secret as `A`. It is in no container `env`, annotation or label
//! of the Pod (read back with kubectl while the job runs), not in `render`'s output, not in a
//! plugin's context without `grants.secrets`, and masked in the trace; Pod fields that would
//! carry a secret fail the job before anything is created, naming the variable and not its value.

use std::process::Output;

use local_cluster::ClusterOptions;
use tokio::io::{AsyncBufReadExt, BufReader};

#[path = "../support/mod.rs"]
mod support;
use support::job::*;
use support::{host_bin, kubectl, succeeded, workspace_root};

const SECRET: &str = "topsecret-XYZ-123";
/// A GitLab personal access token no variable holds: masked by its prefix alone.
const PAT: &str = "glpat-Zx81yQpL0aBcD3eF9gHi";

fn echo_plugin() -> String {
    let wasm = workspace_root().join("target/plugins/fixture-fault.wasm");
    assert!(wasm.exists(), "{} is missing: run plugins/build.sh", wasm.display());
    format!("{}={{ mode = \"echo-variables\" }}", wasm.display())
}

fn job_text(script: &str) -> String {
    format!(
        "image: alpine:3.20\nvariables:\n  A: {{value: \"{SECRET}\", masked: true}}\n  B: \"prefix-$A\"\n  \
         PLAIN: \"plain-$CI_JOB_ID\"\nscript:\n{script}"
    )
}

fn render(dir: &std::path::Path, args: &[&str]) -> Output {
    std::process::Command::new(host_bin())
        .arg("render")
        .args(args)
        .arg("--plugin-cache")
        .arg(dir.join(".cache"))
        .env_remove("KEEL_CONFIG")
        .output()
        .expect("run host render")
}

#[test]
fn render_shows_no_derived_secret_and_plugins_see_none_without_the_grant() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yml");
    std::fs::write(&job, job_text("  - echo \"$B\"\n")).unwrap();
    let job = job.to_str().unwrap();
    let plugin = echo_plugin();

    let text = succeeded(render(dir.path(), &["--plugin", &plugin, job]), "host render");
    assert!(!text.contains(SECRET), "the secret in render's output:\n{text}");
    let docs: Vec<serde_yaml_ng::Value> =
        serde_yaml_ng::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let pod = docs.iter().find(|d| d["kind"] == "Pod").expect("a Pod");
    let annotations = &pod["metadata"]["annotations"];
    // The plugin saw that A and B exist, not their values; public values arrive in clear.
    assert_eq!(annotations["echo/A"], "<hidden>", "{text}");
    assert_eq!(annotations["echo/B"], "<hidden>", "{text}");
    assert_eq!(annotations["echo/PLAIN"], "plain-1", "{text}");
    for c in pod["spec"]["containers"].as_sequence().unwrap() {
        let env: Vec<&str> = c["env"].as_sequence().into_iter().flatten().filter_map(|e| e["name"].as_str()).collect();
        assert!(!env.contains(&"A") && !env.contains(&"B"), "non-public variable in {:?}'s env: {env:?}", c["name"]);
        if c["name"] == "build" {
            assert!(env.contains(&"PLAIN"), "public variables stay in the env: {env:?}");
        }
    }

    // --show-secrets shows the variables Secret, never a derived secret in the Pod.
    let shown = succeeded(render(dir.path(), &["--show-secrets", job]), "host render --show-secrets");
    let docs: Vec<serde_yaml_ng::Value> =
        serde_yaml_ng::Deserializer::from_str(&shown).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let pod = serde_yaml_ng::to_string(docs.iter().find(|d| d["kind"] == "Pod").unwrap()).unwrap();
    assert!(!pod.contains(SECRET), "{pod}");
    assert!(shown.contains("Secret"), "{shown}");
}

#[test]
fn pod_fields_built_from_a_secret_fail_before_anything_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "image: \"registry.example/$A\"\nvariables:\n  A: {value: \"topsecret-XYZ-123\", masked: true}\nscript: [echo]\n",
            vec!["key `image`", "variable A"],
        ),
        (
            "image: alpine:3.20\nvariables:\n  A: {value: \"topsecret-XYZ-123\", masked: true}\n  \
             KUBERNETES_POD_ANNOTATIONS_1: \"note=$A\"\nscript: [echo]\n",
            vec!["KUBERNETES_POD_ANNOTATIONS_1"],
        ),
        (
            "image: alpine:3.20\nservices: [\"db.example/$CI_JOB_TOKEN\"]\nvariables:\n  CI_JOB_TOKEN: glcbt-abc\nscript: [echo]\n",
            vec!["key `services[0]`", "variable CI_JOB_TOKEN"],
        ),
    ];
    for (text, wanted) in cases {
        let job = dir.path().join("job.yml");
        std::fs::write(&job, text).unwrap();
        let out = render(dir.path(), &[job.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(!err.contains(SECRET) && !err.contains("glcbt-abc"), "the value in the message: {err}");
        for w in wanted {
            assert!(err.contains(w), "{w:?} missing in: {err}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_jobs_pod_holds_no_derived_secret_and_the_trace_masks_it() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    // The script waits for a file the test creates once it has read the Pod back.
    let job = f.write(
        "job.yml",
        &job_text(&format!(
            "  - echo \"B is $B\"\n  - echo \"token {PAT} in a log line\"\n  - echo ready\n  \
             - for i in $(seq 300); do test -e .keel-go && break; sleep 0.1; done\n  - test -e .keel-go\n"
        )),
    );
    let plugin = echo_plugin();
    let mut child = f.command(&job, &["--plugin", &plugin]).spawn().expect("start host run");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    read_lines(&mut lines, &mut seen, Some("ready")).await;

    let kubeconfig = f.cluster.kubeconfig_path();
    let pods = succeeded(
        kubectl(kubeconfig, &["get", "pods", "-A", "-l", "app.kubernetes.io/managed-by=keel", "-o", "json"]),
        "kubectl get pods",
    );
    let list: serde_json::Value = serde_json::from_str(&pods).unwrap();
    let pod = &list["items"][0];
    assert!(pod.is_object(), "the job's pod is listed: {pods}");
    assert!(!pods.contains(SECRET), "the secret in the Pod object: {pods}");
    assert_eq!(pod["metadata"]["annotations"]["echo/B"], "<hidden>", "{pods}");
    let name = pod["metadata"]["name"].as_str().unwrap();
    let namespace = pod["metadata"]["namespace"].as_str().unwrap();
    // The job still has B: through the variables Secret, which the script sources.
    succeeded(
        kubectl(
            kubeconfig,
            &["exec", "-n", namespace, name, "-c", "build", "--", "sh", "-c", "touch \"$CI_PROJECT_DIR/.keel-go\""],
        ),
        "kubectl exec",
    );

    read_lines(&mut lines, &mut seen, None).await;
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), Some(0), "{seen}");
    // B's whole value is a secret of its own (not only the part that came from A).
    assert!(seen.contains("B is [MASKED]\n"), "{seen}");
    assert!(seen.contains("token glpat-[MASKED] in a log line"), "{seen}");
    assert!(!seen.contains(SECRET) && !seen.contains("Zx81yQpL"), "a secret in the trace: {seen}");
    f.assert_clean().await;
}
