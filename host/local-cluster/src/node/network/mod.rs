//! The pod network: every pod gets an IP of its own on a bridge, pods reach each other and
//! Services' ClusterIPs, and (with egress) whatever the host can reach, as on a node of a real
//! cluster. The host's own loopback is reachable from pods as `host.keel.internal`.
//!
//! Nothing of it lives in the host's network namespace, so nothing is left behind when the node
//! dies, however it dies (rootless podman's design):
//! - a *node network namespace*, held by a holder process like a pod's (`bwrap --unshare-net`,
//!   as an ordinary user in a user namespace of its own that every pod then shares), with the
//!   bridge `keel0` (`10.244.0.1/16`), forwarding on, and the nftables rules (`nft`): NAT of
//!   egress, Services' ClusterIPs (`nft.rs`);
//! - per pod, a veth pair: one end on the bridge, the other the pod's `eth0` with its IP and a
//!   default route through the bridge (`ip`, from iproute2); it goes away with the pod's
//!   network namespace;
//! - for egress, `slirp4netns` (rootless podman's and docker's) connects the node namespace to
//!   the host's network without privileges: a tap device `keel-up` in the node namespace, and
//!   the connections the pods open there become the host's own sockets. Its gateway address
//!   (`169.254.1.2`) is the host's loopback, which gives `host.keel.internal`, and `169.254.1.3`
//!   forwards DNS to the host's resolvers. (pasta, faster, was tried first: Debian 12's never
//!   refuses a connection to a closed port, the client waits two minutes for its timeout,
//!   which breaks every "wait until the database listens" loop of a CI job.)
//!
//! Everything is killed with the node: the holder and slirp4netns die with the node's spawner
//! thread (PR_SET_PDEATHSIG), and with the holder goes the namespace and all its links and rules.

pub mod nft;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;

use tokio::process::Child;

use super::sandbox::{self, Isolation, NsFds, Spawner};

/// The bridge in the node's network namespace, and its address (the pods' gateway; also the
/// node's InternalIP and the pods' `hostIP`).
pub const BRIDGE: &str = "keel0";
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The links' MTU (the largest slirp4netns takes), so a pod's segments cross the bridge and the
/// uplink without being cut to 1500 bytes (with 1500, egress ran at a tenth of the speed).
const MTU: u32 = 65520;
/// Pod IPs (kind's default pod subnet).
pub const POD_CIDR: &str = "10.244.0.0/16";
const POD_PREFIX: u8 = 16;
/// slirp4netns' network on the uplink (its gateway is `.2`, its DNS `.3`, the tap `.100`).
const UPLINK_CIDR: &str = "169.254.1.0/24";
/// slirp4netns' gateway: connections to it reach the host's loopback.
pub const HOST_LOOPBACK_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 2);
/// slirp4netns' DNS forwarder (to the host's own resolvers, a loopback one included).
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 3);
const UPLINK: &str = "keel-up";
/// The names under which pods reach the host's loopback (`host.docker.internal` too, so job
/// definitions written for Docker work unchanged).
pub const HOST_LOOPBACK_NAMES: [&str; 2] = ["host.keel.internal", "host.docker.internal"];

/// How pods are networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PodNetwork {
    /// Each pod has only its own loopback, and reports `127.0.0.1` as its IP.
    #[default]
    None,
    /// Pod IPs on the node's bridge and Services' ClusterIPs, no way out of the node.
    Bridge,
    /// As `Bridge`, and the pods reach what the host reaches (and the host's loopback) through
    /// slirp4netns.
    Egress,
}

impl std::str::FromStr for PodNetwork {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(PodNetwork::None),
            "bridge" => Ok(PodNetwork::Bridge),
            "egress" => Ok(PodNetwork::Egress),
            _ => Err(format!("pod network {s:?} is not one of egress, bridge, none")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot start the node's network namespace: {0}")]
    Holder(#[source] std::io::Error),
    #[error("cannot set up the node's network ({step}): {source}")]
    Setup {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pods cannot reach the network: slirp4netns (Debian package `slirp4netns`) could not connect the node's network namespace: {0}; install slirp4netns, or start the cluster with --pod-network=bridge (no egress)"
    )]
    Egress(String),
    #[error("no pod IP is free in {POD_CIDR}")]
    Exhausted,
    #[error("cannot connect the pod to the node's bridge: {0}")]
    Attach(#[source] std::io::Error),
}

/// The node's network namespace and what runs for it.
pub(crate) struct NodeNetwork {
    ns: NodeNamespaces,
    /// The holder and slirp4netns: ended and reaped by `stop`, else killed when dropped (and by
    /// the kernel when the node dies).
    holder: Mutex<Option<sandbox::Started>>,
    egress_helper: Mutex<Option<Child>>,
    ips: Mutex<Ips>,
    /// The Services' ruleset last applied (not applied again while unchanged).
    services: tokio::sync::Mutex<Option<Vec<nft::ServicePort>>>,
    egress: bool,
}

struct NodeNamespaces {
    user: Option<OwnedFd>,
    net: OwnedFd,
}

impl NodeNamespaces {
    fn fds(&self) -> NsFds<'_> {
        NsFds { user: self.user.as_ref(), net: &self.net }
    }
}

/// Pod IPs in use, handed out round-robin (as the host-local IPAM plugin does), so an address
/// is not reused while a deleted pod's link may still be going away.
struct Ips {
    used: BTreeSet<u32>,
    last: u32,
    /// Names the node side of each veth pair; never reused within a node's life.
    links: u64,
}

impl Ips {
    /// Host numbers 2 ..= 2^16 - 2 of the pod subnet (1 is the bridge).
    fn take(&mut self) -> Option<u32> {
        let max = (1u32 << (32 - POD_PREFIX)) - 2;
        let next = (self.last + 1..=max).chain(2..=self.last).find(|h| *h >= 2 && !self.used.contains(h))?;
        self.used.insert(next);
        self.last = next;
        Some(next)
    }
}

fn pod_ip(host: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) | host)
}

/// A pod's place on the bridge; its IP goes back to the node when dropped.
pub(crate) struct PodLink {
    pub ip: Ipv4Addr,
}

impl NodeNetwork {
    /// Makes the node's network namespace with its bridge and base rules, and with `egress`
    /// connects it to the host's network through slirp4netns.
    pub async fn start(
        spawner: &Spawner,
        isolation: Isolation,
        dir: &Path,
        egress: bool,
    ) -> Result<Self, NetworkError> {
        let (holder, user, net) =
            sandbox::start_network_holder(spawner, isolation, dir).await.map_err(NetworkError::Holder)?;
        let ns = NodeNamespaces { user, net };
        let setup = |step| move |source| NetworkError::Setup { step, source };
        sandbox::run_in(
            spawner,
            ns.fds(),
            "ip",
            &["-batch", "-"],
            &format!(
                "link set lo up\nlink add {BRIDGE} mtu {MTU} type bridge\naddr add {BRIDGE_IP}/{POD_PREFIX} dev {BRIDGE}\nlink set {BRIDGE} up\n"
            ),
        )
        .await
        .map_err(setup("the bridge, with `ip` of iproute2"))?;
        // Written from inside the namespace: /proc/sys/net is the writer's network namespace's.
        sandbox::run_in(spawner, ns.fds(), "sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"], "")
            .await
            .map_err(setup("forwarding, with `sysctl` of procps"))?;
        sandbox::run_in(spawner, ns.fds(), "nft", &["-f", "-"], &nft::base())
            .await
            .map_err(setup("NAT rules, with `nft` of nftables"))?;
        let network = NodeNetwork {
            ns,
            holder: Mutex::new(Some(holder)),
            egress_helper: Mutex::new(None),
            ips: Mutex::new(Ips { used: BTreeSet::new(), last: 1, links: 0 }),
            services: tokio::sync::Mutex::new(None),
            egress,
        };
        if egress {
            let helper = network.start_slirp(spawner, dir).await?;
            *network.egress_helper.lock().expect("egress lock") = Some(helper);
        }
        Ok(network)
    }

    /// slirp4netns (our child, so it dies with the node), attached to the node namespace by
    /// descriptors, in a sandbox of its own (its mount namespace, no capabilities, seccomp):
    /// it handles what the pods send. Returns once it says the interface is configured.
    async fn start_slirp(&self, spawner: &Spawner, dir: &Path) -> Result<Child, NetworkError> {
        let (ready_read, ready_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| NetworkError::Egress(format!("cannot make a pipe: {e}")))?;
        let net_fd = self.ns.net.as_raw_fd();
        let mut args: Vec<String> = vec![
            "--configure".into(),
            format!("--mtu={MTU}"),
            format!("--cidr={UPLINK_CIDR}"),
            format!("--ready-fd={}", ready_write.as_raw_fd()),
            "--enable-sandbox".into(),
            "--enable-seccomp".into(),
            "--netns-type=path".into(),
        ];
        let pass = [Some(net_fd), Some(ready_write.as_raw_fd()), None];
        args.extend([format!("/proc/self/fd/{net_fd}"), UPLINK.into()]);
        // Its messages go to a file: a pipe nobody reads could fill up and stop it.
        let log_path = dir.join("slirp4netns.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| NetworkError::Egress(format!("{}: {e}", log_path.display())))?;
        // An ordinary user's slirp4netns starts inside the node's user namespace, as its root
        // (whose capabilities its sandbox needs). Handed the namespace with `--userns-path`
        // instead, slirp4netns 1.2 fails to become root there ("setegid(0); parent failed").
        let mut child =
            sandbox::spawn_tool(spawner, "slirp4netns", dir, &args, pass, self.ns.user.as_ref(), log.into())
                .await
                .map_err(|e| NetworkError::Egress(e.to_string()))?;
        // Our copy of the write end goes, so a slirp4netns that dies early gives EOF.
        drop(ready_write);
        let ready = tokio::task::spawn_blocking(move || {
            let mut byte = [0u8; 1];
            rustix::io::read(&ready_read, &mut byte).map(|n| n == 1)
        });
        let said = |log_path: &Path| {
            let text = std::fs::read_to_string(log_path).unwrap_or_default();
            text.lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>().join("; ")
        };
        match tokio::time::timeout(std::time::Duration::from_secs(10), ready).await {
            Ok(Ok(Ok(true))) => Ok(child),
            Ok(_) => {
                let status = child.wait().await.map(|s| s.to_string()).unwrap_or_default();
                Err(NetworkError::Egress(format!("it ended ({status}): {}", said(&log_path))))
            }
            Err(_) => {
                let _ = child.start_kill();
                Err(NetworkError::Egress(format!(
                    "it did not configure the namespace within 10 s: {}",
                    said(&log_path)
                )))
            }
        }
    }

    pub fn egress(&self) -> bool {
        self.egress
    }

    /// Puts the pod whose holder is `holder_pid` (network namespace `pod_net`) on the bridge.
    pub async fn attach(&self, spawner: &Spawner, holder_pid: i32, pod_net: &OwnedFd) -> Result<PodLink, NetworkError> {
        let (host, link) = {
            let mut ips = self.ips.lock().expect("ips lock");
            let host = ips.take().ok_or(NetworkError::Exhausted)?;
            ips.links += 1;
            (host, format!("kv{:x}", ips.links))
        };
        let ip = pod_ip(host);
        let result = async {
            sandbox::run_in(
                spawner,
                self.ns.fds(),
                "ip",
                &["-batch", "-"],
                &format!(
                    "link add {link} mtu {MTU} type veth peer name eth0 mtu {MTU} netns {holder_pid}\n\
                     link set {link} master {BRIDGE}\n\
                     link set {link} type bridge_slave hairpin on\n\
                     link set {link} up\n"
                ),
            )
            .await?;
            let pod = NsFds { user: self.ns.user.as_ref(), net: pod_net };
            sandbox::run_in(
                spawner,
                pod,
                "ip",
                &["-batch", "-"],
                &format!("addr add {ip}/{POD_PREFIX} dev eth0\nlink set eth0 up\nroute add default via {BRIDGE_IP}\n"),
            )
            .await
        }
        .await;
        match result {
            Ok(()) => Ok(PodLink { ip }),
            Err(e) => {
                self.release(ip);
                Err(NetworkError::Attach(e))
            }
        }
    }

    /// The pod's IP is free again (its link went with its network namespace).
    pub fn release(&self, ip: Ipv4Addr) {
        let host = u32::from(ip) & ((1u32 << (32 - POD_PREFIX)) - 1);
        self.ips.lock().expect("ips lock").used.remove(&host);
    }

    /// The user namespace pods join (as an ordinary user): the node namespace's owner, which
    /// may move a link into a pod's namespace only when it owns that namespace too.
    pub fn user_ns(&self) -> Option<&OwnedFd> {
        self.ns.user.as_ref()
    }

    /// Makes the Services' rules what `ports` says (kube-proxy's sync).
    pub async fn sync_services(&self, spawner: &Spawner, mut ports: Vec<nft::ServicePort>) -> Result<(), NetworkError> {
        ports.sort();
        let mut applied = self.services.lock().await;
        if applied.as_ref() == Some(&ports) {
            return Ok(());
        }
        sandbox::run_in(spawner, self.ns.fds(), "nft", &["-f", "-"], &nft::services(&ports))
            .await
            .map_err(|source| NetworkError::Setup { step: "Service rules, with `nft`", source })?;
        *applied = Some(ports);
        Ok(())
    }

    /// Stops slirp4netns and the holder, and reaps them: nothing of the network outlives this.
    pub async fn stop(&self) {
        let helper = self.egress_helper.lock().expect("egress lock").take();
        if let Some(mut p) = helper {
            let _ = p.kill().await;
        }
        let holder = self.holder.lock().expect("holder lock").take();
        if let Some(mut h) = holder {
            sandbox::end_holder(&mut h.child, h.inner_pid).await;
        }
    }
}

/// The pods' `/etc/resolv.conf`: the node's (as with the kubelet's `dnsPolicy: Default`), with a
/// nameserver on the host's loopback (systemd-resolved's `127.0.0.53`, a local dnsmasq)
/// replaced by slirp4netns' DNS forwarder, which asks the host's resolvers.
pub fn resolv_conf(host: &str) -> String {
    let mut out = String::new();
    for line in host.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver")
            && let Some(addr) = words.next()
            && addr.parse::<Ipv4Addr>().is_ok_and(|a| a.is_loopback())
        {
            out.push_str(&format!("nameserver {DNS_IP}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ips_are_handed_out_round_robin_and_skip_those_in_use() {
        let mut ips = Ips { used: BTreeSet::new(), last: 1, links: 0 };
        assert_eq!(pod_ip(ips.take().unwrap()), Ipv4Addr::new(10, 244, 0, 2));
        assert_eq!(pod_ip(ips.take().unwrap()), Ipv4Addr::new(10, 244, 0, 3));
        ips.used.remove(&2);
        // Not reused at once: the next one is new.
        assert_eq!(pod_ip(ips.take().unwrap()), Ipv4Addr::new(10, 244, 0, 4));
        ips.last = (1 << 16) - 2;
        assert_eq!(pod_ip(ips.take().unwrap()), Ipv4Addr::new(10, 244, 0, 2), "wraps to the first free one");
        ips.used = (2..=(1u32 << 16) - 2).collect();
        assert_eq!(ips.take(), None);
    }

    #[test]
    fn a_loopback_nameserver_becomes_the_hosts_loopback_address() {
        let host =
            "# generated\nnameserver 127.0.0.53\nnameserver 10.0.0.2\noptions edns0 trust-ad\nsearch example.org\n";
        assert_eq!(
            resolv_conf(host),
            "# generated\nnameserver 169.254.1.3\nnameserver 10.0.0.2\noptions edns0 trust-ad\nsearch example.org\n"
        );
    }

    #[test]
    fn pod_network_modes_parse() {
        assert_eq!("egress".parse::<PodNetwork>(), Ok(PodNetwork::Egress));
        assert_eq!("bridge".parse::<PodNetwork>(), Ok(PodNetwork::Bridge));
        assert_eq!("none".parse::<PodNetwork>(), Ok(PodNetwork::None));
        assert!("host".parse::<PodNetwork>().unwrap_err().contains("egress, bridge, none"));
    }
}
