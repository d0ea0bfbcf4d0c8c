//! The runtime: one engine, epoch ticker, compile cache and linker per process; loading a
//! plugin compiles (or fetches) it, links it and asks it who it is.

use super::*;

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

pub(crate) struct RuntimeInner {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<StoreState>,
    pub(crate) cache: cache::ComponentCache,
    pub(crate) allocation: Allocation,
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
pub(crate) fn pooling_config(plugin_instances: u32, keep_resident_bytes: usize) -> PoolingAllocationConfig {
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
    pub(crate) inner: Arc<RuntimeInner>,
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
        let bytes = crate::input::read_regular_file(path, MAX_COMPONENT_BYTES).map_err(|source| PluginError::Read {
            plugin: plugin.to_string(),
            path: path.to_path_buf(),
            source,
        })?;
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
        let (component, source, _) = self.component(&load_label(&spec), &spec.path)?;
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
        let (inner, mut probe) = self.identify(spec, component).await?;
        // The configuration is checked now, not when the first job starts: a table the plugin
        // rejects fails the load (and `host plugin inspect --config`) with the file and line
        // of the table. Kubewarden validates policy settings at load for the same reason. The
        // probe is a fresh instance, so configuring it leaves nothing behind for jobs.
        probe.configure(&inner).await?;
        Ok(Plugin { inner: Arc::new(inner) })
    }

    /// Compile-time checks, link, and the plugin's metadata from a probe instance (returned,
    /// not yet configured).
    async fn identify(&self, spec: PluginSpec, component: Component) -> Result<(PluginInner, Instance), PluginError> {
        let engine = &self.inner.engine;
        let label = load_label(&spec);
        let scan = wit::ExportScan::of(engine, &component);
        let Some(found) = scan.plugin_version.clone() else {
            return Err(PluginError::NotAPlugin { plugin: label, path: spec.path, exports: scan.exports.join(", ") });
        };
        let Some(wit_version) = scan.version() else {
            return Err(PluginError::UnsupportedWitVersion {
                plugin: label,
                path: spec.path,
                found,
                supported: wit::WitVersion::supported_list(),
            });
        };
        let pre = self.inner.linker.instantiate_pre(&component).map_err(|e| PluginError::Link {
            plugin: label.clone(),
            path: spec.path.clone(),
            reason: format!("{e:#}"),
        })?;
        let indices = match wit_version {
            wit::WitVersion::V0_1_0 => latest::Indices::new(&pre, |iface| scan.exports_role(iface)),
        }
        .map_err(|e| PluginError::Link {
            plugin: label.clone(),
            path: spec.path.clone(),
            reason: format!("{e:#}"),
        })?;
        let config_json = serde_json::to_string(&spec.config)
            .map_err(|source| PluginError::Encode { what: "plugin config", source })?;
        let mut inner = PluginInner {
            name: Arc::from(label.as_str()),
            self_name: String::new(),
            version: "?".to_string(),
            path: spec.path,
            config_json,
            origin: spec.origin,
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
        // The name users see is the plugin's own, unless the operator's config gives one.
        if spec.name.is_empty() && !inner.self_name.is_empty() {
            inner.name = Arc::from(inner.self_name.as_str());
        }
        let exported = inner.indices.exported_roles();
        for role in meta.roles {
            if !exported.contains(&role) {
                return Err(PluginError::RoleNotExported { plugin: inner.label(), role: Role::from_wit(role) });
            }
            let role = Role::from_wit(role);
            if !inner.roles.contains(&role) {
                inner.roles.push(role);
            }
        }
        Ok((inner, probe))
    }

    /// What a component is and whether it would load, for `host plugin inspect`.
    pub async fn inspect(&self, path: &Path) -> Result<Inspection, PluginError> {
        self.inspect_spec(PluginSpec { path: path.to_path_buf(), ..PluginSpec::default() }).await
    }

    /// Like [`Runtime::inspect`], loading the plugin as `spec` configures it: its name,
    /// limits and configuration table (`host plugin inspect --config`), so a table the plugin
    /// rejects shows as "loads: no" with the table's file and line.
    pub async fn inspect_spec(&self, spec: PluginSpec) -> Result<Inspection, PluginError> {
        let path = spec.path.clone();
        let path = path.as_path();
        let (component, source, size_bytes) = self.component(&load_label(&spec), path)?;
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
            configured_as: (!spec.name.is_empty()).then(|| spec.name.clone()),
            needs_config: None,
            config_origin: spec.origin.as_ref().map(|o| format!("{}:{}:{}", o.path.display(), o.line, o.column)),
        };
        // Without a configuration to check, a plugin that needs one still loads: the empty
        // table's rejection is shown as a note, not as "loads: no".
        let configured = spec.origin.is_some() || !spec.config.is_empty();
        match self.identify(spec, component).await {
            Ok((inner, mut probe)) => {
                inspection.name = Some(inner.self_name.clone());
                inspection.version = Some(inner.version.clone());
                inspection.roles = inner.roles.clone();
                match probe.configure(&inner).await {
                    Ok(()) => {}
                    Err(PluginError::InvalidConfig { reason, .. }) if !configured => {
                        inspection.needs_config = Some(reason);
                    }
                    Err(error) => inspection.load_error = Some(error.to_string()),
                }
            }
            Err(error) => inspection.load_error = Some(error.to_string()),
        }
        Ok(inspection)
    }
}

/// What a plugin is called before its metadata is known: the operator's name, else the file stem.
fn load_label(spec: &PluginSpec) -> String {
    if spec.name.is_empty() {
        spec.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    } else {
        spec.name.clone()
    }
}

pub(crate) struct PluginInner {
    /// The name users see: the config's `name`, else the plugin's own (metadata).
    pub(crate) name: Arc<str>,
    /// The name the plugin gives itself in its metadata (the operator's `name` may differ).
    pub(crate) self_name: String,
    pub(crate) version: String,
    pub(crate) path: PathBuf,
    pub(crate) config_json: String,
    pub(crate) origin: Option<ConfigOrigin>,
    pub(crate) limits: Limits,
    pub(crate) grants: Grants,
    pub(crate) pre: InstancePre<StoreState>,
    pub(crate) indices: latest::Indices,
    /// Which bindings its instances' exports are loaded with (see `wit::Exports`).
    pub(crate) wit_version: wit::WitVersion,
    pub(crate) roles: Vec<Role>,
}

/// A loaded plugin: compiled, linked, ready to be instantiated per job. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    pub(crate) inner: Arc<PluginInner>,
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

impl PluginInner {
    /// How errors name the plugin: `` `name` ``, or `` `name` (own-name) `` when the operator's
    /// name differs from the one in the plugin's metadata, so both can be searched for.
    pub(crate) fn label(&self) -> String {
        if self.self_name.is_empty() || self.self_name == *self.name {
            format!("`{}`", self.name)
        } else {
            format!("`{}` ({})", self.name, self.self_name)
        }
    }
}

impl Plugin {
    /// The name users see: the config's `name`, else the plugin's own (metadata).
    pub fn name(&self) -> &str {
        &self.inner.name
    }
    /// The name the plugin gives itself in its metadata.
    pub fn own_name(&self) -> &str {
        &self.inner.self_name
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
