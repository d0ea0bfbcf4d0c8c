//! The job pipeline behind `host serve`: every GitLab job goes through the same prepare and run
//! as `host run` ([`crate::run::run`]), its sources fetched from git, its trace sent to GitLab,
//! GitLab's cancels turned into the interrupts `host run` gets from Ctrl-C.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::{JobContext, JobExecutor};
use crate::cluster::Connection;
use crate::gitlab::payload::{Artifact, Dependency};
use crate::gitlab::{
    ArtifactsUpload, Cancel, Client, ClientOptions, FailureReason, Features, JobCredentials, JobOutcome, JobPayload,
    RunnerIdentity, Secret, UploadOutcome, VersionInfo,
};
use crate::plugins::Runtime;
use crate::prepare::{JobInput, PrepareRequest};
use crate::run::artifacts::{ArtifactStore, JobArtifacts};
use crate::run::{ClusterChoice, Outcome, RunOptions, Sources};
use crate::sources::git::GitCache;

/// What keel announces in `info.features`: the client's own (trace protocol, cancels) and what
/// this pipeline really does with a payload. Artifacts `paths` and `exclude` are uploaded
/// (`artifacts`, `artifacts_exclude`); caches are restored and saved through `[runners.cache]`
/// with their `fallback_keys` (`cache`, `fallback_cache_keys`); report artifacts
/// (`upload_multiple_artifacts`), raw artifacts, services' variables and `executor_opts` are not
/// implemented yet, so they are not claimed.
pub fn features() -> Features {
    Features {
        variables: true,
        image: true,
        services: true,
        masking: true,
        raw_variables: true,
        refspecs: true,
        return_exit_code: true,
        service_multiple_aliases: true,
        service_variables: true,
        image_executor_opts: true,
        service_executor_opts: true,
        artifacts: true,
        artifacts_exclude: true,
        cache: true,
        fallback_cache_keys: true,
        upload_multiple_artifacts: true,
        upload_raw_artifacts: true,
        ..Features::client()
    }
}

/// Runs GitLab's jobs on the runners' clusters.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

struct Inner {
    runtime: Arc<Runtime>,
    /// Read again for every job, so a SIGHUP-free edit of `[runners.kubernetes]` (plugins,
    /// resources, policies) applies to the next job, as GitLab Runner reloads its config.
    config_path: PathBuf,
    /// One connection per runner (by name), opened at start and shared by its jobs.
    connections: HashMap<String, Arc<Connection>>,
    git: GitCache,
}

impl Executor {
    pub fn new(
        runtime: Arc<Runtime>,
        config_path: PathBuf,
        connections: HashMap<String, Arc<Connection>>,
        git: GitCache,
    ) -> Executor {
        Executor { inner: Arc::new(Inner { runtime, config_path, connections, git }) }
    }
}

impl JobExecutor for Executor {
    fn run(&self, job: JobPayload, ctx: JobContext) -> BoxFuture<'static, JobOutcome> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.run(job, ctx).await })
    }
}

impl Inner {
    async fn run(&self, payload: JobPayload, ctx: JobContext) -> JobOutcome {
        let runner = ctx.runner.clone();
        let reporter = ctx.reporter;
        let early = ctx.early_outcome;
        let Some(connection) = self.connections.get(&runner.name).cloned() else {
            reporter.write(
                format!("ERROR: Job failed (system failure): runner {:?} has no cluster connection\n", runner.name)
                    .as_bytes(),
            );
            return JobOutcome::failed(FailureReason::RunnerSystemFailure, None);
        };
        let payload = Arc::new(payload);
        let id = payload.id;
        let req = PrepareRequest {
            pipeline_id: None,
            instance_variables: Vec::new(),
            config: Some(self.config_path.clone()),
            runner: (!runner.name.is_empty()).then(|| runner.name.clone()),
            job: JobInput::Gitlab(payload.clone()),
            extra_plugins: Vec::new(),
            strategy: None,
            job_id: id,
            project_id: payload.job_info.project_id,
            project_path: String::new(),
            // GitLab's job ids are unique per instance; the runner's short token keeps two
            // instances' jobs apart on one cluster.
            object_suffix: format!("{id}-{}", crate::job::variables::short_token(&runner.token).to_lowercase()),
            commit: None,
            require_strategy: true,
        };

        // GitLab's cancels, as `host run`'s interrupt count: 1 stops the stage and still runs
        // after_script, 2 skips it.
        let (interrupt_tx, interrupts) = tokio::sync::watch::channel(0u32);
        let mut cancel = reporter.cancel();
        let forward = tokio::spawn(async move {
            loop {
                let level = match *cancel.borrow_and_update() {
                    Cancel::None => 0,
                    Cancel::Graceful => 1,
                    Cancel::Immediate => 2,
                };
                if level > *interrupt_tx.borrow() {
                    let _ = interrupt_tx.send(level);
                }
                if cancel.changed().await.is_err() {
                    return;
                }
            }
        });
        let artifacts = match job_artifacts(&runner, &payload) {
            Ok(a) => a,
            Err(e) => {
                reporter.write(format!("ERROR: Job failed (system failure): {e}\n").as_bytes());
                forward.abort();
                return JobOutcome::failed(FailureReason::RunnerSystemFailure, None);
            }
        };
        let stage_reporter = reporter.clone();
        let opts = RunOptions {
            cluster: ClusterChoice::Shared(connection),
            sources: Sources::Git { info: payload.git_info.clone(), cache: Some(self.git.clone()) },
            timestamps: false,
            trace_file: None,
            color: true,
            extra_secrets: vec![payload.token.expose().to_string(), runner.token.clone()],
            // Bounded: each prefix is a state of the trace's matcher.
            token_prefixes: payload.features.token_mask_prefixes.iter().take(64).cloned().collect(),
            on_stage: Some(Arc::new(move |stage: &str| stage_reporter.set_stage(stage))),
            on_outcome: Some(Box::new(move |outcome: &Outcome| {
                let _ = early.send(for_gitlab(outcome));
            })),
            artifacts,
            cache_dir: None,
        };
        let outcome = crate::run::run(&self.runtime, req, opts, Box::new(reporter.sink()), interrupts).await;
        forward.abort();
        tracing::info!(job.id = id, outcome = ?outcome, "serve.job_finished");
        for_gitlab(&outcome)
    }
}

/// The job's artifacts and dependencies, moved through GitLab's runner API; `None` when it has
/// neither.
fn job_artifacts(
    runner: &crate::config::Runner,
    payload: &JobPayload,
) -> Result<Option<JobArtifacts>, crate::gitlab::GitlabError> {
    let needed = !payload.artifacts.is_empty() || payload.dependencies.iter().any(|d| d.artifacts_file.is_some());
    if !needed {
        return Ok(None);
    }
    let identity = RunnerIdentity {
        name: runner.name.clone(),
        url: runner.url.clone(),
        token: Secret::new(runner.token.clone()),
        system_id: String::new(),
        info: VersionInfo::keel(features()),
    };
    let client = Client::new(identity, ClientOptions::default())?;
    Ok(Some(JobArtifacts {
        artifacts: payload.artifacts.clone(),
        dependencies: payload.dependencies.clone(),
        store: Arc::new(GitlabArtifacts { client, job: JobCredentials::from(payload) }),
    }))
}

/// Artifacts through GitLab: `POST jobs/:id/artifacts` with the job's token, `GET
/// jobs/:id/artifacts` with each dependency's.
struct GitlabArtifacts {
    client: Client,
    job: JobCredentials,
}

impl ArtifactStore for GitlabArtifacts {
    fn download<'a>(&'a self, dependency: &'a Dependency) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            let creds = JobCredentials { id: dependency.id, token: dependency.token.clone() };
            self.client.download_artifacts(&creds).await.map(|b| b.to_vec()).map_err(|e| e.to_string())
        })
    }

    fn upload<'a>(&'a self, artifact: &'a Artifact, zip: Vec<u8>) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let format = if artifact.artifact_format.is_empty() { "zip" } else { &artifact.artifact_format };
            let kind = if artifact.artifact_type.is_empty() { "archive" } else { &artifact.artifact_type };
            // GitLab Runner's file names: the archive after `artifacts:name`, a report after its
            // type (`junit.gz`); GitLab goes by `artifact_type`, not by the name.
            let stem = if artifact.name.is_empty() || kind != "archive" { kind } else { &artifact.name };
            let stem = if stem == "archive" { "artifacts" } else { stem };
            let filename = match format {
                "zip" => format!("{stem}.zip"),
                "gzip" => format!("{stem}.gz"),
                _ => stem.to_string(),
            };
            let upload = ArtifactsUpload {
                zip: zip.into(),
                filename,
                artifact_type: if artifact.artifact_type.is_empty() {
                    "archive".into()
                } else {
                    artifact.artifact_type.clone()
                },
                artifact_format: format.to_string(),
                expire_in: artifact.expire_in.clone(),
            };
            match self.client.upload_artifacts(&self.job, &upload).await {
                Ok(UploadOutcome::Created) => Ok("coordinator... 201 Created".into()),
                Ok(UploadOutcome::TooLarge) => {
                    Err("413 Request Entity Too Large: the artifacts are over GitLab's maximum artifacts size".into())
                }
                Ok(UploadOutcome::Refused { status, body }) => {
                    Err(format!("GitLab refused the upload ({status}): {body}"))
                }
                Err(e) => Err(e.to_string()),
            }
        })
    }
}

/// `host run`'s outcome in GitLab's words.
pub fn for_gitlab(outcome: &Outcome) -> JobOutcome {
    match outcome {
        Outcome::Success => JobOutcome::success(),
        Outcome::ScriptFailure { exit_code } => JobOutcome::failed(FailureReason::ScriptFailure, Some(*exit_code)),
        Outcome::Timeout { .. } => JobOutcome::failed(FailureReason::JobExecutionTimeout, None),
        Outcome::Cancelled => JobOutcome::failed(FailureReason::JobCanceled, None),
        Outcome::ImagePullFailure { .. } => JobOutcome::failed(FailureReason::ImagePullFailure, None),
        Outcome::SystemFailure { .. } => JobOutcome::failed(FailureReason::RunnerSystemFailure, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn outcomes_map_onto_gitlab_failure_reasons() {
        assert_eq!(for_gitlab(&Outcome::Success), JobOutcome::success());
        assert_eq!(
            for_gitlab(&Outcome::ScriptFailure { exit_code: 3 }),
            JobOutcome::failed(FailureReason::ScriptFailure, Some(3))
        );
        assert_eq!(
            for_gitlab(&Outcome::Timeout { after: Duration::from_secs(1) }).failure,
            Some(FailureReason::JobExecutionTimeout)
        );
        assert_eq!(for_gitlab(&Outcome::Cancelled).failure, Some(FailureReason::JobCanceled));
        assert_eq!(
            for_gitlab(&Outcome::ImagePullFailure { reason: "x".into() }).failure,
            Some(FailureReason::ImagePullFailure)
        );
        assert_eq!(
            for_gitlab(&Outcome::SystemFailure { reason: "x".into() }).failure,
            Some(FailureReason::RunnerSystemFailure)
        );
    }

    #[test]
    fn only_what_the_pipeline_does_is_announced() {
        let f = features();
        assert!(f.variables && f.masking && f.raw_variables && f.refspecs && f.cancelable && f.trace_checksum);
        assert!(f.artifacts && f.artifacts_exclude);
        assert!(f.upload_multiple_artifacts && f.upload_raw_artifacts);
        assert!(f.service_variables && f.image_executor_opts && f.service_executor_opts);
        assert!(f.cache && f.fallback_cache_keys);
        assert!(!f.terminal && !f.session && !f.vault_secrets);
    }
}
