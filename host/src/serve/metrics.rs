//! `/metrics` under GitLab Runner's names, so existing dashboards and alerts keep working, and
//! `/readyz`. Prometheus text format 0.0.4 as GitLab Runner serves it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::gitlab::{ApiObserver, Endpoint, JobOutcome};

pub struct Metrics {
    registry: Registry,
    jobs: IntGaugeVec,
    jobs_total: IntCounterVec,
    job_duration: HistogramVec,
    failed_jobs: IntCounterVec,
    api_statuses: IntCounterVec,
    pub(crate) concurrent: IntGauge,
    limit: IntGaugeVec,
    /// Runners whose token GitLab accepted.
    verified: AtomicUsize,
    stopping: AtomicBool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Names and labels are constants: an error here is a bug in this file.
    r.expect("a valid metric definition")
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let jobs = must(IntGaugeVec::new(
            Opts::new("gitlab_runner_jobs", "The number of running jobs"),
            &["runner", "state", "stage"],
        ));
        let jobs_total = must(IntCounterVec::new(
            Opts::new("gitlab_runner_jobs_total", "Total number of handled jobs"),
            &["runner"],
        ));
        let job_duration = must(HistogramVec::new(
            HistogramOpts::new("gitlab_runner_job_duration_seconds", "Histogram of job durations")
                .buckets(vec![30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 10800.0, 18000.0, 36000.0]),
            &["runner"],
        ));
        let failed_jobs = must(IntCounterVec::new(
            Opts::new("gitlab_runner_failed_jobs_total", "Total number of failed jobs"),
            &["runner", "failure_reason"],
        ));
        let api_statuses = must(IntCounterVec::new(
            Opts::new(
                "gitlab_runner_api_request_statuses_total",
                "The total number of API requests, by runner, endpoint and status",
            ),
            &["runner", "endpoint", "status"],
        ));
        let concurrent = must(IntGauge::new("gitlab_runner_concurrent", "The current value of concurrent setting"));
        let limit =
            must(IntGaugeVec::new(Opts::new("gitlab_runner_limit", "The current value of limit setting"), &["runner"]));
        let version = must(IntGaugeVec::new(
            Opts::new(
                "gitlab_runner_version_info",
                "A metric with a constant '1' value labeled by different build stats fields",
            ),
            &["name", "version", "revision", "os", "architecture"],
        ));
        version
            .with_label_values(&[
                "keel",
                env!("CARGO_PKG_VERSION"),
                option_env!("KEEL_REVISION").unwrap_or("unknown"),
                std::env::consts::OS,
                std::env::consts::ARCH,
            ])
            .set(1);
        for m in [
            Box::new(jobs.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(jobs_total.clone()),
            Box::new(job_duration.clone()),
            Box::new(failed_jobs.clone()),
            Box::new(api_statuses.clone()),
            Box::new(concurrent.clone()),
            Box::new(limit.clone()),
            Box::new(version),
        ] {
            must(registry.register(m));
        }
        must(crate::metrics::register(&registry));
        Metrics {
            registry,
            jobs,
            jobs_total,
            job_duration,
            failed_jobs,
            api_statuses,
            concurrent,
            limit,
            verified: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        }
    }

    pub fn set_limit(&self, runner: &str, limit: Option<usize>) {
        self.limit.with_label_values(&[runner]).set(limit.unwrap_or(0) as i64);
    }

    pub fn runner_verified(&self) {
        self.verified.fetch_add(1, Ordering::SeqCst);
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Ready: at least one runner serves and no shutdown has begun.
    pub fn ready(&self) -> bool {
        self.verified.load(Ordering::SeqCst) > 0 && !self.stopping.load(Ordering::SeqCst)
    }

    pub fn job_started(&self, runner: &str) {
        self.jobs_total.with_label_values(&[runner]).inc();
    }

    pub fn stage_changed(&self, runner: &str, old: &str, new: &str) {
        if !old.is_empty() {
            self.jobs.with_label_values(&[runner, "running", old]).dec();
        }
        if !new.is_empty() {
            self.jobs.with_label_values(&[runner, "running", new]).inc();
        }
    }

    pub fn job_finished(&self, runner: &str, outcome: &JobOutcome, took: Duration) {
        self.job_duration.with_label_values(&[runner]).observe(took.as_secs_f64());
        if let Some(reason) = outcome.failure {
            self.failed_jobs.with_label_values(&[runner, reason.as_str()]).inc();
        }
    }

    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl ApiObserver for Metrics {
    fn answered(&self, runner: &str, endpoint: Endpoint, status: u16) {
        self.api_statuses.with_label_values(&[runner, endpoint.label(), &status.to_string()]).inc();
    }
}

#[derive(Debug, thiserror::Error)]
#[error("listen_address {address}: cannot listen: {cause}")]
pub struct ListenError {
    pub address: SocketAddr,
    pub cause: std::io::Error,
}

/// Serves `/metrics` and `/readyz` until `stop` resolves. Returns the bound address (port 0
/// picks one).
pub async fn serve_http(
    address: SocketAddr,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ListenError> {
    let listener = tokio::net::TcpListener::bind(address).await.map_err(|cause| ListenError { address, cause })?;
    let bound = listener.local_addr().map_err(|cause| ListenError { address, cause })?;
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_page))
        .route("/readyz", axum::routing::get(readiness))
        .with_state(metrics);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
            tracing::warn!(error = %e, "serve.metrics_server_failed");
        }
    });
    Ok((bound, task))
}

async fn metrics_page(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], metrics.render())
}

async fn readiness(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.ready() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
}
