//! Runs the pytest suite in `tests/python/` (official Python `kubernetes` client) against a
//! fresh cluster. Needs `python3 -m pip install kubernetes pytest`.

mod common;

#[tokio::test(flavor = "multi_thread")]
async fn python_client_conformance() {
    // A short watch history so the suite can push a version out of it and expect 410 Gone.
    let c = common::cluster_with(local_cluster::ClusterOptions {
        watch_history: Some(100),
        ..local_cluster::ClusterOptions::on_host_rootfs()
    })
    .await;
    let suite = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    let out = tokio::process::Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(&suite)
        .env("KUBECONFIG", c.kubeconfig_path())
        .kill_on_drop(true)
        .output()
        .await
        .expect("python3 runs");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    c.stop().await;
    assert!(out.status.success(), "pytest failed:\n{report}");
}
