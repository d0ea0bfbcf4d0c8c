//! Real images on the embedded node: archives the tests write themselves (docker-archive and OCI
//! layout), loaded at start (`images_from`) or into a running cluster (`POST /keel/v1/images`),
//! then pods of them through kube-rs: the image's files and not the host's, its config applied
//! with Kubernetes' rules, a private writable root per container, the kubelet's image/imageID,
//! and containerd's words for an image no one has.
//!
//! The images' shell is the host's busybox (Debian package `busybox`, which CI installs) with
//! the shared libraries `ldd` names for it, so nothing else installed matters.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams, LogParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use local_cluster::node::{ImageGcPolicy, ImageGcReport};
use local_cluster::{ClusterOptions, LocalCluster};
use serde_json::json;
use sha2::{Digest, Sha256};

const TIMEOUT: Duration = Duration::from_secs(60);

/// One file of a layer: path, content, mode; a content starting with `->` is a symlink target.
type File = (&'static str, String, u32);

fn tar_of(files: &[File]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, content, mode) in files {
        append(&mut b, path, content, *mode, (0, 0));
    }
    b.into_inner().unwrap()
}

/// Appends one file, directory (a path ending in `/`) or symlink (content `->target`), owned
/// by `owner` (uid, gid).
fn append(b: &mut tar::Builder<Vec<u8>>, path: &str, content: &str, mode: u32, owner: (u64, u64)) {
    let mut h = tar::Header::new_gnu();
    h.set_mode(mode);
    h.set_uid(owner.0);
    h.set_gid(owner.1);
    h.set_mtime(1_700_000_000);
    if let Some(target) = content.strip_prefix("->") {
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, path, target).unwrap();
    } else if path.ends_with('/') {
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        b.append_data(&mut h, path, std::io::empty()).unwrap();
    } else {
        h.set_size(content.len() as u64);
        b.append_data(&mut h, path, content.as_bytes()).unwrap();
    }
}

/// The base layer: busybox with every applet in /bin, its libraries, passwd and group with a
/// user `app` (1234:2345, home /home/app), and files the next layer deletes.
fn base_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    let mut add_dir = |b: &mut tar::Builder<Vec<u8>>, dir: &Path| {
        for anc in dir.ancestors().collect::<Vec<_>>().into_iter().rev() {
            if anc.as_os_str().is_empty() || !dirs.insert(anc.to_path_buf()) {
                continue;
            }
            append(b, &format!("{}/", anc.display()), "", 0o755, (0, 0));
        }
    };
    let mut host_file = |b: &mut tar::Builder<Vec<u8>>, src: &str, dest: &str| {
        let dest = Path::new(dest.trim_start_matches('/'));
        add_dir(b, dest.parent().unwrap());
        b.append_path_with_name(src, dest).expect("a file of busybox (install the busybox package)");
    };
    host_file(&mut b, "/usr/bin/busybox", "bin/busybox");
    let ldd = std::process::Command::new("ldd").arg("/usr/bin/busybox").output().expect("ldd");
    for lib in String::from_utf8_lossy(&ldd.stdout).split_whitespace().filter(|w| w.starts_with('/')) {
        // Its real file, at the path the dynamic linker asks for.
        let real = std::fs::canonicalize(lib).unwrap();
        host_file(&mut b, real.to_str().unwrap(), lib);
    }
    let list = std::process::Command::new("/usr/bin/busybox").arg("--list").output().expect("busybox --list");
    let mut files: Vec<File> = Vec::new();
    for applet in String::from_utf8_lossy(&list.stdout).lines().filter(|a| *a != "busybox") {
        files.push((Box::leak(format!("bin/{applet}").into_boxed_str()), "->busybox".into(), 0o777));
    }
    files.extend([
        ("etc/", String::new(), 0o755),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1234:2345:App:/home/app:/bin/sh\n".into(), 0o644),
        ("etc/group", "root:x:0:\nstaff:x:50:app\napp:x:2345:\n".into(), 0o644),
        ("etc/staff-only", "for staff\n".into(), 0o640),
        ("etc/removed-later", "from the base layer\n".into(), 0o644),
        ("opt/", String::new(), 0o755),
        ("opt/replaced/", String::new(), 0o755),
        ("opt/replaced/old", "old\n".into(), 0o644),
        ("home/", String::new(), 0o755),
        ("home/app/", String::new(), 0o755),
        ("tmp/", String::new(), 0o1777),
        ("root/", String::new(), 0o700),
    ]);
    // Owners as an image has them: the user's home is the user's, a file only group staff reads.
    let owner = |path: &str| match path {
        "home/app/" => (1234, 2345),
        "etc/staff-only" => (0, 50),
        _ => (0, 0),
    };
    for (path, content, mode) in files {
        append(&mut b, path, &content, mode, owner(path));
    }
    b.into_inner().unwrap()
}

/// Prints what a test checks, one `key:value` per line.
const REPORT: &str = r#"#!/bin/sh
echo "args:$*"
echo "pwd:$(pwd)"
echo "id:$(id -u):$(id -g)"
echo "greeting:$GREETING"
echo "home:$HOME"
echo "hello:$(cat /app/hello.txt)"
test -e /etc/removed-later && echo "removed:present" || echo "removed:gone"
test -e /opt/replaced/old && echo "opaque:old-visible" || echo "opaque:old-hidden"
echo "new:$(cat /opt/replaced/new)"
test -e /etc/debian_version && echo "host:visible" || echo "host:hidden"
"#;

/// The app layer: a file, the report script, a whiteout and an opaque directory.
fn app_layer() -> Vec<u8> {
    tar_of(&[
        ("app/", String::new(), 0o755),
        ("app/hello.txt", "hello from the image".into(), 0o644),
        ("app/report.sh", REPORT.into(), 0o755),
        ("etc/", String::new(), 0o755),
        ("etc/.wh.removed-later", String::new(), 0o644),
        ("opt/", String::new(), 0o755),
        ("opt/replaced/", String::new(), 0o755),
        ("opt/replaced/.wh..wh..opq", String::new(), 0o644),
        ("opt/replaced/new", "new".into(), 0o644),
    ])
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn config(layers: &[Vec<u8>], user: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/app/report.sh"],
            "Cmd": ["from-cmd"],
            "Env": ["PATH=/bin", "GREETING=from-image"],
            "WorkingDir": "/app",
            "User": user
        },
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| sha256(l)).collect::<Vec<_>>()}
    }))
    .unwrap()
}

fn tar_file(b: &mut tar::Builder<impl Write>, path: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, path, data).unwrap();
}

/// `docker save`'s format (the pre-25 layout: `<id>/layer.tar`, `<config hex>.json`).
fn write_docker_archive(path: &Path, tag: &str) {
    write_docker_archive_with(path, tag, "app", Vec::new())
}

/// The same with another `User` and more layers on top.
fn write_docker_archive_with(path: &Path, tag: &str, user: &str, more: Vec<Vec<u8>>) {
    let mut layers = vec![base_layer(), app_layer()];
    layers.extend(more);
    let cfg = config(&layers, user);
    let cfg_name = format!("{}.json", sha256(&cfg).trim_start_matches("sha256:"));
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut layer_paths = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let p = format!("layer{i}/layer.tar");
        tar_file(&mut b, &p, l);
        layer_paths.push(p);
    }
    tar_file(&mut b, &cfg_name, &cfg);
    let manifest = json!([{"Config": cfg_name, "RepoTags": [tag], "Layers": layer_paths}]);
    tar_file(&mut b, "manifest.json", &serde_json::to_vec(&manifest).unwrap());
    b.finish().unwrap();
}

/// An OCI image layout with gzip layers and a multi-platform index (an arm64 entry first, whose
/// blobs are absent: only linux/amd64 must be read). Returns the index's digest.
fn write_oci_archive(path: &Path, name: &str) -> String {
    let layers = vec![base_layer(), app_layer()];
    let cfg = config(&layers, "app");
    let gz: Vec<Vec<u8>> = layers
        .iter()
        .map(|l| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(l).unwrap();
            e.finish().unwrap()
        })
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&cfg), "size": cfg.len()},
        "layers": gz.iter().map(|l| json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(l), "size": l.len()
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", "a".repeat(64)),
             "size": 1, "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(&manifest),
             "size": manifest.len(), "platform": {"architecture": "amd64", "os": "linux"}}
        ]
    }))
    .unwrap();
    let top = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": sha256(&index),
            "size": index.len(), "annotations": {"io.containerd.image.name": name}}]
    }))
    .unwrap();
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    tar_file(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    for blob in gz.iter().chain([&cfg, &manifest, &index]) {
        tar_file(&mut b, &format!("blobs/sha256/{}", sha256(blob).trim_start_matches("sha256:")), blob);
    }
    tar_file(&mut b, "index.json", &top);
    b.finish().unwrap();
    sha256(&index)
}

fn pod(name: &str, image: &str, container: serde_json::Value) -> Pod {
    let mut c = json!({"name": "main", "image": image});
    c.as_object_mut().unwrap().extend(container.as_object().unwrap().clone());
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [c]}
    }))
    .unwrap()
}

/// Runs the pod to its end and returns its log as `key -> value`, and the pod.
async fn run(pods: &Api<Pod>, p: Pod) -> (std::collections::BTreeMap<String, String>, Pod) {
    let name = p.metadata.name.clone().unwrap();
    pods.create(&PostParams::default(), &p).await.unwrap();
    let done = await_condition(pods.clone(), &name, |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref()?.phase.as_deref()).is_some_and(|ph| ph == "Succeeded" || ph == "Failed")
    });
    let pod = tokio::time::timeout(TIMEOUT, done).await.expect("the pod ends").unwrap().unwrap();
    let log = pods.logs(&name, &LogParams { container: Some("main".into()), ..Default::default() }).await.unwrap();
    let report = log.lines().filter_map(|l| l.split_once(':')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
    assert_eq!(pod.status.as_ref().unwrap().phase.as_deref(), Some("Succeeded"), "{log}\n{pod:?}");
    (report, pod)
}

fn container_status(p: &Pod) -> &k8s_openapi::api::core::v1::ContainerStatus {
    &p.status.as_ref().unwrap().container_statuses.as_ref().unwrap()[0]
}

async fn cluster_with_docker_archive(tag: &str, host_rootfs: bool) -> (LocalCluster, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    write_docker_archive(&dir.path().join("app.tar"), tag);
    let c = common::cluster_with(ClusterOptions {
        images_from: Some(dir.path().to_path_buf()),
        host_rootfs,
        backoff_base: Some(common::TEST_BACKOFF),
        ..ClusterOptions::default()
    })
    .await;
    (c, dir)
}

#[tokio::test]
async fn a_pod_of_a_loaded_image_runs_on_its_filesystem_with_its_config() {
    let (cluster, _dir) = cluster_with_docker_archive("keel-test/app:1.0", true).await;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    let (r, p) = run(&pods, pod("plain", "keel-test/app:1.0", json!({}))).await;
    // Entrypoint and Cmd, WorkingDir, User by name from the image's passwd (uid, gid, HOME), Env.
    assert_eq!(r["args"], "from-cmd");
    assert_eq!(r["pwd"], "/app");
    assert_eq!(r["id"], "1234:2345");
    assert_eq!(r["home"], "/home/app");
    assert_eq!(r["greeting"], "from-image");
    // The image's files, its whiteouts and opaque directory applied; none of the host's.
    assert_eq!(r["hello"], "hello from the image");
    assert_eq!(r["removed"], "gone");
    assert_eq!(r["opaque"], "old-hidden");
    assert_eq!(r["new"], "new");
    assert_eq!(r["host"], "hidden");
    // As a kubelet on containerd reports them.
    let cs = container_status(&p);
    assert_eq!(cs.image, "docker.io/keel-test/app:1.0");
    let digest = cs.image_id.strip_prefix("docker.io/keel-test/app@sha256:").expect(&cs.image_id);
    assert!(digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()), "{}", cs.image_id);
    cluster.stop().await;
}

#[tokio::test]
async fn command_args_env_workdir_and_run_as_user_override_the_image() {
    let (cluster, _dir) = cluster_with_docker_archive("keel-test/app:1.0", true).await;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    // args replace Cmd only; the container's env wins over the image's; its workingDir and
    // runAsUser over the image's.
    let spec = json!({
        "args": ["from-args"],
        "env": [{"name": "GREETING", "value": "from-pod"}],
        "workingDir": "/opt",
        "securityContext": {"runAsUser": 0}
    });
    let (r, _) = run(&pods, pod("args", "keel-test/app:1.0", spec)).await;
    assert_eq!((r["args"].as_str(), r["greeting"].as_str()), ("from-args", "from-pod"));
    assert_eq!((r["pwd"].as_str(), r["id"].as_str(), r["home"].as_str()), ("/opt", "0:0", "/root"));
    // command replaces the entrypoint and drops Cmd.
    let spec = json!({"command": ["/bin/sh", "-c", "echo \"args:$0 $*\"", "zero"]});
    let (r, _) = run(&pods, pod("command", "keel-test/app:1.0", spec)).await;
    assert_eq!(r["args"], "zero ");
    // command and args together.
    let spec = json!({"command": ["/app/report.sh"], "args": ["a", "b"]});
    let (r, _) = run(&pods, pod("both", "keel-test/app:1.0", spec)).await;
    assert_eq!(r["args"], "a b");
    cluster.stop().await;
}

#[tokio::test]
async fn each_container_writes_to_a_private_root_of_its_own() {
    let (cluster, _dir) = cluster_with_docker_archive("keel-test/app:1.0", true).await;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    // As root: the image's user may not write root's directories (see
    // an_images_user_has_its_groups_and_the_files_it_owns).
    let write = json!({"command": ["/bin/sh", "-c",
        "echo mine > /etc/written && rm /app/hello.txt && echo \"wrote:$(cat /etc/written)\" && \
         test ! -e /app/hello.txt && echo deleted:yes && mkdir -p /var/new && echo mkdir:yes"],
        "securityContext": {"runAsUser": 0}});
    let (r, _) = run(&pods, pod("writer", "keel-test/app:1.0", write)).await;
    assert_eq!((r["wrote"].as_str(), r["deleted"].as_str(), r["mkdir"].as_str()), ("mine", "yes", "yes"));
    // Another container of the image sees the image as it was.
    let read = json!({"command": ["/bin/sh", "-c",
        "test -e /etc/written && echo written:seen || echo written:unseen; echo \"hello:$(cat /app/hello.txt)\""]});
    let (r, _) = run(&pods, pod("reader", "keel-test/app:1.0", read)).await;
    assert_eq!((r["written"].as_str(), r["hello"].as_str()), ("unseen", "hello from the image"));
    cluster.stop().await;
}

#[tokio::test]
async fn exec_runs_as_the_images_user_in_its_root() {
    let (cluster, _dir) = cluster_with_docker_archive("keel-test/app:1.0", true).await;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    let out = exec_in_a_sleeper(&pods, "sleeper", "echo $(id -u):$(id -g):$(pwd):$(cat /app/hello.txt)").await;
    assert_eq!(out.trim(), "1234:2345:/app:hello from the image");
    cluster.stop().await;
}

/// Starts a pod `name` of the app image that sleeps, and returns what `sh -c script` execed in
/// it prints.
async fn exec_in_a_sleeper(pods: &Api<Pod>, name: &str, script: &str) -> String {
    let p = pod(name, "keel-test/app:1.0", json!({"command": ["sleep", "3600"]}));
    pods.create(&PostParams::default(), &p).await.unwrap();
    tokio::time::timeout(TIMEOUT, await_condition(pods.clone(), name, conditions::is_pod_running()))
        .await
        .expect("running")
        .unwrap();
    let params = AttachParams::default().stdout(true).stderr(false);
    let mut proc = pods.exec(name, ["sh", "-c", script], &params).await.unwrap();
    let mut bytes = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut proc.stdout().unwrap(), &mut bytes).await.unwrap();
    proc.join().await.unwrap();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// As root the node runs an image's user as containerd does: really that uid and gid, with the
/// groups the image's `/etc/group` gives it and the pod's `supplementalGroups`, on files with
/// their real owners (its home is its own, root's files are not). Its execs are the same.
#[tokio::test]
async fn an_images_user_has_its_groups_and_the_files_it_owns() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: supplementary groups are set only when the node runs as root");
        return;
    }
    let (cluster, _dir) = cluster_with_docker_archive("keel-test/app:1.0", true).await;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    const CHECK: &str = "echo \"id:$(id -u):$(id -g):$(id -G | tr ' ' ,)\"; \
        cat /etc/staff-only >/dev/null && echo staff:read || echo staff:denied; \
        touch /home/app/mine && echo home:written || echo home:denied; \
        touch /etc/mine 2>/dev/null && echo etc:written || echo etc:denied; \
        echo \"owner:$(stat -c %u:%g /home/app/mine 2>/dev/null)\"";
    let mut p = pod("groups", "keel-test/app:1.0", json!({"command": ["sh", "-c", CHECK]}));
    p.spec.as_mut().unwrap().security_context =
        Some(serde_json::from_value(json!({"supplementalGroups": [4000]})).unwrap());
    let (r, _) = run(&pods, p).await;
    assert_eq!(r["id"], "1234:2345:2345,50,4000");
    assert_eq!((r["staff"].as_str(), r["home"].as_str(), r["etc"].as_str()), ("read", "written", "denied"));
    assert_eq!(r["owner"], "1234:2345");

    let out = exec_in_a_sleeper(&pods, "exec-groups", CHECK).await;
    assert!(
        out.contains("id:1234:2345:2345,50\n") && out.contains("staff:read") && out.contains("etc:denied"),
        "{out}"
    );
    assert!(out.contains("home:written") && out.contains("owner:1234:2345"), "{out}");
    cluster.stop().await;

    // A data dir others may not pass through (under a private home): the user's sandbox could
    // not reach the image's root, so the user runs mapped to the pod's root, without groups.
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let archives = tempfile::tempdir().unwrap();
    write_docker_archive(&archives.path().join("app.tar"), "keel-test/app:1.0");
    let cluster = common::cluster_with(ClusterOptions {
        images_from: Some(archives.path().to_path_buf()),
        data_dir: Some(private.path().join("cluster")),
        ..ClusterOptions::on_host_rootfs()
    })
    .await;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    let (r, _) = run(&pods, pod("private", "keel-test/app:1.0", json!({"command": ["sh", "-c", CHECK]}))).await;
    assert_eq!(r["id"], "1234:2345:2345");
    cluster.stop().await;
}

#[tokio::test]
async fn without_the_host_rootfs_an_image_not_in_the_store_is_pulled_and_fails_with_containerds_words() {
    let (cluster, _dir) = cluster_with_docker_archive("keel-test/app:1.0", false).await;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    // A registry no one listens on (the discard port): the pull fails at once, with no network.
    let absent = "127.0.0.1:9/x:1";
    pods.create(&PostParams::default(), &pod("absent", absent, json!({"command": ["true"]}))).await.unwrap();
    let reason = |want: &'static str| {
        move |p: Option<&Pod>| {
            p.and_then(|p| p.status.as_ref()?.container_statuses.as_ref()?.first()?.state.as_ref()?.waiting.clone())
                .is_some_and(|w| w.reason.as_deref() == Some(want))
        }
    };
    let p = tokio::time::timeout(TIMEOUT, await_condition(pods.clone(), "absent", reason("ErrImagePull")))
        .await
        .expect("ErrImagePull")
        .unwrap()
        .unwrap();
    let waiting = container_status(&p).state.as_ref().unwrap().waiting.clone().unwrap();
    let msg = waiting.message.unwrap_or_default();
    let want = format!(
        "failed to pull and unpack image {absent:?}: failed to resolve reference {absent:?}: failed to do request: "
    );
    assert!(msg.starts_with(&want), "{msg}");
    tokio::time::timeout(TIMEOUT, await_condition(pods.clone(), "absent", reason("ImagePullBackOff")))
        .await
        .expect("ImagePullBackOff")
        .unwrap();
    // The stored image still runs.
    let (r, _) = run(&pods, pod("stored", "keel-test/app:1.0", json!({}))).await;
    assert_eq!(r["hello"], "hello from the image");
    cluster.stop().await;
}

#[tokio::test]
async fn an_oci_archive_loads_into_a_running_cluster_through_the_api() {
    let cluster = common::cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("oci.tar");
    let index_digest = write_oci_archive(&archive, "registry.example:5000/team/app:v2");
    let body = std::fs::read(&archive).unwrap();
    let request = || {
        axum::http::Request::post("/keel/v1/images")
            .header("content-type", "application/x-tar")
            .body(body.clone())
            .unwrap()
    };

    // Without credentials: refused like the rest of the API.
    let mut anonymous = kube::Config::new(cluster.url().parse().unwrap());
    anonymous.root_cert = Some(vec![cluster.ca_der().unwrap().to_vec()]);
    let anonymous = kube::Client::try_from(anonymous).unwrap();
    let err = anonymous.request_text(request()).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 401), "{err:?}");

    let client = cluster.client().unwrap();
    let answer: serde_json::Value = client.request(request()).await.unwrap();
    assert_eq!(answer["images"][0]["names"], json!(["registry.example:5000/team/app:v2"]));
    assert_eq!(answer["images"][0]["repoDigest"], json!(index_digest));

    // Larger than any API object may be (3 MiB): archives are streamed to disk.
    let docker = dir.path().join("docker.tar");
    let padding = tar_of(&[("padding", "x".repeat(1024 * 1024), 0o644)]);
    write_docker_archive_with(&docker, "keel-test/big:1", "app", vec![padding]);
    let big = std::fs::read(&docker).unwrap();
    assert!(big.len() > 3 * 1024 * 1024, "{}", big.len());
    let answer: serde_json::Value =
        client.request(axum::http::Request::post("/keel/v1/images").body(big).unwrap()).await.unwrap();
    assert_eq!(answer["images"][0]["names"], json!(["docker.io/keel-test/big:1"]));

    // Not an archive: a 400 that says why.
    let bad = axum::http::Request::post("/keel/v1/images").body(b"not a tar".to_vec()).unwrap();
    let err = client.request_text(bad).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 400 && s.message.contains("image archive")), "{err:?}");

    let pods: Api<Pod> = Api::default_namespaced(client);
    let (r, p) = run(&pods, pod("oci", "registry.example:5000/team/app:v2", json!({}))).await;
    assert_eq!(
        (r["hello"].as_str(), r["id"].as_str(), r["host"].as_str()),
        ("hello from the image", "1234:2345", "hidden")
    );
    let cs = container_status(&p);
    assert_eq!(cs.image, "registry.example:5000/team/app:v2");
    assert_eq!(cs.image_id, format!("registry.example:5000/team/app@{index_digest}"));
    // By digest, as a pod may name it.
    let by_digest = format!("registry.example:5000/team/app@{index_digest}");
    let (r, _) = run(&pods, pod("by-digest", &by_digest, json!({}))).await;
    assert_eq!(r["hello"], "hello from the image");
    cluster.stop().await;
}

/// The same as an ordinary user (the node's user namespaces, overlayfs mounted in one). As root
/// (CI) the scenario runs in a copy of this test binary under `setpriv` as uid 65534, whose
/// temp dir must be empty afterwards (containers' writable layers removed with their pods).
#[test]
fn images_run_as_an_unprivileged_user() {
    if !common::is_root() {
        return tokio::runtime::Runtime::new().unwrap().block_on(unprivileged_scenario_body());
    }
    use std::os::unix::fs::PermissionsExt;
    const NOBODY: u32 = 65534;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("images-test");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args([format!("--reuid={NOBODY}"), format!("--regid={NOBODY}")])
        .args(["--clear-groups", "--inh-caps=-all"])
        .arg(&exe)
        .args(["--exact", "unprivileged_scenario", "--ignored", "--nocapture", "--test-threads=1"])
        .current_dir(&home)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &home)
        .env("TMPDIR", &home)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("setpriv (util-linux) runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the scenario failed as uid {NOBODY} ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("1 passed"), "the scenario did not run:\n{stdout}\n{stderr}");
    let left: Vec<_> = std::fs::read_dir(&home).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "the scenario left files behind: {left:?}");
}

#[test]
#[ignore = "run by images_run_as_an_unprivileged_user"]
fn unprivileged_scenario() {
    tokio::runtime::Runtime::new().unwrap().block_on(unprivileged_scenario_body());
}

async fn unprivileged_scenario_body() {
    let (cluster, dir) = cluster_with_docker_archive("keel-test/app:1.0", true).await;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    let (r, _) = run(&pods, pod("plain", "keel-test/app:1.0", json!({}))).await;
    assert_eq!((r["id"].as_str(), r["pwd"].as_str(), r["greeting"].as_str()), ("1234:2345", "/app", "from-image"));
    assert_eq!(
        (r["hello"].as_str(), r["removed"].as_str(), r["host"].as_str()),
        ("hello from the image", "gone", "hidden")
    );
    let write = json!({"command": ["/bin/sh", "-c", "rm /app/hello.txt && echo x > /etc/x && echo wrote:yes"],
        "securityContext": {"runAsUser": 0}});
    let (r, _) = run(&pods, pod("writer", "keel-test/app:1.0", write)).await;
    assert_eq!(r["wrote"], "yes");
    let (r, _) = run(&pods, pod("reader", "keel-test/app:1.0", json!({}))).await;
    assert_eq!(r["hello"], "hello from the image");
    for name in ["plain", "writer", "reader"] {
        pods.delete(name, &Default::default()).await.unwrap();
    }
    cluster.stop().await;
    drop(dir);
}

/// `examples/images/busybox-archive.sh`, the image `make run` can use, loads and runs.
#[tokio::test]
async fn the_example_busybox_archive_runs() {
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/images/busybox-archive.sh");
    let out = std::process::Command::new("sh")
        .arg(script)
        .arg(dir.path().join("busybox.tar"))
        .arg("keel-examples/busybox:1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cluster = common::cluster_with(ClusterOptions {
        images_from: Some(dir.path().to_path_buf()),
        host_rootfs: false,
        ..Default::default()
    })
    .await;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    let spec = json!({"command": ["sh", "-c",
        "echo \"id:$(id -u)\"; echo \"home:$HOME\"; test -e /etc/debian_version && echo host:visible || echo host:hidden"]});
    let (r, p) = run(&pods, pod("example", "keel-examples/busybox:1", spec)).await;
    assert_eq!((r["id"].as_str(), r["home"].as_str(), r["host"].as_str()), ("0", "/root", "hidden"));
    assert_eq!(container_status(&p).image, "docker.io/keel-examples/busybox:1");
    cluster.stop().await;
}

/// Digests are checked: a file an OCI layout names by digest must have it, and a layer must be
/// what the config's diff IDs say. A refused archive adds nothing to the store.
#[tokio::test]
async fn tampered_archives_are_refused() {
    let cluster = common::cluster_with(ClusterOptions { host_rootfs: false, ..Default::default() }).await;
    let dir = tempfile::tempdir().unwrap();

    // An OCI layout whose config blob is not what its name says.
    let good = dir.path().join("good.tar");
    write_oci_archive(&good, "keel-test/tampered:1");
    let tampered = dir.path().join("tampered-blob.tar");
    let mut out = tar::Builder::new(std::fs::File::create(&tampered).unwrap());
    let mut input = tar::Archive::new(std::fs::File::open(&good).unwrap());
    for e in input.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        if data.starts_with(br#"{"architecture""#) {
            data = String::from_utf8(data).unwrap().replace("from-image", "from-tamper").into_bytes();
        }
        tar_file(&mut out, &path, &data);
    }
    out.finish().unwrap();
    let err = cluster.load_image_archive(&tampered).await.unwrap_err().to_string();
    assert!(err.contains("digest mismatch"), "{err}");

    // A docker-archive whose layers are listed in the wrong order: neither is the first diff ID.
    let docker = dir.path().join("docker.tar");
    write_docker_archive(&docker, "keel-test/tampered:2");
    let swapped = dir.path().join("swapped.tar");
    let mut out = tar::Builder::new(std::fs::File::create(&swapped).unwrap());
    let mut input = tar::Archive::new(std::fs::File::open(&docker).unwrap());
    for e in input.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        if path == "manifest.json" {
            data = String::from_utf8(data)
                .unwrap()
                .replace("layer0/", "layerX/")
                .replace("layer1/", "layer0/")
                .replace("layerX/", "layer1/")
                .into_bytes();
        }
        tar_file(&mut out, &path, &data);
    }
    out.finish().unwrap();
    let err = cluster.load_image_archive(&swapped).await.unwrap_err().to_string();
    assert!(err.contains("layer digest mismatch"), "{err}");

    // Neither image can run.
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    for (name, image) in [("one", "keel-test/tampered:1"), ("two", "keel-test/tampered:2")] {
        pods.create(&PostParams::default(), &pod(name, image, json!({}))).await.unwrap();
        let pulled_failed = |p: Option<&Pod>| {
            p.and_then(|p| p.status.as_ref()?.container_statuses.as_ref()?.first()?.state.as_ref()?.waiting.clone())
                .is_some_and(|w| w.reason.as_deref() == Some("ErrImagePull"))
        };
        tokio::time::timeout(TIMEOUT, await_condition(pods.clone(), name, pulled_failed)).await.expect(name).unwrap();
    }
    cluster.stop().await;
}

/// Volumes mount into the image's root at paths it lacks (as a job's `/builds/...`), writable
/// by the image's user; a configMap volume read-only.
#[tokio::test]
async fn volumes_mount_into_the_images_root() {
    let (cluster, _dir) = cluster_with_docker_archive("keel-test/app:1.0", true).await;
    let client = cluster.client().unwrap();
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::default_namespaced(client.clone());
    let cm = serde_json::from_value(json!({"metadata": {"name": "conf"}, "data": {"key": "from-configmap"}})).unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client);
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": "volumes"},
        "spec": {
            "restartPolicy": "Never",
            "volumes": [{"name": "builds", "emptyDir": {}}, {"name": "conf", "configMap": {"name": "conf"}}],
            "containers": [{
                "name": "main", "image": "keel-test/app:1.0",
                "workingDir": "/builds/group/project",
                "command": ["/bin/sh", "-c",
                    "echo made > file && echo \"wrote:$(cat /builds/group/project/file)\"; \
                     echo \"pwd:$(pwd)\"; echo \"conf:$(cat /etc/conf/key)\"; echo \"id:$(id -u)\"; \
                     echo \"hello:$(cat /app/hello.txt)\""],
                "volumeMounts": [{"name": "builds", "mountPath": "/builds"}, {"name": "conf", "mountPath": "/etc/conf"}],
                "securityContext": {"runAsUser": 0}
            }, {
                "name": "user", "image": "keel-test/app:1.0",
                "command": ["/bin/sh", "-c", "sleep 1; echo \"user:$(id -u):$(cat /builds/group/project/file)\""],
                "volumeMounts": [{"name": "builds", "mountPath": "/builds"}]
            }]
        }
    }))
    .unwrap();
    let (r, _) = run(&pods, p).await;
    assert_eq!((r["wrote"].as_str(), r["pwd"].as_str()), ("made", "/builds/group/project"));
    assert_eq!(
        (r["conf"].as_str(), r["id"].as_str(), r["hello"].as_str()),
        ("from-configmap", "0", "hello from the image")
    );
    let user_log =
        pods.logs("volumes", &LogParams { container: Some("user".into()), ..Default::default() }).await.unwrap();
    assert_eq!(user_log.trim(), "user:1234:made");
    cluster.stop().await;
}

/// A cluster started again on a kept data dir still has the images loaded into it.
#[tokio::test]
async fn a_kept_data_dir_keeps_its_images() {
    let data = tempfile::tempdir().unwrap();
    let opts =
        || ClusterOptions { data_dir: Some(data.path().to_path_buf()), host_rootfs: false, ..Default::default() };
    let first = common::cluster_with(opts()).await;
    let archive = data.path().join("app.tar");
    write_docker_archive(&archive, "keel-test/kept:1");
    first.load_image_archive(&archive).await.unwrap();
    first.stop().await;
    std::fs::remove_file(&archive).unwrap();

    let second = common::cluster_with(opts()).await;
    let pods: Api<Pod> = Api::default_namespaced(second.client().unwrap());
    let (r, _) = run(&pods, pod("kept", "keel-test/kept:1", json!({}))).await;
    assert_eq!(r["hello"], "hello from the image");
    second.stop().await;
}

/// An image whose `User` its passwd lacks cannot be created: CreateContainerError, with
/// containerd's words.
#[tokio::test]
async fn an_image_user_missing_from_its_passwd_is_a_create_error() {
    let dir = tempfile::tempdir().unwrap();
    write_docker_archive_with(&dir.path().join("ghost.tar"), "keel-test/ghost:1", "ghost", Vec::new());
    let cluster = common::cluster_with(ClusterOptions {
        images_from: Some(dir.path().to_path_buf()),
        ..ClusterOptions::on_host_rootfs()
    })
    .await;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    pods.create(&PostParams::default(), &pod("ghost", "keel-test/ghost:1", json!({}))).await.unwrap();
    let create_error = |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref()?.container_statuses.as_ref()?.first()?.state.as_ref()?.waiting.clone())
            .is_some_and(|w| w.reason.as_deref() == Some("CreateContainerError"))
    };
    let p = tokio::time::timeout(TIMEOUT, await_condition(pods.clone(), "ghost", create_error))
        .await
        .expect("CreateContainerError")
        .unwrap()
        .unwrap();
    let waiting = container_status(&p).state.as_ref().unwrap().waiting.clone().unwrap();
    assert_eq!(waiting.message.as_deref(), Some("unable to find user ghost: no matching entries in passwd file"));
    // The image's user given as a number need not exist.
    let (r, _) = run(&pods, pod("numeric", "keel-test/ghost:1", json!({"securityContext": {"runAsUser": 4321}}))).await;
    assert_eq!((r["id"].as_str(), r["home"].as_str()), ("4321:0", "/"));
    cluster.stop().await;
}

/// Image garbage collection as the kubelet's: above the high threshold, unused images go with
/// their root and the layers and blobs no other image shares; an image a pod still has stays
/// until the pod is gone.
#[tokio::test]
async fn unused_images_are_garbage_collected_and_images_in_use_kept() {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_docker_archive(&dir.path().join("a.tar"), "keel-test/gc-a:1");
    // B shares A's two layers and has one of its own.
    let extra = tar_of(&[("extra/", String::new(), 0o755), ("extra/only-b", "b".into(), 0o644)]);
    write_docker_archive_with(&dir.path().join("b.tar"), "keel-test/gc-b:1", "app", vec![extra.clone()]);
    let cluster = common::cluster_with(ClusterOptions {
        data_dir: Some(data.path().to_path_buf()),
        images_from: Some(dir.path().to_path_buf()),
        // Always above the high threshold and never down to the low one: every unused image goes.
        image_gc: ImageGcPolicy {
            high_threshold: 0,
            low_threshold: 0,
            min_age: Duration::ZERO,
            period: Duration::from_secs(3600),
        },
        ..ClusterOptions::default()
    })
    .await;
    let store = data.path().join("node/images");
    let hex = |b: &[u8]| sha256(b).trim_start_matches("sha256:").to_owned();
    let layer = |b: &[u8]| store.join("layers").join(hex(b));
    let roots = || {
        std::fs::read_dir(store.join("roots"))
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .count()
    };
    assert_eq!(roots(), 2);

    let pods: Api<Pod> = Api::default_namespaced(cluster.client().unwrap());
    pods.create(&PostParams::default(), &pod("holder", "keel-test/gc-a:1", json!({"command": ["sleep", "300"]})))
        .await
        .unwrap();
    tokio::time::timeout(TIMEOUT, await_condition(pods.clone(), "holder", conditions::is_pod_running()))
        .await
        .expect("the holder runs")
        .unwrap();

    let deleted = |r: &ImageGcReport| r.deleted.iter().map(|(_, names)| names.clone()).collect::<Vec<_>>();
    let report = cluster.collect_images().await.unwrap();
    assert_eq!(deleted(&report), [["docker.io/keel-test/gc-b:1"]], "only the unused image: {report:?}");
    assert!(!layer(&extra).exists(), "B's own layer is gone");
    assert!(layer(&base_layer()).exists() && layer(&app_layer()).exists(), "the layers A shares stay");
    assert!(!store.join("blobs/sha256").join(hex(&extra)).exists(), "B's own blob is gone");
    assert_eq!(roots(), 1);
    // B is no longer on the node: a pod that may not pull it cannot start.
    pods.create(&PostParams::default(), &pod("b-again", "keel-test/gc-b:1", json!({"imagePullPolicy": "Never"})))
        .await
        .unwrap();
    let never_pull = |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref()?.container_statuses.as_ref()?.first()?.state.as_ref()?.waiting.clone())
            .is_some_and(|w| w.reason.as_deref() == Some("ErrImageNeverPull"))
    };
    tokio::time::timeout(TIMEOUT, await_condition(pods.clone(), "b-again", never_pull))
        .await
        .expect("ErrImageNeverPull")
        .unwrap();

    // The holder gone, A goes too, and the store is empty.
    for name in ["holder", "b-again"] {
        pods.delete(name, &Default::default()).await.unwrap();
        tokio::time::timeout(TIMEOUT, await_condition(pods.clone(), name, |p: Option<&Pod>| p.is_none()))
            .await
            .expect("the pod is gone")
            .unwrap();
    }
    let report = cluster.collect_images().await.unwrap();
    assert_eq!(deleted(&report), [["docker.io/keel-test/gc-a:1"]], "{report:?}");
    assert_eq!(roots(), 0);
    assert!(!layer(&base_layer()).exists() && !layer(&app_layer()).exists());
    cluster.stop().await;
}
