//! One plugin's instance within one job: its store, CPU budget and limits, and how the outcome
//! of a guest call becomes a result (traps classified, the instance stopped when untrustworthy).

use super::*;

/// One plugin's instance within one job.
pub(crate) struct Instance {
    pub(crate) store: Store<StoreState>,
    pub(crate) exports: wit::Exports,
    /// Set after a trap or deadline: the instance's state is unknown, so it is never called again.
    pub(crate) stopped: Option<String>,
    /// The context this plugin may see (secrets redacted unless granted).
    pub(crate) ctx: Option<Arc<latest::Context>>,
}

impl Instance {
    pub(crate) async fn new(
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
                    plugin: plugin.label(),
                    version: plugin.version.clone(),
                    limit,
                    reason: format!("{e:#}"),
                });
            }
            Ok(Err(e)) => {
                return Err(PluginError::Instantiate {
                    plugin: plugin.label(),
                    version: plugin.version.clone(),
                    reason: format!("{e:#}"),
                });
            }
            Err(_) => {
                return Err(PluginError::Deadline {
                    plugin: plugin.label(),
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
            plugin: plugin.label(),
            version: plugin.version.clone(),
            reason: format!("{e:#}"),
        })?;
        Ok(Instance { store, exports, stopped: None, ctx })
    }

    /// Prepares a call: refuses a stopped instance and gives the call a fresh CPU deadline.
    pub(crate) fn arm(&mut self, plugin: &PluginInner) -> Result<(), PluginError> {
        if let Some(reason) = &self.stopped {
            return Err(PluginError::Stopped {
                plugin: plugin.label(),
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
    pub(crate) fn settle<T>(
        &mut self,
        plugin: &PluginInner,
        call: &'static str,
        outcome: Result<wasmtime::Result<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, PluginError> {
        let name = plugin.label();
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
        // The operator must see a crash even when nothing else is logged (the default level
        // is warn): the plugin's name, the call and the trap with its panic message.
        tracing::error!(plugin.name = &*plugin.name, plugin.call = call, error = %error, "plugin stopped");
        self.stopped = Some(error.to_string());
        Err(error)
    }

    pub(crate) async fn metadata(&mut self, plugin: &PluginInner) -> Result<latest::PluginInfo, PluginError> {
        self.arm(plugin)?;
        let wit::Exports::V0_1_0(exports) = &self.exports;
        let call = exports.plugin.call_metadata(&mut self.store);
        let outcome = tokio::time::timeout(host_timeout(&plugin.limits), call).await;
        self.settle(plugin, "plugin.metadata", outcome)
    }

    pub(crate) async fn configure(&mut self, plugin: &PluginInner) -> Result<(), PluginError> {
        self.arm(plugin)?;
        let wit::Exports::V0_1_0(exports) = &self.exports;
        let call = exports.plugin.call_configure(&mut self.store, &plugin.config_json);
        let outcome = tokio::time::timeout(host_timeout(&plugin.limits), call).await;
        let result = self.settle(plugin, "plugin.configure", outcome)?;
        result.map_err(|e| guest_error(plugin, "plugin", "plugin.configure", e))
    }
}

/// Epoch ticks for a call budget; at least one so a zero timeout still means "stop at once".
pub(crate) fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
}

/// The host-side timeout sits a little beyond the epoch deadline, so a plugin stuck in
/// guest code is reported by the (more precise) epoch trap and this only catches host waits.
pub(crate) fn host_timeout(limits: &Limits) -> Duration {
    limits.call_timeout + EPOCH_TICK * 10
}

pub(crate) fn no_context(plugin: &PluginInner) -> PluginError {
    PluginError::Internal {
        plugin: plugin.label(),
        version: plugin.version.clone(),
        call: "role call",
        reason: "the instance was made without a job context".into(),
    }
}

pub(crate) fn not_exported(plugin: &PluginInner, role: Role) -> PluginError {
    PluginError::RoleNotExported { plugin: plugin.label(), role }
}

pub(crate) fn guest_error(
    plugin: &PluginInner,
    role: &'static str,
    call: &'static str,
    e: latest::PluginError,
) -> PluginError {
    let name = plugin.label();
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
        latest::PluginError::InvalidConfig(reason) => {
            let at = plugin.origin.as_ref().map(|o| format!("{}: ", o.locate(&reason))).unwrap_or_default();
            PluginError::InvalidConfig { plugin: name, version, reason, at }
        }
        latest::PluginError::Internal(reason) => PluginError::Internal { plugin: name, version, call, reason },
    }
}
