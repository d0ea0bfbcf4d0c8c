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
