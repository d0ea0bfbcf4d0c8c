//! GitLab's job payload (`POST /jobs/request`, 201) -> [`Job`]: the second source of jobs beside
//! the YAML files of [`super::parse`], under the same rules. Precedence, lowest first:
//! predefined, the runner's `environment`, the payload's `variables` (GitLab has already merged
//! instance, group, project, pipeline and job variables into that list, in its own order).
//! Secrecy follows [`super::variables`]: a payload variable is public only when GitLab says so and
//! it is not masked; the job token is never public; values built from either inherit that.

use std::path::PathBuf;
use std::time::Duration;

use super::cache::JobCache;
use super::parse::{DEFAULT_STAGE, JobContext, JobError};
use super::{Image, Job, PullPolicy, Service, Stage};
use crate::gitlab::JobPayload;
use crate::gitlab::payload as wire;
use crate::input::Located;
use keel_contract::variables::{self, Commit, Definition};

/// What error messages call this job: there is no file, so the job's GitLab id stands in.
pub fn origin(payload: &JobPayload) -> PathBuf {
    PathBuf::from(format!("GitLab job {}", payload.id))
}

/// The facts GitLab gives about the run, over `base` (the runner's: builds dir, token, ...).
pub fn context(payload: &JobPayload, base: JobContext) -> JobContext {
    let var = |key: &str| payload.variable(key).map(|v| v.value.clone()).filter(|v| !v.is_empty());
    let project_path = var("CI_PROJECT_PATH").unwrap_or_else(|| {
        let name = if payload.job_info.project_name.is_empty() { "project" } else { &payload.job_info.project_name };
        format!("project-{}/{}", payload.job_info.project_id, name)
    });
    let git = &payload.git_info;
    JobContext {
        job_id: payload.id,
        project_id: payload.job_info.project_id,
        project_path,
        pipeline_id: var("CI_PIPELINE_ID").and_then(|v| v.parse().ok()).unwrap_or(payload.id),
        commit: (!git.sha.is_empty()).then(|| Commit { commit_sha: git.sha.clone(), ref_name: git.git_ref.clone() }),
        ..base
    }
}

/// Builds the job GitLab handed out. `ctx` comes from [`context`].
pub fn job(payload: &JobPayload, ctx: &JobContext) -> Result<Job, JobError> {
    job_with_caches(payload, ctx).map(|(job, _)| job)
}

/// [`job`], with the payload's `cache` entries.
pub fn job_with_caches(payload: &JobPayload, ctx: &JobContext) -> Result<(Job, Vec<JobCache>), JobError> {
    let path = origin(payload);
    let invalid = |key: &str, message: String| JobError::Invalid { at: Located::key(&path, key.to_string()), message };
    let name =
        if payload.job_info.name.is_empty() { format!("job-{}", payload.id) } else { payload.job_info.name.clone() };
    let image = match payload.image.as_ref().filter(|i| !i.name.is_empty()) {
        Some(i) => i.clone(),
        None => match &ctx.default_image {
            Some(n) => wire::Image { name: n.clone(), ..Default::default() },
            None => return Err(JobError::NoImage { path, job: name }),
        },
    };
    let timeout = (payload.runner_info.timeout > 0).then(|| Duration::from_secs(payload.runner_info.timeout));

    let stage = if payload.job_info.stage.is_empty() { DEFAULT_STAGE } else { &payload.job_info.stage };
    let mut vars = ctx.base_variables(&name, stage, &image.name, timeout);
    // The job token authenticates as the job: a credential whatever the payload says of it.
    vars.set(
        "CI_JOB_TOKEN",
        Definition {
            value: payload.token.expose().to_string(),
            expand: false,
            masked: true,
            public: false,
            file: false,
        },
    );
    for v in payload.variables.iter().filter(|v| !v.key.is_empty()) {
        vars.set(v.key.clone(), payload_definition(v));
    }
    if let Some(auth) = registry_auth(payload, vars_value(&vars, "DOCKER_AUTH_CONFIG").as_deref()) {
        vars.set(
            "DOCKER_AUTH_CONFIG",
            Definition { value: auth, expand: false, masked: true, public: false, file: false },
        );
    }
    let variables = super::resolve::variables(&vars, payload.services.len(), &path)?;
    // Image names and service commands are Pod fields: no value that is not public may reach one.
    let expand_public = |key: &str, text: &str| super::resolve::public_field(text, key, "the value", &variables, &path);
    let policies = |key: &str, names: &[String]| -> Result<Vec<PullPolicy>, JobError> {
        names
            .iter()
            .map(|n| {
                PullPolicy::from_gitlab(n).ok_or_else(|| {
                    invalid(key, format!("unknown pull policy {n:?} (expected always, if-not-present or never)"))
                })
            })
            .collect()
    };
    let build_image = Image {
        name: expand_public("image.name", &image.name)?,
        entrypoint: image.entrypoint.clone(),
        pull_policies: policies("image.pull_policy", &image.pull_policy)?,
        user: image.kubernetes_user(),
    };
    let services = payload
        .services
        .iter()
        .enumerate()
        .map(|(n, s)| {
            let key = format!("services[{n}]");
            let command =
                s.command.iter().map(|c| expand_public(&format!("{key}.command"), c)).collect::<Result<Vec<_>, _>>()?;
            let mut own = variables::Variables::new();
            for v in s.variables.iter().filter(|v| !v.key.is_empty()) {
                own.set(v.key.clone(), payload_definition(v));
            }
            Ok(Service {
                variables: super::resolve::service_variables(&variables, own, &key, &path)?,
                image: Image {
                    name: expand_public(&format!("{key}.name"), &s.name)?,
                    entrypoint: s.entrypoint.clone(),
                    pull_policies: policies(&format!("{key}.pull_policy"), &s.pull_policy)?,
                    user: s.kubernetes_user(),
                },
                alias: (!s.alias.trim().is_empty()).then(|| s.aliases().collect::<Vec<_>>().join(",")),
                command,
                ports: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>, JobError>>()?;

    // GitLab folds before_script into `script`; `release` steps are not run by keel.
    let mut stages = Vec::new();
    for wanted in ["script", "after_script"] {
        if let Some(step) = payload.steps.iter().find(|s| s.name == wanted)
            && !step.script.is_empty()
        {
            stages.push(Stage { name: wanted.to_string(), lines: step.script.clone() });
        }
    }
    if !stages.iter().any(|s| s.name == "script") {
        return Err(JobError::NoScript { path, job: name });
    }
    let caches = super::cache::from_payload(&payload.cache, &name, &payload.git_info.git_ref, &variables, &path)?;
    Ok((Job { id: ctx.job_id, name, image: build_image, services, variables, stages, timeout }, caches))
}

/// A payload variable under the secrecy rule: public only when GitLab says so and it is not
/// masked; a `CI_JOB_TOKEN` is a credential whatever the payload says of it.
fn payload_definition(v: &wire::Variable) -> Definition {
    let credential = v.key == "CI_JOB_TOKEN";
    Definition {
        value: v.value.clone(),
        expand: !v.raw,
        masked: v.masked || credential,
        public: v.public && !credential,
        file: v.file,
    }
}

fn vars_value(vars: &variables::Variables, key: &str) -> Option<String> {
    vars.resolve(usize::MAX).ok()?.into_iter().rev().find(|v| v.key == key).map(|v| v.value)
}

/// The payload's registry `credentials` merged into a `DOCKER_AUTH_CONFIG` (entries the job's
/// own `DOCKER_AUTH_CONFIG` already has win, as in GitLab Runner). `None` when there are none.
fn registry_auth(payload: &JobPayload, existing: Option<&str>) -> Option<String> {
    use base64::Engine;
    let registries: Vec<&wire::Credential> =
        payload.credentials.iter().filter(|c| c.kind == "registry" && !c.url.is_empty()).collect();
    if registries.is_empty() {
        return None;
    }
    let mut config: serde_json::Value =
        existing.and_then(|e| serde_json::from_str(e).ok()).unwrap_or_else(|| serde_json::json!({"auths": {}}));
    if !config.get("auths").is_some_and(|a| a.is_object()) {
        config["auths"] = serde_json::json!({});
    }
    let auths = config["auths"].as_object_mut().expect("made an object above");
    for c in registries {
        if auths.contains_key(&c.url) {
            continue;
        }
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password.expose()));
        auths.insert(c.url.clone(), serde_json::json!({ "auth": auth }));
    }
    Some(config.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn payload(extra: serde_json::Value) -> JobPayload {
        let mut p = json!({
            "id": 77, "token": "glcbt-job77secret",
            "job_info": {"name": "build", "stage": "test", "project_id": 9, "project_name": "app"},
            "git_info": {"repo_url": "https://gitlab-ci-token:glcbt-job77secret@gitlab.example.com/g/app.git",
                         "ref": "main", "sha": "0123456789abcdef", "depth": 20},
            "runner_info": {"timeout": 600},
            "variables": [
                {"key": "CI_PROJECT_PATH", "value": "g/app", "public": true},
                {"key": "CI_PIPELINE_ID", "value": "55", "public": true},
                {"key": "CI_JOB_TOKEN", "value": "glcbt-job77secret", "public": false, "masked": true},
                {"key": "A", "value": "topsecret-XYZ-123", "public": false, "masked": true},
                {"key": "B", "value": "prefix-$A", "public": true},
                {"key": "RAW", "value": "keep-$A", "public": true, "raw": true}
            ],
            "steps": [{"name": "script", "script": ["echo $B"]}, {"name": "after_script", "script": ["echo done"]}],
            "image": {"name": "alpine:3", "pull_policy": ["if-not-present"]}
        });
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        JobPayload::from_json(&serde_json::to_vec(&p).unwrap()).unwrap()
    }

    fn build(p: &JobPayload) -> Result<Job, JobError> {
        let ctx = context(p, JobContext { runner_token: "glrt-abcdefghij".into(), ..JobContext::default() });
        job(p, &ctx)
    }

    fn var<'a>(job: &'a Job, key: &str) -> &'a keel_contract::job::Variable {
        job.variables.iter().rev().find(|v| v.key == key).unwrap()
    }

    #[test]
    fn the_payload_becomes_the_same_job_vocabulary() {
        let p = payload(json!({}));
        let job = build(&p).unwrap();
        assert_eq!(job.id, 77);
        assert_eq!(job.name, "build");
        assert_eq!(job.image.name, "alpine:3");
        assert_eq!(job.image.pull_policies, vec![PullPolicy::IfNotPresent]);
        assert_eq!(job.timeout, Some(Duration::from_secs(600)));
        assert_eq!(job.variable("CI_PROJECT_DIR"), Some("/builds/g/app"));
        assert_eq!(job.variable("CI_PIPELINE_ID"), Some("55"));
        assert_eq!(job.variable("CI_COMMIT_SHA"), Some("0123456789abcdef"));
        assert_eq!(job.variable("CI_RUNNER_SHORT_TOKEN"), Some("abcdefgh"));
        let names: Vec<&str> = job.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["script", "after_script"]);
    }

    #[test]
    fn secrecy_follows_expansion_and_the_job_token_is_never_public() {
        let job = build(&payload(json!({}))).unwrap();
        let b = var(&job, "B");
        assert_eq!(b.value, "prefix-topsecret-XYZ-123");
        assert!(!b.public && b.masked, "a value built from a masked one is masked: {b:?}");
        let raw = var(&job, "RAW");
        assert_eq!(raw.value, "keep-$A");
        assert!(raw.public);
        let token = var(&job, "CI_JOB_TOKEN");
        assert!(!token.public && token.masked);
        assert!(job.secret_values().contains(&"glcbt-job77secret".to_string()));
    }

    #[test]
    fn a_secret_in_an_image_name_fails_naming_field_and_variable_not_value() {
        let p = payload(json!({"image": {"name": "registry/$A:1"}}));
        let err = build(&p).unwrap_err().to_string();
        assert!(err.contains("GitLab job 77") && err.contains("image.name") && err.contains('A'), "{err}");
        assert!(!err.contains("topsecret"), "{err}");
        let p = payload(json!({"services": [{"name": "postgres", "command": ["--password=$B"]}]}));
        let err = build(&p).unwrap_err().to_string();
        assert!(err.contains("services[0].command") && err.contains('B'), "{err}");
    }

    #[test]
    fn registry_credentials_become_a_masked_docker_auth_config() {
        let p = payload(json!({"credentials": [
            {"type": "registry", "url": "registry.example.com", "username": "gitlab-ci-token", "password": "glcbt-job77secret"}
        ]}));
        let job = build(&p).unwrap();
        let auth = var(&job, "DOCKER_AUTH_CONFIG");
        assert!(!auth.public && auth.masked);
        let config: serde_json::Value = serde_json::from_str(&auth.value).unwrap();
        assert!(config["auths"]["registry.example.com"]["auth"].is_string());
    }

    #[test]
    fn services_aliases_and_bad_input_are_named() {
        let p = payload(json!({"services": [{"name": "redis:7", "alias": "cache, kv"}]}));
        let job = build(&p).unwrap();
        assert_eq!(job.services[0].alias.as_deref(), Some("cache,kv"));
        let p = payload(json!({"image": {"name": "alpine", "pull_policy": ["sometimes"]}}));
        assert!(build(&p).unwrap_err().to_string().contains("image.pull_policy"));
        let p = payload(json!({"steps": [{"name": "after_script", "script": ["x"]}]}));
        assert!(matches!(build(&p).unwrap_err(), JobError::NoScript { .. }));
        let p = payload(json!({"image": null}));
        assert!(matches!(build(&p).unwrap_err(), JobError::NoImage { .. }));
    }

    #[test]
    fn service_variables_keep_secrecy_and_users_come_from_executor_opts() {
        let p = payload(json!({
            "variables": [{"key": "DB_PASS", "value": "pw-77", "public": false, "masked": true}],
            "image": {"name": "alpine", "executor_opts": {"kubernetes": {"user": "1000:1000"}}},
            "services": [{"name": "postgres:16", "executor_opts": {"kubernetes": {"user": 999}},
                          "variables": [{"key": "POSTGRES_PASSWORD", "value": "$DB_PASS", "public": true},
                                        {"key": "POSTGRES_DB", "value": "app", "public": true},
                                        {"key": "RAW", "value": "$DB_PASS", "public": true, "raw": true}]}]
        }));
        let job = build(&p).unwrap();
        assert_eq!(job.image.user.as_deref(), Some("1000:1000"));
        let svc = &job.services[0];
        assert_eq!(svc.image.user.as_deref(), Some("999"));
        let var = |k: &str| svc.variables.iter().find(|v| v.key == k).unwrap();
        assert_eq!((var("POSTGRES_PASSWORD").value.as_str(), var("POSTGRES_PASSWORD").public), ("pw-77", false));
        assert!(var("POSTGRES_PASSWORD").masked, "built from a masked value");
        assert!(var("POSTGRES_DB").public);
        assert_eq!((var("RAW").value.as_str(), var("RAW").public), ("$DB_PASS", true), "raw is not expanded");
        assert_eq!(svc.variables.len(), 3, "only the service's own");
        assert!(job.secret_values().contains(&"pw-77".to_string()));
    }
}
