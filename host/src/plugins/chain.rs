//! One job's plugins: every role call goes through [`JobPlugins::call_role`], and the roles'
//! chains (overwrite rules, pull policies, pod mutators, the strategy) run in configuration order.

use super::*;
use keel_contract::context::Context;

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
        let context =
            |secrets| Arc::new(latest::Context::from(Context::for_plugin(job, runner_config.clone(), secrets)));
        let (redacted, full) = (context(false), context(true));
        let mut members = Vec::with_capacity(plugins.len() + 1);
        let mut all: Vec<Plugin> = plugins.to_vec();
        let strategy_index =
            strategy.as_ref().map(|b| match all.iter().position(|p| Arc::ptr_eq(&p.inner, &b.plugin.inner)) {
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
            .call_role(
                index,
                Role::ExecutionStrategy,
                "execution-strategy.prepare",
                None,
                json.as_str(),
                |ex, store, ctx, pod| {
                    Box::pin(async move {
                        match ex {
                            wit::Exports::V0_1_0(e) => {
                                Some(e.execution_strategy.as_ref()?.call_prepare(store, ctx, pod).await)
                            }
                        }
                    })
                },
            )
            .await?;
        baseline.check(&output).map_err(|violation| validate::violation_error(violation, &self.members[index].0.inner))
    }

    /// The strategy's `run-stage`: may last as long as `timeout` (the stage's own), waiting on
    /// the cluster through host calls; the CPU budget inside wasm is still the plugin's.
    pub async fn run_stage(&mut self, name: &str, script: &str, timeout: Duration) -> Result<i32, PluginError> {
        let Some(index) = self.strategy else {
            return Err(PluginError::NoStrategy);
        };
        let stage = latest::Stage { name: name.to_string(), script: script.to_string() };
        self.call_role(
            index,
            Role::ExecutionStrategy,
            "execution-strategy.run-stage",
            Some(timeout),
            &stage,
            |ex, store, ctx, stage| {
                Box::pin(async move {
                    match ex {
                        wit::Exports::V0_1_0(e) => {
                            Some(e.execution_strategy.as_ref()?.call_run_stage(store, ctx, stage).await)
                        }
                    }
                })
            },
        )
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
        )
            -> futures::future::BoxFuture<'a, Option<wasmtime::Result<Result<R, latest::PluginError>>>>,
    ) -> Result<R, PluginError> {
        let job_id = self.job_id;
        let (plugin, instance) = &mut self.members[index];
        let p = &*plugin.inner;
        let span =
            tracing::info_span!("plugin.call", plugin.name = &*p.name, plugin.role = role.as_str(), job.id = job_id);
        let started = std::time::Instant::now();
        let result = async {
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
        .await;
        crate::metrics::plugin_call(&p.name, role.as_str(), started.elapsed(), result.is_err());
        result
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
        let mut current = latest::Overwrites::from(requested);
        for index in rules {
            current = self
                .call_role(index, Role::Overwrites, "overwrites.review", None, &current, |ex, store, ctx, current| {
                    Box::pin(async move {
                        match ex {
                            wit::Exports::V0_1_0(e) => {
                                Some(e.overwrites.as_ref()?.call_review(store, ctx, current).await)
                            }
                        }
                    })
                })
                .await?;
            validate::check_overwrites(&current, &self.members[index].0.inner)?;
        }
        Ok(OverwriteDecision::Accepted(current.into()))
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
            job: job.iter().copied().map(Into::into).collect(),
            config: config.iter().copied().map(Into::into).collect(),
            allowed: allowed.iter().copied().map(Into::into).collect(),
        };
        for index in deciders {
            request.job = self
                .call_role(index, Role::PullPolicy, "pull-policy.decide", None, &request, |ex, store, ctx, request| {
                    Box::pin(async move {
                        match ex {
                            wit::Exports::V0_1_0(e) => {
                                Some(e.pull_policy.as_ref()?.call_decide(store, ctx, request).await)
                            }
                        }
                    })
                })
                .await?;
        }
        Ok(Some(request.job.into_iter().map(Into::into).collect()))
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
            current = baseline
                .check(&output)
                .map_err(|violation| validate::violation_error(violation, &self.members[index].0.inner))?;
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
