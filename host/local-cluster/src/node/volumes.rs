//! Pod volumes as host directories that the containers bind at their mountPaths.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{KeyToPath, Pod, Volume};

use super::ResolvedVolumes;

/// Why a pod's volumes could not be prepared (reported as CreateContainerConfigError).
#[derive(Debug, thiserror::Error)]
pub(crate) enum VolumeError {
    #[error("volume {volume}: cannot prepare {path}: {source}")]
    Io {
        volume: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume}: the data of its {kind} was not provided")]
    MissingData { volume: String, kind: &'static str },
    #[error("volume {volume}: key {key} not found in its {kind}")]
    MissingKey { volume: String, kind: &'static str, key: String },
    #[error("volume {volume}: item path {path} must be relative and stay inside the volume")]
    BadItemPath { volume: String, path: String },
    #[error("volume {volume}: hostPath {path} does not exist (type {kind})")]
    HostPathMissing { volume: String, path: String, kind: String },
    #[error("volume {0}: this volume type is not supported by the local node")]
    Unsupported(String),
    #[error("volumeMount {mount} refers to no volume of the pod")]
    NoSuchVolume { mount: String },
    #[error("volumeMount {mount}: subPath {sub_path} must be relative and stay inside the volume")]
    BadSubPath { mount: String, sub_path: String },
}

/// A prepared volume.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub path: PathBuf,
    /// configMap/secret volumes are read-only whatever the mount says.
    pub read_only: bool,
}

/// Prepared volumes plus what must be undone when the pod goes away.
#[derive(Debug, Default)]
pub(crate) struct PodVolumes {
    pub by_name: BTreeMap<String, Prepared>,
    /// tmpfs mounts (emptyDir medium Memory) to unmount before removing the pod directory.
    pub tmpfs: Vec<PathBuf>,
}

fn io(volume: &str, path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError {
    let (volume, path) = (volume.to_string(), path.to_path_buf());
    move |source| VolumeError::Io { volume, path, source }
}

/// A relative path that cannot climb out of its base.
pub(crate) fn safe_relative(p: &str) -> bool {
    !p.is_empty() && Path::new(p).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn project(
    volume: &str,
    kind: &'static str,
    dir: &Path,
    data: Option<&BTreeMap<String, Vec<u8>>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: Option<i32>,
    optional: bool,
) -> Result<(), VolumeError> {
    std::fs::create_dir_all(dir).map_err(io(volume, dir))?;
    let empty = BTreeMap::new();
    let data = match data {
        Some(d) => d,
        None if optional => &empty,
        None => return Err(VolumeError::MissingData { volume: volume.into(), kind }),
    };
    let mode = default_mode.unwrap_or(0o644) as u32;
    let mut files: Vec<(String, &[u8], u32)> = Vec::new();
    match items {
        Some(items) if !items.is_empty() => {
            for it in items {
                match data.get(&it.key) {
                    Some(v) => files.push((it.path.clone(), v, it.mode.map(|m| m as u32).unwrap_or(mode))),
                    None if optional => {}
                    None => {
                        return Err(VolumeError::MissingKey { volume: volume.into(), kind, key: it.key.clone() });
                    }
                }
            }
        }
        _ => files.extend(data.iter().map(|(k, v)| (k.clone(), v.as_slice(), mode))),
    }
    for (rel, bytes, mode) in files {
        if !safe_relative(&rel) {
            return Err(VolumeError::BadItemPath { volume: volume.into(), path: rel });
        }
        let path = dir.join(&rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(volume, parent))?;
        }
        std::fs::write(&path, bytes).map_err(io(volume, &path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777)).map_err(io(volume, &path))?;
    }
    Ok(())
}

/// Creates every volume of the pod under `pod_dir/volumes` (claims under `data_dir/pvcs`).
pub(crate) fn prepare(
    pod: &Pod,
    data: &ResolvedVolumes,
    pod_dir: &Path,
    data_dir: &Path,
    root: bool,
) -> Result<PodVolumes, VolumeError> {
    let mut out = PodVolumes::default();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let volumes: &[Volume] = pod.spec.as_ref().and_then(|s| s.volumes.as_deref()).unwrap_or(&[]);
    for v in volumes {
        let name = v.name.as_str();
        let dir = pod_dir.join("volumes").join(name);
        let prepared = if let Some(ed) = &v.empty_dir {
            std::fs::create_dir_all(&dir).map_err(io(name, &dir))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).map_err(io(name, &dir))?;
            if ed.medium.as_deref() == Some("Memory") {
                if root {
                    mount_tmpfs(&dir).map_err(io(name, &dir))?;
                    out.tmpfs.push(dir.clone());
                } else {
                    tracing::warn!(volume = name, "emptyDir medium Memory needs root; using a plain directory");
                }
            }
            Prepared { path: dir, read_only: false }
        } else if let Some(hp) = &v.host_path {
            let path = PathBuf::from(&hp.path);
            let kind = hp.type_.clone().unwrap_or_default();
            match kind.as_str() {
                "DirectoryOrCreate" => std::fs::create_dir_all(&path).map_err(io(name, &path))?,
                "FileOrCreate" if !path.exists() => std::fs::write(&path, b"").map_err(io(name, &path))?,
                "" | "FileOrCreate" => {}
                _ if !path.exists() => {
                    return Err(VolumeError::HostPathMissing { volume: name.into(), path: hp.path.clone(), kind });
                }
                _ => {}
            }
            Prepared { path, read_only: false }
        } else if let Some(cm) = &v.config_map {
            project(
                name,
                "configMap",
                &dir,
                data.get(name),
                cm.items.as_ref(),
                cm.default_mode,
                cm.optional.unwrap_or(false),
            )?;
            Prepared { path: dir, read_only: true }
        } else if let Some(s) = &v.secret {
            project(
                name,
                "secret",
                &dir,
                data.get(name),
                s.items.as_ref(),
                s.default_mode,
                s.optional.unwrap_or(false),
            )?;
            Prepared { path: dir, read_only: true }
        } else if let Some(pvc) = &v.persistent_volume_claim {
            if !safe_relative(&pvc.claim_name) || pvc.claim_name.contains('/') {
                return Err(VolumeError::BadItemPath { volume: name.into(), path: pvc.claim_name.clone() });
            }
            let path = data_dir.join("pvcs").join(namespace).join(&pvc.claim_name);
            std::fs::create_dir_all(&path).map_err(io(name, &path))?;
            Prepared { path, read_only: pvc.read_only.unwrap_or(false) }
        } else {
            return Err(VolumeError::Unsupported(name.into()));
        };
        out.by_name.insert(name.to_string(), prepared);
    }
    Ok(out)
}

fn mount_tmpfs(dir: &Path) -> std::io::Result<()> {
    use rustix::mount::{MountFlags, mount};
    mount("tmpfs", dir, "tmpfs", MountFlags::NOSUID | MountFlags::NODEV, c"mode=0777")?;
    Ok(())
}

/// Unmounts the pod's tmpfs volumes (lazily: a process that still holds one open cannot stop us).
pub(crate) fn unmount_all(tmpfs: &[PathBuf]) {
    for dir in tmpfs {
        let _ = rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;

    fn pod(volumes: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
            "spec": {"containers": [{"name": "c"}], "volumes": volumes}
        }))
        .unwrap()
    }

    #[test]
    fn config_map_items_and_modes_become_files() {
        let tmp = tempfile::tempdir().unwrap();
        let p = pod(serde_json::json!([
            {"name": "cfg", "configMap": {"name": "x", "defaultMode": 0o600,
              "items": [{"key": "a", "path": "sub/a.txt"}, {"key": "b", "path": "b", "mode": 0o755}]}}
        ]));
        let mut data = ResolvedVolumes::new();
        data.insert(
            "cfg".into(),
            [("a".to_string(), b"AAA".to_vec()), ("b".to_string(), b"B".to_vec()), ("c".to_string(), b"C".to_vec())]
                .into_iter()
                .collect(),
        );
        let v = prepare(&p, &data, tmp.path(), tmp.path(), false).unwrap();
        let dir = &v.by_name["cfg"].path;
        assert_eq!(std::fs::read(dir.join("sub/a.txt")).unwrap(), b"AAA");
        let mode = |f: &str| std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("sub/a.txt"), 0o600);
        assert_eq!(mode("b"), 0o755);
        assert!(!dir.join("c").exists(), "keys not listed in items are not projected");
        assert!(v.by_name["cfg"].read_only);
    }

    #[test]
    fn missing_key_and_escaping_paths_are_errors_naming_the_volume() {
        let tmp = tempfile::tempdir().unwrap();
        let p = pod(
            serde_json::json!([{"name": "s", "secret": {"secretName": "x", "items": [{"key": "nope", "path": "n"}]}}]),
        );
        let mut data = ResolvedVolumes::new();
        data.insert("s".into(), BTreeMap::new());
        let e = prepare(&p, &data, tmp.path(), tmp.path(), false).unwrap_err();
        assert_eq!(e.to_string(), "volume s: key nope not found in its secret");
        let p = pod(
            serde_json::json!([{"name": "s", "secret": {"secretName": "x", "items": [{"key": "k", "path": "../../etc/x"}]}}]),
        );
        data.insert("s".into(), [("k".to_string(), b"v".to_vec())].into_iter().collect());
        let e = prepare(&p, &data, tmp.path(), tmp.path(), false).unwrap_err();
        assert!(e.to_string().contains("../../etc/x"), "{e}");
        let _ = PodSpec::default();
    }

    #[test]
    fn claims_live_per_namespace_and_survive_the_pod() {
        let tmp = tempfile::tempdir().unwrap();
        let p = pod(serde_json::json!([{"name": "d", "persistentVolumeClaim": {"claimName": "cache"}}]));
        let v = prepare(&p, &ResolvedVolumes::new(), &tmp.path().join("pod"), tmp.path(), false).unwrap();
        assert_eq!(v.by_name["d"].path, tmp.path().join("pvcs/ns/cache"));
        assert!(v.by_name["d"].path.is_dir());
    }
}
