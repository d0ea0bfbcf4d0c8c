//! The project's files into the pod: a local directory (`host run`) or a fresh git checkout
//! (`host serve`), streamed as a tar into the helper container.

use super::stage::finish;
use super::{Sources, chain};
use crate::cluster::session::JobPod;
use crate::sources::{Selection, git};
use crate::trace::Trace;

/// The paths the sources put into `$CI_PROJECT_DIR` (relative, `/`-separated): what
/// `artifacts:untracked` and `cache:untracked` leave out.
pub(super) type Tracked = std::collections::BTreeSet<String>;

/// Whether the file at `path` (relative) is untracked as GitLab reads `untracked: true`: the
/// sources did not bring it, and it is not git's own.
pub(super) fn is_untracked(tracked: &Tracked, path: &str) -> bool {
    !tracked.contains(path) && path != ".git" && !path.starts_with(".git/")
}

/// The project's files into `$CI_PROJECT_DIR`: a local directory, or a fresh git checkout.
pub(super) async fn get_sources(
    job: &crate::job::Job,
    sources: &Sources,
    job_pod: &JobPod,
    project_dir: &str,
    trace: &Trace,
) -> Result<Tracked, String> {
    let (dir, selection, _checkout) = match sources {
        Sources::Dir(dir) => {
            if job.variable("GIT_STRATEGY") == Some("none") {
                trace.info("Skipping Git repository setup (GIT_STRATEGY: none)");
                return Ok(Tracked::new());
            }
            trace.info(&format!("Copying sources from {} to {project_dir}", dir.display()));
            (dir.clone(), Selection::Worktree, None)
        }
        Sources::Git { info, cache } => {
            trace.info("Getting source from Git repository");
            let lookup = |k: &str| job.variable(k).map(str::to_string);
            let request = git::Request::from_job(
                info.repo_url.expose(),
                &info.sha,
                &info.git_ref,
                info.depth,
                &info.refspecs,
                &lookup,
            )
            .map_err(|e| format!("getting sources: {}", chain(&e)))?;
            let checkout = request
                .checkout(cache.as_ref(), &|line| trace.line(line))
                .await
                .map_err(|e| format!("getting sources from {}: {}", request.url, chain(&e)))?;
            let Some(checkout) = checkout else { return Ok(Tracked::new()) };
            (checkout.path().to_path_buf(), Selection::Checkout, Some(checkout))
        }
    };
    let (files, tracked) =
        copy_sources(job_pod, &dir, selection, project_dir).await.map_err(|r| format!("copying sources: {r}"))?;
    trace.line(&format!("Copied {files} files"));
    Ok(tracked)
}

/// Pipes a tar of `dir` into `tar -x` in the helper container; returns the number of files and
/// every path the tar held.
pub(super) async fn copy_sources(
    job_pod: &JobPod,
    dir: &std::path::Path,
    selection: Selection,
    project_dir: &str,
) -> Result<(u64, Tracked), String> {
    use crate::plugins::strategy_host::PodAccess;
    let command = vec![
        "sh".to_string(),
        "-c".to_string(),
        "mkdir -p \"$1\" && tar -x -m -C \"$1\" -f -".to_string(),
        "sh".to_string(),
        project_dir.to_string(),
    ];
    let mut session = job_pod.exec(crate::pod::HELPER_CONTAINER, command, true).await.map_err(|e| e.to_string())?;
    // The archive is streamed as it is made, a few chunks in flight: a project of gigabytes
    // costs no more memory than a small one, and when the copy is abandoned (the job is
    // cancelled, the pod is gone) the closed channel stops the archiver at its next chunk.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let dir = dir.to_path_buf();
    let archiver = tokio::task::spawn_blocking(move || {
        let mut tracked = Tracked::new();
        let writer = ChunkWriter { tx, buf: Vec::with_capacity(CHUNK) };
        let stats = crate::sources::archive_listed(&dir, selection, writer, &mut |path| {
            tracked.insert(path.to_owned());
        })
        .map_err(|e| chain(&e))?;
        Ok::<_, String>((stats, tracked))
    });
    while let Some(chunk) = rx.recv().await {
        session.write_stdin(&chunk).await.map_err(|e| e.to_string())?;
    }
    let (stats, tracked) = archiver.await.map_err(|e| e.to_string())??;
    session.close_stdin().await.map_err(|e| e.to_string())?;
    let (out, exit) = finish(&mut session).await;
    match exit {
        Ok(0) => Ok((stats.files, tracked)),
        Ok(code) => {
            Err(format!("tar in the helper container exited with {code}: {}", String::from_utf8_lossy(&out).trim()))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Bytes per chunk of the sources' archive on its way to the pod.
const CHUNK: usize = 256 * 1024;

/// Hands the archive to the async side in chunks; a closed channel (the copy was abandoned) is
/// a broken pipe to the archiver.
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the copy into the pod was abandoned"))
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}
