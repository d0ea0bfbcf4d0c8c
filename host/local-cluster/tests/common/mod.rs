//! Shared helpers for the conformance tests: a real cluster per test, pods that run real
//! processes on the embedded node.
#![allow(dead_code)]

use k8s_openapi::api::core::v1::Pod;
use local_cluster::{ClusterOptions, LocalCluster};
use serde_json::json;

pub async fn cluster() -> LocalCluster {
    cluster_with(ClusterOptions::default()).await
}

pub async fn cluster_with(opts: ClusterOptions) -> LocalCluster {
    LocalCluster::start(opts).await.expect("local cluster starts")
}

/// A pod whose single container sleeps until it is stopped.
pub fn sleeper(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"suite": "conformance"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": "busybox", "command": ["sleep", "3600"]}]
        }
    }))
    .expect("valid pod")
}

/// Every process whose command line or environment mentions `marker`.
pub fn processes_mentioning(marker: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            ["cmdline", "environ"].iter().any(|f| {
                std::fs::read(format!("/proc/{pid}/{f}"))
                    .map(|b| b.windows(marker.len()).any(|w| w == marker.as_bytes()))
                    .unwrap_or(false)
            })
        })
        .collect()
}
