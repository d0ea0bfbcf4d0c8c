//! What `host serve` takes from GitLab Runner's `config.toml`, with GitLab Runner's defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, Runner};
use crate::gitlab::{ClientOptions, Features, ReportOptions, Secret};

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{path}: key `{key}`: {message}")]
    Invalid { path: PathBuf, key: String, message: String },
    #[error("{path}: no [[runners]] entry with executor = \"kubernetes\" to serve")]
    NoRunners { path: PathBuf },
}

/// One `[[runners]]` entry `host serve` asks jobs for.
#[derive(Clone)]
pub struct RunnerSettings {
    pub name: String,
    pub url: String,
    pub token: Secret,
    /// Jobs at once for this runner; `None`: only `concurrent` bounds it.
    pub limit: Option<usize>,
    /// `jobs/request` calls in flight at once.
    pub request_concurrency: usize,
    /// The whole entry, handed to the pipeline with each of its jobs.
    pub config: Arc<Runner>,
}

impl std::fmt::Debug for RunnerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerSettings")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("limit", &self.limit)
            .field("request_concurrency", &self.request_concurrency)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub struct ServeSettings {
    /// Jobs at once over all runners (`concurrent`, default 1).
    pub concurrent: usize,
    /// Pause between job requests that found nothing (`check_interval`, default 3 s).
    pub check_interval: Duration,
    /// How long SIGTERM waits for cancelled jobs (`shutdown_timeout`, default 30 s).
    pub shutdown_timeout: Duration,
    /// `/metrics` and `/readyz`; none: no HTTP server.
    pub listen_address: Option<SocketAddr>,
    pub runners: Vec<RunnerSettings>,
    /// `info.features`: what the pipeline implements, set by the caller.
    pub features: Features,
    pub system_id: String,
    pub client: ClientOptions,
    pub report: ReportOptions,
    /// Consecutive 403s to `jobs/request` after which a runner pauses for `unhealthy_interval`
    /// (GitLab Runner: 3 and 60 minutes).
    pub unhealthy_after: u32,
    pub unhealthy_interval: Duration,
    /// After `shutdown_timeout`, jobs get an immediate cancel and this long to clean up before
    /// their tasks are dropped.
    pub force_grace: Duration,
}

impl ServeSettings {
    /// The runners with `executor = "kubernetes"`; each needs `url` and `token`.
    pub fn from_config(
        config: &Config,
        path: &Path,
        features: Features,
        system_id: String,
    ) -> Result<ServeSettings, SettingsError> {
        let invalid = |key: String, message: &str| SettingsError::Invalid {
            path: path.to_path_buf(),
            key,
            message: message.to_string(),
        };
        let mut runners = Vec::new();
        for (i, runner) in config.runners.iter().enumerate() {
            if runner.executor != "kubernetes" {
                continue;
            }
            if runner.url.trim().is_empty() {
                return Err(invalid(format!("runners[{i}].url"), "missing: the GitLab instance's address"));
            }
            if runner.token.trim().is_empty() {
                return Err(invalid(
                    format!("runners[{i}].token"),
                    "missing: a runner authentication token (glrt-...)",
                ));
            }
            let request_concurrency = match runner.request_concurrency {
                None => 1,
                Some(0) => return Err(invalid(format!("runners[{i}].request_concurrency"), "must be at least 1")),
                Some(n) => n as usize,
            };
            runners.push(RunnerSettings {
                name: display_name(runner),
                url: runner.url.trim().to_string(),
                token: Secret::new(runner.token.trim()),
                limit: runner.limit.filter(|&l| l > 0).map(|l| l as usize),
                request_concurrency,
                config: Arc::new(runner.clone()),
            });
        }
        if runners.is_empty() {
            return Err(SettingsError::NoRunners { path: path.to_path_buf() });
        }
        let concurrent = match config.concurrent {
            None => 1,
            Some(0) => return Err(invalid("concurrent".into(), "must be at least 1")),
            Some(n) => n as usize,
        };
        let listen_address = match config.listen_address.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(text) => Some(parse_listen_address(text).ok_or_else(|| {
                invalid("listen_address".into(), "not an address: expected host:port, e.g. `:9252` or `127.0.0.1:9252`")
            })?),
        };
        Ok(ServeSettings {
            concurrent,
            check_interval: Duration::from_secs(config.check_interval.filter(|&s| s > 0).unwrap_or(3)),
            shutdown_timeout: Duration::from_secs(config.shutdown_timeout.filter(|&s| s > 0).unwrap_or(30)),
            listen_address,
            runners,
            features,
            system_id,
            client: ClientOptions::default(),
            report: ReportOptions::default(),
            unhealthy_after: 3,
            unhealthy_interval: Duration::from_secs(60 * 60),
            force_grace: Duration::from_secs(10),
        })
    }
}

/// The runner's name, or (as GitLab Runner does) its token's first 8 characters: a prefix
/// GitLab itself shows in the UI, not enough to use the token.
fn display_name(runner: &Runner) -> String {
    if !runner.name.trim().is_empty() {
        return runner.name.trim().to_string();
    }
    runner.token.trim().chars().take(8).collect()
}

/// GitLab Runner accepts `:9252` for every interface.
fn parse_listen_address(text: &str) -> Option<SocketAddr> {
    let text = if text.starts_with(':') { format!("0.0.0.0{text}") } else { text.to_string() };
    let text = text.replace("localhost:", "127.0.0.1:");
    text.parse().ok()
}

/// This runner manager's id, kept in `.runner_system_id` beside the config as GitLab Runner
/// does, so a restart is the same manager in GitLab's UI. `r_` and 12 alphanumerics.
pub fn system_id(config_dir: &Path) -> String {
    let file = config_dir.join(".runner_system_id");
    if let Ok(text) = std::fs::read_to_string(&file) {
        let id = text.trim();
        if (id.starts_with("r_") || id.starts_with("s_")) && id.len() == 14 {
            return id.to_string();
        }
    }
    let id: String = format!("r_{}", (0..12).map(|_| fastrand::alphanumeric()).collect::<String>());
    if let Err(e) = std::fs::write(&file, format!("{id}\n")) {
        tracing::warn!(file = %file.display(), error = %e, "serve.system_id_not_saved");
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(text: &str) -> Result<ServeSettings, SettingsError> {
        let config = Config::parse(text, Path::new("config.toml"), Path::new(".")).unwrap();
        ServeSettings::from_config(&config, Path::new("config.toml"), Features::client(), "r_0123456789ab".into())
    }

    #[test]
    fn reads_gitlab_runner_keys_with_its_defaults() {
        let s = settings(
            r#"
concurrent = 4
check_interval = 1
listen_address = ":9252"
[[runners]]
name = "a"
url = "https://gitlab.example.com/"
token = "glrt-aaaa"
executor = "kubernetes"
limit = 2
request_concurrency = 3
[[runners]]
url = "https://other.example.com"
token = "glrt-bbbbbbbbbb"
executor = "kubernetes"
[[runners]]
name = "shell"
url = "https://x"
token = "t"
executor = "shell"
"#,
        )
        .unwrap();
        assert_eq!(
            (s.concurrent, s.check_interval, s.shutdown_timeout),
            (4, Duration::from_secs(1), Duration::from_secs(30))
        );
        assert_eq!(s.listen_address, Some("0.0.0.0:9252".parse().unwrap()));
        assert_eq!(s.runners.len(), 2, "only kubernetes runners are served");
        assert_eq!((s.runners[0].limit, s.runners[0].request_concurrency), (Some(2), 3));
        assert_eq!((s.runners[1].limit, s.runners[1].request_concurrency), (None, 1));
        assert_eq!(s.runners[1].name, "glrt-bbb");
        assert!(!format!("{:?}", s.runners).contains("glrt-aaaa"));
    }

    #[test]
    fn errors_name_file_and_key() {
        let err = settings("[[runners]]\nname = \"a\"\nexecutor = \"kubernetes\"\ntoken = \"t\"\n").err().unwrap();
        assert_eq!(err.to_string(), "config.toml: key `runners[0].url`: missing: the GitLab instance's address");
        let err = settings("listen_address = \"nonsense\"\n[[runners]]\nurl = \"http://x\"\ntoken = \"t\"\nexecutor = \"kubernetes\"\n")
            .err()
            .unwrap();
        assert!(err.to_string().starts_with("config.toml: key `listen_address`: not an address"), "{err}");
        let err = settings("[[runners]]\nurl = \"http://x\"\ntoken = \"t\"\nexecutor = \"docker\"\n").err().unwrap();
        assert!(matches!(err, SettingsError::NoRunners { .. }));
    }

    #[test]
    fn system_id_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let id = system_id(dir.path());
        assert!(id.starts_with("r_") && id.len() == 14, "{id}");
        assert_eq!(system_id(dir.path()), id);
    }
}
