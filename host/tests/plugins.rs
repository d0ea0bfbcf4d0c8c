//! The first-party plugins through the real host runtime: roles from exports and metadata,
//! the compile cache, and each role's chain.

mod support;

use host::job::{Overwrites, PullPolicy, Resources};
use host::plugins::{CompileSource, HostOwned, JobPlugins, OverwriteDecision, PluginSpec, Role, Runtime};
use serde_json::json;

fn spec(name: &str, config: &str) -> PluginSpec {
    PluginSpec {
        name: name.into(),
        path: support::plugin(name),
        config: toml::from_str(config).expect("test config is TOML"),
        ..Default::default()
    }
}

#[tokio::test]
async fn inspect_shows_real_roles_wit_version_and_imports() {
    let rt = Runtime::new(Some(support::cache_dir())).unwrap();
    let cases = [
        ("labels", vec![Role::PodMutator]),
        ("pod-spec", vec![Role::PodMutator]),
        ("pull-policy", vec![Role::PullPolicy]),
        ("overwrites", vec![Role::Overwrites]),
    ];
    for (name, roles) in cases {
        let inspection = rt.inspect(&support::plugin(name)).await.unwrap();
        assert_eq!(inspection.load_error, None, "{name}");
        assert_eq!(inspection.roles, roles, "{name}: roles are exported ∩ declared");
        assert_eq!(inspection.wit_version.as_deref(), Some("0.1.0"));
        assert_eq!(inspection.name.as_deref(), Some(name));
        // The SDK world exports every policy role; only the declared ones count.
        assert!(inspection.exported_roles.contains(&"overwrites".to_string()), "{name}: {inspection}");
        // Deny by default also means: no strategy-host import unless a plugin uses it.
        assert!(!inspection.imports.iter().any(|i| i.contains("strategy-host")), "{name}: {:?}", inspection.imports);
        let text = inspection.to_string();
        assert!(text.contains("loads:       yes"), "{text}");
    }
    let bad = rt.inspect(&support::wat_fixture("wrong-version")).await.unwrap();
    assert_eq!(bad.wit_version.as_deref(), Some("0.9.0"));
    assert!(bad.load_error.unwrap().contains("this host supports 0.1.0"));
}

#[tokio::test]
async fn compiled_components_are_cached_on_disk_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let path = support::plugin("labels");
    let first = Runtime::new(Some(dir.path().to_path_buf())).unwrap().inspect(&path).await.unwrap();
    assert_eq!(first.compile, Some(CompileSource::Compiled));
    // A new Runtime (as in a new process) finds the artifact.
    let rt = Runtime::new(Some(dir.path().to_path_buf())).unwrap();
    let second = rt.inspect(&path).await.unwrap();
    assert_eq!(second.compile, Some(CompileSource::Cached));
    // Within one process a plugin is loaded once: every job shares it (one mapping of its code).
    assert_eq!(rt.inspect(&path).await.unwrap().compile, Some(CompileSource::Loaded));
    let artifacts: Vec<_> = std::fs::read_dir(rt.cache_dir()).unwrap().flatten().collect();
    assert_eq!(artifacts.len(), 1, "one .cwasm per plugin, no temp files left");
    assert!(artifacts[0].file_name().to_string_lossy().ends_with(".cwasm"));
    // A corrupt artifact is recompiled over, not fatal.
    std::fs::write(artifacts[0].path(), b"garbage").unwrap();
    let rt = Runtime::new(Some(dir.path().to_path_buf())).unwrap();
    let third = rt.inspect(&path).await.unwrap();
    assert_eq!(third.compile, Some(CompileSource::Compiled));
    assert_eq!(third.load_error, None);
}

#[tokio::test]
async fn overwrites_are_decided_by_the_rules_plugin_and_denied_by_default_without_one() {
    let rt = Runtime::new(Some(support::cache_dir())).unwrap();
    let runner = json!({
        "namespace_overwrite_allowed": "ci-.*",
        "cpu_limit_overwrite_max_allowed": "2",
    });
    let requested = Overwrites {
        namespace: Some("ci-blue".into()),
        build: Resources { cpu_limit: Some("1500m".into()), ..Default::default() },
        ..Default::default()
    };

    let none: Vec<host::plugins::Plugin> = vec![];
    let mut job = JobPlugins::new(&rt, &none, &support::job(), &runner).await.unwrap();
    let decision = job.overwrites(requested.clone()).await.unwrap();
    assert_eq!(decision, OverwriteDecision::NoRulesLoaded);
    assert_eq!(decision.accepted_or_none(), Overwrites::default());

    let rules = rt.load(spec("overwrites", "")).await.unwrap();
    let mut job = JobPlugins::new(&rt, std::slice::from_ref(&rules), &support::job(), &runner).await.unwrap();
    assert_eq!(job.overwrites(requested.clone()).await.unwrap(), OverwriteDecision::Accepted(requested.clone()));

    let greedy = Overwrites { namespace: Some("kube-system".into()), ..Default::default() };
    let err = job.overwrites(greedy).await.unwrap_err().to_string();
    assert_eq!(
        err,
        "plugin `overwrites` 0.1.0 denied (overwrites): KUBERNETES_NAMESPACE_OVERWRITE=\"kube-system\" is not allowed: does not match namespace_overwrite_allowed = \"ci-.*\""
    );
}

#[tokio::test]
async fn pull_policies_follow_gitlab_rules_through_the_host() {
    let rt = Runtime::new(Some(support::cache_dir())).unwrap();
    let plugin = rt.load(spec("pull-policy", "")).await.unwrap();
    let mut job = JobPlugins::new(&rt, &[plugin], &support::job(), &json!({})).await.unwrap();
    use PullPolicy::*;
    let got = job.pull_policies("alpine", &[], &[Always, IfNotPresent], &[IfNotPresent, Never]).await.unwrap();
    assert_eq!(got, Some(vec![IfNotPresent]));
    let err = job.pull_policies("alpine", &[Never], &[], &[Always]).await.unwrap_err().to_string();
    assert_eq!(
        err,
        "plugin `pull-policy` 0.1.0 denied (pull-policy): image alpine: the job's image:pull_policy [never] is not one of allowed_pull_policies [always]"
    );

    let none: Vec<host::plugins::Plugin> = vec![];
    let mut job = JobPlugins::new(&rt, &none, &support::job(), &json!({})).await.unwrap();
    assert_eq!(job.pull_policies("alpine", &[Never], &[], &[]).await.unwrap(), None);
}

#[tokio::test]
async fn mutators_chain_in_config_order_and_patch_path_is_read_by_the_host() {
    let rt = Runtime::new(Some(support::cache_dir())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let patch_file = dir.path().join("dns.yaml");
    std::fs::write(&patch_file, "dnsPolicy: None\nhostname: from-file\n").unwrap();
    let runner = json!({
        "pod_spec": [
            {"name": "env", "patch_type": "strategic", "patch": "containers:\n  - name: build\n    env:\n      - name: FROM_PATCH\n        value: \"1\"\n"},
            {"name": "dns", "patch_type": "merge", "patch_path": patch_file.to_str().unwrap()},
        ]
    });
    let labels =
        rt.load(spec("labels", "labels = { team = \"platform\" }\nnode_selector = { disk = \"ssd\" }")).await.unwrap();
    let pod_spec = rt.load(spec("pod-spec", "")).await.unwrap();
    let mut job = JobPlugins::new(&rt, &[labels, pod_spec], &support::job(), &runner).await.unwrap();
    let pod = job.mutate_pod(support::pod(), &HostOwned::label("keel.dev/job")).await.unwrap();
    assert_eq!(pod.metadata.labels.as_ref().unwrap()["team"], "platform");
    assert_eq!(pod.metadata.labels.as_ref().unwrap()["keel.dev/job"], "7");
    let spec = pod.spec.unwrap();
    assert_eq!(spec.node_selector.unwrap()["disk"], "ssd");
    assert_eq!(spec.dns_policy.as_deref(), Some("None"));
    assert_eq!(spec.hostname.as_deref(), Some("from-file"));
    let build = spec.containers.iter().find(|c| c.name == "build").unwrap();
    assert_eq!(build.env.as_ref().unwrap()[0].name, "FROM_PATCH");
    assert_eq!(spec.containers.len(), 4);
}

#[tokio::test]
async fn a_missing_patch_path_names_the_entry_and_file() {
    let rt = Runtime::new(Some(support::cache_dir())).unwrap();
    let runner = json!({"pod_spec": [{"name": "gone", "patch_path": "/nonexistent/patch.yaml"}]});
    let none: Vec<host::plugins::Plugin> = vec![];
    let err = match JobPlugins::new(&rt, &none, &support::job(), &runner).await {
        Ok(_) => panic!("must fail"),
        Err(e) => e.to_string(),
    };
    assert_eq!(err, "runner config pod_spec[0] (gone): cannot read patch_path /nonexistent/patch.yaml");
}

#[tokio::test]
async fn secret_values_reach_plugins_only_when_granted() {
    let rt = Runtime::new(Some(support::cache_dir())).unwrap();
    for (grant, want) in [(false, "<hidden>"), (true, "hunter2")] {
        let mut s = spec("fixture-fault", "mode = \"echo-variables\"");
        s.grants.secrets = grant;
        let plugin = rt.load(s).await.unwrap();
        let mut job = JobPlugins::new(&rt, &[plugin], &support::job(), &json!({})).await.unwrap();
        let pod = job.mutate_pod(support::pod(), &HostOwned::default()).await.unwrap();
        let annotations = pod.metadata.annotations.unwrap();
        assert_eq!(annotations["echo/CI_JOB_ID"], "7", "public values always visible");
        assert_eq!(annotations["echo/DEPLOY_TOKEN"], want, "grant = {grant}");
    }
}

#[tokio::test]
async fn a_plugin_without_the_role_is_not_called_for_it() {
    // labels only declares pod-mutator although its component exports every policy role.
    let rt = Runtime::new(Some(support::cache_dir())).unwrap();
    let labels = rt.load(spec("labels", "")).await.unwrap();
    assert_eq!(labels.roles(), &[Role::PodMutator]);
    let mut job = JobPlugins::new(&rt, &[labels], &support::job(), &json!({})).await.unwrap();
    assert_eq!(job.overwrites(Overwrites::default()).await.unwrap(), OverwriteDecision::NoRulesLoaded);
    assert_eq!(job.pull_policies("alpine", &[], &[], &[]).await.unwrap(), None);
}

/// A `tracing` writer that keeps everything in memory for assertions.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn plugin_stdout_and_stderr_become_log_lines_tagged_with_the_plugin() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    // Thread-local default: the current-thread runtime runs the plugin (and WASI's output
    // tasks) on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = Runtime::new(Some(support::cache_dir())).unwrap();
    let plugin =
        rt.load(PluginSpec { name: "chatty".into(), ..spec("fixture-fault", "mode = \"print\"") }).await.unwrap();
    let mut job = JobPlugins::new(&rt, &[plugin], &support::job(), &json!({})).await.unwrap();
    job.mutate_pod(support::pod(), &HostOwned::default()).await.unwrap();
    drop(job);
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let line = |needle: &str| {
        log.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle:?} in:\n{log}")).to_string()
    };
    let out = line("hello from the fixture's stdout");
    assert!(out.contains("plugin.name=\"chatty\"") && out.contains("plugin.stream=\"stdout\""), "{out}");
    let err = line("hello from the fixture's stderr");
    assert!(err.contains("plugin.name=\"chatty\"") && err.contains("plugin.stream=\"stderr\""), "{err}");
}
