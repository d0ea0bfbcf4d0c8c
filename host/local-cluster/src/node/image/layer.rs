//! Layers: each unpacked once into a directory of its own (keyed by its diff ID, the digest of
//! the uncompressed tar), whiteouts kept there as the marker files they are in the tar; an
//! image's root filesystem is then its layers merged in order, the whiteouts applied
//! (`.wh.NAME` removes NAME of the layers below, `.wh..wh..opq` empties its directory of them).
//! Files are hard links into the layer directories, so layers are stored once however many
//! images share them; an image's root is only ever the read-only lower layer of containers.

use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::store::StoreError;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// A reader that hashes what passes through it.
pub(crate) struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    pub bytes: u64,
}

impl<R: Read> Hashing<R> {
    pub fn new(inner: R) -> Self {
        Hashing { inner, hasher: Sha256::new(), bytes: 0 }
    }

    /// `sha256:<hex>` of everything read, after reading what is left.
    pub fn finish(mut self) -> io::Result<String> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(format!("sha256:{}", hex::encode(self.hasher.finalize())))
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// How a blob is compressed, by its first bytes (media types lie less often than magic numbers
/// in archives written by hand).
pub(crate) fn decompressed(mut file: std::fs::File) -> io::Result<Box<dyn Read>> {
    use std::io::Seek;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic)?;
    file.seek(io::SeekFrom::Start(0))?;
    let file = io::BufReader::new(file);
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(file)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(zstd::stream::read::Decoder::with_buffer(file)?),
        _ => Box::new(file),
    })
}

/// Unpacks the layer tar read from `blob` into `layers/<diff id hex>` unless it is there already,
/// verifying that the uncompressed stream's digest is `diff_id`.
pub(crate) fn unpack_once(blob: &Path, diff_id: &str, layers: &Path, as_root: bool) -> Result<PathBuf, StoreError> {
    let hex = diff_id.strip_prefix("sha256:").ok_or_else(|| StoreError::Invalid {
        what: format!("layer diff ID {diff_id:?}"),
        why: "only sha256 digests are supported".into(),
    })?;
    let dest = layers.join(hex);
    if dest.is_dir() {
        return Ok(dest);
    }
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path: path.clone(), source }
    };
    let tmp = tempfile::Builder::new().prefix(".unpack-").tempdir_in(layers).map_err(io_err(layers))?;
    let file = std::fs::File::open(blob).map_err(io_err(blob))?;
    let mut hashing = Hashing::new(decompressed(file).map_err(io_err(blob))?);
    unpack(&mut hashing, tmp.path(), as_root).map_err(|source| StoreError::Layer { digest: diff_id.into(), source })?;
    let got = hashing.finish().map_err(io_err(blob))?;
    if got != diff_id {
        return Err(StoreError::DigestMismatch { what: "layer".into(), expected: diff_id.into(), actual: got });
    }
    let tmp = tmp.keep();
    match std::fs::rename(&tmp, &dest) {
        Ok(()) => Ok(dest),
        // Another load unpacked the same layer meanwhile: theirs is as good as ours.
        Err(_) if dest.is_dir() => {
            let _ = remove_all(&tmp);
            Ok(dest)
        }
        Err(e) => Err(StoreError::Io { path: dest, source: e }),
    }
}

/// Unpacks a tar stream into `dir`: files, directories, links and whiteout markers as they are;
/// device nodes are skipped (every container gets a fresh `/dev`). Directories' permissions are
/// set last, so a read-only directory does not stop its own entries.
fn unpack(r: &mut impl Read, dir: &Path, as_root: bool) -> io::Result<()> {
    let mut archive = tar::Archive::new(r);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(as_root);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let mut dirs = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        match entry.header().entry_type() {
            tar::EntryType::Char | tar::EntryType::Block => {}
            tar::EntryType::Directory => dirs.push(entry),
            _ => {
                entry.unpack_in(dir)?;
            }
        }
    }
    // Deepest first, as tar does: a parent's mode must not stop its children's.
    dirs.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
    for mut d in dirs {
        d.unpack_in(dir)?;
    }
    Ok(())
}

/// Builds `dest` (which must not exist) as the merge of `layers`, lowest first.
pub(crate) fn merge(layers: &[PathBuf], dest: &Path, as_root: bool) -> io::Result<()> {
    std::fs::create_dir_all(dest)?;
    let mut dir_modes = Vec::new();
    for layer in layers {
        merge_dir(layer, dest, as_root, &mut dir_modes)?;
    }
    // Deepest first, so a read-only directory is made so after its children.
    dir_modes.sort_by_key(|(path, ..)| std::cmp::Reverse(path.components().count()));
    for (path, mode, uid, gid) in dir_modes {
        if as_root {
            let _ = std::os::unix::fs::lchown(&path, Some(uid), Some(gid));
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

fn merge_dir(src: &Path, dest: &Path, as_root: bool, dir_modes: &mut Vec<(PathBuf, u32, u32, u32)>) -> io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(src)?.collect::<io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    // The opaque marker hides what the layers below put here, not what this layer adds.
    if entries.iter().any(|e| e.file_name() == OPAQUE) {
        for e in std::fs::read_dir(dest)? {
            remove_all(&e?.path())?;
        }
    }
    for e in entries {
        let name = e.file_name();
        let name_str = name.to_string_lossy();
        if let Some(hidden) = name_str.strip_prefix(WHITEOUT_PREFIX) {
            // `.wh..wh.*` are markers (opaque above, aufs' own); the rest hide a name below.
            // `.wh..` must not reach above the directory.
            if !hidden.starts_with(WHITEOUT_PREFIX) && !matches!(hidden, "" | "." | "..") {
                let target = dest.join(hidden);
                if target.symlink_metadata().is_ok() {
                    remove_all(&target)?;
                }
            }
            continue;
        }
        let from = e.path();
        let to = dest.join(&name);
        let meta = std::fs::symlink_metadata(&from)?;
        let existing = std::fs::symlink_metadata(&to).ok();
        if meta.is_dir() {
            if existing.as_ref().is_some_and(|m| !m.is_dir()) {
                std::fs::remove_file(&to)?;
            }
            if !to.is_dir() {
                std::fs::create_dir(&to)?;
            }
            // Writable for us while the merge fills it; its own mode is set at the end.
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o700))?;
            dir_modes.retain(|(p, ..)| p != &to);
            dir_modes.push((to.clone(), meta.mode() & 0o7777, meta.uid(), meta.gid()));
            merge_dir(&from, &to, as_root, dir_modes)?;
            continue;
        }
        if existing.is_some() {
            remove_all(&to)?;
        }
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
            if as_root {
                let _ = std::os::unix::fs::lchown(&to, Some(meta.uid()), Some(meta.gid()));
            }
        } else if meta.is_file() && std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to)?;
        }
        // Sockets and FIFOs of a layer have no use in an image's root: skipped.
    }
    Ok(())
}

/// Removes a file or a whole tree, even one with directories we may not write or read
/// (read-only directories of an image, overlayfs' `work/work`).
pub(crate) fn remove_all(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path);
    }
    if meta.mode() & 0o700 != 0o700 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    for e in std::fs::read_dir(path)? {
        remove_all(&e?.path())?;
    }
    std::fs::remove_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
        for (path, content) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            if path.ends_with('/') {
                std::fs::create_dir_all(&p).unwrap();
            } else {
                std::fs::write(&p, content).unwrap();
            }
        }
        dir.to_path_buf()
    }

    #[test]
    fn merge_applies_whiteouts_and_opaque_directories() {
        let t = tempfile::tempdir().unwrap();
        let l1 = layer(
            &t.path().join("l1"),
            &[("etc/keep", "1"), ("etc/gone", "1"), ("opt/old/a", "1"), ("opt/old/b", "1"), ("bin/x", "old")],
        );
        let l2 = layer(
            &t.path().join("l2"),
            &[
                ("etc/.wh.gone", ""),
                ("etc/.wh...", ""),
                ("opt/old/.wh..wh..opq", ""),
                ("opt/old/new", "2"),
                ("bin/x", "new"),
            ],
        );
        let root = t.path().join("root");
        merge(&[l1, l2], &root, false).unwrap();
        let read = |p: &str| std::fs::read_to_string(root.join(p)).ok();
        assert_eq!(read("etc/keep").as_deref(), Some("1"));
        assert_eq!(read("etc/gone"), None);
        assert_eq!(read("opt/old/a"), None, "an opaque directory hides the lower layers' entries");
        assert_eq!(read("opt/old/new").as_deref(), Some("2"), "but keeps its own layer's");
        assert_eq!(read("bin/x").as_deref(), Some("new"));
        assert!(!root.join("etc/.wh.gone").exists(), "markers are not part of the root");
        assert!(root.join("bin/x").exists(), "a whiteout of `..` removes nothing");
    }

    #[test]
    fn gzip_and_zstd_layers_unpack_to_the_same_files() {
        use std::io::Write;
        let t = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "dir/f", &b"layer"[..]).unwrap();
        let plain = b.into_inner().unwrap();
        let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&plain)));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let zst = zstd::encode_all(&plain[..], 3).unwrap();
        for (name, blob) in [("gz", gz.finish().unwrap()), ("zst", zst)] {
            let layers = t.path().join(name);
            std::fs::create_dir(&layers).unwrap();
            let path = t.path().join(format!("{name}.blob"));
            std::fs::write(&path, blob).unwrap();
            let dir = unpack_once(&path, &diff_id, &layers, false).unwrap();
            assert_eq!(std::fs::read(dir.join("dir/f")).unwrap(), b"layer", "{name}");
        }
    }

    #[test]
    fn unpack_verifies_the_diff_id_and_skips_a_layer_already_there() {
        let t = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "f", &b"hi"[..]).unwrap();
        let bytes = b.into_inner().unwrap();
        let blob = t.path().join("blob");
        std::fs::write(&blob, &bytes).unwrap();
        let layers = t.path().join("layers");
        std::fs::create_dir(&layers).unwrap();
        let id = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        let dir = unpack_once(&blob, &id, &layers, false).unwrap();
        assert_eq!(std::fs::read(dir.join("f")).unwrap(), b"hi");
        let wrong = format!("sha256:{}", "0".repeat(64));
        let err = unpack_once(&blob, &wrong, &layers, false).unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert_eq!(std::fs::read_dir(&layers).unwrap().count(), 1, "a failed unpack leaves nothing");
    }
}

#[cfg(test)]
mod parentless_tests {
    #[test]
    fn a_file_whose_directory_has_no_entry_unpacks() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(3);
        h.set_mtime(0);
        b.append_data(&mut h, "data/random", &b"abc"[..]).unwrap();
        let bytes = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let r = super::unpack(&mut bytes.as_slice(), dir.path(), false);
        let chain = r.as_ref().err().map(|e| format!("{e} / {:?}", std::error::Error::source(e)));
        assert!(r.is_ok(), "{chain:?}");
        assert_eq!(std::fs::read(dir.path().join("data/random")).unwrap(), b"abc");
    }
}
