//! GitLab CI job YAML -> [`Job`].
//!
//! Two input forms:
//! - a single job file: the file's top level is one job's keys (`image`, `script`, ...);
//! - `.gitlab-ci.yml` plus a job name, written `path/.gitlab-ci.yml#jobname` on the command
//!   line. Top-level `variables`, `default:` and the legacy global `image`/`services`/
//!   `before_script`/`after_script` apply, and `extends:` (any depth, lists too) is merged
//!   GitLab's way: mappings deep-merged, everything else replaced.
//!
//! Values are checked while they are deserialised from the text, so errors carry the line and
//! column plus the key path. Files that use YAML merge keys (`<<: *anchor`) are first resolved
//! into a value tree; their errors still name the key but cannot name the line.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::cache::JobCache;
use super::{Image, Job, PullPolicy, Service, ServicePort, Stage};
use crate::input::{Located, check_yaml, cut_message, limits, show_bytes};
use crate::vocab::values::{GitlabDuration, one_or_many_pull_policies};
use keel_contract::variables::{self, Commit, Definition};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cannot read job file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{at}: {message}")]
    Invalid { at: Located, message: String },
    #[error("{path}: no job named {name:?} (jobs in this file: {available})")]
    NoSuchJob { path: PathBuf, name: String, available: String },
    #[error("{path}: job {name:?} is hidden (its name starts with '.'), it can only be extended")]
    HiddenJob { path: PathBuf, name: String },
    #[error("{path}: job {job:?} extends {target:?}, which is not defined in this file")]
    UnknownExtends { path: PathBuf, job: String, target: String },
    #[error("{path}: `extends` of job {job:?} loops back to {target:?}")]
    ExtendsLoop { path: PathBuf, job: String, target: String },
    #[error("{path}: key `{job}.extends`: nests deeper than {limit} levels (GitLab's limit): {chain}")]
    ExtendsTooDeep { path: PathBuf, job: String, chain: String, limit: usize },
    #[error("{path}: job {job:?} has no `script`")]
    NoScript { path: PathBuf, job: String },
    #[error("{path}: job {job:?} has no `image` and the runner config sets no default `image`")]
    NoImage { path: PathBuf, job: String },
    #[error(
        "{path}: key `{field}`: uses variable {variable}, which is masked or a credential (or built from one); \
         its value would be readable in the Pod object, so it may only reach the job as a variable"
    )]
    SecretInPodField { path: PathBuf, field: String, variable: String },
}

/// Where the job comes from: `path` alone is a single job file, `path#name` a job in a
/// `.gitlab-ci.yml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSource {
    pub path: PathBuf,
    pub job_name: Option<String>,
}

impl JobSource {
    /// Split the `JOB` command-line argument (`file.yml` or `.gitlab-ci.yml#name`).
    pub fn from_arg(arg: &str) -> JobSource {
        match arg.rsplit_once('#') {
            Some((path, name)) if !name.is_empty() => JobSource { path: path.into(), job_name: Some(name.to_string()) },
            _ => JobSource { path: arg.into(), job_name: None },
        }
    }
}

/// The facts about the run that GitLab would supply (ids, paths) and runner-level inputs.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub job_id: u64,
    pub project_id: u64,
    /// `group/project`, used for `CI_PROJECT_DIR` below the builds dir.
    pub project_path: String,
    pub builds_dir: String,
    pub concurrent_id: u32,
    /// Runner token; its short form becomes `CI_RUNNER_SHORT_TOKEN`.
    pub runner_token: String,
    /// Runner `environment` entries, applied before the job's own variables.
    pub environment: Vec<(String, String)>,
    /// The runner config's default `image`, used when the job names none.
    pub default_image: Option<String>,
    /// `CI_PIPELINE_ID`.
    pub pipeline_id: u64,
    /// The commit of the sources (`CI_COMMIT_*`), when known.
    pub commit: Option<Commit>,
    /// What the pipeline sets for this instance of the job, over the job's own variables
    /// (`parallel:`: `CI_NODE_INDEX`, `CI_NODE_TOTAL` and a `matrix:` combination's values).
    pub instance_variables: Vec<(String, String)>,
}

impl JobContext {
    /// The lowest layers of a job's variables, whichever source the job came from: GitLab's
    /// predefined ones for this job, then the runner's `environment`.
    pub(super) fn base_variables(
        &self,
        job_name: &str,
        stage: &str,
        image: &str,
        timeout: Option<std::time::Duration>,
    ) -> variables::Variables {
        let mut vars = variables::predefined(&variables::Facts {
            job_id: self.job_id,
            job_name,
            stage,
            image,
            builds_dir: &self.builds_dir,
            project_id: self.project_id,
            project_path: &self.project_path,
            concurrent_id: self.concurrent_id,
            runner_token: &self.runner_token,
            pipeline_id: self.pipeline_id,
            commit: self.commit.as_ref(),
            timeout,
            runner_version: env!("CARGO_PKG_VERSION"),
        });
        for (k, v) in &self.environment {
            vars.set(k.clone(), Definition::expanded(v.clone()));
        }
        vars
    }
}

impl Default for JobContext {
    fn default() -> Self {
        JobContext {
            job_id: 1,
            project_id: 1,
            project_path: "local/project".into(),
            builds_dir: "/builds".into(),
            concurrent_id: 0,
            runner_token: String::new(),
            environment: Vec::new(),
            default_image: None,
            pipeline_id: 1,
            commit: None,
            instance_variables: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw (as written) job definitions.

/// One job as written; every key optional so `default:`/`extends:` can be merged in.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // the pipeline-level keywords below are accepted, never read
struct JobDef {
    image: Option<ImageDef>,
    services: Option<Vec<ServiceDef>>,
    variables: Option<VariableDefs>,
    before_script: Option<Script>,
    script: Option<Script>,
    after_script: Option<Script>,
    timeout: Option<GitlabDuration>,
    #[serde(default, deserialize_with = "one_or_many_strings")]
    extends: Vec<String>,
    stage: Option<String>,
    // Pipeline-level keywords: keel runs one job at a time, so they have nothing to do here.
    // They are accepted (and never read) so real `.gitlab-ci.yml` files load; typos still fail.
    tags: Option<IgnoredAny>,
    rules: Option<IgnoredAny>,
    only: Option<IgnoredAny>,
    except: Option<IgnoredAny>,
    when: Option<IgnoredAny>,
    allow_failure: Option<IgnoredAny>,
    artifacts: Option<IgnoredAny>,
    cache: Option<super::cache::CacheDefs>,
    needs: Option<IgnoredAny>,
    dependencies: Option<IgnoredAny>,
    retry: Option<IgnoredAny>,
    interruptible: Option<IgnoredAny>,
    coverage: Option<IgnoredAny>,
    environment: Option<IgnoredAny>,
    resource_group: Option<IgnoredAny>,
    parallel: Option<IgnoredAny>,
    inherit: Option<IgnoredAny>,
    id_tokens: Option<IgnoredAny>,
    release: Option<IgnoredAny>,
    pages: Option<IgnoredAny>,
    hooks: Option<IgnoredAny>,
    start_in: Option<IgnoredAny>,
}

type VariableDefs = IndexMap<String, VarDef>;

#[derive(Debug, Clone)]
struct VarDef {
    value: String,
    expand: bool,
    masked: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VarDefFull {
    #[serde(default, deserialize_with = "scalar_string")]
    value: String,
    #[allow(dead_code)]
    description: Option<String>,
    #[allow(dead_code)]
    options: Option<Vec<String>>,
    #[serde(default = "yes")]
    expand: bool,
    /// keel extension: GitLab's project-level `masked` flag, accepted in the job file.
    #[serde(default)]
    masked: bool,
}

fn yes() -> bool {
    true
}

impl<'de> Deserialize<'de> for VarDef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = VarDef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a number, or a mapping with `value`, `description`, `expand`, `masked`")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<VarDef, E> {
                Ok(VarDef { value: s.to_string(), expand: true, masked: false })
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<VarDef, E> {
                self.visit_str(&n.to_string())
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<VarDef, E> {
                self.visit_str(&n.to_string())
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<VarDef, E> {
                self.visit_str(&n.to_string())
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<VarDef, E> {
                self.visit_str(if b { "true" } else { "false" })
            }
            fn visit_unit<E: de::Error>(self) -> Result<VarDef, E> {
                self.visit_str("")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<VarDef, A::Error> {
                let full = VarDefFull::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(VarDef { value: full.value, expand: full.expand, masked: full.masked })
            }
        }
        d.deserialize_any(V)
    }
}

fn scalar_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    VarDef::deserialize(d).map(|v| v.value)
}

/// `script:`: a string, or a list whose items may themselves be lists (flattened, as GitLab
/// does for YAML anchors of script snippets).
#[derive(Debug, Clone, Default)]
struct Script(Vec<String>);

impl<'de> Deserialize<'de> for Script {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<String>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings (nested lists are flattened)")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Vec<String>, E> {
                Ok(vec![s.to_string()])
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Vec<String>, E> {
                Ok(vec![n.to_string()])
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Vec<String>, E> {
                Ok(vec![n.to_string()])
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
                let mut out = Vec::new();
                while let Some(Script(lines)) = seq.next_element::<Script>()? {
                    out.extend(lines);
                }
                Ok(out)
            }
        }
        d.deserialize_any(V).map(Script)
    }
}

#[derive(Debug, Clone, Default)]
struct ImageDef {
    name: String,
    entrypoint: Vec<String>,
    pull_policy: Vec<PullPolicy>,
    user: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageDefFull {
    name: String,
    #[serde(default)]
    entrypoint: Vec<String>,
    #[serde(default, deserialize_with = "one_or_many_pull_policies")]
    pull_policy: Vec<PullPolicy>,
    kubernetes: Option<KubernetesOpts>,
    /// The Docker executor's options (`platform`, `user`): nothing to do on Kubernetes.
    #[allow(dead_code)]
    docker: Option<IgnoredAny>,
}

/// `image:kubernetes:` / `services:kubernetes:` (GitLab's executor options).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct KubernetesOpts {
    #[serde(default, deserialize_with = "optional_scalar_string")]
    user: Option<String>,
}

fn optional_scalar_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    scalar_string(d).map(Some)
}

impl<'de> Deserialize<'de> for ImageDef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ImageDef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an image name or a mapping with `name`, `entrypoint`, `pull_policy`, `kubernetes`")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ImageDef, E> {
                Ok(ImageDef { name: s.to_string(), ..Default::default() })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ImageDef, A::Error> {
                let f = ImageDefFull::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(ImageDef {
                    name: f.name,
                    entrypoint: f.entrypoint,
                    pull_policy: f.pull_policy,
                    user: f.kubernetes.and_then(|k| k.user),
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Default)]
struct ServiceDef {
    image: ImageDef,
    alias: Option<String>,
    command: Vec<String>,
    ports: Vec<ServicePort>,
    variables: VariableDefs,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceDefFull {
    name: String,
    alias: Option<String>,
    #[serde(default)]
    entrypoint: Vec<String>,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default, deserialize_with = "one_or_many_pull_policies")]
    pull_policy: Vec<PullPolicy>,
    #[serde(default)]
    ports: Vec<PortDef>,
    #[serde(default)]
    variables: VariableDefs,
    kubernetes: Option<KubernetesOpts>,
    #[allow(dead_code)]
    docker: Option<IgnoredAny>,
}

impl<'de> Deserialize<'de> for ServiceDef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ServiceDef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an image name or a mapping with `name`, `alias`, `entrypoint`, `command`, `pull_policy`, `ports`, \
                     `variables`, `kubernetes`",
                )
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ServiceDef, E> {
                Ok(ServiceDef { image: ImageDef { name: s.to_string(), ..Default::default() }, ..Default::default() })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ServiceDef, A::Error> {
                let f = ServiceDefFull::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(ServiceDef {
                    image: ImageDef {
                        name: f.name,
                        entrypoint: f.entrypoint,
                        pull_policy: f.pull_policy,
                        user: f.kubernetes.and_then(|k| k.user),
                    },
                    alias: f.alias,
                    command: f.command,
                    ports: f.ports.into_iter().map(|p| p.0).collect(),
                    variables: f.variables,
                })
            }
        }
        d.deserialize_any(V)
    }
}

struct PortDef(ServicePort);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortDefFull {
    number: u16,
    #[serde(default)]
    protocol: Option<String>,
    name: Option<String>,
}

impl<'de> Deserialize<'de> for PortDef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PortDef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a mapping with `number`, `protocol`, `name`")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<PortDef, E> {
                let number = u16::try_from(n)
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| E::custom(format!("port {n} is not in 1..=65535")))?;
                Ok(PortDef(ServicePort { number, protocol: "TCP".into(), name: None }))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<PortDef, E> {
                Err(E::custom(format!("port {n} is not in 1..=65535")))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PortDef, A::Error> {
                let f = PortDefFull::deserialize(de::value::MapAccessDeserializer::new(map))?;
                if f.number == 0 {
                    return Err(de::Error::custom("port 0 is not in 1..=65535"));
                }
                let protocol = match f.protocol.as_deref().map(str::to_ascii_lowercase).as_deref() {
                    None | Some("tcp") | Some("http") | Some("https") => "TCP",
                    Some("udp") => "UDP",
                    Some(other) => {
                        return Err(de::Error::custom(format!(
                            "unknown port protocol {other:?}, expected tcp, udp, http or https"
                        )));
                    }
                };
                Ok(PortDef(ServicePort { number: f.number, protocol: protocol.into(), name: f.name }))
            }
        }
        d.deserialize_any(V)
    }
}

fn one_or_many_strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a job name or a list of job names")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Vec<String>, E> {
            Ok(vec![s.to_string()])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}

// ---------------------------------------------------------------------------------------------
// Whole `.gitlab-ci.yml`: only the parts the selected job needs are typed; other jobs are
// skipped unread so their (possibly exotic) keys cannot break this one.

#[derive(Debug, Default)]
struct Document {
    variables: Option<VariableDefs>,
    default: Option<JobDef>,
    /// Legacy top-level `image`, `services`, `before_script`, `after_script`.
    globals: JobDef,
    jobs: IndexMap<String, JobDef>,
}

struct DocumentSeed<'a> {
    wanted: &'a BTreeSet<String>,
}

impl<'de> DeserializeSeed<'de> for DocumentSeed<'_> {
    type Value = Document;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Document, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DocumentSeed<'_> {
    type Value = Document;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of job names and global keywords")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document, A::Error> {
        let mut doc = Document::default();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "variables" => doc.variables = Some(map.next_value()?),
                "default" => doc.default = Some(map.next_value()?),
                "image" => doc.globals.image = Some(map.next_value()?),
                "services" => doc.globals.services = Some(map.next_value()?),
                "before_script" => doc.globals.before_script = Some(map.next_value()?),
                "after_script" => doc.globals.after_script = Some(map.next_value()?),
                "cache" => doc.globals.cache = Some(map.next_value()?),
                k if self.wanted.contains(k) => {
                    let job = map.next_value()?;
                    doc.jobs.insert(key, job);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(doc)
    }
}

// ---------------------------------------------------------------------------------------------

/// Read the job `source` and build the [`Job`] with predefined variables from `ctx`.
pub fn load(source: &JobSource, ctx: &JobContext) -> Result<Job, JobError> {
    load_with_caches(source, ctx).map(|(job, _)| job)
}

/// [`load`], with the job's `cache:` entries.
pub fn load_with_caches(source: &JobSource, ctx: &JobContext) -> Result<(Job, Vec<JobCache>), JobError> {
    let text = crate::input::read_text_file(&source.path, limits::YAML_BYTES)
        .map_err(|e| JobError::Read { path: source.path.clone(), source: e })?;
    parse_with_caches(&text, source, ctx)
}

/// Parse job `text`; `source.path` is used in messages only.
pub fn parse(text: &str, source: &JobSource, ctx: &JobContext) -> Result<Job, JobError> {
    parse_with_caches(text, source, ctx).map(|(job, _)| job)
}

/// [`parse`], with the job's `cache:` entries.
pub fn parse_with_caches(text: &str, source: &JobSource, ctx: &JobContext) -> Result<(Job, Vec<JobCache>), JobError> {
    let path = &source.path;
    // `include:` merged in first, as GitLab does before anything else reads the document.
    let included = super::include::expand(path, text)?;
    let text = included.as_deref().unwrap_or(text);
    if text.len() > limits::YAML_BYTES {
        return Err(JobError::Invalid {
            at: Located::key(path, "(document)"),
            message: format!("the file is {} bytes, over the limit of {}", text.len(), show_bytes(limits::YAML_BYTES)),
        });
    }
    if let Err(limit) = check_yaml(text) {
        return Err(JobError::Invalid {
            at: Located::at(path, limit.line, limit.column, "(document)"),
            message: limit.message,
        });
    }
    // A first, untyped pass: finds merge keys and, for `.gitlab-ci.yml`, the job names and the
    // `extends` chain, so the typed pass only reads what this job needs.
    let tree: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| yaml_error(path, "(document)", &e))?;
    let uses_merge_keys = has_merge_key(&tree);
    let resolved_tree = if uses_merge_keys {
        let mut t = tree.clone();
        t.apply_merge().map_err(|e| yaml_error(path, "(document)", &e))?;
        Some(t)
    } else {
        None
    };
    let tree = resolved_tree.as_ref().unwrap_or(&tree);
    if !tree.is_mapping() {
        return Err(JobError::Invalid {
            at: Located::key(path, "(document)"),
            message: "expected a mapping of job keys".into(),
        });
    }

    let (name, merged, top_variables) = match &source.job_name {
        None => {
            let def: JobDef = typed(text, resolved_tree.as_ref(), path, |d| {
                let mut track = serde_path_to_error::Track::new();
                JobDef::deserialize(serde_path_to_error::Deserializer::new(d, &mut track))
                    .map_err(|e| (track.path(), e))
            })?;
            let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "job".into());
            (name, def, None)
        }
        Some(name) => {
            let chain = extends_chain(tree, name, path)?;
            let wanted: BTreeSet<String> = chain.iter().cloned().collect();
            let mut doc: Document = typed(text, resolved_tree.as_ref(), path, |d| {
                let mut track = serde_path_to_error::Track::new();
                DocumentSeed { wanted: &wanted }
                    .deserialize(serde_path_to_error::Deserializer::new(d, &mut track))
                    .map_err(|e| (track.path(), e))
            })?;
            let mut merged = merge_extends(&doc, name, &mut HashMap::new(), 0);
            // `default:` then the legacy globals fill in what the job (and its parents) left unset.
            if let Some(default) = &doc.default {
                fill_defaults(&mut merged, default);
            }
            fill_defaults(&mut merged, &doc.globals);
            (name.clone(), merged, doc.variables.take())
        }
    };
    build_job(name, merged, top_variables, path, ctx)
}

/// Run a typed deserialisation over the text (for line numbers) or, when merge keys had to be
/// resolved, over the resolved tree.
fn typed<T>(
    text: &str,
    resolved: Option<&serde_yaml_ng::Value>,
    path: &Path,
    f: impl Fn(serde_yaml_ng::Deserializer<'_>) -> Result<T, (serde_path_to_error::Path, serde_yaml_ng::Error)>,
) -> Result<T, JobError> {
    match resolved {
        None => {
            f(serde_yaml_ng::Deserializer::from_str(text)).map_err(|(key, e)| yaml_error(path, &key.to_string(), &e))
        }
        Some(tree) => {
            // Re-serialise the resolved tree so the same typed path runs; lines then refer to the
            // resolved document, so they are left out of messages.
            let resolved_text = serde_yaml_ng::to_string(tree).map_err(|e| yaml_error(path, "(document)", &e))?;
            f(serde_yaml_ng::Deserializer::from_str(&resolved_text)).map_err(|(key, e)| JobError::Invalid {
                at: Located::key(path, key_or_document(&key.to_string())),
                message: cut_message(strip_location(&e.to_string())),
            })
        }
    }
}

fn key_or_document(key: &str) -> String {
    if key.is_empty() || key == "." { "(document)".into() } else { cut_message(key.to_string()) }
}

/// A job name or key from the file, as quoted in a message: at most 256 bytes of it.
fn short(name: &str) -> String {
    crate::input::cut(name.to_string(), 256)
}

/// serde_yaml_ng appends " at line L column C" and prefixes its own key path; we print both
/// ourselves.
fn strip_location(msg: &str) -> String {
    let msg = match msg.rfind(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    };
    match msg.split_once(": ") {
        Some((prefix, rest)) if !prefix.is_empty() && !prefix.contains(' ') => rest.to_string(),
        _ => msg.to_string(),
    }
}

fn yaml_error(path: &Path, key: &str, e: &serde_yaml_ng::Error) -> JobError {
    let key = key_or_document(key);
    let message = cut_message(strip_location(&e.to_string()));
    match e.location() {
        Some(loc) => JobError::Invalid { at: Located::at(path, loc.line(), loc.column(), key), message },
        None => JobError::Invalid { at: Located::key(path, key), message },
    }
}

fn has_merge_key(v: &serde_yaml_ng::Value) -> bool {
    match v {
        serde_yaml_ng::Value::Mapping(m) => m.iter().any(|(k, v)| k.as_str() == Some("<<") || has_merge_key(v)),
        serde_yaml_ng::Value::Sequence(s) => s.iter().any(has_merge_key),
        serde_yaml_ng::Value::Tagged(t) => has_merge_key(&t.value),
        _ => false,
    }
}

/// GitLab's stage for a job that names none (a job file's, or a payload's empty `job_info.stage`).
pub(crate) const DEFAULT_STAGE: &str = "test";

pub(crate) const RESERVED: &[&str] = &[
    "variables",
    "default",
    "image",
    "services",
    "before_script",
    "after_script",
    "include",
    "stages",
    "workflow",
    "cache",
    "spec",
];

/// The job and every job it extends, child first, each once.
pub(crate) fn extends_chain(tree: &serde_yaml_ng::Value, name: &str, path: &Path) -> Result<Vec<String>, JobError> {
    let jobs = tree.as_mapping().expect("checked to be a mapping");
    let available = || {
        jobs.keys()
            .filter_map(|k| k.as_str())
            .filter(|k| !k.starts_with('.') && !RESERVED.contains(k))
            .map(|k| format!("{k:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if RESERVED.contains(&name) || !jobs.contains_key(name) {
        return Err(JobError::NoSuchJob {
            path: path.to_path_buf(),
            name: short(name),
            available: cut_message(available()),
        });
    }
    if name.starts_with('.') {
        return Err(JobError::HiddenJob { path: path.to_path_buf(), name: short(name) });
    }
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = Vec::new();
    visit_extends(jobs, name, path, &mut order, &mut seen, &mut stack)?;
    Ok(order)
}

/// Depth-first over `extends`, recursing at most [`limits::EXTENDS_DEPTH`] levels: a chain of
/// 5,000 jobs once overflowed the host's stack.
fn visit_extends(
    jobs: &serde_yaml_ng::Mapping,
    name: &str,
    path: &Path,
    order: &mut Vec<String>,
    seen: &mut HashSet<String>,
    stack: &mut Vec<String>,
) -> Result<(), JobError> {
    if stack.iter().any(|s| s == name) {
        return Err(JobError::ExtendsLoop { path: path.to_path_buf(), job: short(&stack[0]), target: short(name) });
    }
    if stack.len() > limits::EXTENDS_DEPTH {
        let chain = stack.iter().chain([&name.to_string()]).map(|s| format!("{:?}", short(s))).collect::<Vec<_>>();
        let chain = chain.join(" -> ");
        return Err(JobError::ExtendsTooDeep {
            path: path.to_path_buf(),
            job: short(&stack[0]),
            chain: cut_message(chain),
            limit: limits::EXTENDS_DEPTH,
        });
    }
    if !seen.insert(name.to_string()) {
        return Ok(());
    }
    order.push(name.to_string());
    stack.push(name.to_string());
    let parents: Vec<String> = match jobs.get(name).and_then(|j| j.get("extends")) {
        Some(serde_yaml_ng::Value::String(s)) => vec![s.clone()],
        Some(serde_yaml_ng::Value::Sequence(items)) => {
            items.iter().filter_map(|i| i.as_str().map(str::to_string)).collect()
        }
        // Anything else is a type error the typed pass reports with its line.
        _ => Vec::new(),
    };
    for parent in parents {
        if !jobs.contains_key(parent.as_str()) || RESERVED.contains(&parent.as_str()) {
            return Err(JobError::UnknownExtends {
                path: path.to_path_buf(),
                job: short(name),
                target: short(&parent),
            });
        }
        visit_extends(jobs, &parent, path, order, seen, stack)?;
    }
    stack.pop();
    Ok(())
}

/// GitLab's `extends`: parents first (in list order), the job itself last; mappings
/// (`variables`) merge key by key, other keys are replaced.
/// Each job is merged once (`memo`): a job reached through many paths (diamonds of `extends`
/// lists) would otherwise be merged once per path, exponentially many times. `depth` only
/// guards the recursion; [`visit_extends`] has already refused chains deeper than the limit.
fn merge_extends(doc: &Document, name: &str, memo: &mut HashMap<String, JobDef>, depth: usize) -> JobDef {
    if let Some(done) = memo.get(name) {
        return done.clone();
    }
    let Some(job) = doc.jobs.get(name).cloned() else { return JobDef::default() };
    let mut merged = JobDef::default();
    if depth <= limits::EXTENDS_DEPTH {
        for parent in &job.extends {
            let base = merge_extends(doc, parent, memo, depth + 1);
            overlay(&mut merged, base);
        }
    }
    overlay(&mut merged, job);
    memo.insert(name.to_string(), merged.clone());
    merged
}

fn overlay(into: &mut JobDef, top: JobDef) {
    macro_rules! replace {
        ($($f:ident),*) => { $( if top.$f.is_some() { into.$f = top.$f; } )* };
    }
    replace!(image, services, before_script, script, after_script, timeout, stage, cache);
    if let Some(vars) = top.variables {
        let dest = into.variables.get_or_insert_with(IndexMap::new);
        for (k, v) in vars {
            dest.insert(k, v);
        }
    }
}

fn fill_defaults(job: &mut JobDef, default: &JobDef) {
    macro_rules! fill {
        ($($f:ident),*) => { $( if job.$f.is_none() { job.$f = default.$f.clone(); } )* };
    }
    fill!(image, services, before_script, after_script, timeout, cache);
}

fn build_job(
    name: String,
    def: JobDef,
    top_variables: Option<VariableDefs>,
    path: &Path,
    ctx: &JobContext,
) -> Result<(Job, Vec<JobCache>), JobError> {
    let script = def.script.clone().map(|s| s.0).unwrap_or_default();
    if script.is_empty() {
        return Err(JobError::NoScript { path: path.to_path_buf(), job: short(&name) });
    }
    let image = match def.image.clone() {
        Some(i) => i,
        None => match &ctx.default_image {
            Some(n) => ImageDef { name: n.clone(), ..Default::default() },
            None => return Err(JobError::NoImage { path: path.to_path_buf(), job: short(&name) }),
        },
    };

    // Precedence, lowest first: predefined, runner `environment`, top-level YAML, job YAML.
    let stage = def.stage.as_deref().unwrap_or(DEFAULT_STAGE);
    let mut vars = ctx.base_variables(&name, stage, &image.name, def.timeout.as_ref().map(|t| t.0));
    for source in [top_variables, def.variables.clone()].into_iter().flatten() {
        for (k, v) in source {
            vars.set(k, Definition { value: v.value, expand: v.expand, masked: v.masked, public: true, file: false });
        }
    }
    for (k, v) in &ctx.instance_variables {
        vars.set(k.clone(), Definition::literal(v.clone()));
    }
    let services = def.services.clone().unwrap_or_default();
    let variables = super::resolve::variables(&vars, services.len(), path)?;
    let to_image = |key: &str, i: ImageDef| -> Result<Image, JobError> {
        let name = super::resolve::public_field(&i.name, key, "the image name", &variables, path)?;
        Ok(Image { name, entrypoint: i.entrypoint, pull_policies: i.pull_policy, user: i.user })
    };
    let services = services
        .into_iter()
        .enumerate()
        .map(|(n, s)| {
            let key = format!("services[{n}]");
            let mut own = variables::Variables::new();
            for (k, v) in s.variables {
                own.set(
                    k,
                    Definition { value: v.value, expand: v.expand, masked: v.masked, public: true, file: false },
                );
            }
            Ok(Service {
                variables: super::resolve::service_variables(&variables, own, &key, path)?,
                image: to_image(&key, s.image)?,
                alias: s.alias,
                command: s.command,
                ports: s.ports,
            })
        })
        .collect::<Result<Vec<_>, JobError>>()?;

    let mut stages = Vec::new();
    for (stage_name, lines) in
        [("before_script", &def.before_script), ("script", &def.script), ("after_script", &def.after_script)]
    {
        if let Some(Script(lines)) = lines
            && !lines.is_empty()
        {
            stages.push(Stage { name: stage_name.to_string(), lines: lines.clone() });
        }
    }

    let caches =
        super::cache::from_yaml(def.cache.clone().map(|c| c.into_vec()).unwrap_or_default(), &variables, path)?;
    let job = Job {
        id: ctx.job_id,
        name,
        image: to_image("image", image)?,
        services,
        variables,
        stages,
        timeout: def.timeout.map(|t| t.0),
    };
    Ok((job, caches))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn single(text: &str) -> Result<Job, JobError> {
        parse(text, &JobSource { path: "job.yml".into(), job_name: None }, &JobContext::default())
    }

    fn ci(text: &str, name: &str) -> Result<Job, JobError> {
        parse(text, &JobSource { path: ".gitlab-ci.yml".into(), job_name: Some(name.into()) }, &JobContext::default())
    }

    #[test]
    fn job_arg_forms() {
        assert_eq!(JobSource::from_arg("a/job.yml"), JobSource { path: "a/job.yml".into(), job_name: None });
        assert_eq!(
            JobSource::from_arg("a/.gitlab-ci.yml#build"),
            JobSource { path: "a/.gitlab-ci.yml".into(), job_name: Some("build".into()) }
        );
    }

    #[test]
    fn single_job_file() {
        let job = single(
            "image: {name: alpine:3.20, entrypoint: [''], pull_policy: [always, if-not-present]}\n\
             variables:\n  A: one\n  B: {value: '$A-two'}\n  C: {value: '$A', expand: false}\n  N: 3\n  S: {value: hunter2, masked: true}\n\
             before_script: echo hi\n\
             script:\n  - echo a\n  - [echo b, echo c]\n\
             timeout: 1h 30m\n",
        )
        .unwrap();
        assert_eq!(job.name, "job");
        assert_eq!(job.image.name, "alpine:3.20");
        assert_eq!(job.image.pull_policies, vec![PullPolicy::Always, PullPolicy::IfNotPresent]);
        assert_eq!(job.variable("B"), Some("one-two"));
        assert_eq!(job.variable("C"), Some("$A"));
        assert_eq!(job.variable("N"), Some("3"));
        assert_eq!(job.variable("CI_PROJECT_DIR"), Some("/builds/local/project"));
        assert_eq!(job.variable("CI_JOB_TIMEOUT"), Some("5400"));
        let s = job.variables.iter().find(|v| v.key == "S").unwrap();
        assert!(s.masked && !s.public);
        assert_eq!(job.stages[0].name, "before_script");
        assert_eq!(job.stages[1].lines, vec!["echo a", "echo b", "echo c"]);
        assert_eq!(job.timeout, Some(Duration::from_secs(5400)));
    }

    #[test]
    fn gitlab_ci_with_default_and_extends() {
        let text = "\
variables:
  GLOBAL: g
  OVER: top
default:
  image: ruby:3
  before_script: [echo default]
stages: [build, test]
.base:
  variables:
    OVER: base
    BASE: b
  services:
    - name: postgres:16
      alias: db
      ports: [5432]
build:
  extends: .base
  stage: build
  variables:
    OVER: job
  script: make
  rules:
    - when: always
other:
  script: [1, 2]
  weird_key_in_another_job: ignored
";
        let job = ci(text, "build").unwrap();
        assert_eq!(job.image.name, "ruby:3");
        assert_eq!(job.variable("OVER"), Some("job"));
        assert_eq!(job.variable("BASE"), Some("b"));
        assert_eq!(job.variable("GLOBAL"), Some("g"));
        assert_eq!(job.variable("CI_JOB_STAGE"), Some("build"));
        assert_eq!(job.services[0].alias.as_deref(), Some("db"));
        assert_eq!(job.services[0].ports[0].number, 5432);
        assert_eq!(job.stages[0].lines, vec!["echo default"]);
        // Only one definition per key reaches the pod.
        assert_eq!(job.variables.iter().filter(|v| v.key == "OVER").count(), 1);
    }

    #[test]
    fn merge_keys_are_resolved() {
        let text = ".tpl: &tpl\n  image: alpine\n  script: [echo tpl]\njob:\n  <<: *tpl\n  variables: {X: y}\n";
        let job = ci(text, "job").unwrap();
        assert_eq!(job.image.name, "alpine");
        assert_eq!(job.variable("X"), Some("y"));
    }

    #[test]
    fn errors_name_line_and_key() {
        let err = single("image: alpine\nscript: [ok]\ntimeout: soon\n").unwrap_err().to_string();
        assert!(err.starts_with("job.yml:3:10: key `timeout`:"), "{err}");
        let err = single("image: alpine\nscript: [ok]\nscirpt: x\n").unwrap_err().to_string();
        assert!(err.starts_with("job.yml:3:1: key `scirpt`: unknown field `scirpt`"), "{err}");
        let err = ci("a:\n  script: x\n  image: alpine\n  extends: .nope\n", "a").unwrap_err().to_string();
        assert_eq!(err, ".gitlab-ci.yml: job \"a\" extends \".nope\", which is not defined in this file");
        let err = ci("a:\n  script: x\n", "b").unwrap_err().to_string();
        assert_eq!(err, ".gitlab-ci.yml: no job named \"b\" (jobs in this file: \"a\")");
    }
}
