//! `host plugin inspect`: what a component says about itself.

use super::*;

/// What a component says about itself, for `host plugin inspect`.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub path: PathBuf,
    pub size_bytes: u64,
    /// The `keel:plugin` version of its `plugin` export, if any.
    pub wit_version: Option<String>,
    /// Role interfaces the component exports.
    pub exported_roles: Vec<String>,
    /// From `metadata()`, when the component loads.
    pub name: Option<String>,
    pub version: Option<String>,
    /// The roles the host will call: exported and declared in the metadata.
    pub roles: Vec<Role>,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    pub compile: Option<CompileSource>,
    /// `None` when the plugin loads in this host (with its configuration, when one was
    /// given); otherwise why not.
    pub load_error: Option<String>,
    /// The operator's `name` for it, when inspected as a config entry.
    pub configured_as: Option<String>,
    /// `file:line:col` of the configuration table that was checked, if any.
    pub config_origin: Option<String>,
    /// Inspected without a configuration: why the plugin rejects an empty table (a required
    /// key), if it does. It still loads; a job must configure it.
    pub needs_config: Option<String>,
}

impl std::fmt::Display for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "path:        {}", self.path.display())?;
        writeln!(f, "size:        {} bytes", self.size_bytes)?;
        writeln!(
            f,
            "wit:         {}",
            self.wit_version.as_deref().map(|v| format!("keel:plugin@{v}")).unwrap_or_else(|| "none".into())
        )?;
        writeln!(f, "name:        {}", self.name.as_deref().unwrap_or("-"))?;
        writeln!(f, "version:     {}", self.version.as_deref().unwrap_or("-"))?;
        let roles: Vec<&str> = self.roles.iter().map(|r| r.as_str()).collect();
        writeln!(f, "roles:       {}", if roles.is_empty() { "-".to_string() } else { roles.join(", ") })?;
        writeln!(f, "exports:     {}", self.exports.join(", "))?;
        writeln!(f, "imports:     {}", self.imports.join(", "))?;
        if let Some(name) = &self.configured_as {
            writeln!(f, "configured:  as `{name}`")?;
        }
        if let Some(origin) = &self.config_origin {
            let verdict = if self.load_error.is_none() { "accepted" } else { "see below" };
            writeln!(f, "config:      {origin} ({verdict})")?;
        }
        if let Some(reason) = &self.needs_config {
            writeln!(f, "config:      required (an empty table is rejected: {reason})")?;
        }
        match &self.load_error {
            None => write!(f, "loads:       yes"),
            Some(e) => write!(f, "loads:       no: {e}"),
        }
    }
}
