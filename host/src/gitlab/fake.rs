//! A fake GitLab for tests, written from the wire facts (`shared/gitlab-runner-api.md`), for
//! what `gitlab-runner-mock` does not do: verify, long polling with `last_update`, `Job-Status:
//! canceling`, 416 with `Range`, 412 and 202 on the final update, 409/429 with `Retry-After`,
//! 502 bursts; artifacts uploads (multipart, stored per job) and downloads. It enforces the protocol (a patch must start where the stored trace ends, the
//! final checksum must match) and records every call, so tests judge what reached it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post, put};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::time::Instant;

/// A canned answer, taken in order from an endpoint's queue before the real logic runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Status(u16),
    /// The status with `Retry-After: secs`.
    RetryAfter(u16, u64),
    /// Trace: 416 with the true `Range: 0-N` although the patch was right.
    RangeMismatch,
    /// Final update: 202 "not yet".
    NotYet,
    /// Final update: 412; the stored trace is dropped, to be sent again from 0.
    ChecksumMismatch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    Verify,
    Request,
    Update,
    Trace,
    UploadArtifacts,
    DownloadArtifacts,
}

/// An accepted `POST jobs/:id/artifacts`.
#[derive(Debug, Clone)]
pub struct ArtifactsUpload {
    /// The query string (`artifact_format=zip&artifact_type=archive&expire_in=...`).
    pub query: String,
    /// The `file` part's file name.
    pub filename: String,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Call {
    pub api: Api,
    pub at: Instant,
    pub status: u16,
    pub job: Option<u64>,
    /// jobs/request: the `last_update` sent.
    pub last_update: Option<String>,
}

#[derive(Debug, Clone)]
pub struct FakeJob {
    pub id: u64,
    pub token: String,
    pub payload: Value,
    /// The runner token that took it.
    pub taken_by: Option<String>,
    /// pending, running, success, failed, canceled.
    pub state: String,
    pub trace: Vec<u8>,
    /// Accepted patches, `(start, end)` inclusive.
    pub patches: Vec<(u64, u64)>,
    /// Every PUT body, whatever the answer.
    pub updates: Vec<Value>,
    /// Final updates answered 200.
    pub finals_accepted: u32,
    /// Sent as `Job-Status` while the job runs (e.g. `canceling`).
    pub job_status: Option<String>,
    /// Accepted artifacts uploads, in order; the last is what a download gets.
    pub artifacts: Vec<ArtifactsUpload>,
}

#[derive(Default)]
struct Inner {
    tokens: HashSet<String>,
    queue: VecDeque<u64>,
    jobs: BTreeMap<u64, FakeJob>,
    next_id: u64,
    /// Changes whenever the queue gains a job: what `X-GitLab-Last-Update` says.
    version: u64,
    faults: HashMap<Api, VecDeque<Fault>>,
    calls: Vec<Call>,
    in_flight: HashMap<String, usize>,
    /// Requests being held right now (long polling).
    held: usize,
    max_in_flight: HashMap<String, usize>,
    running: HashMap<String, usize>,
    max_running: HashMap<String, usize>,
    trace_interval: Option<u64>,
}

struct Shared {
    inner: Mutex<Inner>,
    queued: Notify,
    /// How long a request with the current `last_update` is held (Workhorse: ~50 s).
    hold: Mutex<Duration>,
}

pub struct FakeGitlab {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGitlab {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeGitlab {
    pub async fn start(runner_tokens: &[&str]) -> FakeGitlab {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                tokens: runner_tokens.iter().map(|t| t.to_string()).collect(),
                next_id: 1000,
                ..Inner::default()
            }),
            queued: Notify::new(),
            hold: Mutex::new(Duration::from_millis(500)),
        });
        let app = axum::Router::new()
            .route("/api/v4/runners/verify", post(verify))
            .route("/api/v4/jobs/request", post(request))
            .route("/api/v4/jobs/{id}", put(update))
            .route("/api/v4/jobs/{id}/trace", patch(trace))
            .route("/api/v4/jobs/{id}/artifacts", post(upload_artifacts).get(download_artifacts))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeGitlab { addr, shared, server }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap()
    }

    pub fn set_hold(&self, hold: Duration) {
        *self.shared.hold.lock().unwrap() = hold;
    }

    pub fn set_trace_interval(&self, secs: Option<u64>) {
        self.lock().trace_interval = secs;
    }

    /// Queues a job whose payload is `payload` with `id` and `token` filled in (and `{token}` in
    /// `git_info.repo_url` replaced by the job's token).
    pub fn enqueue(&self, mut payload: Value) -> u64 {
        let id = {
            let mut inner = self.lock();
            inner.next_id += 1;
            let id = inner.next_id;
            let token = format!("glcbt-job{id}secret");
            payload["id"] = json!(id);
            payload["token"] = json!(token);
            // GitLab puts the job's own token into the clone URL.
            if let Some(url) = payload["git_info"]["repo_url"].as_str() {
                payload["git_info"]["repo_url"] = json!(url.replace("{token}", &token));
            }
            inner.jobs.insert(
                id,
                FakeJob {
                    id,
                    token,
                    payload,
                    taken_by: None,
                    state: "pending".into(),
                    trace: Vec::new(),
                    patches: Vec::new(),
                    updates: Vec::new(),
                    finals_accepted: 0,
                    job_status: None,
                    artifacts: Vec::new(),
                },
            );
            inner.queue.push_back(id);
            inner.version += 1;
            id
        };
        self.shared.queued.notify_waiters();
        id
    }

    pub fn fault(&self, api: Api, fault: Fault) {
        self.lock().faults.entry(api).or_default().push_back(fault);
    }

    /// What `Job-Status` says from now on; `canceled`/`failed` also end the job as GitLab does.
    pub fn set_job_status(&self, id: u64, status: &str) {
        let mut inner = self.lock();
        let job = inner.jobs.get_mut(&id).unwrap();
        job.job_status = Some(status.to_string());
        if matches!(status, "canceled" | "failed") && job.state == "running" {
            job.state = status.to_string();
            let runner = job.taken_by.clone().unwrap_or_default();
            inner.add_running(&runner, -1);
        }
    }

    pub fn job(&self, id: u64) -> FakeJob {
        self.lock().jobs[&id].clone()
    }

    pub fn jobs(&self) -> Vec<FakeJob> {
        self.lock().jobs.values().cloned().collect()
    }

    pub fn calls(&self, api: Api) -> Vec<Call> {
        self.lock().calls.iter().filter(|c| c.api == api).cloned().collect()
    }

    pub fn max_in_flight(&self, runner_token: &str) -> usize {
        self.lock().max_in_flight.get(runner_token).copied().unwrap_or(0)
    }

    pub fn max_running(&self, runner_token: &str) -> usize {
        self.lock().max_running.get(runner_token).copied().unwrap_or(0)
    }

    /// Job requests the fake is holding right now, waiting for a job (long polling).
    pub fn held(&self) -> usize {
        self.lock().held
    }

    /// Jobs running at once over all runners, at most.
    pub fn max_running_total(&self) -> usize {
        self.lock().max_running.get("*").copied().unwrap_or(0)
    }
}

impl Inner {
    fn record(&mut self, api: Api, status: u16, job: Option<u64>, last_update: Option<String>) {
        self.calls.push(Call { api, at: Instant::now(), status, job, last_update });
    }

    fn take_fault(&mut self, api: Api) -> Option<Fault> {
        self.faults.get_mut(&api).and_then(VecDeque::pop_front)
    }

    fn add_running(&mut self, runner: &str, by: isize) {
        for key in [runner, "*"] {
            let n = self.running.entry(key.to_string()).or_default();
            *n = n.checked_add_signed(by).unwrap();
            let now = *n;
            let max = self.max_running.entry(key.to_string()).or_default();
            *max = (*max).max(now);
        }
    }
}

fn fault_response(fault: Fault) -> Response {
    match fault {
        Fault::Status(s) => status(s).into_response(),
        Fault::RetryAfter(s, secs) => (status(s), [("Retry-After", secs.to_string())]).into_response(),
        Fault::RangeMismatch | Fault::NotYet | Fault::ChecksumMismatch => unreachable!("handled by the endpoint"),
    }
}

fn status(s: u16) -> StatusCode {
    StatusCode::from_u16(s).unwrap()
}

async fn verify(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut inner = shared.inner.lock().unwrap();
    let token = body["token"].as_str().unwrap_or_default();
    assert!(body["info"]["features"].is_object(), "verify carries info.features");
    let (code, resp) = if inner.tokens.contains(token) {
        (200, (StatusCode::OK, axum::Json(json!({"id": 1, "token": token, "token_expires_at": null}))).into_response())
    } else {
        (403, StatusCode::FORBIDDEN.into_response())
    };
    inner.record(Api::Verify, code, None, None);
    resp
}

/// Decrements the in-flight count however the request ends (a client may drop it).
struct InFlight(Arc<Shared>, String);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.inner.lock().unwrap().in_flight.get_mut(&self.1).unwrap() -= 1;
    }
}

struct Held(Arc<Shared>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.inner.lock().unwrap().held -= 1;
    }
}

async fn request(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or_default();
    let token = body["token"].as_str().unwrap_or_default().to_string();
    let last_update = body["last_update"].as_str().map(str::to_string);
    let _guard = {
        let mut inner = shared.inner.lock().unwrap();
        let n = inner.in_flight.entry(token.clone()).or_default();
        *n += 1;
        let now = *n;
        let max = inner.max_in_flight.entry(token.clone()).or_default();
        *max = (*max).max(now);
        InFlight(shared.clone(), token.clone())
    };
    let mut held = false;
    loop {
        let queued = shared.queued.notified();
        {
            let mut inner = shared.inner.lock().unwrap();
            if let Some(fault) = inner.take_fault(Api::Request) {
                let resp = fault_response(fault);
                inner.record(Api::Request, resp.status().as_u16(), None, last_update);
                return resp;
            }
            if !inner.tokens.contains(&token) {
                inner.record(Api::Request, 403, None, last_update);
                return StatusCode::FORBIDDEN.into_response();
            }
            if let Some(id) = inner.queue.pop_front() {
                inner.add_running(&token, 1);
                let job = inner.jobs.get_mut(&id).unwrap();
                job.state = "running".into();
                job.taken_by = Some(token.clone());
                let payload = job.payload.clone();
                inner.record(Api::Request, 201, Some(id), last_update);
                return (StatusCode::CREATED, axum::Json(payload)).into_response();
            }
            let version = inner.version.to_string();
            // Workhorse holds a request whose last_update is current; a stale one goes through.
            if held || last_update.as_deref() != Some(version.as_str()) {
                inner.record(Api::Request, 204, None, last_update);
                return (StatusCode::NO_CONTENT, [("X-GitLab-Last-Update", version)]).into_response();
            }
        }
        held = true;
        let hold = *shared.hold.lock().unwrap();
        shared.inner.lock().unwrap().held += 1;
        let _holding = Held(shared.clone());
        let _ = tokio::time::timeout(hold, queued).await;
    }
}

fn job_token(headers: &HeaderMap) -> String {
    headers.get("JOB-TOKEN").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

fn with_status(mut resp: Response, job: &FakeJob) -> Response {
    let value = job.job_status.clone().unwrap_or_else(|| job.state.clone());
    resp.headers_mut().insert("Job-Status", HeaderValue::from_str(&value).unwrap());
    resp
}

async fn update(State(shared): State<Arc<Shared>>, Path(id): Path<u64>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut inner = shared.inner.lock().unwrap();
    let Some(job) = inner.jobs.get_mut(&id) else {
        inner.record(Api::Update, 404, Some(id), None);
        return StatusCode::NOT_FOUND.into_response();
    };
    job.updates.push(body.clone());
    if job_token(&headers) != job.token || body["token"].as_str() != Some(job.token.as_str()) {
        inner.record(Api::Update, 403, Some(id), None);
        return StatusCode::FORBIDDEN.into_response();
    }
    if job.state != "running" {
        let resp = with_status(StatusCode::FORBIDDEN.into_response(), job);
        inner.record(Api::Update, 403, Some(id), None);
        return resp;
    }
    let state = body["state"].as_str().unwrap_or_default().to_string();
    let is_final = matches!(state.as_str(), "success" | "failed");
    let fault = if is_final { inner.take_fault(Api::Update) } else { None };
    let job = inner.jobs.get_mut(&id).unwrap();
    let resp = match fault {
        Some(Fault::NotYet) => StatusCode::ACCEPTED.into_response(),
        Some(Fault::ChecksumMismatch) => {
            job.trace.clear();
            job.patches.clear();
            StatusCode::PRECONDITION_FAILED.into_response()
        }
        Some(other) => fault_response(other),
        None if is_final => {
            let checksum = format!("crc32:{:08x}", crc32fast::hash(&job.trace));
            let size = job.trace.len() as u64;
            if body["output"]["checksum"].as_str() != Some(checksum.as_str()) || body["output"]["bytesize"] != size {
                job.trace.clear();
                job.patches.clear();
                StatusCode::PRECONDITION_FAILED.into_response()
            } else {
                job.state = state;
                job.finals_accepted += 1;
                let runner = job.taken_by.clone().unwrap_or_default();
                inner.add_running(&runner, -1);
                StatusCode::OK.into_response()
            }
        }
        None => StatusCode::OK.into_response(),
    };
    let job = &inner.jobs[&id];
    let resp = if is_final { resp } else { with_status(resp, job) };
    inner.record(Api::Update, resp.status().as_u16(), Some(id), None);
    resp
}

async fn trace(State(shared): State<Arc<Shared>>, Path(id): Path<u64>, headers: HeaderMap, body: Bytes) -> Response {
    let mut inner = shared.inner.lock().unwrap();
    let interval = inner.trace_interval;
    let fault = inner.take_fault(Api::Trace);
    let Some(job) = inner.jobs.get_mut(&id) else {
        inner.record(Api::Trace, 404, Some(id), None);
        return StatusCode::NOT_FOUND.into_response();
    };
    if job_token(&headers) != job.token {
        inner.record(Api::Trace, 403, Some(id), None);
        return StatusCode::FORBIDDEN.into_response();
    }
    let range = headers.get("Content-Range").and_then(|v| v.to_str().ok()).and_then(|r| {
        let (a, b) = r.split_once('-')?;
        Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
    });
    let stored = job.trace.len() as u64;
    let mismatch = || (StatusCode::RANGE_NOT_SATISFIABLE, [("Range", format!("0-{stored}"))]).into_response();
    let resp = match (fault, range) {
        _ if job.state != "running" => StatusCode::FORBIDDEN.into_response(),
        (Some(Fault::RangeMismatch), _) => mismatch(),
        (Some(other), _) => fault_response(other),
        (None, None) => StatusCode::BAD_REQUEST.into_response(),
        (None, Some((start, end))) => {
            if start != stored || body.is_empty() || end != start + body.len() as u64 - 1 {
                mismatch()
            } else {
                job.trace.extend_from_slice(&body);
                job.patches.push((start, end));
                let mut resp = (StatusCode::ACCEPTED, [("Range", format!("0-{}", job.trace.len()))]).into_response();
                if let Some(secs) = interval {
                    resp.headers_mut().insert("X-GitLab-Trace-Update-Interval", secs.into());
                }
                resp
            }
        }
    };
    let resp = with_status(resp, job);
    inner.record(Api::Trace, resp.status().as_u16(), Some(id), None);
    resp
}

/// `POST jobs/:id/artifacts`: the job's own token, a running job, a multipart body with a
/// `file` part; stored per job.
async fn upload_artifacts(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<u64>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut inner = shared.inner.lock().unwrap();
    let fault = inner.take_fault(Api::UploadArtifacts);
    let Some(job) = inner.jobs.get_mut(&id) else {
        inner.record(Api::UploadArtifacts, 404, Some(id), None);
        return StatusCode::NOT_FOUND.into_response();
    };
    let code = if job_token(&headers) != job.token || job.state != "running" {
        403
    } else if let Some(fault) = fault {
        let resp = fault_response(fault);
        inner.record(Api::UploadArtifacts, resp.status().as_u16(), Some(id), None);
        return resp;
    } else {
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        match multipart_file(content_type, &body) {
            Some((filename, bytes)) => {
                job.artifacts.push(ArtifactsUpload { query: query.unwrap_or_default(), filename, bytes });
                201
            }
            None => 400,
        }
    };
    inner.record(Api::UploadArtifacts, code, Some(id), None);
    status(code).into_response()
}

/// `GET jobs/:id/artifacts`: with that job's token, its last `archive` upload (reports are not
/// what GitLab hands to dependent jobs).
async fn download_artifacts(State(shared): State<Arc<Shared>>, Path(id): Path<u64>, headers: HeaderMap) -> Response {
    let mut inner = shared.inner.lock().unwrap();
    let fault = inner.take_fault(Api::DownloadArtifacts);
    let (code, bytes) = match inner.jobs.get(&id) {
        None => (404, None),
        Some(job) if job_token(&headers) != job.token => (403, None),
        Some(_) if fault.is_some() => {
            let resp = fault_response(fault.unwrap());
            inner.record(Api::DownloadArtifacts, resp.status().as_u16(), Some(id), None);
            return resp;
        }
        Some(job) => match job.artifacts.iter().rev().find(|a| a.query.contains("artifact_type=archive")) {
            Some(a) => (200, Some(a.bytes.clone())),
            None => (404, None),
        },
    };
    inner.record(Api::DownloadArtifacts, code, Some(id), None);
    match bytes {
        Some(b) => (StatusCode::OK, [("content-type", "application/zip")], b).into_response(),
        None => status(code).into_response(),
    }
}

/// The `file` part of a `multipart/form-data` body: its file name and bytes.
fn multipart_file(content_type: &str, body: &[u8]) -> Option<(String, Vec<u8>)> {
    let boundary = content_type.split(';').find_map(|p| p.trim().strip_prefix("boundary="))?.trim_matches('"');
    let delimiter = format!("--{boundary}");
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|i| i + from)
    };
    let mut at = find(body, delimiter.as_bytes(), 0)? + delimiter.len();
    loop {
        if body.get(at..at + 2)? == b"--" {
            return None;
        }
        let headers_end = find(body, b"\r\n\r\n", at)?;
        let part_headers = String::from_utf8_lossy(&body[at..headers_end]).into_owned();
        let data_start = headers_end + 4;
        let next = find(body, format!("\r\n{delimiter}").as_bytes(), data_start)?;
        let disposition = part_headers.lines().find(|l| l.to_ascii_lowercase().starts_with("content-disposition"))?;
        if disposition.contains("name=\"file\"") {
            let filename = disposition
                .split("filename=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or_default()
                .to_string();
            return Some((filename, body[data_start..next].to_vec()));
        }
        at = next + 2 + delimiter.len();
    }
}

/// A small job payload as GitLab sends it.
pub fn job_payload(name: &str) -> Value {
    json!({
        "id": 0, "token": "",
        "allow_git_fetch": true,
        "job_info": {"name": name, "stage": "test", "project_id": 7, "project_name": "app"},
        "git_info": {"repo_url": "https://gitlab-ci-token:x@gitlab.example.com/g/app.git", "ref": "main",
                     "sha": "1f2e3d", "before_sha": "0a1b2c", "ref_type": "branch", "depth": 1, "refspecs": []},
        "runner_info": {"timeout": 3600},
        "variables": [{"key": "CI_JOB_NAME", "value": name, "public": true, "masked": false}],
        "steps": [{"name": "script", "script": ["echo hi"], "timeout": 3600, "when": "on_success", "allow_failure": false}],
        "image": {"name": "alpine:3"},
        "services": [], "artifacts": [], "cache": [], "credentials": [], "dependencies": [],
        "features": {"trace_sections": true,
                     "failure_reasons": ["script_failure", "runner_system_failure", "job_execution_timeout", "job_canceled"]}
    })
}
