//! A job's artifacts and its dependencies' artifacts (`host serve`), as GitLab Runner handles
//! them: the dependencies' zips are fetched and extracted into `$CI_PROJECT_DIR` before the
//! first stage; after the stages (after_script included) the files matching each artifact's
//! `paths` less its `exclude` are read out of the pod as a tar, zipped on the host and handed to
//! the store (GitLab's `POST jobs/:id/artifacts`). The pod only ever runs `tar`: no token, no
//! URL and no upload tool reaches it.

use std::collections::BTreeSet;
use std::io::{Cursor, Read, Write};
use std::sync::Arc;

use futures::future::BoxFuture;
use globset::{GlobBuilder, GlobMatcher};

use super::Outcome;
use super::stage::finish;
use crate::cluster::session::JobPod;
use crate::gitlab::payload::{Artifact, Dependency};
use crate::trace::Trace;

/// Where artifacts go and come from (GitLab's runner API under `host serve`).
pub trait ArtifactStore: Send + Sync {
    /// The zip of a dependency's artifacts, fetched with the dependency's own token.
    fn download<'a>(&'a self, dependency: &'a Dependency) -> BoxFuture<'a, Result<Vec<u8>, String>>;
    /// Uploads one artifact's zip; `Ok` carries where it went and the answer, as the trace says it
    /// after `Uploading artifacts as "archive" to` (GitLab: `coordinator... 201 Created`).
    fn upload<'a>(&'a self, artifact: &'a Artifact, zip: Vec<u8>) -> BoxFuture<'a, Result<String, String>>;
}

/// A job's artifacts to upload and dependencies to download, with the store that moves them.
pub struct JobArtifacts {
    pub artifacts: Vec<Artifact>,
    pub dependencies: Vec<Dependency>,
    pub store: Arc<dyn ArtifactStore>,
}

/// One file, directory or symlink of the project directory, as read from the pod's tar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to `$CI_PROJECT_DIR`, `/`-separated, no `./` and no trailing `/`.
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    File(Vec<u8>),
    Dir,
    Symlink(String),
}

/// What one artifact's `paths` and `exclude` selected, with the counts the trace reports.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Indexes into the entries, in their order.
    pub chosen: Vec<usize>,
    /// Per `paths` pattern: how many files and directories it matched (0 warns).
    pub found: Vec<(String, usize)>,
    /// Per `exclude` pattern: how many it took out.
    pub excluded: Vec<(String, usize)>,
    /// Patterns that point outside the project directory (ignored, as GitLab Runner does).
    pub outside: Vec<String>,
}

/// A GitLab glob (doublestar): `*` stays within a path segment, `**` crosses them.
fn glob(pattern: &str) -> Result<GlobMatcher, String> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("{pattern:?}: {e}"))
}

/// One normalised `paths` pattern, as [`select`] reads it: a match takes everything below it.
/// The cache's streaming archiver asks it one entry at a time.
pub(super) struct PathMatcher(Option<GlobMatcher>);

impl PathMatcher {
    /// `pattern` as [`normalize`] returns it.
    pub(super) fn new(pattern: &str) -> Result<PathMatcher, String> {
        Ok(PathMatcher(if pattern == "." { None } else { Some(glob(pattern)?) }))
    }

    pub(super) fn selects(&self, path: &str) -> bool {
        match &self.0 {
            None => true,
            Some(m) => m.is_match(path) || ancestors(path).any(|a| m.is_match(a)),
        }
    }
}

/// `./out/` -> `out`; `None` for a pattern that leaves the project directory.
pub(super) fn normalize(pattern: &str) -> Option<String> {
    let p = pattern.trim();
    if p.starts_with('/') || p.split('/').any(|s| s == "..") {
        return None;
    }
    let p = relative(p);
    Some(if p.is_empty() { ".".to_string() } else { p.to_string() })
}

/// `././out/` -> `out`: a path below the project directory without leading `./` or trailing `/`.
fn relative(mut path: &str) -> &str {
    while let Some(rest) = path.strip_prefix("./") {
        path = rest;
    }
    path.trim_end_matches('/')
}

/// GitLab's reading of `paths` and `exclude`: a `paths` pattern that matches a directory takes
/// everything below it; `exclude` is not recursive (it takes out exactly what it matches).
pub fn select(entries: &[Entry], paths: &[String], exclude: &[String]) -> Result<Selection, String> {
    let mut sel = Selection::default();
    let mut chosen = BTreeSet::new();
    for pattern in paths {
        let Some(p) = normalize(pattern) else {
            sel.outside.push(pattern.clone());
            continue;
        };
        let matcher = PathMatcher::new(&p)?;
        let mut n = 0;
        for (i, e) in entries.iter().enumerate() {
            if matcher.selects(&e.path) {
                n += 1;
                chosen.insert(i);
            }
        }
        sel.found.push((pattern.clone(), n));
    }
    for pattern in exclude {
        let Some(p) = normalize(pattern) else {
            sel.outside.push(pattern.clone());
            continue;
        };
        let m = glob(&p)?;
        let before = chosen.len();
        chosen.retain(|&i| !m.is_match(&entries[i].path));
        sel.excluded.push((pattern.clone(), before - chosen.len()));
    }
    sel.chosen = chosen.into_iter().collect();
    Ok(sel)
}

/// What to tar in the pod for these patterns: each pattern's literal leading directories (up to
/// the first glob character), so `out/**/*.bin` reads `out` and not the whole project; `.`
/// when a pattern starts with a glob.
pub fn roots(paths: &[String]) -> Vec<String> {
    let mut roots = BTreeSet::new();
    for p in paths.iter().filter_map(|p| normalize(p)) {
        let literal: Vec<&str> = p.split('/').take_while(|seg| !seg.contains(['*', '?', '[', '{', '\\'])).collect();
        if literal.is_empty() || p == "." {
            return vec![".".into()];
        }
        roots.insert(literal.join("/"));
    }
    // `out` covers `out/app`.
    let all: Vec<String> = roots.iter().cloned().collect();
    roots.retain(|r| !all.iter().any(|o| o != r && r.starts_with(&format!("{o}/"))));
    roots.into_iter().collect()
}

/// `a/b/c` -> `a/b`, `a`.
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.char_indices().filter(|&(_, c)| c == '/').map(|(i, _)| &path[..i]).rev()
}

/// A tar entry's path relative to the directory `tar -c -C dir .` archived (no `./`, no trailing
/// `/`); `None` for the directory itself.
pub(super) fn entry_path<R: Read>(e: &tar::Entry<'_, R>) -> Result<Option<String>, String> {
    let raw = e.path().map_err(|e| e.to_string())?;
    let raw = raw.to_string_lossy();
    let path = relative(&raw);
    Ok((!path.is_empty() && path != ".").then(|| path.to_string()))
}

/// The project directory's entries from a tar of it (`tar -c -C dir .`).
pub fn read_tar(bytes: &[u8]) -> Result<Vec<Entry>, String> {
    let mut archive = tar::Archive::new(bytes);
    let mut entries = Vec::new();
    for e in archive.entries().map_err(|e| e.to_string())? {
        let mut e = e.map_err(|e| e.to_string())?;
        let Some(path) = entry_path(&e)? else { continue };
        let mode = e.header().mode().unwrap_or(0o644);
        let kind = match e.header().entry_type() {
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink(
                e.link_name().map_err(|e| e.to_string())?.map(|l| l.to_string_lossy().into_owned()).unwrap_or_default(),
            ),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut data = Vec::new();
                e.read_to_end(&mut data).map_err(|e| e.to_string())?;
                EntryKind::File(data)
            }
            // Hard links, devices, fifos: GitLab Runner's archiver skips what is not a file,
            // directory or symlink too.
            _ => continue,
        };
        entries.push(Entry { path, kind, mode });
    }
    Ok(entries)
}

/// The zip GitLab takes (`artifact_format=zip`): directories, files (deflated) and symlinks
/// with their unix modes.
pub fn build_zip<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> Result<Vec<u8>, String> {
    use zip::write::SimpleFileOptions;
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let base = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for e in entries {
        let opts = base.unix_permissions(e.mode & 0o7777);
        match &e.kind {
            EntryKind::Dir => zip.add_directory(format!("{}/", e.path), opts),
            EntryKind::File(data) => {
                zip.start_file(e.path.as_str(), opts).and_then(|_| zip.write_all(data).map_err(Into::into))
            }
            EntryKind::Symlink(target) => zip.add_symlink(e.path.as_str(), target.as_str(), opts),
        }
        .map_err(|err| format!("{}: {err}", e.path))?;
    }
    zip.finish().map(|c| c.into_inner()).map_err(|e| e.to_string())
}

/// A zip's entries as a tar for the helper's `tar -x`; entries that would land outside the
/// directory are refused. Returns the tar and the number of files.
pub fn zip_to_tar(zip: &[u8]) -> Result<(Vec<u8>, u64), String> {
    let mut archive = zip::ZipArchive::new(Cursor::new(zip)).map_err(|e| format!("not a zip: {e}"))?;
    // Artifacts' times are not kept (GitLab's archives are rebuilt per job anyway).
    unzip_into_tar(&mut archive, Vec::new(), |_| 0)
}

/// Writes `archive`'s entries as a tar to `out` (modes kept, times from `mtime`), streaming each
/// file; an entry that would land outside the directory is refused. Returns `out` and the
/// number of files. Shared by artifacts and the cache.
pub(super) fn unzip_into_tar<R: std::io::Read + std::io::Seek, W: Write>(
    archive: &mut zip::ZipArchive<R>,
    out: W,
    mtime: fn(Option<zip::DateTime>) -> u64,
) -> Result<(W, u64), String> {
    let mut out = tar::Builder::new(out);
    let mut files = 0;
    for i in 0..archive.len() {
        let mut f = archive.by_index(i).map_err(|e| e.to_string())?;
        let Some(path) = f.enclosed_name() else {
            return Err(format!("{:?} leaves the project directory", f.name()));
        };
        let mode = f.unix_mode().unwrap_or(if f.is_dir() { 0o755 } else { 0o644 });
        let mut header = tar::Header::new_gnu();
        header.set_mode(mode & 0o7777);
        header.set_mtime(mtime(f.last_modified()));
        if f.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            out.append_data(&mut header, &path, std::io::empty()).map_err(|e| e.to_string())?;
        } else if f.is_symlink() {
            let mut target = String::new();
            f.read_to_string(&mut target).map_err(|e| e.to_string())?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            out.append_link(&mut header, &path, target).map_err(|e| e.to_string())?;
        } else {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(f.size());
            out.append_data(&mut header, &path, &mut f).map_err(|e| e.to_string())?;
            files += 1;
        }
    }
    out.into_inner().map(|w| (w, files)).map_err(|e| e.to_string())
}

/// Whether an artifact with this `when` is uploaded after a job that ended so.
fn wanted(when: &str, outcome: &Outcome) -> bool {
    match when {
        "always" => true,
        "on_failure" => !matches!(outcome, Outcome::Success),
        _ => matches!(outcome, Outcome::Success),
    }
}

/// Before the first stage: each dependency's artifacts into `$CI_PROJECT_DIR`. A dependency
/// whose artifacts cannot be had fails the job, as with GitLab Runner.
pub(super) async fn download_dependencies(
    job: &JobArtifacts,
    job_pod: &JobPod,
    project_dir: &str,
    trace: &Trace,
) -> Result<(), String> {
    for dep in job.dependencies.iter().filter(|d| d.artifacts_file.is_some()) {
        trace.info(&format!("Downloading artifacts for {} ({})...", dep.name, dep.id));
        let zip = job.store.download(dep).await.map_err(|e| format!("downloading artifacts of {}: {e}", dep.name))?;
        let size = zip.len();
        let (tar, files) = tokio::task::spawn_blocking(move || zip_to_tar(&zip))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("artifacts of {}: {e}", dep.name))?;
        untar_in_pod(job_pod, &tar, project_dir)
            .await
            .map_err(|e| format!("extracting artifacts of {}: {e}", dep.name))?;
        trace.line(&format!("Downloaded artifacts for {} ({}): {files} files, {size} bytes", dep.name, dep.id));
    }
    Ok(())
}

/// After the stages: each artifact that the outcome calls for, collected and uploaded. An
/// upload that fails turns a successful job into a system failure (GitLab Runner fails the job
/// when its artifacts cannot be uploaded); a failed job keeps its own outcome.
/// `expand` is the job's `$VAR` expansion, applied to `name`, `paths` and `exclude` as GitLab
/// Runner does.
#[allow(clippy::too_many_arguments)]
pub(super) async fn upload_artifacts(
    job: &JobArtifacts,
    job_pod: &JobPod,
    project_dir: &str,
    tracked: &BTreeSet<String>,
    outcome: Outcome,
    expand: &(dyn Fn(&str) -> String + Sync),
    trace: &Trace,
) -> Outcome {
    let due: Vec<Artifact> = job
        .artifacts
        .iter()
        .filter(|a| wanted(&a.when, &outcome))
        .map(|a| Artifact {
            name: expand(&a.name),
            paths: a.paths.iter().map(|p| expand(p)).collect(),
            exclude: a.exclude.iter().map(|p| expand(p)).collect(),
            ..a.clone()
        })
        .collect();
    if due.is_empty() {
        return outcome;
    }
    let failed = |reason: String| {
        trace.error(&format!("ERROR: Uploading artifacts: {reason}"));
        match outcome {
            Outcome::Success => Outcome::SystemFailure { reason: format!("uploading artifacts: {reason}") },
            ref other => other.clone(),
        }
    };
    trace.info("Uploading artifacts...");
    let mut patterns: Vec<String> = due.iter().flat_map(|a| a.paths.iter().cloned()).collect();
    if due.iter().any(|a| a.untracked) {
        // Untracked files can be anywhere.
        patterns.push(".".into());
    }
    let tar = match tar_from_pod(job_pod, project_dir, &roots(&patterns)).await {
        Ok(t) => t,
        Err(e) => return failed(format!("reading {project_dir}: {e}")),
    };
    let entries = match tokio::task::spawn_blocking(move || read_tar(&tar)).await {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => return failed(format!("reading {project_dir}: {e}")),
        Err(e) => return failed(e.to_string()),
    };
    for artifact in &due {
        let sel = match select(&entries, &artifact.paths, &artifact.exclude) {
            Ok(s) => s,
            Err(e) => return failed(format!("bad pattern {e}")),
        };
        let sel = if artifact.untracked { with_untracked(sel, &entries, tracked, &artifact.exclude) } else { sel };
        for p in &sel.outside {
            trace.warning(&format!("WARNING: {p}: not in the project directory {project_dir}: ignored"));
        }
        for (p, n) in &sel.found {
            if *n == 0 {
                trace.warning(&format!("WARNING: {p}: no matching files. Ensure that the artifact path is relative to the working directory ({project_dir})"));
            } else {
                trace.line(&format!("{p}: found {n} matching artifact files and directories"));
            }
        }
        for (p, n) in &sel.excluded {
            trace.line(&format!("{p}: excluded {n} files"));
        }
        if sel.chosen.is_empty() {
            trace.error("ERROR: No files to upload");
            continue;
        }
        let picked: Vec<Entry> = sel.chosen.iter().map(|&i| entries[i].clone()).collect();
        let format = if artifact.artifact_format.is_empty() { "zip" } else { artifact.artifact_format.as_str() };
        let kind = if artifact.artifact_type.is_empty() { "archive" } else { artifact.artifact_type.as_str() };
        let owned_format = format.to_string();
        let built = tokio::task::spawn_blocking(move || build_archive(&owned_format, &picked)).await;
        let body = match built {
            Ok(Ok((body, notes))) => {
                for note in notes {
                    trace.warning(&note);
                }
                body
            }
            Ok(Err(e)) => return failed(format!("building the {format} archive of {kind}: {e}")),
            Err(e) => return failed(e.to_string()),
        };
        let size = body.len();
        match job.store.upload(artifact, body).await {
            Ok(answer) => trace.line(&format!("Uploading artifacts as \"{kind}\" to {answer} ({size} bytes)")),
            Err(e) => return failed(e),
        }
    }
    outcome
}

/// `artifacts:untracked`: every file and symlink the sources did not put there (`.git`'s own
/// excepted), less `exclude`, added to what `paths` chose.
fn with_untracked(mut sel: Selection, entries: &[Entry], tracked: &BTreeSet<String>, exclude: &[String]) -> Selection {
    let excluded: Vec<GlobMatcher> =
        exclude.iter().filter_map(|p| normalize(p)).filter_map(|p| glob(&p).ok()).collect();
    let mut chosen: BTreeSet<usize> = sel.chosen.iter().copied().collect();
    let mut n = 0;
    for (i, e) in entries.iter().enumerate() {
        let untracked = !matches!(e.kind, EntryKind::Dir)
            && super::sources::is_untracked(tracked, &e.path)
            && !excluded.iter().any(|m| m.is_match(&e.path));
        if untracked && chosen.insert(i) {
            n += 1;
        }
    }
    sel.found.push(("untracked".into(), n));
    sel.chosen = chosen.into_iter().collect();
    sel
}

/// One artifact's upload body in GitLab's `artifact_format`: `zip` (an archive), `gzip` (each
/// file a gzip member named after it, as GitLab Runner sends `reports:junit`), `raw` (one file as
/// it is). Returns warnings for the trace beside it.
pub fn build_archive(format: &str, entries: &[Entry]) -> Result<(Vec<u8>, Vec<String>), String> {
    let files: Vec<(&str, &[u8])> = entries
        .iter()
        .filter_map(|e| match &e.kind {
            EntryKind::File(data) => Some((e.path.as_str(), data.as_slice())),
            _ => None,
        })
        .collect();
    match format {
        "zip" => Ok((build_zip(entries)?, Vec::new())),
        "gzip" => {
            let mut out = Vec::new();
            for (path, data) in &files {
                let name = path.rsplit('/').next().unwrap_or(path);
                let mut gz = flate2::GzBuilder::new()
                    .filename(name.as_bytes())
                    .comment(path.as_bytes())
                    .write(&mut out, flate2::Compression::default());
                gz.write_all(data).and_then(|_| gz.try_finish()).map_err(|e| format!("{path}: {e}"))?;
            }
            Ok((out, Vec::new()))
        }
        "raw" => match files.as_slice() {
            [] => Err("no file to upload".into()),
            [(_, data)] => Ok((data.to_vec(), Vec::new())),
            [(first, data), rest @ ..] => Ok((
                data.to_vec(),
                vec![format!("WARNING: a raw artifact is one file: uploading {first}, not the {} others", rest.len())],
            )),
        },
        other => Err(format!("artifact format {other:?} is not supported (zip, gzip, raw)")),
    }
}

/// `roots` under the project directory as a tar (those that exist), from the helper
/// container's stdout.
async fn tar_from_pod(job_pod: &JobPod, project_dir: &str, roots: &[String]) -> Result<Vec<u8>, String> {
    use crate::plugins::strategy_host::{Channel, PodAccess};
    // The roots that exist are appended to "$@" and the given ones shifted away; none is an
    // empty answer (tar refuses an empty archive).
    let script = "cd \"$1\" || exit 1; shift; n=$#; \
                  for p do if [ -e \"$p\" ] || [ -L \"$p\" ]; then set -- \"$@\" \"./$p\"; fi; done; \
                  shift $n; [ $# -gt 0 ] || exit 0; exec tar -c -f - \"$@\"";
    let mut command =
        vec!["sh".to_string(), "-c".to_string(), script.to_string(), "sh".to_string(), project_dir.to_string()];
    command.extend(roots.iter().cloned());
    let mut session = job_pod.exec(crate::pod::HELPER_CONTAINER, command, false).await.map_err(|e| e.to_string())?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut pending = None;
    while let Some((channel, chunk)) = session.read_output(1 << 20, &mut pending).await {
        match channel {
            Channel::Stdout => out.extend(chunk),
            Channel::Stderr => err.extend(chunk),
        }
    }
    match session.wait_exit().await {
        Ok(0) => Ok(out),
        Ok(code) => {
            Err(format!("tar in the helper container exited with {code}: {}", String::from_utf8_lossy(&err).trim()))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Pipes a tar into `tar -x` in the helper container, under `dir`.
async fn untar_in_pod(job_pod: &JobPod, tar: &[u8], dir: &str) -> Result<(), String> {
    use crate::plugins::strategy_host::PodAccess;
    let command = vec![
        "sh".to_string(),
        "-c".to_string(),
        "mkdir -p \"$1\" && tar -x -m -C \"$1\" -f -".to_string(),
        "sh".to_string(),
        dir.to_string(),
    ];
    let mut session = job_pod.exec(crate::pod::HELPER_CONTAINER, command, true).await.map_err(|e| e.to_string())?;
    session.write_stdin(tar).await.map_err(|e| e.to_string())?;
    session.close_stdin().await.map_err(|e| e.to_string())?;
    let (out, exit) = finish(&mut session).await;
    match exit {
        Ok(0) => Ok(()),
        Ok(code) => {
            Err(format!("tar in the helper container exited with {code}: {}", String::from_utf8_lossy(&out).trim()))
        }
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, data: &str) -> Entry {
        Entry { path: path.into(), kind: EntryKind::File(data.as_bytes().to_vec()), mode: 0o644 }
    }
    fn dir(path: &str) -> Entry {
        Entry { path: path.into(), kind: EntryKind::Dir, mode: 0o755 }
    }
    fn tree() -> Vec<Entry> {
        vec![
            dir("out"),
            file("out/app", "app"),
            file("out/skip.log", "log"),
            dir("out/sub"),
            file("out/sub/deep.log", "deep"),
            file("report.xml", "<x/>"),
            dir("src"),
            file("src/main.rs", "fn main() {}"),
            file("src/a.o", "o"),
        ]
    }
    fn names(entries: &[Entry], sel: &Selection) -> Vec<String> {
        sel.chosen.iter().map(|&i| entries[i].path.clone()).collect()
    }
    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_directory_takes_everything_below_it_and_exclude_is_not_recursive() {
        let t = tree();
        let sel = select(&t, &s(&["out/"]), &s(&["out/*.log"])).unwrap();
        assert_eq!(names(&t, &sel), ["out", "out/app", "out/sub", "out/sub/deep.log"]);
        assert_eq!(sel.found, [("out/".to_string(), 5)]);
        assert_eq!(sel.excluded, [("out/*.log".to_string(), 1)]);
        let sel = select(&t, &s(&["./out"]), &s(&["out/**/*.log"])).unwrap();
        assert_eq!(names(&t, &sel), ["out", "out/app", "out/sub"]);
    }

    #[test]
    fn star_stays_in_a_segment_and_doublestar_crosses() {
        let t = tree();
        let sel = select(&t, &s(&["*.xml", "src/*.rs"]), &[]).unwrap();
        assert_eq!(names(&t, &sel), ["report.xml", "src/main.rs"]);
        let sel = select(&t, &s(&["*.log"]), &[]).unwrap();
        assert_eq!(sel.found, [("*.log".to_string(), 0)]);
        let sel = select(&t, &s(&["**/*.log"]), &[]).unwrap();
        assert_eq!(names(&t, &sel), ["out/skip.log", "out/sub/deep.log"]);
        let sel = select(&t, &s(&["nothing/", "/etc/passwd", "../up"]), &[]).unwrap();
        assert!(sel.chosen.is_empty());
        assert_eq!(sel.outside, ["/etc/passwd", "../up"]);
    }

    #[test]
    fn zip_round_trips_through_the_tar_for_the_pod() {
        let t = tree();
        let sel = select(&t, &s(&["out/"]), &s(&["out/*.log"])).unwrap();
        let picked: Vec<&Entry> = sel.chosen.iter().map(|&i| &t[i]).collect();
        let zip = build_zip(picked).unwrap();
        let mut archive = zip::ZipArchive::new(Cursor::new(&zip)).unwrap();
        let mut zipped: Vec<String> =
            (0..archive.len()).map(|i| archive.by_index(i).unwrap().name().to_string()).collect();
        zipped.sort();
        assert_eq!(zipped, ["out/", "out/app", "out/sub/", "out/sub/deep.log"]);
        let (tar, files) = zip_to_tar(&zip).unwrap();
        assert_eq!(files, 2);
        let back = read_tar(&tar).unwrap();
        assert!(back.contains(&file("out/app", "app")), "{back:?}");
        assert!(back.iter().any(|e| e.path == "out/sub" && e.kind == EntryKind::Dir));
    }

    #[test]
    fn a_zip_escaping_the_directory_is_refused() {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        zip.start_file("../evil", zip::write::SimpleFileOptions::default()).unwrap();
        zip.write_all(b"x").unwrap();
        let bytes = zip.finish().unwrap().into_inner();
        assert!(zip_to_tar(&bytes).unwrap_err().contains("leaves the project directory"));
    }

    #[test]
    fn only_the_patterns_literal_directories_are_read_from_the_pod() {
        assert_eq!(roots(&s(&["out/", "./out/sub/*.bin", "report.xml", "dist/**/x"])), ["dist", "out", "report.xml"]);
        assert_eq!(roots(&s(&["out/", "**/*.log"])), ["."]);
        assert_eq!(roots(&s(&["*.xml"])), ["."]);
        assert_eq!(roots(&s(&["/etc", "../x"])), Vec::<String>::new());
        assert!(read_tar(&[]).unwrap().is_empty(), "no root exists: an empty answer");
    }

    #[test]
    fn when_follows_the_outcome() {
        assert!(wanted("on_success", &Outcome::Success) && wanted("", &Outcome::Success));
        assert!(!wanted("on_success", &Outcome::ScriptFailure { exit_code: 1 }));
        assert!(
            wanted("on_failure", &Outcome::ScriptFailure { exit_code: 1 }) && !wanted("on_failure", &Outcome::Success)
        );
        assert!(wanted("always", &Outcome::Cancelled));
    }

    #[test]
    fn report_formats_as_gitlab_takes_them() {
        let entries = vec![dir("reports"), file("reports/a.xml", "<a/>"), file("reports/b.xml", "<b/>")];
        let (gz, notes) = build_archive("gzip", &entries).unwrap();
        assert!(notes.is_empty());
        // One gzip member per file, named after it.
        let mut members = Vec::new();
        let mut rest: &[u8] = &gz;
        while !rest.is_empty() {
            let mut d = flate2::bufread::GzDecoder::new(rest);
            let mut text = String::new();
            d.read_to_string(&mut text).unwrap();
            let name = String::from_utf8(d.header().unwrap().filename().unwrap().to_vec()).unwrap();
            members.push((name, text));
            rest = d.into_inner();
        }
        assert_eq!(members, [("a.xml".to_string(), "<a/>".to_string()), ("b.xml".to_string(), "<b/>".to_string())]);
        let (raw, notes) = build_archive("raw", &entries).unwrap();
        assert_eq!((raw.as_slice(), notes.len()), (b"<a/>".as_slice(), 1), "one file; the rest named in a warning");
        assert!(build_archive("tar", &entries).unwrap_err().contains("not supported"));
        assert!(build_archive("raw", &[dir("x")]).is_err());
    }

    #[test]
    fn untracked_is_what_the_sources_did_not_bring() {
        let entries = vec![file("README.md", "r"), file("made.txt", "m"), file(".git/HEAD", "h"), file("x.log", "l")];
        let tracked: BTreeSet<String> = ["README.md".to_string()].into();
        let sel = select(&entries, &[], &[]).unwrap();
        let sel = with_untracked(sel, &entries, &tracked, &["*.log".to_string()]);
        let chosen: Vec<&str> = sel.chosen.iter().map(|&i| entries[i].path.as_str()).collect();
        assert_eq!(chosen, ["made.txt"]);
        assert_eq!(sel.found, [("untracked".to_string(), 1)]);
    }
}
