//! kube-proxy: a Service's ClusterIP leads to its ready endpoints. Whenever a Service or an
//! Endpoints object changes, the node's Service rules are rewritten from all of them (the
//! endpoints controller keeps Endpoints current as pods come and go). Only with a pod network:
//! without one pods have no IPs to lead to.

use std::net::Ipv4Addr;

use serde_json::Value;

use crate::node::{ServicePort, network::nft};
use crate::state::Shared;
use crate::store::{meta, res};

/// Watches the store and syncs the node's Service rules until the cluster stops.
pub fn run(state: &Shared) {
    if !state.node.pod_network() {
        return;
    }
    let mut rx = state.store.subscribe();
    let state = state.clone();
    let cancel = state.cancel.clone();
    tokio::spawn(async move {
        loop {
            sync(&state).await;
            // Wait for a change that matters, then take every other pending one with it: one
            // rewrite for a burst of changes.
            loop {
                let ev = tokio::select! {
                    () = cancel.cancelled() => return,
                    ev = rx.recv() => ev,
                };
                match ev {
                    Ok(ev) if matches!(ev.resource, "services" | "endpoints") => break,
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
            while rx.try_recv().is_ok() {}
        }
    });
}

async fn sync(state: &Shared) {
    let services = state.store.list(res("services"), None, |_| true).0;
    let endpoints = state.store.list(res("endpoints"), None, |_| true).0;
    let ports = service_ports(&services, &endpoints);
    if let Err(e) = state.node.sync_services(ports).await {
        tracing::warn!(error = %e, "cannot update the Services' rules");
    }
}

/// Every port of every Service with a ClusterIP, with the ready addresses its Endpoints give
/// for that port (matched by name, as kube-proxy does; an unnamed port matches the only one).
pub fn service_ports(services: &[Value], endpoints: &[Value]) -> Vec<ServicePort> {
    let mut out = Vec::new();
    for svc in services {
        let Some(ip) = svc.pointer("/spec/clusterIP").and_then(Value::as_str).and_then(|s| s.parse::<Ipv4Addr>().ok())
        else {
            continue; // headless ("None") or not allocated
        };
        let eps =
            endpoints.iter().find(|e| meta::namespace(e) == meta::namespace(svc) && meta::name(e) == meta::name(svc));
        for p in svc.pointer("/spec/ports").and_then(Value::as_array).into_iter().flatten() {
            let (Some(port), Some(protocol)) = (
                p.get("port").and_then(Value::as_u64).and_then(|n| u16::try_from(n).ok()),
                nft::protocol(p.get("protocol").and_then(Value::as_str)),
            ) else {
                continue;
            };
            let name = p.get("name").and_then(Value::as_str).unwrap_or_default();
            let mut targets = Vec::new();
            for subset in eps.and_then(|e| e.get("subsets")).and_then(Value::as_array).into_iter().flatten() {
                let Some(target) = subset
                    .get("ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .find(|ep| ep.get("name").and_then(Value::as_str).unwrap_or_default() == name)
                    .and_then(|ep| ep.get("port").and_then(Value::as_u64))
                    .and_then(|n| u16::try_from(n).ok())
                else {
                    continue;
                };
                for a in subset.get("addresses").and_then(Value::as_array).into_iter().flatten() {
                    if let Some(addr) = a.get("ip").and_then(Value::as_str).and_then(|s| s.parse().ok()) {
                        targets.push((addr, target));
                    }
                }
            }
            out.push(ServicePort { cluster_ip: ip, port, protocol: protocol.into(), endpoints: targets });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ports_lead_to_the_ready_addresses_of_the_port_of_the_same_name() {
        let svc = json!({"metadata": {"name": "web", "namespace": "default"}, "spec": {"clusterIP": "10.96.0.7",
            "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}});
        let headless = json!({"metadata": {"name": "h", "namespace": "default"}, "spec": {"clusterIP": "None", "ports": [{"port": 1}]}});
        let eps = json!({"metadata": {"name": "web", "namespace": "default"}, "subsets": [{
            "addresses": [{"ip": "10.244.0.5"}], "notReadyAddresses": [{"ip": "10.244.0.6"}],
            "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]}]});
        let ports = service_ports(&[svc, headless], &[eps]);
        assert_eq!(
            ports,
            [
                ServicePort {
                    cluster_ip: "10.96.0.7".parse().unwrap(),
                    port: 80,
                    protocol: "tcp".into(),
                    endpoints: vec![("10.244.0.5".parse().unwrap(), 8080)]
                },
                ServicePort {
                    cluster_ip: "10.96.0.7".parse().unwrap(),
                    port: 53,
                    protocol: "udp".into(),
                    endpoints: vec![("10.244.0.5".parse().unwrap(), 5353)]
                },
            ]
        );
    }
}
