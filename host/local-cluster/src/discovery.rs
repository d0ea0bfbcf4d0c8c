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

pub fn api_groups() -> Value {
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
}

pub fn core_v1_resources() -> Value {
    let mut resources = Vec::new();
    for r in RESOURCES {
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
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": resources})
}
