//! Where a registry's content is fetched from and how: mirrors (containerd's model: a registry
//! name -> endpoint URLs tried in order, the registry itself last), plain HTTP for loopback
//! registries and those named insecure, HTTPS with the platform's roots plus extra CAs for
//! the rest; one oci-client per endpoint and credentials (oci-client keeps the first
//! credentials it is given per registry, so clients are not shared across credentials).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};

use super::auth::Credentials;

/// How the node reaches registries (`ClusterOptions::registries`, `host cluster up`'s
/// `--registry-mirror`, `--insecure-registry`, `--registry-ca`).
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// `(registry, endpoint URL)`, as containerd's `docker.io=http://127.0.0.1:5000`: pulls of
    /// `registry`'s images try its mirrors in the order given, then the registry itself.
    pub mirrors: Vec<(String, String)>,
    /// `HOST:PORT` of registries (or mirrors) reached over plain HTTP. Loopback registries
    /// (`localhost`, `127.0.0.0/8`, `::1`) always are, as containerd and docker allow.
    pub insecure: Vec<String>,
    /// PEM files of extra CAs trusted for registries' TLS, beside the platform's.
    pub ca_files: Vec<PathBuf>,
    /// The node's docker config with its own credentials; `None`: `$DOCKER_CONFIG/config.json`,
    /// else `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryOptionsError {
    #[error("registry mirror {0:?} is not REGISTRY=URL (as docker.io=http://127.0.0.1:5000)")]
    MirrorSyntax(String),
    #[error("registry mirror URL {url:?} for {registry}: {why}")]
    MirrorUrl { registry: String, url: String, why: String },
    #[error(
        "registry mirror {url} for {registry} is plain HTTP to a host that is not loopback: name it with --insecure-registry {host}"
    )]
    InsecureMirror { registry: String, url: String, host: String },
    #[error("cannot read registry CA {path}: {source}")]
    Ca {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("registry CA {path} has no PEM certificate")]
    CaNotPem { path: PathBuf },
}

/// A mirror's URL as the node can use it, `http(s)://host[:port]`: its host (lower case) and
/// whether it is plain HTTP. Whether plain HTTP is allowed to that host is the node's to say
/// (loopback, or `--insecure-registry`).
pub fn mirror_endpoint(registry: &str, url: &str) -> Result<(String, bool), RegistryOptionsError> {
    let bad =
        |why: &str| RegistryOptionsError::MirrorUrl { registry: registry.into(), url: url.into(), why: why.into() };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no http:// or https://"))?;
    let http = match scheme {
        "http" => true,
        "https" => false,
        _ => return Err(bad("the scheme is neither http nor https")),
    };
    // oci-client builds `/v2/...` URLs on the host: a path prefix would be dropped.
    let host = rest.trim_end_matches('/').trim_end_matches("/v2").to_ascii_lowercase();
    if host.is_empty() || host.contains('/') {
        return Err(bad("only scheme://host[:port] is supported (no path)"));
    }
    Ok((host, http))
}

/// `docker.io=http://127.0.0.1:5000` -> `("docker.io", "http://127.0.0.1:5000")`.
pub fn parse_mirror(s: &str) -> Result<(String, String), RegistryOptionsError> {
    match s.split_once('=') {
        Some((r, u)) if !r.is_empty() && !u.is_empty() => Ok((r.trim().to_owned(), u.trim().to_owned())),
        _ => Err(RegistryOptionsError::MirrorSyntax(s.to_owned())),
    }
}

/// One place to fetch a registry's content from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Endpoint {
    /// `host[:port]` as it goes into URLs.
    pub host: String,
    pub http: bool,
}

/// The options, checked, with the CAs read.
pub(crate) struct Registries {
    mirrors: Vec<(String, Endpoint)>,
    insecure: Vec<String>,
    cas: Vec<Vec<u8>>,
    clients: Mutex<HashMap<(Endpoint, Credentials), oci_client::Client>>,
}

pub(crate) fn is_loopback(host_port: &str) -> bool {
    let host = match host_port.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => host_port.rsplit_once(':').filter(|(h, _)| !h.contains(':')).map_or(host_port, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Registries {
    pub fn new(opts: &RegistryOptions) -> Result<Registries, RegistryOptionsError> {
        let insecure: Vec<String> = opts.insecure.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
        let mut mirrors = Vec::new();
        for (registry, url) in &opts.mirrors {
            let (host, http) = mirror_endpoint(registry, url)?;
            if http && !is_loopback(&host) && !insecure.contains(&host) {
                return Err(RegistryOptionsError::InsecureMirror {
                    registry: registry.clone(),
                    url: url.clone(),
                    host,
                });
            }
            mirrors.push((canonical(registry), Endpoint { host, http }));
        }
        let mut cas = Vec::new();
        for path in &opts.ca_files {
            let pem = std::fs::read(path).map_err(|source| RegistryOptionsError::Ca { path: path.clone(), source })?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(RegistryOptionsError::CaNotPem { path: path.clone() });
            }
            cas.push(pem);
        }
        Ok(Registries { mirrors, insecure, cas, clients: Mutex::new(HashMap::new()) })
    }

    /// Where `registry`'s content is fetched from, in order: its mirrors, then itself.
    pub fn endpoints(&self, registry: &str) -> Vec<Endpoint> {
        let registry = canonical(registry);
        let mut out: Vec<Endpoint> =
            self.mirrors.iter().filter(|(r, _)| *r == registry).map(|(_, e)| e.clone()).collect();
        let host = if registry == "docker.io" { "index.docker.io".to_owned() } else { registry.clone() };
        let http = is_loopback(&host) || self.insecure.contains(&host);
        out.push(Endpoint { host, http });
        out
    }

    /// The client for `endpoint` with `creds` (made once, then shared: it keeps its tokens).
    pub fn client(&self, endpoint: &Endpoint, creds: &Credentials) -> oci_client::Client {
        let mut clients = self.clients.lock().expect("clients lock");
        let key = (endpoint.clone(), creds.clone());
        if let Some(c) = clients.get(&key) {
            return c.clone();
        }
        ensure_crypto_provider();
        let config = ClientConfig {
            protocol: if endpoint.http { ClientProtocol::Http } else { ClientProtocol::Https },
            extra_root_certificates: self
                .cas
                .iter()
                .map(|pem| Certificate { encoding: CertificateEncoding::Pem, data: pem.clone() })
                .collect(),
            platform_resolver: Some(Box::new(super::platform_resolver)),
            // A registry that stops answering fails the pull instead of hanging it.
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(30)),
            user_agent: concat!("keel-local-cluster/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        let client = oci_client::Client::new(config);
        clients.insert(key, client.clone());
        client
    }
}

fn canonical(registry: &str) -> String {
    match registry.trim().to_ascii_lowercase().as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
        r => r.to_owned(),
    }
}

/// reqwest is built without a crypto provider of its own (the workspace uses ring, as kube
/// does): make ring the process default unless someone already chose one.
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another thread installing one is fine: there is a default then.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_come_first_and_plain_http_is_for_loopback_or_named_registries() {
        let opts = RegistryOptions {
            mirrors: vec![parse_mirror("docker.io=http://127.0.0.1:5000/").unwrap()],
            insecure: vec!["reg.lan:5000".into()],
            ..Default::default()
        };
        let r = Registries::new(&opts).unwrap();
        assert_eq!(
            r.endpoints("docker.io"),
            vec![
                Endpoint { host: "127.0.0.1:5000".into(), http: true },
                Endpoint { host: "index.docker.io".into(), http: false }
            ]
        );
        assert_eq!(r.endpoints("reg.lan:5000"), vec![Endpoint { host: "reg.lan:5000".into(), http: true }]);
        assert_eq!(r.endpoints("localhost:5000"), vec![Endpoint { host: "localhost:5000".into(), http: true }]);
        assert_eq!(r.endpoints("[::1]:5000"), vec![Endpoint { host: "[::1]:5000".into(), http: true }]);
        assert_eq!(r.endpoints("ghcr.io"), vec![Endpoint { host: "ghcr.io".into(), http: false }]);

        let insecure = RegistryOptions {
            mirrors: vec![("docker.io".into(), "http://10.0.0.5:5000".into())],
            ..Default::default()
        };
        assert_eq!(
            Registries::new(&insecure).err().unwrap().to_string(),
            "registry mirror http://10.0.0.5:5000 for docker.io is plain HTTP to a host that is not loopback: name it with --insecure-registry 10.0.0.5:5000"
        );
        assert!(parse_mirror("docker.io").is_err());
        let path = RegistryOptions {
            mirrors: vec![("docker.io".into(), "https://m.example/prefix".into())],
            ..Default::default()
        };
        assert!(Registries::new(&path).is_err());
    }
}
