//! A `.gitlab-ci.yml` as a pipeline: which jobs run, in which stage, what each waits for and
//! whose artifacts it gets. Only the pipeline-level keywords are read here (`stages`, and per job
//! `stage`, `needs`, `dependencies`, `when`, `allow_failure`, `artifacts`, through `extends` and
//! `default:`); each job itself is built later by [`crate::job::parse`] with `path#name`, so a
//! job means the same whether it runs alone or in its pipeline.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

use crate::gitlab::payload::Artifact;
use crate::input::{Located, check_yaml, limits, show_bytes};
use crate::job::parse::{DEFAULT_STAGE, JobError, RESERVED, extends_chain};

/// GitLab's stages when the file names none; `.pre` and `.post` always bracket the rest.
const DEFAULT_STAGES: &[&str] = &["build", "test", "deploy"];

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("{at}: {message}")]
    Invalid { at: Located, message: String },
    #[error("{path}: no jobs to run{why}")]
    Empty { path: PathBuf, why: String },
}

/// When a job runs, given how the jobs before it ended (GitLab's `when`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    OnSuccess,
    OnFailure,
    Always,
    /// Not run by keel (no one to press the button); shown as skipped.
    Manual,
    /// `when: delayed`: as on_success, started `start_in` after its turn came.
    Delayed(std::time::Duration),
}

/// GitLab's longest `start_in`.
const MAX_START_IN: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

/// Which exit codes a job may fail with and leave the pipeline green.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowFailure {
    No,
    Yes,
    ExitCodes(Vec<i32>),
}

impl AllowFailure {
    /// Whether a failure with `exit_code` (`None`: not a script failure) is allowed.
    pub fn allows(&self, exit_code: Option<i32>) -> bool {
        match self {
            AllowFailure::No => false,
            AllowFailure::Yes => true,
            AllowFailure::ExitCodes(codes) => exit_code.is_some_and(|c| codes.contains(&c)),
        }
    }
}

/// One job of the pipeline, as the scheduler needs it.
#[derive(Debug, Clone)]
pub struct PlannedJob {
    /// Unique in the pipeline: the YAML name, or `name 1/3` / `name: [a, b]` for an instance
    /// of a `parallel:` job, as GitLab names them.
    pub name: String,
    /// The job in the file this is (an instance of).
    pub source: String,
    /// Set over the job's own variables: `CI_NODE_INDEX`, `CI_NODE_TOTAL`, a matrix's values.
    pub variables: Vec<(String, String)>,
    pub stage: String,
    /// Index of `stage` in [`Plan::stages`].
    pub stage_index: usize,
    /// `needs:` (a DAG edge each); `None`: waits for every earlier stage.
    pub needs: Option<Vec<Need>>,
    /// `dependencies:`; `None`: GitLab's default (the needs, else every earlier stage's jobs).
    pub dependencies: Option<Vec<String>>,
    pub when: When,
    pub allow_failure: AllowFailure,
    pub artifacts: Vec<Artifact>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub job: String,
    /// Whether its artifacts are downloaded (`needs:artifacts`, default true).
    pub artifacts: bool,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub path: PathBuf,
    pub stages: Vec<String>,
    /// In file order.
    pub jobs: Vec<PlannedJob>,
}

impl Plan {
    pub fn job(&self, name: &str) -> Option<&PlannedJob> {
        self.jobs.iter().find(|j| j.name == name)
    }

    /// The jobs whose artifacts `job` gets, in pipeline order.
    pub fn artifact_sources(&self, job: &PlannedJob) -> Vec<String> {
        if let Some(deps) = &job.dependencies {
            return deps.clone();
        }
        if let Some(needs) = &job.needs {
            return needs.iter().filter(|n| n.artifacts).map(|n| n.job.clone()).collect();
        }
        self.jobs.iter().filter(|j| j.stage_index < job.stage_index).map(|j| j.name.clone()).collect()
    }

    /// The jobs `job` waits for before it can start.
    pub fn waits_for(&self, job: &PlannedJob) -> Vec<String> {
        match &job.needs {
            Some(needs) => needs.iter().map(|n| n.job.clone()).collect(),
            None => self.jobs.iter().filter(|j| j.stage_index < job.stage_index).map(|j| j.name.clone()).collect(),
        }
    }

    /// Keeps `wanted` and every job they wait for, transitively (`--job NAME`).
    pub fn select(mut self, wanted: &[String]) -> Result<Plan, PlanError> {
        if wanted.is_empty() {
            return Ok(self);
        }
        let mut keep = BTreeSet::new();
        let mut todo: Vec<String> = Vec::new();
        for name in wanted {
            if self.job(name).is_none() {
                return Err(PlanError::Invalid {
                    at: Located::key(&self.path, name.clone()),
                    message: format!("--job {name:?}: no such job (jobs: {})", self.names().join(", ")),
                });
            }
            todo.push(name.clone());
        }
        while let Some(name) = todo.pop() {
            if keep.insert(name.clone())
                && let Some(job) = self.job(&name)
            {
                todo.extend(self.waits_for(job));
            }
        }
        self.jobs.retain(|j| keep.contains(&j.name));
        Ok(self)
    }

    fn names(&self) -> Vec<String> {
        self.jobs.iter().map(|j| format!("{:?}", j.name)).collect()
    }
}

/// What `rules:` are evaluated against: the sources and their commit.
#[derive(Debug, Clone, Default)]
pub struct RunFacts {
    pub source_dir: PathBuf,
    pub commit: Option<crate::job::variables::Commit>,
}

impl RunFacts {
    /// The predefined variables `rules:if` may test, as a push pipeline of this checkout has them.
    fn variables(&self) -> BTreeMap<String, String> {
        let mut vars = BTreeMap::from([("CI_PIPELINE_SOURCE".to_string(), "push".to_string())]);
        if let Some(c) = &self.commit {
            vars.insert("CI_COMMIT_SHA".into(), c.commit_sha.clone());
            vars.insert("CI_COMMIT_REF_NAME".into(), c.ref_name.clone());
            // A branch checkout has a branch; a detached HEAD at a tag has a tag.
            if crate::sources::is_tag(&self.source_dir, &c.ref_name) {
                vars.insert("CI_COMMIT_TAG".into(), c.ref_name.clone());
            } else if c.ref_name != "HEAD" {
                vars.insert("CI_COMMIT_BRANCH".into(), c.ref_name.clone());
            }
        }
        vars
    }
}

/// Reads the pipeline in `path`.
pub fn load(path: &Path, facts: &RunFacts) -> Result<Plan, PlanError> {
    let text = crate::input::read_text_file(path, limits::YAML_BYTES)
        .map_err(|source| JobError::Read { path: path.to_path_buf(), source })?;
    plan(path, &text, facts)
}

/// Whether the file at `path` is a pipeline (a `.gitlab-ci.yml` of jobs) rather than one job:
/// its top level has no `script`.
pub fn is_pipeline(text: &str) -> bool {
    serde_yaml_ng::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.as_mapping().map(|m| !m.contains_key("script")))
        .unwrap_or(false)
}

pub fn plan(path: &Path, text: &str, facts: &RunFacts) -> Result<Plan, PlanError> {
    let invalid = |key: &str, message: String| PlanError::Invalid { at: Located::key(path, key.to_string()), message };
    if text.len() > limits::YAML_BYTES {
        return Err(invalid(
            "(document)",
            format!("the file is {} bytes, over the limit of {}", text.len(), show_bytes(limits::YAML_BYTES)),
        ));
    }
    check_yaml(text).map_err(|l| PlanError::Invalid {
        at: Located::at(path, l.line, l.column, "(document)"),
        message: l.message,
    })?;
    // `include:` merged in first, as GitLab does; each job is read from the same merged text.
    let included = crate::job::include::expand(path, text)?;
    let text = included.as_deref().unwrap_or(text);
    let mut tree: Value =
        serde_yaml_ng::from_str(text).map_err(|e| invalid("(document)", crate::input::cut(e.to_string(), 512)))?;
    tree.apply_merge().map_err(|e| invalid("(document)", e.to_string()))?;
    let Some(top) = tree.as_mapping() else {
        return Err(invalid("(document)", "expected a mapping of jobs and global keywords".into()));
    };

    let mut stages = vec![".pre".to_string()];
    match top.get("stages") {
        None => stages.extend(DEFAULT_STAGES.iter().map(|s| s.to_string())),
        Some(v) => stages.extend(strings(v).ok_or_else(|| invalid("stages", "expected a list of stage names".into()))?),
    }
    stages.push(".post".into());

    // `rules:` see the file's variables over the predefined ones; files and changes are read
    // once, and only when some rule asks.
    let mut rule_vars = facts.variables();
    if let Some(vars) = top.get("variables").and_then(Value::as_mapping) {
        rule_vars.extend(variable_values(vars));
    }
    let files = std::cell::OnceCell::new();
    let changed = std::cell::OnceCell::new();
    let decide = |rules: &Value, vars: &BTreeMap<String, String>| {
        super::rules::evaluate(
            rules,
            &super::rules::Facts {
                variables: vars,
                files: files.get_or_init(|| crate::vocab::files::project_files(&facts.source_dir)),
                changed: changed.get_or_init(|| super::rules::changed_files(&facts.source_dir)).as_deref(),
            },
        )
    };
    if let Some(rules) = top.get("workflow").and_then(|w| w.get("rules")) {
        match decide(rules, &rule_vars).map_err(|m| invalid("workflow.rules", m))? {
            Some(d) if d.when.as_deref() != Some("never") => {}
            _ => {
                return Err(PlanError::Empty {
                    path: path.to_path_buf(),
                    why: " (`workflow: rules` leave the pipeline out)".into(),
                });
            }
        }
    }

    let default = top.get("default").and_then(Value::as_mapping);
    let mut jobs = Vec::new();
    for (key, value) in top {
        let Some(name) = key.as_str() else { continue };
        if RESERVED.contains(&name) || name.starts_with('.') || !value.is_mapping() {
            continue;
        }
        let merged = merged_keys(&tree, name, path)?;
        let get = |k: &str| merged.get(k).or_else(|| default.and_then(|d| d.get(k)).filter(|_| k == "artifacts"));
        let at = |k: &str| format!("{name}.{k}");
        let stage = match get("stage") {
            None => DEFAULT_STAGE.to_string(),
            Some(v) => {
                v.as_str().map(str::to_string).ok_or_else(|| invalid(&at("stage"), "expected a stage name".into()))?
            }
        };
        let Some(stage_index) = stages.iter().position(|s| *s == stage) else {
            return Err(invalid(&at("stage"), format!("stage {stage:?} is not in `stages` ({})", stages.join(", "))));
        };
        let needs = match get("needs") {
            None => None,
            Some(v) => Some(needs(v).ok_or_else(|| {
                invalid(&at("needs"), "expected a list of job names or `{job, artifacts, optional}`".into())
            })?),
        };
        let dependencies = match get("dependencies") {
            None => None,
            Some(v) => {
                Some(strings(v).ok_or_else(|| invalid(&at("dependencies"), "expected a list of job names".into()))?)
            }
        };
        let mut when_word = get("when").cloned();
        let mut allow_override = None;
        if let Some(rules) = get("rules") {
            let mut vars = rule_vars.clone();
            vars.insert("CI_JOB_NAME".into(), name.to_string());
            if let Some(own) = get("variables").and_then(Value::as_mapping) {
                vars.extend(variable_values(own));
            }
            match decide(rules, &vars).map_err(|m| invalid(&at("rules"), m))? {
                None => continue,
                Some(d) => {
                    if let Some(w) = d.when {
                        when_word = Some(Value::String(w));
                    }
                    allow_override = d.allow_failure;
                }
            }
        }
        if when_word.as_ref().and_then(Value::as_str) == Some("never") {
            continue;
        }
        let when = match when_word.as_ref().map(|v| v.as_str()) {
            None => When::OnSuccess,
            Some(Some("on_success")) => When::OnSuccess,
            Some(Some("on_failure")) => When::OnFailure,
            Some(Some("always")) => When::Always,
            Some(Some("manual")) => When::Manual,
            Some(Some("delayed")) => {
                let start_in = get("start_in")
                    .and_then(|v| match v {
                        Value::Number(n) => n.as_u64().map(std::time::Duration::from_secs),
                        Value::String(s) => crate::vocab::values::parse_duration(s),
                        _ => None,
                    })
                    .ok_or_else(|| {
                        invalid(
                            &at("start_in"),
                            "`when: delayed` needs `start_in`, a duration such as \"30 minutes\" (at most one week)"
                                .into(),
                        )
                    })?;
                if start_in > MAX_START_IN {
                    return Err(invalid(&at("start_in"), "should be at most one week (GitLab's limit)".into()));
                }
                When::Delayed(start_in)
            }
            Some(other) => {
                return Err(invalid(
                    &at("when"),
                    format!("{other:?}: expected on_success, on_failure, always, manual or delayed"),
                ));
            }
        };
        let allow_failure = match get("allow_failure") {
            None | Some(Value::Bool(false)) => AllowFailure::No,
            Some(Value::Bool(true)) => AllowFailure::Yes,
            Some(Value::Mapping(m)) => match m.get("exit_codes") {
                Some(Value::Number(n)) => {
                    AllowFailure::ExitCodes(n.as_i64().map(|c| vec![c as i32]).unwrap_or_default())
                }
                Some(v) => AllowFailure::ExitCodes(
                    v.as_sequence()
                        .map(|s| s.iter().filter_map(|c| c.as_i64()).map(|c| c as i32).collect())
                        .unwrap_or_default(),
                ),
                None => AllowFailure::No,
            },
            Some(_) => return Err(invalid(&at("allow_failure"), "expected true, false or {exit_codes: [...]}".into())),
        };
        let allow_failure = match allow_override {
            Some(true) => AllowFailure::Yes,
            Some(false) => AllowFailure::No,
            None => allow_failure,
        };
        let artifacts = match get("artifacts") {
            None => Vec::new(),
            Some(v) => artifacts(v).map_err(|m| invalid(&at("artifacts"), m))?,
        };
        let job = PlannedJob {
            name: name.to_string(),
            source: name.to_string(),
            variables: Vec::new(),
            stage,
            stage_index,
            needs,
            dependencies,
            when,
            allow_failure,
            artifacts,
        };
        match get("parallel") {
            None => jobs.push(job),
            Some(v) => {
                let instances = parallel(v).map_err(|m| invalid(&at("parallel"), m))?;
                let total = instances.len();
                for (i, (suffix, vars)) in instances.into_iter().enumerate() {
                    let mut variables = vec![
                        ("CI_NODE_INDEX".to_string(), (i + 1).to_string()),
                        ("CI_NODE_TOTAL".into(), total.to_string()),
                    ];
                    variables.extend(vars);
                    jobs.push(PlannedJob { name: format!("{name}{suffix}"), variables, ..job.clone() });
                }
            }
        }
    }
    expand_parallel_edges(&mut jobs);
    if jobs.is_empty() {
        return Err(PlanError::Empty {
            path: path.to_path_buf(),
            why: " (every top-level key is a keyword or hidden)".into(),
        });
    }
    let plan = Plan { path: path.to_path_buf(), stages, jobs };
    check_edges(&plan)?;
    Ok(plan)
}

/// GitLab's most instances of one `parallel:` job.
const PARALLEL_MAX: usize = 200;

/// One instance of a `parallel:` job: its name suffix (` 2/3`, `: [a, x]`) and its variables.
type Instance = (String, Vec<(String, String)>);

/// `parallel: N` or `parallel: {matrix: [...]}` -> its instances.
fn parallel(v: &Value) -> Result<Vec<Instance>, String> {
    if let Some(n) = v.as_u64() {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if !(1..=PARALLEL_MAX).contains(&n) {
            return Err(format!("{n}: expected 1 to {PARALLEL_MAX}"));
        }
        return Ok((1..=n).map(|i| (format!(" {i}/{n}"), Vec::new())).collect());
    }
    let matrix = v
        .get("matrix")
        .and_then(Value::as_sequence)
        .ok_or("expected a number or `{matrix: [{KEY: value or [values]}, ...]}`")?;
    let mut out = Vec::new();
    for entry in matrix {
        let m = entry.as_mapping().ok_or("each `matrix` entry is a mapping of variables")?;
        // The cartesian product of the entry's values, keys in file order.
        let mut combos: Vec<Vec<(String, String)>> = vec![Vec::new()];
        for (key, values) in m {
            let key = key.as_str().ok_or("matrix keys are variable names")?.to_string();
            let values = match values {
                Value::Sequence(items) => items.iter().map(scalar).collect::<Option<Vec<_>>>(),
                other => scalar(other).map(|s| vec![s]),
            }
            .ok_or(format!("matrix `{key}`: expected a value or a list of values"))?;
            let mut next = Vec::with_capacity(combos.len() * values.len());
            for combo in &combos {
                for value in &values {
                    let mut c = combo.clone();
                    c.push((key.clone(), value.clone()));
                    next.push(c);
                }
            }
            combos = next;
            if combos.len() > PARALLEL_MAX {
                return Err(format!("the matrix makes more than {PARALLEL_MAX} jobs"));
            }
        }
        out.extend(combos);
    }
    if out.is_empty() || out.len() > PARALLEL_MAX {
        return Err(format!("the matrix makes {} jobs: expected 1 to {PARALLEL_MAX}", out.len()));
    }
    Ok(out
        .into_iter()
        .map(|vars| {
            let values: Vec<&str> = vars.iter().map(|(_, v)| v.as_str()).collect();
            (format!(": [{}]", values.join(", ")), vars)
        })
        .collect())
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `needs: [test]` and `dependencies: [test]` of a `parallel:` job mean every instance of it.
fn expand_parallel_edges(jobs: &mut [PlannedJob]) {
    let instances = |jobs: &[PlannedJob], name: &str| -> Vec<String> {
        let of: Vec<String> =
            jobs.iter().filter(|j| j.source == name && j.name != name).map(|j| j.name.clone()).collect();
        if of.is_empty() { vec![name.to_string()] } else { of }
    };
    let snapshot = jobs.to_vec();
    for job in jobs.iter_mut() {
        if let Some(needs) = &mut job.needs {
            *needs = needs
                .iter()
                .flat_map(|n| instances(&snapshot, &n.job).into_iter().map(|job| Need { job, artifacts: n.artifacts }))
                .collect();
        }
        if let Some(deps) = &mut job.dependencies {
            *deps = deps.iter().flat_map(|d| instances(&snapshot, d)).collect();
        }
    }
}

/// `needs` and `dependencies` name jobs of this pipeline; `needs` form no cycle; a dependency
/// runs before the job (an earlier stage, or one of its needs).
fn check_edges(plan: &Plan) -> Result<(), PlanError> {
    let invalid = |key: String, message: String| PlanError::Invalid { at: Located::key(&plan.path, key), message };
    for job in &plan.jobs {
        for need in job.needs.iter().flatten() {
            let Some(target) = plan.job(&need.job) else {
                return Err(invalid(
                    format!("{}.needs", job.name),
                    format!("job {:?} is not in this pipeline", need.job),
                ));
            };
            if target.stage_index > job.stage_index {
                return Err(invalid(
                    format!("{}.needs", job.name),
                    format!("job {:?} is in a later stage ({:?})", need.job, target.stage),
                ));
            }
        }
        for dep in job.dependencies.iter().flatten() {
            let Some(target) = plan.job(dep) else {
                return Err(invalid(
                    format!("{}.dependencies", job.name),
                    format!("job {dep:?} is not in this pipeline"),
                ));
            };
            let needed = job.needs.as_ref().is_some_and(|n| n.iter().any(|n| n.job == *dep));
            if target.stage_index >= job.stage_index && !needed {
                return Err(invalid(
                    format!("{}.dependencies", job.name),
                    format!("job {dep:?} does not run before this one (same or later stage, not in `needs`)"),
                ));
            }
        }
    }
    // A cycle of `needs` within one stage would wait forever.
    let mut state: BTreeMap<&str, u8> = BTreeMap::new();
    fn visit<'a>(
        plan: &'a Plan,
        name: &'a str,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<String> {
        match state.get(name) {
            Some(2) => return None,
            Some(1) => {
                return Some(path.iter().chain([&name]).map(|s| format!("{s:?}")).collect::<Vec<_>>().join(" -> "));
            }
            _ => {}
        }
        state.insert(name, 1);
        path.push(name);
        let job = plan.job(name)?;
        for need in job.needs.iter().flatten() {
            if let Some(cycle) = visit(plan, &need.job, state, path) {
                return Some(cycle);
            }
        }
        path.pop();
        state.insert(name, 2);
        None
    }
    for job in &plan.jobs {
        if let Some(cycle) = visit(plan, &job.name, &mut state, &mut Vec::new()) {
            return Err(invalid(format!("{}.needs", job.name), format!("`needs` loop: {cycle}")));
        }
    }
    Ok(())
}

/// The job's pipeline keys with `extends` applied (parents first, the job's own last).
fn merged_keys(tree: &Value, name: &str, path: &Path) -> Result<Mapping, PlanError> {
    let chain = extends_chain(tree, name, path)?;
    let mut merged = Mapping::new();
    for job in chain.iter().rev() {
        if let Some(m) = tree.get(job.as_str()).and_then(Value::as_mapping) {
            for (k, v) in m {
                merged.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(merged)
}

/// A `variables:` mapping's values as text (`{value: ...}` forms included).
fn variable_values(m: &Mapping) -> Vec<(String, String)> {
    m.iter()
        .filter_map(|(k, v)| {
            let value = match v {
                Value::Mapping(full) => full.get("value").and_then(scalar).unwrap_or_default(),
                other => scalar(other).unwrap_or_default(),
            };
            Some((k.as_str()?.to_string(), value))
        })
        .collect()
}

fn strings(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Sequence(items) => items.iter().map(|i| i.as_str().map(str::to_string)).collect(),
        Value::Null => Some(Vec::new()),
        _ => None,
    }
}

fn needs(v: &Value) -> Option<Vec<Need>> {
    let items = match v {
        Value::Sequence(items) => items.as_slice(),
        Value::Null => &[],
        _ => return None,
    };
    items
        .iter()
        .map(|i| match i {
            Value::String(s) => Some(Need { job: s.clone(), artifacts: true }),
            Value::Mapping(m) => Some(Need {
                job: m.get("job")?.as_str()?.to_string(),
                artifacts: m.get("artifacts").and_then(Value::as_bool).unwrap_or(true),
            }),
            _ => None,
        })
        .collect()
}

/// `artifacts:` as GitLab sends it to a runner: the archive, then one entry per report.
fn artifacts(v: &Value) -> Result<Vec<Artifact>, String> {
    let m = v.as_mapping().ok_or("expected a mapping with `paths`, `exclude`, `when`, ...")?;
    let list = |k: &str| -> Result<Vec<String>, String> {
        m.get(k)
            .map(|v| strings(v).ok_or(format!("`{k}`: expected a list of paths")))
            .transpose()
            .map(Option::unwrap_or_default)
    };
    let text = |k: &str| m.get(k).and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    let when = match m.get("when").and_then(Value::as_str) {
        None => "on_success".to_string(),
        Some(w @ ("on_success" | "on_failure" | "always")) => w.to_string(),
        Some(other) => return Err(format!("`when`: {other:?}: expected on_success, on_failure or always")),
    };
    let mut out = vec![Artifact {
        name: text("name"),
        untracked: m.get("untracked").and_then(Value::as_bool).unwrap_or(false),
        paths: list("paths")?,
        exclude: list("exclude")?,
        when: when.clone(),
        expire_in: text("expire_in"),
        artifact_type: "archive".into(),
        artifact_format: "zip".into(),
    }];
    if let Some(reports) = m.get("reports").and_then(Value::as_mapping) {
        for (kind, paths) in reports {
            let Some(kind) = kind.as_str() else { continue };
            out.push(Artifact {
                name: kind.to_string(),
                paths: strings(paths).ok_or(format!("`reports.{kind}`: expected a list of paths"))?,
                when: if kind == "junit" { "always".into() } else { when.clone() },
                artifact_type: kind.to_string(),
                artifact_format: if kind == "junit" { "gzip".into() } else { "raw".into() },
                ..Default::default()
            });
        }
    }
    out.retain(|a| !a.paths.is_empty() || a.untracked);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Plan, PlanError> {
        plan(Path::new(".gitlab-ci.yml"), text, &RunFacts::default())
    }

    const PIPELINE: &str = r#"
stages: [build, test, deploy]
default:
  artifacts: {expire_in: 1 week}
.base: {image: alpine, stage: test}
build:
  stage: build
  script: [make]
  artifacts: {paths: [out/], reports: {junit: report.xml}}
unit:
  extends: .base
  script: [test]
lint:
  extends: .base
  needs: []
  script: [lint]
  allow_failure: true
deploy:
  stage: deploy
  needs: [{job: unit, artifacts: false}, build]
  script: [ship]
cleanup:
  stage: .post
  when: on_failure
  script: [clean]
"#;

    #[test]
    fn stages_needs_and_defaults() {
        let plan = p(PIPELINE).unwrap();
        assert_eq!(plan.stages, [".pre", "build", "test", "deploy", ".post"]);
        let names: Vec<_> = plan.jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["build", "unit", "lint", "deploy", "cleanup"]);
        let unit = plan.job("unit").unwrap();
        assert_eq!((unit.stage.as_str(), unit.needs.clone()), ("test", None));
        assert_eq!(plan.waits_for(unit), ["build"]);
        assert_eq!(plan.artifact_sources(unit), ["build"]);
        let lint = plan.job("lint").unwrap();
        assert!(plan.waits_for(lint).is_empty(), "needs: [] starts at once");
        assert_eq!(lint.allow_failure, AllowFailure::Yes);
        let deploy = plan.job("deploy").unwrap();
        assert_eq!(plan.waits_for(deploy), ["unit", "build"]);
        assert_eq!(plan.artifact_sources(deploy), ["build"], "needs:artifacts: false");
        assert_eq!(plan.job("cleanup").unwrap().when, When::OnFailure);
        let build = plan.job("build").unwrap();
        assert_eq!(build.artifacts.len(), 2);
        assert_eq!(
            (build.artifacts[0].paths.clone(), build.artifacts[0].expire_in.as_str()),
            (vec!["out/".into()], "")
        );
        assert_eq!(
            (build.artifacts[1].artifact_type.as_str(), build.artifacts[1].artifact_format.as_str()),
            ("junit", "gzip")
        );
    }

    #[test]
    fn select_keeps_what_a_job_needs() {
        let plan = p(PIPELINE).unwrap().select(&["deploy".into()]).unwrap();
        let names: Vec<_> = plan.jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["build", "unit", "deploy"]);
        let err = p(PIPELINE).unwrap().select(&["nope".into()]).unwrap_err().to_string();
        assert!(err.contains("--job \"nope\": no such job"), "{err}");
    }

    #[test]
    fn bad_edges_are_named() {
        let err = |text: &str| p(text).unwrap_err().to_string();
        let e = err("a: {stage: nowhere, script: [x]}");
        assert!(e.contains("a.stage") && e.contains("\"nowhere\" is not in `stages`"), "{e}");
        let e = err("a: {script: [x], needs: [b]}");
        assert!(e.contains("a.needs") && e.contains("\"b\" is not in this pipeline"), "{e}");
        let e = err("a: {script: [x], needs: [b]}\nb: {script: [x], needs: [a]}");
        assert!(e.contains("`needs` loop"), "{e}");
        let e = err("a: {stage: build, script: [x], dependencies: [b]}\nb: {script: [x]}");
        assert!(e.contains("a.dependencies") && e.contains("does not run before"), "{e}");
        let e = err("a: {script: [x], when: delayed}");
        assert!(e.contains("a.start_in") && e.contains("needs `start_in`"), "{e}");
        let e = err("a: {script: [x], when: delayed, start_in: 8 days}");
        assert!(e.contains("at most one week"), "{e}");
        let e = err("a: {script: [x], when: later}");
        assert!(e.contains("a.when"), "{e}");
        let plan = p("a: {script: [x], when: delayed, start_in: 1 minute 30 seconds}").unwrap();
        assert_eq!(plan.job("a").unwrap().when, When::Delayed(std::time::Duration::from_secs(90)));
        let e = err("variables: {A: b}\n.hidden: {script: [x]}");
        assert!(e.contains("no jobs to run"), "{e}");
    }

    #[test]
    fn parallel_jobs_become_instances_and_needs_wait_for_all() {
        let plan = p(concat!(
            "build: {stage: build, script: [x], parallel: 2}\n",
            "test: {script: [x], parallel: {matrix: [{OS: [linux, mac], V: 1}, {OS: bsd}]}, needs: [build]}\n",
        ))
        .unwrap();
        let names: Vec<_> = plan.jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["build 1/2", "build 2/2", "test: [linux, 1]", "test: [mac, 1]", "test: [bsd]"]);
        let mac = plan.job("test: [mac, 1]").unwrap();
        assert_eq!(mac.source, "test");
        let vars: Vec<(&str, &str)> = mac.variables.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(vars, [("CI_NODE_INDEX", "2"), ("CI_NODE_TOTAL", "3"), ("OS", "mac"), ("V", "1")]);
        assert_eq!(plan.waits_for(mac), ["build 1/2", "build 2/2"]);
        let e = p("a: {script: [x], parallel: 500}").unwrap_err().to_string();
        assert!(e.contains("a.parallel") && e.contains("1 to 200"), "{e}");
    }

    #[test]
    fn rules_include_exclude_and_override() {
        let plan = p(concat!(
            "variables: {DEPLOY: 'yes'}\n",
            "always-on: {script: [x]}\n",
            "deploy: {script: [x], rules: [{if: '$DEPLOY == \"yes\" && $CI_PIPELINE_SOURCE == \"push\"', allow_failure: true}]}\n",
            "never: {script: [x], rules: [{if: '$DEPLOY', when: never}, {when: always}]}\n",
            "unmatched: {script: [x], rules: [{if: '$CI_COMMIT_TAG'}]}\n",
            "own-var: {script: [x], variables: {MINE: a}, rules: [{if: '$MINE == \"a\" && $CI_JOB_NAME == \"own-var\"', when: manual}]}\n",
        ))
        .unwrap();
        let names: Vec<_> = plan.jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["always-on", "deploy", "own-var"]);
        assert_eq!(plan.job("deploy").unwrap().allow_failure, AllowFailure::Yes);
        assert_eq!(plan.job("own-var").unwrap().when, When::Manual);
        let e = p("workflow: {rules: [{if: '$NOPE'}]}\na: {script: [x]}").unwrap_err().to_string();
        assert!(e.contains("workflow: rules"), "{e}");
        let e = p("a: {script: [x], rules: [{if: '$A =='}]}").unwrap_err().to_string();
        assert!(e.contains("a.rules") && e.contains("rule 0"), "{e}");
    }

    #[test]
    fn allow_failure_exit_codes() {
        let plan = p("a: {script: [x], allow_failure: {exit_codes: [3, 4]}}").unwrap();
        let a = &plan.jobs[0].allow_failure;
        assert!(a.allows(Some(3)) && !a.allows(Some(1)) && !a.allows(None));
        assert!(is_pipeline(PIPELINE) && !is_pipeline("image: a\nscript: [x]\n"));
    }
}
