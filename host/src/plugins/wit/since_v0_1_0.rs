//! Bindings for `keel:plugin@0.1.0` (`wit/v0.1.0/`, frozen).
//!
//! Generated from the `strategy` world, the superset of everything a v0.1.0 plugin may export,
//! so every role's types and call stubs exist. Which roles a particular component really has is
//! decided per component from its exports ([`Indices::new`]), not by this world.

use wasmtime::component::{Instance, InstancePre};
use wasmtime::{AsContextMut, Result};

wasmtime::component::bindgen!({
    path: "../wit/v0.1.0",
    world: "keel:plugin/strategy",
    exports: { default: async },
});

pub use exports::keel::plugin::execution_strategy::Stage;
pub use exports::keel::plugin::pull_policy::PullPolicyRequest;
pub use keel::plugin::host::LogLevel;
pub use keel::plugin::types::{
    Context, Image, Job, KeyValue, Overwrites, PluginError, PluginInfo, PullPolicy, Resources, Role, Service, Variable,
};

use exports::keel::plugin as guest;

/// Export lookups done once per plugin (at load), reused for every job's instance.
pub struct Indices {
    plugin: guest::plugin::GuestIndices,
    pod_mutator: Option<guest::pod_mutator::GuestIndices>,
    pull_policy: Option<guest::pull_policy::GuestIndices>,
    overwrites: Option<guest::overwrites::GuestIndices>,
    execution_strategy: Option<guest::execution_strategy::GuestIndices>,
}

impl Indices {
    /// `has_role(iface)` says whether the component exports that role interface; a role it
    /// does not export is simply absent, while a role it exports with a wrong shape is an error.
    pub fn new<T>(pre: &InstancePre<T>, has_role: impl Fn(&str) -> bool) -> Result<Self> {
        Ok(Indices {
            plugin: guest::plugin::GuestIndices::new(pre)?,
            pod_mutator: has_role("pod-mutator").then(|| guest::pod_mutator::GuestIndices::new(pre)).transpose()?,
            pull_policy: has_role("pull-policy").then(|| guest::pull_policy::GuestIndices::new(pre)).transpose()?,
            overwrites: has_role("overwrites").then(|| guest::overwrites::GuestIndices::new(pre)).transpose()?,
            execution_strategy: has_role("execution-strategy")
                .then(|| guest::execution_strategy::GuestIndices::new(pre))
                .transpose()?,
        })
    }

    pub fn load(&self, mut store: impl AsContextMut, instance: &Instance) -> Result<Exports> {
        let mut store = store.as_context_mut();
        Ok(Exports {
            plugin: self.plugin.load(&mut store, instance)?,
            pod_mutator: self.pod_mutator.as_ref().map(|i| i.load(&mut store, instance)).transpose()?,
            pull_policy: self.pull_policy.as_ref().map(|i| i.load(&mut store, instance)).transpose()?,
            overwrites: self.overwrites.as_ref().map(|i| i.load(&mut store, instance)).transpose()?,
            execution_strategy: self.execution_strategy.as_ref().map(|i| i.load(&mut store, instance)).transpose()?,
        })
    }

    /// Role interfaces present, by WIT role.
    pub fn exported_roles(&self) -> Vec<Role> {
        let mut roles = Vec::new();
        if self.pod_mutator.is_some() {
            roles.push(Role::PodMutator);
        }
        if self.pull_policy.is_some() {
            roles.push(Role::PullPolicy);
        }
        if self.overwrites.is_some() {
            roles.push(Role::Overwrites);
        }
        if self.execution_strategy.is_some() {
            roles.push(Role::ExecutionStrategy);
        }
        roles
    }
}

/// One instance's typed exports.
pub struct Exports {
    pub plugin: guest::plugin::Guest,
    pub pod_mutator: Option<guest::pod_mutator::Guest>,
    pub pull_policy: Option<guest::pull_policy::Guest>,
    pub overwrites: Option<guest::overwrites::Guest>,
    pub execution_strategy: Option<guest::execution_strategy::Guest>,
}

/// `host` import: plugin log lines become tracing events of the calling span (which carries
/// `plugin.name`, `plugin.role` and `job.id`).
impl keel::plugin::host::Host for super::super::sandbox::StoreState {
    fn log(&mut self, level: LogLevel, message: String) {
        // Escaped and cut (see `plugin_text`): a plugin must not print lines that pass for the host's.
        let message = super::super::sandbox::plugin_text(&message, super::super::sandbox::MAX_PLUGIN_TEXT);
        let plugin = &*self.plugin;
        match level {
            LogLevel::Trace => tracing::trace!(plugin.name = plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin.name = plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin.name = plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin.name = plugin, "{message}"),
            LogLevel::Error => tracing::error!(plugin.name = plugin, "{message}"),
        }
    }
}

impl keel::plugin::types::Host for super::super::sandbox::StoreState {}

pub fn add_host_to_linker(linker: &mut wasmtime::component::Linker<super::super::sandbox::StoreState>) -> Result<()> {
    keel::plugin::host::add_to_linker::<_, wasmtime::component::HasSelf<_>>(linker, |s| s)?;
    keel::plugin::types::add_to_linker::<_, wasmtime::component::HasSelf<_>>(linker, |s| s)
}
