//! The local store of `host run`'s pipelines: one folder per job (its trace and its
//! `artifacts.zip`), so a later job that depends on it gets its artifacts, and the user can look
//! at both after the run. Default `.keel/` beside the pipeline file; it ignores itself (a
//! `.gitignore` of `*`), so the next job's source copy and `git status` leave it out.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};

use crate::gitlab::payload::{Artifact, Dependency};
use crate::run::artifacts::ArtifactStore;

const ARCHIVE: &str = "artifacts.zip";
const TRACE: &str = "trace.log";

pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: PathBuf) -> LocalStore {
        LocalStore { root }
    }

    /// A job's folder: its name where that is a safe file name, else the safe part and a hash,
    /// so `test 1/2` and `test 1_2` stay apart.
    pub fn job_dir(&self, job: &str) -> PathBuf {
        let safe: String =
            job.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
        let name = if safe == job && !safe.starts_with('.') {
            safe
        } else {
            format!("{}-{}", safe.trim_start_matches('.'), &hex::encode(Sha256::digest(job.as_bytes()))[..8])
        };
        self.root.join(name)
    }

    pub fn trace_path(&self, job: &str) -> PathBuf {
        self.job_dir(job).join(TRACE)
    }

    /// Makes the job's folder empty of a previous run's archive (a rerun never hands on stale
    /// artifacts).
    pub fn prepare_job(&self, job: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.root)?;
        let ignore = self.root.join(".gitignore");
        if !ignore.exists() {
            std::fs::write(&ignore, "# keel's local store (host run): never part of the sources\n*\n")?;
        }
        let dir = self.job_dir(job);
        std::fs::create_dir_all(&dir)?;
        match std::fs::remove_file(dir.join(ARCHIVE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The size of the job's artifacts archive, when it left one.
    pub fn archive_size(&self, job: &str) -> Option<u64> {
        std::fs::metadata(self.job_dir(job).join(ARCHIVE)).ok().map(|m| m.len())
    }

    /// The store as one job's artifact store: uploads land in its folder, downloads come from
    /// the dependency's.
    pub fn for_job(self: &Arc<Self>, job: &str) -> Arc<dyn ArtifactStore> {
        Arc::new(JobStore { dir: self.job_dir(job), store: self.clone() })
    }
}

struct JobStore {
    dir: PathBuf,
    store: Arc<LocalStore>,
}

impl ArtifactStore for JobStore {
    fn download<'a>(&'a self, dependency: &'a Dependency) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            let path = self.store.job_dir(&dependency.name).join(ARCHIVE);
            tokio::fs::read(&path).await.map_err(|e| format!("{}: {e}", path.display()))
        })
    }

    fn upload<'a>(&'a self, artifact: &'a Artifact, zip: Vec<u8>) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            // The archive feeds dependants; a report is kept beside it under its type's name.
            let path = match (artifact.artifact_type.as_str(), artifact.artifact_format.as_str()) {
                ("" | "archive", _) => self.dir.join(ARCHIVE),
                (kind, "gzip") => self.dir.join(format!("{kind}.gz")),
                (kind, _) => self.dir.join(kind),
            };
            write_atomically(&path, &zip).await.map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(format!("the local store... {}", path.display()))
        })
    }
}

async fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    tokio::fs::write(&tmp, bytes).await?;
    tokio::fs::rename(&tmp, path).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_folders_are_safe_and_distinct() {
        let s = LocalStore::new(PathBuf::from("/x/.keel"));
        assert_eq!(s.job_dir("build"), PathBuf::from("/x/.keel/build"));
        let a = s.job_dir("test 1/2");
        let b = s.job_dir("test 1_2");
        assert_ne!(a, b);
        assert!(a.starts_with("/x/.keel") && a.file_name().unwrap().to_string_lossy().starts_with("test_1_2-"));
        assert!(!s.job_dir("..").file_name().unwrap().to_string_lossy().starts_with('.'));
    }

    #[tokio::test]
    async fn uploads_land_in_the_jobs_folder_and_feed_its_dependants() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(dir.path().join(".keel")));
        store.prepare_job("build").unwrap();
        let build = store.for_job("build");
        build.upload(&Artifact::default(), b"zip-bytes".to_vec()).await.unwrap();
        assert_eq!(store.archive_size("build"), Some(9));
        let dep = Dependency { id: 1, name: "build".into(), ..Default::default() };
        assert_eq!(store.for_job("test").download(&dep).await.unwrap(), b"zip-bytes");
        // A rerun starts without the old archive.
        store.prepare_job("build").unwrap();
        assert_eq!(store.archive_size("build"), None);
        assert!(std::fs::read_to_string(dir.path().join(".keel/.gitignore")).unwrap().contains('*'));
    }
}
