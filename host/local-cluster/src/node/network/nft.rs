//! The node network's nftables rules, as text for `nft -f -`: NAT of the pods' egress, and
//! Services' ClusterIPs as kube-proxy's nftables mode gives them (a random endpoint per new
//! connection, DNAT in prerouting, masquerade of what was DNATed so a pod reaching its own
//! Service gets the answers back).
//!
//! Each ruleset replaces the table it names in one transaction (`add` + `delete` + the new
//! table in one `nft -f`): a Service's rules are never half there.

use std::fmt::Write;
use std::net::Ipv4Addr;

use super::{BRIDGE, POD_CIDR};

/// The table of the node's base rules (egress NAT and the hairpin masquerade).
const BASE_TABLE: &str = "keel-node";
/// The table of the Services' rules, rewritten whenever a Service or its endpoints change.
const SERVICES_TABLE: &str = "keel-services";

/// One Service port: `cluster_ip:port/protocol` goes to one of `endpoints` (pod IP, target port).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServicePort {
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// The base ruleset: the pods' traffic leaving the bridge is masqueraded to the node's uplink
/// address, and connections DNATed to a Service's pod are masqueraded to the bridge's address
/// (kube-proxy's "hairpin" rule), so the answers come back through the node.
pub fn base() -> String {
    format!(
        "table ip {BASE_TABLE}\ndelete table ip {BASE_TABLE}\n\
         table ip {BASE_TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat;\n\
         \t\tip saddr {POD_CIDR} oifname != \"{BRIDGE}\" masquerade\n\
         \t\tct status dnat ip saddr {POD_CIDR} masquerade\n\
         \t}}\n\
         }}\n"
    )
}

/// The Services' ruleset. A ClusterIP port without endpoints is rejected at once (kube-proxy's
/// "has no endpoints" reject), so a client sees "connection refused" rather than a hang.
pub fn services(ports: &[ServicePort]) -> String {
    let mut out = format!(
        "table ip {SERVICES_TABLE}\ndelete table ip {SERVICES_TABLE}\n\
         table ip {SERVICES_TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat;\n"
    );
    let mut filter = String::new();
    for p in ports {
        let (ip, port, proto) = (p.cluster_ip, p.port, p.protocol.as_str());
        if p.endpoints.is_empty() {
            let _ = writeln!(filter, "\t\tip daddr {ip} {proto} dport {port} reject");
            continue;
        }
        let targets: Vec<String> =
            p.endpoints.iter().enumerate().map(|(i, (eip, eport))| format!("{i} : {eip} . {eport}")).collect();
        let _ = writeln!(
            out,
            "\t\tip daddr {ip} {proto} dport {port} dnat ip to numgen random mod {} map {{ {} }}",
            p.endpoints.len(),
            targets.join(", ")
        );
    }
    out.push_str("\t}\n");
    // Rejects go in a filter chain: nat chains may not reject.
    out.push_str("\tchain filter {\n\t\ttype filter hook prerouting priority filter;\n");
    out.push_str(&filter);
    out.push_str("\t}\n}\n");
    out
}

/// The protocol as nft names it, for a Service port's `protocol` (TCP by default).
pub fn protocol(kubernetes: Option<&str>) -> Option<&'static str> {
    match kubernetes.unwrap_or("TCP") {
        "TCP" => Some("tcp"),
        "UDP" => Some("udp"),
        "SCTP" => Some("sctp"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_port_dnats_to_a_random_endpoint_and_one_without_endpoints_is_rejected() {
        let ports = [
            ServicePort {
                cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
                port: 80,
                protocol: "tcp".into(),
                endpoints: vec![(Ipv4Addr::new(10, 244, 0, 2), 8080), (Ipv4Addr::new(10, 244, 0, 3), 8080)],
            },
            ServicePort {
                cluster_ip: Ipv4Addr::new(10, 96, 0, 11),
                port: 53,
                protocol: "udp".into(),
                endpoints: vec![],
            },
        ];
        let rules = services(&ports);
        assert!(rules.starts_with("table ip keel-services\ndelete table ip keel-services\n"), "{rules}");
        assert!(
            rules.contains(
                "ip daddr 10.96.0.10 tcp dport 80 dnat ip to numgen random mod 2 map { 0 : 10.244.0.2 . 8080, 1 : 10.244.0.3 . 8080 }"
            ),
            "{rules}"
        );
        assert!(rules.contains("ip daddr 10.96.0.11 udp dport 53 reject"), "{rules}");
    }

    #[test]
    fn protocols_are_nfts_names() {
        assert_eq!(protocol(None), Some("tcp"));
        assert_eq!(protocol(Some("UDP")), Some("udp"));
        assert_eq!(protocol(Some("ICMP")), None);
    }
}
