//! The SDK's native test harness against the host: the pod `keel_sdk::testing` hands a
//! plugin's tests is the pod the host builds for the same job, and a mutator result the host
//! refuses is refused by the harness too (both use `keel_contract::pod`).

use host::job::parse::JobSource;
use host::prepare::{PrepareRequest, host_owned, prepare};
use keel_sdk::testing::{self, ContextBuilder};
use keel_sdk::{Config, Context, Error, Plugin, Pod, PodMutator};

const JOB: &str = r#"
image:
  name: alpine:3.20
  entrypoint: ["/bin/sh", "-c"]
  pull_policy: if-not-present
services:
  - postgres:16
  - name: redis:7
    alias: cache
    command: ["redis-server", "--port", "6380"]
variables:
  DEPLOY_ENV: staging
  PRICE: "$(not expanded by Kubernetes)"
  API_TOKEN:
    value: s3cret
    masked: true
script:
  - echo hi
"#;

/// The context a plugin gets for `job`, built with the SDK's builder from what the host parsed.
fn sdk_context(job: &host::job::Job) -> Context {
    let mut b = ContextBuilder::new()
        .predefined(false)
        .job_id(job.id)
        .job_name(&job.name)
        .image(&job.image.name)
        .image_entrypoint(&job.image.entrypoint.iter().map(String::as_str).collect::<Vec<_>>())
        .image_pull_policies(&job.image.pull_policies);
    for s in &job.services {
        b = b.service_entry(keel_sdk::Service {
            image: s.image.clone(),
            alias: s.alias.clone(),
            command: s.command.clone(),
        });
    }
    for v in &job.variables {
        b = b.variable_entry(keel_sdk::Variable {
            key: v.key.clone(),
            value: Some(v.value.clone()),
            masked: v.masked,
            public: v.public,
            file: v.file,
        });
    }
    b.build()
}

#[tokio::test]
async fn the_harness_pod_is_the_pod_the_host_builds_for_the_same_job() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yml");
    std::fs::write(&path, JOB).unwrap();
    let rt = host::plugins::Runtime::new(Some(dir.path().join("cache"))).unwrap();
    let req = PrepareRequest {
        pipeline_id: None,
        instance_variables: Vec::new(),
        config: None,
        runner: None,
        job: JobSource::from_arg(path.to_str().unwrap()).into(),
        extra_plugins: Vec::new(),
        strategy: None,
        job_id: 7,
        project_id: 1,
        project_path: "local/project".into(),
        object_suffix: String::new(),
        commit: None,
        require_strategy: false,
    };
    let prepared = prepare(&rt, &req).await.unwrap();
    // No plugins and no strategy: this is the pod the first mutator would receive.
    assert!(prepared.strategy_name().is_none(), "a strategy's prepare would change the pod");
    let host_pod = prepared.objects.pod;

    let ctx = sdk_context(&prepared.job);
    assert_eq!(ctx.job.variable("API_TOKEN"), None, "masked: the plugin sees it exists, not its value");
    let harness_pod = testing::pod_for(&ctx);
    assert_eq!(
        serde_json::to_value(&harness_pod).unwrap(),
        serde_json::to_value(&host_pod).unwrap(),
        "the harness pod differs from the host's"
    );
    // Not a vacuous equality: the job's parts are there.
    let spec = host_pod.spec.as_ref().unwrap();
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["build", "helper", "svc-0", "svc-1"]);
    assert_eq!(host_pod.metadata.labels.as_ref().unwrap()["keel.dev/job-id"], "7");
    assert!(host_pod.metadata.generate_name.is_some() && host_pod.metadata.name.is_none());
    let env = spec.containers[0].env.as_ref().unwrap();
    assert!(env.iter().any(|e| e.name == "DEPLOY_ENV"));
    assert!(!env.iter().any(|e| e.name == "API_TOKEN"), "masked values never sit in the pod");
    assert_eq!(keel_sdk::pod::HostOwned::job_pod(), host_owned());
}

/// Breaks one host rule, chosen by its config.
struct Breaker {
    what: String,
}

impl Plugin for Breaker {
    const NAME: &'static str = "breaker";
    const VERSION: &'static str = "0.0.0";
    fn configure(config: Config) -> Result<Self, Error> {
        #[derive(serde::Deserialize)]
        struct C {
            what: String,
        }
        Ok(Breaker { what: config.parse::<C>()?.what })
    }
}

impl PodMutator for Breaker {
    fn mutate(&mut self, _ctx: &Context, mut pod: Pod) -> Result<Pod, Error> {
        match self.what.as_str() {
            "label" => {
                pod.metadata.labels.get_or_insert_with(Default::default).insert("keel.dev/job-id".into(), "9".into());
            }
            "build" => pod.spec.as_mut().unwrap().containers.retain(|c| c.name != "build"),
            "name" => pod.metadata.name = Some("fixed".into()),
            _ => {}
        }
        Ok(pod)
    }
}

#[test]
fn the_harness_refuses_what_the_host_refuses_with_the_same_words() {
    let ctx = ContextBuilder::new().build();
    for (what, words) in [
        ("label", "changed host-owned field metadata.labels[keel.dev/job-id] of the pod (from \"1\" to \"9\")"),
        ("build", "the pod no longer has the `build` container"),
        ("name", "changed host-owned field metadata.name of the pod (from unset to \"fixed\")"),
    ] {
        let mut plugin: Breaker = testing::configure(&format!("what = {what:?}")).unwrap();
        let before = testing::pod_for(&ctx);
        let err = testing::mutate(&mut plugin, &ctx, before.clone()).unwrap_err();
        assert!(matches!(&err, Error::Internal(m) if m.contains(words)), "{what}: {err:?}");
        let output = serde_json::to_string(&plugin.mutate(&ctx, before.clone()).unwrap()).unwrap();
        assert!(host::plugins::check_pod_output(&before, &host_owned(), &output).is_err(), "{what}: host accepts");
    }
    let mut ok: Breaker = testing::configure("what = \"nothing\"").unwrap();
    assert!(testing::mutate(&mut ok, &ctx, testing::pod_for(&ctx)).is_ok());
}
