//! The plugin's own configuration table.

use serde::de::DeserializeOwned;

use crate::Error;

/// The plugin's table from the host config (TOML, handed over as JSON).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    value: serde_json::Value,
}

impl Config {
    pub fn from_json(json: &str) -> Result<Self, Error> {
        let value = if json.trim().is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_str(json).map_err(|e| Error::invalid_config(format!("config is not valid JSON: {e}")))?
        };
        Ok(Config { value })
    }

    pub fn from_value(value: serde_json::Value) -> Self {
        Config { value }
    }

    /// Deserialize into the author's type. Use `#[serde(deny_unknown_fields)]` on it so a typo
    /// in the operator's table is an error, not silently ignored.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, Error> {
        T::deserialize(&self.value).map_err(|e| Error::invalid_config(format!("plugin table: {e}")))
    }

    pub fn as_json(&self) -> &serde_json::Value {
        &self.value
    }
}
