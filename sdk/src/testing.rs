//! Native test harness: exercise a plugin's logic with plain `cargo test`, no wasm, no host.
//!
//! The helpers mirror what the host does around a call: configuration arrives as the JSON
//! form of a TOML table, pods cross as JSON, and a mutator's result must still be a Pod with
//! the `build` container and the same identity.

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::{Context, Error, Image, Job, PodMutator, Service, Variable};

/// Configure `T` from a TOML table, the way the host does (TOML -> JSON -> `configure`).
#[cfg(not(target_arch = "wasm32"))]
pub fn configure<T: crate::Plugin>(toml_table: &str) -> Result<T, Error> {
    use crate::Config;
    let table: toml::Table =
        toml::from_str(toml_table).map_err(|e| Error::invalid_config(format!("test TOML: {e}")))?;
    let json = serde_json::to_string(&table).map_err(|e| Error::internal(e.to_string()))?;
    T::configure(Config::from_json(&json)?)
}

/// A context for job `id` with the given runner config (`[runners.kubernetes]` as JSON).
pub fn context(runner_config: serde_json::Value) -> Context {
    Context {
        job: Job {
            id: 42,
            name: "test".into(),
            image: Image { name: "alpine:3.20".into(), ..Default::default() },
            services: vec![
                Service {
                    image: Image { name: "postgres:16".into(), ..Default::default() },
                    alias: Some("db".into()),
                    command: vec![],
                },
                Service { image: Image { name: "redis:7".into(), ..Default::default() }, alias: None, command: vec![] },
            ],
            variables: vec![Variable {
                key: "CI_JOB_ID".into(),
                value: Some("42".into()),
                public: true,
                ..Default::default()
            }],
            stages: vec!["before_script".into(), "script".into(), "after_script".into()],
        },
        runner_config,
    }
}

/// A job pod as the host builds it: `build`, `helper` and two service containers.
pub fn pod() -> Pod {
    let container =
        |name: &str, image: &str| Container { name: name.into(), image: Some(image.into()), ..Default::default() };
    Pod {
        metadata: ObjectMeta {
            name: Some("runner-42".into()),
            namespace: Some("ci".into()),
            labels: Some([("keel.dev/job".to_string(), "42".to_string())].into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![
                container("build", "alpine:3.20"),
                container("helper", "registry.example/keel-helper:1"),
                container("svc-0", "postgres:16"),
                container("svc-1", "redis:7"),
            ],
            restart_policy: Some("Never".into()),
            ..Default::default()
        }),
        status: None,
    }
}

/// Run a mutator as the host would: the pod crosses as JSON both ways and the result is held
/// to the host's rules. Errors use the same words as the host.
pub fn mutate<T: PodMutator>(plugin: &mut T, ctx: &Context, pod: Pod) -> Result<Pod, Error> {
    let before = pod.metadata.clone();
    let json = serde_json::to_string(&pod).map_err(|e| Error::internal(e.to_string()))?;
    let pod: Pod = serde_json::from_str(&json).map_err(|e| Error::internal(e.to_string()))?;
    let out = plugin.mutate(ctx, pod)?;
    let json = serde_json::to_value(&out).map_err(|e| Error::internal(e.to_string()))?;
    if json.get("kind").and_then(|k| k.as_str()) != Some("Pod") {
        return Err(Error::internal("result is not a Pod"));
    }
    let out: Pod = serde_json::from_value(json).map_err(|e| Error::internal(format!("result is not a Pod: {e}")))?;
    if out.metadata.namespace != before.namespace || out.metadata.name != before.name {
        return Err(Error::internal("changed host-owned metadata (namespace or name)"));
    }
    if !out.spec.as_ref().is_some_and(|s| s.containers.iter().any(|c| c.name == "build")) {
        return Err(Error::internal("the pod no longer has the `build` container"));
    }
    Ok(out)
}
