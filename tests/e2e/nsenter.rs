//! The `nsenter` strategy end to end: the real `host` binary with `--strategy nsenter`
//! (`target/plugins/nsenter.wasm`) against the embedded cluster. The build container idles; every
//! stage is nsenter'd from the helper into it. Every test ends by checking that no pod, secret,
//! service or container process of the job is left.
//!
//! Images: without an image rootfs the embedded node runs a container on the host's root
//! (read-only, private /tmp), so build and helper would look alike. Where that matters the tests
//! give a container a small busybox rootfs of its own through the node's `images_dir`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use local_cluster::ClusterOptions;
use tokio::io::{AsyncBufReadExt, BufReader};

#[path = "../support/mod.rs"]
mod support;
use support::job::*;
use support::workspace_root;

const NSENTER: [&str; 2] = ["--strategy", "nsenter"];

/// Written into the build image's rootfs only: a stage that prints it runs in build's filesystem.
const IMAGE_STAMP: &str = "this is the build image";

/// A busybox root filesystem for image `name` below `images` (the node's `images_dir` naming),
/// with every applet linked in /bin except `without`, plus `files` (path, content).
fn busybox_image(images: &Path, name: &str, without: &[&str], files: &[(&str, &str)]) -> PathBuf {
    let root = images.join(name.replace(['/', ':'], "_"));
    for dir in ["bin", "dev", "proc", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(dir)).expect("mkdir in rootfs");
    }
    std::fs::copy("/usr/bin/busybox", root.join("bin/busybox")).expect("copy busybox (install the busybox package)");
    // Its shared libraries, at the paths the dynamic linker looks for them.
    let ldd = std::process::Command::new("ldd").arg("/usr/bin/busybox").output().expect("ldd");
    for lib in String::from_utf8_lossy(&ldd.stdout).split_whitespace().filter(|w| w.starts_with('/')) {
        let dest = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir lib dir");
        std::fs::copy(lib, &dest).expect("copy a library of busybox");
    }
    let list = std::process::Command::new("/usr/bin/busybox").arg("--list").output().expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !without.contains(&applet) {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    for (path, content) in files {
        let dest = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::write(dest, content).expect("write into rootfs");
    }
    root
}

/// A cluster whose node knows the images built by `images` (a function of the images dir).
async fn fixture_with_images(images: impl FnOnce(&Path)) -> (Fixture, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("images dir");
    images(dir.path());
    let f =
        Fixture::new(ClusterOptions { images_dir: Some(dir.path().to_path_buf()), ..ClusterOptions::on_host_rootfs() })
            .await;
    (f, dir)
}

/// The numbered lines `line 1` .. `line n` appear exactly once each, in order.
fn assert_numbered_lines(text: &str, n: usize) {
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("line ")).collect();
    let wanted: Vec<String> = (1..=n).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, wanted, "every numbered line once and in order:\n{text}");
}

const NUMBERED: &str = "for i in $(seq 1 300); do echo \"line $i\"; if [ $((i % 50)) = 0 ]; then sleep 0.1; fi; done";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbered_lines_and_exit_codes() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let ok = f.write("ok/job.yml", &format!("image: alpine:3.20\nscript:\n  - '{NUMBERED}'\n"));
    let out = f.run(&ok, &NSENTER).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("strategy nsenter"), "{text}");
    assert_numbered_lines(&text, 300);
    assert_eq!(last_line(&out), "Job succeeded");

    let failing = f.write(
        "fail/job.yml",
        &format!(
            "image: alpine:3.20\nscript:\n  - '{NUMBERED}'\n  - exit 7\n  - echo never\nafter_script:\n  - echo \"after ran\"\n"
        ),
    );
    let out = f.run(&failing, &NSENTER).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "a script failure exits 1: {text}");
    assert_numbered_lines(&text, 300);
    assert!(text.contains("$ exit 7") && !text.contains("\nnever\n"), "{text}");
    assert!(text.contains("\nafter ran\n"), "after_script ran: {text}");
    assert_eq!(last_line(&out), "ERROR: Job failed: exit code 7");
    f.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_script_sees_the_build_containers_filesystem_and_environment() {
    let (f, _images) = fixture_with_images(|dir| {
        // Build's image has no nsenter (the helper, on the host's root, has /usr/bin/nsenter).
        busybox_image(dir, "keel-e2e/build:1", &["nsenter"], &[("/etc/keel-image", IMAGE_STAMP)]);
    })
    .await;
    f.write("src/data/hello.txt", "hello from the sources\n");
    let config = f.write("config.toml", CONFIG_HELPER);
    let job = f.write(
        "src/job.yml",
        "image: keel-e2e/build:1\nvariables:\n  GREETING: from the job\n\
         script:\n  - cat /etc/keel-image\n  - cat data/hello.txt\n  - echo \"pwd=$(pwd) dir=$CI_PROJECT_DIR\"\n\
         \x20 - if [ -e /usr/bin/nsenter ]; then echo helper-filesystem; else echo no-helper-filesystem; fi\n\
         \x20 - echo \"greeting=$GREETING marker=$KEEL_NSENTER_CONTAINER\"\n\
         \x20 - echo \"pid1=$(tr '\\0' ' ' < /proc/1/cmdline)\"\n",
    );
    let out = f.run(&job, &["--strategy", "nsenter", "--config", config.to_str().expect("utf-8")]).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains(&format!("\n{IMAGE_STAMP}")), "the build image's file: {text}");
    assert!(text.contains("\nhello from the sources\n"), "sources in $CI_PROJECT_DIR: {text}");
    let dir_line = text.lines().find(|l| l.starts_with("pwd=")).expect("pwd line");
    let (pwd, dir) = dir_line.trim_start_matches("pwd=").split_once(" dir=").expect("two values");
    assert!(dir.starts_with("/builds/") && pwd == dir, "{dir_line}");
    assert!(text.contains("\nno-helper-filesystem\n"), "not the helper's filesystem: {text}");
    // Build's own environment (the marker only build has) plus the job's variables.
    assert!(text.contains("\ngreeting=from the job marker=build\n"), "{text}");
    // The pod shares one PID namespace: PID 1 is the pod's, not the stage's shell.
    assert!(!text.contains("\npid1=sh -s"), "{text}");
    f.assert_clean().await;
}

/// Host pids of processes whose command line is exactly `cmdline` (NUL-separated, as in /proc).
fn host_pids_running(cmdline: &[u8]) -> Vec<String> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == cmdline))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// A stage running `sleep 3217` until the host stops it (`stop`: SIGINT to the host, or the job's
/// timeout); after_script then lists what still runs, from inside build.
async fn stopped_mid_stage(timeout: Option<&str>, interrupt: bool) -> (Option<i32>, String, Vec<String>) {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let job = f.write(
        "job.yml",
        &format!(
            "image: alpine:3.20\n{}script:\n  - echo stage-started\n  - sleep 3217; echo survived\n\
             after_script:\n  - echo after-ran\n  - for d in /proc/[0-9]*; do c=$(tr '\\0' ' ' < $d/cmdline 2>/dev/null); case \"$c\" in 'sleep 3217 '*) echo \"alive ${{d#/proc/}}\";; esac; done; echo listed\n",
            timeout.map(|t| format!("timeout: {t}\n")).unwrap_or_default()
        ),
    );
    let mut child = f.command(&job, &NSENTER).spawn().expect("spawn host");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = String::new();
    read_lines(&mut reader, &mut seen, Some("stage-started")).await;
    assert!(seen.contains("stage-started"), "{seen}");
    // The stage's sleep runs (seen from the host's PID namespace) before it is stopped.
    let mut sleeping = Vec::new();
    for _ in 0..100 {
        sleeping = host_pids_running(b"sleep\x003217\x00");
        if !sleeping.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!sleeping.is_empty(), "the stage's sleep never started: {seen}");
    if interrupt {
        let pid = child.id().expect("pid") as i32;
        std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status().expect("kill -INT");
    }
    read_lines(&mut reader, &mut seen, None).await;
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait()).await.expect("host ends").expect("wait");
    eprintln!("{seen}");
    f.assert_clean().await;
    // Still running = the same command line and not a zombie waiting to be reaped (the node
    // reaps the last processes of a deleted pod a moment after the object is gone).
    let alive = |p: &String| {
        let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        cmd.starts_with(b"sleep\x003217\x00") && !status.lines().any(|l| l.starts_with("State:") && l.contains('Z'))
    };
    let mut still: Vec<String> = sleeping.clone();
    for _ in 0..50 {
        still = sleeping.iter().filter(|p| alive(p)).cloned().collect();
        if still.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (status.code(), seen, still)
}

fn assert_stage_stopped(seen: &str) {
    assert!(seen.contains("\nafter-ran\n") && seen.contains("\nlisted\n"), "after_script ran: {seen}");
    let after = seen.split("\nafter-ran\n").nth(1).unwrap_or_default();
    assert!(
        !after.lines().any(|l| l.starts_with("alive ")),
        "the stage's sleep still ran during after_script: {after}"
    );
    assert!(!seen.lines().any(|l| l == "survived"), "{seen}");
    assert!(!seen.contains("still alive after KILL") && !seen.contains("cannot stop"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_mid_stage_stops_its_processes_and_runs_after_script() {
    let (code, seen, still) = stopped_mid_stage(None, true).await;
    assert_eq!(code, Some(130), "cancelled exits 130: {seen}");
    assert!(still.is_empty(), "the stage's sleep outlived the job: {still:?}");
    assert_stage_stopped(&seen);
    assert!(seen.trim_end().ends_with("ERROR: Job failed: canceled"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_mid_stage_stops_its_processes_and_runs_after_script() {
    let (code, seen, still) = stopped_mid_stage(Some("4s"), false).await;
    assert_eq!(code, Some(3), "a timeout exits 3: {seen}");
    assert!(still.is_empty(), "the stage's sleep outlived the job: {still:?}");
    assert_stage_stopped(&seen);
    assert!(seen.trim_end().ends_with("ERROR: Job failed: execution took longer than 4 seconds"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nsenter_in_the_helper_the_job_fails_before_the_first_stage() {
    let helper = "keel-e2e/helper-without-nsenter:1";
    let (f, _images) = fixture_with_images(|dir| {
        busybox_image(dir, helper, &["nsenter"], &[]);
    })
    .await;
    let config = f.write(
        "config.toml",
        &format!("[[runners]]\nname = \"t\"\nexecutor = \"kubernetes\"\ntoken = \"glrt-e2e\"\n[runners.kubernetes]\nhelper_image = \"{helper}\"\n"),
    );
    let job =
        f.write("job.yml", "image: alpine:3.20\nscript:\n  - echo script-ran\nafter_script:\n  - echo after-ran\n");
    let out = f.run(&job, &["--strategy", "nsenter", "--config", config.to_str().expect("utf-8")]).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "a system failure: {text}");
    assert!(!text.contains("script-ran") && !text.contains("after-ran"), "no script ran: {text}");
    let last = last_line(&out);
    assert!(last.starts_with("ERROR: Job failed (system failure): "), "{last}");
    assert!(
        last.contains(&format!("(helper image {helper})")) && last.contains("has no `nsenter` in its PATH"),
        "names what is missing: {last}"
    );
    f.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_capability_the_job_fails_before_the_first_stage() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    // An operator's (or a policy's) drop wins over the strategy's add, as in containerd.
    let config = f.write(
        "config.toml",
        &format!(
            "{CONFIG_HELPER}[[runners.kubernetes.pod_spec]]\nname = \"no-sys-admin\"\npatch_type = \"strategic\"\n\
             patch = '''\ncontainers:\n  - name: helper\n    securityContext:\n      capabilities:\n        drop: [SYS_ADMIN]\n'''\n\
             [[runners.kubernetes.plugins]]\npath = \"{}\"\n",
            workspace_root().join("target/plugins/pod-spec.wasm").display()
        ),
    );
    let job = f.write("job.yml", "image: alpine:3.20\nscript:\n  - echo script-ran\n");
    let out = f.run(&job, &["--strategy", "nsenter", "--config", config.to_str().expect("utf-8")]).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "a system failure: {text}");
    assert!(!text.contains("script-ran"), "no script ran: {text}");
    let last = last_line(&out);
    assert!(last.contains("Operation not permitted") && last.contains("the helper lacks CAP_SYS_ADMIN"), "{last}");
    f.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busybox_helper_without_wdns_runs_the_stages() {
    let helper = "keel-e2e/busybox-helper:1";
    let (f, _images) = fixture_with_images(|dir| {
        busybox_image(dir, helper, &[], &[]);
    })
    .await;
    let config = f.write(
        "config.toml",
        &format!("[[runners]]\nname = \"t\"\nexecutor = \"kubernetes\"\ntoken = \"glrt-e2e\"\n[runners.kubernetes]\nhelper_image = \"{helper}\"\n"),
    );
    let job = f.write(
        "job.yml",
        &format!("image: alpine:3.20\nscript:\n  - '{NUMBERED}'\n  - test -x /usr/bin/nsenter\n  - exit 7\n"),
    );
    let out = f.run(&job, &["--strategy", "nsenter", "--config", config.to_str().expect("utf-8")]).await;
    let text = stdout(&out);
    // busybox's nsenter has no --wdns: the stage changes directory itself and still runs in
    // build (on the host's root here, so /usr/bin/nsenter is there, unlike in the helper).
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_numbered_lines(&text, 300);
    assert_eq!(last_line(&out), "ERROR: Job failed: exit code 7");
    f.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_stage_fails_never_succeeds() {
    let f = Fixture::new(ClusterOptions::on_host_rootfs()).await;
    let job = f.write(
        "job.yml",
        "image: alpine:3.20\nscript:\n  - echo ticking\n  - for i in $(seq 600); do sleep 0.1; done\n  - echo finished\n",
    );
    let (status, text, failed_after) = run_and_cut_once(&f, &job, &NSENTER).await;
    eprintln!("{text}\nconnection cut -> job failed in {failed_after:?} (aim: < 5 s)");
    assert_eq!(status.code(), Some(2), "{text}");
    assert!(!text.contains("finished") && !text.contains("Job succeeded"), "{text}");
    assert!(text.contains("lost the connection to the helper container"), "{text}");
    f.assert_clean().await;
}
