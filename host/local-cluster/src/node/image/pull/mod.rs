//! Pulls from OCI registries into the store, as containerd's CRI plugin pulls for a kubelet:
//! resolve the reference to a digest (HEAD of the manifest, the registry's answer), stop there
//! when the store already has that digest under the name, else fetch the manifest (an index
//! resolved to the node's platform), then every blob the store lacks, each written to a temp
//! file, its digest checked by oci-client and its size bounded by its descriptor before it is
//! renamed into the store, then the layers unpacked as for an archive.
//!
//! One pull per image and credentials at a time (a second pod's pull waits for the first's and
//! shares its outcome), one fetch per blob at a time (images sharing layers fetch them once).
//! Failures carry containerd's words, which the kubelet puts into ErrImagePull's message.

mod auth;
mod fetch;
mod registry;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use oci_client::Reference;
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::ImageIndexEntry;

use auth::{Credentials, credentials_for};
pub(crate) use auth::{DockerConfig, pod_configs};
use registry::{Endpoint, Registries};
pub use registry::{RegistryOptions, RegistryOptionsError, mirror_endpoint, parse_mirror};

use super::reference;
use super::store::{Store, StoredImage};

/// Resolving a reference and fetching its manifests: small requests, so a registry that takes
/// longer is failing.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(60);

/// What a pull gives: the image, and the size the kubelet's `Pulled` event reports.
#[derive(Debug, Clone)]
pub(crate) struct Pulled {
    pub image: Arc<StoredImage>,
    pub size: u64,
}

/// A failed pull, in containerd's words (the kubelet's ErrImagePull message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PullError {
    /// The reference did not resolve to a manifest.
    #[error("failed to pull and unpack image {image:?}: failed to resolve reference {image:?}: {why}")]
    Resolve { image: String, why: String },
    /// A manifest, config or layer could not be fetched or was not what it should be.
    #[error("failed to pull and unpack image {image:?}: {why}")]
    Fetch { image: String, why: String },
    /// The content arrived but could not be stored or unpacked.
    #[error("failed to pull and unpack image {image:?}: failed to extract layer: {why}")]
    Unpack { image: String, why: String },
}

type SharedPull = Shared<BoxFuture<'static, Result<Pulled, PullError>>>;

/// The node's puller (see the module doc).
pub(crate) struct Puller {
    store: Arc<Store>,
    registries: Registries,
    node_config: DockerConfig,
    in_flight: Mutex<HashMap<(String, Credentials), SharedPull>>,
    blobs: fetch::Blobs,
}

impl Puller {
    pub fn new(store: Arc<Store>, opts: &RegistryOptions) -> Result<Puller, RegistryOptionsError> {
        let path = opts.docker_config.clone().or_else(auth::node_config_path);
        Ok(Puller {
            registries: Registries::new(opts)?,
            node_config: auth::node_config(path.as_deref()),
            blobs: fetch::Blobs::new(store.clone()),
            store,
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    /// Pulls `image` (as a pod names it) with the pod's pull secrets. Runs in a task of its
    /// own, so a pod deleted meanwhile does not leave a half-done pull for the next one.
    pub async fn pull(self: &Arc<Self>, image: &str, secrets: &[DockerConfig]) -> Result<Pulled, PullError> {
        let name = reference::normalized(image);
        let creds = credentials_for(&reference::domain(image), secrets, &self.node_config);
        // A mirror gets the credentials given for it, never the registry's (which would hand
        // them to another host); the registry itself, last, gets its own.
        let endpoints = self.registries.endpoints(&reference::domain(image));
        let last = endpoints.len().saturating_sub(1);
        let plan: Vec<(Endpoint, Credentials)> = endpoints
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let c = if i == last { creds.clone() } else { credentials_for(&e.host, secrets, &self.node_config) };
                (e, c)
            })
            .collect();
        let key = (name.clone(), creds.clone());
        let shared = {
            let mut in_flight = self.in_flight.lock().expect("in-flight lock");
            in_flight
                .entry(key.clone())
                .or_insert_with(|| {
                    let this = self.clone();
                    let task = tokio::spawn(async move {
                        let result = this.pull_now(&name, &plan).await;
                        this.in_flight.lock().expect("in-flight lock").remove(&key);
                        result
                    });
                    let image = reference::normalized(image);
                    async move {
                        task.await.unwrap_or_else(|e| {
                            Err(PullError::Fetch { image, why: format!("the pull task failed: {e}") })
                        })
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        shared.await
    }

    /// Tries the registry's endpoints in order (mirrors first); the last failure is the answer.
    async fn pull_now(&self, name: &str, plan: &[(Endpoint, Credentials)]) -> Result<Pulled, PullError> {
        // No image collection while blobs found stored are counted on.
        let _gate = self.store.pulling().await;
        let mut last = None;
        for (endpoint, creds) in plan {
            match self.pull_from(endpoint, name, creds).await {
                Ok(p) => return Ok(p),
                Err(e) => {
                    tracing::info!(image.name = %name, registry.endpoint = %endpoint.host, error = %e, "pull failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| PullError::Resolve { image: name.into(), why: "no registry endpoint".into() }))
    }

    async fn pull_from(&self, endpoint: &Endpoint, name: &str, creds: &Credentials) -> Result<Pulled, PullError> {
        let resolve = |why: String| PullError::Resolve { image: name.into(), why };
        let fetch_err = |why: String| PullError::Fetch { image: name.into(), why };
        let mut target: Reference = name.parse().map_err(|e| resolve(format!("invalid reference: {e}")))?;
        if target.resolve_registry() != endpoint.host {
            target.set_mirror_registry(endpoint.host.clone());
        }
        let client = self.registries.client(endpoint, creds);
        let auth = creds.to_oci();
        let started = std::time::Instant::now();
        let digest = tokio::time::timeout(MANIFEST_TIMEOUT, client.fetch_manifest_digest(&target, &auth))
            .await
            .map_err(|_| resolve(format!("no answer from {} in {MANIFEST_TIMEOUT:?}", endpoint.host)))?
            .map_err(|e| resolve(containerd_words(name, "HEAD", &e)))?;
        // Always: the registry's digest is the one stored, nothing to fetch.
        if let Some(stored) = self.store.get(name).filter(|i| i.repo_digest == digest) {
            tracing::debug!(image.name = %name, image.digest = %digest, "pull: already stored");
            return Ok(Pulled { size: stored.size, image: stored });
        }
        let pinned = target.clone_with_digest(digest.clone());
        let (manifest, manifest_digest, list_digest) =
            tokio::time::timeout(MANIFEST_TIMEOUT, client.pull_image_manifest_and_list_digest(&pinned, &auth))
                .await
                .map_err(|_| fetch_err(format!("no manifest from {} in {MANIFEST_TIMEOUT:?}", endpoint.host)))?
                .map_err(|e| fetch_err(containerd_words(name, "GET", &e)))?;
        let repo_digest = list_digest.unwrap_or(manifest_digest);
        // The descriptors' digests name files in the store: only well-formed sha256 ones.
        let descriptors: Vec<_> = std::iter::once(&manifest.config).chain(&manifest.layers).collect();
        if let Some(bad) = descriptors.iter().find(|d| !reference::is_sha256_digest(&d.digest)) {
            return Err(fetch_err(format!("unsupported digest {:?} in manifest {repo_digest}", bad.digest)));
        }
        let fetches = descriptors.iter().map(|d| self.blobs.fetch(&client, &pinned, d));
        let fetched: u64 = futures::future::try_join_all(fetches).await.map_err(fetch_err)?.into_iter().sum();
        let layers: Vec<String> = manifest.layers.iter().map(|l| l.digest.clone()).collect();
        let (store, owned_name, config) = (self.store.clone(), name.to_owned(), manifest.config.digest.clone());
        let image = tokio::task::spawn_blocking(move || store.add(&owned_name, &config, &layers, &repo_digest))
            .await
            .map_err(|e| PullError::Unpack { image: name.into(), why: e.to_string() })?
            .map_err(|e| PullError::Unpack { image: name.into(), why: error_chain(&e) })?;
        tracing::info!(
            image.name = %name, image.id = %image.id, image.size = image.size, pull.fetched_bytes = fetched,
            pull.ms = started.elapsed().as_millis() as u64, "image pulled"
        );
        Ok(Pulled { size: image.size, image })
    }
}

/// An index entry for the node's platform (oci-client's own resolver compares with the
/// platform it was compiled for; this is the store's, the one archives are read with).
fn platform_resolver(manifests: &[ImageIndexEntry]) -> Option<String> {
    let (os, arch) = super::store::platform();
    manifests
        .iter()
        .find(|m| m.platform.as_ref().is_some_and(|p| p.os.to_string() == os && p.architecture.to_string() == arch))
        .map(|m| m.digest.clone())
}

/// containerd's wording for what went wrong with a `method` request for a manifest (the part
/// after "failed to resolve reference").
fn containerd_words(name: &str, method: &str, e: &OciDistributionError) -> String {
    use OciDistributionError as E;
    let not_found_codes = [OciErrorCode::ManifestUnknown, OciErrorCode::NameUnknown, OciErrorCode::NotFound];
    match e {
        E::ServerError { code: 404, .. } => format!("{name}: not found"),
        E::RegistryError { envelope, .. } if envelope.errors.iter().any(|x| not_found_codes.contains(&x.code)) => {
            format!("{name}: not found")
        }
        E::UnauthorizedError { url } => format!("unexpected status from {method} request to {url}: 401 Unauthorized"),
        E::RegistryError { envelope, url }
            if envelope.errors.iter().any(|x| matches!(x.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)) =>
        {
            let detail: Vec<_> = envelope.errors.iter().map(|x| x.message.as_str()).collect();
            format!(
                "pull access denied, repository does not exist or may require authorization: unauthorized: {} ({url})",
                detail.join("; ")
            )
        }
        E::AuthenticationFailure(reason) => {
            format!("failed to authorize: failed to fetch oauth token: unauthorized: {}", reason.trim())
        }
        E::ImageManifestNotFoundError(why) if why.contains("platform") => {
            "no match for platform in manifest: not found".into()
        }
        E::ServerError { code, url, message } => {
            format!("unexpected status from {method} request to {url}: {code} {}", message.trim())
        }
        E::RequestError(err) => format!("failed to do request: {}", error_chain(err)),
        other => error_chain(other),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_answers_become_containerds_words() {
        let n = "127.0.0.1:5000/a:1";
        let url = "http://127.0.0.1:5000/v2/a/manifests/1".to_owned();
        let e = OciDistributionError::ServerError { code: 404, url: url.clone(), message: String::new() };
        assert_eq!(containerd_words(n, "HEAD", &e), "127.0.0.1:5000/a:1: not found");
        let e = OciDistributionError::UnauthorizedError { url: url.clone() };
        assert_eq!(
            containerd_words(n, "GET", &e),
            "unexpected status from GET request to http://127.0.0.1:5000/v2/a/manifests/1: 401 Unauthorized"
        );
        let e = OciDistributionError::ImageManifestNotFoundError(
            "no entry found in image index manifest matching client's default platform".into(),
        );
        assert_eq!(containerd_words(n, "GET", &e), "no match for platform in manifest: not found");
        let e = OciDistributionError::ServerError { code: 500, url, message: "boom\n".into() };
        assert!(containerd_words(n, "HEAD", &e).ends_with(": 500 boom"));
        let err = PullError::Resolve { image: n.into(), why: "x".into() };
        assert_eq!(
            err.to_string(),
            "failed to pull and unpack image \"127.0.0.1:5000/a:1\": failed to resolve reference \"127.0.0.1:5000/a:1\": x"
        );
    }

    #[test]
    fn an_index_resolves_to_the_nodes_platform_only() {
        let (os, arch) = super::super::store::platform();
        let entries: Vec<ImageIndexEntry> = serde_json::from_value(serde_json::json!([
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:other", "size": 1,
             "platform": {"os": "linux", "architecture": "s390x"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:native", "size": 1,
             "platform": {"os": os, "architecture": arch}}
        ]))
        .unwrap();
        assert_eq!(platform_resolver(&entries).as_deref(), Some("sha256:native"));
        assert_eq!(platform_resolver(&entries[..1]), None);
    }
}
