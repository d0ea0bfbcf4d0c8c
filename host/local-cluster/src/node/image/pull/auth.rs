//! Registry credentials, found as a kubelet finds them: the pod's `imagePullSecrets` first
//! (`kubernetes.io/dockerconfigjson` Secrets, the `.dockerconfigjson` key that keel's registry
//! Secret writes; the older `.dockercfg` too), then the node's own docker config
//! (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json` of the user running the cluster).
//!
//! Only inline credentials are read (`auth`, or `username`/`password`, or `identitytoken`):
//! credential helpers (`credsStore`, `credHelpers`) run programs, which the node does not do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

/// How to authenticate to one registry.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) enum Credentials {
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
    /// An OAuth2 refresh/identity token handed to the registry's token server (docker's
    /// `identitytoken`); oci-client sends it as a Bearer token.
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credentials::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

impl Credentials {
    pub fn to_oci(&self) -> oci_client::secrets::RegistryAuth {
        use oci_client::secrets::RegistryAuth;
        match self {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic { username, password } => RegistryAuth::Basic(username.clone(), password.clone()),
            Credentials::Bearer(t) => RegistryAuth::Bearer(t.clone()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    #[error("docker config {source_name} is not valid JSON: {why}")]
    Json { source_name: String, why: String },
    #[error("docker config {source_name}: the `auth` of {registry} is not base64 of `user:password`")]
    BadAuth { source_name: String, registry: String },
}

#[derive(Debug, Default, Deserialize)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

/// One docker config: registry key (as written: `https://index.docker.io/v1/`, `ghcr.io`,
/// `http://host:5000`) -> credentials.
#[derive(Debug, Clone, Default)]
pub(crate) struct DockerConfig {
    auths: Vec<(String, Credentials)>,
}

impl DockerConfig {
    /// A `config.json`/`.dockerconfigjson` (`{"auths": {...}}`), or with `legacy` a `.dockercfg`
    /// (the `auths` map itself).
    pub fn parse(bytes: &[u8], source_name: &str, legacy: bool) -> Result<DockerConfig, AuthError> {
        let json_err = |e: serde_json::Error| AuthError::Json { source_name: source_name.into(), why: e.to_string() };
        let auths: BTreeMap<String, Entry> = if legacy {
            serde_json::from_slice(bytes).map_err(json_err)?
        } else {
            serde_json::from_slice::<ConfigJson>(bytes).map_err(json_err)?.auths
        };
        let mut out = Vec::new();
        for (registry, e) in auths {
            let creds = if let Some(token) = e.identitytoken.filter(|t| !t.is_empty()) {
                Credentials::Bearer(token)
            } else if let Some(auth) = e.auth.filter(|a| !a.is_empty()) {
                let bad = || AuthError::BadAuth { source_name: source_name.into(), registry: registry.clone() };
                let decoded = base64::engine::general_purpose::STANDARD.decode(auth.trim()).map_err(|_| bad())?;
                let text = String::from_utf8(decoded).map_err(|_| bad())?;
                let (u, p) = text.split_once(':').ok_or_else(bad)?;
                Credentials::Basic { username: u.into(), password: p.into() }
            } else if let Some(username) = e.username.filter(|u| !u.is_empty()) {
                Credentials::Basic { username, password: e.password.unwrap_or_default() }
            } else {
                continue;
            };
            out.push((registry, creds));
        }
        Ok(DockerConfig { auths: out })
    }

    /// The credentials for `registry` (a reference's domain: `docker.io`, `host:5000`), matched
    /// as the kubelet's keyring matches: by host (and port), whatever scheme or `/v1/` path the
    /// key has; Docker Hub under any of its names.
    pub fn lookup(&self, registry: &str) -> Option<&Credentials> {
        let want = canonical_host(registry);
        self.auths.iter().find(|(k, _)| canonical_host(key_host(k)) == want).map(|(_, c)| c)
    }
}

/// `https://index.docker.io/v1/` -> `index.docker.io`.
fn key_host(key: &str) -> &str {
    let no_scheme = key.split_once("://").map_or(key, |(_, rest)| rest);
    no_scheme.split('/').next().unwrap_or(no_scheme)
}

fn canonical_host(host: &str) -> String {
    match host {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".into(),
        h => h.to_ascii_lowercase(),
    }
}

/// The node's own docker config path: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub(crate) fn node_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(Path::new(&dir).join("config.json"));
    }
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| Path::new(&h).join(".docker/config.json"))
}

/// Reads the node's docker config; absent is no credentials, unreadable or invalid is logged
/// and ignored (the node still pulls anonymously, as containerd does with a bad config).
pub(crate) fn node_config(path: Option<&Path>) -> DockerConfig {
    let Some(path) = path else { return DockerConfig::default() };
    match std::fs::read(path) {
        Ok(bytes) => DockerConfig::parse(&bytes, &path.display().to_string(), false).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the node's docker config is ignored");
            DockerConfig::default()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DockerConfig::default(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the node's docker config cannot be read");
            DockerConfig::default()
        }
    }
}

/// The pod's pull secrets, from the data the API side resolved for it (entries
/// `imagePullSecret/<name>`, see `node::PULL_SECRET_PREFIX`), in the pod's order. A secret of
/// another type, or invalid, is skipped with a warning, as the kubelet skips it.
pub(crate) fn pod_configs<'a>(
    secrets: impl Iterator<Item = (&'a str, &'a BTreeMap<String, Vec<u8>>)>,
) -> Vec<DockerConfig> {
    let mut out = Vec::new();
    for (name, data) in secrets {
        let parsed = if let Some(b) = data.get(".dockerconfigjson") {
            DockerConfig::parse(b, &format!("secret {name}"), false)
        } else if let Some(b) = data.get(".dockercfg") {
            DockerConfig::parse(b, &format!("secret {name}"), true)
        } else {
            tracing::warn!(secret = name, "image pull secret has neither .dockerconfigjson nor .dockercfg");
            continue;
        };
        match parsed {
            Ok(c) => out.push(c),
            Err(e) => tracing::warn!(secret = name, error = %e, "image pull secret ignored"),
        }
    }
    out
}

/// The credentials for `registry`: the first pull secret that has some, else the node's.
pub(crate) fn credentials_for(registry: &str, pod: &[DockerConfig], node: &DockerConfig) -> Credentials {
    pod.iter().chain(std::iter::once(node)).find_map(|c| c.lookup(registry)).cloned().unwrap_or(Credentials::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_read_as_keel_writes_them_and_matched_by_host() {
        let auth = base64::engine::general_purpose::STANDARD.encode("u:p:w");
        let json = format!(
            r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{auth}"}},
                "http://127.0.0.1:5000": {{"username": "a", "password": "b"}},
                "ghcr.io": {{"identitytoken": "tok"}}, "empty.example": {{}}}}}}"#
        );
        let c = DockerConfig::parse(json.as_bytes(), "test", false).unwrap();
        assert_eq!(c.lookup("docker.io"), Some(&Credentials::Basic { username: "u".into(), password: "p:w".into() }));
        assert_eq!(
            c.lookup("127.0.0.1:5000"),
            Some(&Credentials::Basic { username: "a".into(), password: "b".into() })
        );
        assert_eq!(c.lookup("ghcr.io"), Some(&Credentials::Bearer("tok".into())));
        assert_eq!(c.lookup("127.0.0.1:5001"), None);
        assert_eq!(c.lookup("empty.example"), None);
        let legacy = DockerConfig::parse(br#"{"quay.io": {"auth": "eDp5"}}"#, "legacy", true).unwrap();
        assert_eq!(legacy.lookup("quay.io"), Some(&Credentials::Basic { username: "x".into(), password: "y".into() }));
        assert!(matches!(
            DockerConfig::parse(br#"{"auths": {"r": {"auth": "!!"}}}"#, "s", false),
            Err(AuthError::BadAuth { .. })
        ));
        // The pod's secrets before the node's.
        let node = DockerConfig::parse(br#"{"auths": {"quay.io": {"auth": "bjpt"}}}"#, "node", false).unwrap();
        assert_eq!(
            credentials_for("quay.io", std::slice::from_ref(&legacy), &node),
            Credentials::Basic { username: "x".into(), password: "y".into() }
        );
        assert_eq!(
            credentials_for("quay.io", &[], &node),
            Credentials::Basic { username: "n".into(), password: "m".into() }
        );
        assert_eq!(credentials_for("other.io", &[], &node), Credentials::Anonymous);
    }
}
