//! One `bindgen!` per supported WIT version, newest last.
//!
//! The rest of the host speaks only the *latest* version's types (`latest`). Each older version
//! module adapts: it loads its own bindings and converts arguments from, and results to, the
//! latest types. Adding `v0.2.0` means: freeze `wit/v0.2.0/`, add `since_v0_2_0.rs` with its own
//! `bindgen!`, point `latest` at it, make `since_v0_1_0` convert, and add a variant to
//! [`WitVersion`] and [`Exports`].

mod records;
pub mod since_v0_1_0;

/// The types the host works with; always the newest supported version.
pub use since_v0_1_0 as latest;

use wasmtime::Engine;
use wasmtime::component::Component;

/// The WIT package every plugin is built against.
pub const PACKAGE: &str = "keel:plugin";

/// A WIT package version this host can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WitVersion {
    V0_1_0,
}

impl WitVersion {
    pub const SUPPORTED: &[WitVersion] = &[WitVersion::V0_1_0];

    pub fn as_str(self) -> &'static str {
        match self {
            WitVersion::V0_1_0 => "0.1.0",
        }
    }

    fn parse(version: &str) -> Option<Self> {
        Self::SUPPORTED.iter().copied().find(|v| v.as_str() == version)
    }

    pub fn supported_list() -> String {
        Self::SUPPORTED.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// What a component's type says about it, before anything is instantiated.
#[derive(Debug, Clone)]
pub struct ExportScan {
    /// The version of `keel:plugin/plugin` it exports, as written in the component.
    pub plugin_version: Option<String>,
    /// Role interfaces it exports (`keel:plugin/<role>@<version>`), whatever their version.
    pub role_exports: Vec<(String, String)>,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
}

impl ExportScan {
    pub fn of(engine: &Engine, component: &Component) -> Self {
        let ty = component.component_type();
        let exports: Vec<String> = ty.exports(engine).map(|(name, _)| name.to_string()).collect();
        let imports: Vec<String> = ty.imports(engine).map(|(name, _)| name.to_string()).collect();
        let mut plugin_version = None;
        let mut role_exports = Vec::new();
        for name in &exports {
            let Some((iface, version)) = split_keel_name(name) else { continue };
            if iface == "plugin" {
                plugin_version = Some(version.to_string());
            } else {
                role_exports.push((iface.to_string(), version.to_string()));
            }
        }
        ExportScan { plugin_version, role_exports, imports, exports }
    }

    /// The supported version this component was built for, if any.
    pub fn version(&self) -> Option<WitVersion> {
        self.plugin_version.as_deref().and_then(WitVersion::parse)
    }

    pub fn exports_role(&self, iface: &str) -> bool {
        self.role_exports.iter().any(|(name, _)| name == iface)
    }
}

/// `keel:plugin/pod-mutator@0.1.0` -> `("pod-mutator", "0.1.0")`.
fn split_keel_name(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix(PACKAGE)?.strip_prefix('/')?;
    rest.split_once('@')
}

/// A plugin instance's exports, whichever version it was built against.
pub enum Exports {
    V0_1_0(since_v0_1_0::Exports),
}
