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
//! image, and loading a name again moves it, as a tag moves. Images are collected as the
//! kubelet's image GC does it (`collect`, see `gc`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::archive::{self, blob_path, read_blob_json};
use super::config::{ConfigFile, RunConfig};
use super::gc::{ImageGcPolicy, ImageGcReport, usage_percent};
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
    /// Its layers' diff IDs (`layers/<hex>` in the store).
    pub layers: Vec<String>,
    /// When this node first had it (loaded, pulled, or found in a kept store at start).
    pub added: Instant,
    /// When a container last asked for it.
    pub last_used: Mutex<Instant>,
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
    /// Pulls hold it shared while they fetch and assemble (they count on blobs and layers they
    /// find stored); a collection runs only when it can hold it alone.
    pull_gate: Arc<tokio::sync::RwLock<()>>,
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
            pull_gate: Arc::new(tokio::sync::RwLock::new(())),
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

    /// The image `reference` names (any form a pod may use), if stored; it counts as used now.
    pub fn get(&self, reference: &str) -> Option<Arc<StoredImage>> {
        let name = reference::normalized(reference);
        let names = self.names.read().expect("names lock");
        let found = match names.get(&name) {
            Some(i) => Some(i.clone()),
            None => {
                // By digest: `repo@sha256:...` is any stored image of that repository with that digest.
                let (_, digest) = name.split_once('@')?;
                let repo = reference::repository(&name);
                names
                    .iter()
                    .find(|(n, i)| reference::repository(n) == repo && (i.repo_digest == digest || i.id == digest))
                    .map(|(_, i)| i.clone())
            }
        };
        if let Some(i) = &found {
            *i.last_used.lock().expect("last used lock") = Instant::now();
        }
        found
    }

    /// Held by a pull from its first request to its image in the store.
    pub async fn pulling(&self) -> tokio::sync::OwnedRwLockReadGuard<()> {
        self.pull_gate.clone().read_owned().await
    }

    /// One collection under `policy` (see `gc`); `space` gives the filesystem's capacity and
    /// available bytes. Images others hold (containers, pulls) are in use and kept.
    pub fn collect(
        &self,
        policy: &ImageGcPolicy,
        space: &dyn Fn() -> std::io::Result<(u64, u64)>,
    ) -> Result<ImageGcReport, StoreError> {
        let measure = || space().map_err(|source| StoreError::Io { path: self.dir.clone(), source });
        let before = measure()?;
        let mut report = ImageGcReport {
            usage_before: usage_percent(before),
            usage_after: usage_percent(before),
            ..ImageGcReport::default()
        };
        if report.usage_before < policy.high_threshold {
            return Ok(report);
        }
        let _one_at_a_time = self.loading.lock().expect("loading lock");
        let Ok(_no_pulls) = self.pull_gate.try_write() else {
            report.skipped = Some("a pull is in progress".into());
            return Ok(report);
        };
        // Unused images, least recently used first (then the oldest), old enough.
        let mut candidates: Vec<(Arc<StoredImage>, Vec<String>)> = Vec::new();
        for (name, image) in self.names.read().expect("names lock").iter() {
            match candidates.iter_mut().find(|(i, _)| Arc::ptr_eq(i, image)) {
                Some((_, names)) => names.push(name.clone()),
                None => candidates.push((image.clone(), vec![name.clone()])),
            }
        }
        candidates.retain(|(i, names)| Arc::strong_count(i) == names.len() + 1 && i.added.elapsed() >= policy.min_age);
        candidates.sort_by_key(|(i, _)| (*i.last_used.lock().expect("last used lock"), i.added));
        let mut eligible = 0u64;
        for (image, image_names) in candidates {
            if usage_percent(measure()?) <= policy.low_threshold {
                break;
            }
            {
                let mut names = self.names.write().expect("names lock");
                let holders = names.values().filter(|i| Arc::ptr_eq(i, &image)).count();
                // Taken by a container since the list was made: in use.
                if Arc::strong_count(&image) > holders + 1 {
                    continue;
                }
                names.retain(|_, i| !Arc::ptr_eq(i, &image));
            }
            self.write_index()?;
            eligible += image.size;
            self.delete_files(&image);
            tracing::info!(image.id = %image.id, image.names = ?image_names, "image garbage collected");
            report.deleted.push((image.id.clone(), image_names));
        }
        let after = measure()?;
        report.usage_after = usage_percent(after);
        report.freed = after.1.saturating_sub(before.1);
        if report.usage_after > policy.low_threshold {
            // The kubelet's warning (its FreeDiskSpaceFailed event).
            let want = (before.0 as u128 * u128::from(100 - policy.low_threshold) / 100) as u64;
            tracing::warn!(
                "Failed to garbage collect required amount of images. Attempted to free {} bytes, but only found {eligible} bytes eligible to free.",
                want.saturating_sub(before.1)
            );
        }
        Ok(report)
    }

    /// An image's root, and its layers and blobs no remaining image uses. Best effort: what
    /// cannot be removed is logged and stays.
    fn delete_files(&self, image: &StoredImage) {
        let (mut blobs, mut layers) = (BTreeSet::new(), BTreeSet::new());
        for i in self.names.read().expect("names lock").values() {
            blobs.extend(i.blobs.iter().cloned());
            layers.extend(i.layers.iter().cloned());
        }
        let mut paths = vec![image.rootfs.clone()];
        paths.extend(
            image
                .layers
                .iter()
                .filter(|l| !layers.contains(*l))
                .filter_map(|l| l.strip_prefix("sha256:"))
                .map(|hex| self.dir.join("layers").join(hex)),
        );
        paths.extend(image.blobs.iter().filter(|b| !blobs.contains(*b)).map(|b| blob_path(&self.blobs(), b)));
        for path in paths {
            if let Err(e) = layer::remove_all(&path) {
                tracing::warn!(path = %path.display(), error = %e, "image garbage collection: cannot remove");
            }
        }
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
        let now = Instant::now();
        Ok(StoredImage {
            id: config.to_owned(),
            repo_digest: repo_digest.to_owned(),
            layers: cfg.rootfs.map(|r| r.diff_ids).unwrap_or_default(),
            run: cfg.config.unwrap_or_default(),
            rootfs: self.root_dir(config)?,
            size,
            blobs: blobs.to_vec(),
            added: now,
            last_used: Mutex::new(now),
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
