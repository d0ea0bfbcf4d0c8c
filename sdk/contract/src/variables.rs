//! The job's variables: where each comes from, which definition wins, and who may see its value.
//!
//! One rule decides secrecy for every variable, whatever its source (predefined, the runner's
//! `environment`, the pipeline's and the job's `variables:`, later GitLab's job payload):
//! - a value is **public** unless it is masked, a credential ([`CREDENTIAL_VARIABLES`]), or built
//!   by `$VAR` expansion from a value that is not public;
//! - a value is **masked** if it is masked or built from a masked value.
//!
//! Everything downstream reads only the resolved [`Variable`]s: the Pod's `env` holds public
//! values only (the rest reach the job through the variables Secret), plugins get non-public
//! values only with `grants.secrets`, and the trace masks every non-public value.

use std::cell::RefCell;

use indexmap::IndexMap;

use crate::expand::{TooLong, expand_limited};
use crate::job::Variable;

/// Variables GitLab treats as credentials even when the job does not mask them.
pub const CREDENTIAL_VARIABLES: &[&str] =
    &["DOCKER_AUTH_CONFIG", "KUBERNETES_BEARER_TOKEN", "CI_JOB_TOKEN", "CI_REGISTRY_PASSWORD"];

/// One definition of a variable, as its source gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    pub value: String,
    /// `$VAR` references are expanded (GitLab's default; `expand: false` and GitLab's `raw`
    /// variables keep the text as written).
    pub expand: bool,
    pub masked: bool,
    /// `false` when the source says the value is not public (GitLab's job payload does for
    /// credentials such as `CI_JOB_TOKEN`); masked values are not public either way.
    pub public: bool,
    /// GitLab's file type: the job gets the value as a file and the variable holds its path.
    pub file: bool,
}

impl Definition {
    /// A value taken as written: predefined variables, never expanded.
    pub fn literal(value: impl Into<String>) -> Definition {
        Definition { value: value.into(), expand: false, masked: false, public: true, file: false }
    }

    /// A value whose `$VAR` references are expanded.
    pub fn expanded(value: impl Into<String>) -> Definition {
        Definition { value: value.into(), expand: true, masked: false, public: true, file: false }
    }
}

/// A value built from variables, with the secrecy it inherits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expanded {
    pub value: String,
    /// The variables referenced whose values are not public, in the order first referenced.
    pub secret_sources: Vec<String>,
    /// Whether any referenced value is masked.
    pub masked: bool,
}

impl Expanded {
    pub fn is_public(&self) -> bool {
        self.secret_sources.is_empty()
    }
}

/// The job's variables in precedence order: a later [`Variables::set`] of a key replaces the
/// earlier definition (GitLab's precedence, lowest first: predefined, runner `environment`,
/// pipeline `variables`, job `variables`).
#[derive(Debug, Clone, Default)]
pub struct Variables {
    defs: IndexMap<String, Definition>,
}

/// An expansion that would not fit the budget: the key it happened at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverBudget {
    pub key: String,
}

impl Variables {
    pub fn new() -> Variables {
        Variables::default()
    }

    pub fn set(&mut self, key: impl Into<String>, def: Definition) {
        self.defs.insert(key.into(), def);
    }

    /// `other`'s definitions over these (as a later layer).
    pub fn extend(&mut self, other: Variables) {
        self.defs.extend(other.defs);
    }

    pub fn len(&self) -> usize {
        self.defs.len()
    }

    /// The defined keys, in definition order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.defs.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.defs.is_empty()
    }

    /// The winning definitions, resolved: references are expanded once against the raw values
    /// (as GitLab's runner does), each result carrying the secrecy of what it was built from.
    /// All values together must fit `budget` bytes (they all land in one Kubernetes object).
    pub fn resolve(&self, budget: usize) -> Result<Vec<Variable>, OverBudget> {
        let raw = |key: &str| {
            self.defs.get(key).map(|d| Source { value: d.value.as_str(), public: is_public(key, d), masked: d.masked })
        };
        let mut left = budget;
        let mut out = Vec::with_capacity(self.defs.len());
        for (key, def) in &self.defs {
            let (value, derived_public, derived_masked) = if def.expand {
                let e = expand_tracked(&def.value, &raw, left).map_err(|_| OverBudget { key: key.clone() })?;
                let public = e.is_public();
                (e.value, public, e.masked)
            } else {
                (def.value.clone(), true, false)
            };
            left = left.saturating_sub(value.len());
            out.push(Variable {
                key: key.clone(),
                value,
                masked: def.masked || derived_masked,
                public: is_public(key, def) && derived_public,
                file: def.file,
            });
        }
        Ok(out)
    }
}

fn is_public(key: &str, def: &Definition) -> bool {
    def.public && !def.masked && !CREDENTIAL_VARIABLES.contains(&key)
}

/// What an expansion needs to know of a referenced variable.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub value: &'a str,
    pub public: bool,
    pub masked: bool,
}

/// Expands `$VAR`/`${VAR}` in `text` from `lookup` (see [`expand_limited`]), noting which
/// referenced values are not public.
pub fn expand_tracked<'a>(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<Source<'a>>,
    max: usize,
) -> Result<Expanded, TooLong> {
    let secret_sources = RefCell::new(Vec::new());
    let masked = RefCell::new(false);
    let value = expand_limited(
        text,
        &|name| {
            let source = lookup(name)?;
            if !source.public {
                secret_sources.borrow_mut().push(name.to_string());
            }
            *masked.borrow_mut() |= source.masked;
            Some(source.value.to_string())
        },
        max,
    )?;
    Ok(Expanded { value, secret_sources: secret_sources.into_inner(), masked: masked.into_inner() })
}

/// Looks a resolved variable up for a later expansion (image names, labels, annotations): the
/// last definition wins.
pub fn source_in<'a>(variables: &'a [Variable], key: &str) -> Option<Source<'a>> {
    variables.iter().rev().find(|v| v.key == key).map(|v| Source {
        value: v.value.as_str(),
        public: v.public,
        masked: v.masked,
    })
}

/// The commit a job runs (`CI_COMMIT_SHA`, `CI_COMMIT_REF_NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub commit_sha: String,
    /// The branch; on a detached HEAD the tag pointing exactly at it (GitLab's ref name of a tag
    /// pipeline), else `HEAD`, which is what git itself calls it.
    pub ref_name: String,
}

/// What GitLab's predefined variables are made of.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub job_id: u64,
    pub job_name: &'a str,
    pub stage: &'a str,
    pub image: &'a str,
    pub builds_dir: &'a str,
    pub project_id: u64,
    /// `group/project`.
    pub project_path: &'a str,
    pub concurrent_id: u32,
    pub runner_token: &'a str,
    pub pipeline_id: u64,
    pub commit: Option<&'a Commit>,
    pub timeout: Option<std::time::Duration>,
    /// `CI_RUNNER_VERSION`: the host's version (not this crate's).
    pub runner_version: &'a str,
}

/// GitLab's predefined variables for a job: the lowest layer of [`Variables`]. Literal values,
/// never expanded, all public (the runner token appears only as its short form).
pub fn predefined(f: &Facts<'_>) -> Variables {
    let project_dir = format!("{}/{}", f.builds_dir.trim_end_matches('/'), f.project_path);
    let project_name = f.project_path.rsplit('/').next().unwrap_or(f.project_path);
    let namespace = f.project_path.rsplit_once('/').map(|(ns, _)| ns).unwrap_or_default();
    let mut v = Variables::new();
    let mut set = |k: &str, value: String| v.set(k, Definition::literal(value));
    set("CI", "true".into());
    set("GITLAB_CI", "true".into());
    set("CI_SERVER", "yes".into());
    set("CI_DISPOSABLE_ENVIRONMENT", "true".into());
    set("CI_JOB_ID", f.job_id.to_string());
    set("CI_JOB_NAME", f.job_name.into());
    set("CI_JOB_STAGE", f.stage.into());
    set("CI_JOB_IMAGE", f.image.into());
    set("CI_BUILDS_DIR", f.builds_dir.into());
    set("CI_PROJECT_DIR", project_dir);
    set("CI_PROJECT_ID", f.project_id.to_string());
    set("CI_PROJECT_PATH", f.project_path.into());
    set("CI_PROJECT_NAME", project_name.into());
    set("CI_PROJECT_NAMESPACE", namespace.into());
    set("CI_CONCURRENT_ID", f.concurrent_id.to_string());
    set("CI_CONCURRENT_PROJECT_ID", f.concurrent_id.to_string());
    set("CI_RUNNER_SHORT_TOKEN", short_token(f.runner_token));
    set("CI_RUNNER_VERSION", f.runner_version.into());
    set("CI_NODE_TOTAL", "1".into());
    set("CI_PIPELINE_ID", f.pipeline_id.to_string());
    if let Some(c) = f.commit {
        set("CI_COMMIT_SHA", c.commit_sha.clone());
        set("CI_COMMIT_SHORT_SHA", c.commit_sha.chars().take(8).collect());
        set("CI_COMMIT_REF_NAME", c.ref_name.clone());
    }
    if let Some(t) = f.timeout {
        set("CI_JOB_TIMEOUT", t.as_secs().to_string());
    }
    v
}

/// GitLab's short token: the first 8 characters after a known token prefix.
pub fn short_token(token: &str) -> String {
    let t = token.strip_prefix("glrt-").unwrap_or(token);
    t.chars().take(8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(value: &str, masked: bool) -> Definition {
        Definition { value: value.into(), expand: true, masked, public: true, file: false }
    }

    fn get<'a>(vars: &'a [Variable], key: &str) -> &'a Variable {
        vars.iter().find(|v| v.key == key).unwrap()
    }

    #[test]
    fn secrecy_travels_with_expansion() {
        let mut v = Variables::new();
        v.set("A", def("topsecret", true));
        v.set("TOKEN_NAME", Definition::literal("x"));
        v.set("CI_JOB_TOKEN", def("glcbt-abc", false));
        v.set("B", def("prefix-$A", false));
        v.set("C", def("${CI_JOB_TOKEN}@host", false));
        v.set("D", def("$TOKEN_NAME and $B", false));
        v.set("E", Definition { value: "$A".into(), expand: false, masked: false, public: true, file: false });
        let out = v.resolve(1 << 20).unwrap();
        let b = get(&out, "B");
        assert_eq!((b.value.as_str(), b.public, b.masked), ("prefix-topsecret", false, true));
        let c = get(&out, "C");
        assert_eq!((c.value.as_str(), c.public, c.masked), ("glcbt-abc@host", false, false));
        // One pass against raw values: D takes B's raw text, which holds A's name, not its value.
        let d = get(&out, "D");
        assert_eq!((d.value.as_str(), d.public), ("x and prefix-$A", true));
        let e = get(&out, "E");
        assert_eq!((e.value.as_str(), e.public), ("$A", true));
        assert!(!get(&out, "CI_JOB_TOKEN").public);
    }

    #[test]
    fn later_definitions_win_and_keep_their_own_secrecy() {
        let mut v = Variables::new();
        v.set("A", def("old", true));
        v.set("A", def("new", false));
        v.set("B", def("$A", false));
        let out = v.resolve(1 << 20).unwrap();
        assert_eq!(out.len(), 2);
        assert!(get(&out, "A").public && get(&out, "B").public);
        assert_eq!(get(&out, "B").value, "new");
    }

    #[test]
    fn budget_names_the_key() {
        let mut v = Variables::new();
        v.set("A", Definition::literal("x".repeat(10)));
        v.set("B", def("$A$A", false));
        assert_eq!(v.resolve(25).unwrap_err(), OverBudget { key: "B".into() });
    }

    #[test]
    fn tracked_expansion_names_secret_sources_once_each() {
        let vars = vec![
            Variable { key: "S".into(), value: "s3".into(), masked: true, public: false, file: false },
            Variable { key: "P".into(), value: "p".into(), masked: false, public: true, file: false },
        ];
        let e = expand_tracked("$P/$S/${S}", &|k| source_in(&vars, k), 1000).unwrap();
        assert_eq!(e.value, "p/s3/s3");
        assert_eq!(e.secret_sources, vec!["S".to_string()]);
        assert!(e.masked && !e.is_public());
    }
}
