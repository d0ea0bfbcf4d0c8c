//! Shared by the plugin tests: real compiled plugins, built on demand.

#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use host::job::{Image, Job, Stage, Variable};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub const PLUGINS: [&str; 5] = ["labels", "pull-policy", "overwrites", "pod-spec", "fixture-fault"];

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ is inside the repo").to_path_buf()
}

fn newest_source(dir: &Path, newest: &mut SystemTime) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" {
            continue;
        }
        if path.is_dir() {
            newest_source(&path, newest);
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("rs" | "toml" | "wit"))
            && let Ok(modified) = entry.metadata().and_then(|m| m.modified())
        {
            *newest = (*newest).max(modified);
        }
    }
}

/// Path of `target/plugins/<name>.wasm`, building all plugins first when any is missing or
/// older than the plugin, SDK or WIT sources (so `cargo test` alone always tests current code).
pub fn plugin(name: &str) -> PathBuf {
    static BUILD: Mutex<bool> = Mutex::new(false);
    let root = repo_root();
    let out = root.join("target/plugins");
    let mut built = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if !*built {
        let mut newest = SystemTime::UNIX_EPOCH;
        for dir in ["plugins", "sdk", "wit"] {
            newest_source(&root.join(dir), &mut newest);
        }
        let stale = PLUGINS.iter().any(|p| {
            std::fs::metadata(out.join(format!("{p}.wasm"))).and_then(|m| m.modified()).map_or(true, |m| m < newest)
        });
        if stale {
            let status = std::process::Command::new("sh")
                .arg(root.join("plugins/build.sh"))
                .status()
                .expect("run plugins/build.sh");
            assert!(status.success(), "plugins/build.sh failed");
        }
        *built = true;
    }
    out.join(format!("{name}.wasm"))
}

/// A compile cache shared by the tests (one Cranelift compile per plugin per test run);
/// tests about the cache itself use their own temporary directory.
pub fn cache_dir() -> PathBuf {
    repo_root().join("target/keel-test-cache")
}

/// A hand-written WAT fixture from plugins/fixtures.
pub fn wat_fixture(name: &str) -> PathBuf {
    repo_root().join("plugins/fixtures").join(format!("{name}.wat"))
}

pub fn job() -> Job {
    Job {
        id: 7,
        name: "unit".into(),
        image: Image { name: "alpine:3.20".into(), ..Default::default() },
        services: vec![],
        variables: vec![
            Variable { key: "CI_JOB_ID".into(), value: "7".into(), masked: false, public: true, file: false },
            Variable { key: "DEPLOY_TOKEN".into(), value: "hunter2".into(), masked: true, public: false, file: false },
        ],
        stages: vec![Stage { name: "script".into(), lines: vec!["true".into()] }],
        timeout: None,
    }
}

/// A job pod like the host builds: build, helper and two services.
pub fn pod() -> Pod {
    let container =
        |name: &str, image: &str| Container { name: name.into(), image: Some(image.into()), ..Default::default() };
    Pod {
        metadata: ObjectMeta {
            name: Some("runner-7".into()),
            namespace: Some("ci".into()),
            labels: Some([("keel.dev/job".to_string(), "7".to_string())].into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![
                container("build", "alpine:3.20"),
                container("helper", "registry.example/keel-helper:1"),
                container("svc-0", "postgres:16"),
                container("svc-1", "redis:7"),
            ],
            restart_policy: Some("Never".into()),
            ..Default::default()
        }),
        status: None,
    }
}
