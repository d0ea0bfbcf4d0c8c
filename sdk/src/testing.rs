//! Native test harness: exercise a plugin's logic with plain `cargo test`, no wasm, no host.
//!
//! The helpers do what the host does around a call, with the host's own code where it
//! matters: configuration arrives as the JSON form of a TOML table; [`pod_for`] is the pod
//! the host builds for the context's job (the same [`crate::pod::job_pod`], with the built-in
//! runner config); [`mutate`] sends the pod across as JSON and holds the result to the host's
//! checks ([`crate::pod::Snapshot`]); [`review`] and [`decide`] convert through the WIT types
//! as the host's calls do. Contexts come from [`ContextBuilder`]:
//!
//! ```
//! use keel_sdk::testing::ContextBuilder;
//!
//! let ctx = ContextBuilder::new()
//!     .job_id(7)
//!     .image("docker.io/library/alpine:3.20")
//!     .service("postgres:16", Some("db"))
//!     .variable("DEPLOY_ENV", "staging")
//!     .masked_variable("API_TOKEN", "s3cret")
//!     .build();
//! assert_eq!(ctx.job.variable("DEPLOY_ENV"), Some("staging"));
//! // Not public and no `grants.secrets`: the plugin sees that it exists, not its value.
//! assert_eq!(ctx.job.variable("API_TOKEN"), None);
//! let pod = keel_sdk::testing::pod_for(&ctx);
//! assert_eq!(pod.metadata.labels.unwrap()[keel_sdk::pod::JOB_ID_LABEL], "7");
//! ```

use k8s_openapi::api::core::v1::Pod;

use keel_contract::job::{Job as ContractJob, Service as ContractService, Stage};
use keel_contract::variables::{Definition, Facts, Variables, predefined};

use crate::bindings::keel::plugin::types as wit;
use crate::pod::{HostOwned, MAX_OBJECT_BYTES, PodInput, Snapshot};
use crate::{
    Context, Error, ExecutionStrategy, Image, OverwriteRules, Overwrites, PodMutator, PullPolicy, PullPolicyRequest,
    PullPolicyRules, Service, Variable,
};

/// Configure `T` from a TOML table, the way the host does (TOML -> JSON -> `configure`).
#[cfg(not(target_arch = "wasm32"))]
pub fn configure<T: crate::Plugin>(toml_table: &str) -> Result<T, Error> {
    use crate::Config;
    let table: toml::Table =
        toml::from_str(toml_table).map_err(|e| Error::invalid_config(format!("test TOML: {e}")))?;
    let json = serde_json::to_string(&table).map_err(|e| Error::internal(e.to_string()))?;
    T::configure(Config::from_json(&json)?)
}

/// Builds the [`Context`] a role call gets: the job (id, name, image, services, variables)
/// and the runner's `[runners.kubernetes]` table.
///
/// Variables follow the host's rules. A *public* variable is one whose value may be shown:
/// the host puts it in the containers' `env` and hands its value to every plugin. Masked
/// variables and credentials (`DOCKER_AUTH_CONFIG`, `CI_JOB_TOKEN`, `CI_REGISTRY_PASSWORD`,
/// `KUBERNETES_BEARER_TOKEN`) are not public: they reach the job only through the variables
/// Secret, and a plugin sees them with `value: None` unless the operator grants it
/// `grants.secrets = true` ([`ContextBuilder::grant_secrets`]).
/// The id of [`ContextBuilder::new`]'s job (and so of [`pod`]'s `keel.dev/job-id` label).
pub const DEFAULT_JOB_ID: u64 = 1;

#[derive(Debug, Clone)]
pub struct ContextBuilder {
    id: u64,
    name: String,
    image: Image,
    services: Vec<ContractService>,
    variables: Variables,
    runner_config: serde_json::Value,
    predefined: bool,
    secrets: bool,
}

impl Default for ContextBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ContextBuilder {
    /// Job 1 named `test`, image `alpine:3.20`, no services, the stages of a job with a
    /// `script:`, no runner config, and the predefined variables listed at
    /// [`ContextBuilder::predefined`].
    pub fn new() -> Self {
        ContextBuilder {
            id: DEFAULT_JOB_ID,
            name: "test".into(),
            image: Image { name: "alpine:3.20".into(), ..Default::default() },
            services: Vec::new(),
            variables: Variables::new(),
            runner_config: serde_json::Value::Null,
            predefined: true,
            secrets: false,
        }
    }

    pub fn job_id(mut self, id: u64) -> Self {
        self.id = id;
        self
    }

    pub fn job_name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// The job's `image:` as written (no normalisation: see [`crate::image::ImageRef`]).
    pub fn image(mut self, name: &str) -> Self {
        self.image.name = name.into();
        self
    }

    pub fn image_entrypoint(mut self, entrypoint: &[&str]) -> Self {
        self.image.entrypoint = entrypoint.iter().map(|s| s.to_string()).collect();
        self
    }

    /// The job's `image:pull_policy`, most preferred first.
    pub fn image_pull_policies(mut self, policies: &[PullPolicy]) -> Self {
        self.image.pull_policies = policies.to_vec();
        self
    }

    /// A `services:` entry with an image and an optional alias.
    pub fn service(mut self, image: &str, alias: Option<&str>) -> Self {
        self.services.push(ContractService {
            image: Image { name: image.into(), ..Default::default() },
            alias: alias.map(str::to_string),
            ..Default::default()
        });
        self
    }

    /// A `services:` entry given in full.
    pub fn service_entry(mut self, service: Service) -> Self {
        self.services.push(ContractService {
            image: service.image,
            alias: service.alias,
            command: service.command,
            ..Default::default()
        });
        self
    }

    /// A variable of the job's `variables:` (or the runner's `environment`): `$VAR`
    /// references in it are expanded as the host does, and it is public unless built from a
    /// value that is not.
    pub fn variable(self, key: &str, value: &str) -> Self {
        self.define(key, Definition::expanded(value))
    }

    /// A masked variable: not public, and neither is anything built from it.
    pub fn masked_variable(self, key: &str, value: &str) -> Self {
        self.define(key, Definition { masked: true, ..Definition::expanded(value) })
    }

    /// A non-public variable that is not masked (GitLab sends credentials such as
    /// `CI_JOB_TOKEN` this way).
    pub fn secret_variable(self, key: &str, value: &str) -> Self {
        self.define(key, Definition { public: false, ..Definition::literal(value) })
    }

    /// A file-type variable: its value is a file's content; the job's env holds the path.
    pub fn file_variable(self, key: &str, content: &str) -> Self {
        self.define(key, Definition { file: true, ..Definition::literal(content) })
    }

    /// A variable with every flag given (its value taken as written; hidden at
    /// [`ContextBuilder::build`] when not public and secrets are not granted).
    pub fn variable_entry(self, variable: Variable) -> Self {
        let def = Definition {
            value: variable.value.unwrap_or_default(),
            expand: false,
            masked: variable.masked,
            public: variable.public,
            file: variable.file,
        };
        self.define(&variable.key, def)
    }

    fn define(mut self, key: &str, def: Definition) -> Self {
        self.variables.set(key, def);
        self
    }

    /// The runner's `[runners.kubernetes]` table as JSON (what `ctx.runner_config::<T>()` reads).
    pub fn runner_config(mut self, runner_config: serde_json::Value) -> Self {
        self.runner_config = runner_config;
        self
    }

    /// Whether the operator granted the plugin `grants.secrets = true`: then values of
    /// non-public variables arrive in clear. Default: not granted.
    pub fn grant_secrets(mut self, granted: bool) -> Self {
        self.secrets = granted;
        self
    }

    /// Whether the job starts with the host's predefined variables (default: yes), as
    /// `host render` gives them without flags: `CI`, `GITLAB_CI`, `CI_JOB_ID`, `CI_JOB_NAME`,
    /// `CI_JOB_STAGE` (`test`), `CI_JOB_IMAGE`, `CI_PROJECT_ID` (1), `CI_PROJECT_PATH`
    /// (`local/project`), `CI_BUILDS_DIR` (`/builds`), `CI_PROJECT_DIR`
    /// (`/builds/local/project`), `CI_PIPELINE_ID` (the job id) and the rest of
    /// [`keel_contract::variables::predefined`]. Variables added with the builder come after
    /// them (and win, as in GitLab).
    pub fn predefined(mut self, predefined: bool) -> Self {
        self.predefined = predefined;
        self
    }

    /// The context through the host's own rules: variables resolved by
    /// [`Variables::resolve`] (secrecy carried through `$VAR`), then what the plugin may see
    /// by [`Context::for_plugin`].
    pub fn build(self) -> Context {
        let mut variables = if self.predefined {
            predefined(&Facts {
                job_id: self.id,
                job_name: &self.name,
                stage: "test",
                image: &self.image.name,
                builds_dir: "/builds",
                project_id: 1,
                project_path: "local/project",
                concurrent_id: 0,
                runner_token: "",
                pipeline_id: self.id,
                commit: None,
                timeout: None,
                // The harness stands in for the host: it gives its own version.
                runner_version: env!("CARGO_PKG_VERSION"),
            })
        } else {
            Variables::new()
        };
        variables.extend(self.variables);
        let job = ContractJob {
            id: self.id,
            name: self.name,
            image: self.image,
            services: self.services,
            // Far beyond what a test sets; the host's own bound is the API server's object size.
            variables: variables.resolve(MAX_OBJECT_BYTES).unwrap_or_else(|over| {
                panic!("the test's variables expand past {MAX_OBJECT_BYTES} bytes at {}", over.key)
            }),
            stages: ["step_script", "after_script"].map(|name| Stage { name: name.into(), lines: Vec::new() }).into(),
            timeout: None,
        };
        Context::for_plugin(&job, self.runner_config, self.secrets)
    }
}

/// A context for the default job ([`ContextBuilder::new`]) with the given runner config
/// (`[runners.kubernetes]` as JSON; `Null` for none).
pub fn context(runner_config: serde_json::Value) -> Context {
    ContextBuilder::new().runner_config(runner_config).build()
}

/// The pod the host builds for the default job ([`ContextBuilder::new`]).
pub fn pod() -> Pod {
    pod_for(&ContextBuilder::new().build())
}

/// The pod the host hands the first mutator for `ctx`'s job under the built-in runner config
/// (`host render job.yml` without `--config`): the same builder the host uses, so the job's
/// labels, `generateName`, containers, env, volumes and mounts are the host's.
pub fn pod_for(ctx: &Context) -> Pod {
    // Only a service alias that is not a DNS name fails, and a test that gives one gets the
    // host's error from `mutate` on a pod built some other way; here it is a bug in the test.
    match crate::pod::job_pod(&PodInput::for_job(&ctx.job)) {
        Ok(pod) => pod,
        Err(e) => panic!("the host would refuse this job: {e}"),
    }
}

/// The host's refusal of a result, as the harness reports it.
fn refused(violation: crate::pod::Violation) -> Error {
    Error::internal(format!("the host refuses the result: {violation}"))
}

/// Run a mutator as the host does: the pod crosses as JSON both ways (through
/// [`PodMutator::mutate_json`], as in the component) and the result is held to the host's
/// checks: still a v1 Pod, the `build` container kept, namespace, name, generateName and the
/// host's labels unchanged, at most 1.5 MiB. A refusal is `Error::Internal("the host refuses
/// the result: ...")` with the host's words.
pub fn mutate<T: PodMutator>(plugin: &mut T, ctx: &Context, pod: Pod) -> Result<Pod, Error> {
    let snapshot = Snapshot::of(&pod, &HostOwned::job_pod());
    let json = serde_json::to_string(&pod).map_err(|e| Error::internal(e.to_string()))?;
    let out = plugin.mutate_json(ctx, &json)?;
    snapshot.check(&out).map_err(refused)
}

/// Run an execution strategy's `prepare` as the host does: the same checks as [`mutate`].
pub fn prepare<T: ExecutionStrategy>(plugin: &mut T, ctx: &Context, pod: Pod) -> Result<Pod, Error> {
    let snapshot = Snapshot::of(&pod, &HostOwned::job_pod());
    let out = plugin.prepare(ctx, pod)?;
    let json = serde_json::to_string(&out).map_err(|e| Error::internal(e.to_string()))?;
    snapshot.check(&json).map_err(refused)
}

/// Run overwrite rules as the host does: the request and the answer cross as the WIT record
/// (so what does not survive the boundary does not survive here), and the accepted text is
/// bounded like a pod.
pub fn review<T: OverwriteRules>(plugin: &mut T, ctx: &Context, requested: Overwrites) -> Result<Overwrites, Error> {
    let requested = Overwrites::from(wit::Overwrites::from(requested));
    let accepted = Overwrites::from(wit::Overwrites::from(plugin.review(ctx, requested)?));
    let size: usize = [&accepted.namespace, &accepted.service_account, &accepted.bearer_token]
        .into_iter()
        .flatten()
        .map(String::len)
        .chain(
            [&accepted.pod_labels, &accepted.pod_annotations, &accepted.node_selector, &accepted.node_tolerations]
                .into_iter()
                .flat_map(|m| m.iter().map(|(k, v)| k.len() + v.len())),
        )
        .sum();
    if size > MAX_OBJECT_BYTES {
        return Err(Error::internal(format!(
            "the host refuses the result: the overwrites hold {size} bytes of text, over the limit of 1.5 MiB"
        )));
    }
    Ok(accepted)
}

/// Run a pull-policy decision as the host does for one image. The host asks once per
/// distinct image (build, services, helper) and, with several pull-policy plugins, hands
/// each the previous answer as `request.job`.
pub fn decide<T: PullPolicyRules>(
    plugin: &mut T,
    ctx: &Context,
    request: &PullPolicyRequest,
) -> Result<Vec<PullPolicy>, Error> {
    plugin.decide(ctx, request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_pod_is_the_hosts_shape() {
        let pod = pod();
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[crate::pod::JOB_ID_LABEL], DEFAULT_JOB_ID.to_string());
        assert_eq!(labels["app.kubernetes.io/managed-by"], "keel");
        assert_eq!(pod.metadata.generate_name.as_deref(), Some("runner-project-1-concurrent-0-"));
        assert_eq!(pod.metadata.name, None);
        let spec = pod.spec.unwrap();
        let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["build", "helper"]);
        assert_eq!(spec.containers[0].working_dir.as_deref(), Some("/builds/local/project"));
    }

    #[test]
    fn hidden_variables_have_no_value_unless_granted() {
        let ctx = ContextBuilder::new().masked_variable("T", "x").secret_variable("C", "y").build();
        assert_eq!((ctx.job.variable("T"), ctx.job.variable("C")), (None, None));
        let ctx = ContextBuilder::new().masked_variable("T", "x").grant_secrets(true).build();
        assert_eq!(ctx.job.variable("T"), Some("x"));
        let env = pod_for(&ctx).spec.unwrap().containers[0].env.clone().unwrap();
        assert!(!env.iter().any(|e| e.name == "T"), "masked values never sit in the pod");
    }
}
