//! The job GitLab hands out on `POST /api/v4/jobs/request` (201), as GitLab Runner's
//! `common/spec/spec.go` reads it. Self-contained on purpose: mapping it onto the host's own job
//! is the pipeline's business. Unknown fields are ignored (GitLab adds fields all the time);
//! fields we read that have the wrong shape are an error naming the job and the field.

use std::fmt;

use serde::{Deserialize, Deserializer};

use super::secret::Secret;

#[derive(Debug, thiserror::Error)]
#[error("job {job}: payload field `{field}`: {message}")]
pub struct PayloadError {
    /// The job's id when the payload had a readable one.
    pub job: JobRef,
    pub field: String,
    pub message: String,
}

/// A job id for messages: `4242`, or `(no id)` when the payload had none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobRef(pub Option<u64>);

impl fmt::Display for JobRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(id) => write!(f, "{id}"),
            None => f.write_str("(no id)"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct JobPayload {
    pub id: u64,
    /// The job token (`glcbt-...`): authenticates the job's own calls, clones, registry pulls.
    pub token: Secret,
    #[serde(default)]
    pub allow_git_fetch: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub job_info: JobInfo,
    #[serde(default, deserialize_with = "nullable")]
    pub git_info: GitInfo,
    #[serde(default, deserialize_with = "nullable")]
    pub runner_info: RunnerInfo,
    #[serde(default, deserialize_with = "nullable")]
    pub variables: Vec<Variable>,
    #[serde(default, deserialize_with = "nullable")]
    pub steps: Vec<Step>,
    #[serde(default)]
    pub image: Option<Image>,
    #[serde(default, deserialize_with = "nullable")]
    pub services: Vec<Service>,
    #[serde(default, deserialize_with = "nullable")]
    pub artifacts: Vec<Artifact>,
    #[serde(default, deserialize_with = "nullable")]
    pub cache: Vec<Cache>,
    #[serde(default, deserialize_with = "nullable")]
    pub credentials: Vec<Credential>,
    #[serde(default, deserialize_with = "nullable")]
    pub dependencies: Vec<Dependency>,
    #[serde(default, deserialize_with = "nullable")]
    pub features: JobFeatures,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct JobInfo {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub stage: String,
    #[serde(default)]
    pub project_id: u64,
    #[serde(default)]
    pub project_name: String,
}

#[derive(Clone, Default, Deserialize)]
pub struct GitInfo {
    /// Carries the job token as credentials (`https://gitlab-ci-token:<token>@...`).
    #[serde(default)]
    pub repo_url: Secret,
    #[serde(default, rename = "ref")]
    pub git_ref: String,
    #[serde(default)]
    pub sha: String,
    #[serde(default)]
    pub before_sha: String,
    #[serde(default)]
    pub ref_type: String,
    /// Clone depth; 0 means the whole history.
    #[serde(default)]
    pub depth: u32,
    #[serde(default, deserialize_with = "nullable")]
    pub refspecs: Vec<String>,
}

impl fmt::Debug for GitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitInfo")
            .field("repo_url", &redact_url_credentials(self.repo_url.expose()))
            .field("ref", &self.git_ref)
            .field("sha", &self.sha)
            .field("before_sha", &self.before_sha)
            .field("ref_type", &self.ref_type)
            .field("depth", &self.depth)
            .field("refspecs", &self.refspecs)
            .finish()
    }
}

/// `https://user:secret@host/path` -> `https://[REDACTED]@host/path`.
pub fn redact_url_credentials(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return url.to_string() };
    let authority_end = url[scheme_end..].find('/').map(|i| scheme_end + i).unwrap_or(url.len());
    match url[scheme_end..authority_end].rfind('@') {
        Some(at) => format!("{}[REDACTED]{}", &url[..scheme_end], &url[scheme_end + at..]),
        None => url.to_string(),
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RunnerInfo {
    /// The job's timeout in seconds (the project's or the runner's, whichever GitLab chose).
    #[serde(default)]
    pub timeout: u64,
}

/// A CI variable. Not public or masked values are secrets: Debug shows only the key.
#[derive(Clone, Deserialize)]
pub struct Variable {
    pub key: String,
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub public: bool,
    #[serde(default)]
    pub masked: bool,
    /// The value is written to a file and the variable holds the file's path.
    #[serde(default)]
    pub file: bool,
    /// `$VAR` references in the value are not expanded.
    #[serde(default)]
    pub raw: bool,
}

impl fmt::Debug for Variable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value: &dyn fmt::Debug = if self.public && !self.masked { &self.value } else { &"[REDACTED]" };
        f.debug_struct("Variable")
            .field("key", &self.key)
            .field("value", value)
            .field("public", &self.public)
            .field("masked", &self.masked)
            .field("file", &self.file)
            .field("raw", &self.raw)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Step {
    /// `script` (before_script folded in by GitLab), `after_script`, `release`.
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub script: Vec<String>,
    /// Seconds; 0 when GitLab sent none.
    #[serde(default)]
    pub timeout: u64,
    #[serde(default)]
    pub when: StepWhen,
    #[serde(default)]
    pub allow_failure: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepWhen {
    #[default]
    OnSuccess,
    OnFailure,
    Always,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Image {
    #[serde(default)]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub entrypoint: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub pull_policy: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub executor_opts: ExecutorOpts,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ExecutorOpts {
    #[serde(default)]
    pub kubernetes: Option<KubernetesOpts>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct KubernetesOpts {
    /// `uid` or `uid:gid`; GitLab sends a string, older versions a number.
    #[serde(default, deserialize_with = "string_or_number")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Service {
    #[serde(default)]
    pub name: String,
    /// One or more aliases separated by commas or spaces.
    #[serde(default)]
    pub alias: String,
    #[serde(default, deserialize_with = "nullable")]
    pub command: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub entrypoint: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub variables: Vec<Variable>,
    #[serde(default, deserialize_with = "nullable")]
    pub pull_policy: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub executor_opts: ExecutorOpts,
}

impl Image {
    /// `executor_opts.kubernetes.user`, when given.
    pub fn kubernetes_user(&self) -> Option<String> {
        self.executor_opts.user()
    }
}

impl ExecutorOpts {
    fn user(&self) -> Option<String> {
        self.kubernetes.as_ref().and_then(|k| k.user.clone()).filter(|u| !u.trim().is_empty())
    }
}

impl Service {
    /// `executor_opts.kubernetes.user`, when given.
    pub fn kubernetes_user(&self) -> Option<String> {
        self.executor_opts.user()
    }

    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        self.alias.split([',', ' ']).filter(|a| !a.is_empty())
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Artifact {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub untracked: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub paths: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub when: String,
    #[serde(default)]
    pub expire_in: String,
    #[serde(default)]
    pub artifact_type: String,
    #[serde(default)]
    pub artifact_format: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Cache {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub untracked: bool,
    #[serde(default)]
    pub policy: String,
    #[serde(default, deserialize_with = "nullable")]
    pub paths: Vec<String>,
    #[serde(default)]
    pub when: String,
    #[serde(default, deserialize_with = "nullable")]
    pub fallback_keys: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Credential {
    /// `registry` is the only kind GitLab sends today.
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: Secret,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Dependency {
    pub id: u64,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub token: Secret,
    #[serde(default)]
    pub artifacts_file: Option<ArtifactsFile>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ArtifactsFile {
    #[serde(default)]
    pub filename: String,
    #[serde(default)]
    pub size: u64,
}

/// What this GitLab instance supports for this job.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct JobFeatures {
    #[serde(default)]
    pub trace_sections: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub token_mask_prefixes: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub failure_reasons: Vec<String>,
}

impl JobPayload {
    /// Parses a 201 body. Errors name the job (when its id is readable) and the field.
    pub fn from_json(body: &[u8]) -> Result<JobPayload, PayloadError> {
        #[derive(Deserialize)]
        struct IdOnly {
            id: Option<u64>,
        }
        let job = JobRef(serde_json::from_slice::<IdOnly>(body).ok().and_then(|j| j.id));
        let de = &mut serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." { "(document)".to_string() } else { field };
            PayloadError { job, field, message: redact_quoted(&e.inner().to_string()) }
        })
    }

    /// The value of variable `key`, last one winning as in GitLab.
    pub fn variable(&self, key: &str) -> Option<&Variable> {
        self.variables.iter().rev().find(|v| v.key == key)
    }
}

/// serde_json quotes the offending string in its messages (`invalid type: string "..."`); that
/// string may be a secret, so messages keep only its length.
fn redact_quoted(message: &str) -> String {
    let re = regex::Regex::new(r#""(?:[^"\\]|\\.)*""#).expect("a valid regex");
    let out = re.replace_all(message, |c: &regex::Captures| format!("<{} bytes>", c[0].len() - 2));
    out.chars().take(300).collect()
}

/// `null` reads as the type's default: GitLab sends `null` for absent lists and objects.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        S(String),
        N(u64),
    }
    Ok(Option::<Either>::deserialize(d)?.map(|e| match e {
        Either::S(s) => s,
        Either::N(n) => n.to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The realistic payload of the wire notes (`shared/gitlab-runner-api.md`).
    pub(crate) const EXAMPLE: &str = r#"{"id":4242,"token":"glcbt-JOBTOKEN","allow_git_fetch":true,
 "job_info":{"name":"test","stage":"test","project_id":7,"project_name":"app"},
 "git_info":{"repo_url":"https://gitlab-ci-token:glcbt-JOBTOKEN@gitlab.example.com/g/app.git",
  "ref":"main","sha":"1f2e3d","before_sha":"0a1b2c","ref_type":"branch","depth":20,
  "refspecs":["+refs/pipelines/99:refs/pipelines/99","+refs/heads/main:refs/remotes/origin/main"]},
 "runner_info":{"timeout":3600},
 "variables":[{"key":"CI_JOB_ID","value":"4242","public":true,"masked":false},
  {"key":"DB_PASS","value":"s3cr3tValue9","public":false,"masked":true},
  {"key":"KUBECONFIG","value":"apiVersion: v1\n...","public":false,"masked":false,"file":true},
  {"key":"LITERAL","value":"$NOT_EXPANDED","public":false,"masked":false,"raw":true}],
 "steps":[{"name":"script","script":["cargo test"],"timeout":3600,"when":"on_success","allow_failure":false},
  {"name":"after_script","script":["echo done"],"timeout":3600,"when":"always","allow_failure":true}],
 "image":{"name":"rust:1.95","entrypoint":[""],"pull_policy":["if-not-present"],
  "executor_opts":{"kubernetes":{"user":"1000"}}},
 "services":[{"name":"postgres:16","alias":"db,pg","command":["postgres","-c","fsync=off"],
  "variables":[{"key":"POSTGRES_PASSWORD","value":"pw"}]}],
 "artifacts":[{"name":"out","paths":["target/out/"],"exclude":[],"when":"on_success","expire_in":"7d",
  "artifact_type":"archive","artifact_format":"zip"}],
 "cache":[{"key":"cargo-main","paths":[".cargo/"],"policy":"pull-push","when":"on_success","fallback_keys":["cargo-default"]}],
 "credentials":[{"type":"registry","url":"registry.example.com","username":"gitlab-ci-token","password":"glcbt-JOBTOKEN"}],
 "dependencies":[{"id":4241,"name":"build","token":"glcbt-OTHER","artifacts_file":{"filename":"artifacts.zip","size":1024}}],
 "features":{"trace_sections":true,"token_mask_prefixes":["glpat-","glcbt-"],
  "failure_reasons":["script_failure","runner_system_failure","job_execution_timeout","image_pull_failure"]}}"#;

    #[test]
    fn reads_the_realistic_payload() {
        let job = JobPayload::from_json(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(job.id, 4242);
        assert_eq!(job.token.expose(), "glcbt-JOBTOKEN");
        assert!(job.allow_git_fetch);
        assert_eq!((job.job_info.name.as_str(), job.job_info.project_id), ("test", 7));
        assert_eq!((job.git_info.git_ref.as_str(), job.git_info.depth), ("main", 20));
        assert_eq!(job.git_info.refspecs.len(), 2);
        assert_eq!(job.runner_info.timeout, 3600);
        let pass = job.variable("DB_PASS").unwrap();
        assert!(pass.masked && !pass.public && !pass.file);
        assert!(job.variable("KUBECONFIG").unwrap().file);
        assert!(job.variable("LITERAL").unwrap().raw);
        assert_eq!(job.steps[1].name, "after_script");
        assert_eq!(job.steps[1].when, StepWhen::Always);
        assert!(job.steps[1].allow_failure);
        let image = job.image.as_ref().unwrap();
        assert_eq!(image.entrypoint, [""]);
        assert_eq!(image.pull_policy, ["if-not-present"]);
        assert_eq!(image.executor_opts.kubernetes.as_ref().unwrap().user.as_deref(), Some("1000"));
        assert_eq!(job.services[0].aliases().collect::<Vec<_>>(), ["db", "pg"]);
        assert_eq!(job.services[0].variables[0].key, "POSTGRES_PASSWORD");
        assert_eq!(job.artifacts[0].artifact_format, "zip");
        assert_eq!(job.cache[0].fallback_keys, ["cargo-default"]);
        assert_eq!(job.credentials[0].kind, "registry");
        assert_eq!(job.dependencies[0].artifacts_file.as_ref().unwrap().size, 1024);
        assert_eq!(job.features.failure_reasons.len(), 4);
    }

    #[test]
    fn debug_shows_no_secret() {
        let job = JobPayload::from_json(EXAMPLE.as_bytes()).unwrap();
        let debug = format!("{job:?}");
        for secret in ["JOBTOKEN", "s3cr3tValue9", "glcbt-OTHER", "apiVersion"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(debug.contains("https://[REDACTED]@gitlab.example.com/g/app.git"), "{debug}");
        assert!(debug.contains("\"4242\""), "public values stay readable: {debug}");
    }

    #[test]
    fn nulls_read_as_empty() {
        let job = JobPayload::from_json(
            br#"{"id":1,"token":"t","services":null,"variables":null,"features":null,
                "steps":[{"name":"script","script":null}],"image":{"name":"a","executor_opts":{"kubernetes":{"user":0}}}}"#,
        )
        .unwrap();
        assert!(job.services.is_empty() && job.variables.is_empty() && job.steps[0].script.is_empty());
        assert_eq!(job.image.unwrap().executor_opts.kubernetes.unwrap().user.as_deref(), Some("0"));
    }

    #[test]
    fn garbage_names_job_and_field_without_the_value() {
        let err = JobPayload::from_json(
            br#"{"id":77,"token":"t","variables":[{"key":"A","value":"x"},{"key":"B","masked":"glpat-secret"}]}"#,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("job 77: payload field `variables[1].masked`: invalid type: string <12 bytes>"),
            "{text}"
        );
        assert!(!text.contains("glpat"));

        let err = JobPayload::from_json(br#"{"id":78,"token":"t","steps":[{"name":"script","when":"sometimes"}]}"#)
            .unwrap_err();
        assert!(err.to_string().starts_with("job 78: payload field `steps[0].when`: unknown variant"), "{err}");

        let err = JobPayload::from_json(b"<html>502 Bad Gateway</html>").unwrap_err();
        assert!(err.to_string().starts_with("job (no id): payload field `(document)`"), "{err}");

        let err = JobPayload::from_json(br#"{"token":"t"}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `id`"), "{err}");
    }
}
