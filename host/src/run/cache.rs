//! A job's caches, as GitLab Runner keeps them: restored into `$CI_PROJECT_DIR` before the first
//! stage, saved after `after_script` when the outcome matches `when`, one `cache.zip` per key in
//! an object store (`[runners.cache]`: s3, gcs, azure) or, for `host run`, a local directory.
//!
//! The HOST moves the bytes, as for artifacts: the pod only runs `tar`, so the store's
//! credentials never reach the pod, a plugin or the trace, and the cache works whatever the
//! cluster's pods can reach (a pod network without egress, or a store on the host's loopback).
//! Archives stream through temporary files on the host, never whole in memory. A missing cache
//! or a store that fails is a warning in the trace; the job goes on.
//!
//! Object names follow GitLab Runner's `generateObjectName`, so a bucket a GitLab Runner filled
//! is read as it is: `<Path>/[runner/<short token>/]project/<id>/<key>`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::io::AsyncWriteExt;
use tracing::Instrument;

use super::Outcome;
use super::sources::Tracked;
use crate::cluster::session::JobPod;
use crate::config::{CacheConfig, CacheType};
use crate::job::cache::{CacheKey, CacheWhen, JobCache};
use crate::trace::Trace;

/// What can go wrong setting up a store or naming an object. Messages carry no credential.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("[runners.cache]: {0}")]
    Config(String),
    #[error("[runners.cache]: cannot set up the {kind} store")]
    Store {
        kind: &'static str,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot create the cache directory {path}")]
    LocalDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cache key {0:?} could not be sanitized")]
    BadKey(String),
    #[error("computed cache path outside of project bucket. Please remove `../` from cache key")]
    OutsideProject,
}

/// Where caches are kept, and how objects are named there.
#[derive(Clone)]
pub struct CacheStore {
    store: Arc<dyn ObjectStore>,
    /// `<Path>/[runner/<short token>/]` (no leading or trailing `/`).
    namespace: String,
    /// The local directory store keeps GitLab Runner's local layout, `<key>/cache.zip`.
    local: bool,
    /// What the trace calls the store's root (an URL without credentials, or a directory).
    shown: String,
    max_upload: u64,
}

impl std::fmt::Debug for CacheStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheStore").field("at", &self.shown).field("namespace", &self.namespace).finish()
    }
}

/// Requests that fail fail fast: a cache is an optimisation, and a job must not wait minutes
/// for a store that is down (object_store's default retries for 3 minutes).
fn client_options() -> (object_store::ClientOptions, object_store::RetryConfig) {
    let options = object_store::ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(300));
    let retry = object_store::RetryConfig {
        max_retries: 2,
        retry_timeout: Duration::from_secs(20),
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
    };
    (options, retry)
}

/// `a/./b//c/../d` -> `a/b/d`, as Go's `path.Join` cleans (a `..` never climbs above the root).
fn clean_join(parts: &[&str]) -> String {
    let mut out: Vec<&str> = Vec::new();
    for seg in parts.iter().flat_map(|p| p.split('/')) {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    out.join("/")
}

/// GitLab Runner's cache key sanitising: `%2f`/`%2e` decoded, `\` read as `/`, `.` and `..`
/// resolved within the key (never above it), trailing whitespace of the last segments dropped.
/// A key that is nothing after that (`/`, `.`, `..`) is refused.
pub fn sanitize_key(key: &str) -> Result<String, CacheError> {
    if key.is_empty() {
        return Err(CacheError::BadKey(key.into()));
    }
    let decoded =
        key.replace("%2f", "/").replace("%2F", "/").replace("%2e", ".").replace("%2E", ".").replace('\\', "/");
    let cleaned = clean_join(&[&decoded]);
    let mut parts: Vec<&str> = cleaned.split('/').collect();
    while let Some(last) = parts.last_mut() {
        *last = last.trim_end();
        if !last.is_empty() {
            break;
        }
        parts.pop();
    }
    let out = parts.join("/");
    if out.is_empty() { Err(CacheError::BadKey(key.into())) } else { Ok(out) }
}

/// `<Path>/[runner/<short token>/]`: GitLab Runner keeps each runner's objects apart unless
/// `Shared`.
fn namespace(config_path: &str, shared: bool, runner_token: &str) -> String {
    let runner =
        if shared { String::new() } else { format!("runner/{}", keel_contract::variables::short_token(runner_token)) };
    clean_join(&[config_path, &runner])
}

/// The object a key's archive is kept at: `<namespace>/project/<id>/<key>` (GitLab Runner's
/// name), `.../<key>/cache.zip` in a local directory.
pub fn object_name(namespace: &str, project_id: u64, key: &str, local: bool) -> Result<String, CacheError> {
    let key = sanitize_key(key)?;
    let base = clean_join(&[namespace, "project", &project_id.to_string()]);
    let full = clean_join(&[&base, &key]);
    if !full.starts_with(&format!("{base}/")) {
        return Err(CacheError::OutsideProject);
    }
    Ok(if local { format!("{full}/cache.zip") } else { full })
}

impl CacheStore {
    /// The store `[runners.cache]` names; without a `Type`, `local_dir` (`host run`) or none.
    pub fn from_config(
        config: Option<&CacheConfig>,
        local_dir: Option<&Path>,
        runner_token: &str,
    ) -> Result<Option<CacheStore>, CacheError> {
        let (path, shared, max_upload) =
            config.map(|c| (c.path.as_str(), c.shared, c.max_uploaded_archive_size)).unwrap_or(("", false, 0));
        let ns = namespace(path, shared, runner_token);
        let kind = config.and_then(|c| c.kind);
        let Some(kind) = kind else {
            let Some(dir) = local_dir else { return Ok(None) };
            std::fs::create_dir_all(dir).map_err(|source| CacheError::LocalDir { path: dir.into(), source })?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
                .map_err(|source| CacheError::Store { kind: "local", source })?;
            return Ok(Some(CacheStore {
                store: Arc::new(store),
                // A local directory is this host's own: no runner namespace needed.
                namespace: clean_join(&[path]),
                local: true,
                shown: dir.display().to_string(),
                max_upload,
            }));
        };
        // reqwest is built without a crypto provider (the host picks ring everywhere, no
        // aws-lc-rs); object_store's client takes the process default, so ring it is.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = config.expect("a Type comes from a config");
        let (options, retry) = client_options();
        let (store, shown): (Arc<dyn ObjectStore>, String) = match kind {
            CacheType::S3 => {
                let s3 = config.s3.clone().unwrap_or_default();
                if s3.bucket_name.is_empty() {
                    return Err(CacheError::Config("Type = \"s3\" needs [runners.cache.s3] BucketName".into()));
                }
                let region = if s3.bucket_location.is_empty() { "us-east-1" } else { &s3.bucket_location };
                let mut b = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(&s3.bucket_name)
                    .with_region(region)
                    .with_client_options(options.with_allow_http(s3.insecure))
                    .with_retry(retry);
                let iam = s3.authentication_type.eq_ignore_ascii_case("iam")
                    || (s3.authentication_type.is_empty() && s3.access_key.is_empty());
                if iam {
                    // Ambient credentials: the environment's AWS_* and then the instance's
                    // metadata service, as GitLab Runner's `iam` does.
                    for (k, v) in std::env::vars() {
                        if let Ok(key) = k.to_ascii_lowercase().parse::<object_store::aws::AmazonS3ConfigKey>()
                            && k.starts_with("AWS_")
                            && !matches!(
                                key,
                                object_store::aws::AmazonS3ConfigKey::Bucket
                                    | object_store::aws::AmazonS3ConfigKey::Endpoint
                            )
                        {
                            b = b.with_config(key, v);
                        }
                    }
                } else {
                    b = b.with_access_key_id(&s3.access_key).with_secret_access_key(s3.secret_key.expose());
                    if !s3.session_token.is_empty() {
                        b = b.with_token(s3.session_token.expose());
                    }
                }
                let shown = if s3.server_address.is_empty() {
                    format!("https://{}.s3.{region}.amazonaws.com", s3.bucket_name)
                } else {
                    // Credentials in the address (`user:pass@host`) are dropped: they are not
                    // GitLab Runner's way and must not reach the trace.
                    let host = s3.server_address.rsplit('@').next().unwrap_or_default();
                    let scheme = if s3.insecure { "http" } else { "https" };
                    let endpoint = format!("{scheme}://{host}");
                    b = b.with_endpoint(&endpoint).with_virtual_hosted_style_request(s3.path_style == Some(false));
                    format!("{endpoint}/{}", s3.bucket_name)
                };
                (Arc::new(b.build().map_err(|source| CacheError::Store { kind: "s3", source })?), shown)
            }
            CacheType::Gcs => {
                let gcs = config.gcs.clone().unwrap_or_default();
                if gcs.bucket_name.is_empty() {
                    return Err(CacheError::Config("Type = \"gcs\" needs [runners.cache.gcs] BucketName".into()));
                }
                let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(&gcs.bucket_name)
                    .with_client_options(options)
                    .with_retry(retry);
                if !gcs.credentials_file.is_empty() {
                    b = b.with_service_account_path(&gcs.credentials_file);
                }
                let shown = format!("https://storage.googleapis.com/{}", gcs.bucket_name);
                (Arc::new(b.build().map_err(|source| CacheError::Store { kind: "gcs", source })?), shown)
            }
            CacheType::Azure => {
                let az = config.azure.clone().unwrap_or_default();
                if az.account_name.is_empty() || az.container_name.is_empty() {
                    return Err(CacheError::Config(
                        "Type = \"azure\" needs [runners.cache.azure] AccountName and ContainerName".into(),
                    ));
                }
                let domain = if az.storage_domain.is_empty() { "blob.core.windows.net" } else { &az.storage_domain };
                let endpoint = format!("https://{}.{domain}", az.account_name);
                let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_account(&az.account_name)
                    .with_container_name(&az.container_name)
                    .with_endpoint(endpoint.clone())
                    .with_client_options(options)
                    .with_retry(retry);
                if !az.account_key.is_empty() {
                    b = b.with_access_key(az.account_key.expose());
                }
                let shown = format!("{endpoint}/{}", az.container_name);
                (Arc::new(b.build().map_err(|source| CacheError::Store { kind: "azure", source })?), shown)
            }
        };
        Ok(Some(CacheStore { store, namespace: ns, local: false, shown, max_upload }))
    }

    fn object(&self, project_id: u64, key: &str) -> Result<String, CacheError> {
        object_name(&self.namespace, project_id, key, self.local)
    }

    fn show(&self, object: &str) -> String {
        format!("{}/{object}", self.shown)
    }

    /// The object into a temporary file; `None` when there is none.
    async fn download(&self, object: &str) -> Result<Option<(tempfile::NamedTempFile, u64)>, String> {
        let got = match self.store.get(&ObjectPath::from(object)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(store_error(&e)),
        };
        let tmp = tempfile::NamedTempFile::new().map_err(|e| format!("a temporary file: {e}"))?;
        let mut file = tokio::fs::File::from_std(tmp.reopen().map_err(|e| e.to_string())?);
        let mut stream = got.into_stream();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| store_error(&e))?;
            size += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(|e| e.to_string())?;
        }
        file.flush().await.map_err(|e| e.to_string())?;
        Ok(Some((tmp, size)))
    }

    /// A file into the object, in parts (multipart upload above object_store's buffer).
    async fn upload(&self, object: &str, file: &Path) -> Result<(), String> {
        let mut reader = tokio::fs::File::open(file).await.map_err(|e| e.to_string())?;
        let mut writer =
            object_store::buffered::BufWriter::with_capacity(self.store.clone(), ObjectPath::from(object), 8 << 20);
        let copied = tokio::io::copy(&mut reader, &mut writer).await;
        match copied {
            Ok(_) => writer.shutdown().await.map_err(|e| io_store_error(&e)),
            Err(e) => {
                let _ = writer.abort().await;
                Err(io_store_error(&e))
            }
        }
    }
}

/// object_store's message, first line only: its errors name the URL and the status, never the
/// signing key (a session token could appear in a query string: such URLs are not ours).
fn store_error(e: &object_store::Error) -> String {
    let full = e.to_string();
    // S3 and Azure answer in XML: its `<Code>` says more than the body's first line.
    let code = full.split_once("<Code>").and_then(|(_, rest)| rest.split_once("</Code>")).map(|(c, _)| c);
    let first = full.lines().next().unwrap_or_default();
    let first = first.split_once(": <?xml").map_or(first, |(head, _)| head);
    let first = match code {
        Some(code) => format!("{first} ({code})"),
        None => first.to_string(),
    };
    match e {
        object_store::Error::NotFound { .. } => "file does not exist".to_string(),
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            format!("access denied (check [runners.cache] credentials): {first}")
        }
        _ => first,
    }
}

fn io_store_error(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<object_store::Error>()) {
        Some(inner) => store_error(inner),
        None => e.to_string().lines().next().unwrap_or_default().to_string(),
    }
}

/// What `run` needs to restore and save a job's caches.
pub struct JobCaches<'a> {
    pub caches: &'a [JobCache],
    pub store: Option<&'a CacheStore>,
    pub project_id: u64,
    /// `host run`'s source directory, for `key:files`.
    pub source_dir: Option<&'a Path>,
    /// `CACHE_FALLBACK_KEY`, tried after a cache's own `fallback_keys`.
    pub fallback_key: Option<String>,
    /// `CACHE_COMPRESSION_LEVEL`.
    pub compression: Option<String>,
}

/// A cache's key: the literal one, or GitLab's `cache:key:files` key computed from the source
/// directory as GitLab computes it from the pipeline's commit: the git blob ids of the files
/// (patterns with `*` match the directory's files, `.git` and ignored ones left out), sorted and
/// deduplicated, joined with `-` and hashed with SHA-1; `default` when none exists; the prefix
/// (if any) and the digest joined with `-`. A committed file gives the key GitLab gives.
pub fn resolve_key(key: &CacheKey, source_dir: Option<&Path>) -> String {
    match key {
        CacheKey::Literal(k) => k.clone(),
        CacheKey::Files { files, prefix } => with_prefix(prefix, source_dir.and_then(|dir| files_digest(dir, files))),
        CacheKey::FilesCommits { files, prefix } => {
            with_prefix(prefix, source_dir.and_then(|dir| commits_digest(dir, files)))
        }
    }
}

/// `<prefix>-<digest>`, the digest `default` when no file counted.
fn with_prefix(prefix: &Option<String>, digest: Option<String>) -> String {
    let digest = digest.unwrap_or_else(|| "default".into());
    match prefix {
        Some(p) if !p.is_empty() => format!("{p}-{digest}"),
        _ => digest,
    }
}

/// GitLab's `hash_of_the_latest_changes` (`files_commits:`): the ids of the last commits that
/// changed the files (`git log -1 -- <file>` in `dir`); `None` when no file was ever committed
/// (or `dir` is no git work tree).
fn commits_digest(dir: &Path, files: &[String]) -> Option<String> {
    let ids = files.iter().filter(|f| !f.is_empty()).filter_map(|f| {
        let out = std::process::Command::new("git")
            .args(["log", "-1", "--format=%H", "--"])
            .arg(f.trim_start_matches('/'))
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        let id = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !id.is_empty()).then_some(id)
    });
    digest_from_hashes(ids)
}

/// GitLab's `hash_of_file_contents`: the files' git blob ids (patterns with `*` expanded
/// against the project's files); `None` when no file exists.
fn files_digest(dir: &Path, patterns: &[String]) -> Option<String> {
    use sha1::{Digest, Sha1};
    let mut all: Option<Vec<String>> = None;
    let mut paths: Vec<String> = Vec::new();
    for pattern in patterns.iter().filter(|p| !p.is_empty()) {
        if pattern.contains('*') {
            let files = all.get_or_insert_with(|| crate::vocab::files::project_files(dir));
            paths.extend(crate::vocab::files::matching(files, pattern).unwrap_or_default());
        } else {
            paths.push(pattern.trim_start_matches("./").to_string());
        }
    }
    let ids = paths.iter().filter_map(|p| std::fs::read(dir.join(p)).ok()).map(|bytes| {
        // Git's object id of a blob: SHA-1 of `blob <size>\0<content>`.
        let mut h = Sha1::new();
        h.update(format!("blob {}\0", bytes.len()).as_bytes());
        h.update(&bytes);
        hex::encode(h.finalize())
    });
    digest_from_hashes(ids)
}

/// GitLab's `digest_from_hashes`: SHA-1 of the sorted, unique ids joined with `-`; `None`
/// without any.
fn digest_from_hashes(ids: impl Iterator<Item = String>) -> Option<String> {
    use sha1::{Digest, Sha1};
    let ids: std::collections::BTreeSet<String> = ids.collect();
    (!ids.is_empty()).then(|| hex::encode(Sha1::digest(ids.into_iter().collect::<Vec<_>>().join("-").as_bytes())))
}

/// Whether a cache with this `when` is saved after a job that ended so.
fn wanted(when: CacheWhen, outcome: &Outcome) -> bool {
    match when {
        CacheWhen::Always => true,
        CacheWhen::OnFailure => !matches!(outcome, Outcome::Success),
        CacheWhen::OnSuccess => matches!(outcome, Outcome::Success),
    }
}

/// Before the first stage: each cache that `policy` lets pull, from its key or the first
/// fallback key that has one. Never fails the job.
pub(super) async fn restore(job: &JobCaches<'_>, job_pod: &JobPod, project_dir: &str, trace: &Trace) {
    let wanted: Vec<&JobCache> = job.caches.iter().filter(|c| !c.paths.is_empty() || c.untracked).collect();
    if wanted.is_empty() {
        return;
    }
    trace.info("Restoring cache");
    for cache in wanted {
        let key = resolve_key(&cache.key, job.source_dir);
        if !cache.policy.pulls() {
            trace.line(&format!("Not downloading cache {key} due to policy"));
            continue;
        }
        let Some(store) = job.store else {
            trace.warning(&format!(
                "WARNING: Not restoring cache {key}: no cache store configured ([runners.cache] Type)"
            ));
            continue;
        };
        let mut keys = vec![key];
        keys.extend(cache.fallback_keys.iter().cloned());
        keys.extend(job.fallback_key.iter().filter(|k| !k.is_empty()).cloned());
        for key in keys {
            trace.line(&format!("Checking cache for {key}..."));
            match restore_one(store, job.project_id, &key, job_pod, project_dir, trace).await {
                Ok(true) => {
                    trace.success("Successfully extracted cache");
                    break;
                }
                Ok(false) => {
                    trace.warning("WARNING: file does not exist");
                    trace.warning("Failed to extract cache");
                }
                Err(e) => {
                    trace.warning(&format!("WARNING: {e}"));
                    trace.warning("Failed to extract cache");
                }
            }
        }
    }
}

/// `Ok(false)`: no archive under this key.
async fn restore_one(
    store: &CacheStore,
    project_id: u64,
    key: &str,
    job_pod: &JobPod,
    project_dir: &str,
    trace: &Trace,
) -> Result<bool, String> {
    let object = store.object(project_id, key).map_err(|e| e.to_string())?;
    trace.line(&format!("Downloading cache from {}", store.show(&object)));
    let Some((zip, size)) = store.download(&object).await? else { return Ok(false) };
    let span = tracing::info_span!("cache.restore", cache.key = %key, cache.bytes = size);
    async {
        let (tar, files) =
            tokio::task::spawn_blocking(move || zip_to_tar_file(zip.path())).await.map_err(|e| e.to_string())??;
        stream_into_pod(job_pod, tar.path(), project_dir).await?;
        trace.line(&format!("Downloaded cache.zip: {files} files, {size} bytes"));
        Ok(true)
    }
    .instrument(span)
    .await
}

/// After `after_script`: each cache that `when` and `policy` call for, read out of the pod,
/// zipped and uploaded. Never changes the outcome.
pub(super) async fn save(
    job: &JobCaches<'_>,
    job_pod: &JobPod,
    project_dir: &str,
    tracked: &Tracked,
    outcome: &Outcome,
    trace: &Trace,
) {
    let due: Vec<&JobCache> =
        job.caches.iter().filter(|c| (!c.paths.is_empty() || c.untracked) && wanted(c.when, outcome)).collect();
    if due.is_empty() {
        return;
    }
    trace.info(if matches!(outcome, Outcome::Success) {
        "Saving cache for successful job"
    } else {
        "Saving cache for failed job"
    });
    for cache in due {
        let key = resolve_key(&cache.key, job.source_dir);
        if !cache.policy.pushes() {
            trace.line(&format!("Not uploading cache {key} due to policy"));
            continue;
        }
        let Some(store) = job.store else {
            trace
                .warning(&format!("WARNING: Not saving cache {key}: no cache store configured ([runners.cache] Type)"));
            continue;
        };
        trace.line(&format!("Creating cache {key}..."));
        let untracked = cache.untracked.then_some(tracked);
        match save_one(store, job, cache, &key, job_pod, project_dir, untracked, trace).await {
            Ok(true) => trace.success("Created cache"),
            Ok(false) => {}
            Err(e) => {
                trace.warning(&format!("WARNING: {e}"));
                trace.warning("Failed to create cache");
            }
        }
    }
}

/// `untracked`: with `cache:untracked`, what the sources put there (everything else is cached).
#[allow(clippy::too_many_arguments)]
async fn save_one(
    store: &CacheStore,
    job: &JobCaches<'_>,
    cache: &JobCache,
    key: &str,
    job_pod: &JobPod,
    project_dir: &str,
    untracked: Option<&Tracked>,
    trace: &Trace,
) -> Result<bool, String> {
    let object = store.object(job.project_id, key).map_err(|e| e.to_string())?;
    let span = tracing::info_span!("cache.save", cache.key = %key);
    let mut patterns = cache.paths.clone();
    if untracked.is_some() {
        // Untracked files can be anywhere.
        patterns.push(".".into());
    }
    let tar = tar_from_pod(job_pod, project_dir, &super::artifacts::roots(&patterns)).await?;
    let paths = cache.paths.clone();
    let untracked = untracked.cloned();
    let level = compression(job.compression.as_deref());
    let built = {
        let _enter = span.enter();
        tokio::task::spawn_blocking(move || tar_to_zip_file(tar.path(), &paths, untracked.as_ref(), level))
    }
    .await
    .map_err(|e| e.to_string())??;
    for p in &built.outside {
        trace.warning(&format!("WARNING: {p}: not in the project directory {project_dir}: ignored"));
    }
    for (p, n) in &built.found {
        if *n == 0 {
            trace.warning(&format!(
                "WARNING: {p}: no matching files. Ensure that the artifact path is relative to the working directory ({project_dir})"
            ));
        } else {
            trace.line(&format!("{p}: found {n} matching artifact files and directories"));
        }
    }
    if built.entries == 0 {
        trace.warning("WARNING: No files to cache: not uploaded");
        return Ok(false);
    }
    if store.max_upload > 0 && built.size > store.max_upload {
        return Err(format!(
            "cache.zip is {} bytes, over [runners.cache] MaxUploadedArchiveSize ({}): not uploaded",
            built.size, store.max_upload
        ));
    }
    trace.line(&format!("Uploading cache.zip to {}", store.show(&object)));
    store.upload(&object, built.zip.path()).await?;
    Ok(true)
}

/// `CACHE_COMPRESSION_LEVEL` (GitLab Runner's names) as a deflate level; `None`: the default.
fn compression(level: Option<&str>) -> Option<i64> {
    match level? {
        "fastest" => Some(1),
        "fast" => Some(3),
        "slow" => Some(8),
        "slowest" => Some(9),
        _ => None,
    }
}

/// A zip built from a tar of the project directory, with what each pattern matched.
struct BuiltZip {
    zip: tempfile::NamedTempFile,
    size: u64,
    entries: usize,
    found: Vec<(String, usize)>,
    outside: Vec<String>,
}

/// Streams the tar's entries that `paths` select (GitLab's globs: a matched directory takes
/// everything below it) into a zip, one entry at a time.
/// The entries of `tar` that `paths` select, and with `untracked` every file and symlink not in
/// it (`.git` excepted), as `artifacts:untracked` chooses them.
fn tar_to_zip_file(
    tar: &Path,
    paths: &[String],
    untracked: Option<&Tracked>,
    level: Option<i64>,
) -> Result<BuiltZip, String> {
    use super::artifacts::{PathMatcher, normalize};
    use zip::write::SimpleFileOptions;
    let mut outside = Vec::new();
    let mut matchers = Vec::new();
    for p in paths {
        match normalize(p) {
            None => outside.push(p.clone()),
            Some(n) => matchers.push((p.clone(), PathMatcher::new(&n)?, 0usize)),
        }
    }
    let zip_file = tempfile::NamedTempFile::new().map_err(|e| format!("a temporary file: {e}"))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(zip_file.reopen().map_err(|e| e.to_string())?));
    let base = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .compression_level(level)
        .large_file(false);
    let mut archive = tar::Archive::new(std::io::BufReader::new(std::fs::File::open(tar).map_err(|e| e.to_string())?));
    let mut entries = 0;
    let mut untracked_n = 0;
    for e in archive.entries().map_err(|e| e.to_string())? {
        let mut e = e.map_err(|e| e.to_string())?;
        let Some(path) = super::artifacts::entry_path(&e)? else { continue };
        let mut hit = false;
        for (_, m, n) in matchers.iter_mut() {
            if m.selects(&path) {
                *n += 1;
                hit = true;
            }
        }
        let is_dir = e.header().entry_type() == tar::EntryType::Directory;
        if untracked.is_some_and(|t| !is_dir && super::sources::is_untracked(t, &path)) {
            untracked_n += 1;
            hit = true;
        }
        if !hit {
            continue;
        }
        let mode = e.header().mode().unwrap_or(0o644);
        let size = e.header().size().unwrap_or(0);
        let mut opts = base.unix_permissions(mode & 0o7777).large_file(size >= 0xFFFF_FFFF);
        if let Some(t) = e.header().mtime().ok().and_then(zip_time) {
            opts = opts.last_modified_time(t);
        }
        match e.header().entry_type() {
            tar::EntryType::Directory => zip.add_directory(format!("{path}/"), opts).map_err(|e| e.to_string())?,
            tar::EntryType::Symlink => {
                let target = e
                    .link_name()
                    .map_err(|e| e.to_string())?
                    .map(|l| l.to_string_lossy().into_owned())
                    .unwrap_or_default();
                zip.add_symlink(path.as_str(), target.as_str(), opts).map_err(|e| e.to_string())?
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut sample = Vec::with_capacity(SAMPLE);
                (&mut e).take(SAMPLE as u64).read_to_end(&mut sample).map_err(|e| format!("{path}: {e}"))?;
                let opts =
                    if compresses(&sample) { opts } else { opts.compression_method(zip::CompressionMethod::Stored) };
                zip.start_file(path.as_str(), opts).map_err(|e| format!("{path}: {e}"))?;
                std::io::copy(&mut std::io::Cursor::new(sample).chain(&mut e), &mut zip)
                    .map_err(|e| format!("{path}: {e}"))?;
            }
            // As GitLab Runner's archiver: what is not a file, directory or symlink is skipped.
            _ => continue,
        }
        entries += 1;
    }
    let mut out = zip.finish().map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    let size = zip_file.as_file().metadata().map_err(|e| e.to_string())?.len();
    let mut found: Vec<(String, usize)> = matchers.into_iter().map(|(p, _, n)| (p, n)).collect();
    if untracked.is_some() {
        found.push(("untracked".into(), untracked_n));
    }
    Ok(BuiltZip { zip: zip_file, size, entries, found, outside })
}

/// How much of a file is tried with deflate before it is archived.
const SAMPLE: usize = 64 * 1024;

/// Whether deflate gains anything on this sample (its first [`SAMPLE`] bytes). Caches are
/// often full of compressed things (downloaded archives, `.jar`s, images) that deflate only
/// slows down, ~30 MB/s of CPU for nothing on the machines measured; those are stored, as
/// every zip reader (GitLab Runner's extractor included) reads both methods.
fn compresses(sample: &[u8]) -> bool {
    if sample.len() < 512 {
        return true;
    }
    let mut enc = flate2::write::DeflateEncoder::new(Vec::with_capacity(sample.len()), flate2::Compression::fast());
    if enc.write_all(sample).is_err() {
        return true;
    }
    enc.finish().map(|out| out.len() * 10 < sample.len() * 9).unwrap_or(true)
}

/// A zip (GitLab Runner's `cache.zip`) as a tar for the helper's `tar -x`, through a temporary
/// file; entries that would land outside the directory are refused. Returns the number of files.
fn zip_to_tar_file(zip: &Path) -> Result<(tempfile::NamedTempFile, u64), String> {
    let file = std::fs::File::open(zip).map_err(|e| e.to_string())?;
    let mut archive =
        zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| format!("cache.zip is not a zip: {e}"))?;
    let tar_file = tempfile::NamedTempFile::new().map_err(|e| format!("a temporary file: {e}"))?;
    let out = std::io::BufWriter::new(tar_file.reopen().map_err(|e| e.to_string())?);
    let (mut w, files) =
        super::artifacts::unzip_into_tar(&mut archive, out, zip_mtime).map_err(|e| format!("cache.zip: {e}"))?;
    w.flush().map_err(|e| e.to_string())?;
    Ok((tar_file, files))
}

/// A zip entry's MS-DOS time as seconds since the epoch (UTC, as the zip carries no zone), so
/// restored files keep the times they were cached with (build tools compare them).
fn zip_mtime(t: Option<zip::DateTime>) -> u64 {
    let Some(t) = t else { return 0 };
    let days = days_from_civil(i64::from(t.year()), i64::from(t.month()), i64::from(t.day()));
    let secs = days * 86_400 + i64::from(t.hour()) * 3600 + i64::from(t.minute()) * 60 + i64::from(t.second());
    secs.max(0) as u64
}

/// Seconds since the epoch as a zip entry's time (UTC; zip times run 1980..2107).
fn zip_time(secs: u64) -> Option<zip::DateTime> {
    let days = i64::try_from(secs / 86_400).ok()?;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    zip::DateTime::from_date_and_time(
        u16::try_from(y).ok()?,
        m as u8,
        d as u8,
        (rem / 3600) as u8,
        (rem % 3600 / 60) as u8,
        (rem % 60) as u8,
    )
    .ok()
}

/// The date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `roots` under the project directory as a tar in a temporary file, from the helper
/// container's stdout, chunk by chunk.
async fn tar_from_pod(
    job_pod: &JobPod,
    project_dir: &str,
    roots: &[String],
) -> Result<tempfile::NamedTempFile, String> {
    use crate::plugins::strategy_host::{Channel, PodAccess};
    // The roots that exist are appended to "$@" and the given ones shifted away; none is an
    // empty answer (tar refuses an empty archive).
    let script = "cd \"$1\" || exit 1; shift; n=$#; \
                  for p do if [ -e \"$p\" ] || [ -L \"$p\" ]; then set -- \"$@\" \"./$p\"; fi; done; \
                  shift $n; [ $# -gt 0 ] || exit 0; exec tar -c -f - \"$@\"";
    let mut command =
        vec!["sh".to_string(), "-c".to_string(), script.to_string(), "sh".to_string(), project_dir.to_string()];
    command.extend(roots.iter().cloned());
    let tmp = tempfile::NamedTempFile::new().map_err(|e| format!("a temporary file: {e}"))?;
    let mut file = tokio::io::BufWriter::new(tokio::fs::File::from_std(tmp.reopen().map_err(|e| e.to_string())?));
    let mut session = job_pod.exec(crate::pod::HELPER_CONTAINER, command, false).await.map_err(|e| e.to_string())?;
    let mut err = Vec::new();
    let mut pending = None;
    while let Some((channel, chunk)) = session.read_output(1 << 20, &mut pending).await {
        match channel {
            Channel::Stdout => file.write_all(&chunk).await.map_err(|e| e.to_string())?,
            Channel::Stderr if err.len() < 64 * 1024 => err.extend(chunk),
            Channel::Stderr => {}
        }
    }
    file.flush().await.map_err(|e| e.to_string())?;
    match session.wait_exit().await {
        Ok(0) => Ok(tmp),
        Ok(code) => {
            Err(format!("tar in the helper container exited with {code}: {}", String::from_utf8_lossy(&err).trim()))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Pipes a tar file into `tar -x` in the helper container, under `dir`, a chunk at a time.
async fn stream_into_pod(job_pod: &JobPod, tar: &Path, dir: &str) -> Result<(), String> {
    use crate::plugins::strategy_host::PodAccess;
    use tokio::io::AsyncReadExt;
    let command = vec![
        "sh".to_string(),
        "-c".to_string(),
        "mkdir -p \"$1\" && tar -x -C \"$1\" -f -".to_string(),
        "sh".to_string(),
        dir.to_string(),
    ];
    let mut file = tokio::fs::File::open(tar).await.map_err(|e| e.to_string())?;
    let mut session = job_pod.exec(crate::pod::HELPER_CONTAINER, command, true).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        session.write_stdin(&buf[..n]).await.map_err(|e| e.to_string())?;
    }
    session.close_stdin().await.map_err(|e| e.to_string())?;
    let (out, exit) = super::stage::finish(&mut session).await;
    match exit {
        Ok(0) => Ok(()),
        Ok(code) => {
            Err(format!("tar in the helper container exited with {code}: {}", String::from_utf8_lossy(&out).trim()))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Reads a whole file back (tests).
#[cfg(test)]
fn read_all(mut f: impl Read + std::io::Seek) -> Vec<u8> {
    let mut v = Vec::new();
    std::io::Seek::rewind(&mut f).unwrap();
    f.read_to_end(&mut v).unwrap();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sanitized_as_gitlab_runner_does() {
        assert_eq!(sanitize_key("cargo-main").unwrap(), "cargo-main");
        assert_eq!(sanitize_key("a/b").unwrap(), "a/b");
        assert_eq!(sanitize_key("a%2Fb%2e%2e/c").unwrap(), "a/b../c");
        assert_eq!(sanitize_key("../../etc").unwrap(), "etc");
        assert_eq!(sanitize_key("a\\b").unwrap(), "a/b");
        assert_eq!(sanitize_key("key/ \t/  ").unwrap(), "key");
        assert_eq!(sanitize_key("key/ ./  ").unwrap(), "key/ .", "only whitespace is trimmed, as Go's TrimRightFunc");
        assert_eq!(sanitize_key("a/%2e%2e/b").unwrap(), "b");
        for bad in ["", "/", ".", "..", "%2e%2e", "//", " ", "%2F"] {
            assert!(sanitize_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn object_names_follow_gitlab_runner() {
        let ns = namespace("", false, "glrt-abcdefghijkl");
        assert_eq!(object_name(&ns, 7, "cargo-main", false).unwrap(), "runner/abcdefgh/project/7/cargo-main");
        let ns = namespace("ci/cache/", true, "glrt-abcdefghijkl");
        assert_eq!(object_name(&ns, 7, "a/b", false).unwrap(), "ci/cache/project/7/a/b");
        assert_eq!(object_name(&ns, 7, "../../x", false).unwrap(), "ci/cache/project/7/x");
        assert_eq!(object_name("", 1, "k", true).unwrap(), "project/1/k/cache.zip");
        assert!(object_name(&ns, 7, "..", false).is_err());
    }

    #[test]
    fn files_keys_follow_the_files_and_their_prefix() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Cargo.lock"), "v1").unwrap();
        let key = CacheKey::Files { files: vec!["Cargo.lock".into(), "missing".into()], prefix: Some("rust".into()) };
        let a = resolve_key(&key, Some(dir.path()));
        assert!(a.starts_with("rust-") && a.len() == 45, "{a}");
        assert_eq!(resolve_key(&key, Some(dir.path())), a, "stable");
        std::fs::write(dir.path().join("Cargo.lock"), "v2").unwrap();
        assert_ne!(resolve_key(&key, Some(dir.path())), a);
        let none = CacheKey::Files { files: vec!["missing".into()], prefix: None };
        assert_eq!(resolve_key(&none, Some(dir.path())), "default");
        let prefixed_none = CacheKey::Files { files: vec!["missing".into()], prefix: Some("p".into()) };
        assert_eq!(resolve_key(&prefixed_none, Some(dir.path())), "p-default");
    }

    /// The key GitLab computes for a commit: SHA-1 of the files' git blob ids (as `git
    /// rev-parse HEAD:<path>` names them), sorted, joined with `-`; patterns match files.
    #[test]
    fn files_keys_are_gitlabs_for_committed_files() {
        use sha1::{Digest, Sha1};
        let dir = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            let out = std::process::Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@e", "-c", "init.defaultBranch=main"])
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("git runs");
            assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        std::fs::create_dir_all(dir.path().join("web")).unwrap();
        std::fs::write(dir.path().join("Gemfile.lock"), "gems\n").unwrap();
        std::fs::write(dir.path().join("web/package-lock.json"), "{}\n").unwrap();
        git(&["init", "-q"]);
        git(&["add", "."]);
        git(&["commit", "-qm", "c"]);
        let mut ids = [git(&["rev-parse", "HEAD:Gemfile.lock"]), git(&["rev-parse", "HEAD:web/package-lock.json"])];
        ids.sort();
        let want = hex::encode(Sha1::digest(ids.join("-").as_bytes()));
        let key = CacheKey::Files { files: vec!["Gemfile.lock".into(), "**/package-lock.json".into()], prefix: None };
        assert_eq!(resolve_key(&key, Some(dir.path())), want);
        // The same file listed twice counts once, as GitLab's uniq does.
        let one =
            CacheKey::Files { files: vec!["Gemfile.lock".into(), "./Gemfile.lock".into()], prefix: Some("rb".into()) };
        let id = git(&["rev-parse", "HEAD:Gemfile.lock"]);
        assert_eq!(resolve_key(&one, Some(dir.path())), format!("rb-{}", hex::encode(Sha1::digest(id.as_bytes()))));
        // `files_commits:`: the last commits that changed the files.
        std::fs::write(dir.path().join("Gemfile.lock"), "gems 2\n").unwrap();
        git(&["commit", "-qam", "d"]);
        let mut commits = [git(&["log", "-1", "--format=%H", "--", "Gemfile.lock"]), git(&["rev-parse", "HEAD~1"])];
        commits.sort();
        let by_commits = CacheKey::FilesCommits {
            files: vec!["Gemfile.lock".into(), "web/package-lock.json".into(), "never.txt".into()],
            prefix: None,
        };
        assert_eq!(resolve_key(&by_commits, Some(dir.path())), hex::encode(Sha1::digest(commits.join("-").as_bytes())));
    }

    #[test]
    fn untracked_caches_what_the_sources_did_not_bring() {
        let dir = tempfile::tempdir().unwrap();
        let tar_path = dir.path().join("in.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
        for path in ["./src/main.rs", "./target/out.bin", "./.git/HEAD", "./vendor/a.txt"] {
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, path, &b"x"[..]).unwrap();
        }
        b.into_inner().unwrap();
        let tracked: Tracked = ["src/main.rs".to_string()].into();
        let built = tar_to_zip_file(&tar_path, &["vendor/".into()], Some(&tracked), None).unwrap();
        let z = zip::ZipArchive::new(std::fs::File::open(built.zip.path()).unwrap()).unwrap();
        let mut names: Vec<&str> = z.file_names().collect();
        names.sort();
        assert_eq!(names, ["target/out.bin", "vendor/a.txt"], "tracked files and .git stay out, each file once");
        assert_eq!(built.found, [("vendor/".to_string(), 1), ("untracked".to_string(), 2)]);
    }

    #[test]
    fn a_tar_round_trips_through_cache_zip() {
        let dir = tempfile::tempdir().unwrap();
        let tar_path = dir.path().join("in.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
        let mut add = |path: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(1_700_000_000);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, path, data).unwrap();
        };
        add("./vendor/a.txt", b"alpha");
        add("./vendor/sub/b.txt", b"beta");
        add("./other.txt", b"no");
        let random: Vec<u8> = (0..100_000).map(|_| fastrand::u8(..)).collect();
        add("./vendor/sub/random.bin", &random);
        b.into_inner().unwrap();
        let built =
            tar_to_zip_file(&tar_path, &["vendor/".into(), "nothing/".into(), "/abs".into()], None, None).unwrap();
        assert_eq!(built.entries, 3);
        assert_eq!(built.found, [("vendor/".to_string(), 3), ("nothing/".to_string(), 0)]);
        let mut z = zip::ZipArchive::new(std::fs::File::open(built.zip.path()).unwrap()).unwrap();
        assert_eq!(z.by_name("vendor/sub/random.bin").unwrap().compression(), zip::CompressionMethod::Stored);
        assert_eq!(z.by_name("vendor/a.txt").unwrap().compression(), zip::CompressionMethod::Deflated);
        assert_eq!(built.outside, ["/abs"]);
        let (tar, files) = zip_to_tar_file(built.zip.path()).unwrap();
        assert_eq!(files, 3);
        let bytes = read_all(std::fs::File::open(tar.path()).unwrap());
        let back = super::super::artifacts::read_tar(&bytes).unwrap();
        let names: Vec<&str> = back.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names, ["vendor/a.txt", "vendor/sub/b.txt", "vendor/sub/random.bin"]);
        assert_eq!(back[2].kind, super::super::artifacts::EntryKind::File(random));
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mtime = archive.entries().unwrap().next().unwrap().unwrap().header().mtime().unwrap();
        assert!(mtime.abs_diff(1_700_000_000) <= 2, "zip keeps 2-second times: {mtime}");
    }

    #[test]
    fn what_does_not_compress_is_stored() {
        let text = "fn main() { println!(\"hello\"); }\n".repeat(4000);
        assert!(compresses(text.as_bytes()));
        let random: Vec<u8> = (0..SAMPLE).map(|_| fastrand::u8(..)).collect();
        assert!(!compresses(&random));
        assert!(compresses(b"tiny"), "small files are not worth sampling");
    }

    #[test]
    fn when_follows_the_outcome() {
        assert!(wanted(CacheWhen::OnSuccess, &Outcome::Success));
        assert!(!wanted(CacheWhen::OnSuccess, &Outcome::ScriptFailure { exit_code: 1 }));
        assert!(wanted(CacheWhen::OnFailure, &Outcome::ScriptFailure { exit_code: 1 }));
        assert!(wanted(CacheWhen::Always, &Outcome::Cancelled));
    }

    #[test]
    fn each_type_builds_its_store_and_shows_no_credential() {
        let parse = |t: &str| toml::from_str::<CacheConfig>(t).unwrap();
        let s3 = parse(
            "Type = \"s3\"\n[s3]\nServerAddress = \"minio.local:9000\"\nAccessKey = \"AK\"\nSecretKey = \"SKsecret\"\n\
             BucketName = \"b\"\nInsecure = true\n",
        );
        let store = CacheStore::from_config(Some(&s3), None, "glrt-abcdefghij").unwrap().unwrap();
        assert_eq!(store.show("o"), "http://minio.local:9000/b/o");
        assert!(!format!("{store:?}").contains("SKsecret"));
        let gcs = parse("Type = \"gcs\"\n[gcs]\nBucketName = \"g\"\n");
        let store = CacheStore::from_config(Some(&gcs), None, "t").unwrap().unwrap();
        assert_eq!(store.show("o"), "https://storage.googleapis.com/g/o");
        let azure = parse(
            "Type = \"azure\"\nShared = true\n[azure]\nAccountName = \"acct\"\nAccountKey = \"a2V5\"\nContainerName = \"c\"\n",
        );
        let store = CacheStore::from_config(Some(&azure), None, "t").unwrap().unwrap();
        assert_eq!(store.show("o"), "https://acct.blob.core.windows.net/c/o");
        assert_eq!(store.namespace, "", "Shared: no runner namespace");
        let err = CacheStore::from_config(Some(&parse("Type = \"s3\"\n")), None, "t").unwrap_err();
        assert!(err.to_string().contains("BucketName"), "{err}");
        assert!(CacheStore::from_config(Some(&parse("Path = \"x\"\n")), None, "t").unwrap().is_none());
    }

    #[tokio::test]
    async fn the_local_store_saves_and_finds_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = CacheStore::from_config(None, Some(&dir.path().join("c")), "").unwrap().unwrap();
        let object = store.object(3, "k").unwrap();
        assert!(store.download(&object).await.unwrap().is_none());
        let src = dir.path().join("zip");
        std::fs::write(&src, vec![7u8; 12 << 20]).unwrap();
        store.upload(&object, &src).await.unwrap();
        let (got, size) = store.download(&object).await.unwrap().unwrap();
        assert_eq!(size, 12 << 20);
        assert_eq!(std::fs::read(got.path()).unwrap(), std::fs::read(&src).unwrap());
        assert!(dir.path().join("c/project/3/k/cache.zip").exists());
    }
}
