//! The bodies of the fuzz targets, shared by the libFuzzer binaries in `fuzz_targets/` and by
//! the corpus replay that runs in `cargo test` (`host/tests/hostile_fuzz.rs`). Any outcome but
//! a panic, an abort or a hang is fine; where the host promises more, it is asserted.

#![allow(dead_code)] // each binary uses one target

use std::path::Path;

use host::job::parse::{JobContext, JobSource, parse};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// `config.toml` text.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // A base that does not exist: `patch_path` entries fail to read instead of touching files.
    match host::config::Config::parse(text, Path::new("fuzz.toml"), Path::new("/nonexistent-fuzz-base")) {
        Ok(config) => {
            for runner in &config.runners {
                if let Some(k8s) = &runner.kubernetes {
                    let _ = k8s.to_json();
                }
            }
        }
        Err(e) => check_message(&e.to_string()),
    }
}

/// A job file, read both as a single job and as a pipeline (the job named on the first line).
pub fn job(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let ctx = JobContext { default_image: Some("alpine".into()), ..JobContext::default() };
    let single = JobSource { path: "job.yml".into(), job_name: None };
    match parse(text, &single, &ctx) {
        Ok(job) => {
            let _ = host::job::overwrites::requested(&job);
        }
        Err(e) => check_message(&e.to_string()),
    }
    let name = text.lines().next().and_then(|l| l.trim_end().strip_suffix(':')).unwrap_or("job");
    let pipeline = JobSource { path: ".gitlab-ci.yml".into(), job_name: Some(name.to_string()) };
    match parse(text, &pipeline, &ctx) {
        Ok(job) => {
            let _ = host::job::overwrites::requested(&job);
        }
        Err(e) => check_message(&e.to_string()),
    }
}

/// What a pod mutator returns, checked against the pod it was given; and the escaping that
/// plugin text goes through before it is printed.
pub fn plugin_output(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let escaped = host::plugins::plugin_text(&text, 256);
    assert!(!escaped.contains(['\n', '\r', '\u{1b}', '\u{2028}']), "unescaped: {escaped:?}");
    assert!(escaped.len() <= 256 + 64, "not cut: {} bytes", escaped.len());

    let before = pod();
    let rules = host::plugins::HostOwned::label("keel.dev/job-id");
    if let Ok(after) = host::plugins::check_pod_output(&before, &rules, &text) {
        assert_eq!(after.metadata.namespace, before.metadata.namespace);
        assert_eq!(after.metadata.generate_name, before.metadata.generate_name);
        let label = |p: &Pod| p.metadata.labels.as_ref().and_then(|l| l.get("keel.dev/job-id")).cloned();
        assert_eq!(label(&after), label(&before));
        assert!(after.spec.as_ref().is_some_and(|s| s.containers.iter().any(|c| c.name == "build")));
        assert!(text.len() <= host::input::limits::OBJECT_BYTES);
    }
}

/// Errors quoting input stay readable: cut at the message limit (plus the file and key).
fn check_message(message: &str) {
    assert!(
        message.len() <= 3 * host::input::limits::MESSAGE_BYTES,
        "an error message of {} bytes: {}...",
        message.len(),
        message.chars().take(200).collect::<String>()
    );
}

pub fn pod() -> Pod {
    Pod {
        metadata: ObjectMeta {
            generate_name: Some("runner-x-project-1-concurrent-0-".into()),
            namespace: Some("ci".into()),
            labels: Some([("keel.dev/job-id".to_string(), "1".to_string())].into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container { name: "build".into(), image: Some("alpine".into()), ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    }
}
