//! The client and the job reporter against the fake GitLab (`fake.rs`) and, where it covers a
//! call, against `gitlab-runner-mock` (written by others).

use std::sync::Arc;
use std::time::Duration;

use super::fake::{Api, FakeGitlab, Fault, job_payload};
use super::*;

const TOKEN: &str = "glrt-goodtoken";

pub(crate) fn client_for(url: &str, token: &str, features: Features) -> Client {
    let identity = RunnerIdentity {
        name: "r1".into(),
        url: url.into(),
        token: Secret::new(token),
        system_id: "r_0123456789ab".into(),
        info: VersionInfo::keel(features),
    };
    let options = ClientOptions {
        retry: RetryPolicy { attempts: 5, min_delay: Duration::from_millis(5), max_delay: Duration::from_millis(50) },
        ..ClientOptions::default()
    };
    Client::new(identity, options).unwrap()
}

pub(crate) fn fast_reports() -> ReportOptions {
    ReportOptions {
        trace_interval: Duration::from_millis(20),
        keepalive_interval: Duration::from_secs(3600),
        max_patch: 7,
        final_retry_min: Duration::from_millis(5),
        final_retry_max: Duration::from_millis(50),
    }
}

async fn take_job(client: &Client) -> JobPayload {
    match client.request_job(None).await.unwrap() {
        JobRequest::Job(job) => *job,
        other => panic!("expected a job, got {other:?}"),
    }
}

/// Takes the queued job from `fake` and starts reporting on it.
async fn started(fake: &FakeGitlab, options: ReportOptions) -> (JobSession, JobReporter) {
    let client = Arc::new(client_for(&fake.url(), TOKEN, Features::client()));
    let job = take_job(&client).await;
    JobSession::start(client, &job, options, None).await.unwrap()
}

/// Writes `lines` with pauses so the uploader sends several patches meanwhile.
async fn write_slowly(reporter: &JobReporter, lines: usize) -> Vec<u8> {
    let mut all = Vec::new();
    for i in 0..lines {
        let line = format!("line {i} of the job's output\n");
        reporter.write(line.as_bytes());
        all.extend_from_slice(line.as_bytes());
        tokio::time::sleep(Duration::from_millis(7)).await;
    }
    all
}

/// Accepted patches are contiguous from 0 and add up to the trace: no byte twice, none lost.
fn assert_each_byte_once(job: &fake::FakeJob, written: &[u8]) {
    assert_eq!(job.trace, written, "the stored trace is what the pipeline wrote");
    let mut next = 0;
    for &(start, end) in &job.patches {
        assert_eq!(start, next, "patches are contiguous: {:?}", job.patches);
        next = end + 1;
    }
    assert_eq!(next, written.len() as u64);
}

fn final_updates(job: &fake::FakeJob) -> Vec<&serde_json::Value> {
    job.updates.iter().filter(|u| u["state"] != "running").collect()
}

#[tokio::test]
async fn verify_accepts_the_token_and_names_the_runner_when_refused() {
    let fake = FakeGitlab::start(&[TOKEN]).await;
    let good = client_for(&fake.url(), TOKEN, Features::client());
    good.verify().await.unwrap();
    let bad = client_for(&fake.url(), "glrt-wrong", Features::client());
    let err = bad.verify().await.unwrap_err();
    assert_eq!(err.to_string(), "runner \"r1\": POST runners/verify: GitLab refused the runner token (403)");
    assert!(matches!(err, GitlabError::TokenRefused { status: 403, .. }));
}

#[tokio::test]
async fn long_polling_echoes_last_update_and_is_held_until_a_job_arrives() {
    let fake = Arc::new(FakeGitlab::start(&[TOKEN]).await);
    fake.set_hold(Duration::from_secs(30));
    let client = client_for(&fake.url(), TOKEN, Features::client());
    let JobRequest::NoJob { last_update } = client.request_job(None).await.unwrap() else { panic!("no job queued") };
    assert_eq!(last_update.as_deref(), Some("0"));
    let held = {
        let fake = fake.clone();
        tokio::spawn(async move {
            // Only once the request is being held.
            while fake.calls(Api::Request).len() < 2 && fake.jobs().is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if fake.calls(Api::Request).len() == 1 {
                    fake.enqueue(job_payload("late"));
                }
            }
        })
    };
    let JobRequest::Job(job) = client.request_job(last_update.as_deref()).await.unwrap() else {
        panic!("the held request gets the job")
    };
    held.await.unwrap();
    assert_eq!(job.job_info.name, "late");
    let calls = fake.calls(Api::Request);
    assert_eq!(calls.iter().map(|c| c.last_update.clone()).collect::<Vec<_>>(), [None, Some("0".to_string())]);
    assert_eq!(calls[1].status, 201);
}

#[tokio::test]
async fn transient_answers_are_retried_honouring_retry_after() {
    let fake = FakeGitlab::start(&[TOKEN]).await;
    fake.enqueue(job_payload("a"));
    fake.fault(Api::Request, Fault::RetryAfter(429, 1));
    fake.fault(Api::Request, Fault::Status(502));
    fake.fault(Api::Request, Fault::Status(409));
    let client = client_for(&fake.url(), TOKEN, Features::client());
    take_job(&client).await;
    let calls = fake.calls(Api::Request);
    assert_eq!(calls.iter().map(|c| c.status).collect::<Vec<_>>(), [429, 502, 409, 201]);
    // The back-off alone is 5-50 ms here; Retry-After asked for a second. A lower bound only.
    assert!(calls[1].at - calls[0].at >= Duration::from_secs(1), "Retry-After honoured");
}

#[tokio::test]
async fn persistent_failure_is_an_error_naming_runner_and_call() {
    let fake = FakeGitlab::start(&[TOKEN]).await;
    for _ in 0..5 {
        fake.fault(Api::Request, Fault::Status(502));
    }
    let client = client_for(&fake.url(), TOKEN, Features::client());
    let err = client.request_job(None).await.unwrap_err();
    assert_eq!(fake.calls(Api::Request).len(), 5, "5 attempts, as GitLab Runner");
    assert!(err.to_string().starts_with("runner \"r1\": POST jobs/request: GitLab answered 502"), "{err}");

    let nowhere = client_for("http://127.0.0.1:9", TOKEN, Features::client());
    let err = nowhere.verify().await.unwrap_err();
    assert!(err.to_string().starts_with("runner \"r1\": POST runners/verify: GitLab unreachable"), "{err}");
    let err = Client::new(
        RunnerIdentity {
            name: "r2".into(),
            url: "ftp://x".into(),
            token: Secret::new("t"),
            system_id: String::new(),
            info: VersionInfo::keel(Features::default()),
        },
        ClientOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "runner \"r2\": url \"ftp://x\" is not a usable GitLab address: not an http(s) URL");
}

#[tokio::test]
async fn garbage_job_payload_is_an_error_naming_the_job() {
    let fake = FakeGitlab::start(&[TOKEN]).await;
    let mut payload = job_payload("bad");
    payload["steps"] = serde_json::json!("not a list");
    let id = fake.enqueue(payload);
    let client = client_for(&fake.url(), TOKEN, Features::client());
    let text = client.request_job(None).await.unwrap_err().to_string();
    let expected = format!(
        "runner \"r1\": POST jobs/request: job {id}: payload field `steps`: invalid type: string <10 bytes>, expected a sequence"
    );
    assert!(text.starts_with(&expected), "{text}");
}

#[tokio::test]
async fn the_trace_arrives_once_in_order_through_416_and_202() {
    let fake = FakeGitlab::start(&[TOKEN]).await;
    let id = fake.enqueue(job_payload("a"));
    fake.fault(Api::Trace, Fault::RangeMismatch);
    fake.fault(Api::Update, Fault::NotYet);
    fake.fault(Api::Update, Fault::NotYet);
    let (session, reporter) = started(&fake, fast_reports()).await;
    let written = write_slowly(&reporter, 40).await;
    let finish = session.finish(JobOutcome::success()).await;
    assert_eq!(finish, Finish::Accepted { attempts: 3 }, "two 202s, then 200");

    let job = fake.job(id);
    assert_eq!(job.id, id);
    assert_each_byte_once(&job, &written);
    assert!(job.patches.len() > 10, "sent incrementally, in patches of at most 7 bytes");
    assert!(fake.calls(Api::Trace).iter().any(|c| c.status == 416), "the 416 happened");
    assert_eq!(job.updates[0]["state"], "running", "pickup first");
    assert_eq!(job.finals_accepted, 1);
    let finals = final_updates(&job);
    assert_eq!(finals.len(), 3);
    let last = finals.last().unwrap();
    assert_eq!(last["state"], "success");
    assert_eq!(last["exit_code"], 0);
    assert_eq!(last["output"]["checksum"], format!("crc32:{:08x}", crc32fast::hash(&written)));
    assert_eq!(last["output"]["bytesize"], written.len());
    assert_eq!(job.state, "success");
}

#[tokio::test]
async fn the_trace_interval_gitlab_asks_for_is_honoured() {
    let fake = FakeGitlab::start(&[TOKEN]).await;
    let id = fake.enqueue(job_payload("a"));
    fake.set_trace_interval(Some(1));
    let (session, reporter) = started(&fake, fast_reports()).await;
    reporter.write(b"first\n");
    while fake.job(id).patches.is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    reporter.write(b"second\n");
    while fake.job(id).patches.len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    session.finish(JobOutcome::success()).await;
    let patches: Vec<_> = fake.calls(Api::Trace).into_iter().filter(|c| c.job == Some(id)).collect();
    // Our own interval is 20 ms; GitLab asked for 1 s after the first patch. A lower bound only.
    assert!(patches[1].at - patches[0].at >= Duration::from_secs(1));
    assert_eq!(fake.job(id).trace, b"first\nsecond\n");
}

#[tokio::test]
async fn a_412_resends_the_whole_trace_from_zero() {
    let fake = FakeGitlab::start(&[TOKEN]).await;
    let id = fake.enqueue(job_payload("a"));
    fake.fault(Api::Update, Fault::ChecksumMismatch);
    let (session, reporter) = started(&fake, fast_reports()).await;
    let written = write_slowly(&reporter, 10).await;
    let finish = session.finish(JobOutcome::failed(FailureReason::ScriptFailure, Some(3))).await;
    assert_eq!(finish, Finish::Accepted { attempts: 2 });
    let job = fake.job(id);
    assert_each_byte_once(&job, &written);
    let last = *final_updates(&job).last().unwrap();
    assert_eq!(
        (&last["state"], &last["failure_reason"], &last["exit_code"]),
        (&"failed".into(), &"script_failure".into(), &3.into())
    );
    assert_eq!(job.finals_accepted, 1);
}

#[tokio::test]
async fn canceling_asks_the_pipeline_to_stop_gracefully() {
    let fake = FakeGitlab::start(&[TOKEN]).await;
    let id = fake.enqueue(job_payload("a"));
    let (session, reporter) = started(&fake, fast_reports()).await;
    let mut cancel = reporter.cancel();
    reporter.write(b"running\n");
    fake.set_job_status(id, "canceling");
    reporter.write(b"more\n");
    cancel.wait_for(|c| *c == Cancel::Graceful).await.unwrap();
    reporter.write(b"after_script ran\n");
    let finish = session.finish(JobOutcome::failed(FailureReason::JobCanceled, None)).await;
    assert_eq!(finish, Finish::Accepted { attempts: 1 });
    let job = fake.job(id);
    assert_eq!(job.trace, b"running\nmore\nafter_script ran\n");
    assert_eq!(final_updates(&job)[0]["failure_reason"], "job_canceled");
}

#[tokio::test]
async fn canceled_aborts_at_once_without_a_final_update() {
    let fake = FakeGitlab::start(&[TOKEN]).await;
    let id = fake.enqueue(job_payload("a"));
    let (session, reporter) = started(&fake, fast_reports()).await;
    let mut cancel = reporter.cancel();
    fake.set_job_status(id, "canceled");
    reporter.write(b"x\n");
    cancel.wait_for(|c| *c == Cancel::Immediate).await.unwrap();
    let finish = session.finish(JobOutcome::failed(FailureReason::JobCanceled, None)).await;
    assert_eq!(finish, Finish::AbortedByGitlab);
    assert!(final_updates(&fake.job(id)).is_empty());
}

#[tokio::test]
async fn a_quiet_job_sends_keepalive_updates() {
    let fake = FakeGitlab::start(&[TOKEN]).await;
    let id = fake.enqueue(job_payload("a"));
    let options = ReportOptions { keepalive_interval: Duration::from_millis(30), ..fast_reports() };
    let (session, _reporter) = started(&fake, options).await;
    while fake.job(id).updates.len() < 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(session.finish(JobOutcome::success()).await, Finish::Accepted { attempts: 1 });
    let job = fake.job(id);
    assert!(
        job.updates[1..3].iter().all(|u| u["state"] == "running" && u["output"]["checksum"].is_string()),
        "{:?}",
        job.updates
    );
    assert!(job.trace.is_empty());
}

#[tokio::test]
async fn a_refused_pickup_does_not_start_the_job() {
    let fake = FakeGitlab::start(&[TOKEN]).await;
    let id = fake.enqueue(job_payload("a"));
    let client = Arc::new(client_for(&fake.url(), TOKEN, Features::client()));
    let job = take_job(&client).await;
    fake.set_job_status(id, "canceled");
    let err = JobSession::start(client, &job, fast_reports(), None).await.err().unwrap();
    assert_eq!(err.to_string(), format!("runner \"r1\": job {id}: GitLab refused the pickup (403)"));
}

#[test]
fn tokens_reach_no_log_line() {
    use std::io::Write;
    #[derive(Clone, Default)]
    struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = Logs::default();
    let sink = logs.clone();
    let subscriber =
        tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(move || sink.clone()).finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let job_token = rt.block_on(async {
        let fake = FakeGitlab::start(&[TOKEN]).await;
        let id = fake.enqueue(job_payload("a"));
        for _ in 0..3 {
            fake.fault(Api::Trace, Fault::Status(502));
        }
        fake.fault(Api::Update, Fault::Status(500));
        let client = Arc::new(client_for(&fake.url(), TOKEN, Features::client()));
        let job = take_job(&client).await;
        tracing::info!(?job, ?client, "the whole payload and client, as a careless log line would");
        let (session, reporter) = JobSession::start(client, &job, fast_reports(), None).await.unwrap();
        write_slowly(&reporter, 5).await;
        session.finish(JobOutcome::success()).await;
        fake.job(id).token
    });
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("gitlab.retry"), "retries were logged: {logs}");
    assert!(!logs.contains(TOKEN) && !logs.contains(&job_token), "{logs}");
}

/// `gitlab-runner-mock` judges request, pickup, trace and final update. It does not cover
/// `runners/verify`, long polling, `canceling`, 416 `Range` recovery, 412, 202, or
/// `Retry-After` (see the fake for those). It answers 204 unless `refspecs` is announced.
#[tokio::test]
async fn gitlab_runner_mock_accepts_our_calls() {
    let mock = gitlab_runner_mock::GitlabRunnerMock::start().await;
    let mock_job = mock.add_dummy_job("mocked".into());
    let features = Features { refspecs: true, ..Features::client() };
    let client = Arc::new(client_for(mock.uri().as_str(), mock.runner_token(), features));
    let job = take_job(&client).await;
    assert_eq!(job.id, mock_job.id());
    assert_eq!(job.job_info.name, "mocked");
    let (session, reporter) = JobSession::start(client.clone(), &job, fast_reports(), None).await.unwrap();
    let written = write_slowly(&reporter, 12).await;
    assert_eq!(session.finish(JobOutcome::success()).await, Finish::Accepted { attempts: 1 });
    assert_eq!(mock_job.state(), gitlab_runner_mock::MockJobState::Success);
    assert_eq!(mock_job.log(), written);
    assert!(mock_job.log_patches() > 1, "incremental");
    assert!(matches!(client.request_job(None).await.unwrap(), JobRequest::NoJob { .. }));
}

#[tokio::test]
async fn artifacts_upload_with_the_job_token_retry_5xx_report_413_and_download_with_the_dependency_token() {
    let fake = FakeGitlab::start(&[TOKEN]).await;
    let id = fake.enqueue(job_payload("build"));
    let client = client_for(&fake.url(), TOKEN, Features::client());
    let job = take_job(&client).await;
    let creds = JobCredentials::from(&job);
    let upload = ArtifactsUpload {
        zip: bytes::Bytes::from_static(b"PK\x05\x06zip bytes\r\n--not-a-boundary"),
        filename: "out.zip".into(),
        artifact_type: "archive".into(),
        artifact_format: "zip".into(),
        expire_in: "1 week".into(),
    };
    // A 502 is retried; the retry lands.
    fake.fault(Api::UploadArtifacts, Fault::Status(502));
    assert_eq!(client.upload_artifacts(&creds, &upload).await.unwrap(), UploadOutcome::Created);
    let stored = fake.job(id).artifacts;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].bytes, upload.zip.as_ref());
    assert_eq!(stored[0].filename, "out.zip");
    assert_eq!(stored[0].query, "artifact_format=zip&artifact_type=archive&expire_in=1+week");
    let statuses: Vec<u16> = fake.calls(Api::UploadArtifacts).iter().map(|c| c.status).collect();
    assert_eq!(statuses, [502, 201]);

    fake.fault(Api::UploadArtifacts, Fault::Status(413));
    assert_eq!(client.upload_artifacts(&creds, &upload).await.unwrap(), UploadOutcome::TooLarge);

    let wrong = JobCredentials { id, token: Secret::new("glcbt-wrong") };
    assert!(matches!(
        client.upload_artifacts(&wrong, &upload).await.unwrap(),
        UploadOutcome::Refused { status: 403, .. }
    ));

    // Another job downloads with the token the payload gives for the dependency.
    assert_eq!(client.download_artifacts(&creds).await.unwrap().as_ref(), upload.zip.as_ref());
    let err = client.download_artifacts(&wrong).await.unwrap_err();
    assert!(matches!(err, GitlabError::Status { status: 403, .. }), "{err}");
    assert!(!err.to_string().contains("glcbt-"), "{err}");
}

/// A download redirected to object storage (another origin) goes there without the job token;
/// an upload redirected away from GitLab is not followed.
#[tokio::test]
async fn artifacts_redirects_never_carry_the_token_away_from_gitlab() {
    use axum::http::HeaderMap;
    use axum::response::IntoResponse;
    use std::sync::Mutex;
    async fn serve(app: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let record = seen.clone();
    let storage = serve(axum::Router::new().route(
        "/bucket/zip",
        axum::routing::get(move |headers: HeaderMap| async move {
            record.lock().unwrap().push(headers.get("JOB-TOKEN").map(|v| v.to_str().unwrap().to_string()));
            "zip bytes"
        }),
    ))
    .await;
    let target = format!("{storage}/bucket/zip");
    let upload_target = target.clone();
    let gitlab = serve(
        axum::Router::new().route(
            "/api/v4/jobs/{id}/artifacts",
            axum::routing::get(move || async move {
                (axum::http::StatusCode::FOUND, [("Location", target.clone())]).into_response()
            })
            .post(move || async move {
                (axum::http::StatusCode::TEMPORARY_REDIRECT, [("Location", upload_target.clone())]).into_response()
            }),
        ),
    )
    .await;
    let client = client_for(&gitlab, TOKEN, Features::client());
    let creds = JobCredentials { id: 5, token: Secret::new("glcbt-dependency") };
    assert_eq!(client.download_artifacts(&creds).await.unwrap().as_ref(), b"zip bytes");
    assert_eq!(*seen.lock().unwrap(), [None]);
    let upload = ArtifactsUpload {
        zip: bytes::Bytes::from_static(b"zip"),
        filename: "artifacts.zip".into(),
        artifact_type: "archive".into(),
        artifact_format: "zip".into(),
        expire_in: String::new(),
    };
    let err = client.upload_artifacts(&creds, &upload).await.unwrap_err();
    assert!(err.to_string().contains("redirected away from GitLab"), "{err}");
    assert_eq!(seen.lock().unwrap().len(), 1, "the upload went nowhere else");
}
