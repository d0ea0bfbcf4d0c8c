//! The job pod's contract: the shape of the pod the host builds for a job, and the checks the
//! host applies to what a mutator returns.
//!
//! One source for both sides: the host builds every job's pod with [`job_pod`] and checks
//! every mutator's output with [`Snapshot::check`]; the native test harness
//! ([`crate::testing`]) calls the same two functions, so the pod a plugin's tests see is the
//! pod the host would hand it for the same job (with the built-in runner config), and a
//! result the host would refuse is refused in `cargo test` with the same words.
//!
//! The host depends on this crate for it, as Kubewarden's policy evaluator depends on its
//! policy SDK for the types both sides share; nothing here knows about wasm.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HostAlias, LocalObjectReference, Pod, PodSecurityContext,
    PodSpec, ResourceRequirements, SecretVolumeSource, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The label the host finds its pods (and selects them from Services) by.
pub const JOB_ID_LABEL: &str = "keel.dev/job-id";
/// Marks every object keel creates, so an external cleaner can find orphans.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "keel";
/// GitLab's `pod` label: the project-unique name.
pub const POD_LABEL: &str = "pod";
/// The container the job's script runs in; every pod must keep it.
pub const BUILD_CONTAINER: &str = "build";
pub const HELPER_CONTAINER: &str = "helper";
/// The checkout, shared by build, helper and services (GitLab's `repo` emptyDir).
pub const REPO_VOLUME: &str = "repo";
/// Where the job's variables are mounted (from the variables Secret) in build and helper.
/// Stage scripts source `VARS_DIR/env.sh`; file variables are files here.
pub const VARS_DIR: &str = "/keel-vars";
/// The volume holding the variables Secret.
pub const VARS_VOLUME: &str = "keel-vars";
/// PID 1 of build and helper in the base pod: a shell that idles until the pod is deleted.
/// Strategies that need something else replace it in their `prepare`. Only `sh` and `sleep`
/// are needed, which every image that can run a job script has.
pub const IDLE: &str = "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done";
/// Default helper image (GitLab's), used when the runner config names none.
pub const DEFAULT_HELPER_IMAGE: &str =
    "registry.gitlab.com/gitlab-org/gitlab-runner/gitlab-runner-helper:x86_64-latest";
pub const DEFAULT_NAMESPACE: &str = "default";
/// The largest object the API server stores (etcd's default request size); the bound on a
/// pod a mutator returns.
pub const MAX_OBJECT_BYTES: usize = 3 << 19;

/// One container of the pod, as the host decided it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerInput {
    pub image: String,
    /// Overrides the image's entrypoint when non-empty.
    pub entrypoint: Vec<String>,
    /// The first of the decided pull policies, as Kubernetes spells it.
    pub pull_policy: Option<String>,
    pub resources: Option<ResourceRequirements>,
    /// The user the container runs as (the job's `image:kubernetes:user`); `None`: the image's
    /// or the pod security context's.
    pub run_as: Option<RunAs>,
}

/// A container's `runAsUser` and `runAsGroup`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunAs {
    pub user: i64,
    pub group: Option<i64>,
}

/// A `services:` entry (the runner's first, then the job's).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceInput {
    pub container: ContainerInput,
    pub command: Vec<String>,
    /// GitLab's alias, possibly comma-separated; `None`: derived from the image name.
    pub alias: Option<String>,
    pub ports: Vec<ContainerPort>,
    /// The service's own variables, over the job's public ones (a value that is not public comes
    /// from the variables Secret by `valueFrom`).
    pub env: Vec<EnvVar>,
}

/// Everything the pod is made of, decided by the host from the runner config, the job and
/// the accepted overwrites. [`PodInput::for_job`] fills in what the built-in config gives.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodInput {
    pub job_id: u64,
    /// `runner-<short token>-project-<id>-concurrent-<n>` ([`project_unique_name`]).
    pub unique_name: String,
    pub namespace: String,
    /// The operator's and the accepted labels; the host's own are added over them.
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub builds_dir: String,
    /// The build container's working directory (`CI_PROJECT_DIR`).
    pub project_dir: Option<String>,
    /// The variables Secret's name ([`variables_secret_name`]).
    pub variables_secret: String,
    /// Public variables ([`public_env`]).
    pub env: Vec<EnvVar>,
    pub build: ContainerInput,
    pub helper: ContainerInput,
    pub services: Vec<ServiceInput>,
    /// The operator's volumes, each mounted in build, helper and services.
    pub volumes: Vec<(Volume, VolumeMount)>,
    pub privileged: bool,
    pub allow_privilege_escalation: Option<bool>,
    pub pod_security_context: Option<PodSecurityContext>,
    pub service_account: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub image_pull_secrets: Vec<LocalObjectReference>,
    pub termination_grace_period_seconds: Option<i64>,
    pub pod_resources: Option<ResourceRequirements>,
}

/// A variable as the pod builder needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VariableRef<'a> {
    pub key: &'a str,
    pub value: &'a str,
    pub public: bool,
    pub file: bool,
}

/// Why the pod cannot be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodShapeError {
    /// Service `index` (its image) has an alias that gives no valid DNS name.
    InvalidAlias { index: usize, image: String, alias: String },
}

impl std::fmt::Display for PodShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PodShapeError::InvalidAlias { index, image, alias } => {
                write!(f, "service {index} ({image}): alias {alias:?} gives no valid DNS name")
            }
        }
    }
}

impl std::error::Error for PodShapeError {}

/// Lower-case DNS-1123 label from arbitrary text (GitLab's `MakeRFC1123Compatible`).
pub fn dns_label(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let trimmed: String = out.trim_matches('-').chars().take(max).collect();
    trimmed.trim_end_matches('-').to_string()
}

/// Whether `s` is a DNS-1123 label (lower case, digits, `-`, at most 63).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `runner-<short token>-project-<id>-concurrent-<n>`: GitLab's project-unique name.
pub fn project_unique_name(runner_token: &str, project_id: u64, concurrent_id: u32) -> String {
    dns_label(
        &format!(
            "runner-{}-project-{project_id}-concurrent-{concurrent_id}",
            crate::variables::short_token(runner_token)
        ),
        57,
    )
}

/// The variables Secret's name (named before the pod exists, so no generateName).
pub fn variables_secret_name(unique_name: &str, suffix: &str) -> String {
    format!("{}-{}-vars", dns_label(unique_name, 40), dns_label(suffix, 12))
}

/// Kubernetes expands `$(VAR)` in env values; job variables are literal text.
pub fn escape_env(value: &str) -> String {
    value.replace("$(", "$$(")
}

/// The containers' `env`: public variables only (GitLab's rule), because anyone who may
/// `get pods` reads the env; the rest reach the scripts through the variables Secret. One
/// entry per key, the winning (last) definition's value, in first-definition order; a key
/// whose winning definition is not public, or is a file, is left out.
pub fn public_env(variables: &[VariableRef<'_>]) -> Vec<EnvVar> {
    let mut seen = std::collections::BTreeSet::new();
    variables
        .iter()
        .filter(|v| seen.insert(v.key))
        .filter_map(|v| {
            let winner = variables.iter().rev().find(|w| w.key == v.key)?;
            (winner.public && !winner.file).then(|| EnvVar {
                name: v.key.to_string(),
                value: Some(escape_env(winner.value)),
                ..Default::default()
            })
        })
        .collect()
}

/// Default DNS aliases of a service image: `tutum/wordpress:4` -> `tutum-wordpress`,
/// `tutum__wordpress` (GitLab's rule).
pub fn image_aliases(image: &str) -> Vec<String> {
    let without_digest = image.split('@').next().unwrap_or(image);
    // A ':' after the last '/' starts the tag; one before it belongs to a registry port.
    let name = match without_digest.rsplit_once(':') {
        Some((n, tag)) if !tag.contains('/') => n,
        _ => without_digest,
    };
    let mut out = vec![name.replace('/', "-"), name.replace('/', "__")];
    out.dedup();
    out
}

/// The DNS names a service answers to: its aliases, or the image's default ones.
pub fn service_aliases(service: &ServiceInput) -> Vec<String> {
    match &service.alias {
        Some(a) => a.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        None => image_aliases(&service.container.image),
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume { name: name.to_string(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() }
}

/// A volume mount (`read_only` and `sub_path` only when set, as kubectl shows them).
pub fn mount(name: &str, path: &str, read_only: bool, sub_path: Option<&str>) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: read_only.then_some(true),
        sub_path: sub_path.map(str::to_string),
        ..Default::default()
    }
}

/// The host labels of every object of a job.
pub fn host_labels(job_id: u64) -> BTreeMap<String, String> {
    BTreeMap::from([
        (JOB_ID_LABEL.to_string(), job_id.to_string()),
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
    ])
}

impl PodInput {
    /// What the host decides for a job under the built-in runner config (no `--config`):
    /// namespace `default`, project 1, no runner token, GitLab's helper image, no resources
    /// or volumes, each image's own first pull policy, and the variables' public env.
    /// `CI_BUILDS_DIR`, `CI_PROJECT_DIR` and `CI_PROJECT_ID` are read from the variables
    /// when present, as the host does.
    pub fn for_job(job: &crate::context::Job) -> Self {
        let variable = |k: &str| job.variable(k).map(str::to_string);
        let project_id = variable("CI_PROJECT_ID").and_then(|v| v.parse().ok()).unwrap_or(1);
        let unique_name = project_unique_name("", project_id, 0);
        let variables: Vec<VariableRef<'_>> = job
            .variables
            .iter()
            .map(|v| VariableRef {
                key: &v.key,
                value: v.value.as_deref().unwrap_or_default(),
                public: v.public,
                file: v.file,
            })
            .collect();
        let container = |image: &crate::job::Image| ContainerInput {
            image: image.name.clone(),
            entrypoint: image.entrypoint.clone(),
            pull_policy: image.pull_policies.first().map(|p| p.as_k8s().to_string()),
            resources: None,
            run_as: None,
        };
        PodInput {
            job_id: job.id,
            variables_secret: variables_secret_name(&unique_name, &job.id.to_string()),
            unique_name,
            namespace: DEFAULT_NAMESPACE.into(),
            builds_dir: variable("CI_BUILDS_DIR").unwrap_or_else(|| "/builds".into()),
            project_dir: variable("CI_PROJECT_DIR"),
            env: public_env(&variables),
            build: container(&job.image),
            helper: ContainerInput { image: DEFAULT_HELPER_IMAGE.into(), ..Default::default() },
            services: job
                .services
                .iter()
                .map(|s| ServiceInput {
                    container: container(&s.image),
                    command: s.command.clone(),
                    alias: s.alias.clone(),
                    ports: Vec::new(),
                    env: Vec::new(),
                })
                .collect(),
            ..Default::default()
        }
    }
}

/// The job's pod before any plugin runs: `build` and `helper` idling in a shell, one
/// `svc-<n>` container per service, the checkout and the variables volumes, the host's labels.
pub fn job_pod(input: &PodInput) -> Result<Pod, PodShapeError> {
    let mut labels = input.labels.clone();
    labels.insert(POD_LABEL.to_string(), input.unique_name.clone());
    labels.extend(host_labels(input.job_id));

    // Volumes: the checkout, then the operator's in GitLab's order, then the variables
    // Secret, which is mounted into build and helper only (services get public variables as
    // env, as in GitLab).
    let mut volumes = vec![empty_dir(REPO_VOLUME)];
    let mut mounts = vec![mount(REPO_VOLUME, &input.builds_dir, false, None)];
    for (volume, volume_mount) in &input.volumes {
        volumes.push(volume.clone());
        mounts.push(volume_mount.clone());
    }
    volumes.push(Volume {
        name: VARS_VOLUME.to_string(),
        secret: Some(SecretVolumeSource { secret_name: Some(input.variables_secret.clone()), ..Default::default() }),
        ..Default::default()
    });
    let mut job_mounts = mounts.clone();
    job_mounts.push(mount(VARS_VOLUME, VARS_DIR, true, None));

    let security = Some(SecurityContext {
        privileged: Some(input.privileged),
        allow_privilege_escalation: input.allow_privilege_escalation,
        ..Default::default()
    });
    let security_as = |run_as: Option<RunAs>| {
        security.clone().map(|s| SecurityContext {
            run_as_user: run_as.map(|r| r.user),
            run_as_group: run_as.and_then(|r| r.group),
            ..s
        })
    };
    let idle = vec!["sh".to_string(), "-c".to_string(), IDLE.to_string()];
    let (command, args) = if input.build.entrypoint.iter().any(|s| !s.is_empty()) {
        // Docker semantics: a custom entrypoint receives the command as its arguments.
        (input.build.entrypoint.clone(), Some(idle.clone()))
    } else {
        (idle.clone(), None)
    };
    let build = Container {
        name: BUILD_CONTAINER.into(),
        image: Some(input.build.image.clone()),
        image_pull_policy: input.build.pull_policy.clone(),
        command: Some(command),
        args,
        env: Some(input.env.clone()),
        resources: input.build.resources.clone(),
        volume_mounts: Some(job_mounts.clone()),
        security_context: security_as(input.build.run_as),
        working_dir: input.project_dir.clone(),
        ..Default::default()
    };
    let helper = Container {
        name: HELPER_CONTAINER.into(),
        image: Some(input.helper.image.clone()),
        image_pull_policy: input.helper.pull_policy.clone(),
        command: Some(idle),
        env: Some(input.env.clone()),
        resources: input.helper.resources.clone(),
        volume_mounts: Some(job_mounts),
        security_context: security.clone(),
        // If the idle helper dies, its log says why (the shell's or the runtime's last words)
        // and the job's failure quotes it. Only the helper's: everything the host runs there is
        // an exec, whose output is not the container's log, while the build container's log can
        // hold a job's output and so its secrets, which must not reach the Pod object.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };

    let mut containers = vec![build, helper];
    let mut host_aliases: Vec<String> = Vec::new();
    for (i, svc) in input.services.iter().enumerate() {
        let c = &svc.container;
        // The service's own variables win over the job's of the same name.
        let mut env: Vec<EnvVar> =
            input.env.iter().filter(|e| !svc.env.iter().any(|own| own.name == e.name)).cloned().collect();
        env.extend(svc.env.iter().cloned());
        containers.push(Container {
            name: format!("svc-{i}"),
            image: Some(c.image.clone()),
            image_pull_policy: c.pull_policy.clone(),
            command: (!c.entrypoint.is_empty()).then(|| c.entrypoint.clone()),
            args: (!svc.command.is_empty()).then(|| svc.command.clone()),
            env: Some(env),
            resources: c.resources.clone(),
            volume_mounts: Some(mounts.clone()),
            security_context: security_as(c.run_as),
            ports: (!svc.ports.is_empty()).then(|| svc.ports.clone()),
            ..Default::default()
        });
        // Aliases: GitLab accepts a comma-separated list; without one the image name serves.
        let aliases = service_aliases(svc);
        for a in &aliases {
            if a.split('.').any(|part| !is_dns_label(&part.to_ascii_lowercase().replace('_', "-"))) {
                return Err(PodShapeError::InvalidAlias { index: i, image: c.image.clone(), alias: a.clone() });
            }
        }
        host_aliases.extend(aliases);
    }
    host_aliases.dedup();

    Ok(Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", input.unique_name)),
            namespace: Some(input.namespace.clone()),
            labels: Some(labels),
            annotations: (!input.annotations.is_empty()).then(|| input.annotations.clone()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            service_account_name: input.service_account.clone(),
            node_selector: (!input.node_selector.is_empty()).then(|| input.node_selector.clone()),
            tolerations: (!input.tolerations.is_empty()).then(|| input.tolerations.clone()),
            image_pull_secrets: (!input.image_pull_secrets.is_empty()).then(|| input.image_pull_secrets.clone()),
            termination_grace_period_seconds: input.termination_grace_period_seconds,
            security_context: input.pod_security_context.clone(),
            host_aliases: (!host_aliases.is_empty())
                .then(|| vec![HostAlias { ip: "127.0.0.1".into(), hostnames: Some(host_aliases) }]),
            resources: input.pod_resources.clone(),
            containers,
            volumes: Some(volumes),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Labels the host relies on to find its pods; mutators may not change or remove them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostOwned {
    pub labels: Vec<String>,
}

impl HostOwned {
    pub fn label(key: impl Into<String>) -> Self {
        HostOwned { labels: vec![key.into()] }
    }

    /// The rules the host applies to every job pod.
    pub fn job_pod() -> Self {
        HostOwned { labels: vec![JOB_ID_LABEL.to_string(), MANAGED_BY_LABEL.to_string(), POD_LABEL.to_string()] }
    }
}

/// Host-owned values of the pod before any plugin ran.
#[derive(Debug, Clone)]
pub struct Snapshot {
    namespace: Option<String>,
    name: Option<String>,
    generate_name: Option<String>,
    labels: BTreeMap<String, Option<String>>,
}

/// Why a mutator's output is refused. Texts quoted from the output are given raw: the host
/// escapes them before they reach a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Bytes of JSON, over [`MAX_OBJECT_BYTES`].
    TooLarge(usize),
    NotJson(String),
    NotAPod(String),
    NoBuildContainer,
    Changed {
        field: String,
        before: String,
        after: String,
    },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::TooLarge(size) => write!(
                f,
                "the pod is {size} bytes of JSON, over the limit of 1.5 MiB (the largest object the API server stores)"
            ),
            Violation::NotJson(reason) => write!(f, "output is not JSON: {reason}"),
            Violation::NotAPod(reason) => write!(f, "output is not a Kubernetes v1 Pod: {reason}"),
            Violation::NoBuildContainer => {
                write!(f, "the pod no longer has the `{BUILD_CONTAINER}` container (spec.containers)")
            }
            Violation::Changed { field, before, after } => {
                write!(f, "changed host-owned field {field} of the pod (from {before} to {after})")
            }
        }
    }
}

fn show(v: &Option<String>) -> String {
    match v {
        Some(s) => format!("{s:?}"),
        None => "unset".to_string(),
    }
}

impl Snapshot {
    pub fn of(pod: &Pod, rules: &HostOwned) -> Self {
        let labels = pod.metadata.labels.as_ref();
        Snapshot {
            namespace: pod.metadata.namespace.clone(),
            name: pod.metadata.name.clone(),
            generate_name: pod.metadata.generate_name.clone(),
            labels: rules.labels.iter().map(|k| (k.clone(), labels.and_then(|l| l.get(k)).cloned())).collect(),
        }
    }

    /// What the host makes of a mutator's output: the Pod, or why it is refused.
    pub fn check(&self, output: &str) -> Result<Pod, Violation> {
        // Checked before parsing: a 100 MB annotation once passed and rendered 104 MB of YAML.
        if output.len() > MAX_OBJECT_BYTES {
            return Err(Violation::TooLarge(output.len()));
        }
        let value: serde_json::Value = serde_json::from_str(output).map_err(|e| Violation::NotJson(e.to_string()))?;
        let field = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_string);
        if field("apiVersion").as_deref() != Some("v1") || field("kind").as_deref() != Some("Pod") {
            return Err(Violation::NotAPod(format!(
                "apiVersion/kind is {}/{}, expected v1/Pod",
                show(&field("apiVersion")),
                show(&field("kind"))
            )));
        }
        let pod: Pod = serde_json::from_value(value).map_err(|e| Violation::NotAPod(e.to_string()))?;
        let same = |field: &str, before: &Option<String>, after: &Option<String>| {
            if before == after {
                Ok(())
            } else {
                Err(Violation::Changed { field: field.to_string(), before: show(before), after: show(after) })
            }
        };
        same("metadata.namespace", &self.namespace, &pod.metadata.namespace)?;
        same("metadata.name", &self.name, &pod.metadata.name)?;
        same("metadata.generateName", &self.generate_name, &pod.metadata.generate_name)?;
        for (key, before) in &self.labels {
            let after = pod.metadata.labels.as_ref().and_then(|l| l.get(key)).cloned();
            same(&format!("metadata.labels[{key}]"), before, &after)?;
        }
        let has_build = pod.spec.as_ref().is_some_and(|s| s.containers.iter().any(|c| c.name == BUILD_CONTAINER));
        if !has_build {
            return Err(Violation::NoBuildContainer);
        }
        Ok(pod)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels_and_aliases() {
        assert_eq!(dns_label("Runner_ABC--project", 63), "runner-abc-project");
        assert_eq!(dns_label("--x--", 63), "x");
        assert_eq!(image_aliases("tutum/wordpress:4"), vec!["tutum-wordpress", "tutum__wordpress"]);
        assert_eq!(image_aliases("registry:5000/db"), vec!["registry:5000-db", "registry:5000__db"]);
        assert_eq!(project_unique_name("", 1, 0), "runner-project-1-concurrent-0");
    }

    #[test]
    fn env_has_public_variables_once_with_the_winning_value() {
        let v = |key, value, public| VariableRef { key, value, public, file: false };
        let env = public_env(&[v("A", "1", true), v("S", "x", false), v("A", "$(2)", true)]);
        assert_eq!(env.len(), 1);
        assert_eq!((env[0].name.as_str(), env[0].value.as_deref()), ("A", Some("$$(2)")));
    }
}
