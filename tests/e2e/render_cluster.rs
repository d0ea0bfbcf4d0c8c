//! What `host render` prints is what a cluster accepts and runs: the rendered Secret, Pod and
//! Service are created with kubectl in the embedded cluster, and the pod's host-side plumbing
//! (env, the mounted variables Secret, a shell as PID 1) is checked from inside the build container.

use std::process::Command;

#[path = "../support/mod.rs"]
mod support;
use local_cluster::{ClusterOptions, LocalCluster};
use support::{host_bin, kubectl, succeeded};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_objects_are_created_and_the_pod_runs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.toml");
    // The embedded node runs images from the host's root filesystem, so any image name works;
    // the helper image is named explicitly to keep the default (a registry image) out of it.
    std::fs::write(
        &config,
        "[[runners]]\nexecutor = \"kubernetes\"\ntoken = \"glrt-clustertest\"\n[runners.kubernetes]\n\
         helper_image = \"alpine:3.20\"\ncpu_request = \"100m\"\n[runners.kubernetes.pod_labels]\nowner = \"$GITLAB_USER_LOGIN\"\n",
    )
    .expect("write config");
    let job = dir.path().join("job.yml");
    std::fs::write(
        &job,
        "image: alpine:3.20\nservices:\n  - name: alpine:3.20\n    alias: side\n    ports: [8080]\n\
         variables:\n  GITLAB_USER_LOGIN: alice\n  DOCKER_AUTH_CONFIG: '{\"auths\":{\"r.example.com\":{\"auth\":\"eDp5\"}}}'\n\
         script: [echo hi]\n",
    )
    .expect("write job");
    let rendered = dir.path().join("objects.yaml");
    let out = Command::new(host_bin())
        .args(["render", "--show-secrets", "--job-id", "5", "--plugin-cache"])
        .arg(dir.path().join("cache"))
        .arg("--config")
        .arg(&config)
        .arg(&job)
        .output()
        .expect("run host");
    std::fs::write(&rendered, succeeded(out, "host render")).expect("write objects");

    let cluster = LocalCluster::start(ClusterOptions::on_host_rootfs()).await.expect("start the embedded cluster");
    let kc = cluster.kubeconfig_path().to_path_buf();
    // Everything below runs on a blocking thread; the cluster is stopped whatever happens.
    let result = tokio::task::spawn_blocking(move || {
        let created = succeeded(kubectl(&kc, &["create", "-f", rendered.to_str().expect("utf-8")]), "kubectl create");
        assert!(created.contains("secret/") && created.contains("pod/") && created.contains("service/"), "{created}");
        let pod = succeeded(kubectl(&kc, &["get", "pods", "-l", "keel.dev/job-id=5", "-o", "name"]), "get pod")
            .trim()
            .to_string();
        assert!(pod.starts_with("pod/runner-clustert-project-1-concurrent-0-"), "{pod}");
        succeeded(
            kubectl(&kc, &["wait", &pod, "--for=jsonpath={.status.phase}=Running", "--timeout=120s"]),
            "wait for the pod to run",
        );
        // Expanded pod label, then the host's plumbing, seen from inside the build container.
        let owner = succeeded(kubectl(&kc, &["get", &pod, "-o", "jsonpath={.metadata.labels.owner}"]), "get label");
        assert_eq!(owner, "alice");
        let inside = succeeded(
            kubectl(
                &kc,
                &[
                    "exec",
                    &pod,
                    "-c",
                    "build",
                    "--",
                    "sh",
                    "-c",
                    "echo $CI_JOB_ID; test -r /keel-vars/env.sh && echo vars-mounted; cat /proc/1/comm",
                ],
            ),
            "exec into build",
        );
        let lines: Vec<&str> = inside.lines().collect();
        assert_eq!(lines.first(), Some(&"5"), "{inside}");
        assert_eq!(lines.get(1), Some(&"vars-mounted"), "the variables Secret is mounted for the scripts: {inside}");
        assert!(lines.get(2).is_some_and(|c| c.ends_with("sh")), "PID 1 of build is a shell: {inside}");
        let svc = succeeded(
            kubectl(&kc, &["get", "services", "-l", "keel.dev/job-id=5", "-o", "jsonpath={.items[0].spec.selector}"]),
            "get svc",
        );
        assert!(svc.contains("\"keel.dev/job-id\":\"5\""), "{svc}");
        succeeded(kubectl(&kc, &["delete", &pod, "--wait=false"]), "delete pod");
    })
    .await;
    cluster.stop().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic.into_panic());
    }
}
