//! How a container of a stored image runs: its defaults from the image's config, its user, and
//! a private writable root over the image's.

use std::path::Path;

use k8s_openapi::api::core::v1::{Container, Pod};

use super::StoredImage;
use super::config::resolve_user;
use crate::node::sandbox::{DEFAULT_PATH, Identity, OverlayMount};

/// What the image decides for one container, before the container's own spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageDefaults {
    /// The environment under the container's `env`: `PATH` (the image's, else the default),
    /// `HOSTNAME`, then the image's `Env`.
    pub env: Vec<(String, String)>,
    /// The container's `workingDir`, else the image's, else `/`.
    pub working_dir: String,
    /// Who the container's process is.
    pub identity: Identity,
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
pub(crate) fn host_root_identity(pod: &Pod, c: &Container) -> Result<Identity, String> {
    let spec = match run_as(pod, c) {
        (None, None) => "0".to_owned(),
        (Some(u), Some(g)) => format!("{u}:{g}"),
        (Some(u), None) => u.to_string(),
        (None, Some(g)) => format!("0:{g}"),
    };
    Ok(identity(pod, resolve_user(Path::new("/"), &spec)?))
}

/// The process's identity from the resolved user, with the pod's `supplementalGroups` and
/// `fsGroup` added to its groups, as the kubelet adds them.
fn identity(pod: &Pod, resolved: super::config::User) -> Identity {
    let mut groups = resolved.groups;
    let sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let extra = sc.and_then(|s| s.supplemental_groups.clone()).unwrap_or_default();
    for g in extra.into_iter().chain(sc.and_then(|s| s.fs_group)) {
        if let Ok(g) = u32::try_from(g)
            && !groups.contains(&g)
        {
            groups.push(g);
        }
    }
    let user = (resolved.uid != 0 || resolved.gid != 0).then_some((resolved.uid, resolved.gid));
    Identity { user, groups }
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
    let home = resolved.home.clone().unwrap_or_else(|| "/".into());
    Ok(ImageDefaults { env, working_dir, identity: identity(pod, resolved), home })
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

/// Creates, in the container's writable layer, every mount point its sandbox needs that the
/// image lacks (`/dev`, `/proc`, the mountPaths, the working directory), as root and owned by
/// root, as runc creates them. A container of a real user (see `sandbox::UserMode::Real`) has
/// its sandbox built by that user, who may not write the image's directories. Paths resolve
/// inside the image's root (its symlinks followed there, as runc's securejoin does); a path
/// through a file is left for the sandbox to refuse. `dests`: (path, whether a file is bound).
pub(crate) fn make_mount_points(o: &OverlayMount, dests: &[(String, bool)]) -> std::io::Result<()> {
    for (dest, file) in dests {
        let Some((target, false)) = resolve_in_root(&o.lower, &o.upper, dest) else { continue };
        let path = o.upper.join(&target);
        if *file {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
        } else {
            std::fs::create_dir_all(&path)?;
        }
    }
    Ok(())
}

/// `path` resolved inside the container's root (lower and upper layers, upper first; symlinks
/// followed inside it, at most 40): the path relative to the root and whether it exists there.
/// `None` when a component other than the last is a file.
fn resolve_in_root(lower: &Path, upper: &Path, path: &str) -> Option<(std::path::PathBuf, bool)> {
    use std::path::{Component, PathBuf};
    let mut todo: Vec<String> = path.split('/').filter(|c| !c.is_empty()).map(str::to_owned).rev().collect();
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(part) = todo.pop() {
        match part.as_str() {
            "." => continue,
            ".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let candidate = resolved.join(&part);
        let meta = std::fs::symlink_metadata(upper.join(&candidate))
            .or_else(|_| std::fs::symlink_metadata(lower.join(&candidate)))
            .ok();
        match meta {
            None => {
                // Missing from here on: the rest is made below it.
                let mut rest = candidate;
                while let Some(p) = todo.pop() {
                    if p != "." && p != ".." {
                        rest.push(p);
                    }
                }
                return Some((rest, false));
            }
            Some(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return None;
                }
                let target = std::fs::read_link(upper.join(&candidate))
                    .or_else(|_| std::fs::read_link(lower.join(&candidate)))
                    .ok()?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                for c in target.components().rev() {
                    if let Component::Normal(n) = c {
                        todo.push(n.to_string_lossy().into_owned());
                    } else if c == Component::ParentDir {
                        todo.push("..".into());
                    }
                }
            }
            Some(m) if m.is_dir() => resolved = candidate,
            Some(_) if todo.is_empty() => return Some((candidate, true)),
            Some(_) => return None,
        }
    }
    Some((resolved, true))
}

#[cfg(test)]
mod mount_point_tests {
    use super::*;

    #[test]
    fn mount_points_are_made_in_the_upper_layer_through_the_images_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let o = OverlayMount {
            lower: d.path().join("lower"),
            upper: d.path().join("upper"),
            work: d.path().join("work"),
            merged: d.path().join("merged"),
        };
        std::fs::create_dir_all(o.lower.join("run")).unwrap();
        std::fs::create_dir_all(o.lower.join("var")).unwrap();
        std::fs::create_dir_all(o.lower.join("proc")).unwrap();
        std::os::unix::fs::symlink("../run", o.lower.join("var/run")).unwrap();
        std::fs::create_dir_all(o.upper.join("etc")).unwrap();
        std::fs::write(o.upper.join("etc/hosts"), "").unwrap();
        let dests = [
            ("/dev".to_owned(), false),
            ("/proc".to_owned(), false),
            ("/var/run/secrets/token".to_owned(), false),
            ("/etc/hosts".to_owned(), true),
            ("/etc/conf/app.yml".to_owned(), true),
        ];
        make_mount_points(&o, &dests).unwrap();
        assert!(o.upper.join("dev").is_dir());
        // Present in the image: nothing made.
        assert!(!o.upper.join("proc").exists());
        // Through the image's symlink, not over it.
        assert!(o.upper.join("run/secrets/token").is_dir());
        assert!(!o.upper.join("var").exists());
        assert!(o.upper.join("etc/conf/app.yml").is_file());
    }
}
