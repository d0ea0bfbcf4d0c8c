//! Resource limits through per-container cgroups, set as a kubelet sets them: memory (cgroup v1
//! `memory.limit_in_bytes`, v2 `memory.max`) and CPU (v1 CFS `cpu.cfs_quota_us` and
//! `cpu.shares`, v2 `cpu.max` and `cpu.weight`).
//!
//! The node's cgroups are created *below the cgroup this process already lives in*, in a
//! directory of the node's own (`keel-node-<pid>-<n>`, one per Node so several nodes in one
//! process never share it), so whatever limits the surrounding environment put on us still apply
//! to the containers, and removing that directory removes everything the node made. Each
//! controller is tried on its own: where one cannot be used (missing, or our cgroup not writable:
//! the usual case for an ordinary user) its limits are not enforced, which is logged, and the
//! others still are.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::sandbox::Isolation;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// The controllers the node sets limits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Controller {
    Memory,
    Cpu,
}

impl Controller {
    /// The controller's name in /proc/self/cgroup, mount options and `cgroup.controllers`.
    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
        }
    }
}

/// The CFS period the kubelet uses (`QuotaPeriod`, 100 ms).
pub(crate) const CFS_PERIOD_US: u64 = 100_000;
/// The smallest quota the kubelet sets (`MinQuotaPeriod`, 1 ms): the kernel refuses less.
const MIN_CFS_QUOTA_US: u64 = 1_000;
/// The kubelet's bounds for `cpu.shares` (`MinShares`, `MaxShares`).
const MIN_SHARES: u64 = 2;
const MAX_SHARES: u64 = 262_144;

/// Everything that can go wrong setting up a container's cgroups. The messages end up in the
/// container's waiting status, so each names the file and carries the system's error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CgroupError {
    #[error("cannot create cgroup {path}: {error}")]
    Create { path: PathBuf, error: std::io::Error },
    #[error("cannot write {value:?} to {path}: {error}")]
    Write { path: PathBuf, value: String, error: std::io::Error },
    #[error("cannot open {path} to move the container into its cgroup: {error}")]
    Open { path: PathBuf, error: std::io::Error },
}

/// A container's CPU settings, derived from its resources as the kubelet derives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CpuSettings {
    /// CFS quota in µs per [`CFS_PERIOD_US`]; `None`: no limit (the kernel's `-1`/`max`).
    pub quota_us: Option<u64>,
    /// `cpu.shares` (v1); v2's `cpu.weight` is computed from it.
    pub shares: u64,
}

impl CpuSettings {
    /// From `limits.cpu` and `requests.cpu` in millicores. A missing request is the limit, as
    /// API-server defaulting makes it (ours does too, in `store::defaults`); repeated here for
    /// pods handed to the node directly, which skip the API server.
    /// Follows the kubelet's `MilliCPUToQuota` and `MilliCPUToShares`: a limit of 0 is no limit,
    /// the quota is at least 1 ms, shares are clamped to 2..=262144.
    pub fn from_millicores(limit: Option<u64>, request: Option<u64>) -> CpuSettings {
        let quota_us = limit.filter(|m| *m > 0).map(|m| (m.saturating_mul(CFS_PERIOD_US) / 1000).max(MIN_CFS_QUOTA_US));
        let request = request.or(limit).unwrap_or(0);
        let shares = (request.saturating_mul(1024) / 1000).clamp(MIN_SHARES, MAX_SHARES);
        CpuSettings { quota_us, shares }
    }

    /// v2's `cpu.weight` (1..=10000) for these shares: the conversion runc and the kubelet use
    /// for cgroup v2 (`ConvertCPUSharesToCgroupV2Value`).
    fn weight(self) -> u64 {
        1 + (self.shares.clamp(MIN_SHARES, MAX_SHARES) - 2) * 9999 / 262_142
    }
}

/// The node's own directory in one hierarchy.
#[derive(Debug, Clone, PartialEq)]
struct NodeDir {
    dir: PathBuf,
    version: Version,
}

/// The node's cgroups, per controller; `None` where that controller cannot be used here.
#[derive(Debug)]
pub(crate) struct NodeCgroups {
    memory: Option<NodeDir>,
    cpu: Option<NodeDir>,
}

/// Makes the node's directory name unique per Node within this process.
static NEXT_NODE: AtomicU32 = AtomicU32::new(0);

impl NodeCgroups {
    /// Prepares the node's directory for each controller that can be used here; a controller
    /// that cannot is logged (once here, and per limited container later) and left out.
    pub fn create(isolation: &Isolation) -> NodeCgroups {
        let name = format!("keel-node-{}-{}", std::process::id(), NEXT_NODE.fetch_add(1, Ordering::Relaxed));
        let mut made: Vec<PathBuf> = Vec::new();
        let mut prepare = |controller: Controller| match node_dir(controller, &name, &mut made) {
            Ok(d) => Some(d),
            Err(why) => {
                let what = match controller {
                    Controller::Memory => "memory limits are",
                    Controller::Cpu => "CPU limits and requests are",
                };
                let who = if isolation.root {
                    String::new()
                } else {
                    format!(
                        " (running as an ordinary user: run as root, or give this user a cgroup v2 subtree whose {} controller reaches the node's cgroup)",
                        controller.name()
                    )
                };
                tracing::warn!("container {what} not enforced: {why}{who}");
                None
            }
        };
        let memory = prepare(Controller::Memory);
        let cpu = prepare(Controller::Cpu);
        // A v2 directory made for a controller that then could not be enabled in it, and that no
        // other controller uses, is of no use.
        for dir in made {
            let used = [&memory, &cpu].into_iter().flatten().any(|d| d.dir == dir);
            if !used {
                let _ = std::fs::remove_dir(&dir);
            }
        }
        NodeCgroups { memory, cpu }
    }

    /// Whether limits of this controller are enforced.
    pub fn enforces(&self, controller: Controller) -> bool {
        self.node_dir(controller).is_some()
    }

    fn node_dir(&self, controller: Controller) -> Option<&NodeDir> {
        match controller {
            Controller::Memory => self.memory.as_ref(),
            Controller::Cpu => self.cpu.as_ref(),
        }
    }

    /// The cgroups of one container instance: `memory` bytes of memory (and no swap) and the
    /// CPU settings, each where given and where its controller is usable. `None`: nothing to
    /// set, the container stays in the node's process's cgroups.
    pub fn container(
        &self,
        name: &str,
        memory: Option<u64>,
        cpu: Option<CpuSettings>,
    ) -> Result<Option<ContainerCgroup>, CgroupError> {
        let mut cg = ContainerCgroup { dirs: Vec::new(), memory: None };
        let result = (|| {
            if let (Some(limit), Some(node)) = (memory, &self.memory) {
                let dir = cg.join(node, name)?;
                set_memory(&dir, node.version, limit)?;
                cg.memory = Some((dir, node.version));
            }
            if let (Some(cpu), Some(node)) = (cpu, &self.cpu) {
                let dir = cg.join(node, name)?;
                set_cpu(&dir, node.version, cpu)?;
            }
            Ok(())
        })();
        // On an error, dropping `cg` removes what was made.
        result?;
        Ok((!cg.dirs.is_empty()).then_some(cg))
    }

    /// Removes every cgroup the node made (killing what is still in them). Idempotent.
    pub fn remove(&self) {
        let mut dirs: Vec<&PathBuf> = [&self.memory, &self.cpu].into_iter().flatten().map(|d| &d.dir).collect();
        dirs.dedup();
        for dir in dirs {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        remove_cgroup_dir(&e.path());
                    }
                }
            }
            remove_cgroup_dir(dir);
        }
    }
}

/// Finds this process's cgroup for `controller` and creates the node's directory below it (on
/// v2 also passing the controller on to the directory's children). Directories it created are
/// added to `made`. The error says why the controller cannot be used.
fn node_dir(controller: Controller, name: &str, made: &mut Vec<PathBuf>) -> Result<NodeDir, String> {
    let (base, version) = own_cgroup(controller)?;
    let dir = base.join(name);
    if !dir.is_dir() {
        std::fs::create_dir(&dir)
            .map_err(|e| format!("cannot create the {} cgroup {}: {e}", controller.name(), dir.display()))?;
        made.push(dir.clone());
    }
    if version == Version::V2 {
        // Children of our directory get the controller only if it reached the directory (our
        // cgroup's parent enabled it for us and we for it) and the directory passes it on.
        let available = std::fs::read_to_string(dir.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == controller.name()));
        let passed_on =
            available && std::fs::write(dir.join("cgroup.subtree_control"), format!("+{}", controller.name())).is_ok();
        if !passed_on {
            return Err(format!(
                "the {} controller is not enabled for {} (cgroup v2)",
                controller.name(),
                dir.display()
            ));
        }
    }
    Ok(NodeDir { dir, version })
}

/// This process's cgroup directory for `controller`: in the v1 hierarchy that has the
/// controller if there is one (on hybrid systems a controller belongs to v1 or v2, not both),
/// else in the unified (v2) hierarchy. Mounts are looked up in /proc/self/mountinfo, so a
/// hierarchy mounted elsewhere than /sys/fs/cgroup, or with only part of it visible (a
/// container's cgroup mounted as its root), is found too.
fn own_cgroup(controller: Controller) -> Result<(PathBuf, Version), String> {
    let own =
        std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    locate(controller, &own, &mountinfo)
}

/// [`own_cgroup`] from the texts of /proc/self/cgroup and /proc/self/mountinfo.
fn locate(controller: Controller, own: &str, mountinfo: &str) -> Result<(PathBuf, Version), String> {
    let v1 = own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrls.split(',').any(|c| c == controller.name()).then_some(path)
    });
    let (path, version) = match v1 {
        Some(path) => (path, Version::V1),
        None => match own.lines().find_map(|l| l.strip_prefix("0::")) {
            Some(path) => (path, Version::V2),
            None => {
                return Err(format!("no {} cgroup controller (neither cgroup v1 nor v2)", controller.name()));
            }
        },
    };
    let dir = mountinfo
        .lines()
        .filter_map(parse_mount)
        .filter(|m| match version {
            Version::V1 => m.fstype == "cgroup" && m.options.split(',').any(|o| o == controller.name()),
            Version::V2 => m.fstype == "cgroup2",
        })
        .find_map(|m| {
            let below = Path::new(path).strip_prefix(m.root).ok()?;
            let mount_point = Path::new(m.mount_point);
            // Joining an empty path would add a trailing slash.
            Some(if below.as_os_str().is_empty() { mount_point.to_path_buf() } else { mount_point.join(below) })
        });
    match dir {
        Some(dir) => Ok((dir, version)),
        None if version == Version::V1 => Err(format!(
            "the cgroup v1 {} hierarchy is not mounted where this process sees its cgroup {path}",
            controller.name()
        )),
        None => Err(format!("cgroup v2 is not mounted where this process sees its cgroup {path}")),
    }
}

/// The fields of a /proc/self/mountinfo line that locate a cgroup hierarchy.
struct Mount<'a> {
    root: &'a str,
    mount_point: &'a str,
    fstype: &'a str,
    options: &'a str,
}

fn parse_mount(line: &str) -> Option<Mount<'_>> {
    // "36 25 0:32 / /sys/fs/cgroup/memory rw,relatime shared:15 - cgroup cgroup rw,memory":
    // a variable number of optional fields ends with "-".
    let (before, after) = line.split_once(" - ")?;
    let mut b = before.split(' ');
    let root = b.nth(3)?;
    let mount_point = b.next()?;
    let mut a = after.split(' ');
    let fstype = a.next()?;
    let options = a.nth(1)?;
    Some(Mount { root, mount_point, fstype, options })
}

fn write(dir: &Path, file: &str, value: String) -> Result<(), CgroupError> {
    let path = dir.join(file);
    std::fs::write(&path, &value).map_err(|error| CgroupError::Write { path, value, error })
}

fn set_memory(dir: &Path, version: Version, limit: u64) -> Result<(), CgroupError> {
    match version {
        Version::V1 => {
            write(dir, "memory.limit_in_bytes", limit.to_string())?;
            // Without this the limit is evaded by swapping; absent when swap accounting is off.
            let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), limit.to_string());
        }
        Version::V2 => {
            write(dir, "memory.max", limit.to_string())?;
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
        }
    }
    Ok(())
}

fn set_cpu(dir: &Path, version: Version, cpu: CpuSettings) -> Result<(), CgroupError> {
    let quota = match version {
        Version::V1 => {
            write(dir, "cpu.shares", cpu.shares.to_string())?;
            let Some(quota) = cpu.quota_us else { return Ok(()) };
            write(dir, "cpu.cfs_period_us", CFS_PERIOD_US.to_string())?;
            write(dir, "cpu.cfs_quota_us", quota.to_string())
        }
        Version::V2 => {
            write(dir, "cpu.weight", cpu.weight().to_string())?;
            let quota = cpu.quota_us.map_or_else(|| "max".to_string(), |q| q.to_string());
            write(dir, "cpu.max", format!("{quota} {CFS_PERIOD_US}"))
        }
    };
    match quota {
        // v1 refuses a child a larger share of the CPU than a cgroup above it already has. The
        // limit above applies to the container anyway, so it is the one enforced.
        Err(CgroupError::Write { error, .. })
            if error.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
        {
            tracing::warn!(
                cgroup = %dir.display(),
                quota.us = cpu.quota_us,
                "CPU limit larger than the limit of a cgroup above the node; that smaller limit applies instead"
            );
            Ok(())
        }
        other => other,
    }
}

/// One container instance's cgroups: one directory per hierarchy (at most two: on v1 memory and
/// cpu are separate hierarchies, on v2 one directory holds both).
#[derive(Debug)]
pub(crate) struct ContainerCgroup {
    dirs: Vec<PathBuf>,
    memory: Option<(PathBuf, Version)>,
}

impl ContainerCgroup {
    /// The container's directory in `node`'s hierarchy, created (once) if new.
    fn join(&mut self, node: &NodeDir, name: &str) -> Result<PathBuf, CgroupError> {
        let dir = node.dir.join(name);
        if !self.dirs.contains(&dir) {
            std::fs::create_dir(&dir).map_err(|error| CgroupError::Create { path: dir.clone(), error })?;
            self.dirs.push(dir.clone());
        }
        Ok(dir)
    }

    /// Paths of the `cgroup.procs` files (execs open them when they start).
    pub fn procs_paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// `cgroup.procs` of each directory, opened for writing: the container's first process
    /// writes to each before exec to join them all.
    pub fn procs_files(&self) -> Result<Vec<File>, CgroupError> {
        self.dirs
            .iter()
            .map(|d| {
                let path = d.join("cgroup.procs");
                std::fs::OpenOptions::new().write(true).open(&path).map_err(|error| CgroupError::Open { path, error })
            })
            .collect()
    }

    /// Whether the kernel's OOM killer killed a process of this cgroup.
    pub fn oom_killed(&self) -> bool {
        let Some((dir, version)) = &self.memory else { return false };
        let file = match version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    let mut it = l.split_whitespace();
                    (it.next() == Some("oom_kill")).then(|| it.next()?.parse::<u64>().ok()).flatten()
                })
            })
            .is_some_and(|n| n > 0)
    }

    /// Removes the cgroups, killing whatever is left in them first (blocks briefly while killed
    /// processes exit).
    pub fn remove(&self) {
        for d in &self.dirs {
            remove_cgroup_dir(d);
        }
    }
}

/// A container that never started (an error after its cgroups were made) leaves none behind.
/// After [`ContainerCgroup::remove`] this finds nothing left to do.
impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Removes one of our cgroup directories. A cgroup can only be removed once empty: processes
/// still in it (a container's stray background process, or one killed a moment ago that the
/// kernel has not finished with) are killed, as a container runtime does when a container ends,
/// and the removal is retried for up to a second.
fn remove_cgroup_dir(dir: &Path) {
    use rustix::process::{Pid, Signal, kill_process};
    for _ in 0..200 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) => {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                // Pids of processes outside our PID namespace read as 0; there are none of ours.
                for pid in procs.lines().filter_map(|l| Pid::from_raw(l.trim().parse().ok()?)) {
                    let _ = kill_process(pid, Signal::KILL);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove the cgroup");
                return;
            }
        }
    }
    tracing::warn!(cgroup = %dir.display(), "cgroup still busy after killing its processes; left behind");
}

/// A Kubernetes resource quantity as an exact number: `digits * 10^exp10 * 1024^exp1024`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Quantity {
    negative: bool,
    digits: u128,
    exp10: i32,
    exp1024: u32,
}

/// Parses a quantity like apimachinery's `resource.ParseQuantity`: an optionally signed decimal
/// number ("1", "0.25", ".5"), then a binary suffix (Ki, Mi, Gi, Ti, Pi, Ei), a decimal one
/// (n, u, m, none, k, M, G, T, P, E) or a decimal exponent ("e3", "E-2"). Exact: no floating
/// point, so "0.1" cores is 100 millicores, not 100.00000000000001.
fn parse_quantity(q: &str) -> Option<Quantity> {
    let q = q.trim();
    let (negative, q) = match q.as_bytes().first() {
        Some(b'-') => (true, &q[1..]),
        Some(b'+') => (false, &q[1..]),
        _ => (false, q),
    };
    let number_end = q.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(q.len());
    let (number, suffix) = q.split_at(number_end);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return None;
    }
    // Trailing zeros of the fraction change nothing and would only risk overflow.
    let frac = frac.trim_end_matches('0');
    let mut digits: u128 = 0;
    for c in int.chars().chain(frac.chars()) {
        digits = digits.checked_mul(10)?.checked_add(u128::from(c.to_digit(10)?))?;
    }
    let mut exp10 = -i32::try_from(frac.len()).ok()?;
    let mut exp1024 = 0;
    match suffix {
        "Ki" => exp1024 = 1,
        "Mi" => exp1024 = 2,
        "Gi" => exp1024 = 3,
        "Ti" => exp1024 = 4,
        "Pi" => exp1024 = 5,
        "Ei" => exp1024 = 6,
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "" => {}
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        s if s.starts_with(['e', 'E']) => exp10 = exp10.checked_add(s[1..].parse::<i32>().ok()?)?,
        _ => return None,
    }
    Some(Quantity { negative, digits, exp10, exp1024 })
}

impl Quantity {
    /// The value times 10^`scale`, rounded up to a whole number as `Quantity.Value()` and
    /// `MilliValue()` round; saturates at `u64::MAX`. `None` for negative quantities, which no
    /// resource may have.
    fn ceil_scaled(self, scale: i32) -> Option<u64> {
        if self.negative && self.digits != 0 {
            return None;
        }
        let mut n = self.digits;
        for _ in 0..self.exp1024 {
            n = n.saturating_mul(1024);
        }
        let exp = self.exp10.saturating_add(scale);
        let n = if exp >= 0 {
            10u128.checked_pow(exp.unsigned_abs()).map_or(u128::MAX, |p| n.saturating_mul(p))
        } else {
            match 10u128.checked_pow(exp.unsigned_abs()) {
                Some(d) => n.div_ceil(d),
                // Smaller than any representable divisor: a positive value rounds up to 1.
                None => u128::from(n != 0),
            }
        };
        Some(u64::try_from(n).unwrap_or(u64::MAX))
    }
}

/// A memory quantity ("128Mi", "1G", "1e6", "500000") in bytes, rounded up.
pub(crate) fn parse_memory(q: &str) -> Option<u64> {
    parse_quantity(q)?.ceil_scaled(0)
}

/// A CPU quantity ("500m", "2", "0.25") in millicores, rounded up to 1m as Kubernetes does.
pub(crate) fn parse_cpu_millis(q: &str) -> Option<u64> {
    parse_quantity(q)?.ceil_scaled(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_quantities() {
        assert_eq!(parse_memory("128Mi"), Some(128 * 1024 * 1024));
        assert_eq!(parse_memory("1G"), Some(1_000_000_000));
        assert_eq!(parse_memory("1e6"), Some(1_000_000));
        assert_eq!(parse_memory("1E6"), Some(1_000_000));
        assert_eq!(parse_memory("512"), Some(512));
        assert_eq!(parse_memory("1.5Ki"), Some(1536));
        assert_eq!(parse_memory("100m"), Some(1), "a fraction of a byte rounds up");
        assert_eq!(parse_memory("1Ei"), Some(1 << 60));
        assert_eq!(parse_memory("12Zi"), None);
        assert_eq!(parse_memory("1K"), None, "only lower-case k is kilo");
        assert_eq!(parse_memory("-1"), None);
        assert_eq!(parse_memory(""), None);
        assert_eq!(parse_memory("."), None);
        assert_eq!(parse_memory("1.2.3"), None);
    }

    #[test]
    fn cpu_quantities_are_millicores_rounded_up() {
        assert_eq!(parse_cpu_millis("500m"), Some(500));
        assert_eq!(parse_cpu_millis("2"), Some(2000));
        assert_eq!(parse_cpu_millis("0.25"), Some(250));
        assert_eq!(parse_cpu_millis(".5"), Some(500));
        assert_eq!(parse_cpu_millis("0.1"), Some(100), "exact, no floating point");
        assert_eq!(parse_cpu_millis("0.0001"), Some(1), "rounded up to 1m");
        assert_eq!(parse_cpu_millis("1.0001"), Some(1001));
        assert_eq!(parse_cpu_millis("100u"), Some(1));
        assert_eq!(parse_cpu_millis("1e-3"), Some(1));
        assert_eq!(parse_cpu_millis("2e2m"), None, "an exponent is the whole suffix");
        assert_eq!(parse_cpu_millis("1k"), Some(1_000_000));
        assert_eq!(parse_cpu_millis("0"), Some(0));
        assert_eq!(parse_cpu_millis("1E"), Some(u64::MAX), "saturates");
        assert_eq!(parse_cpu_millis("-100m"), None);
        assert_eq!(parse_cpu_millis("one"), None);
    }

    #[test]
    fn cpu_settings_follow_the_kubelet() {
        let s = CpuSettings::from_millicores;
        // limits.cpu 100m: 10 ms per 100 ms period; the request defaults to the limit.
        assert_eq!(s(Some(100), None), CpuSettings { quota_us: Some(10_000), shares: 102 });
        assert_eq!(s(Some(2000), Some(500)), CpuSettings { quota_us: Some(200_000), shares: 512 });
        // The kernel's minimum quota is 1 ms; shares at least 2.
        assert_eq!(s(Some(1), None), CpuSettings { quota_us: Some(1_000), shares: 2 });
        // Requests alone: shares, no quota; a limit of 0 is no limit.
        assert_eq!(s(None, Some(250)), CpuSettings { quota_us: None, shares: 256 });
        assert_eq!(s(Some(0), None), CpuSettings { quota_us: None, shares: 2 });
        assert_eq!(s(None, Some(1_000_000)).shares, 262_144);
        // v2 weights: the least shares are weight 1, 1024 shares (1 CPU) weight 39, the most 10000.
        assert_eq!(s(None, Some(1)).weight(), 1);
        assert_eq!(s(None, Some(1000)).weight(), 39);
        assert_eq!(s(None, Some(1_000_000)).weight(), 10_000);
    }

    #[test]
    fn each_controller_is_found_in_its_hierarchy() {
        let v1_mounts = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n\
                         35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:12 - cgroup cgroup rw,memory\n\
                         41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:5 - cgroup2 cgroup2 rw";
        let v1_own = "4:memory:/ci/job\n2:cpu,cpuacct:/ci/job\n0::/ci/job";
        let at = |c, own, mounts| locate(c, own, mounts).map(|(p, v)| (p.display().to_string(), v));
        assert_eq!(
            at(Controller::Cpu, v1_own, v1_mounts),
            Ok(("/sys/fs/cgroup/cpu,cpuacct/ci/job".into(), Version::V1))
        );
        assert_eq!(at(Controller::Memory, v1_own, v1_mounts), Ok(("/sys/fs/cgroup/memory/ci/job".into(), Version::V1)));
        // Hybrid with memory not on v1: the unified hierarchy (where it may not be enabled).
        let hybrid_own = "2:cpu,cpuacct:/ci/job\n0::/ci/job";
        assert_eq!(
            at(Controller::Memory, hybrid_own, v1_mounts),
            Ok(("/sys/fs/cgroup/unified/ci/job".into(), Version::V2))
        );
        // Pure v2, as most current distributions.
        let v2_mounts = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot";
        let v2_own = "0::/user.slice/user-1000.slice/session-2.scope";
        assert_eq!(
            at(Controller::Cpu, v2_own, v2_mounts),
            Ok(("/sys/fs/cgroup/user.slice/user-1000.slice/session-2.scope".into(), Version::V2))
        );
        // In a container whose own cgroup is mounted as the hierarchy's root.
        let docker_mounts = "700 690 0:29 /docker/abc /sys/fs/cgroup/cpu ro,nosuid master:9 - cgroup cgroup rw,cpu";
        assert_eq!(
            at(Controller::Cpu, "3:cpu:/docker/abc", docker_mounts),
            Ok(("/sys/fs/cgroup/cpu".into(), Version::V1))
        );
        assert!(at(Controller::Cpu, "3:cpu:/elsewhere", docker_mounts).unwrap_err().contains("not mounted where"));
        assert!(at(Controller::Cpu, "1:name=systemd:/", "").unwrap_err().contains("no cpu cgroup controller"));
    }

    #[test]
    fn mountinfo_lines_locate_cgroup_hierarchies() {
        let m = parse_mount(
            "36 25 0:32 /docker/abc /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:15 - cgroup cgroup rw,cpu,cpuacct",
        )
        .unwrap();
        assert_eq!(
            (m.root, m.mount_point, m.fstype, m.options),
            ("/docker/abc", "/sys/fs/cgroup/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct")
        );
        let m = parse_mount("41 31 0:38 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw,nsdelegate").unwrap();
        assert_eq!((m.mount_point, m.fstype), ("/sys/fs/cgroup", "cgroup2"));
    }
}
