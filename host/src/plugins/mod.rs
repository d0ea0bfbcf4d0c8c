//! Plugins: sandboxed WebAssembly components that shape a job's pod and decide policies.
//!
//! Flow: [`Runtime`] (one per process: engine, epoch ticker, compile cache, linker) ->
//! [`Runtime::load`] gives a [`Plugin`] (compiled once, exports checked, `InstancePre` ready) ->
//! per job, [`JobPlugins::new`] instantiates every plugin in a fresh `Store` and configures it ->
//! role calls ([`JobPlugins::overwrites`], [`JobPlugins::pull_policies`],
//! [`JobPlugins::mutate_pod`]) run the plugins having that role in configuration order.
//!
//! Every failure is a [`PluginError`] naming the plugin and its version. A trap (panic, endless
//! loop, memory bomb) stops that plugin's instance for the rest of the job; the next job gets
//! a fresh one, so a misbehaving plugin never takes the host down.

mod cache;
pub mod pool;
mod sandbox;
pub mod strategy_host;
mod validate;
pub mod wit;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use tracing::Instrument;
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Config, Enabled, Engine, PoolConcurrencyLimitError, PoolingAllocationConfig, Store, Trap};

use crate::job::{Job, Overwrites, PullPolicy, Resources};
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
    /// The operator's name for it; used in every error and log line.
    pub name: String,
    pub path: PathBuf,
    /// The plugin's own TOML table; handed to `configure` as JSON.
    pub config: toml::Table,
    pub limits: Limits,
    pub grants: Grants,
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
    #[error("plugin `{plugin}` declares role {role} in its metadata but does not export keel:plugin/{role}")]
    RoleNotExported { plugin: String, role: Role },
    #[error(
        "plugin `{plugin}` {version}: no free instance slot: {limit} plugin instances are already alive across running jobs (the runtime's pool is full: {reason}); the job can be retried once others finish"
    )]
    PoolExhausted { plugin: String, version: String, limit: u32, reason: String },
    #[error("plugin `{plugin}` {version}: could not be instantiated: {reason}")]
    Instantiate { plugin: String, version: String, reason: String },
    #[error("plugin `{plugin}` {version}: configuration rejected: {reason}")]
    InvalidConfig { plugin: String, version: String, reason: String },
    #[error("plugin `{plugin}` {version} denied ({role}): {reason}")]
    Denied { plugin: String, version: String, role: &'static str, reason: String },
    #[error("plugin `{plugin}` {version} failed in {call}: {reason}")]
    Internal { plugin: String, version: String, call: &'static str, reason: String },
    #[error("plugin `{plugin}` {version} crashed (trap) in {call}: {reason}")]
    Trap { plugin: String, version: String, call: &'static str, reason: String },
    #[error("plugin `{plugin}` {version} exceeded its memory limit of {limit_bytes} bytes in {call}")]
    MemoryLimit { plugin: String, version: String, call: &'static str, limit_bytes: u64 },
    #[error("plugin `{plugin}` {version} exceeded its time limit of {timeout:?} in {call}")]
    Deadline { plugin: String, version: String, call: &'static str, timeout: Duration },
    #[error("plugin `{plugin}` {version} returned an invalid result from {call}: {reason}")]
    Malformed { plugin: String, version: String, call: &'static str, reason: String },
    #[error("plugin `{plugin}` {version} changed host-owned field {field} of the pod (from {before} to {after})")]
    HostOwnedChanged { plugin: String, version: String, field: String, before: String, after: String },
    #[error("plugin `{plugin}` {version} was stopped earlier in this job ({reason}) and is not called again")]
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
    /// `None` when the plugin loads in this host; otherwise why not.
    pub load_error: Option<String>,
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
        match &self.load_error {
            None => write!(f, "loads:       yes"),
            Some(e) => write!(f, "loads:       no: {e}"),
        }
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] on its own thread, so deadlines work no
/// matter which (or whether a) tokio runtime the caller uses. Stopped on drop.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Result<Self, PluginError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("keel-epoch".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
                    Ok(rt) => rt,
                    Err(error) => {
                        tracing::error!(%error, "epoch ticker cannot start; plugin deadlines fall back to host timeouts");
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut interval = tokio::time::interval(EPOCH_TICK);
                    // After a stall (suspended VM, overloaded machine) do not fire a burst of
                    // ticks: that would expire every running plugin's deadline at once.
                    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    while !flag.load(Ordering::Relaxed) {
                        interval.tick().await;
                        engine.increment_epoch();
                    }
                });
            })
            .map_err(|e| PluginError::Engine(format!("cannot start the epoch ticker thread: {e}")))?;
        Ok(EpochTicker { stop, thread: Some(thread) })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct RuntimeInner {
    engine: Engine,
    linker: Linker<StoreState>,
    cache: cache::ComponentCache,
    allocation: Allocation,
    _ticker: EpochTicker,
}

/// How the runtime allocates plugin instances (one per plugin per job, plus a short-lived probe
/// while a plugin loads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// wasmtime's on-demand allocator: fresh mappings for every instance, no cap on how many
    /// are alive at once. Slower per job; kept for comparison and for hosts that cannot spare
    /// the address space.
    OnDemand,
    /// wasmtime's pooling allocator: slots reserved once, reused by every job (linear memory
    /// reset in place from its copy-on-write image). At most `plugin_instances` plugin
    /// instances are alive at once across all jobs; beyond that, instantiation fails at once
    /// with [`PluginError::PoolExhausted`] (no waiting, no panic).
    Pooling {
        plugin_instances: u32,
        /// Per linear memory, how many bytes may stay resident between jobs. Pages a job
        /// dirtied within this much are reset in place (only the dirty ones, found with Linux's
        /// PAGEMAP_SCAN where the kernel has it) instead of being unmapped, so the next job
        /// takes no page faults on them. Isolation is the same: every byte is back to its
        /// initial contents before the slot is reused. 0 = unmap everything (wasmtime's default).
        keep_resident_bytes: usize,
    },
}

/// Plugin instances alive at once by default: e.g. 16 concurrent jobs with 4 plugins each.
pub const DEFAULT_PLUGIN_INSTANCES: u32 = 64;
/// A first-party plugin touches a few MiB per job; at most this much stays resident per
/// memory slot (so at most 128 x 4 MiB = 512 MiB in all, once every slot has been used).
pub const DEFAULT_KEEP_RESIDENT: usize = 4 * 1024 * 1024;

impl Default for Allocation {
    fn default() -> Self {
        Allocation::Pooling { plugin_instances: DEFAULT_PLUGIN_INSTANCES, keep_resident_bytes: DEFAULT_KEEP_RESIDENT }
    }
}

/// A Rust wasm32-wasip2 component holds 3 core instances (program, shim, fixup), 1 linear
/// memory and 2 tables; the slots per plugin instance leave room for components built by other
/// toolchains. Memory slots keep wasmtime's default 4 GiB reservation (+ guard) so compiled
/// code needs no bounds checks: the same address space the on-demand allocator maps per live
/// instance, but reserved up front (about 8 GiB of address space, no resident memory, per
/// plugin instance slot). A plugin's own cap is still its `Limits::memory_bytes`, enforced
/// by the store's `ResourceLimiter`.
fn pooling_config(plugin_instances: u32, keep_resident_bytes: usize) -> PoolingAllocationConfig {
    let n = plugin_instances.max(1);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(4))
        .total_memories(n.saturating_mul(2))
        .total_tables(n.saturating_mul(4))
        .total_stacks(n)
        // Rust plugins' function tables exceed the default of 20,000 entries only when huge,
        // but a table slot is cheap (8 bytes per element, reserved not resident).
        .table_elements(100_000)
        .linear_memory_keep_resident(keep_resident_bytes)
        .table_keep_resident(if keep_resident_bytes > 0 { 64 * 1024 } else { 0 })
        .pagemap_scan(Enabled::Auto);
    pool
}

/// The plugin runtime: one per process. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

impl Runtime {
    /// `cache_dir`: where compiled plugins are kept (default `$XDG_CACHE_HOME/keel`,
    /// `~/.cache/keel`).
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, PluginError> {
        Self::with_allocation(cache_dir, pool::from_env(Allocation::default())?)
    }

    /// Like [`Runtime::new`], choosing how plugin instances get their memory.
    pub fn with_allocation(cache_dir: Option<PathBuf>, allocation: Allocation) -> Result<Self, PluginError> {
        // Sized to the address space limit, if any (see `pool`).
        let (engine, allocation) = pool::engine(allocation, || {
            let mut config = Config::new();
            config.epoch_interruption(true);
            config.wasm_component_model(true);
            config
        })?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .and_then(|()| wit::since_v0_1_0::add_host_to_linker(&mut linker))
            .map_err(|e| PluginError::Engine(format!("cannot define host imports: {e:#}")))?;
        let cache = cache::ComponentCache::new(&engine, cache_dir.unwrap_or_else(cache::default_dir))?;
        let ticker = EpochTicker::start(engine.clone())?;
        Ok(Runtime { inner: Arc::new(RuntimeInner { engine, linker, cache, allocation, _ticker: ticker }) })
    }

    pub fn cache_dir(&self) -> &Path {
        self.inner.cache.dir()
    }

    /// Compile (or fetch from the cache) the component at `path`.
    fn component(&self, plugin: &str, path: &Path) -> Result<(Component, CompileSource, u64), PluginError> {
        let bytes = crate::config::read_regular_file(path, MAX_COMPONENT_BYTES)
            .map_err(|source| PluginError::Read { plugin: plugin.to_string(), path: path.to_path_buf(), source })?;
        let engine = &self.inner.engine;
        let compile_err =
            |reason: String| PluginError::Compile { plugin: plugin.to_string(), path: path.to_path_buf(), reason };
        let (component, source) =
            self.inner.cache.get_or_compile(engine, &bytes, || Component::new(engine, &bytes)).map_err(
                |e| match e {
                    cache::CompileOrCache::Compile(e) => compile_err(format!("{e:#}")),
                    cache::CompileOrCache::Cache(e) => PluginError::Cache(e),
                },
            )?;
        Ok((component, source, bytes.len() as u64))
    }

    /// Compile, link and probe a plugin: after this, per-job instantiation is cheap.
    pub async fn load(&self, spec: PluginSpec) -> Result<Plugin, PluginError> {
        let started = Instant::now();
        let (component, source, _) = self.component(&spec.name, &spec.path)?;
        let plugin = self.prepare(spec, component).await?;
        tracing::debug!(
            plugin.name = &*plugin.inner.name,
            plugin.version = %plugin.inner.version,
            plugin.compile = ?source,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "plugin loaded"
        );
        Ok(plugin)
    }

    async fn prepare(&self, spec: PluginSpec, component: Component) -> Result<Plugin, PluginError> {
        let engine = &self.inner.engine;
        let scan = wit::ExportScan::of(engine, &component);
        let Some(found) = scan.plugin_version.clone() else {
            return Err(PluginError::NotAPlugin {
                plugin: spec.name,
                path: spec.path,
                exports: scan.exports.join(", "),
            });
        };
        let Some(wit_version) = scan.version() else {
            return Err(PluginError::UnsupportedWitVersion {
                plugin: spec.name,
                path: spec.path,
                found,
                supported: wit::WitVersion::supported_list(),
            });
        };
        let pre = self.inner.linker.instantiate_pre(&component).map_err(|e| PluginError::Link {
            plugin: spec.name.clone(),
            path: spec.path.clone(),
            reason: format!("{e:#}"),
        })?;
        let indices = match wit_version {
            wit::WitVersion::V0_1_0 => latest::Indices::new(&pre, |iface| scan.exports_role(iface)),
        }
        .map_err(|e| PluginError::Link {
            plugin: spec.name.clone(),
            path: spec.path.clone(),
            reason: format!("{e:#}"),
        })?;
        let config_json = serde_json::to_string(&spec.config)
            .map_err(|source| PluginError::Encode { what: "plugin config", source })?;
        let mut inner = PluginInner {
            name: Arc::from(spec.name.as_str()),
            self_name: String::new(),
            version: "?".to_string(),
            path: spec.path,
            config_json,
            limits: spec.limits,
            grants: spec.grants,
            pre,
            indices,
            wit_version,
            roles: Vec::new(),
        };
        // Ask the plugin who it is, in a throwaway instance, so errors from now on can name
        // its version and the host knows which of the exported roles are real.
        let mut probe = Instance::new(&inner, self.inner.allocation, None, None).await?;
        let meta = probe.metadata(&inner).await?;
        // Both appear in every error and log line about the plugin.
        inner.version = sandbox::plugin_text(&meta.version, 128);
        inner.self_name = sandbox::plugin_text(&meta.name, 128);
        let exported = inner.indices.exported_roles();
        for role in meta.roles {
            if !exported.contains(&role) {
                return Err(PluginError::RoleNotExported {
                    plugin: inner.name.to_string(),
                    role: Role::from_wit(role),
                });
            }
            let role = Role::from_wit(role);
            if !inner.roles.contains(&role) {
                inner.roles.push(role);
            }
        }
        if inner.self_name != *inner.name {
            tracing::debug!(plugin.name = &*inner.name, plugin.self_name = %inner.self_name, "plugin calls itself differently");
        }
        Ok(Plugin { inner: Arc::new(inner) })
    }

    /// What a component is and whether it would load, for `host plugin inspect`.
    pub async fn inspect(&self, path: &Path) -> Result<Inspection, PluginError> {
        let label = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let (component, source, size_bytes) = self.component(&label, path)?;
        let scan = wit::ExportScan::of(&self.inner.engine, &component);
        let mut inspection = Inspection {
            path: path.to_path_buf(),
            size_bytes,
            wit_version: scan.plugin_version.clone(),
            exported_roles: scan.role_exports.iter().map(|(name, _)| name.clone()).collect(),
            name: None,
            version: None,
            roles: Vec::new(),
            imports: scan.imports.clone(),
            exports: scan.exports.clone(),
            compile: Some(source),
            load_error: None,
        };
        let spec = PluginSpec { name: label, path: path.to_path_buf(), ..PluginSpec::default() };
        match self.prepare(spec, component).await {
            Ok(plugin) => {
                inspection.name = Some(plugin.inner.self_name.clone());
                inspection.version = Some(plugin.inner.version.clone());
                inspection.roles = plugin.inner.roles.clone();
            }
            Err(error) => inspection.load_error = Some(error.to_string()),
        }
        Ok(inspection)
    }
}

struct PluginInner {
    name: Arc<str>,
    /// The name the plugin gives itself in its metadata (the operator's `name` may differ).
    self_name: String,
    version: String,
    path: PathBuf,
    config_json: String,
    limits: Limits,
    grants: Grants,
    pre: InstancePre<StoreState>,
    indices: latest::Indices,
    /// Which bindings its instances' exports are loaded with (see `wit::Exports`).
    wit_version: wit::WitVersion,
    roles: Vec<Role>,
}

/// A loaded plugin: compiled, linked, ready to be instantiated per job. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.inner.name)
            .field("version", &self.inner.version)
            .field("path", &self.inner.path)
            .field("roles", &self.inner.roles)
            .finish()
    }
}

impl Plugin {
    pub fn name(&self) -> &str {
        &self.inner.name
    }
    /// The version the plugin reports in its metadata.
    pub fn version(&self) -> &str {
        &self.inner.version
    }
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
    /// Roles the host will call (exported and declared).
    pub fn roles(&self) -> &[Role] {
        &self.inner.roles
    }
    pub fn has_role(&self, role: Role) -> bool {
        self.inner.roles.contains(&role)
    }
}

/// One plugin's instance within one job.
struct Instance {
    store: Store<StoreState>,
    exports: wit::Exports,
    /// Set after a trap or deadline: the instance's state is unknown, so it is never called again.
    stopped: Option<String>,
    /// The context this plugin may see (secrets redacted unless granted).
    ctx: Option<Arc<latest::Context>>,
}

impl Instance {
    async fn new(
        plugin: &PluginInner,
        allocation: Allocation,
        ctx: Option<Arc<latest::Context>>,
        strategy: Option<Arc<StrategyServices>>,
    ) -> Result<Self, PluginError> {
        let mut store =
            Store::new(plugin.pre.engine(), StoreState::new(plugin.name.clone(), plugin.limits.memory_bytes));
        store.limiter(|state| &mut state.limiter);
        // The CPU budget of a call counts time inside wasm: a host call that returned (a
        // strategy waited on the cluster) renews it; otherwise reaching the deadline traps.
        let ticks = deadline_ticks(plugin.limits.call_timeout);
        store.epoch_deadline_callback(move |mut ctx| {
            let state = ctx.data_mut();
            if std::mem::take(&mut state.renew_deadline) {
                Ok(wasmtime::UpdateDeadline::Continue(ticks))
            } else {
                Err(wasmtime::Error::new(Trap::Interrupt))
            }
        });
        store.set_epoch_deadline(ticks);
        store.data_mut().strategy = strategy;
        let instantiate = plugin.pre.instantiate_async(&mut store);
        let instance = match tokio::time::timeout(plugin.limits.call_timeout + EPOCH_TICK * 10, instantiate).await {
            Ok(Ok(instance)) => instance,
            Ok(Err(e)) if e.downcast_ref::<PoolConcurrencyLimitError>().is_some() => {
                let limit = match allocation {
                    Allocation::Pooling { plugin_instances, .. } => plugin_instances,
                    Allocation::OnDemand => 0,
                };
                return Err(PluginError::PoolExhausted {
                    plugin: plugin.name.to_string(),
                    version: plugin.version.clone(),
                    limit,
                    reason: format!("{e:#}"),
                });
            }
            Ok(Err(e)) => {
                return Err(PluginError::Instantiate {
                    plugin: plugin.name.to_string(),
                    version: plugin.version.clone(),
                    reason: format!("{e:#}"),
                });
            }
            Err(_) => {
                return Err(PluginError::Deadline {
                    plugin: plugin.name.to_string(),
                    version: plugin.version.clone(),
                    call: "instantiate",
                    timeout: plugin.limits.call_timeout,
                });
            }
        };
        let exports = match plugin.wit_version {
            wit::WitVersion::V0_1_0 => plugin.indices.load(&mut store, &instance).map(wit::Exports::V0_1_0),
        }
        .map_err(|e| PluginError::Instantiate {
            plugin: plugin.name.to_string(),
            version: plugin.version.clone(),
            reason: format!("{e:#}"),
        })?;
        Ok(Instance { store, exports, stopped: None, ctx })
    }

    /// Prepares a call: refuses a stopped instance and gives the call a fresh CPU deadline.
    fn arm(&mut self, plugin: &PluginInner) -> Result<(), PluginError> {
        if let Some(reason) = &self.stopped {
            return Err(PluginError::Stopped {
                plugin: plugin.name.to_string(),
                version: plugin.version.clone(),
                reason: reason.clone(),
            });
        }
        self.store.data_mut().renew_deadline = false;
        self.store.set_epoch_deadline(deadline_ticks(plugin.limits.call_timeout));
        Ok(())
    }

    /// Turns the outcome of a guest call into a result, classifying traps by cause and
    /// stopping the instance when its state can no longer be trusted.
    fn settle<T>(
        &mut self,
        plugin: &PluginInner,
        call: &'static str,
        outcome: Result<wasmtime::Result<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, PluginError> {
        let name = plugin.name.to_string();
        let version = plugin.version.clone();
        let error = match outcome {
            Ok(Ok(value)) => return Ok(value),
            Err(_) => PluginError::Deadline { plugin: name, version, call, timeout: plugin.limits.call_timeout },
            Ok(Err(e)) => {
                if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
                    PluginError::Deadline { plugin: name, version, call, timeout: plugin.limits.call_timeout }
                } else if self.store.data().limiter.was_exceeded() {
                    // The limiter's limit: the configured one, or less under an address space limit.
                    let limit_bytes = self.store.data().limiter.limit;
                    PluginError::MemoryLimit { plugin: name, version, call, limit_bytes }
                } else {
                    let mut reason = sandbox::describe_trap(&e);
                    // A Rust panic prints its message to stderr just before the abort trap;
                    // that message is what the author needs to see.
                    if let Some(last) = self.store.data().stderr_tail() {
                        reason = format!("{reason}; plugin stderr: {last}");
                    }
                    PluginError::Trap { plugin: name, version, call, reason }
                }
            }
        };
        self.stopped = Some(error.to_string());
        Err(error)
    }

    async fn metadata(&mut self, plugin: &PluginInner) -> Result<latest::PluginInfo, PluginError> {
        self.arm(plugin)?;
        let wit::Exports::V0_1_0(exports) = &self.exports;
        let call = exports.plugin.call_metadata(&mut self.store);
        let outcome = tokio::time::timeout(host_timeout(&plugin.limits), call).await;
        self.settle(plugin, "plugin.metadata", outcome)
    }

    async fn configure(&mut self, plugin: &PluginInner) -> Result<(), PluginError> {
        self.arm(plugin)?;
        let wit::Exports::V0_1_0(exports) = &self.exports;
        let call = exports.plugin.call_configure(&mut self.store, &plugin.config_json);
        let outcome = tokio::time::timeout(host_timeout(&plugin.limits), call).await;
        let result = self.settle(plugin, "plugin.configure", outcome)?;
        result.map_err(|e| guest_error(plugin, "plugin", "plugin.configure", e))
    }
}

/// Epoch ticks for a call budget; at least one so a zero timeout still means "stop at once".
fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
}

/// The host-side timeout sits a little beyond the epoch deadline, so a plugin stuck in
/// guest code is reported by the (more precise) epoch trap and this only catches host waits.
fn host_timeout(limits: &Limits) -> Duration {
    limits.call_timeout + EPOCH_TICK * 10
}

fn no_context(plugin: &PluginInner) -> PluginError {
    PluginError::Internal {
        plugin: plugin.name.to_string(),
        version: plugin.version.clone(),
        call: "role call",
        reason: "the instance was made without a job context".into(),
    }
}

fn not_exported(plugin: &PluginInner, role: Role) -> PluginError {
    PluginError::RoleNotExported { plugin: plugin.name.to_string(), role }
}

fn guest_error(plugin: &PluginInner, role: &'static str, call: &'static str, e: latest::PluginError) -> PluginError {
    let name = plugin.name.to_string();
    let version = plugin.version.clone();
    // The plugin's own words, escaped and cut: they end up in host log lines.
    let text = |reason: String| sandbox::plugin_text(&reason, sandbox::MAX_PLUGIN_TEXT);
    let e = match e {
        latest::PluginError::Denied(r) => latest::PluginError::Denied(text(r)),
        latest::PluginError::InvalidConfig(r) => latest::PluginError::InvalidConfig(text(r)),
        latest::PluginError::Internal(r) => latest::PluginError::Internal(text(r)),
    };
    match e {
        latest::PluginError::Denied(reason) => PluginError::Denied { plugin: name, version, role, reason },
        latest::PluginError::InvalidConfig(reason) => PluginError::InvalidConfig { plugin: name, version, reason },
        latest::PluginError::Internal(reason) => PluginError::Internal { plugin: name, version, call, reason },
    }
}

/// The outcome of the overwrite rules.
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(clippy::large_enum_variant, reason = "one value per job, moved once; boxing buys nothing")]
pub enum OverwriteDecision {
    /// No loaded plugin has the `overwrites` role. Deny by default: the caller must treat
    /// every requested overwrite as refused (see [`OverwriteDecision::accepted_or_none`]).
    NoRulesLoaded,
    /// The overwrites every rule plugin accepted (each saw the previous one's result).
    Accepted(Overwrites),
}

impl OverwriteDecision {
    /// Accepted overwrites; nothing at all when no rules are loaded.
    pub fn accepted_or_none(self) -> Overwrites {
        match self {
            OverwriteDecision::NoRulesLoaded => Overwrites::default(),
            OverwriteDecision::Accepted(o) => o,
        }
    }
}

/// One job's plugin instances, each in its own fresh store, configured and ready.
pub struct JobPlugins {
    job_id: u64,
    members: Vec<(Plugin, Instance)>,
    /// Index in `members` of the job's execution strategy, if one was bound.
    strategy: Option<usize>,
}

/// The execution strategy a job runs its stages with, and the pod access it gets.
pub struct StrategyBinding {
    pub plugin: Plugin,
    pub services: Arc<StrategyServices>,
}

impl JobPlugins {
    /// Instantiates and configures every plugin for `job`. `runner_config` is the runner's
    /// `[runners.kubernetes]` table as JSON; `pod_spec[].patch_path` entries still in it are
    /// resolved here, relative to the current directory (see [`resolve_patch_paths`]).
    pub async fn new(
        rt: &Runtime,
        plugins: &[Plugin],
        job: &Job,
        runner_config: &serde_json::Value,
    ) -> Result<Self, PluginError> {
        Self::with_strategy(rt, plugins, job, runner_config, None).await
    }

    /// Like [`JobPlugins::new`], binding `strategy` as the job's execution strategy (added to
    /// the members if it is not one of `plugins`); only it gets pod access.
    pub async fn with_strategy(
        rt: &Runtime,
        plugins: &[Plugin],
        job: &Job,
        runner_config: &serde_json::Value,
        strategy: Option<StrategyBinding>,
    ) -> Result<Self, PluginError> {
        let mut runner_config = runner_config.clone();
        resolve_patch_paths(&mut runner_config, Path::new("."))?;
        let runner_json = serde_json::to_string(&runner_config)
            .map_err(|source| PluginError::Encode { what: "runner config", source })?;
        let redacted = Arc::new(convert::context(job, &runner_json, false));
        let full = Arc::new(convert::context(job, &runner_json, true));
        let mut members = Vec::with_capacity(plugins.len() + 1);
        let mut all: Vec<Plugin> = plugins.to_vec();
        let strategy_index = strategy.as_ref().map(|b| match all.iter().position(|p| Arc::ptr_eq(&p.inner, &b.plugin.inner)) {
            Some(i) => i,
            None => {
                all.push(b.plugin.clone());
                all.len() - 1
            }
        });
        for (index, plugin) in all.iter().enumerate() {
            let ctx = if plugin.inner.grants.secrets { full.clone() } else { redacted.clone() };
            // Only the job's strategy reaches the pod; other plugins' strategy-host calls are refused.
            let services = match (&strategy, strategy_index) {
                (Some(b), Some(i)) if i == index => Some(b.services.clone()),
                _ => None,
            };
            let span = tracing::info_span!(
                "plugin.call",
                plugin.name = plugin.name(),
                plugin.role = "plugin",
                job.id = job.id
            );
            let mut instance =
                Instance::new(&plugin.inner, rt.inner.allocation, Some(ctx), services).instrument(span.clone()).await?;
            instance.configure(&plugin.inner).instrument(span).await?;
            members.push((plugin.clone(), instance));
        }
        Ok(JobPlugins { job_id: job.id, members, strategy: strategy_index })
    }

    /// The bound strategy plugin.
    pub fn strategy(&self) -> Option<&Plugin> {
        self.strategy.map(|i| &self.members[i].0)
    }

    /// The strategy's `prepare`: its own pod changes, checked like a mutator's.
    pub async fn strategy_prepare(&mut self, pod: Pod, rules: &HostOwned) -> Result<Pod, PluginError> {
        let Some(index) = self.strategy else { return Ok(pod) };
        let baseline = validate::Snapshot::of(&pod, rules);
        let json = serde_json::to_string(&pod).map_err(|source| PluginError::Encode { what: "pod", source })?;
        let output = self
            .call_role(index, Role::ExecutionStrategy, "execution-strategy.prepare", None, json.as_str(), |ex, store, ctx, pod| {
                Box::pin(async move {
                    match ex {
                        wit::Exports::V0_1_0(e) => Some(e.execution_strategy.as_ref()?.call_prepare(store, ctx, pod).await),
                    }
                })
            })
            .await?;
        baseline.check(&output).map_err(|violation| violation.into_error(&self.members[index].0.inner))
    }

    /// The strategy's `run-stage`: may last as long as `timeout` (the stage's own), waiting on
    /// the cluster through host calls; the CPU budget inside wasm is still the plugin's.
    pub async fn run_stage(&mut self, name: &str, script: &str, timeout: Duration) -> Result<i32, PluginError> {
        let Some(index) = self.strategy else {
            return Err(PluginError::NoStrategy);
        };
        let stage = latest::Stage { name: name.to_string(), script: script.to_string() };
        self.call_role(index, Role::ExecutionStrategy, "execution-strategy.run-stage", Some(timeout), &stage, |ex, store, ctx, stage| {
            Box::pin(async move {
                match ex {
                    wit::Exports::V0_1_0(e) => Some(e.execution_strategy.as_ref()?.call_run_stage(store, ctx, stage).await),
                }
            })
        })
        .instrument(tracing::info_span!("stage", stage = name))
        .await
    }

    /// One role call on member `index`, the same for every role: a span with the plugin's
    /// name, a fresh CPU budget, the host-side timeout (the call's own limit, plus `extra` for
    /// calls that wait on the cluster), traps classified, and the plugin's own errors wrapped
    /// with its name and version. `f` makes the call on the instance's exports — the one place
    /// that matches on the WIT version the plugin was built for — and returns `None` when the
    /// component does not export the role's interface.
    async fn call_role<A: Sync + ?Sized, R>(
        &mut self,
        index: usize,
        role: Role,
        call: &'static str,
        extra: Option<Duration>,
        arg: &A,
        f: impl for<'a> FnOnce(
            &'a wit::Exports,
            &'a mut Store<StoreState>,
            &'a latest::Context,
            &'a A,
        ) -> futures::future::BoxFuture<'a, Option<wasmtime::Result<Result<R, latest::PluginError>>>>,
    ) -> Result<R, PluginError> {
        let job_id = self.job_id;
        let (plugin, instance) = &mut self.members[index];
        let p = &*plugin.inner;
        let span = tracing::info_span!("plugin.call", plugin.name = &*p.name, plugin.role = role.as_str(), job.id = job_id);
        async {
            instance.arm(p)?;
            let ctx = instance.ctx.clone().ok_or_else(|| no_context(p))?;
            let limit = host_timeout(&p.limits) + extra.unwrap_or_default();
            let Instance { exports, store, .. } = instance;
            let outcome = match tokio::time::timeout(limit, f(&*exports, store, &ctx, arg)).await {
                Ok(Some(result)) => Ok(result),
                Ok(None) => return Err(not_exported(p, role)),
                Err(elapsed) => Err(elapsed),
            };
            let result = instance.settle(p, call, outcome)?;
            result.map_err(|e| guest_error(p, role.as_str(), call, e))
        }
        .instrument(span)
        .await
    }

    /// Members having `role`, in configuration order.
    fn with_role(&self, role: Role) -> Vec<usize> {
        (0..self.members.len()).filter(|&i| self.members[i].0.has_role(role)).collect()
    }

    pub fn has_role(&self, role: Role) -> bool {
        self.members.iter().any(|(p, _)| p.has_role(role))
    }

    /// Runs the overwrite rules in configuration order; each sees what the previous accepted.
    pub async fn overwrites(&mut self, requested: Overwrites) -> Result<OverwriteDecision, PluginError> {
        let rules = self.with_role(Role::Overwrites);
        if rules.is_empty() {
            return Ok(OverwriteDecision::NoRulesLoaded);
        }
        let mut current = convert::overwrites_to_wit(&requested);
        for index in rules {
            current = self
                .call_role(index, Role::Overwrites, "overwrites.review", None, &current, |ex, store, ctx, current| {
                    Box::pin(async move {
                        match ex {
                            wit::Exports::V0_1_0(e) => Some(e.overwrites.as_ref()?.call_review(store, ctx, current).await),
                        }
                    })
                })
                .await?;
            validate::check_overwrites(&current, &self.members[index].0.inner)?;
        }
        Ok(OverwriteDecision::Accepted(convert::overwrites_from_wit(current)))
    }

    /// Asks the pull-policy plugins, in configuration order, which policies `image` gets.
    /// Each later plugin receives the previous answer as the job's request, so it can only
    /// narrow or reorder. `None`: no plugin has the role; the caller applies its own default.
    pub async fn pull_policies(
        &mut self,
        image: &str,
        job: &[PullPolicy],
        config: &[PullPolicy],
        allowed: &[PullPolicy],
    ) -> Result<Option<Vec<PullPolicy>>, PluginError> {
        let deciders = self.with_role(Role::PullPolicy);
        if deciders.is_empty() {
            return Ok(None);
        }
        let mut request = latest::PullPolicyRequest {
            image: image.to_string(),
            job: job.iter().copied().map(convert::pull_policy_to_wit).collect(),
            config: config.iter().copied().map(convert::pull_policy_to_wit).collect(),
            allowed: allowed.iter().copied().map(convert::pull_policy_to_wit).collect(),
        };
        for index in deciders {
            request.job = self
                .call_role(index, Role::PullPolicy, "pull-policy.decide", None, &request, |ex, store, ctx, request| {
                    Box::pin(async move {
                        match ex {
                            wit::Exports::V0_1_0(e) => Some(e.pull_policy.as_ref()?.call_decide(store, ctx, request).await),
                        }
                    })
                })
                .await?;
        }
        Ok(Some(request.job.into_iter().map(convert::pull_policy_from_wit).collect()))
    }

    /// Runs the pod mutators in configuration order, each on the previous one's output, and
    /// checks every result (still a Pod, `build` container kept, host-owned fields unchanged).
    pub async fn mutate_pod(&mut self, pod: Pod, rules: &HostOwned) -> Result<Pod, PluginError> {
        let mutators = self.with_role(Role::PodMutator);
        if mutators.is_empty() {
            return Ok(pod);
        }
        let baseline = validate::Snapshot::of(&pod, rules);
        let mut current = pod;
        let mut json = serde_json::to_string(&current).map_err(|source| PluginError::Encode { what: "pod", source })?;
        for index in mutators {
            let output = self
                .call_role(index, Role::PodMutator, "pod-mutator.mutate", None, json.as_str(), |ex, store, ctx, pod| {
                    Box::pin(async move {
                        match ex {
                            wit::Exports::V0_1_0(e) => Some(e.pod_mutator.as_ref()?.call_mutate(store, ctx, pod).await),
                        }
                    })
                })
                .await?;
            current = baseline.check(&output).map_err(|violation| violation.into_error(&self.members[index].0.inner))?;
            json = output;
        }
        Ok(current)
    }
}

/// Replaces every `pod_spec[].patch_path` in the runner config by `patch` holding the file's
/// text. Plugins have no file system access (deny by default), so the host reads the file,
/// with the host's permissions, before the config crosses into the sandbox. Relative paths are
/// resolved against `base` (the directory of the config file, when the caller knows it).
pub fn resolve_patch_paths(runner_config: &mut serde_json::Value, base: &Path) -> Result<(), PluginError> {
    let Some(entries) = runner_config.get_mut("pod_spec").and_then(|v| v.as_array_mut()) else {
        return Ok(());
    };
    for (index, entry) in entries.iter_mut().enumerate() {
        let Some(obj) = entry.as_object_mut() else { continue };
        let Some(path) = obj.get("patch_path").and_then(|p| p.as_str()).map(PathBuf::from) else { continue };
        let path = if path.is_absolute() { path } else { base.join(path) };
        let name = obj.get("name").and_then(|n| n.as_str()).unwrap_or("").to_string();
        let text = std::fs::read_to_string(&path).map_err(|source| PluginError::PatchPath {
            index,
            name,
            path: path.clone(),
            source,
        })?;
        obj.remove("patch_path");
        obj.insert("patch".into(), serde_json::Value::String(text));
    }
    Ok(())
}

/// Conversions between the host's job types and the latest WIT types.
mod convert {
    use super::*;

    pub fn pull_policy_to_wit(p: PullPolicy) -> latest::PullPolicy {
        match p {
            PullPolicy::Always => latest::PullPolicy::Always,
            PullPolicy::IfNotPresent => latest::PullPolicy::IfNotPresent,
            PullPolicy::Never => latest::PullPolicy::Never,
        }
    }

    pub fn pull_policy_from_wit(p: latest::PullPolicy) -> PullPolicy {
        match p {
            latest::PullPolicy::Always => PullPolicy::Always,
            latest::PullPolicy::IfNotPresent => PullPolicy::IfNotPresent,
            latest::PullPolicy::Never => PullPolicy::Never,
        }
    }

    fn image(i: &crate::job::Image) -> latest::Image {
        latest::Image {
            name: i.name.clone(),
            entrypoint: i.entrypoint.clone(),
            pull_policies: i.pull_policy.iter().copied().map(pull_policy_to_wit).collect(),
        }
    }

    /// `secrets`: whether values of non-public variables are handed over in clear.
    pub fn context(job: &Job, runner_config: &str, secrets: bool) -> latest::Context {
        latest::Context {
            job: latest::Job {
                id: job.id,
                name: job.name.clone(),
                image: image(&job.image),
                services: job
                    .services
                    .iter()
                    .map(|s| latest::Service {
                        image: image(&s.image),
                        alias: s.alias.clone(),
                        command: s.command.clone(),
                    })
                    .collect(),
                variables: job
                    .variables
                    .iter()
                    .map(|v| latest::Variable {
                        key: v.key.clone(),
                        value: (v.public || secrets).then(|| v.value.clone()),
                        masked: v.masked,
                        public: v.public,
                        file: v.file,
                    })
                    .collect(),
                stages: job.stages.iter().map(|s| s.name.clone()).collect(),
            },
            runner_config: runner_config.to_string(),
        }
    }

    fn map_to_wit(m: &BTreeMap<String, String>) -> Vec<latest::KeyValue> {
        m.iter().map(|(k, v)| latest::KeyValue { key: k.clone(), value: v.clone() }).collect()
    }

    fn map_from_wit(list: Vec<latest::KeyValue>) -> BTreeMap<String, String> {
        list.into_iter().map(|kv| (kv.key, kv.value)).collect()
    }

    fn resources_to_wit(r: &Resources) -> latest::Resources {
        latest::Resources {
            cpu_request: r.cpu_request.clone(),
            cpu_limit: r.cpu_limit.clone(),
            memory_request: r.memory_request.clone(),
            memory_limit: r.memory_limit.clone(),
            ephemeral_storage_request: r.ephemeral_storage_request.clone(),
            ephemeral_storage_limit: r.ephemeral_storage_limit.clone(),
        }
    }

    fn resources_from_wit(r: latest::Resources) -> Resources {
        Resources {
            cpu_request: r.cpu_request,
            cpu_limit: r.cpu_limit,
            memory_request: r.memory_request,
            memory_limit: r.memory_limit,
            ephemeral_storage_request: r.ephemeral_storage_request,
            ephemeral_storage_limit: r.ephemeral_storage_limit,
        }
    }

    pub fn overwrites_to_wit(o: &Overwrites) -> latest::Overwrites {
        latest::Overwrites {
            namespace: o.namespace.clone(),
            service_account: o.service_account.clone(),
            bearer_token: o.bearer_token.clone(),
            pod_labels: map_to_wit(&o.pod_labels),
            pod_annotations: map_to_wit(&o.pod_annotations),
            node_selector: map_to_wit(&o.node_selector),
            node_tolerations: map_to_wit(&o.node_tolerations),
            build: resources_to_wit(&o.build),
            helper: resources_to_wit(&o.helper),
            service: resources_to_wit(&o.service),
        }
    }

    pub fn overwrites_from_wit(o: latest::Overwrites) -> Overwrites {
        Overwrites {
            namespace: o.namespace,
            service_account: o.service_account,
            bearer_token: o.bearer_token,
            pod_labels: map_from_wit(o.pod_labels),
            pod_annotations: map_from_wit(o.pod_annotations),
            node_selector: map_from_wit(o.node_selector),
            node_tolerations: map_from_wit(o.node_tolerations),
            build: resources_from_wit(o.build),
            helper: resources_from_wit(o.helper),
            service: resources_from_wit(o.service),
        }
    }
}
