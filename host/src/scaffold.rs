//! `host plugin new`: a ready plugin crate from nothing, so an author starts from a crate that
//! builds, tests and loads instead of from a tutorial to copy.
//!
//! Each role gets a typed config struct (a required key, so the load-time check is visible),
//! the role's trait implemented, native tests through `keel_sdk::testing`, the release
//! profile that makes components small, a sample job and a README with the build, test and
//! `host render` commands.

use std::path::{Path, PathBuf};

/// The SDK version the generated crate asks the registry for.
pub const SDK_VERSION: &str = "0.3";

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
    /// `keel-sdk = "0.3"` from crates.io: what an outside author writes.
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

/// `team-policy` -> `TeamPolicy`.
fn camel(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut c = part.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect()
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
        camel(&self.name)
    }

    fn fill(&self, template: &str) -> String {
        template
            .replace("{{NAME}}", &self.name)
            .replace("{{TYPE}}", &self.type_name())
            .replace("{{ARTIFACT}}", &self.artifact())
            .replace("{{SDK}}", &self.sdk.dependency())
            .replace("{{RENDER}}", &self.render_command())
    }

    /// The template crate's source with its names replaced by this plugin's.
    fn source(&self, template: &Template) -> String {
        let crate_name = template.crate_name();
        template.source.replace(&camel(&crate_name), &self.type_name()).replace(&crate_name, &self.name)
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
            ("src/lib.rs", self.source(&lib)),
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

// The templates are real files: each role's source is a crate of the plugins workspace
// (`plugins/templates/<role>`), so the repository's own build compiles, lints and tests exactly
// what a new plugin starts from. Its crate and type names are replaced by the new plugin's.
const CARGO_TOML: &str = include_str!("../../plugins/templates/crate/Cargo.toml.in");
const README: &str = include_str!("../../plugins/templates/crate/README.md.in");
const POD_MUTATOR: Template =
    Template { source: include_str!("../../plugins/templates/pod-mutator/src/lib.rs"), role: "pod-mutator" };
const PULL_POLICY: Template =
    Template { source: include_str!("../../plugins/templates/pull-policy/src/lib.rs"), role: "pull-policy" };
const OVERWRITES: Template =
    Template { source: include_str!("../../plugins/templates/overwrites/src/lib.rs"), role: "overwrites" };
const EXECUTION_STRATEGY: Template = Template {
    source: include_str!("../../plugins/templates/execution-strategy/src/lib.rs"),
    role: "execution-strategy",
};

const JOB: &str = "image: alpine:3.20\nscript:\n  - echo hello\n";

const JOB_WITH_OVERWRITE: &str =
    "image: alpine:3.20\nvariables:\n  KUBERNETES_NAMESPACE_OVERWRITE: ci-blue\nscript:\n  - echo hello\n";

/// A role's template crate source: named `template-<role>`, its plugin type
/// `Template<Role in CamelCase>`.
struct Template {
    source: &'static str,
    role: &'static str,
}

impl Template {
    fn crate_name(&self) -> String {
        format!("template-{}", self.role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_crate_type_and_artifact() {
        let s = Scaffold::new("team-policy", ScaffoldRole::PodMutator, SdkSource::Registry).unwrap();
        assert_eq!(s.type_name(), "TeamPolicy");
        assert_eq!(s.artifact(), "target/wasm32-wasip2/release/team_policy.wasm");
        assert!(s.fill(CARGO_TOML).contains(&format!("keel-sdk = \"{SDK_VERSION}\"")));
        let source = s.source(&POD_MUTATOR);
        assert!(
            source.contains("pub struct TeamPolicy {")
                && source.contains("const NAME: &'static str = \"team-policy\";")
        );
        assert!(!source.contains("emplate"), "a template name left in:\n{source}");
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
