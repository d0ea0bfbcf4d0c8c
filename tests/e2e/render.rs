//! `host render` and `host plugin inspect` end to end: the real `host` binary, the real
//! first-party plugins compiled to wasm32-wasip2 (`target/plugins/*.wasm`), and the Python
//! `kubernetes` client as an independent reader of the output.

#[path = "../support/mod.rs"]
mod support;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::{host_bin, workspace_root};

/// A first-party plugin; missing ones fail the test with the command that builds them.
fn plugin(name: &str) -> PathBuf {
    let path = workspace_root().join("target/plugins").join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the first-party plugins with `plugins/build.sh` (needs `rustup target add wasm32-wasip2`)",
        path.display()
    );
    path
}

fn all_plugins() {
    for p in ["overwrites", "pull-policy", "pod-spec", "labels"] {
        plugin(p);
    }
}

/// Compiled plugins are cached across tests and runs (the runtime's on-disk cache); each
/// test compiling the four components again would only measure Cranelift.
fn shared_cache() -> PathBuf {
    workspace_root().join("target/tmp/e2e-render-plugin-cache")
}

fn host(args: &[&str], _scratch: &Path) -> Output {
    let cache = shared_cache();
    Command::new(host_bin())
        .args(args)
        .current_dir(workspace_root())
        .env("KEEL_PLUGIN_CACHE", cache)
        .env_remove("KEEL_CONFIG")
        .output()
        .expect("run host")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).expect("utf-8 stderr")
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "host failed ({:?}):\n{}", o.status, stderr(o));
    stdout(o)
}

fn failed(o: &Output) -> String {
    assert!(!o.status.success(), "host unexpectedly succeeded:\n{}", stdout(o));
    let err = stderr(o);
    assert!(!err.contains("panicked"), "host panicked:\n{err}");
    err
}

fn docs(yaml: &str) -> Vec<serde_json::Value> {
    yaml.split("\n---\n")
        .map(|d| d.trim_start_matches("---\n"))
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml_ng::from_str(d).unwrap_or_else(|e| panic!("invalid YAML document: {e}\n{d}")))
        .collect()
}

fn kind<'a>(objects: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

#[test]
fn renders_the_sample_job_with_the_shipped_plugins() {
    all_plugins();
    let cache = tempfile::tempdir().expect("temp dir");
    let out = ok(&host(&["render", "--config", "examples/config.toml", "examples/job.yml"], cache.path()));
    let objects = docs(&out);
    let pods = kind(&objects, "Pod");
    assert_eq!(pods.len(), 1, "{out}");
    let pod = pods[0];

    // Overwrites plugin: namespace and label requests match the config's rules.
    assert_eq!(pod["metadata"]["namespace"], "ci-demo");
    assert_eq!(pod["metadata"]["labels"]["tier"], "dev");
    // Labels plugin (pod mutator) with its own config table.
    assert_eq!(pod["metadata"]["labels"]["team"], "platform");
    assert_eq!(pod["spec"]["nodeSelector"]["kubernetes.io/os"], "linux");
    // Host-owned labels survive the mutators; config labels are expanded.
    assert_eq!(pod["metadata"]["labels"]["keel.dev/job-id"], "1");
    assert_eq!(pod["metadata"]["labels"]["project"], "project");
    assert_eq!(pod["metadata"]["annotations"]["keel.dev/job-name"], "job");
    // pod-spec plugin applied the config's strategic patch.
    assert_eq!(pod["spec"]["dnsConfig"]["options"][0]["name"], "ndots");

    let containers = pod["spec"]["containers"].as_array().expect("containers");
    let names: Vec<&str> = containers.iter().map(|c| c["name"].as_str().unwrap_or_default()).collect();
    assert_eq!(names, ["build", "helper", "svc-0"]);
    let build = &containers[0];
    // Pull-policy plugin: the job's list, intersected with the allow-list, first one used.
    assert_eq!(build["imagePullPolicy"], "Always");
    // CPU limit overwrite accepted (2 <= max 2); request from config.
    assert_eq!(build["resources"]["limits"]["cpu"], "2");
    assert_eq!(build["resources"]["requests"]["cpu"], "250m");
    let env = build["env"].as_array().expect("env");
    let var = |k: &str| env.iter().find(|e| e["name"] == k).map(|e| e["value"].clone());
    assert_eq!(var("GREETING"), Some("hello from job".into()));
    // Masked values never sit in the Pod (anyone who may `get pods` would read them): they
    // reach the scripts through the variables Secret, which render prints redacted.
    assert_eq!(var("POSTGRES_PASSWORD"), None, "masked values are not in the pod's env");
    let secrets = kind(&objects, "Secret");
    let vars = secrets
        .iter()
        .find(|s| s["metadata"]["name"].as_str().is_some_and(|n| n.ends_with("-vars")))
        .expect("variables secret");
    assert_eq!(vars["stringData"]["env.sh"], "[MASKED]");
    assert!(!out.contains("example-only"), "a masked value leaked:\n{out}");

    // The service port becomes a Service selecting the pod by the host's label.
    let services = kind(&objects, "Service");
    assert_eq!(services.len(), 1);
    assert_eq!(services[0]["spec"]["selector"]["keel.dev/job-id"], "1");
    assert_eq!(services[0]["spec"]["ports"][0]["port"], 5432);
    assert_eq!(services[0]["metadata"]["ownerReferences"][0]["kind"], "Pod");
}

#[test]
fn json_output_is_a_list_the_python_client_reads() {
    all_plugins();
    let cache = tempfile::tempdir().expect("temp dir");
    let out = ok(&host(
        &["render", "--config", "examples/config.toml", "examples/job.yml", "--output", "json", "--job-id", "77"],
        cache.path(),
    ));
    let list: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(list["kind"], "List");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("objects.json");
    std::fs::write(&file, &out).expect("write");
    // The official client's model classes check required fields and types as they load.
    let script = r#"
import inspect, json, sys
from kubernetes import client
api = client.ApiClient()
class R:
    def __init__(self, data): self.data = data
def load(item):
    # The client's signature changed: (response, type) up to v33, (text, type, content_type) after.
    if "content_type" in inspect.signature(api.deserialize).parameters:
        return api.deserialize(json.dumps(item), "V1" + item["kind"], "application/json")
    return api.deserialize(R(json.dumps(item)), "V1" + item["kind"])
items = json.load(open(sys.argv[1]))["items"]
for item in items:
    model = load(item)
    if item["kind"] == "Pod":
        assert model.metadata.labels["keel.dev/job-id"] == "77", model.metadata.labels
        assert [c.name for c in model.spec.containers][:2] == ["build", "helper"]
        assert model.spec.restart_policy == "Never"
print(len(items))
"#;
    let py = Command::new("python3").arg("-c").arg(script).arg(&file).output().expect("run python3");
    assert!(
        py.status.success(),
        "python kubernetes client rejected the output:\n{}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&py.stdout).trim(), "3", "variables Secret, Pod, Service");
}

#[test]
fn a_denied_overwrite_fails_with_the_plugin_and_variable_named() {
    all_plugins();
    let dir = tempfile::tempdir().expect("temp dir");
    let job = dir.path().join("job.yml");
    std::fs::write(&job, "image: alpine\nscript: [echo]\nvariables:\n  KUBERNETES_NAMESPACE_OVERWRITE: production\n")
        .expect("write job");
    let err = failed(&host(
        &["render", "--config", "examples/config.toml", job.to_str().expect("utf-8")],
        &dir.path().join("cache"),
    ));
    assert!(err.contains("overwrites"), "plugin not named:\n{err}");
    assert!(err.contains("production"), "value not named:\n{err}");
}

#[test]
fn extra_plugins_run_after_the_config_ones() {
    all_plugins();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[[runners]]\nexecutor = \"kubernetes\"\n[runners.kubernetes]\nnamespace = \"x\"\n")
        .expect("write");
    let patch = workspace_root().join("target/plugins/pod-spec.wasm");
    let output = host(
        &[
            "render",
            "--config",
            config.to_str().expect("utf-8"),
            "--plugin",
            patch.to_str().expect("utf-8"),
            "examples/job.yml",
        ],
        &dir.path().join("cache"),
    );
    let out = ok(&output);
    let warning = stderr(&output);
    assert!(warning.contains("requested overwrites refused") && warning.contains("namespace"), "{warning}");
    // No overwrite rules loaded: every requested overwrite is refused (deny by default).
    let pod = kind(&docs(&out), "Pod")[0].clone();
    assert_eq!(pod["metadata"]["namespace"], "x");
    assert!(pod["metadata"]["labels"].get("tier").is_none());
}

#[test]
fn config_errors_name_file_line_and_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[[runners]]\nexecutor = \"kubernetes\"\n[runners.kubernetes]\ncpu_limit = \"a lot\"\n")
        .expect("write");
    let err = failed(&host(&["render", "--config", config.to_str().expect("utf-8"), "examples/job.yml"], dir.path()));
    let want = format!("{}:4:13: key `runners[0].kubernetes.cpu_limit`", config.display());
    assert!(err.contains(&want), "expected {want:?} in:\n{err}");
}

#[test]
fn job_errors_name_file_line_and_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let job = dir.path().join("job.yml");
    std::fs::write(&job, "image: alpine\nscript: [echo]\ntimeout: whenever\n").expect("write");
    let err = failed(&host(
        &["render", "--config", "tests/../examples/config.toml", job.to_str().expect("utf-8")],
        dir.path(),
    ));
    let want = format!("{}:3:10: key `timeout`", job.display());
    assert!(err.contains(&want), "expected {want:?} in:\n{err}");
}

#[test]
fn a_missing_plugin_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[[runners]]\nexecutor = \"kubernetes\"\n[runners.kubernetes]\n[[runners.kubernetes.plugins]]\npath = \"nope.wasm\"\n",
    )
    .expect("write");
    let err = failed(&host(&["render", "--config", config.to_str().expect("utf-8"), "examples/job.yml"], dir.path()));
    // No operator name and nothing loaded: the plugin is named by its file.
    assert!(err.contains("cannot read plugin `nope`"), "{err}");
    assert!(err.contains("nope.wasm"), "{err}");
}

#[test]
fn gitlab_ci_file_with_job_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ci = dir.path().join(".gitlab-ci.yml");
    std::fs::write(
        &ci,
        "default:\n  image: ruby:3.3\n.base:\n  variables: {FROM_BASE: 'yes'}\ntest:\n  extends: .base\n  script: rake\n",
    )
    .expect("write");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[[runners]]\nexecutor = \"kubernetes\"\n").expect("write");
    let job_arg = format!("{}#test", ci.display());
    let out = ok(&host(&["render", "-c", config.to_str().expect("utf-8"), &job_arg], &dir.path().join("cache")));
    let pod = kind(&docs(&out), "Pod")[0].clone();
    let build = &pod["spec"]["containers"][0];
    assert_eq!(build["image"], "ruby:3.3");
    let env = build["env"].as_array().expect("env");
    assert!(env.iter().any(|e| e["name"] == "FROM_BASE" && e["value"] == "yes"));
    assert!(env.iter().any(|e| e["name"] == "CI_JOB_NAME" && e["value"] == "test"));
}

#[test]
fn plugin_inspect_reports_roles_and_wit_version() {
    let wasm = plugin("labels");
    let cache = tempfile::tempdir().expect("temp dir");
    let out = ok(&host(&["plugin", "inspect", wasm.to_str().expect("utf-8")], cache.path()));
    assert!(out.contains("pod-mutator"), "{out}");
    assert!(out.contains("keel:plugin@0.1.0"), "{out}");
    assert!(out.contains("loads:       yes"), "{out}");

    let not_wasm = cache.path().join("bogus.wasm");
    std::fs::write(&not_wasm, b"not a component").expect("write");
    let err = failed(&host(&["plugin", "inspect", not_wasm.to_str().expect("utf-8")], cache.path()));
    assert!(err.contains("bogus"), "{err}");
}

/// PyYAML reads YAML 1.1 (like kubectl's YAML stack): `yes`, `on`, `1e3` must come back as the
/// strings they are, so the YAML output must equal the JSON output object for object.
#[test]
fn yaml_output_means_the_same_to_a_yaml_1_1_reader() {
    all_plugins();
    let dir = tempfile::tempdir().expect("temp dir");
    let args = ["render", "--config", "examples/config.toml", "examples/job.yml"];
    let yaml = ok(&host(&args, dir.path()));
    let json = ok(&host(&[&args[..], &["--output", "json"]].concat(), dir.path()));
    let (y, j) = (dir.path().join("out.yaml"), dir.path().join("out.json"));
    std::fs::write(&y, &yaml).expect("write");
    std::fs::write(&j, &json).expect("write");
    let script = r#"
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]
items = json.load(open(sys.argv[2]))["items"]
assert docs == items, "YAML and JSON output differ for a YAML 1.1 reader"
print(len(docs))
"#;
    let py = Command::new("python3").arg("-c").arg(script).arg(&y).arg(&j).output().expect("run python3");
    assert!(py.status.success(), "{}", String::from_utf8_lossy(&py.stderr));
    assert_eq!(String::from_utf8_lossy(&py.stdout).trim(), "3");
}
