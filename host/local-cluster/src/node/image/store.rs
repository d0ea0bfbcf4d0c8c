//! The node's image store, below the node's data dir:
//!
//! ```text
//! images/blobs/sha256/<hex>      every blob as loaded (manifests, configs, compressed layers)
//! images/layers/<diff id hex>/   each layer unpacked once, whiteout markers kept
//! images/roots/<config hex>/     an image's root filesystem: its layers merged (hard links)
//! images/index.json              names -> image, so a kept data dir keeps its images
//! ```
//!
//! An image is named by its config's digest (the image ID); several names may point at one
//! image, and loading a name again moves it, as a tag moves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use super::archive::{self, blob_path, read_blob_json};
use super::config::{ConfigFile, RunConfig};
use super::layer;
use super::reference;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image store I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {what}: {why}")]
    Invalid { what: String, why: String },
    #[error("{what} digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { what: String, expected: String, actual: String },
    #[error("cannot unpack layer {digest}: {source}")]
    Layer {
        digest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("image index {index} has no manifest for {platform}")]
    NoPlatform { index: String, platform: String },
    #[error("image {name:?} in the archive is not a valid reference: {why}")]
    BadName { name: String, why: String },
}

/// An image in the store.
#[derive(Debug)]
pub(crate) struct StoredImage {
    /// `sha256:<hex>` of its config.
    pub id: String,
    /// `sha256:<hex>` a registry would report for it (see `archive::ArchivedImage`).
    pub repo_digest: String,
    pub run: RunConfig,
    pub rootfs: PathBuf,
    /// Its config and layer blobs, recorded in the index.
    pub blobs: Vec<String>,
    /// Bytes of its config and layers as stored (compressed), the size a kubelet reports.
    pub size: u64,
}

impl PartialEq for StoredImage {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for StoredImage {}

/// What was loaded, as the load endpoint reports it (camelCase, as the API's other JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadedImage {
    /// Normalized (`docker.io/library/busybox:1.36`).
    pub names: Vec<String>,
    /// The image ID (`sha256:` of its config).
    pub id: String,
    pub repo_digest: String,
}

/// One line of `index.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    name: String,
    id: String,
    repo_digest: String,
    /// The image's blobs, to recompute its size (absent in stores written before pulls).
    #[serde(default)]
    blobs: Vec<String>,
}

pub(crate) struct Store {
    dir: PathBuf,
    as_root: bool,
    platform: (&'static str, &'static str),
    /// Normalized name -> image.
    names: RwLock<BTreeMap<String, Arc<StoredImage>>>,
    /// One load at a time: loads share layers and roots, and the index is rewritten whole.
    loading: Mutex<()>,
}

/// The node's platform as OCI names it.
pub(crate) fn platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    ("linux", arch)
}

impl Store {
    /// Opens (creating) the store in `dir`, with the images a kept data dir already has.
    pub fn open(dir: &Path, as_root: bool) -> Result<Store, StoreError> {
        for d in ["blobs/sha256", "layers", "roots"] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(|source| StoreError::Io { path: p.clone(), source })?;
        }
        let store = Store {
            dir: dir.to_path_buf(),
            as_root,
            platform: platform(),
            names: RwLock::new(BTreeMap::new()),
            loading: Mutex::new(()),
        };
        let index = dir.join("index.json");
        if let Ok(bytes) = std::fs::read(&index) {
            let records: Vec<Record> = serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::Invalid { what: index.display().to_string(), why: e.to_string() })?;
            let mut by_id: BTreeMap<String, Arc<StoredImage>> = BTreeMap::new();
            let mut names = store.names.write().expect("names lock");
            for r in records {
                let image = match by_id.get(&r.id) {
                    Some(i) => i.clone(),
                    None => {
                        let i = Arc::new(store.image(&r.id, &r.repo_digest, &r.blobs)?);
                        by_id.insert(r.id.clone(), i.clone());
                        i
                    }
                };
                names.insert(r.name, image);
            }
        }
        Ok(store)
    }

    pub fn blobs(&self) -> PathBuf {
        self.dir.join("blobs")
    }

    /// Whether the blob `digest` is stored (it was verified when it was).
    pub fn has_blob(&self, digest: &str) -> bool {
        reference::is_sha256_digest(digest) && blob_path(&self.blobs(), digest).is_file()
    }

    /// Adds an image whose blobs are already stored (a pull), under `name` (normalized).
    pub fn add(
        &self,
        name: &str,
        config: &str,
        layers: &[String],
        repo_digest: &str,
    ) -> Result<Arc<StoredImage>, StoreError> {
        let _one_at_a_time = self.loading.lock().expect("loading lock");
        let image = Arc::new(self.assemble(config, layers, repo_digest)?);
        self.names.write().expect("names lock").insert(name.to_owned(), image.clone());
        self.write_index()?;
        tracing::info!(image.name = %name, image.id = %image.id, "image pulled into the store");
        Ok(image)
    }

    /// The image `reference` names (any form a pod may use), if stored.
    pub fn get(&self, reference: &str) -> Option<Arc<StoredImage>> {
        let name = reference::normalized(reference);
        let names = self.names.read().expect("names lock");
        if let Some(i) = names.get(&name) {
            return Some(i.clone());
        }
        // By digest: `repo@sha256:...` is any stored image of that repository with that digest.
        let (_, digest) = name.split_once('@')?;
        let repo = reference::repository(&name);
        names
            .iter()
            .find(|(n, i)| reference::repository(n) == repo && (i.repo_digest == digest || i.id == digest))
            .map(|(_, i)| i.clone())
    }

    /// Loads every image of the archive at `path` (see `archive`).
    pub fn load(&self, path: &Path) -> Result<Vec<LoadedImage>, StoreError> {
        let _one_at_a_time = self.loading.lock().expect("loading lock");
        let archived = archive::read(path, &self.blobs(), self.platform)?;
        let mut loaded = Vec::new();
        for a in archived {
            let names = a
                .names
                .iter()
                .map(|n| {
                    reference::parse_normalized(n)
                        .map(|()| reference::normalized(n))
                        .map_err(|why| StoreError::BadName { name: n.clone(), why })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let image = Arc::new(self.assemble(&a.config, &a.layers, &a.repo_digest)?);
            {
                let mut map = self.names.write().expect("names lock");
                for n in &names {
                    map.insert(n.clone(), image.clone());
                }
            }
            tracing::info!(image.names = ?names, image.id = %image.id, "image loaded");
            loaded.push(LoadedImage { names, id: image.id.clone(), repo_digest: image.repo_digest.clone() });
        }
        self.write_index()?;
        Ok(loaded)
    }

    /// Unpacks the image's layers (those not yet unpacked) and merges its root (unless there).
    fn assemble(&self, config: &str, layers: &[String], repo_digest: &str) -> Result<StoredImage, StoreError> {
        let cfg: ConfigFile = read_blob_json(&self.blobs(), config, "image config")?;
        let diff_ids = cfg.rootfs.as_ref().map(|r| r.diff_ids.clone()).unwrap_or_default();
        if diff_ids.len() != layers.len() {
            return Err(StoreError::Invalid {
                what: format!("image config {config}"),
                why: format!("it lists {} layers, the manifest {}", diff_ids.len(), layers.len()),
            });
        }
        let root = self.root_dir(config)?;
        if !root.is_dir() {
            let mut dirs = Vec::new();
            for (blob, diff_id) in layers.iter().zip(&diff_ids) {
                let path = blob_path(&self.blobs(), blob);
                dirs.push(layer::unpack_once(&path, diff_id, &self.dir.join("layers"), self.as_root)?);
            }
            let roots = self.dir.join("roots");
            let tmp = tempfile::Builder::new()
                .prefix(".merge-")
                .tempdir_in(&roots)
                .map_err(|source| StoreError::Io { path: roots.clone(), source })?;
            let merged = tmp.path().join("rootfs");
            layer::merge(&dirs, &merged, self.as_root)
                .map_err(|source| StoreError::Io { path: merged.clone(), source })?;
            std::fs::rename(&merged, &root).map_err(|source| StoreError::Io { path: root.clone(), source })?;
        }
        let mut blobs = vec![config.to_owned()];
        blobs.extend(layers.iter().cloned());
        self.image(config, repo_digest, &blobs)
    }

    fn root_dir(&self, config: &str) -> Result<PathBuf, StoreError> {
        let hex = config
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| StoreError::Invalid {
                what: format!("image ID {config:?}"),
                why: "not a sha256 digest".into(),
            })?;
        Ok(self.dir.join("roots").join(hex))
    }

    fn image(&self, config: &str, repo_digest: &str, blobs: &[String]) -> Result<StoredImage, StoreError> {
        let cfg: ConfigFile = read_blob_json(&self.blobs(), config, "image config")?;
        let size =
            blobs.iter().filter_map(|b| std::fs::metadata(blob_path(&self.blobs(), b)).ok()).map(|m| m.len()).sum();
        Ok(StoredImage {
            id: config.to_owned(),
            repo_digest: repo_digest.to_owned(),
            run: cfg.config.unwrap_or_default(),
            rootfs: self.root_dir(config)?,
            size,
            blobs: blobs.to_vec(),
        })
    }

    fn write_index(&self) -> Result<(), StoreError> {
        let records: Vec<Record> = self
            .names
            .read()
            .expect("names lock")
            .iter()
            .map(|(n, i)| Record {
                name: n.clone(),
                id: i.id.clone(),
                repo_digest: i.repo_digest.clone(),
                blobs: i.blobs.clone(),
            })
            .collect();
        let path = self.dir.join("index.json");
        let tmp = self.dir.join(".index.json.tmp");
        let bytes = serde_json::to_vec_pretty(&records).expect("records serialize");
        std::fs::write(&tmp, bytes).map_err(|source| StoreError::Io { path: tmp.clone(), source })?;
        std::fs::rename(&tmp, &path).map_err(|source| StoreError::Io { path, source })
    }
}
