//! The kubeconfig file written next to the cluster's data, for kubectl and other clients.

use serde_json::json;
use std::path::Path;

pub const NAME: &str = "keel-local";

pub fn render(url: &str, token: Option<&str>) -> String {
    let mut user = json!({});
    if let Some(t) = token {
        user["token"] = json!(t);
    }
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": NAME, "cluster": {"server": url}}],
        "users": [{"name": NAME, "user": user}],
        "contexts": [{"name": NAME, "context": {"cluster": NAME, "user": NAME, "namespace": "default"}}],
        "current-context": NAME,
        "preferences": {},
    });
    serde_yaml_ng::to_string(&doc).expect("a JSON document always renders as YAML")
}

/// Written with mode 0600 as it may hold the bearer token.
pub fn write(path: &Path, url: &str, token: Option<&str>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(render(url, token).as_bytes())
}
