//! keel's own metrics, process-wide: recorded where the work happens (plugin calls, pod starts)
//! and exported by `host serve`'s `/metrics` beside GitLab Runner's names. Labels are plugin
//! names and roles from the operator's config, so their number stays small.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// Every role call of a plugin, by its name and role.
pub static PLUGIN_CALL_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    HistogramVec::new(
        HistogramOpts::new("keel_plugin_call_duration_seconds", "Duration of plugin role calls")
            .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0]),
        &["plugin", "role"],
    )
    .expect("a valid metric")
});

/// Role calls that failed (trap, timeout, the plugin's own error, a refused answer).
pub static PLUGIN_CALL_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new("keel_plugin_call_failures_total", "Plugin role calls that failed"),
        &["plugin", "role"],
    )
    .expect("a valid metric")
});

/// From the job's objects being created to its pod running (image pulls included).
pub static POD_START_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::with_opts(
        HistogramOpts::new("keel_pod_start_duration_seconds", "From creating a job's pod to it running")
            .buckets(vec![0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0]),
    )
    .expect("a valid metric")
});

pub fn plugin_call(plugin: &str, role: &str, took: Duration, failed: bool) {
    PLUGIN_CALL_SECONDS.with_label_values(&[plugin, role]).observe(took.as_secs_f64());
    if failed {
        PLUGIN_CALL_FAILURES.with_label_values(&[plugin, role]).inc();
    }
}

/// Adds keel's metrics to `registry` (once per registry).
pub fn register(registry: &Registry) -> prometheus::Result<()> {
    registry.register(Box::new(PLUGIN_CALL_SECONDS.clone()))?;
    registry.register(Box::new(PLUGIN_CALL_FAILURES.clone()))?;
    registry.register(Box::new(POD_START_SECONDS.clone()))
}
