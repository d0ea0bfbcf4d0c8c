//! Building and spawning bubblewrap sandboxes: the pod holder and the containers.
//!
//! This file holds the crate's only `unsafe`: `Command::pre_exec` hooks that run between fork and
//! exec to set PR_SET_PDEATHSIG, join the pod's user and network namespaces and the container's
//! cgroups (memory and CPU), and make a terminal the controlling one. Each hook only makes async-signal-safe
//! system calls on file descriptors opened before the fork.
//!
//! Root and unprivileged differ in one place: as an ordinary user the pod holder also gets a user
//! namespace of its own (bwrap `--unshare-user --uid 0 --gid 0`, mapping uid 0 inside to our uid
//! outside). Every container first joins that user namespace, which gives it all capabilities
//! over the namespaces the holder owns, then the holder's network namespace (a shared PID
//! namespace is joined by bwrap itself, `--pidns`); bwrap then runs as uid 0 there and takes the
//! same path as for real root (no further user namespace, all capabilities kept, but only over
//! the pod's namespaces). Files the containers write into volumes belong to our uid on the host.
#![allow(unsafe_code)]

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use rustix::io::{FdFlags, fcntl_setfd};
use rustix::process::{Signal, set_parent_process_death_signal};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use tokio::process::{Child, Command};

use super::NodeError;

/// What the node may do on this machine.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Isolation {
    /// Real root: pod namespaces belong to the host's user namespace. Otherwise each pod has a
    /// user namespace of its own that its containers and execs join first.
    pub root: bool,
}

/// The holder's extra arguments as an ordinary user: a user namespace owned by us in which
/// uid/gid 0 map to our own uid/gid.
const POD_USER_NS_ARGS: [&str; 5] = ["--unshare-user", "--uid", "0", "--gid", "0"];

impl Isolation {
    /// Runs a trivial sandbox with the namespaces a pod holder gets, so a missing bwrap or
    /// disabled user namespaces are reported at node start, with the cause and the remedy,
    /// instead of at the first pod.
    pub fn probe() -> Result<Isolation, NodeError> {
        let root = rustix::process::geteuid().is_root();
        let mut cmd = std::process::Command::new("bwrap");
        // `--as-pid-1`: without it bwrap's own init runs `true`, and the outer bwrap returns
        // as soon as the init reports the exit code, leaving the init to end as an orphan (a
        // zombie until the host's init reaps it).
        cmd.args(["--ro-bind", "/", "/", "--unshare-pid", "--as-pid-1", "--unshare-net"]);
        if !root {
            cmd.args(POD_USER_NS_ARGS);
        }
        let out = cmd
            .args(["--", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(NodeError::BwrapMissing)?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(namespaces_unavailable(root, stderr, &UsernsSysctls::read()));
        }
        Ok(Isolation { root })
    }
}

/// The kernel settings that decide whether an ordinary user may create user namespaces.
/// `None`: the setting does not exist on this kernel (or cannot be read).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UsernsSysctls {
    /// `kernel.unprivileged_userns_clone` (Debian and older Ubuntu kernels).
    pub unprivileged_userns_clone: Option<u64>,
    /// `user.max_user_namespaces` (upstream; 0 disables user namespaces for everyone).
    pub max_user_namespaces: Option<u64>,
    /// `kernel.apparmor_restrict_unprivileged_userns` (Ubuntu 23.10 and later).
    pub apparmor_restrict_unprivileged_userns: Option<u64>,
}

impl UsernsSysctls {
    fn read() -> UsernsSysctls {
        let get = |path: &str| std::fs::read_to_string(path).ok()?.trim().parse().ok();
        UsernsSysctls {
            unprivileged_userns_clone: get("/proc/sys/kernel/unprivileged_userns_clone"),
            max_user_namespaces: get("/proc/sys/user/max_user_namespaces"),
            apparmor_restrict_unprivileged_userns: get("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
        }
    }
}

/// Turns a failed probe into an error naming the most likely cause and what to do about it.
pub(crate) fn namespaces_unavailable(root: bool, bwrap: String, sysctls: &UsernsSysctls) -> NodeError {
    let (cause, remedy) = if root {
        (
            "running as root but without the capability to create namespaces (CAP_SYS_ADMIN), as in an unprivileged container".to_string(),
            "run the node where root may create namespaces (e.g. a container started with --privileged or --cap-add SYS_ADMIN and an unconfined seccomp profile)".to_string(),
        )
    } else if sysctls.max_user_namespaces == Some(0) {
        (
            "user namespaces are disabled (user.max_user_namespaces = 0)".to_string(),
            "allow them with `sysctl -w user.max_user_namespaces=15000`, or run the node as root".to_string(),
        )
    } else if sysctls.unprivileged_userns_clone == Some(0) {
        (
            "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0)".to_string(),
            "allow them with `sysctl -w kernel.unprivileged_userns_clone=1`, or run the node as root".to_string(),
        )
    } else if sysctls.apparmor_restrict_unprivileged_userns == Some(1) {
        (
            "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns = 1)".to_string(),
            "give bwrap an AppArmor profile that allows `userns`, or `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`, or run the node as root".to_string(),
        )
    } else {
        (
            "this user may not create user namespaces (a container's seccomp profile or a hardened kernel can forbid them)".to_string(),
            "run the node as root, or where unprivileged user namespaces are allowed".to_string(),
        )
    };
    NodeError::NamespacesUnavailable { cause, remedy, bwrap }
}

type SpawnJob = Box<dyn FnOnce() + Send>;

/// A dedicated thread that spawns every sandbox. PR_SET_PDEATHSIG fires when the *thread* that
/// forked a child ends, so spawning from tokio's blocking pool (threads come and go) would kill
/// containers at random; this thread lives exactly as long as the Node.
pub(crate) struct Spawner {
    tx: std::sync::Mutex<Option<std::sync::mpsc::Sender<SpawnJob>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Spawner {
    pub fn start(rt: tokio::runtime::Handle) -> Spawner {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        let thread = std::thread::Builder::new()
            .name("keel-node-spawner".into())
            .spawn(move || {
                // tokio::process needs a runtime context to register the child's SIGCHLD.
                let _guard = rt.enter();
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .expect("spawning the node's spawner thread");
        Spawner { tx: std::sync::Mutex::new(Some(tx)), thread: std::sync::Mutex::new(Some(thread)) }
    }

    /// Spawns `cmd` on the spawner thread.
    pub async fn spawn(&self, mut cmd: Command) -> std::io::Result<Child> {
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        let job: SpawnJob = Box::new(move || {
            let _ = reply_tx.send(cmd.spawn());
        });
        let sent = match &*self.tx.lock().expect("spawner lock") {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        };
        if !sent {
            return Err(std::io::Error::other("the node is shut down"));
        }
        reply_rx.await.map_err(|_| std::io::Error::other("the node's spawner thread ended"))?
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.tx.lock().map(|mut t| t.take()).ok();
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

/// One mount of a volume into a container.
#[derive(Debug, Clone)]
pub(crate) struct Bind {
    pub source: PathBuf,
    pub dest: String,
    pub read_only: bool,
}

/// Namespaces of the pod holder, kept open so containers and execs can join them.
#[derive(Debug)]
pub(crate) struct PodNamespaces {
    /// The pod's own user namespace (unprivileged only), joined before the others.
    pub user: Option<OwnedFd>,
    pub net: OwnedFd,
    pub pid: OwnedFd,
}

/// Where a container's root filesystem comes from.
#[derive(Debug, Clone)]
pub(crate) enum Rootfs {
    /// The host's root (`None`) or an `images_dir` rootfs, read-only.
    ReadOnly(Option<PathBuf>),
    /// An image's root from the store, shared and read-only, under a writable layer of this
    /// container's own: an overlay mount on `merged` (see `OverlayMount`).
    Overlay(OverlayMount),
}

/// An overlayfs made in the container's own mount namespace before bwrap starts (bubblewrap
/// 0.8 cannot make one): `lower` is the image's root, `upper` and `work` the container's.
/// Overlayfs may be mounted in a user namespace since Linux 5.11, so this works unprivileged too.
#[derive(Debug, Clone)]
pub(crate) struct OverlayMount {
    pub lower: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
}

impl OverlayMount {
    /// The mount's target and options, ready for the pre_exec hook (which may not allocate).
    /// overlayfs splits its options at `,` and lower dirs at `:`, so paths with those cannot be used.
    fn c_strings(&self, user_xattr: bool) -> std::io::Result<(std::ffi::CString, std::ffi::CString)> {
        let paths = [&self.lower, &self.upper, &self.work];
        if let Some(bad) = paths.iter().find(|p| p.to_string_lossy().contains([',', ':'])) {
            return Err(std::io::Error::other(format!(
                "cannot mount an overlay with {}: overlayfs cannot take a path with ',' or ':'",
                bad.display()
            )));
        }
        let mut data = format!(
            "lowerdir={},upperdir={},workdir={}",
            self.lower.display(),
            self.upper.display(),
            self.work.display()
        );
        if user_xattr {
            // Mounted in a user namespace: overlayfs' own xattrs must be `user.` ones.
            data.push_str(",userxattr");
        }
        let c = |s: String| std::ffi::CString::new(s).map_err(std::io::Error::other);
        Ok((c(self.merged.display().to_string())?, c(data)?))
    }
}

/// Who a container's process is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Identity {
    /// uid and primary gid; `None`: the pod's root.
    pub user: Option<(u32, u32)>,
    /// Supplementary groups. Set only where the node runs as root: an ordinary user's pod user
    /// namespace holds one gid, so there are no others to be a member of.
    pub groups: Vec<u32>,
}

/// How a container of another user than the pod's root runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UserMode {
    /// As the pod's root.
    PodRoot,
    /// As root: really as that uid, gid and groups, as containerd runs it. bwrap starts with the
    /// real uid and gid of the user and effective uid 0 (its setuid mode: it clones the user
    /// namespace as root, so the namespace belongs to root and not to the user, then runs
    /// everything else as the user), and the node maps every id to itself, so files in the
    /// image and in volumes keep their real owners.
    Real,
    /// As an ordinary user, in a shared PID namespace (which a namespace of the user's own
    /// could not join), on the host's root (read-only: the user could not make the mount
    /// points there), for uid 0 with another group, or where the user could not reach the
    /// image's root or a bind source (`reachable_by_anyone`): a user namespace of the
    /// container's own in which only that uid and gid exist, mapped to the pod's root; no
    /// supplementary groups.
    Mapped,
}

impl UserMode {
    pub fn of(isolation: Isolation, user: Option<(u32, u32)>, share_pid: bool, rootfs: &Rootfs) -> UserMode {
        match user {
            None => UserMode::PodRoot,
            // uid 0 with another group stays `Mapped`: bwrap's setuid mode needs a real uid other
            // than root, and a root of the identity namespace would hold every capability there.
            Some((uid, _)) if uid != 0 && isolation.root && !share_pid && matches!(rootfs, Rootfs::Overlay(_)) => {
                UserMode::Real
            }
            Some(_) => UserMode::Mapped,
        }
    }
}

/// Whether every directory above `path` lets anyone through (others' search bit). A `Real`
/// user's sandbox is built by that user, who must reach the image's root and every bind
/// source; where some directory bars the way (a data dir under a private home), the container
/// runs `Mapped` instead. Group and ACL rights that might let the user through are not
/// counted: the check errs on the side that works.
pub(crate) fn reachable_by_anyone(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.ancestors().skip(1).all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// The supplementary groups a container's processes get, set as root before exec: none as an
/// ordinary user or for a `Mapped` user (in whose namespace they would not exist).
fn groups_to_set(isolation: Isolation, mode: UserMode, identity: &Identity) -> Option<Vec<rustix::process::Gid>> {
    (isolation.root && mode != UserMode::Mapped)
        .then(|| identity.groups.iter().map(|g| rustix::process::Gid::from_raw(*g)).collect())
}

/// The whole id range mapped to itself: a `Real` container's user namespace changes no owner.
const IDENTITY_MAP: &str = "0 0 4294967295\n";

/// Credentials set before exec, as root: supplementary groups, and for bwrap's setuid mode the
/// real ids of the user with effective uid 0.
#[derive(Debug, Clone, Default)]
struct Creds {
    groups: Option<Vec<rustix::process::Gid>>,
    user: Option<(u32, u32)>,
}

/// Everything needed to start one container sandbox.
#[derive(Debug)]
pub(crate) struct ContainerSandbox {
    pub rootfs: Rootfs,
    pub identity: Identity,
    /// How the identity's user runs (`UserMode::of`, then `reachable_by_anyone` of the paths).
    pub user_mode: UserMode,
    pub binds: Vec<Bind>,
    pub env: Vec<(String, String)>,
    pub working_dir: String,
    pub argv: Vec<String>,
    pub hostname: String,
    /// The pod holder's namespaces, joined before bwrap starts (`None` only in unit tests of
    /// argument building: every pod has a holder).
    pub pod_ns: Option<Arc<PodNamespaces>>,
    /// With `shareProcessNamespace` the containers join the holder's PID namespace.
    pub share_pid: bool,
    /// `cgroup.procs` of each of the container's cgroups (at most two: memory and CPU are
    /// separate hierarchies on cgroup v1), opened for writing.
    pub cgroup_procs: Vec<File>,
    pub tty: Option<OwnedFd>,
    /// What the container's process may hold (a container runtime's default set unless the pod
    /// says otherwise).
    pub caps: super::caps::Capabilities,
}

/// A started sandbox: the outer bwrap (our child) and the pid of the process inside whose
/// namespaces execs join.
pub(crate) struct Started {
    pub child: Child,
    pub inner_pid: i32,
}

/// Ends a holder sandbox and reaps it: SIGKILL to the process inside first (the init of its PID
/// namespace: the kernel takes the rest of the namespace with it), which the outer bwrap reaps
/// before it exits, and then the outer one, waited for. Killing only the outer bwrap would leave
/// the inner processes to die by their parent-death signal as orphans, zombies until the host's
/// init gets round to them.
pub(crate) async fn end_holder(child: &mut Child, inner_pid: i32) {
    use rustix::process::{Pid, Signal, kill_process};
    if let Some(p) = Pid::from_raw(inner_pid)
        && child.try_wait().ok().flatten().is_none()
    {
        let _ = kill_process(p, Signal::KILL);
    }
    if tokio::time::timeout(std::time::Duration::from_secs(2), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// bwrap arguments that build the sandbox's filesystem view.
pub(crate) fn filesystem_args(rootfs: Option<&Path>, binds: &[Bind], working_dir: &str) -> Vec<String> {
    let root_src = rootfs.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
    let src_of = |p: &str| root_src.join(p.trim_start_matches('/'));
    let mut args: Vec<String> = Vec::new();

    // A mountPath (or workingDir) that does not exist in the read-only root cannot be created
    // by bwrap. For each, find its deepest existing ancestor and "expand" it: a tmpfs on it with
    // every entry bound back in, so the missing directory can be created on the tmpfs.
    let mut needed: Vec<&str> = binds.iter().map(|b| b.dest.as_str()).collect();
    needed.push(working_dir);
    let special = ["/proc", "/dev", "/tmp"];
    let mut expand: BTreeSet<PathBuf> = BTreeSet::new();
    for path in needed {
        let p = Path::new(path);
        if special.iter().any(|s| p.starts_with(s)) {
            continue;
        }
        // Inside another (writable) volume bwrap creates directories itself.
        if binds.iter().any(|b| b.dest != path && p.starts_with(&b.dest)) {
            continue;
        }
        let mut anc = p.to_path_buf();
        while !src_of(&anc.to_string_lossy()).exists() {
            if !anc.pop() {
                break;
            }
        }
        if anc != p {
            expand.insert(anc);
        }
    }
    let root_expanded = expand.contains(Path::new("/"));
    if !root_expanded {
        args.extend(["--ro-bind".into(), root_src.display().to_string(), "/".into()]);
    }
    let mut expand: Vec<PathBuf> = expand.into_iter().collect();
    expand.sort_by_key(|p| p.components().count());
    for dir in &expand {
        let d = dir.to_string_lossy().to_string();
        if d != "/" {
            args.extend(["--tmpfs".into(), d.clone()]);
        }
        let Ok(entries) = std::fs::read_dir(src_of(&d)) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let inside = if d == "/" { format!("/{name}") } else { format!("{d}/{name}") };
            if special.contains(&inside.as_str()) {
                continue;
            }
            let src = e.path();
            match std::fs::symlink_metadata(&src) {
                Ok(m) if m.file_type().is_symlink() => {
                    if let Ok(target) = std::fs::read_link(&src) {
                        args.extend(["--symlink".into(), target.display().to_string(), inside]);
                    }
                }
                Ok(_) => args.extend(["--ro-bind".into(), src.display().to_string(), inside]),
                Err(_) => {}
            }
        }
    }
    args.extend(["--dev".into(), "/dev".into(), "--proc".into(), "/proc".into()]);
    args.extend(["--perms".into(), "1777".into(), "--tmpfs".into(), "/tmp".into()]);
    let mut binds: Vec<&Bind> = binds.iter().collect();
    binds.sort_by_key(|b| Path::new(&b.dest).components().count());
    for b in binds {
        let flag = if b.read_only { "--ro-bind" } else { "--bind" };
        args.extend([flag.into(), b.source.display().to_string(), b.dest.clone()]);
    }
    if !src_of(working_dir).exists() {
        args.extend(["--dir".into(), working_dir.to_string()]);
    }
    args.extend(["--chdir".into(), working_dir.to_string()]);
    args
}

/// bwrap arguments for a container on a writable image root (already mounted on `merged`): bwrap
/// makes missing mount points itself there, so nothing needs expanding. `lower` tells whether
/// the working directory exists.
pub(crate) fn writable_root_args(merged: &Path, lower: &Path, binds: &[Bind], working_dir: &str) -> Vec<String> {
    let mut args: Vec<String> = vec!["--bind".into(), merged.display().to_string(), "/".into()];
    args.extend(["--dev".into(), "/dev".into(), "--proc".into(), "/proc".into()]);
    let mut binds: Vec<&Bind> = binds.iter().collect();
    binds.sort_by_key(|b| Path::new(&b.dest).components().count());
    for b in binds {
        let flag = if b.read_only { "--ro-bind" } else { "--bind" };
        args.extend([flag.into(), b.source.display().to_string(), b.dest.clone()]);
    }
    if !lower.join(working_dir.trim_start_matches('/')).exists() {
        args.extend(["--dir".into(), working_dir.to_string()]);
    }
    args.extend(["--chdir".into(), working_dir.to_string()]);
    args
}

/// Namespaces to join before exec, as descriptors the parent keeps open across the spawn. (A
/// shared PID namespace is not joined here but handed to bwrap as `--pidns`: only then does bwrap
/// mount a /proc of that namespace; after a setns of our own it would bind the host's /proc.)
#[derive(Debug, Clone, Copy, Default)]
struct Join {
    user: Option<RawFd>,
    net: Option<RawFd>,
}

/// `cgroup.procs` descriptors to write before exec: a fixed array, as the hook may not allocate.
type CgroupProcs = [Option<RawFd>; 2];

/// Sets up the pre_exec hook shared by every sandbox we spawn.
///
/// Safety of the hook: it runs in the forked child before exec and only calls setns(2),
/// prctl(2), write(2), fcntl(2), setsid(2) and ioctl(2) on descriptors opened before the fork,
/// unshare(2) and mount(2) with strings made before the fork, and setgroups(2), setresgid(2)
/// and setresuid(2) (raw system calls for this thread, the child's only one) with ids made
/// before the fork.
#[allow(clippy::too_many_arguments)]
fn install_pre_exec(
    cmd: &mut Command,
    join: Join,
    cgroup_procs: CgroupProcs,
    keep_open: [Option<RawFd>; 4],
    ctty: bool,
    overlay: Option<(std::ffi::CString, std::ffi::CString)>,
    creds: Creds,
) {
    let Join { user, net } = join;
    let hook = move || -> std::io::Result<()> {
        set_parent_process_death_signal(Some(Signal::KILL))?;
        // SAFETY: the descriptors are owned by the parent's Command/sandbox structures, which
        // outlive the spawn call, so they are open in the child.
        let borrow = |fd: RawFd| unsafe { BorrowedFd::borrow_raw(fd) };
        for fd in cgroup_procs.into_iter().flatten() {
            // "0" moves the writing process; its children (the sandbox) inherit the cgroup.
            // Before joining the pod's user namespace: moving needs the rights we have here.
            rustix::io::write(borrow(fd), b"0")?;
        }
        if let Some(fd) = user {
            // First: only inside the pod's user namespace do we hold the capabilities needed to
            // join its other namespaces (the forked child is single-threaded, as setns requires).
            move_into_link_name_space(borrow(fd), Some(LinkNameSpaceType::User))?;
        }
        if let Some(fd) = net {
            move_into_link_name_space(borrow(fd), Some(LinkNameSpaceType::Network))?;
        }
        if let Some((target, data)) = &overlay {
            use rustix::mount::{MountFlags, MountPropagationFlags, mount, mount_change};
            // A mount namespace of our own (bwrap's is made inside it), which receives nothing
            // from the host's and sends nothing back, with the container's root on `target`.
            // SAFETY: NEWNS only; no descriptor table is unshared.
            unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS)? };
            mount_change(c"/", MountPropagationFlags::DOWNSTREAM | MountPropagationFlags::REC)?;
            mount(c"overlay", target.as_c_str(), c"overlay", MountFlags::empty(), data.as_c_str())?;
        }
        // Last, as root: what comes before needs root's rights.
        if let Some(groups) = &creds.groups {
            rustix::thread::set_thread_groups(groups)?;
        }
        if let Some((uid, gid)) = creds.user {
            use rustix::process::{Gid, Uid};
            let gid = Gid::from_raw(gid);
            rustix::thread::set_thread_res_gid(gid, gid, gid)?;
            rustix::thread::set_thread_res_uid(Uid::from_raw(uid), Uid::ROOT, Uid::ROOT)?;
        }
        for fd in keep_open.into_iter().flatten() {
            fcntl_setfd(borrow(fd), FdFlags::empty())?;
        }
        if ctty {
            rustix::process::setsid()?;
            rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
        }
        Ok(())
    };
    // SAFETY: see the function comment; the closure allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Reads bwrap's `--info-fd` JSON (`{"child-pid": N, ...}`) from the pipe's read end.
fn read_child_pid(read: OwnedFd) -> std::io::Result<i32> {
    let mut f = File::from(read);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        let n = f.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.contains(&b'}') {
            break;
        }
    }
    #[derive(serde::Deserialize)]
    struct Info {
        #[serde(rename = "child-pid")]
        child_pid: i32,
    }
    let text = String::from_utf8_lossy(&buf);
    let end = text.find('}').map(|i| i + 1).unwrap_or(text.len());
    serde_json::from_str::<Info>(&text[..end])
        .map(|i| i.child_pid)
        .map_err(|e| std::io::Error::other(format!("bwrap did not report the sandbox pid: {e}")))
}

/// Maps every uid and gid of `pid`'s user namespace to itself; the namespace may not change
/// its groups (it has none to gain: they were set before bwrap started).
fn map_identity(pid: i32) -> std::io::Result<()> {
    let write = |file: &str, text: &str| {
        std::fs::write(format!("/proc/{pid}/{file}"), text)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot write the sandbox's {file}: {e}")))
    };
    write("uid_map", IDENTITY_MAP)?;
    write("setgroups", "deny\n")?;
    write("gid_map", IDENTITY_MAP)
}

/// Standard streams of a sandbox.
pub(crate) struct Stdios {
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
}

/// Spawns `bwrap <args>` with `env` as the whole environment, joining the given namespaces and
/// cgroup first, and waits for bwrap to report the pid of the sandbox's first process.
/// `pass_fd` stays open across exec (a descriptor named in `args`).
#[allow(clippy::too_many_arguments)]
async fn spawn_bwrap(
    spawner: &Spawner,
    args: Vec<String>,
    env: &[(String, String)],
    stdio: Stdios,
    join: Join,
    cgroup_procs: CgroupProcs,
    pass_fd: Option<RawFd>,
    overlay: Option<(std::ffi::CString, std::ffi::CString)>,
    creds: Creds,
) -> std::io::Result<Started> {
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let mut cmd = Command::new("bwrap");
    cmd.arg("--info-fd").arg(write.as_raw_fd().to_string());
    // A `Real` user: bwrap waits (--userns-block-fd) until we have mapped the namespace it made.
    let block = match creds.user {
        Some(_) => {
            let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
            cmd.args(["--unshare-user", "--userns-block-fd", &r.as_raw_fd().to_string()]);
            Some((r, w))
        }
        None => None,
    };
    cmd.args(args);
    cmd.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    cmd.stdin(stdio.stdin).stdout(stdio.stdout).stderr(stdio.stderr);
    cmd.kill_on_drop(true);
    let keep_open = [Some(write.as_raw_fd()), pass_fd, block.as_ref().map(|(r, _)| r.as_raw_fd()), None];
    install_pre_exec(&mut cmd, join, cgroup_procs, keep_open, false, overlay, creds);
    let child = spawner.spawn(cmd).await;
    // Our copies of the child's ends must go, or a bwrap that dies early never gives us EOF.
    drop(write);
    let block = block.map(|(_, w)| w);
    let mut child = child?;
    let started = tokio::task::spawn_blocking(move || {
        let pid = read_child_pid(read)?;
        if let Some(w) = block {
            map_identity(pid)?;
            rustix::io::write(&w, b"1")?;
        }
        Ok::<_, std::io::Error>(pid)
    })
    .await;
    match started {
        Ok(Ok(inner_pid)) => Ok(Started { child, inner_pid }),
        Ok(Err(e)) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            Err(e)
        }
        Err(e) => Err(std::io::Error::other(e)),
    }
}

/// Starts the pod holder: new network (loopback up) and PID namespaces, and as an ordinary user
/// a user namespace (or `node_user`, the node network's, which the holder then joins), with
/// `sleep` inside.
pub(crate) async fn start_holder(
    spawner: &Spawner,
    isolation: Isolation,
    pod_dir: &Path,
    hostname: &str,
    node_user: Option<&OwnedFd>,
) -> std::io::Result<(Started, PodNamespaces)> {
    let user_ns: &[&str] = if isolation.root || node_user.is_some() { &[] } else { &POD_USER_NS_ARGS };
    let args: Vec<String> = [
        "--die-with-parent",
        "--unshare-net",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--hostname",
        hostname,
        "--ro-bind",
        "/",
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
    ]
    .iter()
    .chain(user_ns)
    .map(|s| s.to_string())
    // The pod directory in the command line lets tests and operators find our processes.
    .chain(["--chdir".into(), pod_dir.display().to_string(), "--".into()])
    .chain(["sleep".into(), "infinity".into()])
    .collect();
    let stdio = Stdios { stdin: Stdio::null(), stdout: Stdio::null(), stderr: Stdio::piped() };
    let env = [("PATH".to_string(), DEFAULT_PATH.to_string())];
    let join = Join { user: node_user.map(|u| u.as_raw_fd()), net: None };
    let mut started =
        spawn_bwrap(spawner, args, &env, stdio, join, CgroupProcs::default(), None, None, Creds::default()).await?;
    let inner_pid = started.inner_pid;
    let open =
        |kind: &str| -> std::io::Result<OwnedFd> { Ok(File::open(format!("/proc/{inner_pid}/ns/{kind}"))?.into()) };
    let opened = match holder_set_up(&mut started).await {
        Ok(()) => (|| {
            let user = if isolation.root { None } else { Some(open("user")?) };
            Ok(PodNamespaces { user, net: open("net")?, pid: open("pid")? })
        })(),
        Err(e) => Err(e),
    };
    match opened {
        Ok(ns) => Ok((started, ns)),
        Err(e) => {
            let _ = started.child.start_kill();
            let _ = started.child.wait().await;
            Err(e)
        }
    }
}

/// Starts the node network's holder: a network namespace (and as an ordinary user a user
/// namespace owned by us, in which the pods' namespaces are made), with `sleep` inside. Returns
/// the holder and its namespaces.
pub(crate) async fn start_network_holder(
    spawner: &Spawner,
    isolation: Isolation,
    dir: &Path,
) -> std::io::Result<(Started, Option<OwnedFd>, OwnedFd)> {
    let user_ns: &[&str] = if isolation.root { &[] } else { &POD_USER_NS_ARGS };
    let args: Vec<String> =
        ["--die-with-parent", "--unshare-net", "--unshare-pid", "--ro-bind", "/", "/", "--proc", "/proc"]
            .iter()
            .chain(user_ns)
            .map(|s| s.to_string())
            .chain(["--chdir".into(), dir.display().to_string(), "--".into(), "sleep".into(), "infinity".into()])
            .collect();
    let stdio = Stdios { stdin: Stdio::null(), stdout: Stdio::null(), stderr: Stdio::piped() };
    let env = [("PATH".to_string(), DEFAULT_PATH.to_string())];
    let mut started =
        spawn_bwrap(spawner, args, &env, stdio, Join::default(), CgroupProcs::default(), None, None, Creds::default())
            .await?;
    let inner_pid = started.inner_pid;
    let open =
        |kind: &str| -> std::io::Result<OwnedFd> { Ok(File::open(format!("/proc/{inner_pid}/ns/{kind}"))?.into()) };
    let opened = match holder_set_up(&mut started).await {
        Ok(()) => (|| Ok((if isolation.root { None } else { Some(open("user")?) }, open("net")?)))(),
        Err(e) => Err(e),
    };
    match opened {
        Ok((user, net)) => Ok((started, user, net)),
        Err(e) => {
            let _ = started.child.start_kill();
            let _ = started.child.wait().await;
            Err(e)
        }
    }
}

/// A network namespace to run a tool in, with the user namespace that owns it (an ordinary
/// user's node), joined first.
#[derive(Clone, Copy)]
pub(crate) struct NsFds<'a> {
    pub user: Option<&'a OwnedFd>,
    pub net: &'a OwnedFd,
}

/// Runs `program args` inside the namespaces, `input` on its stdin; an error carries what it
/// printed on stderr. (The node network's `ip`, `nft` and `sysctl`: their own tools do this
/// best, and a netlink library would need setns of a user namespace, which a multi-threaded
/// process may not do.)
pub(crate) async fn run_in(
    spawner: &Spawner,
    ns: NsFds<'_>,
    program: &str,
    args: &[&str],
    input: &str,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear().env("PATH", DEFAULT_PATH);
    cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
    let join = Join { user: ns.user.map(|u| u.as_raw_fd()), net: Some(ns.net.as_raw_fd()) };
    install_pre_exec(&mut cmd, join, CgroupProcs::default(), [None; 4], false, None, Creds::default());
    let mut child =
        spawner.spawn(cmd).await.map_err(|e| std::io::Error::new(e.kind(), format!("cannot run {program}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).await?;
    }
    let out = child.wait_with_output().await?;
    if out.status.success() {
        return Ok(());
    }
    Err(std::io::Error::other(format!(
        "{program} {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// Spawns a long-running helper (slirp4netns) in the host's namespaces (joining `user` first,
/// where given: the user namespace of an ordinary user's node), killed with the node; `pass`
/// stays open across exec (descriptors named in `args`). `owner` (the node's directory) follows
/// the program's name in its command line, so tests and operators can tell whose it is.
pub(crate) async fn spawn_tool(
    spawner: &Spawner,
    program: &str,
    owner: &Path,
    args: &[String],
    pass: [Option<RawFd>; 3],
    user: Option<&OwnedFd>,
    stderr: Stdio,
) -> std::io::Result<Child> {
    let mut cmd = Command::new(program);
    cmd.arg0(format!("{program} {}", owner.display()));
    cmd.args(args).env_clear().env("PATH", DEFAULT_PATH);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr).kill_on_drop(true);
    let [a, b, c] = pass;
    let join = Join { user: user.map(|u| u.as_raw_fd()), net: None };
    install_pre_exec(&mut cmd, join, CgroupProcs::default(), [a, b, c, None], false, None, Creds::default());
    spawner.spawn(cmd).await.map_err(|e| std::io::Error::new(e.kind(), format!("cannot run {program}: {e}")))
}

/// Waits until the holder's sandbox is completely set up. bwrap reports the pid right after
/// clone(); the user namespace's uid/gid maps, loopback and the mounts come after that. A
/// container joining earlier finds an unmapped user namespace (its bwrap then fails: "No
/// permissions to create new namespace") or loopback still down. The set-up is over once the
/// holder's init (bwrap as PID 1) has started `sleep`.
async fn holder_set_up(started: &mut Started) -> std::io::Result<()> {
    // Gone already: the loop below reports how the holder ended.
    let bwrap_exe = std::fs::read_link(format!("/proc/{}/exe", started.inner_pid)).ok();
    loop {
        let child = first_child(started.inner_pid);
        if child.is_some_and(|c| std::fs::read_link(format!("/proc/{c}/exe")).is_ok_and(|exe| Some(exe) != bwrap_exe)) {
            return Ok(());
        }
        if let Some(status) = started.child.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut e) = started.child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut stderr).await;
            }
            return Err(std::io::Error::other(format!(
                "the pod holder ended during set-up ({status}): {}",
                stderr.trim()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_micros(500)).await;
    }
}

/// The first child of `pid`, from /proc/<pid>/task/<pid>/children, or by scanning every
/// process's parent where the kernel lacks that file (CONFIG_PROC_CHILDREN off).
fn first_child(pid: i32) -> Option<i32> {
    match std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        Ok(list) => list.split_whitespace().next()?.parse().ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
                let candidate: i32 = e.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(format!("/proc/{candidate}/stat")).ok()?;
                // Fields after the command (which may contain spaces) in parentheses: state, ppid.
                let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse::<i32>().ok()?;
                (ppid == pid).then_some(candidate)
            })
        }
        Err(_) => None,
    }
}

/// A shell-like exit code: the code, or 128 + the signal that killed the process.
pub(crate) fn exit_code(s: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
}

pub(crate) const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Starts one container sandbox.
pub(crate) async fn start_container(
    spawner: &Spawner,
    isolation: Isolation,
    sb: ContainerSandbox,
    stdio: Stdios,
) -> std::io::Result<Started> {
    let mut args: Vec<String> = vec!["--die-with-parent".into(), "--unshare-ipc".into()];
    let mode = sb.user_mode;
    if let (UserMode::Mapped, Some((uid, gid))) = (mode, sb.identity.user) {
        // The pod's user namespace has one uid (0) as an ordinary user, so another user needs a
        // namespace of its own, mapping it to the pod's root; bwrap then drops every capability.
        args.extend(["--unshare-user".into(), "--uid".into(), uid.to_string(), "--gid".into(), gid.to_string()]);
    }
    let creds = Creds {
        groups: groups_to_set(isolation, mode, &sb.identity),
        user: sb.identity.user.filter(|_| mode == UserMode::Real),
    };
    args.extend(["--unshare-uts".into(), "--hostname".into(), sb.hostname.clone()]);
    if sb.pod_ns.is_none() || !sb.share_pid {
        args.push("--unshare-pid".into());
    }
    let shared_pid = sb.pod_ns.as_ref().filter(|_| sb.share_pid).map(|n| n.pid.as_raw_fd());
    if let Some(fd) = shared_pid {
        args.extend(["--pidns".into(), fd.to_string()]);
    } else {
        // The command is PID 1 of its namespace, as in a container runtime: killing it ends
        // every process of the container.
        args.push("--as-pid-1".into());
    }
    // Its own session, so a shared-PID container can be killed as a process group.
    args.push("--new-session".into());
    let overlay = match &sb.rootfs {
        Rootfs::ReadOnly(root) => {
            args.extend(filesystem_args(root.as_deref(), &sb.binds, &sb.working_dir));
            None
        }
        Rootfs::Overlay(o) => {
            args.extend(writable_root_args(&o.merged, &o.lower, &sb.binds, &sb.working_dir));
            Some(o.c_strings(!isolation.root)?)
        }
    };
    if mode == UserMode::PodRoot {
        args.extend(super::caps::bwrap_args(sb.caps));
    }
    args.push("--".into());
    args.extend(sb.argv.iter().cloned());
    let join = Join {
        user: sb.pod_ns.as_ref().and_then(|n| n.user.as_ref()).map(|u| u.as_raw_fd()),
        net: sb.pod_ns.as_ref().map(|n| n.net.as_raw_fd()),
    };
    if sb.cgroup_procs.len() > 2 {
        return Err(std::io::Error::other("a container joins at most two cgroups (memory and CPU)"));
    }
    let cg: CgroupProcs = std::array::from_fn(|i| sb.cgroup_procs.get(i).map(|f| f.as_raw_fd()));
    let mut started = spawn_bwrap(spawner, args, &sb.env, stdio, join, cg, shared_pid, overlay, creds).await?;
    drop(sb.tty);
    // bwrap reports the pid right after clone(), before the sandbox's mounts exist; an exec
    // joining too early would see a half-built filesystem. The process has exec'd the command
    // once its executable is no longer bwrap.
    let bwrap_exe = std::fs::read_link(format!("/proc/{}/exe", started.child.id().unwrap_or(0))).ok();
    let exe_link = format!("/proc/{}/exe", started.inner_pid);
    loop {
        match std::fs::read_link(&exe_link) {
            Ok(exe) if Some(&exe) != bwrap_exe.as_ref() => break,
            Ok(_) => {}
            // Gone already (a command that exits at once): nothing left to join.
            Err(_) => break,
        }
        if let Ok(Some(_)) = started.child.try_wait() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_micros(500)).await;
    }
    Ok(started)
}

/// Whether `name` names an executable in the container whose first process is `inner_pid`,
/// looked up as runc's exec does (`PATH` for a bare name, else relative to `working_dir`);
/// `Err` carries runc's words for why not. Paths resolve inside the container's root
/// (`RESOLVE_IN_ROOT`, so its absolute symlinks stay in it). Where that cannot be checked (an old
/// kernel, no access) the command is given the benefit of the doubt.
pub(crate) fn find_executable(inner_pid: i32, name: &str, path_env: &str, working_dir: &str) -> Result<(), String> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let Ok(root) = rustix::fs::open(format!("/proc/{inner_pid}/root"), OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
    else {
        return Ok(());
    };
    // Some(true): an executable file; Some(false): exists but is not one; None: absent.
    let probe = |path: &str| -> Result<Option<bool>, ()> {
        match rustix::fs::openat2(&root, path, OFlags::PATH, Mode::empty(), ResolveFlags::IN_ROOT) {
            Ok(fd) => {
                let st = rustix::fs::fstat(&fd).map_err(|_| ())?;
                let file = rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile;
                Ok(Some(file && st.st_mode & 0o111 != 0))
            }
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => Ok(None),
            Err(_) => Err(()),
        }
    };
    if name.contains('/') {
        let path = if name.starts_with('/') { name.to_owned() } else { format!("{working_dir}/{name}") };
        return match probe(&path) {
            Ok(Some(true)) | Err(()) => Ok(()),
            Ok(Some(false)) => Err(format!("exec: {name:?}: permission denied")),
            Ok(None) => Err(format!("exec: {name:?}: stat {name}: no such file or directory")),
        };
    }
    for dir in path_env.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let path = if dir.starts_with('/') { format!("{dir}/{name}") } else { format!("{working_dir}/{dir}/{name}") };
        match probe(&path) {
            Ok(Some(true)) | Err(()) => return Ok(()),
            Ok(_) => {}
        }
    }
    Err(format!("exec: {name:?}: executable file not found in $PATH"))
}

/// Builds the `nsenter` command for an exec into a running container, as its user.
pub(crate) fn exec_command(
    inner_pid: i32,
    isolation: Isolation,
    mode: UserMode,
    identity: &Identity,
    working_dir: &str,
    env: &[(String, String)],
    argv: &[String],
) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg("--target").arg(inner_pid.to_string());
    // A container with a user of its own has a user namespace of its own: joined the same way,
    // the exec runs as that user (a `Mapped` one is our uid; a `Real` one nsenter switches to,
    // keeping the groups set before it started).
    if !isolation.root || mode != UserMode::PodRoot {
        // The container's namespaces belong to the pod's user namespace: nsenter joins it first
        // and so gets the capabilities to join the rest. Our uid already is the pod's uid 0;
        // without --preserve-credentials nsenter would call setgroups, which bwrap denied.
        cmd.args(["--user", "--preserve-credentials"]);
    }
    if let (UserMode::Real, Some((uid, gid))) = (mode, identity.user) {
        cmd.args(["--setgid", &gid.to_string(), "--setuid", &uid.to_string()]);
    }
    cmd.args(["--mount", "--pid", "--net", "--uts", "--ipc"]);
    cmd.arg(format!("--wdns={working_dir}"));
    cmd.arg("--").args(argv);
    cmd.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    cmd.kill_on_drop(true);
    cmd
}

/// Prepares an exec command's pre_exec hook (death signal, the container's cgroups, optional
/// controlling terminal). An exec runs inside its container's cgroups, as runc puts it there:
/// its memory counts against the container's limit and an OOM kill is the container's.
/// `cgroup_procs` must stay open until the command is spawned.
pub(crate) fn prepare_exec(
    cmd: &mut Command,
    tty: bool,
    cgroup_procs: &[File],
    isolation: Isolation,
    mode: UserMode,
    identity: &Identity,
) {
    if !tty {
        // A process group of its own, so the whole exec (nsenter and its child) can be killed.
        cmd.process_group(0);
    }
    let cg: CgroupProcs = std::array::from_fn(|i| cgroup_procs.get(i).map(|f| f.as_raw_fd()));
    let creds = Creds { groups: groups_to_set(isolation, mode, identity), user: None };
    install_pre_exec(cmd, Join::default(), cg, [None; 4], tty, None, creds);
}

/// A terminal pair: the master stays with the node, the slave becomes the process's stdio.
pub(crate) struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

pub(crate) fn open_pty() -> std::io::Result<Pty> {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(std::ffi::OsStr::new(std::str::from_utf8(name.as_bytes()).unwrap_or("/dev/ptmx")))?;
    Ok(Pty { master, slave: slave.into() })
}

pub(crate) fn set_winsize(master: impl AsFd, width: u16, height: u16) -> std::io::Result<()> {
    let ws = rustix::termios::Winsize { ws_row: height, ws_col: width, ws_xpixel: 0, ws_ypixel: 0 };
    rustix::termios::tcsetwinsize(master, ws)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(args: &[String], a: &str, b: &str) -> Option<usize> {
        args.windows(2).position(|w| w[0] == a && w[1] == b)
    }

    #[test]
    fn a_user_runs_as_itself_only_under_a_root_node_in_an_image_and_its_own_pid_namespace() {
        let p = PathBuf::from("/x");
        let image = Rootfs::Overlay(OverlayMount { lower: p.clone(), upper: p.clone(), work: p.clone(), merged: p });
        let host = Rootfs::ReadOnly(None);
        let (root, user) = (Isolation { root: true }, Isolation { root: false });
        let app = Some((1234, 2345));
        assert_eq!(UserMode::of(root, app, false, &image), UserMode::Real);
        assert_eq!(UserMode::of(root, None, false, &image), UserMode::PodRoot);
        assert_eq!(UserMode::of(user, app, false, &image), UserMode::Mapped);
        assert_eq!(UserMode::of(root, app, true, &image), UserMode::Mapped);
        assert_eq!(UserMode::of(root, app, false, &host), UserMode::Mapped);
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("open/inner")).unwrap();
        let mode = |p: &Path, m: u32| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        };
        mode(d.path(), 0o755);
        mode(&d.path().join("open"), 0o711);
        assert!(reachable_by_anyone(&d.path().join("open/inner/merged")));
        mode(&d.path().join("open"), 0o700);
        assert!(!reachable_by_anyone(&d.path().join("open/inner/merged")));
        // Root with another group: never the identity namespace's root.
        assert_eq!(UserMode::of(root, Some((0, 50)), false, &image), UserMode::Mapped);
        // Groups are set as root only, and not where they would not exist.
        let id = Identity { user: app, groups: vec![2345, 50] };
        assert_eq!(groups_to_set(root, UserMode::Real, &id).map(|g| g.len()), Some(2));
        assert!(groups_to_set(root, UserMode::Mapped, &id).is_none());
        assert!(groups_to_set(user, UserMode::PodRoot, &id).is_none());
    }

    #[test]
    fn namespace_errors_name_the_kernel_setting_and_the_remedy() {
        let bwrap = || "bwrap: No permissions to create new namespace".to_string();
        let msg = |root, s: UsernsSysctls| namespaces_unavailable(root, bwrap(), &s).to_string();
        let debian = UsernsSysctls {
            unprivileged_userns_clone: Some(0),
            max_user_namespaces: Some(63000),
            ..Default::default()
        };
        assert_eq!(
            msg(false, debian),
            "bubblewrap cannot create a pod's namespaces here: unprivileged user namespaces are disabled \
             (kernel.unprivileged_userns_clone = 0); allow them with `sysctl -w kernel.unprivileged_userns_clone=1`, \
             or run the node as root (bwrap said: bwrap: No permissions to create new namespace)"
        );
        // The upstream switch wins: with it at 0 the Debian one does not matter.
        let off =
            UsernsSysctls { unprivileged_userns_clone: Some(1), max_user_namespaces: Some(0), ..Default::default() };
        assert!(
            msg(false, off)
                .contains("user.max_user_namespaces = 0); allow them with `sysctl -w user.max_user_namespaces=15000`")
        );
        let ubuntu = UsernsSysctls {
            apparmor_restrict_unprivileged_userns: Some(1),
            max_user_namespaces: Some(63000),
            ..Default::default()
        };
        assert!(msg(false, ubuntu).contains("AppArmor restricts unprivileged user namespaces"));
        // Nothing in the kernel settings explains it: a seccomp policy, most likely.
        let unknown = msg(false, UsernsSysctls { max_user_namespaces: Some(63000), ..Default::default() });
        assert!(
            unknown.contains("this user may not create user namespaces") && unknown.contains("run the node as root"),
            "{unknown}"
        );
        // Root without CAP_SYS_ADMIN (an unprivileged container): the sysctls are beside the point.
        let root = msg(true, debian);
        assert!(root.contains("CAP_SYS_ADMIN") && !root.contains("unprivileged_userns_clone"), "{root}");
    }

    #[test]
    fn exec_joins_the_pods_user_namespace_first_when_unprivileged() {
        let argv = ["true".to_string()];
        let args = |root| {
            let cmd = exec_command(42, Isolation { root }, UserMode::PodRoot, &Identity::default(), "/w", &[], &argv);
            cmd.as_std().get_args().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>()
        };
        let unprivileged = args(false);
        assert_eq!(&unprivileged[..4], ["--target", "42", "--user", "--preserve-credentials"]);
        assert!(
            ["--mount", "--pid", "--net", "--uts", "--ipc"].iter().all(|ns| unprivileged.contains(&ns.to_string()))
        );
        assert!(!args(true).contains(&"--user".to_string()), "root stays in the host's user namespace");
    }

    #[test]
    fn existing_mount_path_keeps_the_plain_read_only_root() {
        let binds = vec![Bind { source: "/srv/x".into(), dest: "/etc".into(), read_only: false }];
        let args = filesystem_args(None, &binds, "/");
        assert_eq!(&args[..3], ["--ro-bind", "/", "/"]);
        assert!(pos(&args, "--bind", "/srv/x").is_some());
    }

    #[test]
    fn missing_top_level_mount_path_expands_the_root() {
        let binds = vec![Bind { source: "/srv/b".into(), dest: "/builds/x".into(), read_only: false }];
        let args = filesystem_args(None, &binds, "/builds/x");
        // The root is no longer bound as a whole; its entries are.
        assert!(pos(&args, "--ro-bind", "/").is_none());
        assert!(pos(&args, "--ro-bind", "/etc").is_some());
        assert!(pos(&args, "--bind", "/srv/b").is_some());
        // /proc, /dev and /tmp are mounted fresh, not bound from the host.
        assert!(pos(&args, "--ro-bind", "/proc").is_none());
    }

    #[test]
    fn missing_nested_mount_path_expands_only_its_existing_parent() {
        let binds = vec![Bind { source: "/srv/c".into(), dest: "/etc/keel-test/conf".into(), read_only: true }];
        let args = filesystem_args(None, &binds, "/");
        assert_eq!(&args[..3], ["--ro-bind", "/", "/"]);
        let t = pos(&args, "--tmpfs", "/etc").expect("tmpfs on /etc");
        let b = pos(&args, "--ro-bind", "/srv/c").expect("volume bind");
        assert!(t < b, "the tmpfs must come before the volume bind: {args:?}");
    }
}
