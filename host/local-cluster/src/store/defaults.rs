//! Defaulting as the real API server (and its default admission plugins) does it, for the
//! fields our clients read back: pods, services, namespaces, secrets.

use super::meta::map_mut;
use base64::Engine;
use serde_json::{Value, json};

/// What defaulting needs from the server.
pub struct Context<'a> {
    pub node_name: &'a str,
    /// Allocates the next free cluster IP for a Service.
    pub next_cluster_ip: &'a mut dyn FnMut() -> String,
    /// Allocates a free node port (30000-32767) for a NodePort or LoadBalancer Service's port.
    pub next_node_port: &'a mut dyn FnMut() -> Option<u16>,
}

pub fn apply(plural: &str, obj: &mut Value, ctx: &mut Context<'_>) {
    match plural {
        "pods" => pod(obj, ctx),
        "services" => service(obj, ctx),
        "namespaces" => namespace(obj),
        "secrets" => secret(obj),
        _ => {}
    }
}

fn set_default(map: &mut serde_json::Map<String, Value>, key: &str, value: Value) {
    if map.get(key).is_none_or(Value::is_null) {
        map.insert(key.to_owned(), value);
    }
}

/// `Always` for `:latest` or untagged images, `IfNotPresent` otherwise (as the server does).
pub fn image_pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        None => "Always",
        Some((_, "latest")) => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn container(c: &mut Value) {
    let Some(c) = c.as_object_mut() else { return };
    set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
    set_default(c, "terminationMessagePolicy", json!("File"));
    let image = c.get("image").and_then(Value::as_str).unwrap_or_default().to_owned();
    set_default(c, "imagePullPolicy", json!(image_pull_policy(&image)));
    set_default(c, "resources", json!({}));
    if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            set_default(p, "protocol", json!("TCP"));
        }
    }
    // Limits without requests imply requests == limits.
    let limits = c.get("resources").and_then(|r| r.get("limits")).cloned();
    if let (Some(Value::Object(limits)), Some(Value::Object(res))) = (limits, c.get_mut("resources")) {
        let requests = res.entry("requests").or_insert_with(|| json!({}));
        if let Some(requests) = requests.as_object_mut() {
            for (k, v) in limits {
                requests.entry(k).or_insert(v);
            }
        }
    }
}

fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = ["containers", "initContainers"]
        .iter()
        .filter_map(|k| spec.get(*k).and_then(Value::as_array))
        .flatten()
        .collect();
    let res = |c: &Value, kind: &str, r: &str| c.pointer(&format!("/resources/{kind}/{r}")).cloned();
    let any_set = containers.iter().any(|c| {
        ["requests", "limits"]
            .iter()
            .any(|k| c.pointer(&format!("/resources/{k}")).and_then(Value::as_object).is_some_and(|m| !m.is_empty()))
    });
    if !any_set {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        ["cpu", "memory"].iter().all(|r| {
            let limit = res(c, "limits", r);
            limit.is_some() && res(c, "requests", r) == limit
        })
    });
    if guaranteed { "Guaranteed" } else { "Burstable" }
}

fn pod(obj: &mut Value, ctx: &mut Context<'_>) {
    let spec = map_mut(obj, "spec");
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "serviceAccountName", json!("default"));
    let sa = spec.get("serviceAccountName").cloned().unwrap_or(json!("default"));
    set_default(spec, "serviceAccount", sa);
    set_default(spec, "securityContext", json!({}));
    set_default(spec, "enableServiceLinks", json!(true));
    set_default(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
    set_default(spec, "priority", json!(0));
    // Scheduling is immediate: there is exactly one node.
    spec.insert("nodeName".into(), json!(ctx.node_name));
    // The DefaultTolerationSeconds admission plugin adds these to every pod.
    let tolerations = spec.entry("tolerations").or_insert_with(|| json!([]));
    if let Some(list) = tolerations.as_array_mut() {
        for key in ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"] {
            if !list.iter().any(|t| t.get("key").and_then(Value::as_str) == Some(key)) {
                list.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
            }
        }
    }
    for key in ["containers", "initContainers"] {
        if let Some(list) = spec.get_mut(key).and_then(Value::as_array_mut) {
            list.iter_mut().for_each(container);
        }
    }
    if let Some(vols) = spec.get_mut("volumes").and_then(Value::as_array_mut) {
        for v in vols.iter_mut() {
            for kind in ["configMap", "secret"] {
                if let Some(src) = v.get_mut(kind).and_then(Value::as_object_mut) {
                    set_default(src, "defaultMode", json!(420));
                }
            }
        }
    }
    let qos = qos_class(obj.get("spec").unwrap_or(&Value::Null));
    let status = map_mut(obj, "status");
    set_default(status, "phase", json!("Pending"));
    status.insert("qosClass".into(), json!(qos));
}

fn service(obj: &mut Value, ctx: &mut Context<'_>) {
    let spec = map_mut(obj, "spec");
    set_default(spec, "type", json!("ClusterIP"));
    set_default(spec, "sessionAffinity", json!("None"));
    set_default(spec, "internalTrafficPolicy", json!("Cluster"));
    set_default(spec, "ipFamilies", json!(["IPv4"]));
    set_default(spec, "ipFamilyPolicy", json!("SingleStack"));
    if spec.get("clusterIP").and_then(Value::as_str).is_none_or(str::is_empty) {
        spec.insert("clusterIP".into(), json!((ctx.next_cluster_ip)()));
    }
    let ip = spec.get("clusterIP").cloned().unwrap_or_default();
    set_default(spec, "clusterIPs", json!([ip]));
    let node_ports = matches!(spec.get("type").and_then(Value::as_str), Some("NodePort" | "LoadBalancer"));
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            set_default(p, "protocol", json!("TCP"));
            let port = p.get("port").cloned().unwrap_or_default();
            set_default(p, "targetPort", port);
            if node_ports
                && p.get("nodePort").is_none_or(|n| n.is_null() || n == 0)
                && let Some(n) = (ctx.next_node_port)()
            {
                p.insert("nodePort".into(), json!(n));
            }
        }
    }
    map_mut(obj, "status").entry("loadBalancer").or_insert_with(|| json!({}));
}

fn namespace(obj: &mut Value) {
    let name = obj.pointer("/metadata/name").cloned().unwrap_or_default();
    map_mut(obj, "metadata");
    let metadata = obj.get_mut("metadata").expect("created above");
    map_mut(metadata, "labels").insert("kubernetes.io/metadata.name".into(), name);
    set_default(map_mut(obj, "spec"), "finalizers", json!(["kubernetes"]));
    set_default(map_mut(obj, "status"), "phase", json!("Active"));
}

fn secret(obj: &mut Value) {
    let Some(map) = obj.as_object_mut() else { return };
    set_default(map, "type", json!("Opaque"));
    // stringData is write-only: fold it into data, base64 encoded.
    if let Some(Value::Object(string_data)) = map.remove("stringData") {
        let data = map.entry("data").or_insert_with(|| json!({}));
        if let Some(data) = data.as_object_mut() {
            for (k, v) in string_data {
                let text = v.as_str().unwrap_or_default();
                data.insert(k, json!(base64::engine::general_purpose::STANDARD.encode(text)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx_apply(plural: &str, obj: &mut Value) {
        let mut n = 9;
        let mut ip = || {
            n += 1;
            format!("10.96.0.{n}")
        };
        let mut port = 30_000;
        let mut node_port = || {
            port += 1;
            Some(port)
        };
        apply(
            plural,
            obj,
            &mut Context { node_name: "node-a", next_cluster_ip: &mut ip, next_node_port: &mut node_port },
        );
    }

    #[test]
    fn pull_policy_follows_tag() {
        assert_eq!(image_pull_policy("alpine"), "Always");
        assert_eq!(image_pull_policy("alpine:latest"), "Always");
        assert_eq!(image_pull_policy("alpine:3.20"), "IfNotPresent");
        assert_eq!(image_pull_policy("registry:5000/alpine"), "Always");
        assert_eq!(image_pull_policy("alpine@sha256:abc"), "IfNotPresent");
    }

    #[test]
    fn pod_defaults() {
        let mut p = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "a", "image": "busybox:1", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}
        ]}});
        ctx_apply("pods", &mut p);
        assert_eq!(p["spec"]["restartPolicy"], "Always");
        assert_eq!(p["spec"]["nodeName"], "node-a");
        assert_eq!(p["spec"]["containers"][0]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(p["spec"]["containers"][0]["terminationMessagePolicy"], "File");
        assert_eq!(p["status"]["phase"], "Pending");
        assert_eq!(p["status"]["qosClass"], "Guaranteed");
        let mut p = json!({"spec": {"containers": [{"name": "a", "image": "x"}]}});
        ctx_apply("pods", &mut p);
        assert_eq!(p["status"]["qosClass"], "BestEffort");
    }

    #[test]
    fn service_and_secret_defaults() {
        let mut s = json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}});
        ctx_apply("services", &mut s);
        assert_eq!(s["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(s["spec"]["ports"][0]["protocol"], "TCP");
        assert!(s["spec"]["ports"][0].get("nodePort").is_none(), "ClusterIP services get no node port");
        let mut np = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}, {"port": 81, "nodePort": 31000}]}});
        ctx_apply("services", &mut np);
        assert_eq!(np["spec"]["ports"][0]["nodePort"], 30001);
        assert_eq!(np["spec"]["ports"][1]["nodePort"], 31000, "a given node port is kept");
        let mut sec = json!({"stringData": {"k": "v"}});
        ctx_apply("secrets", &mut sec);
        assert_eq!(sec["data"]["k"], "dg==");
        assert!(sec.get("stringData").is_none());
        assert_eq!(sec["type"], "Opaque");
    }
}
