//! One runner's calls to GitLab's runner API (`<url>/api/v4/`), as GitLab Runner makes them
//! (network/gitlab.go, network/trace.go): verify, request a job (long polling), update a job,
//! append to its trace. Transient answers (408, 429, 5xx; 409 for job requests) and transport
//! errors are retried here with back-off honouring `Retry-After`; every other answer is handed
//! to the caller as a typed outcome, because what it means depends on the job's phase.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::header::{HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};

use super::payload::{JobPayload, PayloadError};
use super::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum GitlabError {
    #[error("runner {runner:?}: url {url:?} is not a usable GitLab address: {message}")]
    Url { runner: String, url: String, message: String },
    #[error("runner {runner:?}: cannot set up the HTTPS client: {message}")]
    Tls { runner: String, message: String },
    #[error("runner {runner:?}: {call}: GitLab unreachable: {cause}")]
    Transport { runner: String, call: String, cause: String },
    #[error("runner {runner:?}: {call}: GitLab answered {status}: {body}")]
    Status { runner: String, call: String, status: u16, body: String },
    #[error("runner {runner:?}: {call}: GitLab refused the runner token ({status})")]
    TokenRefused { runner: String, call: String, status: u16 },
    #[error("runner {runner:?}: {call}: unreadable answer: {cause}")]
    Body { runner: String, call: String, cause: String },
    #[error("runner {runner:?}: POST jobs/request: {error}")]
    Payload { runner: String, error: PayloadError },
}

impl GitlabError {
    /// A short, stable description of the kind of failure, for "log once per change".
    pub fn kind(&self) -> String {
        match self {
            GitlabError::Url { .. } => "url".into(),
            GitlabError::Tls { .. } => "tls".into(),
            GitlabError::Transport { .. } => "unreachable".into(),
            GitlabError::Status { status, .. } => format!("status {status}"),
            GitlabError::TokenRefused { status, .. } => format!("token refused {status}"),
            GitlabError::Body { .. } => "unreadable answer".into(),
            GitlabError::Payload { .. } => "bad job payload".into(),
        }
    }
}

/// The calls, as named in `gitlab_runner_api_request_statuses_total{endpoint}` (GitLab
/// Runner's label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    VerifyRunner,
    RequestJob,
    UpdateJob,
    PatchTrace,
    UploadArtifacts,
    DownloadArtifacts,
}

impl Endpoint {
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::VerifyRunner => "verify_runner",
            Endpoint::RequestJob => "request_job",
            Endpoint::UpdateJob => "update_job",
            Endpoint::PatchTrace => "patch_trace",
            Endpoint::UploadArtifacts => "upload_artifacts",
            Endpoint::DownloadArtifacts => "download_artifacts",
        }
    }
}

/// Told about every answer GitLab gives (metrics).
pub trait ApiObserver: Send + Sync {
    fn answered(&self, runner: &str, endpoint: Endpoint, status: u16);
}

/// `info.features`: what this runner announces it implements. GitLab hands a job needing an
/// unannounced feature to another runner (or fails it as `runner_unsupported`), so announce
/// exactly what the pipeline does, no more. All false by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Features {
    pub variables: bool,
    pub image: bool,
    pub services: bool,
    pub artifacts: bool,
    pub cache: bool,
    pub fallback_cache_keys: bool,
    pub shared: bool,
    pub upload_multiple_artifacts: bool,
    pub upload_raw_artifacts: bool,
    pub session: bool,
    pub terminal: bool,
    pub refspecs: bool,
    pub masking: bool,
    pub proxy: bool,
    pub raw_variables: bool,
    pub artifacts_exclude: bool,
    pub multi_build_steps: bool,
    pub trace_reset: bool,
    pub trace_checksum: bool,
    pub trace_size: bool,
    pub vault_secrets: bool,
    pub cancelable: bool,
    pub return_exit_code: bool,
    pub service_variables: bool,
    pub service_multiple_aliases: bool,
    pub image_executor_opts: bool,
    pub service_executor_opts: bool,
    pub cancel_gracefully: bool,
    pub native_steps_integration: bool,
    pub two_phase_job_commit: bool,
    pub job_inputs: bool,
}

impl Features {
    /// What the GitLab client itself implements, whatever the pipeline does: the trace
    /// protocol (reset on 412, checksum, size) and cancellation (`Job-Status`).
    pub fn client() -> Features {
        Features {
            trace_reset: true,
            trace_checksum: true,
            trace_size: true,
            cancelable: true,
            cancel_gracefully: true,
            ..Features::default()
        }
    }
}

/// `info` of verify/request: who is asking.
#[derive(Debug, Clone, Serialize)]
pub struct VersionInfo {
    pub name: String,
    pub version: String,
    pub revision: String,
    pub platform: String,
    pub architecture: String,
    pub executor: String,
    pub features: Features,
}

impl VersionInfo {
    pub fn keel(features: Features) -> VersionInfo {
        VersionInfo {
            name: "keel".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            revision: option_env!("KEEL_REVISION").unwrap_or("unknown").into(),
            platform: std::env::consts::OS.into(),
            architecture: std::env::consts::ARCH.into(),
            executor: "kubernetes".into(),
            features,
        }
    }
}

/// Back-off for transient answers: GitLab Runner's network/retry_requester.go (5 attempts,
/// 100 ms to 60 s), with `Retry-After` taking precedence when GitLab sends one.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 5, min_delay: Duration::from_millis(100), max_delay: Duration::from_secs(60) }
    }
}

/// A longer `Retry-After` than this is capped: a runner must come back eventually.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(15 * 60);

#[derive(Clone)]
pub struct ClientOptions {
    pub retry: RetryPolicy,
    /// For every call but the long poll.
    pub request_timeout: Duration,
    /// `jobs/request`: Workhorse holds it up to ~50 s.
    pub poll_timeout: Duration,
    pub observer: Option<Arc<dyn ApiObserver>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            retry: RetryPolicy::default(),
            request_timeout: Duration::from_secs(60),
            poll_timeout: Duration::from_secs(90),
            observer: None,
        }
    }
}

/// A runner as GitLab knows it.
#[derive(Clone)]
pub struct RunnerIdentity {
    /// The `name` of the `[[runners]]` entry; in messages and metrics only.
    pub name: String,
    pub url: String,
    pub token: Secret,
    /// Tells this runner manager apart from others with the same token (GitLab Runner keeps it
    /// in `.runner_system_id`: `r_` or `s_` and 12 characters).
    pub system_id: String,
    pub info: VersionInfo,
}

/// A job's credentials for its own calls.
#[derive(Clone, Debug)]
pub struct JobCredentials {
    pub id: u64,
    pub token: Secret,
}

impl From<&JobPayload> for JobCredentials {
    fn from(job: &JobPayload) -> Self {
        JobCredentials { id: job.id, token: job.token.clone() }
    }
}

/// GitLab's view of a job, from the `Job-Status` header of update and trace answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteStatus {
    Running,
    /// Cancelled by a user while the runner announced `cancel_gracefully`: stop the stage, run
    /// `after_script`, report `failed`/`job_canceled`.
    Canceling,
    Canceled,
    Failed,
    Success,
    Other(String),
}

impl RemoteStatus {
    fn parse(value: &str) -> RemoteStatus {
        match value.trim() {
            "running" => RemoteStatus::Running,
            "canceling" => RemoteStatus::Canceling,
            "canceled" => RemoteStatus::Canceled,
            "failed" => RemoteStatus::Failed,
            "success" => RemoteStatus::Success,
            other => RemoteStatus::Other(other.to_string()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRunner {
    pub id: Option<u64>,
    pub token_expires_at: Option<String>,
}

#[derive(Debug)]
pub enum JobRequest {
    Job(Box<JobPayload>),
    /// 204; echo `last_update` in the next request so Workhorse can hold it (long polling).
    NoJob {
        last_update: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Pending,
    Running,
    Success,
    Failed,
}

impl JobState {
    fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Success => "success",
            JobState::Failed => "failed",
        }
    }
}

/// The body of `PUT jobs/:id` (without the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobUpdate {
    pub state: JobState,
    pub failure_reason: Option<String>,
    pub exit_code: Option<i32>,
    /// `(crc32, bytesize)` of the trace so far.
    pub output: Option<(u32, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// 200.
    Accepted,
    /// 202: GitLab is still taking the trace in; send the update again later.
    NotYet,
    /// 412: the checksum did not match what GitLab has; send the whole trace again from 0.
    ResendTrace,
    /// 403 (job token refused, job gone or finished), 404, 409 (another manager has the job):
    /// stop, no more calls for this job.
    Refused { status: u16 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceOutcome {
    /// 202; `stored` is GitLab's trace length from `Range: 0-N`.
    Accepted {
        stored: Option<u64>,
    },
    /// 416: GitLab has `resume_at` bytes (from `Range: 0-N`); send again from there.
    RangeMismatch {
        resume_at: Option<u64>,
    },
    Refused {
        status: u16,
    },
}

/// What every update and trace answer carries besides its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply<T> {
    pub outcome: T,
    pub job_status: Option<RemoteStatus>,
    /// `X-GitLab-Trace-Update-Interval`, in seconds on the wire.
    pub update_interval: Option<Duration>,
    /// `Retry-After`, when GitLab said how long "not yet" lasts.
    pub retry_after: Option<Duration>,
}

pub struct Client {
    http: reqwest::Client,
    /// Artifacts calls: redirects are followed by hand, so the job token stays with GitLab.
    no_redirect: reqwest::Client,
    /// `<url>/api/v4/`
    base: reqwest::Url,
    runner: RunnerIdentity,
    options: ClientOptions,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("runner", &self.runner.name).field("base", &self.base.as_str()).finish()
    }
}

/// What GitLab said to an artifacts upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadOutcome {
    /// 201.
    Created,
    /// 413: over the project's or instance's maximum artifacts size.
    TooLarge,
    /// 403 and the like: the job token is refused (the job is over, or canceled).
    Refused { status: u16, body: String },
}

/// One artifacts upload: the zip and how GitLab should keep it.
#[derive(Debug, Clone)]
pub struct ArtifactsUpload {
    pub zip: bytes::Bytes,
    /// The zip's file name (GitLab shows it in the job's artifacts).
    pub filename: String,
    /// `archive` for `artifacts:paths`.
    pub artifact_type: String,
    pub artifact_format: String,
    /// `expire_in` as written in `.gitlab-ci.yml`; GitLab's default when empty.
    pub expire_in: String,
}

/// How many redirects an artifacts call follows (GitLab Runner: 307 to the same GitLab).
const MAX_ARTIFACT_REDIRECTS: usize = 3;

/// One attempt's failure, before the retry loop decides.
enum Attempt {
    Transport(reqwest::Error),
    Transient { status: u16, retry_after: Option<Duration>, body: String },
}

impl Client {
    pub fn new(runner: RunnerIdentity, options: ClientOptions) -> Result<Client, GitlabError> {
        let url_error =
            |message: String| GitlabError::Url { runner: runner.name.clone(), url: runner.url.clone(), message };
        let mut base = reqwest::Url::parse(runner.url.trim_end_matches('/')).map_err(|e| url_error(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(url_error("not an http(s) URL".into()));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(url_error("credentials belong in `token`, not in the URL".into()));
        }
        base.set_path(&format!("{}/api/v4/", base.path().trim_end_matches('/')));
        // ring, as kube uses it, so one crypto stack; the platform's trust store.
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| GitlabError::Tls { runner: runner.name.clone(), message: e.to_string() })?;
        let tls = rustls_platform_verifier::BuilderVerifierExt::with_platform_verifier(tls)
            .map_err(|e| GitlabError::Tls { runner: runner.name.clone(), message: e.to_string() })?
            .with_no_client_auth();
        let mut headers = HeaderMap::new();
        headers.insert(reqwest::header::ACCEPT, HeaderValue::from_static("application/json"));
        let builder = || {
            reqwest::Client::builder()
                .tls_backend_preconfigured(tls.clone())
                .user_agent(format!(
                    "keel {} ({}; {})",
                    runner.info.version, runner.info.platform, runner.info.architecture
                ))
                .default_headers(headers.clone())
                .connect_timeout(Duration::from_secs(30))
        };
        let tls_error = |e: reqwest::Error| GitlabError::Tls { runner: runner.name.clone(), message: error_chain(&e) };
        let http = builder().build().map_err(tls_error)?;
        let no_redirect = builder().redirect(reqwest::redirect::Policy::none()).build().map_err(tls_error)?;
        Ok(Client { http, no_redirect, base, runner, options })
    }

    pub fn runner_name(&self) -> &str {
        &self.runner.name
    }

    /// `POST runners/verify`: is the token good? 403 and 422 (orphaned) are `TokenRefused`.
    pub async fn verify(&self) -> Result<VerifiedRunner, GitlabError> {
        #[derive(Serialize)]
        struct Body<'a> {
            token: &'a str,
            system_id: &'a str,
            info: &'a VersionInfo,
        }
        #[derive(Deserialize)]
        struct Answer {
            id: Option<u64>,
            token_expires_at: Option<String>,
        }
        let call = "POST runners/verify".to_string();
        let body =
            Body { token: self.runner.token.expose(), system_id: &self.runner.system_id, info: &self.runner.info };
        let resp = self
            .send(Endpoint::VerifyRunner, &call, &[], || self.http.post(self.url("runners/verify")).json(&body))
            .await?;
        match resp.status().as_u16() {
            200 | 201 => {
                let bytes = self.body(&call, resp).await?;
                let answer: Answer = serde_json::from_slice(&bytes).map_err(|e| GitlabError::Body {
                    runner: self.runner.name.clone(),
                    call,
                    cause: e.to_string(),
                })?;
                Ok(VerifiedRunner { id: answer.id, token_expires_at: answer.token_expires_at })
            }
            status @ (401 | 403 | 422) => Err(self.refused(call, status)),
            _ => Err(self.unexpected(call, resp).await),
        }
    }

    /// `POST jobs/request`, long polling with `last_update`. 403 is `TokenRefused`.
    pub async fn request_job(&self, last_update: Option<&str>) -> Result<JobRequest, GitlabError> {
        #[derive(Serialize)]
        struct Body<'a> {
            token: &'a str,
            system_id: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            last_update: Option<&'a str>,
            info: &'a VersionInfo,
        }
        let call = "POST jobs/request".to_string();
        let body = Body {
            token: self.runner.token.expose(),
            system_id: &self.runner.system_id,
            last_update,
            info: &self.runner.info,
        };
        // 409: GitLab lost a race assigning the job; ask again.
        let resp = self
            .send(Endpoint::RequestJob, &call, &[409], || {
                self.http.post(self.url("jobs/request")).timeout(self.options.poll_timeout).json(&body)
            })
            .await?;
        match resp.status().as_u16() {
            201 => {
                let bytes = self.body(&call, resp).await?;
                let job = JobPayload::from_json(&bytes)
                    .map_err(|error| GitlabError::Payload { runner: self.runner.name.clone(), error })?;
                Ok(JobRequest::Job(Box::new(job)))
            }
            204 => Ok(JobRequest::NoJob { last_update: header(resp.headers(), "X-GitLab-Last-Update") }),
            status @ (401 | 403) => Err(self.refused(call, status)),
            _ => Err(self.unexpected(call, resp).await),
        }
    }

    /// `PUT jobs/:id`.
    pub async fn update_job(
        &self,
        job: &JobCredentials,
        update: &JobUpdate,
    ) -> Result<Reply<UpdateOutcome>, GitlabError> {
        #[derive(Serialize)]
        struct Output {
            checksum: String,
            bytesize: u64,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            token: &'a str,
            state: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            failure_reason: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            exit_code: Option<i32>,
            #[serde(skip_serializing_if = "Option::is_none")]
            output: Option<Output>,
        }
        let call = format!("PUT jobs/{}", job.id);
        let body = Body {
            token: job.token.expose(),
            state: update.state.as_str(),
            failure_reason: update.failure_reason.as_deref(),
            exit_code: update.exit_code,
            output: update.output.map(|(crc, bytesize)| Output { checksum: format!("crc32:{crc:08x}"), bytesize }),
        };
        let resp = self
            .send(Endpoint::UpdateJob, &call, &[], || {
                self.http
                    .put(self.url(&format!("jobs/{}", job.id)))
                    .header("JOB-TOKEN", job.token.expose())
                    .timeout(self.options.request_timeout)
                    .json(&body)
            })
            .await?;
        let outcome = match resp.status().as_u16() {
            200 => UpdateOutcome::Accepted,
            202 => UpdateOutcome::NotYet,
            412 => UpdateOutcome::ResendTrace,
            status @ (403 | 404 | 409) => UpdateOutcome::Refused { status },
            _ => return Err(self.unexpected(call, resp).await),
        };
        Ok(reply(outcome, resp.headers()))
    }

    /// `PATCH jobs/:id/trace`: `bytes` are the trace from byte `offset` on.
    pub async fn patch_trace(
        &self,
        job: &JobCredentials,
        offset: u64,
        bytes: &[u8],
    ) -> Result<Reply<TraceOutcome>, GitlabError> {
        let call = format!("PATCH jobs/{}/trace", job.id);
        // Inclusive, no unit (GitLab's own format); an empty patch names no byte.
        let end = (offset + bytes.len() as u64).saturating_sub(1);
        let range = format!("{offset}-{end}");
        let body = bytes::Bytes::copy_from_slice(bytes);
        let resp = self
            .send(Endpoint::PatchTrace, &call, &[], || {
                self.http
                    .patch(self.url(&format!("jobs/{}/trace", job.id)))
                    .header("JOB-TOKEN", job.token.expose())
                    .header(reqwest::header::CONTENT_TYPE, "text/plain")
                    .header("Content-Range", &range)
                    .timeout(self.options.request_timeout)
                    .body(body.clone())
            })
            .await?;
        let stored = header(resp.headers(), "Range").and_then(|r| parse_range_end(&r));
        let outcome = match resp.status().as_u16() {
            200 | 202 => TraceOutcome::Accepted { stored },
            416 => TraceOutcome::RangeMismatch { resume_at: stored },
            status @ (403 | 404 | 409) => TraceOutcome::Refused { status },
            _ => return Err(self.unexpected(call, resp).await),
        };
        Ok(reply(outcome, resp.headers()))
    }

    /// `POST jobs/:id/artifacts`: multipart `file`, with `artifact_format`, `artifact_type` and
    /// `expire_in` as query parameters (as GitLab Runner sends them). A 307 is followed to the
    /// same GitLab only (the job token never goes elsewhere); 5xx are retried as every call.
    pub async fn upload_artifacts(
        &self,
        job: &JobCredentials,
        upload: &ArtifactsUpload,
    ) -> Result<UploadOutcome, GitlabError> {
        let call = format!("POST jobs/{}/artifacts", job.id);
        let mut url = self.url(&format!("jobs/{}/artifacts", job.id));
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("artifact_format", &upload.artifact_format);
            q.append_pair("artifact_type", &upload.artifact_type);
            if !upload.expire_in.is_empty() {
                q.append_pair("expire_in", &upload.expire_in);
            }
        }
        for _ in 0..=MAX_ARTIFACT_REDIRECTS {
            let resp = self
                .send(Endpoint::UploadArtifacts, &call, &[], || {
                    let part = reqwest::multipart::Part::stream_with_length(
                        reqwest::Body::from(upload.zip.clone()),
                        upload.zip.len() as u64,
                    )
                    .file_name(upload.filename.clone())
                    .mime_str("application/zip")
                    .expect("a valid mime type");
                    self.no_redirect
                        .post(url.clone())
                        .header("JOB-TOKEN", job.token.expose())
                        .multipart(reqwest::multipart::Form::new().part("file", part))
                })
                .await?;
            match resp.status().as_u16() {
                200 | 201 => return Ok(UploadOutcome::Created),
                413 => return Ok(UploadOutcome::TooLarge),
                307 | 308 => url = self.same_gitlab_redirect(&call, &url, &resp)?,
                status @ (401 | 403 | 404) => {
                    let body = cut(&resp.text().await.unwrap_or_default());
                    return Ok(UploadOutcome::Refused { status, body });
                }
                _ => return Err(self.unexpected(call, resp).await),
            }
        }
        Err(GitlabError::Status {
            runner: self.runner.name.clone(),
            call,
            status: 307,
            body: "too many redirects".into(),
        })
    }

    /// `GET jobs/:id/artifacts` with the dependency's token. A redirect elsewhere (object
    /// storage, a pre-signed URL) is followed without the token.
    pub async fn download_artifacts(&self, job: &JobCredentials) -> Result<bytes::Bytes, GitlabError> {
        let call = format!("GET jobs/{}/artifacts", job.id);
        let mut url = self.url(&format!("jobs/{}/artifacts", job.id));
        for _ in 0..=MAX_ARTIFACT_REDIRECTS {
            let ours = url.origin() == self.base.origin();
            let resp = self
                .send(Endpoint::DownloadArtifacts, &call, &[], || {
                    let req = self.no_redirect.get(url.clone()).header(reqwest::header::ACCEPT, "*/*");
                    if ours { req.header("JOB-TOKEN", job.token.expose()) } else { req }
                })
                .await?;
            match resp.status().as_u16() {
                200 => return self.body(&call, resp).await,
                301 | 302 | 303 | 307 | 308 => {
                    let location = header(resp.headers(), "Location").unwrap_or_default();
                    url = url.join(&location).map_err(|e| GitlabError::Body {
                        runner: self.runner.name.clone(),
                        call: call.clone(),
                        cause: format!("bad redirect: {e}"),
                    })?;
                }
                _ => return Err(self.unexpected(call, resp).await),
            }
        }
        Err(GitlabError::Status {
            runner: self.runner.name.clone(),
            call,
            status: 302,
            body: "too many redirects".into(),
        })
    }

    /// A redirect's target, when it is this GitLab (scheme, host and port): a token-carrying
    /// request goes nowhere else.
    fn same_gitlab_redirect(
        &self,
        call: &str,
        from: &reqwest::Url,
        resp: &reqwest::Response,
    ) -> Result<reqwest::Url, GitlabError> {
        let status = resp.status().as_u16();
        let location = header(resp.headers(), "Location").unwrap_or_default();
        match from.join(&location) {
            Ok(to) if to.origin() == self.base.origin() => Ok(to),
            _ => Err(GitlabError::Status {
                runner: self.runner.name.clone(),
                call: call.to_string(),
                status,
                body: "redirected away from GitLab: not followed with the job token".into(),
            }),
        }
    }

    fn url(&self, path: &str) -> reqwest::Url {
        self.base.join(path).expect("a relative API path joins any http(s) base")
    }

    /// Sends with retries on transport errors and transient statuses (408, 429, 500, 502, 503,
    /// 504 and `extra`), honouring `Retry-After`. The last transient answer becomes an error.
    async fn send(
        &self,
        endpoint: Endpoint,
        call: &str,
        extra: &[u16],
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, GitlabError> {
        let attempt = || async {
            let resp = build().send().await.map_err(Attempt::Transport)?;
            let status = resp.status().as_u16();
            if let Some(observer) = &self.options.observer {
                observer.answered(&self.runner.name, endpoint, status);
            }
            if matches!(status, 408 | 429 | 500 | 502 | 503 | 504) || extra.contains(&status) {
                let retry_after = retry_after(resp.headers());
                let body = cut(&resp.text().await.unwrap_or_default());
                return Err(Attempt::Transient { status, retry_after, body });
            }
            Ok(resp)
        };
        let policy = self.options.retry;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(policy.min_delay)
            .with_max_delay(policy.max_delay)
            .with_max_times(policy.attempts.saturating_sub(1))
            .with_jitter();
        attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .adjust(|e: &Attempt, delay| match (e, delay) {
                (Attempt::Transient { retry_after: Some(after), .. }, Some(_)) => Some((*after).min(RETRY_AFTER_CAP)),
                _ => delay,
            })
            .notify(|e: &Attempt, delay| {
                let what = match e {
                    Attempt::Transport(e) => error_chain(e),
                    Attempt::Transient { status, .. } => format!("status {status}"),
                };
                tracing::debug!(runner = %self.runner.name, call, error = %what, retry_in = ?delay, "gitlab.retry");
            })
            .await
            .map_err(|e| match e {
                Attempt::Transport(e) => GitlabError::Transport {
                    runner: self.runner.name.clone(),
                    call: call.to_string(),
                    cause: error_chain(&e),
                },
                Attempt::Transient { status, body, .. } => {
                    GitlabError::Status { runner: self.runner.name.clone(), call: call.to_string(), status, body }
                }
            })
    }

    async fn body(&self, call: &str, resp: reqwest::Response) -> Result<bytes::Bytes, GitlabError> {
        resp.bytes().await.map_err(|e| GitlabError::Body {
            runner: self.runner.name.clone(),
            call: call.to_string(),
            cause: error_chain(&e),
        })
    }

    fn refused(&self, call: String, status: u16) -> GitlabError {
        GitlabError::TokenRefused { runner: self.runner.name.clone(), call, status }
    }

    async fn unexpected(&self, call: String, resp: reqwest::Response) -> GitlabError {
        let status = resp.status().as_u16();
        let body = cut(&resp.text().await.unwrap_or_default());
        GitlabError::Status { runner: self.runner.name.clone(), call, status, body }
    }
}

fn reply<T>(outcome: T, headers: &HeaderMap) -> Reply<T> {
    Reply {
        outcome,
        job_status: header(headers, "Job-Status").map(|s| RemoteStatus::parse(&s)),
        update_interval: header(headers, "X-GitLab-Trace-Update-Interval")
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|&s| s > 0)
            .map(Duration::from_secs),
        retry_after: retry_after(headers),
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// `Retry-After` in seconds (GitLab's rate limiter sends seconds, not dates).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    header(headers, "Retry-After").and_then(|s| s.trim().parse::<u64>().ok()).map(Duration::from_secs)
}

/// `0-N` -> N.
fn parse_range_end(range: &str) -> Option<u64> {
    let (start, end) = range.trim().split_once('-')?;
    (start.trim() == "0").then_some(())?;
    end.trim().parse().ok()
}

/// Bodies end up in messages: short, one line.
fn cut(text: &str) -> String {
    let line: String = text.chars().take(200).map(|c| if c.is_control() { ' ' } else { c }).collect();
    if line.trim().is_empty() { "(empty body)".into() } else { line.trim().to_string() }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_features() {
        assert_eq!(parse_range_end("0-1234"), Some(1234));
        assert_eq!(parse_range_end("5-10"), None);
        assert_eq!(parse_range_end("garbage"), None);
        let json = serde_json::to_value(Features::client()).unwrap();
        assert_eq!(json["trace_checksum"], true);
        assert_eq!(json["refspecs"], false);
        assert_eq!(json.as_object().unwrap().len(), 31, "every feature GitLab Runner announces is sent");
    }
}
