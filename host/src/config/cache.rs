//! `[runners.cache]`: the distributed cache, in GitLab Runner's key names (`Type`, `Path`,
//! `Shared`, `[runners.cache.s3]`, `[runners.cache.gcs]`, `[runners.cache.azure]`).
//!
//! Keys GitLab Runner reads that keel does not act on are accepted so an existing file loads
//! (and named in the trace when a job uses the cache); typos still fail. Credentials are
//! [`CacheSecret`]s: their `Debug` prints `[MASKED]`, and they are never serialised.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A credential from `[runners.cache.*]`. Only the cache backend reads it ([`CacheSecret::expose`]).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct CacheSecret(String);

impl CacheSecret {
    pub fn new(value: impl Into<String>) -> CacheSecret {
        CacheSecret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for CacheSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "[MASKED]" })
    }
}

impl Serialize for CacheSecret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "[MASKED]" })
    }
}

/// Which store `Type` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheType {
    S3,
    Gcs,
    Azure,
}

/// `[runners.cache]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(rename = "Type")]
    pub kind: Option<CacheType>,
    /// A prefix for every object name.
    #[serde(rename = "Path", default)]
    pub path: String,
    /// `false` (the default): objects live under `runner/<short token>/`, as GitLab Runner keeps
    /// each runner's cache apart.
    #[serde(rename = "Shared", default)]
    pub shared: bool,
    /// Bytes; a bigger archive is not uploaded (0: no limit).
    #[serde(rename = "MaxUploadedArchiveSize", default)]
    pub max_uploaded_archive_size: u64,
    #[serde(rename = "s3")]
    pub s3: Option<S3Config>,
    #[serde(rename = "gcs")]
    pub gcs: Option<GcsConfig>,
    #[serde(rename = "azure")]
    pub azure: Option<AzureConfig>,
}

/// `[runners.cache.s3]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// `host[:port]` of an S3-compatible server; empty: AWS.
    #[serde(rename = "ServerAddress", default)]
    pub server_address: String,
    #[serde(rename = "AccessKey", default)]
    pub access_key: String,
    #[serde(rename = "SecretKey", default)]
    pub secret_key: CacheSecret,
    #[serde(rename = "SessionToken", default)]
    pub session_token: CacheSecret,
    #[serde(rename = "BucketName", default)]
    pub bucket_name: String,
    #[serde(rename = "BucketLocation", default)]
    pub bucket_location: String,
    /// Plain HTTP to `ServerAddress`.
    #[serde(rename = "Insecure", default)]
    pub insecure: bool,
    /// `access-key` or `iam` (ambient credentials); by default, `iam` when no keys are given.
    #[serde(rename = "AuthenticationType", default)]
    pub authentication_type: String,
    #[serde(rename = "PathStyle")]
    pub path_style: Option<bool>,
    // Accepted so GitLab Runner's files load; not acted on (named in the trace when used).
    #[serde(rename = "ServerSideEncryption", default)]
    pub server_side_encryption: String,
    #[serde(rename = "ServerSideEncryptionKeyID", default)]
    pub server_side_encryption_key_id: String,
    #[serde(rename = "DualStack")]
    pub dual_stack: Option<bool>,
    #[serde(rename = "Accelerate")]
    pub accelerate: Option<bool>,
    #[serde(rename = "RoleARN", default)]
    pub role_arn: String,
    #[serde(rename = "UploadRoleARN", default)]
    pub upload_role_arn: String,
}

/// `[runners.cache.gcs]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GcsConfig {
    #[serde(rename = "BucketName", default)]
    pub bucket_name: String,
    /// A service account's JSON key file; empty: ambient credentials.
    #[serde(rename = "CredentialsFile", default)]
    pub credentials_file: String,
    #[serde(rename = "AccessID", default)]
    pub access_id: String,
    #[serde(rename = "PrivateKey", default)]
    pub private_key: CacheSecret,
}

/// `[runners.cache.azure]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    #[serde(rename = "AccountName", default)]
    pub account_name: String,
    #[serde(rename = "AccountKey", default)]
    pub account_key: CacheSecret,
    #[serde(rename = "ContainerName", default)]
    pub container_name: String,
    /// `blob.core.windows.net` by default.
    #[serde(rename = "StorageDomain", default)]
    pub storage_domain: String,
}

impl CacheConfig {
    /// The values the trace and logs must never show.
    pub fn secrets(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(s3) = &self.s3 {
            out.extend([s3.secret_key.expose(), s3.session_token.expose()].map(str::to_string));
        }
        if let Some(g) = &self.gcs {
            out.push(g.private_key.expose().to_string());
        }
        if let Some(a) = &self.azure {
            out.push(a.account_key.expose().to_string());
        }
        out.retain(|s| !s.is_empty());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitlab_runner_keys_load_and_debug_hides_the_secrets() {
        let text = r#"
Type = "s3"
Path = "ci"
Shared = true
[s3]
ServerAddress = "127.0.0.1:9000"
AccessKey = "AKIA"
SecretKey = "sup3rs3cret"
BucketName = "cache"
BucketLocation = "us-east-1"
Insecure = true
[azure]
AccountName = "acct"
AccountKey = "azur3key"
ContainerName = "c"
"#;
        let c: CacheConfig = toml::from_str(text).unwrap();
        assert_eq!(c.kind, Some(CacheType::S3));
        assert!(c.shared && c.s3.as_ref().unwrap().insecure);
        let debug = format!("{c:?}");
        assert!(!debug.contains("sup3rs3cret") && !debug.contains("azur3key"), "{debug}");
        assert!(!toml::to_string(&c).unwrap().contains("sup3rs3cret"));
        assert_eq!(c.secrets(), ["sup3rs3cret", "azur3key"]);
        assert!(toml::from_str::<CacheConfig>("Typo = 1").is_err());
    }
}
