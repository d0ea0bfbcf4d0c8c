//! A minimal token server for distribution's `token` auth (the Bearer flow of Docker Hub, GHCR
//! and GitLab's registry): `GET /token?service=..&scope=repository:NAME:ACTIONS` answers a JWT
//! (ES256, the signing certificate in `x5c`, which the registry trusts through its
//! `rootcertbundle`) granting the asked actions to one user with a Basic password, and nothing
//! to anyone else (anonymous requests get a token without access, as Docker Hub's).

use base64::Engine;
use rcgen::SigningKey;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const SERVICE: &str = "keel-test-registry";
pub const ISSUER: &str = "keel-test-token-server";

pub struct TokenServer {
    pub realm: String,
    /// PEM of the signing certificate, for the registry's `rootcertbundle`.
    pub cert_pem: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the server on a free loopback port for `user` with `password`.
pub async fn start(user: &'static str, password: &'static str) -> TokenServer {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["keel-test-token".into()]).unwrap().self_signed(&key).unwrap();
    let cert_der = cert.der().to_vec();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let realm = format!("http://{}/token", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let key = std::sync::Arc::new(key);
        let cert_der = std::sync::Arc::new(cert_der);
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let (key, cert_der) = (key.clone(), cert_der.clone());
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&req).into_owned();
                let (status, body) = answer(&text, user, password, &key, &cert_der);
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    TokenServer { realm, cert_pem: cert.pem(), task }
}

fn answer(request: &str, user: &str, password: &str, key: &rcgen::KeyPair, cert_der: &[u8]) -> (&'static str, String) {
    let target = request.split_whitespace().nth(1).unwrap_or_default();
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let basic = request
        .lines()
        .find_map(|l| l.strip_prefix("Authorization: Basic ").or_else(|| l.strip_prefix("authorization: Basic ")))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    let subject = match basic {
        Some(creds) if creds == format!("{user}:{password}") => Some(user),
        Some(_) => return ("401 Unauthorized", r#"{"details":"incorrect username or password"}"#.into()),
        None => None,
    };
    let access: Vec<_> = form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "scope")
        .filter_map(|(_, scope)| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?.to_owned(), parts.next()?.to_owned(), parts.next()?.to_owned());
            Some(json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
        })
        .filter(|_| subject.is_some())
        .collect();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let b64url = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = json!({
        "typ": "JWT", "alg": "ES256",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(cert_der)]
    });
    let claims = json!({
        "iss": ISSUER, "sub": subject.unwrap_or(""), "aud": SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now - 10, "jti": format!("{now}-{}", fastrand::u64(..)),
        "access": access,
    });
    let signing_input = format!("{}.{}", b64url(header.to_string().as_bytes()), b64url(claims.to_string().as_bytes()));
    let der = key.sign(signing_input.as_bytes()).unwrap();
    let token = format!("{signing_input}.{}", b64url(&fixed_signature(&der)));
    ("200 OK", json!({"token": token, "access_token": token, "expires_in": 300}).to_string())
}

/// ECDSA's ASN.1 `SEQUENCE { r INTEGER, s INTEGER }` -> JWS's `r || s`, 32 bytes each.
fn fixed_signature(der: &[u8]) -> Vec<u8> {
    assert_eq!(der[0], 0x30, "an ASN.1 sequence");
    let mut i = if der[1] & 0x80 != 0 { 2 + usize::from(der[1] & 0x7f) } else { 2 };
    let mut out = Vec::with_capacity(64);
    for _ in 0..2 {
        assert_eq!(der[i], 0x02, "an ASN.1 integer");
        let len = usize::from(der[i + 1]);
        let int = &der[i + 2..i + 2 + len];
        let int = &int[int.iter().take_while(|b| **b == 0).count()..];
        out.extend(std::iter::repeat_n(0u8, 32 - int.len()));
        out.extend_from_slice(int);
        i += 2 + len;
    }
    out
}
