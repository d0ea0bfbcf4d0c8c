//! How a container of a stored image runs: its defaults from the image's config, its user, and
//! a private writable root over the image's.

use std::path::Path;

use k8s_openapi::api::core::v1::{Container, Pod};

use super::StoredImage;
use super::config::resolve_user;
use crate::node::sandbox::{DEFAULT_PATH, OverlayMount};

/// What the image decides for one container, before the container's own spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageDefaults {
    /// The environment under the container's `env`: `PATH` (the image's, else the default),
    /// `HOSTNAME`, then the image's `Env`.
    pub env: Vec<(String, String)>,
    /// The container's `workingDir`, else the image's, else `/`.
    pub working_dir: String,
    /// `None`: the pod's root; else uid and gid (a user namespace of the container's own).
    pub user: Option<(u32, u32)>,
    /// The user's home from the image's passwd, for `HOME` when the environment has none.
    pub home: String,
}

/// `securityContext.runAsUser` and `runAsGroup` of `c`, the container's over the pod's.
fn run_as(pod: &Pod, c: &Container) -> (Option<i64>, Option<i64>) {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let sc = c.security_context.as_ref();
    let user = sc.and_then(|s| s.run_as_user).or_else(|| pod_sc.and_then(|s| s.run_as_user));
    let group = sc.and_then(|s| s.run_as_group).or_else(|| pod_sc.and_then(|s| s.run_as_group));
    (user, group)
}

/// The user of a container on the host's root filesystem: `runAsUser`/`runAsGroup` as for an
/// image, a missing group looked up in the host's `/etc/passwd` (the host is the image here).
/// `None`: root, as before any of them is set.
pub(crate) fn host_root_user(pod: &Pod, c: &Container) -> Result<Option<(u32, u32)>, String> {
    let spec = match run_as(pod, c) {
        (None, None) => return Ok(None),
        (Some(u), Some(g)) => format!("{u}:{g}"),
        (Some(u), None) => u.to_string(),
        (None, Some(g)) => format!("0:{g}"),
    };
    let resolved = resolve_user(Path::new("/"), &spec)?;
    Ok((resolved.uid != 0 || resolved.gid != 0).then_some((resolved.uid, resolved.gid)))
}

/// The image's defaults for `c`: `securityContext.runAsUser`/`runAsGroup` (container, then pod)
/// win over the image's `User`, which is looked up in the image's own `/etc/passwd`.
pub(crate) fn defaults(pod: &Pod, c: &Container, image: &StoredImage) -> Result<ImageDefaults, String> {
    let mut env = vec![
        ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
        ("HOSTNAME".to_owned(), pod.metadata.name.clone().unwrap_or_default()),
    ];
    for (k, v) in image.run.env() {
        env.retain(|(x, _)| *x != k);
        env.push((k, v));
    }
    let working_dir = c
        .working_dir
        .clone()
        .or_else(|| image.run.working_dir.clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    let (run_as_user, run_as_group) = run_as(pod, c);
    let user_spec = match (run_as_user, run_as_group) {
        (Some(u), Some(g)) => Some(format!("{u}:{g}")),
        (Some(u), None) => Some(u.to_string()),
        (None, Some(g)) => {
            Some(format!("{}:{g}", image.run.user.as_deref().unwrap_or("0").split(':').next().unwrap_or("0")))
        }
        (None, None) => image.run.user.clone().filter(|u| !u.is_empty()),
    };
    let resolved = resolve_user(&image.rootfs, user_spec.as_deref().unwrap_or("0"))?;
    let user = (resolved.uid != 0 || resolved.gid != 0).then_some((resolved.uid, resolved.gid));
    Ok(ImageDefaults { env, working_dir, user, home: resolved.home.unwrap_or_else(|| "/".into()) })
}

/// The kubelet's `/etc/hosts` (pod IP and hostname as this node has them), with the pod's
/// `hostAliases` appended as the kubelet appends them.
pub(crate) fn etc_hosts(hostname: &str, ip: &str, aliases: &[k8s_openapi::api::core::v1::HostAlias]) -> String {
    let mut hosts = format!(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n{ip}\t{hostname}\n"
    );
    let entries: Vec<_> = aliases.iter().filter(|a| a.hostnames.as_ref().is_some_and(|h| !h.is_empty())).collect();
    if !entries.is_empty() {
        hosts.push_str("\n# Entries added by HostAliases.\n");
        for a in entries {
            hosts.push_str(&format!("{}\t{}\n", a.ip, a.hostnames.as_deref().unwrap_or_default().join("\t")));
        }
    }
    hosts
}

/// Makes `dir/{upper,work,merged}` for a container's writable layer over the image's root, with
/// the `/etc/hosts` a kubelet gives every container in its upper layer.
pub(crate) fn writable_root(
    image: &StoredImage,
    dir: &Path,
    hosts: &str,
    resolv: Option<&str>,
) -> std::io::Result<OverlayMount> {
    if dir.exists() {
        super::remove_all(dir)?;
    }
    let o = OverlayMount {
        lower: image.rootfs.clone(),
        upper: dir.join("upper"),
        work: dir.join("work"),
        merged: dir.join("merged"),
    };
    for d in [&o.upper, &o.work, &o.merged] {
        std::fs::create_dir_all(d)?;
    }
    if image.rootfs.join("etc").is_dir() {
        std::fs::create_dir_all(o.upper.join("etc"))?;
        std::fs::write(o.upper.join("etc/hosts"), hosts)?;
        if let Some(resolv) = resolv {
            std::fs::write(o.upper.join("etc/resolv.conf"), resolv)?;
        }
    }
    Ok(o)
}
