//! The project's files as a tar stream, for `tar -x` in the job's pod, and the git facts the job's
//! variables need.
//!
//! What goes in is what a fresh clone plus the developer's untracked work would hold: everything
//! under the project directory, hidden files included, less `.git` (at any depth, directory or
//! submodule file), keel's own `.keel/` store at the top, an embedded cluster's data directory
//! (one holding `local_cluster::DATA_DIR_MARKER`), and what git's own ignore rules inside the project exclude (`.gitignore` at any
//! depth and `.git/info/exclude`). Left out on purpose, because they depend on the machine rather
//! than the project and would make the same project ship different files on different hosts:
//! the user's global gitignore (`core.excludesFile`), `.gitignore` files above the project
//! directory, and the `ignore` crate's own `.ignore` files. Rules apply whether or not the
//! directory is a git repository.
//!
//! A checkout made for a GitLab job ([`git`]) is copied whole instead ([`Selection::Checkout`]):
//! `.git` included, no ignore rules, as GitLab Runner leaves `$CI_PROJECT_DIR`.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ignore::WalkBuilder;

pub use crate::job::variables::Commit;

#[derive(Debug, thiserror::Error)]
pub enum SourcesError {
    #[error("cannot read project directory {path}")]
    ProjectDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("project path {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot list the project's files under {dir}")]
    Walk {
        dir: PathBuf,
        #[source]
        source: ignore::Error,
    },
    #[error("cannot apply the ignore rules in {path}: {message}")]
    IgnoreRules { path: PathBuf, message: String },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot add {path} to the archive")]
    Append {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot finish the archive of {dir}")]
    Finish {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What an archive holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Regular files (directories and symlinks are not counted).
    pub files: u64,
    /// Content bytes of those files.
    pub bytes: u64,
}

pub mod git;

/// Which files of a directory go into the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Selection {
    /// A developer's working tree (`host run`): less `.git` and what the ignore rules exclude.
    #[default]
    Worktree,
    /// A fresh checkout (`host serve`): everything, `.git` included.
    Checkout,
}

/// The project's files as an in-memory tar; see [`archive_to`].
pub fn archive(dir: &Path) -> Result<Vec<u8>, SourcesError> {
    let mut out = Vec::new();
    archive_to(dir, &mut out)?;
    Ok(out)
}

/// Writes a tar of `dir`'s contents to `w`, paths relative to `dir`, in sorted order.
///
/// GNU format, so long paths and link targets survive (GNU tar and busybox both read its long-name
/// records). Entries carry their mode bits and modification time, and owner 0:0 with no owner
/// names: the host user's ids mean nothing in the pod, and a root `tar -x` would otherwise apply
/// them. Symlinks are stored as links and never followed, so nothing outside `dir` is read.
/// Sockets, FIFOs and devices are skipped.
pub fn archive_to(dir: &Path, w: impl Write) -> Result<Stats, SourcesError> {
    archive_selected(dir, Selection::Worktree, w)
}

/// [`archive_to`] with the choice of files spelled out.
pub fn archive_selected(dir: &Path, selection: Selection, w: impl Write) -> Result<Stats, SourcesError> {
    archive_listed(dir, selection, w, &mut |_| {})
}

/// [`archive_selected`], telling `seen` the relative (`/`-separated) path of every entry
/// written: what the sources put into the project directory, known without reading the
/// archive back.
pub fn archive_listed(
    dir: &Path,
    selection: Selection,
    w: impl Write,
    seen: &mut dyn FnMut(&str),
) -> Result<Stats, SourcesError> {
    let meta = std::fs::metadata(dir).map_err(|source| SourcesError::ProjectDir { path: dir.to_path_buf(), source })?;
    if !meta.is_dir() {
        return Err(SourcesError::NotADirectory(dir.to_path_buf()));
    }
    let exclude = dir.join(".git/info/exclude");
    if selection == Selection::Worktree && exclude.is_file() {
        check_rules(&exclude)?;
    }

    let mut tar = tar::Builder::new(w);
    let mut stats = Stats::default();
    for entry in walker(dir, selection) {
        let entry = match entry {
            // Removed between listing and reading (a tool writing in the tree meanwhile): it was
            // not part of the project when the copy was taken.
            Err(err) if err.io_error().is_some_and(|e| e.kind() == io::ErrorKind::NotFound) => continue,
            other => other.map_err(|source| SourcesError::Walk { dir: dir.to_path_buf(), source })?,
        };
        // Problems with a directory's ignore files come attached to its entry, and the walk goes
        // on without the rules it could not use. Those rules may be what keeps a secret file out
        // of the pod, so only unparsable patterns, which git cannot use either, are let pass.
        if let Some(err) = entry.error() {
            if !only_bad_patterns(err) {
                return Err(SourcesError::IgnoreRules { path: entry.path().to_path_buf(), message: err.to_string() });
            }
            tracing::warn!(error = %err, "ignoring an invalid pattern in an ignore file");
        }
        if selection == Selection::Worktree && entry.file_name() == ".gitignore" {
            check_rules(entry.path())?;
        }
        if entry.depth() == 0 {
            continue;
        }
        let path = entry.path();
        let rel = path.strip_prefix(dir).expect("the walker yields paths under its root");
        if append(&mut tar, path, rel, &mut stats)? {
            seen(&rel.to_string_lossy());
        }
    }
    tar.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(|source| SourcesError::Finish { dir: dir.to_path_buf(), source })?;
    Ok(stats)
}

fn walker(dir: &Path, selection: Selection) -> ignore::Walk {
    let worktree = selection == Selection::Worktree;
    let mut builder = WalkBuilder::new(dir);
    builder
        .standard_filters(false)
        .git_ignore(worktree)
        .git_exclude(worktree)
        .require_git(false)
        .follow_links(false)
        .sort_by_file_name(OsStr::cmp);
    // An embedded cluster's data directory inside the project (a `--data-dir` or TMPDIR there)
    // holds the pod's volumes, so copying it would copy the copy into itself without end.
    let cluster_data = |e: &ignore::DirEntry| {
        e.file_type().is_some_and(|t| t.is_dir()) && e.path().join(local_cluster::DATA_DIR_MARKER).is_file()
    };
    if worktree {
        // `.keel/` at the top is `host run`'s own store (the cache beside the job file): the
        // job gets its cache through `cache:`, not as sources.
        builder.filter_entry(move |e| {
            e.file_name() != ".git" && !(e.depth() == 1 && e.file_name() == ".keel") && !cluster_data(e)
        });
    } else {
        builder.filter_entry(move |e| !cluster_data(e));
    }
    builder.build()
}

/// Fails on an ignore file whose rules the walker would silently drop.
///
/// The `ignore` crate skips ignore files it cannot read and lines that are not UTF-8 without
/// telling (git reads both), and a dropped rule ships the file it was meant to keep out.
fn check_rules(path: &Path) -> Result<(), SourcesError> {
    let bytes = std::fs::read(path).map_err(|source| SourcesError::Read { path: path.to_path_buf(), source })?;
    match std::str::from_utf8(&bytes) {
        Ok(_) => Ok(()),
        Err(err) => {
            let line = 1 + bytes[..err.valid_up_to()].iter().filter(|&&b| b == b'\n').count();
            Err(SourcesError::IgnoreRules {
                path: path.to_path_buf(),
                message: format!("line {line} is not UTF-8, so its rule cannot be applied"),
            })
        }
    }
}

/// Whether a walk error only reports unparsable patterns (with their file and line).
fn only_bad_patterns(err: &ignore::Error) -> bool {
    match err {
        ignore::Error::Glob { .. } => true,
        ignore::Error::Partial(errs) => errs.iter().all(only_bad_patterns),
        ignore::Error::WithLineNumber { err, .. }
        | ignore::Error::WithPath { err, .. }
        | ignore::Error::WithDepth { err, .. } => only_bad_patterns(err),
        _ => false,
    }
}

/// Appends one entry; `false` when it was left out (vanished, or not a file, directory or link).
fn append(
    tar: &mut tar::Builder<impl Write>,
    path: &Path,
    rel: &Path,
    stats: &mut Stats,
) -> Result<bool, SourcesError> {
    let read_err = |source| SourcesError::Read { path: path.to_path_buf(), source };
    let append_err = |source| SourcesError::Append { path: path.to_path_buf(), source };

    // A file that vanished since the walk listed it is left out (see `archive_to`).
    let vanished = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if vanished(&e) => return Ok(false),
        other => other.map_err(read_err)?,
    };
    let mut header = tar::Header::new_gnu();
    header.set_mode(meta.mode() & 0o7777);
    header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
    header.set_uid(0);
    header.set_gid(0);
    header.set_size(0);

    let kind = meta.file_type();
    if kind.is_dir() {
        header.set_entry_type(tar::EntryType::Directory);
        tar.append_data(&mut header, rel, io::empty()).map_err(append_err).map(|()| true)
    } else if kind.is_symlink() {
        let target = std::fs::read_link(path).map_err(read_err)?;
        header.set_entry_type(tar::EntryType::Symlink);
        tar.append_link(&mut header, rel, &target).map_err(append_err).map(|()| true)
    } else if kind.is_file() {
        let size = meta.len();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(size);
        let file = match File::open(path) {
            Err(e) if vanished(&e) => return Ok(false),
            other => other.map_err(read_err)?,
        };
        let mut body = Exact { inner: file.take(size), left: size, failed: None };
        match tar.append_data(&mut header, rel, &mut body) {
            Ok(()) => {
                stats.files += 1;
                stats.bytes += size;
                Ok(true)
            }
            Err(err) => Err(match body.failed.take() {
                Some(source) => read_err(source),
                None => append_err(err),
            }),
        }
    } else {
        tracing::warn!(path = %path.display(), "not a file, directory or symlink; left out of the sources");
        Ok(false)
    }
}

/// A file body of exactly the size its header announced.
///
/// The header is written before the body, so a file that shrinks while it is read would corrupt
/// the stream, and one that grows would overrun its entry. Reading stops at the size, and a short
/// read is an error. Read failures are kept to tell them from failures of the archive's writer.
struct Exact {
    inner: io::Take<File>,
    left: u64,
    failed: Option<io::Error>,
}

impl Read for Exact {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let result = match self.inner.read(buf) {
            Ok(0) if self.left > 0 && !buf.is_empty() => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file shrank while being archived, {} bytes missing", self.left),
            )),
            other => other,
        };
        match result {
            Ok(n) => {
                self.left -= n as u64;
                Ok(n)
            }
            Err(err) => {
                let kind = err.kind();
                self.failed = Some(err);
                Err(io::Error::new(kind, "reading the file failed"))
            }
        }
    }
}

/// The git facts of the repository containing `dir`, from the `git` binary.
///
/// `None` when `dir` is not in a repository, the repository has no commit yet, git refuses it
/// (for example `safe.directory` on a directory owned by another user) or git is not installed:
/// the job then runs without these variables rather than failing.
pub fn git_facts(dir: &Path) -> Option<Commit> {
    let commit_sha = git(dir, &["rev-parse", "HEAD"])?;
    let ref_name = match git(dir, &["rev-parse", "--abbrev-ref", "HEAD"])? {
        head if head == "HEAD" => git(dir, &["describe", "--tags", "--exact-match", "HEAD"]).unwrap_or(head),
        branch => branch,
    };
    Some(Commit { commit_sha, ref_name })
}

/// Whether `name` is a tag of the repository at `dir`.
pub fn is_tag(dir: &Path, name: &str) -> bool {
    git(dir, &["rev-parse", "--verify", "--quiet", &format!("refs/tags/{name}")]).is_some()
}

/// Runs git in `dir` and returns its trimmed output, `None` on any failure.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        // These would point git at another repository than the one `dir` is in (they are set
        // when the host runs from a git hook).
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    match output {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8(out.stdout).ok()?;
            let text = text.trim();
            (!text.is_empty()).then(|| text.to_string())
        }
        Ok(out) => {
            tracing::debug!(dir = %dir.display(), ?args, status = %out.status, "git gave no answer");
            None
        }
        Err(err) => {
            tracing::debug!(dir = %dir.display(), error = %err, "cannot run git");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{PermissionsExt, symlink};

    /// One node of a directory tree, as compared between source and extraction.
    #[derive(Debug, PartialEq, Eq)]
    enum Node {
        Dir { mode: u32 },
        File { mode: u32, content: Vec<u8> },
        Link { target: PathBuf },
    }

    /// Everything under `root`, without following symlinks.
    fn tree(root: &Path) -> BTreeMap<PathBuf, Node> {
        fn visit(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Node>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = std::fs::symlink_metadata(&path).unwrap();
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                let mode = meta.permissions().mode() & 0o7777;
                if meta.file_type().is_symlink() {
                    out.insert(rel, Node::Link { target: std::fs::read_link(&path).unwrap() });
                } else if meta.is_dir() {
                    out.insert(rel, Node::Dir { mode });
                    visit(root, &path, out);
                } else {
                    out.insert(rel, Node::File { mode, content: std::fs::read(&path).unwrap() });
                }
            }
        }
        let mut out = BTreeMap::new();
        visit(root, root, &mut out);
        out
    }

    fn write(path: impl AsRef<Path>, content: &str, mode: u32) {
        let path = path.as_ref();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mkdir(path: impl AsRef<Path>, mode: u32) {
        std::fs::create_dir_all(path.as_ref()).unwrap();
        std::fs::set_permissions(path.as_ref(), std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn long_name() -> String {
        format!("{}/file.txt", ["long-directory-name-for-gnu-records"; 5].join("/"))
    }

    /// A project with every kind of entry, plus what must be left out of it.
    fn project(root: &Path) {
        write(root.join("file with spaces.txt"), "spaces\n", 0o644);
        write(root.join("run.sh"), "#!/bin/sh\necho hi\n", 0o755);
        write(root.join(".hidden"), "hidden files are sources too\n", 0o600);
        write(root.join(".gitignore"), "target/\n*.log\n[z-a]\n", 0o644);
        mkdir(root.join("empty"), 0o755);
        mkdir(root.join("private"), 0o700);
        symlink("run.sh", root.join("link")).unwrap();
        symlink("../../etc/passwd", root.join("points-outside")).unwrap();
        symlink("sub", root.join("dir-link")).unwrap();
        write(root.join("sub/.gitignore"), "secret.txt\n!important.log\n", 0o644);
        write(root.join("sub/important.log"), "kept by a negation\n", 0o644);
        write(root.join("sub/code.rs"), "fn main() {}\n", 0o644);
        write(root.join(long_name()), "deep\n", 0o644);
        std::fs::write(root.join(OsStr::from_bytes(b"caf\xe9")), "latin-1 name\n").unwrap();
        // Left out:
        write(root.join("target/out.bin"), "build output", 0o644);
        write(root.join("sub/deep/target/x"), "nested ignored dir", 0o644);
        write(root.join("sub/debug.log"), "ignored by a parent's rule", 0o644);
        write(root.join("sub/secret.txt"), "ignored by a nested rule", 0o644);
        write(root.join(".git/HEAD"), "ref: refs/heads/main\n", 0o644);
        write(root.join(".git/info/exclude"), "excluded-locally\n", 0o644);
        write(root.join("excluded-locally"), "in .git/info/exclude", 0o644);
        write(root.join("sub/module/.git"), "gitdir: ../../.git/modules/module\n", 0o644);
        write(root.join("sub/module/lib.rs"), "// a submodule's file\n", 0o644);
    }

    fn left_out() -> [&'static str; 9] {
        [
            "target",
            "sub/deep/target",
            "sub/debug.log",
            "sub/secret.txt",
            ".git",
            "excluded-locally",
            "sub/module/.git",
            "target/out.bin",
            "sub/deep/target/x",
        ]
    }

    fn expected_tree(root: &Path) -> BTreeMap<PathBuf, Node> {
        let mut expected = tree(root);
        for gone in left_out() {
            let gone = Path::new(gone);
            expected.retain(|path, _| !path.starts_with(gone));
        }
        expected
    }

    fn extract_with(cmd: &mut Command, archive: &[u8]) {
        let mut child = cmd.stdin(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(archive).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "{cmd:?} failed: {status}");
    }

    #[test]
    fn extracts_with_gnu_tar_to_the_same_tree() {
        let src = tempfile::tempdir().unwrap();
        project(src.path());
        let mut bytes = Vec::new();
        let stats = archive_to(src.path(), &mut bytes).unwrap();

        let dst = tempfile::tempdir().unwrap();
        // -p: keep the archive's modes whatever the umask, as root tar does by default.
        extract_with(Command::new("tar").arg("-x").arg("-p").arg("-C").arg(dst.path()), &bytes);

        let got = tree(dst.path());
        let expected = expected_tree(src.path());
        assert_eq!(got, expected);
        // Unlike a clone, a directory holding only ignored entries is kept (empty): git rules
        // ignore paths, never a directory because of what it contains.
        assert!(got.contains_key(Path::new("sub/deep")));
        assert!(got.contains_key(Path::new("sub/important.log")));
        assert!(got.contains_key(Path::new(&long_name())));
        assert_eq!(got[Path::new("run.sh")], Node::File { mode: 0o755, content: b"#!/bin/sh\necho hi\n".to_vec() });
        assert_eq!(got[Path::new("empty")], Node::Dir { mode: 0o755 });
        assert_eq!(got[Path::new("link")], Node::Link { target: "run.sh".into() });
        assert!(!got.contains_key(Path::new("dir-link/code.rs")), "symlinks are not followed");

        let files = expected.values().filter(|n| matches!(n, Node::File { .. })).count();
        let bytes_in: usize = expected
            .values()
            .map(|n| match n {
                Node::File { content, .. } => content.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(stats, Stats { files: files as u64, bytes: bytes_in as u64 });
    }

    #[test]
    fn extracts_with_busybox_tar() {
        // .ci/run installs Debian's `busybox`; without it this test fails rather than skips.
        let busybox =
            Command::new("busybox").arg("true").status().expect("busybox (Debian package `busybox`) is needed");
        assert!(busybox.success());
        let src = tempfile::tempdir().unwrap();
        project(src.path());
        let bytes = archive(src.path()).unwrap();
        let dst = tempfile::tempdir().unwrap();
        extract_with(Command::new("busybox").args(["tar", "-x", "-C"]).arg(dst.path()), &bytes);
        // busybox applies the umask; compare what survives a usual 022.
        let strip = |t: BTreeMap<PathBuf, Node>| -> BTreeMap<PathBuf, Node> {
            t.into_iter()
                .map(|(p, n)| {
                    let n = match n {
                        Node::Dir { mode } => Node::Dir { mode: mode & 0o755 },
                        Node::File { mode, content } => Node::File { mode: mode & 0o755, content },
                        link => link,
                    };
                    (p, n)
                })
                .collect()
        };
        assert_eq!(strip(tree(dst.path())), strip(expected_tree(src.path())));
    }

    #[test]
    fn entries_are_relative_sorted_and_owned_by_root() {
        let src = tempfile::tempdir().unwrap();
        project(src.path());
        let bytes = archive(src.path()).unwrap();
        let mut reader = tar::Archive::new(&bytes[..]);
        let mut paths = Vec::new();
        for entry in reader.entries().unwrap() {
            let entry = entry.unwrap();
            let path = entry.path().unwrap().into_owned();
            assert!(path.is_relative(), "{path:?}");
            assert!(path.components().all(|c| matches!(c, std::path::Component::Normal(_))), "{path:?}");
            assert_eq!(entry.header().uid().unwrap(), 0);
            assert_eq!(entry.header().gid().unwrap(), 0);
            paths.push(path);
        }
        let pos = |p: &str| paths.iter().position(|x| x == Path::new(p)).unwrap();
        assert!(pos(".gitignore") < pos(".hidden"));
        assert!(pos("empty") < pos("file with spaces.txt"));
        assert!(pos("sub") < pos("sub/.gitignore"));
        assert!(pos("sub/code.rs") < pos("sub/important.log"));
        assert_eq!(archive(src.path()).unwrap(), bytes, "the same tree gives the same bytes");
    }

    #[test]
    fn an_embedded_clusters_data_directory_is_left_out_and_the_paths_are_listed() {
        let src = tempfile::tempdir().unwrap();
        write(src.path().join("a.txt"), "x", 0o644);
        mkdir(src.path().join("tmp"), 0o755);
        mkdir(src.path().join("tmp/keel-cluster-1"), 0o755);
        write(src.path().join("tmp/keel-cluster-1").join(local_cluster::DATA_DIR_MARKER), "", 0o644);
        write(src.path().join("tmp/keel-cluster-1/kubeconfig"), "k", 0o600);
        for selection in [Selection::Worktree, Selection::Checkout] {
            let mut seen = Vec::new();
            let stats = archive_listed(src.path(), selection, io::sink(), &mut |p| seen.push(p.to_owned())).unwrap();
            assert_eq!(stats, Stats { files: 1, bytes: 1 });
            assert_eq!(seen, ["a.txt", "tmp"]);
        }
    }

    #[test]
    fn gitignore_applies_without_a_repository() {
        let src = tempfile::tempdir().unwrap();
        write(src.path().join(".gitignore"), "*.tmp\n", 0o644);
        write(src.path().join("a.tmp"), "x", 0o644);
        write(src.path().join("a.txt"), "x", 0o644);
        let stats = archive_to(src.path(), io::sink()).unwrap();
        assert_eq!(stats, Stats { files: 2, bytes: 7 });
    }

    #[test]
    fn errors_name_the_path() {
        let src = tempfile::tempdir().unwrap();
        let missing = src.path().join("no-such-project");
        let err = archive(&missing).unwrap_err();
        assert!(err.to_string().contains(&missing.display().to_string()), "{err}");

        let file = src.path().join("plain-file");
        std::fs::write(&file, "x").unwrap();
        let err = archive(&file).unwrap_err();
        assert!(matches!(err, SourcesError::NotADirectory(_)), "{err}");
        assert!(err.to_string().contains(&file.display().to_string()), "{err}");
    }

    #[test]
    fn unreadable_ignore_rules_stop_the_archive() {
        let src = tempfile::tempdir().unwrap();
        // The ignore crate reads rules as UTF-8 and would drop this one, shipping the file.
        std::fs::create_dir(src.path().join("sub")).unwrap();
        std::fs::write(src.path().join("sub/.gitignore"), b"*.tmp\ncaf\xe9.key\n").unwrap();
        std::fs::write(src.path().join(OsStr::from_bytes(b"sub/caf\xe9.key")), "secret").unwrap();
        let err = archive_to(src.path(), io::sink()).unwrap_err();
        assert!(matches!(err, SourcesError::IgnoreRules { .. }), "{err:?}");
        assert!(err.to_string().contains("sub/.gitignore"), "{err}");
        assert!(err.to_string().contains("line 2"), "{err}");

        let src = tempfile::tempdir().unwrap();
        write(src.path().join(".git/info/exclude"), "ok\n", 0o644);
        std::fs::write(src.path().join(".git/info/exclude"), b"\xff\n").unwrap();
        let err = archive_to(src.path(), io::sink()).unwrap_err();
        assert!(err.to_string().contains(".git/info/exclude"), "{err}");
    }

    #[test]
    fn writer_failure_names_the_entry() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let src = tempfile::tempdir().unwrap();
        write(src.path().join("a.txt"), "x", 0o644);
        let err = archive_to(src.path(), Full).unwrap_err();
        match err {
            SourcesError::Append { path, .. } => assert_eq!(path, src.path().join("a.txt")),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn run_git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    #[test]
    fn git_facts_of_a_repository() {
        let repo = tempfile::tempdir().unwrap();
        let dir = repo.path();
        run_git(dir, &["init", "-q", "-b", "feature/x"]);
        run_git(dir, &["config", "user.name", "Keel Test"]);
        run_git(dir, &["config", "user.email", "keel@example.invalid"]);
        run_git(dir, &["config", "commit.gpgsign", "false"]);
        assert_eq!(git_facts(dir), None, "no commit yet");

        write(dir.join("sub/a.txt"), "a", 0o644);
        run_git(dir, &["add", "."]);
        run_git(dir, &["commit", "-q", "-m", "first"]);
        let sha = run_git(dir, &["rev-parse", "HEAD"]);
        assert_eq!(sha.len(), 40);
        let facts = Commit { commit_sha: sha.clone(), ref_name: "feature/x".into() };
        assert_eq!(git_facts(dir), Some(facts.clone()));
        assert_eq!(git_facts(&dir.join("sub")), Some(facts), "a subdirectory's repository");

        write(dir.join("b.txt"), "b", 0o644);
        run_git(dir, &["add", "."]);
        run_git(dir, &["commit", "-q", "-m", "second"]);
        run_git(dir, &["checkout", "-q", "--detach", "HEAD"]);
        let second = run_git(dir, &["rev-parse", "HEAD"]);
        assert_eq!(git_facts(dir), Some(Commit { commit_sha: second, ref_name: "HEAD".into() }), "detached HEAD");
        run_git(dir, &["tag", "v1.0.0", &sha]);
        run_git(dir, &["checkout", "-q", "v1.0.0"]);
        assert_eq!(git_facts(dir), Some(Commit { commit_sha: sha, ref_name: "v1.0.0".into() }), "detached at a tag");
    }

    #[test]
    fn git_facts_outside_a_repository() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(git_facts(dir.path()), None);
        assert_eq!(git_facts(&dir.path().join("missing")), None);
    }
}
