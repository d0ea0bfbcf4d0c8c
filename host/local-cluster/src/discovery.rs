//! Discovery documents: what kubectl and client libraries ask before any real request.

use crate::resources::RESOURCES;
use serde_json::{Value, json};

/// The Kubernetes version we answer as: within kubectl 1.32's supported skew (+/-1), and our
/// wire format (k8s-openapi v1_34) is a superset of what 1.33 clients send.
pub const GIT_VERSION: &str = "v1.33.0-keel";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": GIT_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": format!("linux/{}", go_arch()),
    })
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn api_group(group: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": [gv], "preferredVersion": gv})
}

pub fn api_groups() -> Value {
    let groups: Vec<Value> = crate::resources::GROUPS.iter().map(|(g, v)| api_group(g, v)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`, for a group we serve.
pub fn group(name: &str) -> Option<Value> {
    crate::resources::GROUPS.iter().find(|(g, _)| *g == name).map(|(g, v)| api_group(g, v))
}

pub fn core_v1_resources() -> Value {
    resources_of("v1")
}

/// The APIResourceList of one group version.
pub fn resources_of(group_version: &str) -> Value {
    let mut resources = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group_version == group_version) {
        let mut entry = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": r.verbs(),
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        if r.plural == "pods" {
            entry["categories"] = json!(["all"]);
        }
        resources.push(entry);
        for sub in r.subresources {
            let verbs: &[&str] = match *sub {
                "status" => &["get", "patch", "update"],
                "log" => &["get"],
                _ => &["create", "get"],
            };
            let kind = match *sub {
                "exec" => "PodExecOptions",
                "attach" => "PodAttachOptions",
                "log" => "Pod",
                _ => r.kind,
            };
            resources.push(json!({
                "name": format!("{}/{}", r.plural, sub),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": kind,
                "verbs": verbs,
            }));
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}
