//! Compiled components on disk, so a plugin is compiled by Cranelift once per machine, not
//! once per process.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot create the plugin cache directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write compiled plugin {path} into the cache")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serialize the compiled component for the cache")]
    Serialize(#[source] wasmtime::Error),
}

/// Where compiled components live: `$XDG_CACHE_HOME/keel`, else `~/.cache/keel`, else a
/// directory under the system temp dir (a machine without a home still works, just slower).
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("keel");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".cache").join("keel");
    }
    std::env::temp_dir().join("keel-cache")
}

/// How a component was obtained, for logs and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Compiled,
    /// Read from the on-disk cache.
    Cached,
    /// Already loaded by this process (another job's load).
    Loaded,
}

pub struct ComponentCache {
    dir: PathBuf,
    engine_key: String,
    /// Components already loaded by this process, by cache path (content and engine). Every
    /// job of `host serve` loads its plugins; sharing one `Component` per plugin keeps one
    /// mapping of its code instead of one per job (50 jobs mapped the attach plugin 50 times,
    /// 2.7 MiB of RSS each) and skips the load.
    loaded: Mutex<HashMap<PathBuf, Component>>,
}

/// Distinct plugin builds kept loaded; a long-running host whose config keeps changing
/// plugins starts over rather than grow without bound.
const LOADED_MAX: usize = 64;

/// Feeds `Hash` output into sha256 so the engine's compatibility hash becomes a stable key.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(digest[..8].try_into().expect("sha256 is 32 bytes"))
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl ComponentCache {
    pub fn new(engine: &Engine, dir: PathBuf) -> Result<Self, CacheError> {
        let dir = dir.join("components");
        std::fs::create_dir_all(&dir).map_err(|source| CacheError::CreateDir { path: dir.clone(), source })?;
        let mut hasher = ShaHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        // The compatibility hash covers compiler settings; the host version pins the wasmtime
        // release (it is fixed in the workspace) so an upgrade never reads stale artifacts.
        env!("CARGO_PKG_VERSION").hash(&mut hasher);
        let engine_key = hex::encode(&hasher.0.finalize()[..8]);
        Ok(ComponentCache { dir, engine_key, loaded: Mutex::new(HashMap::new()) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_for(&self, bytes: &[u8]) -> PathBuf {
        let content = hex::encode(Sha256::digest(bytes));
        self.dir.join(format!("{content}-{}.cwasm", self.engine_key))
    }

    /// The compiled component for `bytes`: from the cache when present and loadable, else
    /// compiled now and stored. `compile` is only called on a miss.
    pub fn get_or_compile(
        &self,
        engine: &Engine,
        bytes: &[u8],
        compile: impl FnOnce() -> wasmtime::Result<Component>,
    ) -> Result<(Component, Source), CompileOrCache> {
        let path = self.path_for(bytes);
        if let Some(component) = self.loaded().get(&path) {
            return Ok((component.clone(), Source::Loaded));
        }
        let (component, source) = self.load_or_compile(engine, &path, compile)?;
        let mut loaded = self.loaded();
        if loaded.len() >= LOADED_MAX {
            loaded.clear();
        }
        loaded.insert(path, component.clone());
        Ok((component, source))
    }

    fn loaded(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Component>> {
        // The map holds no invariant a panic could break: a poisoned lock is still usable.
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load_or_compile(
        &self,
        engine: &Engine,
        path: &Path,
        compile: impl FnOnce() -> wasmtime::Result<Component>,
    ) -> Result<(Component, Source), CompileOrCache> {
        // Read into memory rather than mapped: the component lives as long as the process, and
        // a mapped file truncated under it (someone clearing the cache) would kill the process
        // with SIGBUS. A missing or unreadable file is a miss.
        if let Ok(bytes) = std::fs::read(path) {
            // SAFETY: deserialize trusts the bytes to be a wasmtime artifact made by this
            // engine configuration. They are: the file lives in our own cache, is named after the
            // sha256 of the source bytes plus this engine's compatibility hash, and only
            // `store` below ever writes it (atomically, via rename). wasmtime additionally
            // checks the version and settings header and refuses a mismatch.
            #[allow(unsafe_code)]
            let loaded = unsafe { Component::deserialize(engine, &bytes) };
            match loaded {
                Ok(component) => return Ok((component, Source::Cached)),
                Err(error) => {
                    // A truncated or foreign file: recompile over it rather than fail the job.
                    tracing::warn!(cache.path = %path.display(), error = %error, "discarding unusable cached plugin");
                }
            }
        }
        let component = compile().map_err(CompileOrCache::Compile)?;
        self.store(path, &component).map_err(CompileOrCache::Cache)?;
        Ok((component, Source::Compiled))
    }

    fn store(&self, path: &Path, component: &Component) -> Result<(), CacheError> {
        let bytes = component.serialize().map_err(CacheError::Serialize)?;
        // Write beside the target and rename: concurrent hosts (and concurrent loads in this
        // one) never see half a file. The temp name is unique per process and per write.
        static WRITES: AtomicU64 = AtomicU64::new(0);
        let n = WRITES.fetch_add(1, Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
        let write = std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(source) = write {
            let _ = std::fs::remove_file(&tmp);
            return Err(CacheError::Write { path: path.to_path_buf(), source });
        }
        Ok(())
    }
}

#[derive(Debug)]
pub enum CompileOrCache {
    Compile(wasmtime::Error),
    Cache(CacheError),
}
