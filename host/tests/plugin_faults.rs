//! A misbehaving plugin fails its job with a message naming it and the cause, and the host
//! carries on: the next job on the same Runtime works.
//!
//! Real compiled components: `plugins/fixtures/fault` (one crate, misbehaviour chosen by its
//! config) and hand-written WAT for the load-time faults.

mod support;

use std::time::Duration;

use host::plugins::{Allocation, HostOwned, JobPlugins, Limits, PluginError, PluginSpec, Runtime};

fn fault_spec(mode: &str) -> PluginSpec {
    let mut config = toml::Table::new();
    config.insert("mode".into(), toml::Value::String(mode.into()));
    PluginSpec {
        name: format!("fault-{mode}"),
        path: support::plugin("fixture-fault"),
        config,
        // Small limits keep the endless loop and the memory bomb cheap; they are limits the
        // host enforces, not expectations about how fast anything runs.
        limits: Limits { memory_bytes: 32 * 1024 * 1024, call_timeout: Duration::from_millis(500) },
        ..Default::default()
    }
}

fn labels_spec() -> PluginSpec {
    let config: toml::Table = toml::from_str("labels = { team = \"platform\" }").unwrap();
    PluginSpec { name: "labels".into(), path: support::plugin("labels"), config, ..Default::default() }
}

/// After any failure, a fresh job with a healthy plugin on the same runtime still works.
async fn next_job_works(rt: &Runtime) {
    let labels = rt.load(labels_spec()).await.expect("load labels");
    let mut job =
        JobPlugins::new(rt, &[labels], &support::job(), &serde_json::json!({})).await.expect("next job's plugins");
    let pod = job.mutate_pod(support::pod(), &HostOwned::label("keel.dev/job")).await.expect("next job mutates");
    assert_eq!(pod.metadata.labels.unwrap()["team"], "platform");
}

async fn mutate_fails(rt: &Runtime, mode: &str) -> PluginError {
    let plugin = rt.load(fault_spec(mode)).await.unwrap_or_else(|e| panic!("load fault-{mode}: {e}"));
    let mut job = JobPlugins::new(rt, &[plugin], &support::job(), &serde_json::json!({})).await.expect("configure");
    let err = job.mutate_pod(support::pod(), &HostOwned::label("keel.dev/job")).await.expect_err("fault must fail");
    // Same job, same instance: after a trap it is never entered again.
    if matches!(err, PluginError::Trap { .. } | PluginError::Deadline { .. } | PluginError::MemoryLimit { .. }) {
        let again = job.mutate_pod(support::pod(), &HostOwned::default()).await.expect_err("stopped");
        assert!(matches!(again, PluginError::Stopped { .. }), "{again}");
        assert!(
            again.to_string().contains(&format!("plugin `fault-{mode}` (fixture-fault) 0.1.0 was stopped")),
            "{again}"
        );
    }
    err
}

#[tokio::test]
async fn each_fault_is_reported_with_plugin_and_cause_and_the_host_carries_on() {
    let rt = Runtime::new(Some(support::cache_dir())).unwrap();
    let cases: [(&str, &str); 7] = [
        ("endless-loop", "exceeded its time limit of 500ms in pod-mutator.mutate"),
        ("memory-bomb", "exceeded its memory limit of 33554432 bytes in pod-mutator.mutate"),
        ("panic", "crashed (trap) in pod-mutator.mutate"),
        ("not-json", "returned an invalid result from pod-mutator.mutate: output is not JSON"),
        ("not-a-pod", "output is not a Kubernetes v1 Pod: apiVersion/kind is \"v1\"/\"ConfigMap\", expected v1/Pod"),
        ("drop-build", "the pod no longer has the `build` container"),
        ("change-namespace", "changed host-owned field metadata.namespace of the pod (from \"ci\" to \"kube-system\")"),
    ];
    for (mode, cause) in cases {
        let err = mutate_fails(&rt, mode).await;
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("plugin `fault-{mode}` (fixture-fault) 0.1.0")),
            "{mode}: message names plugin (the config's name, then its own) and version: {msg}"
        );
        assert!(msg.contains(cause), "{mode}: expected cause {cause:?} in: {msg}");
        next_job_works(&rt).await;
    }
}

#[tokio::test]
async fn a_panic_reports_the_panic_message() {
    let rt = Runtime::new(Some(support::cache_dir())).unwrap();
    let msg = mutate_fails(&rt, "panic").await.to_string();
    assert!(msg.contains("fixture panics on purpose"), "{msg}");
}

#[tokio::test]
async fn a_denial_is_not_a_crash_and_names_the_plugin() {
    let rt = Runtime::new(Some(support::cache_dir())).unwrap();
    let err = mutate_fails(&rt, "deny").await;
    assert_eq!(err.to_string(), "plugin `fault-deny` (fixture-fault) 0.1.0 denied (pod-mutator): fixture says no");
}

#[tokio::test]
async fn bad_config_is_rejected_when_the_plugin_loads() {
    let rt = Runtime::new(Some(support::cache_dir())).unwrap();
    let mut spec = fault_spec("ok");
    spec.config.insert("colour".into(), toml::Value::String("red".into()));
    let err = rt.load(spec).await.expect_err("unknown key must be rejected at load, before any job").to_string();
    assert!(
        err.starts_with(
            "plugin `fault-ok` (fixture-fault) 0.1.0: configuration rejected: plugin table: unknown field `colour`"
        ),
        "{err}"
    );
    next_job_works(&rt).await;
}

#[tokio::test]
async fn without_an_operator_name_errors_use_the_plugins_own_name() {
    let rt = Runtime::new(Some(support::cache_dir())).unwrap();
    let spec = PluginSpec { name: String::new(), ..fault_spec("deny") };
    let plugin = rt.load(spec).await.unwrap();
    // The file is fixture-fault.wasm, cargo's artifact fixture_fault.wasm: neither matters.
    assert_eq!(plugin.name(), "fixture-fault");
    let mut job = JobPlugins::new(&rt, &[plugin], &support::job(), &serde_json::json!({})).await.unwrap();
    let err = job.mutate_pod(support::pod(), &HostOwned::default()).await.unwrap_err();
    assert_eq!(err.to_string(), "plugin `fixture-fault` 0.1.0 denied (pod-mutator): fixture says no");
}

#[tokio::test]
async fn a_component_for_another_wit_version_is_refused_at_load() {
    let rt = Runtime::new(Some(support::cache_dir())).unwrap();
    let path = support::wat_fixture("wrong-version");
    let err =
        rt.load(PluginSpec { name: "future".into(), path: path.clone(), ..Default::default() }).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("plugin `future` ({}) was built for WIT keel:plugin@0.9.0; this host supports 0.1.0", path.display())
    );
    next_job_works(&rt).await;
}

#[tokio::test]
async fn a_component_needing_an_unknown_import_is_refused_at_load() {
    let rt = Runtime::new(Some(support::cache_dir())).unwrap();
    let err = rt
        .load(PluginSpec { name: "greedy".into(), path: support::wat_fixture("missing-import"), ..Default::default() })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("plugin `greedy`"), "{err}");
    assert!(err.contains("cannot be linked") && err.contains("keel:plugin/secrets@0.1.0"), "{err}");
    next_job_works(&rt).await;
}

#[tokio::test]
async fn a_missing_file_names_plugin_and_path() {
    let rt = Runtime::new(Some(support::cache_dir())).unwrap();
    let err = rt
        .load(PluginSpec { name: "ghost".into(), path: "/nonexistent/ghost.wasm".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "cannot read plugin `ghost` from /nonexistent/ghost.wasm");
}

/// The pooling allocator has a fixed number of slots: a job that needs one more instance than
/// the pool holds fails at once with a message saying so, and works again once a slot is free.
#[tokio::test]
async fn a_full_instance_pool_is_a_clear_error_not_a_hang() {
    let rt = Runtime::with_allocation(
        Some(support::cache_dir()),
        Allocation::Pooling { plugin_instances: 1, keep_resident_bytes: 0 },
    )
    .unwrap();
    let labels = rt.load(labels_spec()).await.expect("load labels (its probe instance is freed again)");
    let plugins = [labels];
    let first = JobPlugins::new(&rt, &plugins, &support::job(), &serde_json::json!({})).await.expect("first job fits");
    let err =
        JobPlugins::new(&rt, &plugins, &support::job(), &serde_json::json!({})).await.err().expect("no slot left");
    assert!(matches!(err, PluginError::PoolExhausted { limit: 1, .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("plugin `labels` 0.1.0: no free instance slot: 1 plugin instances are already alive"),
        "{msg}"
    );
    drop(first);
    let mut again =
        JobPlugins::new(&rt, &plugins, &support::job(), &serde_json::json!({})).await.expect("slot freed with the job");
    let pod = again.mutate_pod(support::pod(), &HostOwned::label("keel.dev/job")).await.expect("mutates");
    assert_eq!(pod.metadata.labels.unwrap()["team"], "platform");
}
