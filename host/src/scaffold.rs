//! `host plugin new`: a ready plugin crate from nothing, so an author starts from a crate that
//! builds, tests and loads instead of from a tutorial to copy.
//!
//! Each role gets a typed config struct (a required key, so the load-time check is visible),
//! the role's trait implemented, native tests through `keel_sdk::testing`, the release
//! profile that makes components small, a sample job and a README with the build, test and
//! `host render` commands.

use std::path::{Path, PathBuf};

/// The SDK version the generated crate asks the registry for.
pub const SDK_VERSION: &str = "0.2";

#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error(
        "plugin name {0:?} is not usable: use lower-case letters, digits and `-` (a crate name and the plugin's metadata name), starting with a letter"
    )]
    BadName(String),
    #[error("{0} exists and is not empty; choose another --dir")]
    NotEmpty(PathBuf),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The role the new plugin plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScaffoldRole {
    PodMutator,
    PullPolicy,
    Overwrites,
    ExecutionStrategy,
}

/// Where the generated crate gets `keel-sdk` from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdkSource {
    /// `keel-sdk = "0.2"` from crates.io: what an outside author writes.
    Registry,
    /// A checkout's `sdk/` directory.
    Path(PathBuf),
}

impl SdkSource {
    fn dependency(&self) -> String {
        match self {
            SdkSource::Registry => format!("keel-sdk = \"{SDK_VERSION}\""),
            SdkSource::Path(p) => format!("keel-sdk = {{ path = {:?} }}", p.display().to_string()),
        }
    }
}

/// The `sdk/` of the checkout this binary was built from, if it is still there: a host built
/// from source generates crates that build against the SDK it was built with.
pub fn checkout_sdk() -> Option<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    sdk.join("Cargo.toml").is_file().then(|| sdk.canonicalize().unwrap_or(sdk))
}

/// A plugin crate to write.
#[derive(Debug, Clone)]
pub struct Scaffold {
    name: String,
    role: ScaffoldRole,
    sdk: SdkSource,
}

impl Scaffold {
    pub fn new(name: &str, role: ScaffoldRole, sdk: SdkSource) -> Result<Self, ScaffoldError> {
        let ok = name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !name.ends_with('-');
        if !ok {
            return Err(ScaffoldError::BadName(name.to_string()));
        }
        Ok(Scaffold { name: name.to_string(), role, sdk })
    }

    /// The component cargo builds: the crate name with `-` turned into `_`.
    pub fn artifact(&self) -> String {
        format!("target/wasm32-wasip2/release/{}.wasm", self.name.replace('-', "_"))
    }

    fn type_name(&self) -> String {
        self.name
            .split('-')
            .map(|part| {
                let mut c = part.chars();
                c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
            })
            .collect()
    }

    fn fill(&self, template: &str) -> String {
        template
            .replace("{{NAME}}", &self.name)
            .replace("{{TYPE}}", &self.type_name())
            .replace("{{ARTIFACT}}", &self.artifact())
            .replace("{{SDK}}", &self.sdk.dependency())
            .replace("{{RENDER}}", &self.render_command())
    }

    /// The `host render` line that loads the built plugin with a configuration.
    pub fn render_command(&self) -> String {
        let wasm = self.artifact();
        match self.role {
            ScaffoldRole::PodMutator => format!("host render --plugin '{wasm}={{ team = \"platform\" }}' job.yml"),
            ScaffoldRole::PullPolicy => {
                format!("host render --plugin '{wasm}={{ policy = \"if-not-present\" }}' job.yml")
            }
            ScaffoldRole::Overwrites => format!("host render --plugin '{wasm}={{ namespaces = [\"ci-\"] }}' job.yml"),
            ScaffoldRole::ExecutionStrategy => format!("host render --strategy {wasm} job.yml"),
        }
    }

    /// Writes the crate into `dir` (created; must not exist or be empty). Returns the files.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, ScaffoldError> {
        if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
            return Err(ScaffoldError::NotEmpty(dir.to_path_buf()));
        }
        let lib = match self.role {
            ScaffoldRole::PodMutator => POD_MUTATOR,
            ScaffoldRole::PullPolicy => PULL_POLICY,
            ScaffoldRole::Overwrites => OVERWRITES,
            ScaffoldRole::ExecutionStrategy => EXECUTION_STRATEGY,
        };
        let job = match self.role {
            ScaffoldRole::Overwrites => JOB_WITH_OVERWRITE,
            _ => JOB,
        };
        let files = [
            ("Cargo.toml", self.fill(CARGO_TOML)),
            ("src/lib.rs", self.fill(lib)),
            ("job.yml", job.to_string()),
            ("README.md", self.fill(README)),
            (".gitignore", "/target\n".to_string()),
        ];
        let mut written = Vec::new();
        for (rel, text) in files {
            let path = dir.join(rel);
            let write = || -> std::io::Result<()> {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&path, text)
            };
            write().map_err(|source| ScaffoldError::Write { path: path.clone(), source })?;
            written.push(path);
        }
        Ok(written)
    }

    /// What to run next, for the terminal.
    pub fn next_steps(&self, dir: &Path) -> String {
        format!(
            "cd {}\ncargo test\ncargo build --release --target wasm32-wasip2\n{}",
            dir.display(),
            self.render_command()
        )
    }
}

const CARGO_TOML: &str = r##"[package]
name = "{{NAME}}"
version = "0.1.0"
edition = "2024"

[lib]
# cdylib: the WebAssembly component; rlib: `cargo test` runs the logic natively.
crate-type = ["cdylib", "rlib"]

[dependencies]
{{SDK}}
# Your plugin picks the Kubernetes API version; the SDK does not.
k8s-openapi = { version = "0.29", default-features = false, features = ["std", "v1_34"] }
serde = { version = "1", features = ["derive"] }

[profile.release]
# 1.3 MB for this template instead of 4.6 MB with the default profile: smaller components
# compile and instantiate faster.
opt-level = "s"
lto = true
codegen-units = 1
# Debug info goes; function names stay, so a crash's backtrace still names your code.
strip = "debuginfo"

# A crate of its own, even when created inside another cargo workspace.
[workspace]
"##;

const JOB: &str = "image: alpine:3.20\nscript:\n  - echo hello\n";

const JOB_WITH_OVERWRITE: &str =
    "image: alpine:3.20\nvariables:\n  KUBERNETES_NAMESPACE_OVERWRITE: ci-blue\nscript:\n  - echo hello\n";

const README: &str = r##"# {{NAME}}

A keel plugin. Build, test and try it:

```sh
rustup target add wasm32-wasip2      # once
cargo test                           # the logic, natively, against the host's own pod
cargo build --release --target wasm32-wasip2
host plugin inspect {{ARTIFACT}}
{{RENDER}}
```

`--plugin P.wasm=CONFIG` gives the plugin its configuration: an inline TOML table as above,
or a file holding the table (`--plugin {{ARTIFACT}}=plugin.toml`). In a runner's
`config.toml`:

```toml
[[runners.kubernetes.plugins]]
  path = "/abs/path/to/{{ARTIFACT}}"
  [runners.kubernetes.plugins.config]
    # the keys of the `Settings` struct in src/lib.rs
```

The configuration is checked when the plugin loads (`host plugin inspect --config
config.toml` checks it too); a rejected table is reported at its `config.toml:line:column`.
Errors and logs call the plugin `{{NAME}}` (its metadata name) unless the config gives it
another `name`.
"##;

const POD_MUTATOR: &str = r##"//! `{{NAME}}`: a keel pod mutator. It annotates every job pod with the owning team and adds
//! labels, keeping labels that are already there (the host owns some).

use std::collections::BTreeMap;

use keel_sdk::{Config, Context, Error, Plugin, Pod, PodMutator};

/// The plugin's settings: its table in the runner config, or `--plugin P.wasm=CONFIG`.
/// `deny_unknown_fields` turns a typo into an error when the plugin loads.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Required: the team owning the jobs (annotation `example.com/team`).
    team: String,
    /// Labels to add to the pod.
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

pub struct {{TYPE}} {
    settings: Settings,
}

impl Plugin for {{TYPE}} {
    // The name in every error and log line about this plugin.
    const NAME: &'static str = "{{NAME}}";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(config: Config) -> Result<Self, Error> {
        let settings: Settings = config.parse()?;
        if settings.team.is_empty() {
            return Err(Error::invalid_config("`team` must not be empty"));
        }
        Ok({{TYPE}} { settings })
    }
}

impl PodMutator for {{TYPE}} {
    fn mutate(&mut self, ctx: &Context, mut pod: Pod) -> Result<Pod, Error> {
        let annotations = pod.metadata.annotations.get_or_insert_with(Default::default);
        annotations.insert("example.com/team".into(), self.settings.team.clone());
        let labels = pod.metadata.labels.get_or_insert_with(Default::default);
        for (key, value) in &self.settings.labels {
            labels.entry(key.clone()).or_insert_with(|| value.clone());
        }
        keel_sdk::debug!("annotated the pod of job {}", ctx.job.id);
        Ok(pod)
    }
}

keel_sdk::export!({{TYPE}}: PodMutator);

#[cfg(test)]
mod tests {
    use super::*;
    use keel_sdk::testing::{self, ContextBuilder};

    #[test]
    fn annotates_the_pod_the_host_builds() {
        let mut plugin: {{TYPE}} = testing::configure(r#"team = "platform""#).unwrap();
        let ctx = ContextBuilder::new().variable("DEPLOY_ENV", "staging").build();
        let pod = testing::mutate(&mut plugin, &ctx, testing::pod_for(&ctx)).unwrap();
        assert_eq!(pod.metadata.annotations.unwrap()["example.com/team"], "platform");
    }

    #[test]
    fn host_owned_labels_are_kept() {
        let mut plugin: {{TYPE}} =
            testing::configure(r#"team = "platform"
labels = { "keel.dev/job-id" = "other", tier = "ci" }"#).unwrap();
        let ctx = ContextBuilder::new().job_id(7).build();
        let labels = testing::mutate(&mut plugin, &ctx, testing::pod_for(&ctx)).unwrap().metadata.labels.unwrap();
        assert_eq!((labels["keel.dev/job-id"].as_str(), labels["tier"].as_str()), ("7", "ci"));
    }

    #[test]
    fn a_missing_team_is_a_config_error() {
        match testing::configure::<{{TYPE}}>("") {
            Err(Error::InvalidConfig(message)) => assert!(message.contains("missing field `team`"), "{message}"),
            other => panic!("expected invalid config, got {:?}", other.err()),
        }
    }
}
"##;

const PULL_POLICY: &str = r##"//! `{{NAME}}`: keel pull-policy rules. Every image gets the configured policy, except where
//! the job asks for one the configuration allows.

use keel_sdk::{Config, Context, Error, Plugin, PullPolicy, PullPolicyRequest, PullPolicyRules};

/// The plugin's settings: its table in the runner config, or `--plugin P.wasm=CONFIG`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Required: `always`, `if-not-present` or `never`.
    policy: String,
    /// Let the job's own `image:pull_policy` win when it is one of these.
    #[serde(default)]
    job_may_choose: Vec<String>,
}

fn parse(policy: &str) -> Result<PullPolicy, Error> {
    match policy {
        "always" => Ok(PullPolicy::Always),
        "if-not-present" => Ok(PullPolicy::IfNotPresent),
        "never" => Ok(PullPolicy::Never),
        other => Err(Error::invalid_config(format!("unknown pull policy {other:?} (always, if-not-present, never)"))),
    }
}

pub struct {{TYPE}} {
    policy: PullPolicy,
    job_may_choose: Vec<PullPolicy>,
}

impl Plugin for {{TYPE}} {
    const NAME: &'static str = "{{NAME}}";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(config: Config) -> Result<Self, Error> {
        let settings: Settings = config.parse()?;
        let job_may_choose = settings.job_may_choose.iter().map(|p| parse(p)).collect::<Result<_, _>>()?;
        Ok({{TYPE}} { policy: parse(&settings.policy)?, job_may_choose })
    }
}

impl PullPolicyRules for {{TYPE}} {
    fn decide(&mut self, _ctx: &Context, request: &PullPolicyRequest) -> Result<Vec<PullPolicy>, Error> {
        let chosen: Vec<PullPolicy> = request.job.iter().copied().filter(|p| self.job_may_choose.contains(p)).collect();
        Ok(if chosen.is_empty() { vec![self.policy] } else { chosen })
    }
}

keel_sdk::export!({{TYPE}}: PullPolicyRules);

#[cfg(test)]
mod tests {
    use super::*;
    use keel_sdk::testing::{self, ContextBuilder};

    #[test]
    fn the_configured_policy_unless_the_job_may_choose() {
        let mut plugin: {{TYPE}} =
            testing::configure("policy = \"if-not-present\"\njob_may_choose = [\"always\"]").unwrap();
        let ctx = ContextBuilder::new().build();
        let mut request = PullPolicyRequest { image: "alpine:3.20".into(), ..Default::default() };
        assert_eq!(testing::decide(&mut plugin, &ctx, &request).unwrap(), [PullPolicy::IfNotPresent]);
        request.job = vec![PullPolicy::Always];
        assert_eq!(testing::decide(&mut plugin, &ctx, &request).unwrap(), [PullPolicy::Always]);
    }

    #[test]
    fn an_unknown_policy_is_a_config_error() {
        assert!(matches!(testing::configure::<{{TYPE}}>("policy = \"sometimes\""), Err(Error::InvalidConfig(_))));
    }
}
"##;

const OVERWRITES: &str = r##"//! `{{NAME}}`: keel overwrite rules. A job may move to a namespace with one of the configured
//! prefixes; every other requested overwrite is dropped (the host lists it as refused).

use keel_sdk::{Config, Context, Error, OverwriteRules, Overwrites, Plugin};

/// The plugin's settings: its table in the runner config, or `--plugin P.wasm=CONFIG`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Required: namespace prefixes a job may ask for (`KUBERNETES_NAMESPACE_OVERWRITE`).
    namespaces: Vec<String>,
}

pub struct {{TYPE}} {
    settings: Settings,
}

impl Plugin for {{TYPE}} {
    const NAME: &'static str = "{{NAME}}";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(config: Config) -> Result<Self, Error> {
        Ok({{TYPE}} { settings: config.parse()? })
    }
}

impl OverwriteRules for {{TYPE}} {
    fn review(&mut self, _ctx: &Context, requested: Overwrites) -> Result<Overwrites, Error> {
        let mut accepted = Overwrites::default();
        if let Some(namespace) = requested.namespace {
            if !self.settings.namespaces.iter().any(|prefix| namespace.starts_with(prefix.as_str())) {
                return Err(Error::denied(format!(
                    "KUBERNETES_NAMESPACE_OVERWRITE={namespace:?} does not start with any of {:?}",
                    self.settings.namespaces
                )));
            }
            accepted.namespace = Some(namespace);
        }
        Ok(accepted)
    }
}

keel_sdk::export!({{TYPE}}: OverwriteRules);

#[cfg(test)]
mod tests {
    use super::*;
    use keel_sdk::testing::{self, ContextBuilder};

    #[test]
    fn a_namespace_with_an_allowed_prefix_is_accepted_others_denied() {
        let mut plugin: {{TYPE}} = testing::configure("namespaces = [\"ci-\"]").unwrap();
        let ctx = ContextBuilder::new().build();
        let ask = |ns: &str| Overwrites { namespace: Some(ns.into()), ..Default::default() };
        assert_eq!(testing::review(&mut plugin, &ctx, ask("ci-blue")).unwrap().namespace.as_deref(), Some("ci-blue"));
        assert!(matches!(testing::review(&mut plugin, &ctx, ask("kube-system")), Err(Error::Denied(_))));
    }
}
"##;

const EXECUTION_STRATEGY: &str = r##"//! `{{NAME}}`: a keel execution strategy. Each stage's script runs with `sh -c` in the build
//! container through the host's exec service; its output goes to the job's trace.

use keel_sdk::strategy::HostError;
use keel_sdk::{Config, Context, Error, ExecutionStrategy, Plugin, Pod, Stage, StrategyHost};

/// The plugin's settings: its table in the runner config.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The shell the script runs in.
    #[serde(default = "default_shell")]
    shell: String,
}

fn default_shell() -> String {
    "sh".into()
}

pub struct {{TYPE}} {
    settings: Settings,
}

impl Plugin for {{TYPE}} {
    const NAME: &'static str = "{{NAME}}";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(config: Config) -> Result<Self, Error> {
        Ok({{TYPE}} { settings: config.parse()? })
    }
}

fn host_error(e: HostError) -> Error {
    Error::internal(format!("host service failed: {e:?}"))
}

impl ExecutionStrategy for {{TYPE}} {
    fn prepare(&mut self, _ctx: &Context, pod: Pod) -> Result<Pod, Error> {
        // The host's base pod already has build and helper idling in a shell.
        Ok(pod)
    }

    fn run_stage(&mut self, _ctx: &Context, stage: &Stage, host: &StrategyHost) -> Result<i32, Error> {
        let command = vec![self.settings.shell.clone(), "-c".to_string(), stage.script.clone()];
        let session = host.exec("build", &command, false).map_err(host_error)?;
        // stdout and stderr both go to the trace, as a terminal would show them.
        while let Some((_stream, data)) = session.read_output(64 * 1024).map_err(host_error)? {
            host.trace_write(&data);
        }
        session.wait_exit().map_err(host_error)
    }
}

keel_sdk::export!({{TYPE}}: ExecutionStrategy);

#[cfg(test)]
mod tests {
    use super::*;
    use keel_sdk::testing::{self, ContextBuilder};

    #[test]
    fn prepare_keeps_a_pod_the_host_accepts() {
        let mut plugin: {{TYPE}} = testing::configure("").unwrap();
        let ctx = ContextBuilder::new().build();
        let pod = testing::prepare(&mut plugin, &ctx, testing::pod_for(&ctx)).unwrap();
        assert!(pod.spec.unwrap().containers.iter().any(|c| c.name == "build"));
    }
}
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_crate_type_and_artifact() {
        let s = Scaffold::new("team-policy", ScaffoldRole::PodMutator, SdkSource::Registry).unwrap();
        assert_eq!(s.type_name(), "TeamPolicy");
        assert_eq!(s.artifact(), "target/wasm32-wasip2/release/team_policy.wasm");
        assert!(s.fill(CARGO_TOML).contains("keel-sdk = \"0.2\""));
        for bad in ["", "Team", "1x", "a_b", "x-", "a b"] {
            assert!(Scaffold::new(bad, ScaffoldRole::PodMutator, SdkSource::Registry).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refuses_a_non_empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x"), "").unwrap();
        let s = Scaffold::new("p", ScaffoldRole::PullPolicy, SdkSource::Registry).unwrap();
        assert!(matches!(s.write(dir.path()), Err(ScaffoldError::NotEmpty(_))));
    }
}
