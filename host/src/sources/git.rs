//! The project's sources for a GitLab job, as GitLab Runner gets them: fetched from the job's
//! `git_info` with the job token, the commit `sha` checked out, submodules as asked.
//!
//! The fetch runs on the host, into a fresh directory per job, and the result (`.git` included)
//! is copied into the pod like `host run`'s local directory: it works the same on every cluster,
//! the embedded one too, and the token never enters the pod. It never appears in a command line
//! or a URL either (both are visible to other users in `/proc`): git gets it as an HTTP header
//! through its environment (`GIT_CONFIG_*`), scoped to the repository's own host so a submodule
//! elsewhere never sees it.
//!
//! With a [`GitCache`], each repository is fetched into a bare mirror kept on the host (one fetch
//! at a time per repository), and each job's checkout is fetched from that mirror: a repeat job
//! asks GitLab only for what is new.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use base64::Engine;
use tokio::process::Command;

/// `GIT_STRATEGY`. Every job gets a fresh directory, so `fetch` and `clone` do the same work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Clone,
    Fetch,
    /// Nothing at all: the project directory is left as the image has it.
    None,
    /// An empty project directory.
    Empty,
}

/// `GIT_SUBMODULE_STRATEGY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submodules {
    None,
    Normal,
    Recursive,
}

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("variable {key}: {message}")]
    Variable { key: &'static str, message: String },
    #[error("the job's repository URL is not usable: {0}")]
    Url(String),
    #[error("cannot create a directory for the checkout")]
    TempDir(#[source] std::io::Error),
    #[error("cannot run git (is it installed?)")]
    Spawn(#[source] std::io::Error),
    #[error("`git {command}` failed ({status}): {output}")]
    Failed { command: String, status: String, output: String },
    #[error(
        "commit {sha} is not in what was fetched (ref {git_ref}, depth {depth}); it may be older than the clone depth: raise GIT_DEPTH"
    )]
    MissingCommit { sha: String, git_ref: String, depth: u32 },
}

/// What to fetch and how, from the job's `git_info` and its `GIT_*` variables.
#[derive(Clone)]
pub struct Request {
    /// Without credentials: what `origin` is set to, and what messages show.
    pub url: String,
    /// `user:password` for HTTP Basic, from the URL GitLab sent (`gitlab-ci-token:<job token>`).
    credentials: Option<String>,
    pub sha: String,
    pub git_ref: String,
    /// 0: the whole history.
    pub depth: u32,
    pub refspecs: Vec<String>,
    pub strategy: Strategy,
    pub checkout: bool,
    pub submodules: Submodules,
    pub fetch_extra_flags: Vec<String>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("url", &self.url)
            .field("credentials", &self.credentials.as_ref().map(|_| "[REDACTED]"))
            .field("sha", &self.sha)
            .field("git_ref", &self.git_ref)
            .field("depth", &self.depth)
            .field("strategy", &self.strategy)
            .finish_non_exhaustive()
    }
}

/// Bare mirrors of the repositories jobs fetched, one per remote URL (without credentials).
#[derive(Clone, Debug)]
pub struct GitCache {
    dir: PathBuf,
    locks: Arc<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>>,
}

impl GitCache {
    pub fn new(dir: impl Into<PathBuf>) -> GitCache {
        GitCache { dir: dir.into(), locks: Arc::default() }
    }

    /// `KEEL_GIT_CACHE`, else `$XDG_CACHE_HOME/keel/git`, else `~/.cache/keel/git`.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("KEEL_GIT_CACHE").filter(|d| !d.is_empty()) {
            return dir.into();
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir);
        base.join("keel/git")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The mirror's path for `url`: a digest, so no URL text becomes a path.
    fn mirror(&self, url: &str) -> PathBuf {
        use sha2::Digest;
        let digest = hex::encode(sha2::Sha256::digest(url.as_bytes()));
        self.dir.join(format!("{}.git", &digest[..32]))
    }

    fn lock(&self, mirror: &Path) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().expect("git cache locks").entry(mirror.to_path_buf()).or_default().clone()
    }
}

/// GitLab Runner's default `GIT_FETCH_EXTRA_FLAGS`.
const DEFAULT_FETCH_FLAGS: &[&str] = &["--prune", "--quiet"];

impl Request {
    /// `repo_url` may carry credentials (`https://user:token@host/path`); `lookup` reads the
    /// job's variables (`GIT_STRATEGY`, `GIT_DEPTH`, `GIT_CHECKOUT`, `GIT_SUBMODULE_STRATEGY`,
    /// `GIT_FETCH_EXTRA_FLAGS`), which win over `git_info` as in GitLab Runner.
    pub fn from_job(
        repo_url: &str,
        sha: &str,
        git_ref: &str,
        depth: u32,
        refspecs: &[String],
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Request, GitError> {
        let get = |key: &str| lookup(key).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let strategy = match get("GIT_STRATEGY").as_deref() {
            None | Some("fetch") => Strategy::Fetch,
            Some("clone") => Strategy::Clone,
            Some("none") => Strategy::None,
            Some("empty") => Strategy::Empty,
            Some(other) => {
                return Err(GitError::Variable {
                    key: "GIT_STRATEGY",
                    message: format!("{other:?} is not one of clone, fetch, none, empty"),
                });
            }
        };
        let depth = match get("GIT_DEPTH") {
            None => depth,
            Some(d) => d.parse().map_err(|_| GitError::Variable {
                key: "GIT_DEPTH",
                message: format!("{d:?} is not a number of commits"),
            })?,
        };
        let checkout = match get("GIT_CHECKOUT").as_deref() {
            None | Some("true") => true,
            Some("false") => false,
            Some(other) => {
                return Err(GitError::Variable {
                    key: "GIT_CHECKOUT",
                    message: format!("{other:?} is not true or false"),
                });
            }
        };
        let submodules = match get("GIT_SUBMODULE_STRATEGY").as_deref() {
            None | Some("none") => Submodules::None,
            Some("normal") => Submodules::Normal,
            Some("recursive") => Submodules::Recursive,
            Some(other) => {
                return Err(GitError::Variable {
                    key: "GIT_SUBMODULE_STRATEGY",
                    message: format!("{other:?} is not one of none, normal, recursive"),
                });
            }
        };
        let fetch_extra_flags = match lookup("GIT_FETCH_EXTRA_FLAGS") {
            Some(flags) => flags.split_whitespace().map(str::to_string).collect(),
            None => DEFAULT_FETCH_FLAGS.iter().map(|f| f.to_string()).collect(),
        };
        let (url, credentials) = split_credentials(repo_url)?;
        if matches!(strategy, Strategy::Clone | Strategy::Fetch) && sha.is_empty() {
            return Err(GitError::Url("the job names no commit (git_info.sha is empty)".into()));
        }
        Ok(Request {
            url,
            credentials,
            sha: sha.to_string(),
            git_ref: git_ref.to_string(),
            depth,
            refspecs: refspecs.to_vec(),
            strategy,
            checkout,
            submodules,
            fetch_extra_flags,
        })
    }

    /// Fetches and checks out into a new temporary directory (removed when dropped). `None` for
    /// `GIT_STRATEGY: none`. `log` gets GitLab Runner's trace lines, never a credential.
    pub async fn checkout(
        &self,
        cache: Option<&GitCache>,
        log: &(dyn Fn(&str) + Sync),
    ) -> Result<Option<tempfile::TempDir>, GitError> {
        match self.strategy {
            Strategy::None => {
                log("Skipping Git repository setup");
                return Ok(None);
            }
            Strategy::Empty => {
                log("Skipping Git repository setup and creating an empty build directory");
                return tempfile::Builder::new().prefix("keel-src-").tempdir().map(Some).map_err(GitError::TempDir);
            }
            Strategy::Clone | Strategy::Fetch => {}
        }
        let dir = tempfile::Builder::new().prefix("keel-src-").tempdir().map_err(GitError::TempDir)?;
        let path = dir.path();
        if self.depth > 0 {
            log(&format!("Fetching changes with git depth set to {}...", self.depth));
        } else {
            log("Fetching changes...");
        }
        self.git(path, &["init", "-q"]).await?;
        log(&format!("Created fresh repository in {}", self.url));
        self.git(path, &["remote", "add", "origin", &self.url]).await?;
        let refspecs: Vec<String> = if self.refspecs.is_empty() {
            vec!["+refs/heads/*:refs/remotes/origin/*".into(), "+refs/tags/*:refs/tags/*".into()]
        } else {
            self.refspecs.clone()
        };
        match cache {
            None => self.fetch(path, "origin", &refspecs, &self.fetch_extra_flags, false).await?,
            Some(cache) => {
                let mirror = cache.mirror(&self.url);
                let lock = cache.lock(&mirror);
                let _held = lock.lock().await;
                if !mirror.join("HEAD").is_file() {
                    std::fs::create_dir_all(&cache.dir).map_err(GitError::TempDir)?;
                    self.git(&cache.dir, &["init", "--bare", "-q", mirror.to_str().unwrap_or_default()]).await?;
                }
                self.fetch(&mirror, &self.url, &refspecs, &self.fetch_extra_flags, false).await?;
                // The same refs, from the mirror: the job's repository looks as if fetched from
                // GitLab (`origin` is GitLab's URL), at the same depth.
                let local: Vec<String> = refspecs
                    .iter()
                    .map(|r| {
                        let dst = r.rsplit_once(':').map(|(_, d)| d).unwrap_or(r.trim_start_matches('+'));
                        format!("+{dst}:{dst}")
                    })
                    .collect();
                let from = format!("file://{}", mirror.display());
                self.fetch(path, &from, &local, &["--quiet".to_string()], true).await?;
            }
        }
        let commit = format!("{}^{{commit}}", self.sha);
        if self.git(path, &["cat-file", "-e", &commit]).await.is_err() {
            return Err(GitError::MissingCommit {
                sha: self.sha.clone(),
                git_ref: self.git_ref.clone(),
                depth: self.depth,
            });
        }
        if !self.checkout {
            log("Skipping Git checkout");
            return Ok(Some(dir));
        }
        let short: String = self.sha.chars().take(8).collect();
        log(&format!("Checking out {short} as detached HEAD (ref is {})...", self.git_ref));
        self.git(path, &["-c", "advice.detachedHead=false", "checkout", "-f", "-q", &self.sha]).await?;
        if self.submodules != Submodules::None {
            let recursive = self.submodules == Submodules::Recursive;
            log(if recursive {
                "Updating/initializing submodules recursively..."
            } else {
                "Updating/initializing submodules..."
            });
            let mut sync = vec!["submodule", "sync"];
            let mut update = vec!["submodule", "update", "--init"];
            if recursive {
                sync.push("--recursive");
                update.push("--recursive");
            }
            self.git(path, &sync).await?;
            self.git(path, &update).await?;
        }
        Ok(Some(dir))
    }

    /// `git fetch` of `refspecs` from `remote` into the repository at `dir`.
    async fn fetch(
        &self,
        dir: &Path,
        remote: &str,
        refspecs: &[String],
        flags: &[String],
        local: bool,
    ) -> Result<(), GitError> {
        let mut args: Vec<String> = Vec::new();
        if local {
            // Only this fetch, from our own mirror, may use the local transport.
            args.extend(["-c".into(), "protocol.file.allow=always".into()]);
        }
        args.extend(["fetch".into(), "--no-recurse-submodules".into()]);
        if self.depth > 0 {
            args.push(format!("--depth={}", self.depth));
        }
        args.extend(flags.iter().cloned());
        args.push(remote.to_string());
        args.extend(refspecs.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.git(dir, &args).await.map(|_| ())
    }

    /// One git command in `dir`: no prompt, no user or system config, the credentials as a
    /// header for the repository's host only.
    async fn git(&self, dir: &Path, args: &[&str]) -> Result<String, GitError> {
        let mut cmd = Command::new("git");
        cmd.arg("-C")
            .arg(dir)
            .args(args)
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Submodules fetched over http(s) only; `file://` and `ext::` could read or run anything.
        let mut config: Vec<(String, String)> = vec![("protocol.allow".into(), "never".into())];
        for proto in ["http", "https", "git", "ssh"] {
            config.push((format!("protocol.{proto}.allow"), "always".into()));
        }
        if let (Some(credentials), Some(base)) = (&self.credentials, url_base(&self.url)) {
            let basic = base64::engine::general_purpose::STANDARD.encode(credentials);
            config.push((format!("http.{base}.extraHeader"), format!("Authorization: Basic {basic}")));
        }
        cmd.env("GIT_CONFIG_COUNT", config.len().to_string());
        for (i, (key, value)) in config.iter().enumerate() {
            cmd.env(format!("GIT_CONFIG_KEY_{i}"), key).env(format!("GIT_CONFIG_VALUE_{i}"), value);
        }
        let out = cmd.output().await.map_err(GitError::Spawn)?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        let mut output = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if let Some(credentials) = &self.credentials {
            output = output.replace(credentials.as_str(), "[MASKED]");
        }
        let tail: Vec<&str> = output.lines().rev().take(5).collect();
        Err(GitError::Failed {
            command: args.join(" "),
            status: out.status.to_string(),
            output: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
        })
    }

    /// Where the checkout goes in the pod, for messages.
    pub fn describe(&self) -> String {
        format!("{} at {}", self.url, self.sha)
    }
}

/// `https://user:pass@host/path` -> (`https://host/path`, `Some("user:pass")`).
fn split_credentials(url: &str) -> Result<(String, Option<String>), GitError> {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return Err(GitError::Url(format!("{:?} has no scheme", crate::gitlab::payload::redact_url_credentials(url))));
    };
    let authority_end = url[scheme_end..].find('/').map(|i| scheme_end + i).unwrap_or(url.len());
    let authority = &url[scheme_end..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let clean = format!("{}{}{}", &url[..scheme_end], &authority[at + 1..], &url[authority_end..]);
            let credentials = percent_decode(userinfo);
            Ok((clean, (!credentials.is_empty()).then_some(credentials)))
        }
        None => Ok((url.to_string(), None)),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `scheme://host[:port]/`: what git's `http.<url>.*` settings match by prefix.
fn url_base(url: &str) -> Option<String> {
    let scheme_end = url.find("://")? + 3;
    let authority_end = url[scheme_end..].find('/').map(|i| scheme_end + i).unwrap_or(url.len());
    Some(format!("{}/", &url[..authority_end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn credentials_leave_the_url_and_the_debug_output() {
        let req = Request::from_job(
            "https://gitlab-ci-token:glcbt-s3cr%40t@gitlab.example.com:8443/g/app.git",
            "abc",
            "main",
            5,
            &[],
            &vars(&[]),
        )
        .unwrap();
        assert_eq!(req.url, "https://gitlab.example.com:8443/g/app.git");
        assert_eq!(req.credentials.as_deref(), Some("gitlab-ci-token:glcbt-s3cr@t"));
        assert!(!format!("{req:?}").contains("glcbt"));
        assert_eq!(url_base(&req.url).unwrap(), "https://gitlab.example.com:8443/");
        assert_eq!(req.depth, 5);
        assert_eq!(req.strategy, Strategy::Fetch);
        assert_eq!(req.fetch_extra_flags, ["--prune", "--quiet"]);
    }

    #[test]
    fn variables_win_and_bad_values_are_named() {
        let lookup = vars(&[
            ("GIT_STRATEGY", "clone"),
            ("GIT_DEPTH", "0"),
            ("GIT_CHECKOUT", "false"),
            ("GIT_SUBMODULE_STRATEGY", "recursive"),
            ("GIT_FETCH_EXTRA_FLAGS", "--no-tags  --verbose"),
        ]);
        let req = Request::from_job("https://h/p.git", "abc", "main", 20, &[], &lookup).unwrap();
        assert_eq!(req.strategy, Strategy::Clone);
        assert_eq!(req.depth, 0);
        assert!(!req.checkout);
        assert_eq!(req.submodules, Submodules::Recursive);
        assert_eq!(req.fetch_extra_flags, ["--no-tags", "--verbose"]);
        for (key, value) in [("GIT_STRATEGY", "copy"), ("GIT_DEPTH", "deep"), ("GIT_SUBMODULE_STRATEGY", "all")] {
            let err = Request::from_job("https://h/p.git", "abc", "main", 1, &[], &vars(&[(key, value)])).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
        let none = Request::from_job("https://h/p.git", "", "main", 1, &[], &vars(&[("GIT_STRATEGY", "none")]));
        assert_eq!(none.unwrap().strategy, Strategy::None);
        assert!(Request::from_job("https://h/p.git", "", "main", 1, &[], &vars(&[])).is_err());
        assert!(Request::from_job("h/p.git", "abc", "main", 1, &[], &vars(&[])).is_err());
    }

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[tokio::test]
    async fn file_urls_are_refused_so_a_job_cannot_read_the_host() {
        let repo = tempfile::tempdir().unwrap();
        git(repo.path(), &["init", "-q", "-b", "main"]);
        std::fs::write(repo.path().join("a"), "a").unwrap();
        git(repo.path(), &["add", "a"]);
        git(repo.path(), &["commit", "-q", "-m", "one"]);
        let sha = git(repo.path(), &["rev-parse", "HEAD"]);
        let url = format!("file://{}", repo.path().display());
        let req = Request::from_job(&url, &sha, "main", 1, &[], &vars(&[])).unwrap();
        let err = req.checkout(None, &|_| {}).await.unwrap_err();
        assert!(matches!(err, GitError::Failed { .. }), "{err}");
    }
}
