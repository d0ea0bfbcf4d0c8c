//! Golden files: config errors (`config_errors/*.toml` -> `.err`), job errors
//! (`job_errors/*.yml` -> `.err`) and rendered objects (`golden/*.yaml`).
//!
//! Set `KEEL_BLESS=1` to (re)write the expected files from the current output; review the diff.

use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};

use host::config::Config;
use host::job::parse::{self, JobContext, JobSource};
use host::job::{Overwrites, PullPolicy, Resources};
use host::plugins::Runtime;
use host::pod::{self, PodContext};
use host::render::{self, OutputFormat, RenderRequest};

fn bless() -> bool {
    std::env::var_os("KEEL_BLESS").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Compare `actual` with the file at `expected`, or write it when blessing.
fn check_golden(expected: &Path, actual: &str) -> Result<(), String> {
    if bless() {
        std::fs::write(expected, actual).map_err(|e| format!("cannot write {}: {e}", expected.display()))?;
        return Ok(());
    }
    let want = std::fs::read_to_string(expected)
        .map_err(|e| format!("{}: {e} (run with KEEL_BLESS=1 to create it)", expected.display()))?;
    if want != actual {
        return Err(format!(
            "{} differs (run with KEEL_BLESS=1 to update)\n--- expected\n{want}\n--- actual\n{actual}",
            expected.display()
        ));
    }
    Ok(())
}

/// The error and its causes, one per line, as `main` prints them.
fn chain(e: &dyn Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str("\n  caused by: ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out.push('\n');
    out
}

fn files(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .map(|p| Path::new(dir).join(p.file_name().expect("file name")))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no {suffix} files in {dir}");
    out
}

#[test]
fn config_errors() {
    let mut failures = Vec::new();
    for input in files("tests/config_errors", ".toml") {
        let actual = match Config::load(&input) {
            Ok(_) => format!("unexpectedly loaded without error: {}", input.display()),
            Err(e) => chain(&e),
        };
        if let Err(f) = check_golden(&input.with_extension("err"), &actual) {
            failures.push(f);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn job_errors() {
    let mut failures = Vec::new();
    for input in files("tests/job_errors", ".yml") {
        let text = std::fs::read_to_string(&input).expect("read fixture");
        // `.gitlab-ci.yml` fixtures name the job to select in their first line.
        let job_name = text.lines().next().and_then(|l| l.strip_prefix("# keel-test-job: ")).map(str::to_string);
        let source = JobSource { path: input.clone(), job_name };
        let actual = match parse::load(&source, &JobContext::default()) {
            Err(e) => chain(&e),
            Ok(job) => match host::job::overwrites::requested(&job) {
                // As `render` reports it: the file, then the variable.
                Err(source) => chain(&render::RenderError::Overwrites { path: input.clone(), source }),
                Ok(_) => format!("unexpectedly parsed without error: {}\n", input.display()),
            },
        };
        let expected = PathBuf::from(format!("{}.err", input.display()));
        if let Err(f) = check_golden(&expected, &actual) {
            failures.push(f);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn request(config: &str, job: &str) -> RenderRequest {
    RenderRequest {
        config: Some(PathBuf::from(config)),
        runner: None,
        job: JobSource::from_arg(job).into(),
        extra_plugins: Vec::new(),
        // No strategy: the goldens show the host's base objects.
        strategy: None,
        job_id: 42,
        project_id: 7,
        project_path: "group/project".into(),
        object_suffix: String::new(),
        commit: None,
        require_strategy: false,
        pipeline_id: None,
        instance_variables: Vec::new(),
    }
}

/// The example configs, rendered with the sample job and no plugins (so no overwrite is
/// accepted: deny by default).
#[tokio::test]
async fn rendered_objects() {
    let cache = tempfile::tempdir().expect("temp dir");
    let rt = Runtime::new(Some(cache.path().to_path_buf())).expect("plugin runtime");
    let cases = [
        ("seed001-basic", "tests/fixtures/seed001-basic.toml"),
        ("seed001-volumes", "tests/fixtures/seed001-volumes.toml"),
        ("everything", "tests/fixtures/everything.toml"),
    ];
    let mut failures = Vec::new();
    for (name, config) in cases {
        let mut rendered = render::render(&rt, &request(config, "tests/fixtures/job.yml"))
            .await
            .unwrap_or_else(|e| panic!("render {config}: {}", chain(&e)));
        render::redact(&mut rendered);
        let yaml = render::format(&rendered.objects, OutputFormat::Yaml).expect("yaml");
        if let Err(f) = check_golden(&Path::new("tests/golden").join(format!("{name}.yaml")), &yaml) {
            failures.push(f);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Secrets are masked unless asked for, and the registry Secret is referenced by the pod.
#[tokio::test]
async fn secrets_masked_and_registry_secret_built() {
    let dir = tempfile::tempdir().expect("temp dir");
    let job = dir.path().join("job.yml");
    let auth = r#"{"auths":{"registry.example.com":{"auth":"dXNlcjpwYXNz"}}}"#;
    std::fs::write(
        &job,
        format!("image: alpine\nscript: [echo]\nvariables:\n  DOCKER_AUTH_CONFIG: '{auth}'\n  TOKEN: {{value: abc, masked: true}}\n"),
    )
    .expect("write job");
    let rt = Runtime::new(Some(dir.path().join("cache"))).expect("plugin runtime");
    let req = request("tests/fixtures/seed001-basic.toml", job.to_str().expect("utf-8 path"));
    let clear = render::render(&rt, &req).await.expect("render");
    let secret = clear.objects.secret.clone().expect("registry secret");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
    assert_eq!(secret.data.as_ref().expect("data")[".dockerconfigjson"].0, auth.as_bytes());
    let secret_name = secret.metadata.name.clone().expect("name");
    let spec = clear.objects.pod.spec.clone().expect("spec");
    assert!(spec.image_pull_secrets.expect("pull secrets").iter().any(|s| s.name == secret_name));
    let owner = &secret.metadata.owner_references.expect("owner")[0];
    assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Pod", ""));
    let env = |r: &render::Rendered, key: &str| {
        r.objects.pod.spec.as_ref().expect("spec").containers[0]
            .env
            .as_ref()
            .expect("env")
            .iter()
            .find(|e| e.name == key)
            .and_then(|e| e.value.clone())
    };
    // Non-public values never sit in the Pod: only in the variables Secret the scripts source.
    assert_eq!(env(&clear, "TOKEN"), None);
    assert_eq!(env(&clear, "DOCKER_AUTH_CONFIG"), None);
    let vars = clear.objects.variables.data.as_ref().expect("variables data");
    let env_sh = String::from_utf8_lossy(&vars["env.sh"].0).into_owned();
    assert!(env_sh.contains("export TOKEN='abc'\n"), "{env_sh}");

    let mut masked = clear.clone();
    render::redact(&mut masked);
    assert_eq!(masked.objects.variables.string_data.as_ref().expect("redacted")["env.sh"], render::MASKED);
    let out = render::format(&masked.objects, OutputFormat::Yaml).expect("yaml");
    assert!(!out.contains("abc") && !out.contains("dXNlcjpwYXNz"), "secret leaked into output:\n{out}");
}

/// Accepted overwrites -> pod fields, one row per overwrite.
#[test]
fn overwrites_reach_the_pod() {
    let config = Config::load(Path::new("tests/fixtures/everything.toml")).expect("config");
    let runner = config.runner(None, Path::new("everything.toml")).expect("runner");
    let k8s = runner.kubernetes.clone().expect("kubernetes");
    let job = parse::load(
        &JobSource::from_arg("tests/fixtures/job.yml"),
        &JobContext { builds_dir: "/workspace".into(), ..JobContext::default() },
    )
    .expect("job");
    let build =
        |o: Overwrites| pod::build(runner, &k8s, &job, &o, &BTreeMap::new(), &PodContext::default()).expect("pod").pod;
    let base = build(Overwrites::default());
    let base_spec = base.spec.clone().expect("spec");
    assert_eq!(base.metadata.namespace.as_deref(), Some("ci"));
    assert_eq!(base_spec.service_account_name.as_deref(), Some("ci-builder"));

    type Check = fn(&k8s_openapi::api::core::v1::Pod) -> bool;
    let rows: Vec<(&str, Overwrites, Check)> = vec![
        ("namespace", Overwrites { namespace: Some("ci-x".into()), ..Default::default() }, |p| {
            p.metadata.namespace.as_deref() == Some("ci-x")
        }),
        ("service account", Overwrites { service_account: Some("deployer".into()), ..Default::default() }, |p| {
            p.spec.as_ref().unwrap().service_account_name.as_deref() == Some("deployer")
        }),
        (
            "pod label",
            Overwrites { pod_labels: BTreeMap::from([("tier".into(), "$CI_JOB_NAME".into())]), ..Default::default() },
            |p| {
                p.metadata.labels.as_ref().unwrap()["tier"] == "job"
                    && p.metadata.labels.as_ref().unwrap()["team"] == "infra"
            },
        ),
        (
            "host label wins",
            Overwrites { pod_labels: BTreeMap::from([(pod::JOB_ID_LABEL.into(), "999".into())]), ..Default::default() },
            |p| p.metadata.labels.as_ref().unwrap()[pod::JOB_ID_LABEL] == "1",
        ),
        (
            "pod annotation",
            Overwrites { pod_annotations: BTreeMap::from([("a/b".into(), "c".into())]), ..Default::default() },
            |p| p.metadata.annotations.as_ref().unwrap()["a/b"] == "c",
        ),
        (
            "node selector",
            Overwrites {
                node_selector: BTreeMap::from([("kubernetes.io/arch".into(), "arm64".into())]),
                ..Default::default()
            },
            |p| p.spec.as_ref().unwrap().node_selector.as_ref().unwrap()["kubernetes.io/arch"] == "arm64",
        ),
        (
            "toleration",
            Overwrites {
                node_tolerations: BTreeMap::from([("gpu".into(), "yes:NoExecute".into())]),
                ..Default::default()
            },
            |p| {
                p.spec.as_ref().unwrap().tolerations.as_ref().unwrap().iter().any(|t| {
                    t.key.as_deref() == Some("gpu")
                        && t.operator.as_deref() == Some("Equal")
                        && t.value.as_deref() == Some("yes")
                        && t.effect.as_deref() == Some("NoExecute")
                })
            },
        ),
        (
            "build cpu limit",
            Overwrites { build: Resources { cpu_limit: Some("3".into()), ..Default::default() }, ..Default::default() },
            |p| {
                let r = p.spec.as_ref().unwrap().containers[0].resources.as_ref().unwrap();
                r.limits.as_ref().unwrap()["cpu"].0 == "3" && r.requests.as_ref().unwrap()["cpu"].0 == "250m"
            },
        ),
        (
            "helper memory request",
            Overwrites {
                helper: Resources { memory_request: Some("32Mi".into()), ..Default::default() },
                ..Default::default()
            },
            |p| {
                p.spec.as_ref().unwrap().containers[1].resources.as_ref().unwrap().requests.as_ref().unwrap()["memory"]
                    .0
                    == "32Mi"
            },
        ),
        (
            "service ephemeral storage limit",
            Overwrites {
                service: Resources { ephemeral_storage_limit: Some("2Gi".into()), ..Default::default() },
                ..Default::default()
            },
            |p| {
                p.spec.as_ref().unwrap().containers[2..]
                    .iter()
                    .all(|c| c.resources.as_ref().unwrap().limits.as_ref().unwrap()["ephemeral-storage"].0 == "2Gi")
            },
        ),
    ];
    for (name, overwrites, check) in rows {
        let pod = build(overwrites);
        assert!(
            check(&pod),
            "overwrite row {name:?} not reflected in the pod: {}",
            serde_json::to_string_pretty(&pod).unwrap()
        );
    }
}

/// The decided pull policy is the container's `imagePullPolicy`; none decided: unset.
#[test]
fn pull_policy_reaches_containers() {
    let config = Config::load(Path::new("tests/fixtures/seed001-basic.toml")).expect("config");
    let runner = config.runner(None, Path::new("c.toml")).expect("runner");
    let k8s = runner.kubernetes.clone().expect("kubernetes");
    let job = parse::load(&JobSource::from_arg("tests/fixtures/job.yml"), &JobContext::default()).expect("job");
    let policies = BTreeMap::from([("golang:1.23".to_string(), vec![PullPolicy::Never, PullPolicy::Always])]);
    let pod =
        pod::build(runner, &k8s, &job, &Overwrites::default(), &policies, &PodContext::default()).expect("pod").pod;
    let containers = pod.spec.expect("spec").containers;
    assert_eq!(containers[0].image_pull_policy.as_deref(), Some("Never"));
    assert_eq!(containers[1].image_pull_policy, None);
}

#[test]
fn default_pull_policy_rules() {
    use PullPolicy::*;
    let p = Path::new("c.toml");
    assert_eq!(render::default_pull_policies("i", &[Always], &[Never], &[], p).unwrap(), vec![Always]);
    assert_eq!(render::default_pull_policies("i", &[], &[Never], &[], p).unwrap(), vec![Never]);
    assert_eq!(render::default_pull_policies("i", &[], &[], &[IfNotPresent], p).unwrap(), vec![IfNotPresent]);
    assert_eq!(render::default_pull_policies("i", &[Always, Never], &[], &[Never], p).unwrap(), vec![Never]);
    let e = render::default_pull_policies("img", &[Always], &[], &[Never], p).unwrap_err();
    assert_eq!(
        e.to_string(),
        "pull_policy [Always] for image img is not one of the allowed_pull_policies [Never] of runner config c.toml"
    );
}

/// A service's own variables reach its container only: public ones as values, one built from a
/// masked variable by `valueFrom` the variables Secret; `image:kubernetes:user` becomes the
/// container's user, checked against the runner's `allowed_users`/`allowed_groups`.
#[test]
fn service_variables_and_container_users() {
    let config = Config::load(Path::new("tests/fixtures/seed001-basic.toml")).expect("config");
    let runner = config.runner(None, Path::new("seed001-basic.toml")).expect("runner");
    let mut k8s = runner.kubernetes.clone().expect("kubernetes");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("job.yml");
    std::fs::write(
        &file,
        "image: {name: alpine, kubernetes: {user: \"1000:1001\"}}\n\
         variables:\n  DB_PASS: {value: pw-secret-1, masked: true}\n  PUBLIC: hello\n\
         services:\n  - name: postgres:16\n    alias: db\n    kubernetes: {user: 999}\n    variables:\n\
         \x20     POSTGRES_PASSWORD: $DB_PASS\n      POSTGRES_DB: app-$PUBLIC\n      PUBLIC: own\n\
         script: [echo]\n",
    )
    .expect("write job");
    let job = parse::load(&JobSource::from_arg(file.to_str().expect("utf-8")), &JobContext::default()).expect("job");
    assert!(job.secret_values().contains(&"pw-secret-1".to_string()), "a derived service value is masked");
    let build = |k8s: &host::config::Kubernetes| {
        pod::build(runner, k8s, &job, &Overwrites::default(), &BTreeMap::new(), &PodContext::default())
    };
    let objects = build(&k8s).expect("pod");
    let spec = objects.pod.spec.clone().expect("spec");
    let container = |name: &str| spec.containers.iter().find(|c| c.name == name).expect(name).clone();
    let env = |c: &k8s_openapi::api::core::v1::Container, key: &str| {
        c.env.as_ref().expect("env").iter().filter(|e| e.name == key).cloned().collect::<Vec<_>>()
    };
    let svc = container("svc-0");
    // As GitLab Runner expands them: the service's own definitions over the job's.
    assert_eq!(env(&svc, "POSTGRES_DB")[0].value.as_deref(), Some("app-own"));
    let public = env(&svc, "PUBLIC");
    assert_eq!((public.len(), public[0].value.as_deref()), (1, Some("own")), "the service's own value wins, once");
    let password = &env(&svc, "POSTGRES_PASSWORD")[0];
    assert_eq!(password.value, None);
    let from = password.value_from.as_ref().and_then(|f| f.secret_key_ref.as_ref()).expect("secretKeyRef");
    assert_eq!(Some(&from.name), objects.variables.metadata.name.as_ref());
    assert_eq!(objects.variables.data.as_ref().expect("data")[&from.key].0, b"pw-secret-1");
    assert!(env(&container("build"), "POSTGRES_DB").is_empty(), "service variables stay in the service");
    let pod_yaml = serde_yaml_ng::to_string(&objects.pod).expect("yaml");
    assert!(!pod_yaml.contains("pw-secret-1"), "the secret is in the Pod:\n{pod_yaml}");

    let user = |c: &k8s_openapi::api::core::v1::Container| {
        c.security_context.as_ref().map(|s| (s.run_as_user, s.run_as_group)).unwrap_or_default()
    };
    assert_eq!(user(&container("build")), (Some(1000), Some(1001)));
    assert_eq!(user(&container("helper")), (None, None), "the helper never takes the job's user");
    assert_eq!(user(&svc), (Some(999), None));

    k8s.allowed_users = vec!["1000".into()];
    let refused = build(&k8s).expect_err("uid 999 is not allowed").to_string();
    assert!(refused.contains("services[0] kubernetes.user") && refused.contains("allowed_users"), "{refused}");
    k8s.allowed_users = vec!["1000".into(), "999".into()];
    k8s.allowed_groups = vec!["0".into()];
    let refused = build(&k8s).expect_err("gid 1001 is not allowed").to_string();
    assert!(refused.contains("image kubernetes.user") && refused.contains("gid 1001"), "{refused}");
}
