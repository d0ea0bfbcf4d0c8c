#![allow(dead_code)] // each test file uses a different part
//! Shared support for the end-to-end tests in `tests/e2e/*.rs`: where the workspace is, the
//! real `host` binary, and kubectl as an independent client.

pub mod git_server;
pub mod job;
pub mod moto;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ sits in the workspace root").to_path_buf()
}

/// The `host` binary cargo built for these tests (they are integration tests of the `host`
/// package, so the binary is built once, with the same dependency build as everything else).
pub fn host_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_host"))
}

/// kubectl against the given kubeconfig.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new("kubectl").arg("--kubeconfig").arg(kubeconfig).args(args).output().expect("run kubectl")
}

/// Stdout of a command that must have succeeded; otherwise fail with both streams.
pub fn succeeded(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({:?}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8 stdout")
}

/// The example busybox image (`make images`) as a docker-archive named `name`, written into `dir`.
pub fn busybox_archive(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join("busybox.tar");
    let script = workspace_root().join("examples/images/busybox-archive.sh");
    let status = Command::new("sh").arg(script).arg(&out).arg(name).status().expect("run busybox-archive.sh");
    assert!(status.success(), "busybox-archive.sh failed");
    out
}
