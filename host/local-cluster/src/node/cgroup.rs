//! Memory limits through a per-container memory cgroup (v1 `memory` controller, or cgroup v2).
//!
//! The node's cgroups are created *below the cgroup this process already lives in*, so whatever
//! limits the surrounding environment put on us still apply to the containers.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::sandbox::Isolation;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Version {
    V1,
    V2,
}

/// The node's own cgroup directory.
#[derive(Debug)]
pub(crate) struct CgroupRoot {
    dir: PathBuf,
    version: Version,
}

/// One container instance's cgroup.
#[derive(Debug)]
pub(crate) struct ContainerCgroup {
    dir: PathBuf,
    version: Version,
}

impl CgroupRoot {
    /// `None` when memory cgroups cannot be used here (controller missing, or our cgroup is not
    /// writable: the usual case for an ordinary user, unless a cgroup v2 subtree was delegated to
    /// it); limits are then not enforced, which is logged once here and per limited container.
    pub fn create(isolation: &Isolation) -> Option<CgroupRoot> {
        let not_enforced = |why: &str| {
            let who = if isolation.root {
                ""
            } else {
                " (running as an ordinary user: run as root, or give this user a cgroup v2 subtree whose memory controller reaches the node's cgroup)"
            };
            tracing::warn!("container memory limits are not enforced: {why}{who}");
        };
        let Ok(own) = std::fs::read_to_string("/proc/self/cgroup") else {
            not_enforced("cannot read /proc/self/cgroup");
            return None;
        };
        let (base, version) = if let Some(path) = own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            ctrls.split(',').any(|c| c == "memory").then(|| path.to_string())
        }) {
            (Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')), Version::V1)
        } else {
            let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
                not_enforced("no memory cgroup controller (neither cgroup v1 nor v2)");
                return None;
            };
            let Some(mount) = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
                .into_iter()
                .find(|m| Path::new(m).join("cgroup.controllers").exists())
            else {
                not_enforced("cgroup v2 is not mounted at /sys/fs/cgroup");
                return None;
            };
            (Path::new(mount).join(path.trim_start_matches('/')), Version::V2)
        };
        let dir = base.join(format!("keel-node-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            not_enforced(&format!("cannot create the memory cgroup {}: {e}", dir.display()));
            return None;
        }
        if version == Version::V2 {
            // Children of our cgroup may only get the memory controller if it reached our new
            // cgroup (the parent enables it) and we pass it on.
            let has_memory = std::fs::read_to_string(dir.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
            let passed_on = has_memory
                && std::fs::write(dir.join("cgroup.subtree_control"), "+memory").is_ok();
            if !passed_on {
                let _ = std::fs::remove_dir(&dir);
                not_enforced(&format!(
                    "the memory controller is not enabled for {} (cgroup v2)",
                    dir.display()
                ));
                return None;
            }
        }
        Some(CgroupRoot { dir, version })
    }

    /// A cgroup for one container instance with `limit` bytes of memory (and no swap).
    pub fn container(&self, name: &str, limit: u64) -> std::io::Result<ContainerCgroup> {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir)?;
        match self.version {
            Version::V1 => {
                std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string())?;
                // Without this the limit is evaded by swapping; absent when swap accounting is off.
                let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), limit.to_string());
            }
            Version::V2 => {
                std::fs::write(dir.join("memory.max"), limit.to_string())?;
                let _ = std::fs::write(dir.join("memory.swap.max"), "0");
            }
        }
        Ok(ContainerCgroup { dir, version: self.version })
    }

    pub fn remove(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl ContainerCgroup {
    pub fn procs_file(&self) -> std::io::Result<File> {
        std::fs::OpenOptions::new().write(true).open(self.dir.join("cgroup.procs"))
    }

    /// Whether the kernel's OOM killer killed a process of this cgroup.
    pub fn oom_killed(&self) -> bool {
        let (file, key) = match self.version {
            Version::V1 => ("memory.oom_control", "oom_kill"),
            Version::V2 => ("memory.events", "oom_kill"),
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    let mut it = l.split_whitespace();
                    (it.next() == Some(key)).then(|| it.next()?.parse::<u64>().ok()).flatten()
                })
            })
            .is_some_and(|n| n > 0)
    }

    /// Removes the (empty) cgroup; fails silently while processes remain.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Parses a Kubernetes memory quantity ("128Mi", "1G", "1e6", "500000") into bytes.
pub(crate) fn parse_memory(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| c.is_ascii_alphabetic() && c != 'e').unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let mult: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "m" => 1e-3,
        _ => return None,
    };
    let n: f64 = num.parse().ok()?;
    (n >= 0.0).then(|| (n * mult).ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_memory;

    #[test]
    fn memory_quantities() {
        assert_eq!(parse_memory("128Mi"), Some(128 * 1024 * 1024));
        assert_eq!(parse_memory("1G"), Some(1_000_000_000));
        assert_eq!(parse_memory("1e6"), Some(1_000_000));
        assert_eq!(parse_memory("512"), Some(512));
        assert_eq!(parse_memory("1.5Ki"), Some(1536));
        assert_eq!(parse_memory("12Zi"), None);
        assert_eq!(parse_memory("-1"), None);
    }
}
