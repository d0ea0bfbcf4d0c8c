//! A real git server for the `host serve` tests: git's own smart-HTTP backend (`git
//! http-backend`, as GitLab's Workhorse runs it) behind a small CGI bridge that asks for the
//! job token as GitLab does (HTTP Basic, user `gitlab-ci-token`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Response, StatusCode, Uri};
use base64::Engine;
use tokio::io::AsyncWriteExt;

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub query: String,
    /// The password of an accepted Basic credential.
    pub token: Option<String>,
    pub status: u16,
    /// Response body bytes.
    pub bytes: usize,
}

pub struct GitServer {
    pub root: tempfile::TempDir,
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for GitServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

type Check = Arc<dyn Fn(&str) -> bool + Send + Sync>;

impl GitServer {
    /// `accept` decides which job tokens may read (the fake GitLab's running jobs' tokens).
    pub async fn start(accept: impl Fn(&str) -> bool + Send + Sync + 'static) -> GitServer {
        let root = tempfile::tempdir().expect("git root");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = (root.path().to_path_buf(), seen.clone(), Arc::new(accept) as Check);
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let state = state.clone();
            async move { cgi(state, method, uri, headers, body).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("git server");
        });
        GitServer { root, addr, seen, server }
    }

    /// `http://gitlab-ci-token:{token}@127.0.0.1:port/<name>.git`: the fake GitLab fills in
    /// `{token}` with each job's own token, as GitLab does.
    pub fn job_url(&self, name: &str) -> String {
        format!("http://gitlab-ci-token:{{token}}@{}/{name}.git", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// A bare repository `<name>.git` whose one commit holds `files` and, with `submodule`, a
    /// gitlink `lib` to that repository's HEAD (relative URL `../<sub>.git`, as GitLab projects
    /// in one group use). Returns the commit's sha.
    pub fn create_repo(&self, name: &str, files: &[(&str, &str)], submodule: Option<(&str, &str)>) -> String {
        let work = tempfile::tempdir().expect("work tree");
        let w = work.path();
        git(w, &["init", "-q", "-b", "main"]);
        for (path, content) in files {
            let p = w.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        git(w, &["add", "-A", "-f"]);
        if let Some((sub_name, sub_sha)) = submodule {
            std::fs::write(
                w.join(".gitmodules"),
                format!("[submodule \"lib\"]\n\tpath = lib\n\turl = ../{sub_name}.git\n"),
            )
            .unwrap();
            git(w, &["add", ".gitmodules"]);
            git(w, &["update-index", "--add", "--cacheinfo", &format!("160000,{sub_sha},lib")]);
        }
        git(w, &["commit", "-q", "-m", "first"]);
        // A second commit, so a depth-1 fetch is visibly shallow.
        std::fs::write(w.join("CHANGELOG"), "two\n").unwrap();
        git(w, &["add", "CHANGELOG"]);
        git(w, &["commit", "-q", "-m", "second"]);
        let bare = self.root.path().join(format!("{name}.git"));
        git(self.root.path(), &["clone", "-q", "--bare", w.to_str().unwrap(), bare.to_str().unwrap()]);
        git(&bare, &["rev-parse", "HEAD"])
    }
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("run git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn basic_password(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    (user == "gitlab-ci-token").then(|| password.to_string())
}

async fn cgi(
    (root, seen, accept): (PathBuf, Arc<Mutex<Vec<Seen>>>, Check),
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or_default().to_string();
    let token = basic_password(&headers).filter(|t| accept(t));
    let record = |status: u16, token: Option<String>, bytes: usize| {
        seen.lock().unwrap().push(Seen { path: path.clone(), query: query.clone(), token, status, bytes });
    };
    if token.is_none() {
        record(401, None, 0);
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("WWW-Authenticate", "Basic realm=\"GitLab\"")
            .body(Body::from("HTTP Basic: Access denied\n"))
            .unwrap();
    }
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", &root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("REQUEST_METHOD", method.as_str())
        .env("PATH_INFO", &path)
        .env("QUERY_STRING", &query)
        .env("REMOTE_USER", "gitlab-ci-token")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("CONTENT_LENGTH", body.len().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (header, env) in [
        ("content-type", "CONTENT_TYPE"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
        ("git-protocol", "GIT_PROTOCOL"),
    ] {
        if let Some(v) = headers.get(header).and_then(|v| v.to_str().ok()) {
            cmd.env(env, v);
        }
    }
    let mut child = cmd.spawn().expect("git http-backend");
    let mut stdin = child.stdin.take().unwrap();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let out = child.wait_with_output().await.expect("git http-backend output");
    let _ = writer.await;
    // CGI: headers, a blank line, the body.
    let split = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| out.stdout.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let Some((end, sep)) = split else {
        record(500, token, 0);
        return Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Body::from(String::from_utf8_lossy(&out.stderr).into_owned()))
            .unwrap();
    };
    let mut response = Response::builder();
    let mut status = 200;
    for line in String::from_utf8_lossy(&out.stdout[..end]).lines() {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            status = value.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(500);
        } else {
            response = response.header(name, value);
        }
    }
    record(status, token, out.stdout.len() - end - sep);
    response.status(status).body(Body::from(out.stdout[end + sep..].to_vec())).unwrap()
}
