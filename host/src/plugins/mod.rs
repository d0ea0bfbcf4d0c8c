//! Plugins: sandboxed WebAssembly components that shape a job's pod and decide policies.
//!
//! Flow: [`Runtime`] (one per process: engine, epoch ticker, compile cache, linker) ->
//! [`Runtime::load`] gives a [`Plugin`] (compiled once, exports checked, `InstancePre` ready) ->
//! per job, [`JobPlugins::new`] instantiates every plugin in a fresh `Store` and configures it ->
//! role calls ([`JobPlugins::overwrites`], [`JobPlugins::pull_policies`], the strategy,
//! [`JobPlugins::mutate_pod`]) run the plugins having that role in configuration order.
//!
//! Every failure is a [`PluginError`] naming the plugin and its version. A trap (panic, endless
//! loop, memory bomb) stops that plugin's instance for the rest of the job; the next job gets
//! a fresh one, so a misbehaving plugin never takes the host down.
//!
//! Files by concern: `runtime` (engine, ticker, pool, load), `instance` (store, budget, trap
//! classification), `chain` (the job's plugins and their role calls), `inspect`,
//! `sandbox` (what an instance may touch), `strategy_host` (pod access for the job's strategy),
//! `validate` (checks on plugin output), `pool`, `cache`, `wit` (bindings, and the contract's
//! records to and from them).

mod cache;
mod chain;
mod inspect;
mod instance;
pub mod pool;
mod runtime;
mod sandbox;
pub mod strategy_host;
mod validate;
pub mod wit;

pub use chain::*;
pub use inspect::*;
use instance::*;
pub use runtime::*;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use tracing::Instrument;
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Config, Enabled, Engine, PoolConcurrencyLimitError, PoolingAllocationConfig, Store, Trap};

pub use crate::config::ConfigOrigin;
use crate::job::{Job, Overwrites, PullPolicy};
pub use cache::Source as CompileSource;
use sandbox::StoreState;
pub use sandbox::plugin_text;
pub use strategy_host::StrategyServices;
pub use validate::{HostOwned, check_pod_output};
use wit::latest;

/// The largest component file the host reads (first-party plugins are a few hundred KiB).
const MAX_COMPONENT_BYTES: usize = 256 << 20;

/// How often the epoch advances; per-call CPU deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Resource limits for one plugin instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Cap on the instance's linear memory.
    pub memory_bytes: u64,
    /// Wall-clock budget of one call (configure, mutate...). CPU inside the plugin is cut at
    /// this deadline by epoch interruption; the host-side timeout covers the rest.
    pub call_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { memory_bytes: 64 * 1024 * 1024, call_timeout: Duration::from_secs(2) }
    }
}

/// Capabilities an operator grants a plugin beyond the default sandbox. Empty = nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// See the values of non-public variables (otherwise they arrive as `none`).
    pub secrets: bool,
}

/// A plugin as the operator configured it.
#[derive(Debug, Clone, Default)]
pub struct PluginSpec {
    /// The operator's name for it (the config's `name`); empty: the name the plugin gives
    /// itself in its metadata. Errors and log lines use this name, and show the plugin's own
    /// as well when the two differ.
    pub name: String,
    pub path: PathBuf,
    /// The plugin's own TOML table; handed to `configure` as JSON.
    pub config: toml::Table,
    pub limits: Limits,
    pub grants: Grants,
    /// Where `config` was written (file, line, column, key), so a configuration the plugin
    /// rejects is reported at its table. `None` for plugins given without a file.
    pub origin: Option<ConfigOrigin>,
}

/// The roles a plugin can play (WIT `role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    PodMutator,
    PullPolicy,
    Overwrites,
    ExecutionStrategy,
}

impl Role {
    /// The WIT interface name of the role.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::PodMutator => "pod-mutator",
            Role::PullPolicy => "pull-policy",
            Role::Overwrites => "overwrites",
            Role::ExecutionStrategy => "execution-strategy",
        }
    }

    fn from_wit(role: latest::Role) -> Self {
        match role {
            latest::Role::PodMutator => Role::PodMutator,
            latest::Role::PullPolicy => Role::PullPolicy,
            latest::Role::Overwrites => Role::Overwrites,
            latest::Role::ExecutionStrategy => Role::ExecutionStrategy,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
    #[error("plugin cache unusable")]
    Cache(#[from] cache::CacheError),
    #[error("cannot read plugin `{plugin}` from {path}")]
    Read {
        plugin: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("plugin `{plugin}` ({path}) is not a valid WebAssembly component: {reason}")]
    Compile { plugin: String, path: PathBuf, reason: String },
    #[error(
        "plugin `{plugin}` ({path}) is not a keel plugin: it exports no `keel:plugin/plugin` interface (exports: {exports})"
    )]
    NotAPlugin { plugin: String, path: PathBuf, exports: String },
    #[error("plugin `{plugin}` ({path}) was built for WIT keel:plugin@{found}; this host supports {supported}")]
    UnsupportedWitVersion { plugin: String, path: PathBuf, found: String, supported: String },
    #[error("plugin `{plugin}` ({path}) cannot be linked (it needs an import this host does not provide): {reason}")]
    Link { plugin: String, path: PathBuf, reason: String },
    #[error("plugin {plugin} declares role {role} in its metadata but does not export keel:plugin/{role}")]
    RoleNotExported { plugin: String, role: Role },
    #[error(
        "plugin {plugin} {version}: no free instance slot: {limit} plugin instances are already alive across running jobs (the runtime's pool is full: {reason}); the job can be retried once others finish"
    )]
    PoolExhausted { plugin: String, version: String, limit: u32, reason: String },
    #[error("plugin {plugin} {version}: could not be instantiated: {reason}")]
    Instantiate { plugin: String, version: String, reason: String },
    /// `at`: where the table is (`config.toml:12:7: key `...`: `), empty when not from a file.
    #[error("{at}plugin {plugin} {version}: configuration rejected: {reason}")]
    InvalidConfig { plugin: String, version: String, reason: String, at: String },
    #[error("plugin {plugin} {version} denied ({role}): {reason}")]
    Denied { plugin: String, version: String, role: &'static str, reason: String },
    #[error("plugin {plugin} {version} failed in {call}: {reason}")]
    Internal { plugin: String, version: String, call: &'static str, reason: String },
    #[error("plugin {plugin} {version} crashed (trap) in {call}: {reason}")]
    Trap { plugin: String, version: String, call: &'static str, reason: String },
    #[error("plugin {plugin} {version} exceeded its memory limit of {limit_bytes} bytes in {call}")]
    MemoryLimit { plugin: String, version: String, call: &'static str, limit_bytes: u64 },
    #[error("plugin {plugin} {version} exceeded its time limit of {timeout:?} in {call}")]
    Deadline { plugin: String, version: String, call: &'static str, timeout: Duration },
    #[error("plugin {plugin} {version} returned an invalid result from {call}: {reason}")]
    Malformed { plugin: String, version: String, call: &'static str, reason: String },
    #[error("plugin {plugin} {version} changed host-owned field {field} of the pod (from {before} to {after})")]
    HostOwnedChanged { plugin: String, version: String, field: String, before: String, after: String },
    #[error("plugin {plugin} {version} was stopped earlier in this job ({reason}) and is not called again")]
    Stopped { plugin: String, version: String, reason: String },
    #[error("no execution strategy is bound to the job")]
    NoStrategy,
    #[error("cannot encode {what} for plugins: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("runner config pod_spec[{index}] ({name}): cannot read patch_path {path}")]
    PatchPath {
        index: usize,
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
