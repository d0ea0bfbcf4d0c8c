//! Linux capabilities of a container's processes, granted as containerd grants them: the
//! runtime's default set, changed by `securityContext.capabilities.add/drop`, or everything with
//! `privileged: true`. bwrap sets them for the container's process (`--cap-drop ALL` then
//! `--cap-add` each); execs get them through the bounding set (see `session::exec`).

use k8s_openapi::api::core::v1::Container;

/// Capability names by number (`linux/capability.h`), without the `CAP_` prefix.
const NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// containerd's (and Docker's) default set: CapEff `00000000a80425fb`.
const DEFAULT: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// What a container's processes may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Capabilities {
    /// `privileged: true`: every capability the node itself may grant.
    All,
    /// A bit per capability number.
    Set(u64),
}

fn bit(name: &str) -> Option<u64> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    NAMES.iter().position(|n| *n == bare).map(|i| 1u64 << i)
}

/// The container's capabilities per its securityContext; an unknown name is an error naming it
/// (containerd fails the container the same way).
pub(crate) fn for_container(c: &Container) -> Result<Capabilities, String> {
    let sc = c.security_context.as_ref();
    if sc.and_then(|s| s.privileged).unwrap_or(false) {
        return Ok(Capabilities::All);
    }
    let mut set = DEFAULT.iter().filter_map(|n| bit(n)).fold(0, |a, b| a | b);
    let all = (1u64 << NAMES.len()) - 1;
    let (add, drop) = sc
        .and_then(|s| s.capabilities.as_ref())
        .map(|c| (c.add.clone().unwrap_or_default(), c.drop.clone().unwrap_or_default()))
        .unwrap_or_default();
    let is_all = |n: &String| n.eq_ignore_ascii_case("ALL");
    // containerd's order: ALL first (add, then drop), then the single names (add, then drop).
    if add.iter().any(is_all) {
        set = all;
    }
    if drop.iter().any(is_all) {
        set = 0;
    }
    let lookup = |n: &String| bit(n).ok_or_else(|| format!("unknown capability {n:?}"));
    for n in add.iter().filter(|n| !is_all(n)) {
        set |= lookup(n)?;
    }
    for n in drop.iter().filter(|n| !is_all(n)) {
        set &= !lookup(n)?;
    }
    Ok(Capabilities::Set(set))
}

/// This process's bounding set: no sandbox can hold more, so larger requests are cut to it.
fn own_bounding_set() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapBnd:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX)
}

fn names(set: u64) -> impl Iterator<Item = &'static str> {
    NAMES.iter().enumerate().filter(move |(i, _)| set & (1 << i) != 0).map(|(_, n)| *n)
}

/// bwrap arguments that give the sandbox's process exactly these capabilities.
pub(crate) fn bwrap_args(caps: Capabilities) -> Vec<String> {
    match caps {
        Capabilities::All => vec!["--cap-add".into(), "ALL".into()],
        Capabilities::Set(set) => {
            let mut args = vec!["--cap-drop".into(), "ALL".into()];
            for n in names(set & own_bounding_set()) {
                args.extend(["--cap-add".into(), format!("CAP_{n}")]);
            }
            args
        }
    }
}

/// `setpriv` arguments (before `--`) that leave an exec'd root process these capabilities: a
/// process running as uid 0 gets its bounding set on exec.
pub(crate) fn setpriv_args(set: u64) -> Vec<String> {
    let mut bounding = String::from("-all");
    for n in names(set) {
        bounding.push_str(",+");
        bounding.push_str(&n.to_ascii_lowercase());
    }
    vec!["--bounding-set".into(), bounding, "--inh-caps".into(), "-all".into()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(sc: serde_json::Value) -> Container {
        serde_json::from_value(serde_json::json!({"name": "c", "securityContext": sc})).unwrap()
    }

    #[test]
    fn the_default_set_is_containerds_and_add_drop_change_it() {
        assert_eq!(for_container(&container(serde_json::json!({}))), Ok(Capabilities::Set(0xa80425fb)));
        let c =
            container(serde_json::json!({"capabilities": {"add": ["NET_ADMIN", "CAP_SYS_PTRACE"], "drop": ["KILL"]}}));
        assert_eq!(for_container(&c), Ok(Capabilities::Set((0xa80425fb | 1 << 12 | 1 << 19) & !(1 << 5))));
        let c = container(serde_json::json!({"capabilities": {"drop": ["ALL"], "add": ["CHOWN"]}}));
        assert_eq!(for_container(&c), Ok(Capabilities::Set(1)));
        let c = container(serde_json::json!({"capabilities": {"add": ["ALL"], "drop": ["SYS_ADMIN"]}}));
        assert_eq!(for_container(&c), Ok(Capabilities::Set(((1 << 41) - 1) & !(1 << 21))));
        let c = container(serde_json::json!({"privileged": true, "capabilities": {"drop": ["ALL"]}}));
        assert_eq!(for_container(&c), Ok(Capabilities::All));
        let c = container(serde_json::json!({"capabilities": {"add": ["WIZARDRY"]}}));
        assert_eq!(for_container(&c), Err("unknown capability \"WIZARDRY\"".into()));
        assert_eq!(setpriv_args(0b100001)[1], "-all,+chown,+kill");
    }
}
