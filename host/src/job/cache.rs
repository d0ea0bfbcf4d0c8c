//! A job's `cache:` entries, from either source (a YAML file or GitLab's payload), with their
//! keys expanded by the job's variables. A key ends up in an object name anyone with access to
//! the bucket can list, so a key built from a value that is not public is refused here, naming
//! the key, never the value.

use std::path::Path;

use serde::Deserialize;

use super::Variable;
use super::parse::JobError;
use crate::input::Located;
use keel_contract::variables::{self, expand_tracked};

/// When a cache is downloaded and uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum CachePolicy {
    #[serde(rename = "pull")]
    Pull,
    #[serde(rename = "push")]
    Push,
    #[default]
    #[serde(rename = "pull-push")]
    PullPush,
}

impl CachePolicy {
    pub fn pulls(self) -> bool {
        matches!(self, CachePolicy::Pull | CachePolicy::PullPush)
    }
    pub fn pushes(self) -> bool {
        matches!(self, CachePolicy::Push | CachePolicy::PullPush)
    }
}

/// After which outcome a cache is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheWhen {
    #[default]
    OnSuccess,
    OnFailure,
    Always,
}

/// What a cache's key is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheKey {
    /// Already expanded (GitLab resolves `key:files` itself before it sends the job).
    Literal(String),
    /// `key: {files: [...], prefix: ...}`: a digest of these files of the project, computed
    /// where the files are (`host run`: the source directory). `prefix` is expanded.
    Files { files: Vec<String>, prefix: Option<String> },
    /// `key: {files_commits: [...], prefix: ...}`: a digest of the last commits that changed
    /// these files.
    FilesCommits { files: Vec<String>, prefix: Option<String> },
}

/// One `cache:` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCache {
    pub key: CacheKey,
    pub paths: Vec<String>,
    pub untracked: bool,
    pub policy: CachePolicy,
    pub when: CacheWhen,
    /// Expanded, in order; `CACHE_FALLBACK_KEY` is the job's variable, tried after them.
    pub fallback_keys: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// The YAML form.

/// `cache:` as written: one entry or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum CacheDefs {
    One(CacheDef),
    Many(Vec<CacheDef>),
}

impl CacheDefs {
    pub(super) fn into_vec(self) -> Vec<CacheDef> {
        match self {
            CacheDefs::One(c) => vec![c],
            CacheDefs::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CacheDef {
    key: Option<KeyDef>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    untracked: bool,
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    when: Option<String>,
    #[serde(default)]
    fallback_keys: Vec<String>,
    /// GitLab's `unprotect`: accepted, keel has no protected-branch suffix to drop.
    #[allow(dead_code)]
    unprotect: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum KeyDef {
    Text(String),
    Number(i64),
    Files(FilesKey),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilesKey {
    files: Option<Vec<String>>,
    files_commits: Option<Vec<String>>,
    prefix: Option<String>,
}

fn policy(text: &str) -> Option<CachePolicy> {
    match text {
        "pull" => Some(CachePolicy::Pull),
        "push" => Some(CachePolicy::Push),
        "pull-push" | "" => Some(CachePolicy::PullPush),
        _ => None,
    }
}

fn when(text: &str) -> Option<CacheWhen> {
    match text {
        "on_success" | "" => Some(CacheWhen::OnSuccess),
        "on_failure" => Some(CacheWhen::OnFailure),
        "always" => Some(CacheWhen::Always),
        _ => None,
    }
}

/// `text` expanded with the job's variables for `key` (`cache[0].key`); refused when a masked
/// value went into it, or (`strict`, the YAML file, where only masked values are not public)
/// any value that is not public.
fn expand_key(text: &str, key: &str, variables: &[Variable], path: &Path, strict: bool) -> Result<String, JobError> {
    let invalid = |message: String| JobError::Invalid { at: Located::key(path, key.to_string()), message };
    let expanded = expand_tracked(text, &|k| variables::source_in(variables, k), 4096)
        .map_err(|_| invalid("the cache key expands to more than 4 KiB".into()))?;
    if let Some(variable) = expanded.secret_sources.first().filter(|_| strict) {
        return Err(invalid(format!(
            "the cache key uses {variable}, a masked or protected value: keys are object names anyone with \
             access to the cache can list"
        )));
    }
    if expanded.masked {
        return Err(invalid(
            "the cache key uses a masked variable: keys are object names anyone with access to the cache can list"
                .into(),
        ));
    }
    Ok(expanded.value)
}

/// A value GitLab already expanded: refused when it carries a masked value (GitLab masks values
/// of 8 characters or more; shorter ones would match by accident). Only masked ones: GitLab
/// sends most project variables as not public, and `cache-$DEPLOY_ENV` is an ordinary key.
fn check_resolved(text: &str, key: &str, variables: &[Variable], path: &Path) -> Result<String, JobError> {
    if let Some(v) = variables.iter().find(|v| v.masked && v.value.len() >= 8 && text.contains(v.value.as_str())) {
        return Err(JobError::Invalid {
            at: Located::key(path, key.to_string()),
            message: format!(
                "the cache key contains the value of {}, a masked variable: keys are object \
                 names anyone with access to the cache can list",
                v.key
            ),
        });
    }
    expand_key(text, key, variables, path, false)
}

/// The YAML entries, checked and expanded.
pub(super) fn from_yaml(defs: Vec<CacheDef>, variables: &[Variable], path: &Path) -> Result<Vec<JobCache>, JobError> {
    defs.into_iter()
        .enumerate()
        .map(|(i, d)| {
            let at = |k: &str| format!("cache[{i}].{k}");
            let invalid = |k: &str, message: String| JobError::Invalid { at: Located::key(path, at(k)), message };
            let key = match d.key {
                None => CacheKey::Literal("default".into()),
                Some(KeyDef::Number(n)) => CacheKey::Literal(n.to_string()),
                Some(KeyDef::Text(t)) => CacheKey::Literal(expand_key(&t, &at("key"), variables, path, true)?),
                Some(KeyDef::Files(f)) => {
                    let (name, files, commits) = match (f.files, f.files_commits) {
                        (Some(files), None) => ("key.files", files, false),
                        (None, Some(files)) => ("key.files_commits", files, true),
                        _ => return Err(invalid("key", "give `files` or `files_commits`, one of them".into())),
                    };
                    if files.is_empty() || files.len() > 2 {
                        return Err(invalid(name, "lists one or two files, as GitLab allows".into()));
                    }
                    let prefix =
                        f.prefix.map(|p| expand_key(&p, &at("key.prefix"), variables, path, true)).transpose()?;
                    if commits { CacheKey::FilesCommits { files, prefix } } else { CacheKey::Files { files, prefix } }
                }
            };
            let policy_text = d.policy.as_deref().unwrap_or_default();
            let policy = policy(policy_text).ok_or_else(|| {
                invalid("policy", format!("unknown policy {policy_text:?} (expected pull, push or pull-push)"))
            })?;
            let when_text = d.when.as_deref().unwrap_or_default();
            let when = when(when_text).ok_or_else(|| {
                invalid("when", format!("unknown value {when_text:?} (expected on_success, on_failure or always)"))
            })?;
            let fallback_keys = d
                .fallback_keys
                .iter()
                .enumerate()
                .map(|(n, k)| expand_key(k, &at(&format!("fallback_keys[{n}]")), variables, path, true))
                .collect::<Result<_, _>>()?;
            Ok(JobCache { key, paths: d.paths, untracked: d.untracked, policy, when, fallback_keys })
        })
        .collect()
}

/// The payload's entries. GitLab sends keys resolved; an empty key is GitLab Runner's default,
/// `<job name>/<ref>`.
pub fn from_payload(
    caches: &[crate::gitlab::payload::Cache],
    job_name: &str,
    git_ref: &str,
    variables: &[Variable],
    path: &Path,
) -> Result<Vec<JobCache>, JobError> {
    caches
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let at = |k: &str| format!("cache[{i}].{k}");
            let invalid = |k: &str, message: String| JobError::Invalid { at: Located::key(path, at(k)), message };
            let key = if c.key.is_empty() { format!("{job_name}/{git_ref}") } else { c.key.clone() };
            let key = check_resolved(&key, &at("key"), variables, path)?;
            let policy =
                policy(&c.policy).ok_or_else(|| invalid("policy", format!("unknown policy {:?}", c.policy)))?;
            let when = when(&c.when).ok_or_else(|| invalid("when", format!("unknown value {:?}", c.when)))?;
            let fallback_keys = c
                .fallback_keys
                .iter()
                .enumerate()
                .map(|(n, k)| check_resolved(k, &at(&format!("fallback_keys[{n}]")), variables, path))
                .collect::<Result<_, _>>()?;
            Ok(JobCache {
                key: CacheKey::Literal(key),
                paths: c.paths.clone(),
                untracked: c.untracked,
                policy,
                when,
                fallback_keys,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::parse::{JobContext, JobSource, parse_with_caches};

    fn caches(text: &str) -> Result<Vec<JobCache>, JobError> {
        parse_with_caches(
            text,
            &JobSource { path: ".gitlab-ci.yml".into(), job_name: Some("build".into()) },
            &JobContext::default(),
        )
        .map(|(_, c)| c)
    }

    #[test]
    fn yaml_forms_defaults_and_inheritance() {
        let got = caches(
            "variables:\n  BRANCH: main\n\
             default:\n  cache: {key: dflt, paths: [d/]}\n\
             build:\n  image: alpine\n  script: [x]\n  cache:\n\
             \x20   - key: deps-$BRANCH\n      paths: [vendor/]\n      policy: pull\n      when: always\n      fallback_keys: [deps-$CI_DEFAULT_BRANCH, base]\n\
             \x20   - key: {files: [Cargo.lock], prefix: $CI_JOB_NAME}\n      paths: [target/]\n\
             \x20   - paths: [x/]\n",
        )
        .unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].key, CacheKey::Literal("deps-main".into()));
        assert_eq!((got[0].policy, got[0].when), (CachePolicy::Pull, CacheWhen::Always));
        assert_eq!(got[0].fallback_keys[1], "base");
        assert_eq!(got[1].key, CacheKey::Files { files: vec!["Cargo.lock".into()], prefix: Some("build".into()) });
        assert_eq!((got[1].policy, got[1].when), (CachePolicy::PullPush, CacheWhen::OnSuccess));
        assert_eq!(got[2].key, CacheKey::Literal("default".into()));
        // `default: cache` applies to a job without its own.
        let got =
            caches("default:\n  cache: {key: dflt, paths: [d/]}\nbuild:\n  image: alpine\n  script: [x]\n").unwrap();
        assert_eq!(got[0].key, CacheKey::Literal("dflt".into()));
    }

    #[test]
    fn bad_values_and_masked_keys_are_errors_naming_the_key() {
        let err = caches("build:\n  image: alpine\n  script: [x]\n  cache: {key: k, policy: sometimes}\n").unwrap_err();
        assert!(err.to_string().contains("cache[0].policy"), "{err}");
        let err = caches(
            "variables:\n  TOKEN: {value: hunter2hunter2, masked: true}\n\
             build:\n  image: alpine\n  script: [x]\n  cache: {key: k-$TOKEN, paths: [a/]}\n",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("cache[0].key") && text.contains("masked") && !text.contains("hunter2"), "{text}");
    }

    #[test]
    fn payload_keys_are_checked_for_masked_values() {
        let vars = vec![Variable {
            key: "SECRET".into(),
            value: "s3cr3tValue9".into(),
            public: false,
            masked: true,
            file: false,
        }];
        let wire = |key: &str| crate::gitlab::payload::Cache {
            key: key.into(),
            paths: vec!["a/".into()],
            fallback_keys: vec!["fb".into()],
            ..Default::default()
        };
        let path = Path::new("GitLab job 1");
        let ok = from_payload(&[wire("cargo-main")], "build", "main", &vars, path).unwrap();
        assert_eq!(ok[0].key, CacheKey::Literal("cargo-main".into()));
        assert_eq!(ok[0].fallback_keys, ["fb"]);
        let empty = from_payload(&[wire("")], "build", "main", &vars, path).unwrap();
        assert_eq!(empty[0].key, CacheKey::Literal("build/main".into()), "GitLab Runner's default key");
        let mut with_env = vars.clone();
        with_env.push(Variable {
            key: "DEPLOY_ENV".into(),
            value: "production".into(),
            public: false,
            masked: false,
            file: false,
        });
        let plain = from_payload(&[wire("cache-production")], "build", "main", &with_env, path).unwrap();
        assert_eq!(plain[0].key, CacheKey::Literal("cache-production".into()), "not public is not secret");
        let err = from_payload(&[wire("k-s3cr3tValue9")], "build", "main", &vars, path).unwrap_err().to_string();
        assert!(err.contains("cache[0].key") && err.contains("SECRET") && !err.contains("s3cr3tValue9"), "{err}");
    }
}
