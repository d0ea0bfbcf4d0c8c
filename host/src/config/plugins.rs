//! `[[runners.kubernetes.plugins]]` (and the top-level `[[plugins]]`): which components a
//! runner loads, their configuration tables, grants, and where each table is in its file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, toml_error};
use crate::input::{Located, cut_message, limits, line_col, read_text_file};
use crate::vocab::values::{ByteSize, GitlabDuration};

/// `[[runners.kubernetes.plugins]]`: one WebAssembly component.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Path to the `.wasm` component, relative to the config file (resolved at load).
    #[serde(rename = "path")]
    raw_path: toml::Spanned<PathBuf>,
    #[serde(skip)]
    pub path: PathBuf,
    /// Overrides the name the plugin gives itself (its metadata) in errors and logs.
    pub name: Option<String>,
    /// The table as written, with its place in the file.
    #[serde(default, rename = "config")]
    raw_config: Option<toml::Spanned<toml::Table>>,
    /// Handed to the plugin as-is; its meaning is the plugin's business. Checked by the
    /// plugin's `configure` when the plugin loads.
    #[serde(skip)]
    pub config: toml::Table,
    /// Where `config` is in the file (set when the file is read), for the plugin's rejections.
    #[serde(skip)]
    pub origin: Option<ConfigOrigin>,
    /// Maximum linear memory, e.g. `"64Mi"` or a number of bytes.
    pub memory_limit: Option<ByteSize>,
    /// Maximum time per call, e.g. `"2s"`, `"500ms"`.
    pub timeout: Option<GitlabDuration>,
    /// Capabilities beyond the default sandbox. Nothing is granted unless listed here.
    #[serde(default)]
    pub grants: PluginGrants,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginGrants {
    /// See the values of masked/non-public variables (otherwise they arrive empty).
    #[serde(default)]
    pub secrets: bool,
}

impl PluginConfig {
    /// An entry made in code (tests, benchmarks) rather than read from a file.
    pub fn new(path: PathBuf, name: Option<String>, config: toml::Table) -> Self {
        PluginConfig {
            raw_path: toml::Spanned::new(0..0, path.clone()),
            path,
            name,
            raw_config: None,
            config,
            origin: None,
            memory_limit: None,
            timeout: None,
            grants: PluginGrants::default(),
        }
    }

    /// A plugin from the command line: `P.wasm`, `P.wasm=CONFIG.toml` (the file is the
    /// plugin's table, what `[runners.kubernetes.plugins.config]` would hold) or
    /// `P.wasm={ key = "value" }` (an inline TOML table). The value splits at the first
    /// `.wasm=`, so paths with `=` elsewhere still work.
    pub fn from_arg(arg: &str) -> Result<PluginConfig, ConfigError> {
        let invalid = |message: String| ConfigError::PluginArg { arg: cut_message(arg.to_string()), message };
        let Some(at) = arg.find(".wasm=") else {
            return Ok(PluginConfig::new(PathBuf::from(arg), None, toml::Table::new()));
        };
        let (path, given) = (PathBuf::from(&arg[..at + ".wasm".len()]), &arg[at + ".wasm=".len()..]);
        if given.trim_start().starts_with('{') {
            let doc = format!("config = {given}");
            let mut table: toml::Table = toml::from_str(&doc)
                .map_err(|e| invalid(format!("not an inline TOML table: {}", e.message().trim())))?;
            let Some(toml::Value::Table(config)) = table.remove("config") else {
                return Err(invalid("not an inline TOML table".into()));
            };
            return Ok(PluginConfig::new(path, None, config));
        }
        let file = PathBuf::from(given);
        let text = read_text_file(&file, limits::CONFIG_BYTES)
            .map_err(|source| ConfigError::Read { path: file.clone(), source })?;
        let de = toml::Deserializer::parse(&text).map_err(|e| toml_error(&text, &file, "", &e))?;
        let config: toml::Table = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            toml_error(&text, &file, &key, e.inner())
        })?;
        let mut plugin = PluginConfig::new(path, None, config);
        plugin.origin = Some(ConfigOrigin::of_file(&text, &file));
        Ok(plugin)
    }

    /// Resolves the path against `base` and records where the entry's table is in `text`.
    pub(super) fn resolve(&mut self, text: &str, file: &Path, base: &Path, key: String) {
        self.path = base.join(self.raw_path.get_ref());
        let key = format!("{key}.config");
        self.origin = Some(match &self.raw_config {
            Some(table) => {
                self.config = table.get_ref().clone();
                ConfigOrigin::of_table(text, file, table.span(), key)
            }
            // No table: a rejection (a required key) points at the entry's `path`.
            None => {
                let (line, column) = line_col(text, self.raw_path.span().start);
                ConfigOrigin { path: file.to_path_buf(), line, column, key, keys: BTreeMap::new() }
            }
        });
    }
}

/// Where a plugin's configuration table is in a file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigOrigin {
    pub path: PathBuf,
    /// 1-based position of the table (its `[...config]` header or inline `{`).
    pub line: usize,
    pub column: usize,
    /// The table's key path, e.g. `runners[0].kubernetes.plugins[1].config`; empty when the
    /// table is the whole file.
    pub key: String,
    /// 1-based positions of the table's own keys, so an error naming one points at its line.
    pub keys: BTreeMap<String, (usize, usize)>,
}

impl ConfigOrigin {
    /// Where a rejection is (`file:line:col: key `...``) whose reason is `reason`: at the key the
    /// reason names (serde's messages quote it in backticks) when the table has it, else at
    /// the table.
    pub fn locate(&self, reason: &str) -> Located {
        let named = reason.split('`').skip(1).step_by(2).find_map(|k| self.keys.get_key_value(k));
        let (key, (line, column)) = match named {
            Some((k, pos)) if self.key.is_empty() => (k.clone(), *pos),
            Some((k, pos)) => (format!("{}.{k}", self.key), *pos),
            None if self.key.is_empty() => ("(document)".to_string(), (self.line, self.column)),
            None => (self.key.clone(), (self.line, self.column)),
        };
        Located::at(&self.path, line, column, key)
    }
}

impl ConfigOrigin {
    /// The table at byte range `span` of `text`: an inline `{ ... }`, or a `[...config]`
    /// header whose keys are the lines after it, up to the next header.
    pub fn of_table(text: &str, file: &Path, span: std::ops::Range<usize>, key: String) -> Self {
        let (line, column) = line_col(text, span.start);
        let inline = text.get(span.clone()).is_some_and(|t| t.trim_start().starts_with('{'));
        let region = if inline {
            span.clone()
        } else {
            let rest = &text[span.end.min(text.len())..];
            let end = rest
                .match_indices('\n')
                .map(|(i, _)| i + 1)
                .find(|&i| rest[i..].trim_start().starts_with('['))
                .unwrap_or(rest.len());
            span.end..span.end + end
        };
        ConfigOrigin { path: file.to_path_buf(), line, column, key, keys: key_positions(text, region, inline) }
    }

    /// A whole file that is one plugin's table (`--plugin P.wasm=FILE.toml`).
    pub fn of_file(text: &str, file: &Path) -> Self {
        ConfigOrigin {
            path: file.to_path_buf(),
            line: 1,
            column: 1,
            key: String::new(),
            keys: key_positions(text, 0..text.len(), false),
        }
    }
}

/// 1-based positions of the keys written directly in a table (`key =` at a line start, or
/// after `{`/`,` inline). A heuristic for messages only: a nested inline table's keys may be
/// taken for the outer table's, in which case the message points one key off, never nowhere.
fn key_positions(text: &str, region: std::ops::Range<usize>, inline: bool) -> BTreeMap<String, (usize, usize)> {
    static HEADER: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    static INLINE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = if inline {
        INLINE.get_or_init(|| {
            regex::Regex::new(r#"[{,]\s*(?:"([^"\n]+)"|'([^'\n]+)'|([A-Za-z0-9_-]+))\s*="#).expect("static regex")
        })
    } else {
        HEADER.get_or_init(|| {
            regex::Regex::new(r#"(?m)^[ \t]*(?:"([^"\n]+)"|'([^'\n]+)'|([A-Za-z0-9_-]+))[ \t]*="#)
                .expect("static regex")
        })
    };
    let Some(slice) = text.get(region.clone()) else { return BTreeMap::new() };
    let mut keys = BTreeMap::new();
    for caps in re.captures_iter(slice) {
        let Some(m) = caps.get(1).or_else(|| caps.get(2)).or_else(|| caps.get(3)) else { continue };
        keys.entry(m.as_str().to_string()).or_insert_with(|| line_col(text, region.start + m.start()));
    }
    keys
}
