//! Build the Kubernetes objects for one job: the pod, the registry-credentials Secret and
//! the Services for service ports. Plugins shape the pod afterwards; this is the baseline
//! every runner config produces (GitLab Runner's Kubernetes executor is the reference).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HostPathVolumeSource, KeyToPath,
    LocalObjectReference, PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, ResourceRequirements, Secret,
    SecretKeySelector, SecretVolumeSource, Service, ServicePort, ServiceSpec, Toleration, Volume,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::config::{EmptyDirMedium, Kubernetes, Runner};
use crate::input::limits;
use crate::job::variables::{expand_tracked, source_in};
use crate::job::{Job, Overwrites, PullPolicy, Resources};
use crate::vocab::expand::{expand, with_cut_note};
use keel_contract::pod::is_dns_label;

// The pod's shape and names are the contract's (`keel_contract::pod`): the SDK's test harness builds
// the same pod from the same code.
pub use keel_contract::pod::{
    BUILD_CONTAINER, DEFAULT_HELPER_IMAGE, DEFAULT_NAMESPACE, HELPER_CONTAINER, IDLE, JOB_ID_LABEL, MANAGED_BY,
    MANAGED_BY_LABEL, REPO_VOLUME, VARS_DIR, VARS_VOLUME, dns_label, escape_env, mount,
};
use keel_contract::pod::{ContainerInput, PodInput, PodShapeError, RunAs, ServiceInput, VariableRef, host_labels};
pub const INIT_CONTAINER: &str = "init-logs";
/// Stage scripts written by an execution strategy (the attach strategy's).
pub const SCRIPTS_VOLUME: &str = "scripts";
/// The job's `output.log`, read back by the trace reader.
pub const LOGS_VOLUME: &str = "logs";
/// Volume names operators cannot use for their own volumes.
pub use crate::vocab::RESERVED_VOLUMES;
/// Key of the registry credentials in a `kubernetes.io/dockerconfigjson` Secret.
pub const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";

/// The key of the sourced environment file in the variables Secret.
pub const VARS_ENV_KEY: &str = "env.sh";

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("variable DOCKER_AUTH_CONFIG is not a Docker config JSON object with an `auths` mapping: {reason}")]
    DockerAuthConfig { reason: String },
    #[error("pod label {key:?}={value:?} (from {origin}) is not a valid Kubernetes label")]
    InvalidLabel { key: String, value: String, origin: &'static str },
    #[error("service {index} ({image}): alias {alias:?} gives no valid DNS name")]
    InvalidAlias { index: usize, image: String, alias: String },
    #[error(
        "{field}: uses variable {variable}, which is masked or a credential (or built from one); its value would \
         be readable in the Pod object, so it may only reach the job as a variable"
    )]
    SecretInPodField { field: String, variable: String },
    #[error("{field}: {user:?} is not a numeric uid or uid:gid (Kubernetes runs containers by number)")]
    InvalidUser { field: String, user: String },
    #[error("{field}: {what} {id} is not in [runners.kubernetes] {key} {allowed:?}")]
    UserNotAllowed { field: String, what: &'static str, id: i64, key: &'static str, allowed: Vec<String> },
}

/// The container user a job asked for (`image:kubernetes:user`, `field` names it), checked against
/// the runner's `allowed_users`/`allowed_groups` (the administrator's word wins, as in GitLab
/// Runner; refused rather than ignored, so the job never runs as someone it did not ask for).
fn run_as(user: Option<&str>, field: &str, k8s: &Kubernetes) -> Result<Option<RunAs>, PodError> {
    let Some(text) = user.map(str::trim).filter(|u| !u.is_empty()) else { return Ok(None) };
    let invalid = || PodError::InvalidUser { field: field.to_string(), user: text.to_string() };
    let (uid, gid) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (text, None),
    };
    let number = |s: &str| s.trim().parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(invalid);
    let run_as = RunAs { user: number(uid)?, group: gid.map(number).transpose()? };
    let check = |id: i64, allowed: &[String], what: &'static str, key: &'static str| {
        if allowed.is_empty() || allowed.iter().any(|a| a.trim().parse::<i64>() == Ok(id)) {
            Ok(())
        } else {
            Err(PodError::UserNotAllowed { field: field.to_string(), what, id, key, allowed: allowed.to_vec() })
        }
    };
    check(run_as.user, &k8s.allowed_users, "uid", "allowed_users")?;
    if let Some(g) = run_as.group {
        check(g, &k8s.allowed_groups, "gid", "allowed_groups")?;
    }
    Ok(Some(run_as))
}

/// Expands the job's variables into a Pod field (`field` names it in errors). Only public values
/// may land there: the Pod object is readable by anyone who may list pods.
fn expand_public(job: &Job, field: impl FnOnce() -> String, text: &str) -> Result<String, PodError> {
    let expanded = match expand_tracked(text, &|k| source_in(&job.variables, k), limits::OBJECT_BYTES) {
        Ok(e) => e,
        Err(too_long) => {
            return Ok(with_cut_note(too_long));
        }
    };
    match expanded.secret_sources.into_iter().next() {
        Some(variable) => Err(PodError::SecretInPodField { field: field(), variable }),
        None => Ok(expanded.value),
    }
}

/// Where the job runs inside the cluster: a few facts GitLab's coordinator would supply.
#[derive(Debug, Clone, Default)]
pub struct PodContext {
    pub project_id: u64,
    pub concurrent_id: u32,
    /// Makes the names of the job's Secrets unique (they are named before the pod exists, so
    /// they cannot use generateName). `render` uses the job id (stable output); `run` adds a
    /// random part so concurrent runs of the same job never collide.
    pub object_suffix: String,
}

/// Everything the job would create, pod first.
#[derive(Debug, Clone)]
pub struct JobObjects {
    pub pod: Pod,
    /// Registry credentials (from `DOCKER_AUTH_CONFIG`).
    pub secret: Option<Secret>,
    /// The job's variables as files: `env.sh` (sourced by every stage script) and one file per
    /// file-type variable. Values of non-public variables live only here, never in the Pod.
    pub variables: Secret,
    pub services: Vec<Service>,
}

/// The decided pull policies, per image. An image without an entry gets no
/// `imagePullPolicy` (the cluster default).
pub type PullPolicies = BTreeMap<String, Vec<PullPolicy>>;

/// `runner-<short token>-project-<id>-concurrent-<n>`: GitLab's project-unique name.
pub fn project_unique_name(runner: &Runner, ctx: &PodContext) -> String {
    keel_contract::pod::project_unique_name(&runner.token, ctx.project_id, ctx.concurrent_id)
}

fn quantity_map(pairs: [(&str, &Option<String>); 3]) -> Option<BTreeMap<String, Quantity>> {
    let m: BTreeMap<String, Quantity> =
        pairs.into_iter().filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), Quantity(v.clone())))).collect();
    (!m.is_empty()).then_some(m)
}

fn requirements(r: &Resources) -> Option<ResourceRequirements> {
    let requests = quantity_map([
        ("cpu", &r.cpu_request),
        ("memory", &r.memory_request),
        ("ephemeral-storage", &r.ephemeral_storage_request),
    ]);
    let limits = quantity_map([
        ("cpu", &r.cpu_limit),
        ("memory", &r.memory_limit),
        ("ephemeral-storage", &r.ephemeral_storage_limit),
    ]);
    (requests.is_some() || limits.is_some()).then(|| ResourceRequirements { requests, limits, ..Default::default() })
}

/// Config values overlaid field by field with the accepted overwrites.
fn overlay(config: Resources, accepted: &Resources) -> Resources {
    let pick = |a: &Option<String>, c: Option<String>| a.clone().or(c);
    Resources {
        cpu_request: pick(&accepted.cpu_request, config.cpu_request),
        cpu_limit: pick(&accepted.cpu_limit, config.cpu_limit),
        memory_request: pick(&accepted.memory_request, config.memory_request),
        memory_limit: pick(&accepted.memory_limit, config.memory_limit),
        ephemeral_storage_request: pick(&accepted.ephemeral_storage_request, config.ephemeral_storage_request),
        ephemeral_storage_limit: pick(&accepted.ephemeral_storage_limit, config.ephemeral_storage_limit),
    }
}

/// Config form (`"key=value" = "effect"`, `"key" = "effect"`) -> our canonical form
/// (`key -> "value:effect"` for `Equal`, `key -> "effect"` for `Exists`).
fn canonical_tolerations(config: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    config
        .iter()
        .map(|(k, effect)| match k.split_once('=') {
            Some((key, value)) => (key.to_string(), format!("{value}:{effect}")),
            None => (k.clone(), effect.clone()),
        })
        .collect()
}

fn toleration(key: &str, spec: &str) -> Toleration {
    let effect = |e: &str| (!e.is_empty()).then(|| e.to_string());
    match spec.split_once(':') {
        Some((value, e)) => Toleration {
            key: Some(key.to_string()),
            operator: Some("Equal".into()),
            value: Some(value.to_string()),
            effect: effect(e),
            ..Default::default()
        },
        None => Toleration {
            key: Some(key.to_string()),
            operator: Some("Exists".into()),
            effect: effect(spec),
            ..Default::default()
        },
    }
}

fn label_ok(key: &str, value: &str) -> bool {
    static VALUE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    static NAME: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let value_re = VALUE
        .get_or_init(|| regex::Regex::new(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$").expect("static regex"));
    let name_re =
        NAME.get_or_init(|| regex::Regex::new(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$").expect("static regex"));
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    value.len() <= 63
        && value_re.is_match(value)
        && name.len() <= 63
        && name_re.is_match(name)
        && prefix.is_none_or(|p| !p.is_empty() && p.len() <= 253 && p.split('.').all(is_dns_label))
}

/// Build the job's objects. `accepted` are the overwrites the rules let through;
/// `pull_policies` the policies decided per image.
pub fn build(
    runner: &Runner,
    k8s: &Kubernetes,
    job: &Job,
    accepted: &Overwrites,
    pull_policies: &PullPolicies,
    ctx: &PodContext,
) -> Result<JobObjects, PodError> {
    let unique = project_unique_name(runner, ctx);
    let namespace = accepted
        .namespace
        .clone()
        .or_else(|| (!k8s.namespace.is_empty()).then(|| k8s.namespace.clone()))
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    let job_id = job.id.to_string();

    // Labels: operator's, then the job's accepted requests, then the host's own, which nothing
    // may replace.
    let mut labels = BTreeMap::new();
    for (origin, source) in [("config pod_labels", &k8s.pod_labels), ("KUBERNETES_POD_LABELS_*", &accepted.pod_labels)]
    {
        for (k, v) in source {
            let v = expand_public(job, || format!("pod label {k:?} (from {origin})"), v)?;
            if !label_ok(k, &v) {
                return Err(PodError::InvalidLabel { key: k.clone(), value: v, origin });
            }
            labels.insert(k.clone(), v);
        }
    }

    let mut annotations = BTreeMap::new();
    for (origin, source) in
        [("config pod_annotations", &k8s.pod_annotations), ("KUBERNETES_POD_ANNOTATIONS_*", &accepted.pod_annotations)]
    {
        for (k, v) in source {
            annotations.insert(k.clone(), expand_public(job, || format!("pod annotation {k:?} (from {origin})"), v)?);
        }
    }

    let mut node_selector = k8s.node_selector.clone();
    node_selector.extend(accepted.node_selector.clone());
    let mut tolerations = canonical_tolerations(&k8s.node_tolerations);
    tolerations.extend(accepted.node_tolerations.clone());

    let builds_dir = job.variable("CI_BUILDS_DIR").unwrap_or("/builds").to_string();
    let suffix = if ctx.object_suffix.is_empty() { job_id.clone() } else { ctx.object_suffix.clone() };
    let variables = variables_secret(job, &unique, &suffix, &namespace, &job_id);
    let variables_name = variables.metadata.name.clone().unwrap_or_default();

    // The operator's volumes in GitLab's order.
    let mut volumes = Vec::new();
    let v = &k8s.volumes;
    for h in &v.host_path {
        let host_path = h.host_path.clone().unwrap_or_else(|| h.mount_path.clone());
        volumes.push((
            Volume {
                name: h.name.0.clone(),
                host_path: Some(HostPathVolumeSource { path: host_path, ..Default::default() }),
                ..Default::default()
            },
            mount(&h.name.0, &h.mount_path, h.read_only, h.sub_path.as_deref()),
        ));
    }
    for s in &v.secret {
        volumes.push((
            Volume {
                name: s.name.0.clone(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(s.name.0.clone()),
                    items: items(&s.items),
                    ..Default::default()
                }),
                ..Default::default()
            },
            mount(&s.name.0, &s.mount_path, s.read_only, s.sub_path.as_deref()),
        ));
    }
    for p in &v.pvc {
        volumes.push((
            Volume {
                name: p.name.0.clone(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: p.name.0.clone(),
                    read_only: p.read_only.then_some(true),
                }),
                ..Default::default()
            },
            mount(&p.name.0, &p.mount_path, p.read_only, p.sub_path.as_deref()),
        ));
    }
    for c in &v.config_map {
        volumes.push((
            Volume {
                name: c.name.0.clone(),
                config_map: Some(ConfigMapVolumeSource {
                    name: c.name.0.clone(),
                    items: items(&c.items),
                    ..Default::default()
                }),
                ..Default::default()
            },
            mount(&c.name.0, &c.mount_path, c.read_only, c.sub_path.as_deref()),
        ));
    }
    for e in &v.empty_dir {
        let medium = match e.medium {
            EmptyDirMedium::Disk => None,
            EmptyDirMedium::Memory => Some("Memory"),
        };
        volumes.push((
            empty_dir(&e.name.0, medium, e.size_limit.as_ref().map(|q| q.0.clone())),
            mount(&e.name.0, &e.mount_path, false, e.sub_path.as_deref()),
        ));
    }

    let env = keel_contract::pod::public_env(
        &job.variables
            .iter()
            .map(|v| VariableRef { key: &v.key, value: &v.value, public: v.public, file: v.file })
            .collect::<Vec<_>>(),
    );

    let pull = |image: &str| pull_policies.get(image).and_then(|p| p.first()).map(|p| p.as_k8s().to_string());
    let helper_image = helper_image(k8s);

    // Services: the config's first, then the job's (seed 000's order).
    let mut all_services: Vec<crate::job::Service> = k8s
        .services
        .iter()
        .enumerate()
        .map(|(n, s)| {
            Ok(crate::job::Service {
                image: crate::job::Image {
                    name: expand_public(job, || format!("[[runners.kubernetes.services]] {n} name"), &s.name)?,
                    entrypoint: s.entrypoint.clone(),
                    pull_policies: vec![],
                    user: None,
                },
                alias: s.alias.clone(),
                command: s.command.clone(),
                ports: vec![],
                variables: vec![],
            })
        })
        .collect::<Result<_, PodError>>()?;
    all_services.extend(job.services.iter().cloned());
    let service_resources = requirements(&overlay(k8s.service_resources(), &accepted.service));
    let mut variables = variables;
    let service_inputs: Vec<ServiceInput> = all_services
        .iter()
        .enumerate()
        .map(|(i, svc)| {
            Ok(ServiceInput {
                container: ContainerInput {
                    image: svc.image.name.clone(),
                    entrypoint: svc.image.entrypoint.clone(),
                    pull_policy: pull(&svc.image.name),
                    resources: service_resources.clone(),
                    run_as: run_as(svc.image.user.as_deref(), &format!("services[{i}] kubernetes.user"), k8s)?,
                },
                env: service_env(i, &svc.variables, &mut variables),
                command: svc.command.clone(),
                alias: svc.alias.clone(),
                ports: svc
                    .ports
                    .iter()
                    .map(|p| ContainerPort {
                        container_port: i32::from(p.number),
                        protocol: Some(p.protocol.clone()),
                        name: p.name.clone(),
                        ..Default::default()
                    })
                    .collect(),
            })
        })
        .collect::<Result<_, PodError>>()?;

    let mut k8s_services = Vec::new();
    for (i, svc) in all_services.iter().enumerate() {
        if svc.ports.is_empty() {
            continue;
        }
        let name = format!("svc-{i}");
        let service_name =
            dns_label(svc.alias.as_deref().and_then(|a| a.split(',').next()).unwrap_or(&format!("proxy-{name}")), 50);
        k8s_services.push(Service {
            metadata: ObjectMeta {
                generate_name: Some(format!("{service_name}-")),
                namespace: Some(namespace.clone()),
                labels: Some(host_labels(job.id)),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                selector: Some(BTreeMap::from([(JOB_ID_LABEL.to_string(), job_id.clone())])),
                ports: Some(
                    svc.ports
                        .iter()
                        .map(|p| ServicePort {
                            // Several ports need names; GitLab uses `<service>-<port>`.
                            name: Some(p.name.clone().unwrap_or_else(|| format!("{service_name}-{}", p.number))),
                            port: i32::from(p.number),
                            target_port: Some(IntOrString::Int(i32::from(p.number))),
                            protocol: Some(p.protocol.clone()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        });
    }

    // Registry credentials from GitLab's DOCKER_AUTH_CONFIG, as a dockerconfigjson Secret.
    let secret = match job.variable("DOCKER_AUTH_CONFIG") {
        Some(raw) if !raw.trim().is_empty() => Some(registry_secret(raw, &unique, &suffix, &namespace, &job_id)?),
        _ => None,
    };
    let mut pull_secrets: Vec<LocalObjectReference> =
        k8s.image_pull_secrets.iter().map(|s| LocalObjectReference { name: s.clone() }).collect();
    if let Some(s) = &secret {
        pull_secrets.push(LocalObjectReference { name: s.metadata.name.clone().unwrap_or_default() });
    }

    let pod_security = k8s.pod_security_context.as_ref().map(|p| PodSecurityContext {
        fs_group: p.fs_group,
        run_as_group: p.run_as_group,
        run_as_non_root: p.run_as_non_root,
        run_as_user: p.run_as_user,
        supplemental_groups: (!p.supplemental_groups.is_empty()).then(|| p.supplemental_groups.clone()),
        ..Default::default()
    });

    let input = PodInput {
        job_id: job.id,
        unique_name: unique.clone(),
        namespace: namespace.clone(),
        labels,
        annotations,
        builds_dir,
        project_dir: job.variable("CI_PROJECT_DIR").map(str::to_string),
        variables_secret: variables_name,
        env,
        build: ContainerInput {
            image: job.image.name.clone(),
            entrypoint: job.image.entrypoint.clone(),
            pull_policy: pull(&job.image.name),
            resources: requirements(&overlay(k8s.build_resources(), &accepted.build)),
            run_as: run_as(job.image.user.as_deref(), "image kubernetes.user", k8s)?,
        },
        helper: ContainerInput {
            pull_policy: pull(&helper_image),
            image: helper_image,
            entrypoint: Vec::new(),
            resources: requirements(&overlay(k8s.helper_resources(), &accepted.helper)),
            // GitLab Runner's rule: the helper never takes the job's user.
            run_as: None,
        },
        services: service_inputs,
        volumes,
        privileged: k8s.privileged,
        allow_privilege_escalation: k8s.allow_privilege_escalation,
        pod_security_context: pod_security,
        service_account: accepted.service_account.clone().or_else(|| k8s.service_account.clone()),
        node_selector,
        tolerations: tolerations.iter().map(|(k, v)| toleration(k, v)).collect(),
        image_pull_secrets: pull_secrets,
        termination_grace_period_seconds: k8s.termination_grace_period_seconds,
        pod_resources: requirements(&k8s.pod_resources()),
    };
    let pod = keel_contract::pod::job_pod(&input).map_err(|e| match e {
        PodShapeError::InvalidAlias { index, image, alias } => PodError::InvalidAlias { index, image, alias },
    })?;

    let mut objects = JobObjects { pod, secret, variables, services: k8s_services };
    // Dependants die with the pod. Until the pod exists its uid is unknown; `run` calls this
    // again with the created pod's name and uid.
    let pod_ref_name = objects.pod.metadata.generate_name.clone().unwrap_or_default();
    objects.set_owner(&pod_ref_name, "");
    Ok(objects)
}

impl JobObjects {
    /// Point every dependant's owner reference at the pod `name`/`uid`.
    pub fn set_owner(&mut self, name: &str, uid: &str) {
        let owner = vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: name.to_string(),
            uid: uid.to_string(),
            controller: Some(false),
            block_owner_deletion: Some(false),
        }];
        if let Some(s) = self.secret.as_mut() {
            s.metadata.owner_references = Some(owner.clone());
        }
        self.variables.metadata.owner_references = Some(owner.clone());
        for s in &mut self.services {
            s.metadata.owner_references = Some(owner.clone());
        }
    }
}

/// `'...'` for POSIX sh: nothing inside is special but `'` itself.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A variable name the shell can export.
fn shell_name_ok(key: &str) -> bool {
    let mut chars = key.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The file of a file-type variable inside [`VARS_DIR`].
pub fn variable_file_key(key: &str) -> String {
    format!("file.{key}")
}

/// A service's own variables as its container's env: a public value as it is; any other from
/// the variables Secret, where it is added under a key of its own (`svc-<n>.<KEY>`).
fn service_env(index: usize, own: &[crate::job::Variable], secret: &mut Secret) -> Vec<EnvVar> {
    let secret_name = secret.metadata.name.clone().unwrap_or_default();
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    let mut env: Vec<EnvVar> = Vec::new();
    for v in own.iter().rev() {
        // The last definition wins; Kubernetes would take the first of two equal names.
        if env.iter().any(|e| e.name == v.key) {
            continue;
        }
        env.push(if v.public {
            EnvVar { name: v.key.clone(), value: Some(escape_env(&v.value)), ..Default::default() }
        } else {
            let key = format!("svc-{index}.{}", v.key);
            data.insert(key.clone(), ByteString(v.value.as_bytes().to_vec()));
            EnvVar {
                name: v.key.clone(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector { name: secret_name.clone(), key, optional: None }),
                    ..Default::default()
                }),
                ..Default::default()
            }
        });
    }
    env.reverse();
    env
}

/// The variables Secret: `env.sh` exports every variable (its winning value; a file variable's
/// value is the path of its file), and each file variable's content is a key of its own.
fn variables_secret(job: &Job, unique: &str, suffix: &str, namespace: &str, job_id: &str) -> Secret {
    let mut env = String::from("# keel: the job's variables, sourced by every stage script\n");
    let mut data = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for v in &job.variables {
        if !seen.insert(v.key.as_str()) || !shell_name_ok(&v.key) {
            continue;
        }
        let winner = job.variables.iter().rev().find(|w| w.key == v.key).unwrap_or(v);
        let value = if winner.file {
            let file_key = variable_file_key(&v.key);
            data.insert(file_key.clone(), ByteString(winner.value.as_bytes().to_vec()));
            format!("{VARS_DIR}/{file_key}")
        } else {
            winner.value.clone()
        };
        env.push_str(&format!("export {}={}\n", v.key, shell_quote(&value)));
    }
    data.insert(VARS_ENV_KEY.to_string(), ByteString(env.into_bytes()));
    Secret {
        metadata: ObjectMeta {
            name: Some(keel_contract::pod::variables_secret_name(unique, suffix)),
            namespace: Some(namespace.to_string()),
            labels: Some(host_labels(job_id.parse().unwrap_or_default())),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

fn registry_secret(raw: &str, unique: &str, suffix: &str, namespace: &str, job_id: &str) -> Result<Secret, PodError> {
    let parsed: serde_json::Value =
        serde_json::from_str(raw).map_err(|e| PodError::DockerAuthConfig { reason: format!("invalid JSON: {e}") })?;
    if !parsed.get("auths").is_some_and(|a| a.is_object()) {
        return Err(PodError::DockerAuthConfig { reason: "no `auths` object at the top level".into() });
    }
    // A fixed name (not generateName) so the pod can reference it before either exists.
    let name = format!("{}-{}-registry", dns_label(unique, 40), dns_label(suffix, 12));
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_string()),
            labels: Some(host_labels(job_id.parse().unwrap_or_default())),
            ..Default::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(BTreeMap::from([(DOCKER_CONFIG_KEY.to_string(), ByteString(raw.as_bytes().to_vec()))])),
        ..Default::default()
    })
}

/// The helper image, with GitLab's `${CI_RUNNER_VERSION}`/`${CI_RUNNER_REVISION}` expanded.
pub fn helper_image(k8s: &Kubernetes) -> String {
    match &k8s.helper_image {
        Some(image) if !image.is_empty() => expand(image, &|k: &str| match k {
            "CI_RUNNER_VERSION" | "CI_RUNNER_REVISION" => Some(env!("CARGO_PKG_VERSION").to_string()),
            _ => None,
        }),
        _ => DEFAULT_HELPER_IMAGE.to_string(),
    }
}

fn empty_dir(name: &str, medium: Option<&str>, size_limit: Option<String>) -> Volume {
    Volume {
        name: name.to_string(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: medium.map(str::to_string),
            size_limit: size_limit.map(Quantity),
        }),
        ..Default::default()
    }
}

fn items(m: &BTreeMap<String, String>) -> Option<Vec<KeyToPath>> {
    (!m.is_empty()).then(|| m.iter().map(|(k, p)| KeyToPath { key: k.clone(), path: p.clone(), mode: None }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_volume_names_are_reserved() {
        for name in [REPO_VOLUME, SCRIPTS_VOLUME, LOGS_VOLUME, VARS_VOLUME] {
            assert!(RESERVED_VOLUMES.contains(&name), "{name} is not reserved");
        }
    }

    #[test]
    fn tolerations() {
        let t = toleration("k", "v:NoSchedule");
        assert_eq!(
            (t.operator.as_deref(), t.value.as_deref(), t.effect.as_deref()),
            (Some("Equal"), Some("v"), Some("NoSchedule"))
        );
        let t = toleration("k", "");
        assert_eq!((t.operator.as_deref(), t.value.as_deref(), t.effect.as_deref()), (Some("Exists"), None, None));
        let c = canonical_tolerations(&BTreeMap::from([("a=b".to_string(), "NoExecute".to_string())]));
        assert_eq!(c["a"], "b:NoExecute");
    }

    #[test]
    fn labels_checked() {
        assert!(label_ok("team", "infra"));
        assert!(label_ok("example.com/team", ""));
        assert!(!label_ok("team", "has space"));
        assert!(!label_ok("/x", "y"));
    }
}
