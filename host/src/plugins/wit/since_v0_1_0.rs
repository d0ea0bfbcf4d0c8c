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
    // Strategy host calls wait on the cluster (exec, attach, reads): async on the host, still
    // blocking calls to the guest.
    imports: { "keel:plugin/strategy-host": async },
    exports: { default: async },
    with: { "keel:plugin/strategy-host.session": crate::plugins::strategy_host::SessionSlot },
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

mod strategy_host_impl {
    use wasmtime::component::Resource;

    use super::keel::plugin::strategy_host as wit;
    use crate::plugins::sandbox::StoreState;
    use crate::plugins::strategy_host::{self as sh, SessionSlot, StrategyServices};

    /// Bounds a single `read-output`: the guest asked for `max-bytes`, but never more than this
    /// lands in its memory at once.
    const MAX_READ: usize = 1024 * 1024;

    fn to_wit(e: sh::HostError) -> wit::HostError {
        match e {
            sh::HostError::NoSuchContainer(s) => wit::HostError::NoSuchContainer(s),
            sh::HostError::Disconnected(s) => wit::HostError::Disconnected(s),
            sh::HostError::Refused(s) => wit::HostError::Refused(s),
            sh::HostError::Other(s) => wit::HostError::Other(s),
        }
    }

    impl StoreState {
        fn services(&self) -> Result<std::sync::Arc<StrategyServices>, wit::HostError> {
            self.strategy.clone().ok_or_else(|| {
                wit::HostError::Refused("only the job's execution strategy may use strategy-host services".into())
            })
        }

        fn slot(&mut self, r: &Resource<SessionSlot>) -> Result<&mut SessionSlot, wit::HostError> {
            self.table.get_mut(r).map_err(|e| wit::HostError::Other(format!("unknown session: {e}")))
        }

        fn push_session(&mut self, s: sh::Session) -> Result<Resource<SessionSlot>, wit::HostError> {
            self.table
                .push(SessionSlot { session: s, pending: None })
                .map_err(|e| wit::HostError::Other(format!("too many sessions: {e}")))
        }
    }

    impl wit::Host for StoreState {
        async fn exec(
            &mut self,
            container: String,
            command: Vec<String>,
            stdin: bool,
        ) -> Result<Resource<SessionSlot>, wit::HostError> {
            let services = self.services()?;
            let session = services.exec(&container, command, stdin).await;
            self.host_call_returned();
            self.push_session(session.map_err(to_wit)?)
        }

        async fn attach(&mut self, container: String) -> Result<Resource<SessionSlot>, wit::HostError> {
            let services = self.services()?;
            let session = services.attach(&container).await;
            self.host_call_returned();
            self.push_session(session.map_err(to_wit)?)
        }

        async fn trace_write(&mut self, data: Vec<u8>) {
            if let Ok(services) = self.services() {
                services.trace_write(&data);
            }
            self.host_call_returned();
        }

        async fn sleep(&mut self, millis: u64) {
            // Bounded: a strategy backs off for seconds, not hours; the job timeout still rules.
            tokio::time::sleep(std::time::Duration::from_millis(millis.min(60_000))).await;
            self.host_call_returned();
        }

        async fn pod_status(&mut self) -> Result<String, wit::HostError> {
            let services = self.services()?;
            let json = services.pod_json().await;
            self.host_call_returned();
            json.map_err(to_wit)
        }
    }

    impl wit::HostSession for StoreState {
        async fn write_stdin(&mut self, s: Resource<SessionSlot>, data: Vec<u8>) -> Result<(), wit::HostError> {
            let result = self.slot(&s)?.session.write_stdin(&data).await;
            self.host_call_returned();
            result.map_err(to_wit)
        }

        async fn close_stdin(&mut self, s: Resource<SessionSlot>) -> Result<(), wit::HostError> {
            let result = self.slot(&s)?.session.close_stdin().await;
            self.host_call_returned();
            result.map_err(to_wit)
        }

        async fn read_output(
            &mut self,
            s: Resource<SessionSlot>,
            max_bytes: u32,
        ) -> Result<Option<wit::OutputChunk>, wit::HostError> {
            let slot = self.slot(&s)?;
            let max = (max_bytes as usize).min(MAX_READ);
            let chunk = slot.session.read_output(max, &mut slot.pending).await;
            self.host_call_returned();
            Ok(chunk.map(|(channel, data)| wit::OutputChunk {
                channel: match channel {
                    sh::Channel::Stdout => wit::Channel::Stdout,
                    sh::Channel::Stderr => wit::Channel::Stderr,
                },
                data,
            }))
        }

        async fn wait_exit(&mut self, s: Resource<SessionSlot>) -> Result<i32, wit::HostError> {
            let result = self.slot(&s)?.session.wait_exit().await;
            self.host_call_returned();
            result.map_err(to_wit)
        }

        async fn drop(&mut self, s: Resource<SessionSlot>) -> wasmtime::Result<()> {
            // Dropping the session drops its connection.
            self.table.delete(s)?;
            Ok(())
        }
    }
}

pub fn add_host_to_linker(linker: &mut wasmtime::component::Linker<super::super::sandbox::StoreState>) -> Result<()> {
    keel::plugin::host::add_to_linker::<_, wasmtime::component::HasSelf<_>>(linker, |s| s)?;
    keel::plugin::strategy_host::add_to_linker::<_, wasmtime::component::HasSelf<_>>(linker, |s| s)?;
    keel::plugin::types::add_to_linker::<_, wasmtime::component::HasSelf<_>>(linker, |s| s)
}
