//! HTTPS for the API server (the default): a self-signed CA, a server certificate for
//! `127.0.0.1`/`localhost` and a client certificate, made fresh at every start.
//!
//! The CA's key never leaves memory: nothing needs to sign with it after start, so it is not
//! written anywhere and dies with the process. Clients trust the cluster through `ca.crt`
//! (or the kubeconfig's `certificate-authority-data`), never by skipping verification.
//!
//! The client certificate is the kubeconfig's credential (as in kind's and minikube's). The
//! handshake asks for a client certificate without requiring one, as kube-apiserver's does, so
//! that bearer-token clients can connect; a certificate the CA did not issue ends the handshake,
//! and a request on a connection without one is answered 401 unless it carries the token
//! (`api::authenticate`).

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File names inside the cluster's data dir.
pub const CA_CERT_FILE: &str = "ca.crt";
pub const SERVER_CERT_FILE: &str = "server.crt";
pub const SERVER_KEY_FILE: &str = "server.key";

/// How long the generated certificates are valid. They are remade at every start, so this
/// only needs to outlast one run of the cluster, with a day of slack for clock skew on each side.
const VALID_DAYS: i64 = 366;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot generate a key pair for the cluster's {what}")]
    Key {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot issue the cluster's {what} certificate")]
    Certificate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot compute the certificates' validity window")]
    Validity(#[source] jiff::Error),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rustls rejects the generated server certificate")]
    Config(#[source] rustls::Error),
    #[error("cannot build the client certificate verifier")]
    ClientVerifier(#[source] rustls::server::VerifierBuilderError),
}

/// The certificates of one cluster run, and the rustls configuration serving them.
pub struct ServerTls {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    client: ClientIdentity,
    config: Arc<rustls::ServerConfig>,
}

/// A certificate and key the cluster's CA issued for a client (PEM).
#[derive(Clone)]
pub struct ClientIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ServerTls {
    // The server key stays out of logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("ca_pem", &self.ca_pem).finish_non_exhaustive()
    }
}

impl ServerTls {
    /// A new CA and a server certificate it signs, valid for `127.0.0.1` and `localhost`.
    pub fn generate() -> Result<ServerTls, TlsError> {
        let validity = Validity::from_today()?;

        let ca_key = KeyPair::generate().map_err(|source| TlsError::Key { what: "CA", source })?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(DnType::CommonName, "keel-local CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity.apply(&mut ca);
        let ca_cert = ca.self_signed(&ca_key).map_err(|source| TlsError::Certificate { what: "CA", source })?;
        let issuer = Issuer::new(ca, ca_key);

        let server_key = KeyPair::generate().map_err(|source| TlsError::Key { what: "server", source })?;
        let mut server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .map_err(|source| TlsError::Certificate { what: "server", source })?;
        server.distinguished_name.push(DnType::CommonName, "keel-local");
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        // OpenSSL's strict verification (Python 3.13+ defaults to it) wants the issuer's key id.
        server.use_authority_key_identifier_extension = true;
        validity.apply(&mut server);
        let server_cert = server
            .signed_by(&server_key, &issuer)
            .map_err(|source| TlsError::Certificate { what: "server", source })?;

        let client_key = KeyPair::generate().map_err(|source| TlsError::Key { what: "client", source })?;
        let mut client = CertificateParams::default();
        // The identity kube-apiserver would give a cluster admin.
        client.distinguished_name.push(DnType::CommonName, "keel-local-admin");
        client.distinguished_name.push(DnType::OrganizationName, "system:masters");
        client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        client.use_authority_key_identifier_extension = true;
        validity.apply(&mut client);
        let client_cert = client
            .signed_by(&client_key, &issuer)
            .map_err(|source| TlsError::Certificate { what: "client", source })?;

        // The ring provider explicitly: it is the one kube already links, and naming it keeps
        // rustls from depending on a process-wide default that another crate could install.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).map_err(TlsError::Config)?;
        let client_verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(TlsError::ClientVerifier)?;
        let chain = vec![server_cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain, key)
            .map_err(TlsError::Config)?;
        // Like kube-apiserver: HTTP/2 for clients that offer it (kubectl), HTTP/1.1 for the rest
        // and for WebSocket upgrades.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        Ok(ServerTls {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            cert_pem: server_cert.pem(),
            key_pem: server_key.serialize_pem(),
            client: ClientIdentity { cert_pem: client_cert.pem(), key_pem: client_key.serialize_pem() },
            config: Arc::new(config),
        })
    }

    /// The CA certificate (PEM) that clients must trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate (DER), as `kube::Config::root_cert` wants it.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// The client certificate the CA issued, for a kubeconfig.
    pub fn client_identity(&self) -> &ClientIdentity {
        &self.client
    }

    /// Write `ca.crt`, `server.crt` and `server.key` (mode 0600) into `dir`; returns the
    /// path of `ca.crt`.
    pub fn write_to(&self, dir: &Path) -> Result<PathBuf, TlsError> {
        write_file(&dir.join(SERVER_KEY_FILE), &self.key_pem, 0o600)?;
        write_file(&dir.join(SERVER_CERT_FILE), &self.cert_pem, 0o644)?;
        let ca = dir.join(CA_CERT_FILE);
        write_file(&ca, &self.ca_pem, 0o644)?;
        Ok(ca)
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}

/// Yesterday (clock skew) until `VALID_DAYS` from today, as whole days.
struct Validity {
    from: jiff::civil::Date,
    until: jiff::civil::Date,
}

impl Validity {
    fn from_today() -> Result<Validity, TlsError> {
        let today = jiff::Zoned::now().date();
        Ok(Validity {
            from: today.checked_sub(jiff::Span::new().days(1)).map_err(TlsError::Validity)?,
            until: today.checked_add(jiff::Span::new().days(VALID_DAYS)).map_err(TlsError::Validity)?,
        })
    }

    fn apply(&self, params: &mut CertificateParams) {
        let day = |d: jiff::civil::Date| {
            rcgen::date_time_ymd(i32::from(d.year()), d.month().unsigned_abs(), d.day().unsigned_abs())
        };
        params.not_before = day(self.from);
        params.not_after = day(self.until);
    }
}

/// Creates the file with its final mode, so a key is never readable by others, not even briefly;
/// an existing file (a kept data dir from an earlier run) is truncated and gets the mode again.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| TlsError::Write { path: path.to_path_buf(), source };
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path).map_err(err)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_key_private_and_the_certificates_as_pem() {
        let dir = tempfile::tempdir().unwrap();
        let tls = ServerTls::generate().unwrap();
        let ca = tls.write_to(dir.path()).unwrap();
        assert_eq!(ca, dir.path().join(CA_CERT_FILE));
        let mode = |name: &str| {
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.path().join(name)).unwrap().permissions())
                & 0o777
        };
        assert_eq!(mode(SERVER_KEY_FILE), 0o600);
        assert_eq!(mode(SERVER_CERT_FILE), 0o644);
        assert!(std::fs::read_to_string(&ca).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(
            std::fs::read_to_string(dir.path().join(SERVER_KEY_FILE))
                .unwrap()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        // A second start in the same data dir gets new certificates, not the old ones.
        let again = ServerTls::generate().unwrap();
        again.write_to(dir.path()).unwrap();
        assert_ne!(std::fs::read_to_string(&ca).unwrap(), tls.ca_pem());
    }
}
