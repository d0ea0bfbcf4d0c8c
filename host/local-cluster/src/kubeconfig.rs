//! The kubeconfig file written next to the cluster's data, for kubectl and other clients.

use crate::tls::ClientIdentity;
use base64::Engine;
use serde_json::json;
use std::path::Path;

pub const NAME: &str = "keel-local";

/// What a TLS cluster's kubeconfig carries besides the URL.
#[derive(Debug, Clone, Copy)]
pub struct Tls<'a> {
    /// The cluster's CA (PEM), so clients verify the server; the file never says
    /// `insecure-skip-tls-verify`.
    pub ca_pem: &'a str,
    /// Written only when there is no token: kubectl prompts for a username on HTTPS unless the
    /// user entry names some credential.
    pub client: &'a ClientIdentity,
}

pub fn render(url: &str, token: Option<&str>, tls: Option<Tls<'_>>) -> String {
    let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
    let mut user = json!({});
    let mut cluster = json!({"server": url});
    if let Some(tls) = tls {
        cluster["certificate-authority-data"] = json!(b64(tls.ca_pem));
        if token.is_none() {
            user["client-certificate-data"] = json!(b64(&tls.client.cert_pem));
            user["client-key-data"] = json!(b64(&tls.client.key_pem));
        }
    }
    if let Some(t) = token {
        user["token"] = json!(t);
    }
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": NAME, "cluster": cluster}],
        "users": [{"name": NAME, "user": user}],
        "contexts": [{"name": NAME, "context": {"cluster": NAME, "user": NAME, "namespace": "default"}}],
        "current-context": NAME,
        "preferences": {},
    });
    serde_yaml_ng::to_string(&doc).expect("a JSON document always renders as YAML")
}

/// Written with mode 0600 as it may hold the bearer token or the client key.
pub fn write(path: &Path, url: &str, token: Option<&str>, tls: Option<Tls<'_>>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(render(url, token, tls).as_bytes())
}
