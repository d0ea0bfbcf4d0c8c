//! Image archives: `docker save`'s docker-archive (`manifest.json`, a config and a tar per layer,
//! old style `<id>/layer.tar` or, since Docker 25, `blobs/sha256/<hex>`) and OCI image layouts
//! (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`), as tarballs, optionally gzip-compressed.
//!
//! Reading one copies every file of the archive into the store's blobs, named by the digest
//! computed while copying; a file the archive names by digest must have that digest. What comes
//! out is a list of images to assemble: names, manifest digest, config and layer blobs.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::layer::{Hashing, decompressed};
use super::store::StoreError;

/// One image found in an archive, its blobs already in the store.
#[derive(Debug, Clone)]
pub(crate) struct ArchivedImage {
    /// As written in the archive (`busybox:1.36`, `docker.io/library/busybox:1.36`).
    pub names: Vec<String>,
    /// The digest a registry would report for it (the manifest's, or the index's for a
    /// multi-platform image); for a docker-archive, that of the manifest containerd would write.
    pub repo_digest: String,
    pub config: String,
    /// Compressed (as stored) layer blob digests, lowest first.
    pub layers: Vec<String>,
}

/// The archive's files: path -> blob digest.
struct Files {
    by_path: BTreeMap<String, String>,
    blobs: PathBuf,
}

impl Files {
    fn digest(&self, path: &str) -> Result<&str, StoreError> {
        let path = path.trim_start_matches("./");
        self.by_path.get(path).map(String::as_str).ok_or_else(|| StoreError::Invalid {
            what: "image archive".into(),
            why: format!("it names {path:?}, which it does not contain"),
        })
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, path: &str) -> Result<T, StoreError> {
        let digest = self.digest(path)?;
        read_blob_json(&self.blobs, digest, path)
    }
}

pub(crate) fn blob_path(blobs: &Path, digest: &str) -> PathBuf {
    blobs.join(digest.replacen(':', "/", 1))
}

pub(crate) fn read_blob_json<T: for<'de> Deserialize<'de>>(
    blobs: &Path,
    digest: &str,
    what: &str,
) -> Result<T, StoreError> {
    let path = blob_path(blobs, digest);
    let bytes = std::fs::read(&path).map_err(|source| StoreError::Io { path, source })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| StoreError::Invalid { what: format!("{what} ({digest})"), why: e.to_string() })
}

/// Reads the archive at `path` into `blobs` and lists its images.
pub(crate) fn read(path: &Path, blobs: &Path, platform: (&str, &str)) -> Result<Vec<ArchivedImage>, StoreError> {
    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| StoreError::Io { path: p.clone(), source }
    };
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut archive = tar::Archive::new(decompressed(file).map_err(io_err(path))?);
    let mut by_path = BTreeMap::new();
    let mut links = Vec::new();
    let tmp_dir = blobs.join("sha256");
    std::fs::create_dir_all(&tmp_dir).map_err(io_err(&tmp_dir))?;
    let bad = |e: std::io::Error| StoreError::Invalid {
        what: format!("image archive {}", path.display()),
        why: e.to_string(),
    };
    for entry in archive.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        let name = entry.path().map_err(bad)?.to_string_lossy().trim_start_matches("./").to_owned();
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let digest = store_blob(entry, &tmp_dir, blobs)?;
                by_path.insert(name, digest);
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                if let Some(target) = entry.link_name().map_err(bad)? {
                    let target = target.to_string_lossy().into_owned();
                    // A symlink is relative to its directory; a hard link names an archive path.
                    let resolved = if entry.header().entry_type() == tar::EntryType::Symlink {
                        let parent = Path::new(&name).parent().unwrap_or(Path::new(""));
                        normalize(&parent.join(&target))
                    } else {
                        target.trim_start_matches("./").to_owned()
                    };
                    links.push((name, resolved));
                }
            }
            _ => {}
        }
    }
    for (name, target) in links {
        if let Some(d) = by_path.get(&target).cloned() {
            by_path.insert(name, d);
        }
    }
    // Files named by digest must have it.
    for (p, d) in &by_path {
        if let Some(named) = p.strip_prefix("blobs/").map(|r| r.replacen('/', ":", 1))
            && &named != d
        {
            return Err(StoreError::DigestMismatch {
                what: format!("archive file {p}"),
                expected: named,
                actual: d.clone(),
            });
        }
    }
    let files = Files { by_path, blobs: blobs.to_path_buf() };
    if files.by_path.contains_key("index.json") && files.by_path.contains_key("oci-layout") {
        oci_layout(&files, platform)
    } else if files.by_path.contains_key("manifest.json") {
        docker_archive(&files)
    } else {
        Err(StoreError::Invalid {
            what: format!("image archive {}", path.display()),
            why: "neither a docker-archive (no manifest.json) nor an OCI image layout (no index.json and oci-layout)"
                .into(),
        })
    }
}

/// `a/b/../c` -> `a/c` (paths inside an archive).
fn normalize(p: &Path) -> String {
    let mut out: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(s) => out.push(s.to_string_lossy().into_owned()),
            _ => {}
        }
    }
    out.join("/")
}

/// Copies one file of the archive into the blobs, named by its digest.
fn store_blob(entry: impl Read, tmp_dir: &Path, blobs: &Path) -> Result<String, StoreError> {
    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| StoreError::Io { path: p.clone(), source }
    };
    let mut tmp = tempfile::Builder::new().prefix(".blob-").tempfile_in(tmp_dir).map_err(io_err(tmp_dir))?;
    let mut hashing = Hashing::new(entry);
    std::io::copy(&mut hashing, tmp.as_file_mut()).map_err(io_err(tmp.path()))?;
    let digest = hashing.finish().map_err(io_err(tmp_dir))?;
    let dest = blob_path(blobs, &digest);
    if dest.exists() {
        return Ok(digest);
    }
    tmp.persist(&dest).map_err(|e| StoreError::Io { path: dest.clone(), source: e.error })?;
    Ok(digest)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn docker_archive(files: &Files) -> Result<Vec<ArchivedImage>, StoreError> {
    let entries: Vec<DockerManifestEntry> = files.read_json("manifest.json")?;
    let mut out = Vec::new();
    for e in entries {
        let config = files.digest(&e.config)?.to_owned();
        // Old style names the config `<hex>.json`: that is its digest.
        if let Some(hex) = e.config.strip_suffix(".json").filter(|h| h.len() == 64 && !h.contains('/'))
            && config != format!("sha256:{hex}")
        {
            return Err(StoreError::DigestMismatch {
                what: "image config".into(),
                expected: format!("sha256:{hex}"),
                actual: config,
            });
        }
        let layers = e.layers.iter().map(|l| files.digest(l).map(str::to_owned)).collect::<Result<Vec<_>, _>>()?;
        let repo_digest = synthesized_manifest_digest(&files.blobs, &config, &layers)?;
        out.push(ArchivedImage { names: e.repo_tags.unwrap_or_default(), repo_digest, config, layers });
    }
    Ok(out)
}

/// The digest of the Docker schema 2 manifest containerd writes when it imports a
/// docker-archive (uncompressed layers as they are in the archive).
fn synthesized_manifest_digest(blobs: &Path, config: &str, layers: &[String]) -> Result<String, StoreError> {
    use sha2::Digest;
    let size = |d: &str| {
        let p = blob_path(blobs, d);
        std::fs::metadata(&p).map(|m| m.len()).map_err(|source| StoreError::Io { path: p, source })
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config, "size": size(config)?},
        "layers": layers.iter().map(|l| Ok(serde_json::json!({
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar",
            "digest": l,
            "size": size(l)?,
        }))).collect::<Result<Vec<_>, StoreError>>()?,
    });
    let bytes = serde_json::to_vec(&manifest).expect("a JSON value serializes");
    Ok(format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes))))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: Option<String>,
    digest: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    #[serde(default)]
    media_type: Option<String>,
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    media_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

const INDEX_TYPES: [&str; 2] =
    ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];

fn oci_layout(files: &Files, platform: (&str, &str)) -> Result<Vec<ArchivedImage>, StoreError> {
    let index: Index = files.read_json("index.json")?;
    let mut out = Vec::new();
    for d in index.manifests {
        // containerd's full name first; `ref.name` is a full reference (skopeo, buildkit) or a
        // tag only, which names nothing without a repository.
        let names: Vec<String> = d
            .annotations
            .get("io.containerd.image.name")
            .or_else(|| d.annotations.get("org.opencontainers.image.ref.name").filter(|n| n.contains([':', '/'])))
            .cloned()
            .into_iter()
            .collect();
        let manifest = resolve_manifest(&files.blobs, &d, platform)?;
        out.push(ArchivedImage {
            names,
            repo_digest: d.digest.clone(),
            config: manifest.config.digest,
            layers: manifest.layers.into_iter().map(|l| l.digest).collect(),
        });
    }
    Ok(out)
}

/// The image manifest a descriptor stands for on this platform (an index picks its entry).
fn resolve_manifest(blobs: &Path, d: &Descriptor, platform: (&str, &str)) -> Result<Manifest, StoreError> {
    let is_index = d.media_type.as_deref().is_some_and(|t| INDEX_TYPES.contains(&t));
    if !is_index {
        let m: serde_json::Value = read_blob_json(blobs, &d.digest, "manifest")?;
        // Some writers leave the descriptor's media type out; the blob says what it is.
        let nested = m.get("manifests").is_some()
            || m.get("mediaType").and_then(|t| t.as_str()).is_some_and(|t| INDEX_TYPES.contains(&t));
        if !nested {
            return serde_json::from_value(m)
                .map_err(|e| StoreError::Invalid { what: format!("manifest {}", d.digest), why: e.to_string() });
        }
    }
    let index: Index = read_blob_json(blobs, &d.digest, "image index")?;
    let _ = index.media_type;
    let (os, arch) = platform;
    let chosen = index
        .manifests
        .iter()
        .find(|m| m.platform.as_ref().is_some_and(|p| p.os == os && p.architecture == arch))
        .ok_or_else(|| StoreError::NoPlatform { index: d.digest.clone(), platform: format!("{os}/{arch}") })?;
    let m: Manifest = read_blob_json(blobs, &chosen.digest, "manifest")?;
    let _ = m.media_type;
    Ok(m)
}
