//! Connects the author's traits to wit-bindgen's generated export traits.
//!
//! wit-bindgen's exports are static functions; the plugin value built by `configure` lives in
//! a thread-local for the rest of the instance's life (a component instance is single-threaded
//! and, in keel, lives for one job).

use std::cell::RefCell;
use std::marker::PhantomData;

use crate::bindings::exports::keel::plugin as ex;
use crate::bindings::keel::plugin::types as wit;
use crate::{
    Config, Context, Error, ExecutionStrategy, OverwriteRules, Overwrites, Plugin, PodMutator, PullPolicyRequest,
    PullPolicyRules, Role, Stage, StrategyHost,
};
use k8s_openapi::api::core::v1::Pod;

type MutateFn<T> = fn(&mut T, &Context, &str) -> Result<String, Error>;
type PrepareFn<T> = fn(&mut T, &Context, Pod) -> Result<Pod, Error>;
type DecideFn<T> = fn(&mut T, &Context, &PullPolicyRequest) -> Result<Vec<crate::PullPolicy>, Error>;
type ReviewFn<T> = fn(&mut T, &Context, Overwrites) -> Result<Overwrites, Error>;
type RunStageFn<T> = fn(&mut T, &Context, &Stage, &StrategyHost) -> Result<i32, Error>;

/// Which roles a plugin type plays, filled in by `export!`.
pub struct Registry<T> {
    pub(crate) roles: Vec<Role>,
    pub(crate) mutate: Option<MutateFn<T>>,
    pub(crate) decide: Option<DecideFn<T>>,
    pub(crate) review: Option<ReviewFn<T>>,
    pub(crate) prepare: Option<PrepareFn<T>>,
    pub(crate) run_stage: Option<RunStageFn<T>>,
}

// The method names are the trait names so that `export!(P: PodMutator)` reads naturally.
#[allow(non_snake_case)]
impl<T: Plugin> Registry<T> {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Registry { roles: Vec::new(), mutate: None, decide: None, review: None, prepare: None, run_stage: None }
    }
    pub fn PodMutator(mut self) -> Self
    where
        T: PodMutator,
    {
        self.roles.push(Role::PodMutator);
        self.mutate = Some(T::mutate_json);
        self
    }
    pub fn PullPolicyRules(mut self) -> Self
    where
        T: PullPolicyRules,
    {
        self.roles.push(Role::PullPolicy);
        self.decide = Some(T::decide);
        self
    }
    pub fn OverwriteRules(mut self) -> Self
    where
        T: OverwriteRules,
    {
        self.roles.push(Role::Overwrites);
        self.review = Some(T::review);
        self
    }
    pub fn ExecutionStrategy(mut self) -> Self
    where
        T: ExecutionStrategy,
    {
        self.roles.push(Role::ExecutionStrategy);
        self.prepare = Some(T::prepare);
        self.run_stage = Some(T::run_stage);
        self
    }

    pub fn roles(&self) -> &[Role] {
        &self.roles
    }
}

/// Implemented by `export!` for the plugin type.
pub trait Registered: Plugin {
    fn registry() -> Registry<Self>;
}

/// The type wit-bindgen's export macro is pointed at.
pub struct Glue<T>(PhantomData<T>);

thread_local! {
    static INSTANCE: RefCell<Option<Box<dyn std::any::Any>>> = const { RefCell::new(None) };
}

impl From<Error> for wit::PluginError {
    fn from(e: Error) -> Self {
        match e {
            Error::Denied(r) => wit::PluginError::Denied(r),
            Error::InvalidConfig(r) => wit::PluginError::InvalidConfig(r),
            Error::Internal(r) => wit::PluginError::Internal(r),
        }
    }
}

fn not_implemented<T: Plugin>(role: &str) -> wit::PluginError {
    wit::PluginError::Internal(format!("plugin {} does not implement role {role}", T::NAME))
}

/// Runs `f` on the configured plugin value.
fn with_plugin<T: Plugin, R>(f: impl FnOnce(&mut T) -> Result<R, Error>) -> Result<R, wit::PluginError> {
    INSTANCE.with(|slot| {
        let mut slot = slot.borrow_mut();
        let plugin = slot
            .as_mut()
            .and_then(|b| b.downcast_mut::<T>())
            .ok_or_else(|| wit::PluginError::Internal(format!("plugin {} called before configure", T::NAME)))?;
        f(plugin).map_err(Into::into)
    })
}

fn decode_pod(pod: &str) -> Result<Pod, Error> {
    serde_json::from_str(pod).map_err(|e| Error::internal(format!("host sent a pod that does not decode: {e}")))
}

fn encode_pod(pod: &Pod) -> Result<String, Error> {
    serde_json::to_string(pod).map_err(|e| Error::internal(format!("cannot encode the pod: {e}")))
}

impl<T: Registered> ex::plugin::Guest for Glue<T> {
    fn metadata() -> wit::PluginInfo {
        wit::PluginInfo { name: T::NAME.to_string(), version: T::VERSION.to_string(), roles: T::registry().roles }
    }

    fn configure(config: String) -> Result<(), wit::PluginError> {
        let config = Config::from_json(&config)?;
        let plugin = T::configure(config)?;
        INSTANCE.with(|slot| *slot.borrow_mut() = Some(Box::new(plugin)));
        Ok(())
    }
}

impl<T: Registered> ex::pod_mutator::Guest for Glue<T> {
    fn mutate(ctx: wit::Context, pod: String) -> Result<String, wit::PluginError> {
        let Some(mutate) = T::registry().mutate else { return Err(not_implemented::<T>("pod-mutator")) };
        let ctx = crate::wit::context_from(ctx)?;
        with_plugin::<T, _>(|p| mutate(p, &ctx, &pod))
    }
}

impl<T: Registered> ex::pull_policy::Guest for Glue<T> {
    fn decide(
        ctx: wit::Context,
        request: ex::pull_policy::PullPolicyRequest,
    ) -> Result<Vec<wit::PullPolicy>, wit::PluginError> {
        let Some(decide) = T::registry().decide else { return Err(not_implemented::<T>("pull-policy")) };
        let ctx = crate::wit::context_from(ctx)?;
        let request = PullPolicyRequest {
            image: request.image,
            job: crate::wit::policies_from(request.job),
            config: crate::wit::policies_from(request.config),
            allowed: crate::wit::policies_from(request.allowed),
        };
        with_plugin::<T, _>(|p| decide(p, &ctx, &request).map(crate::wit::policies_to))
    }
}

impl<T: Registered> ex::overwrites::Guest for Glue<T> {
    fn review(ctx: wit::Context, requested: wit::Overwrites) -> Result<wit::Overwrites, wit::PluginError> {
        let Some(review) = T::registry().review else { return Err(not_implemented::<T>("overwrites")) };
        let ctx = crate::wit::context_from(ctx)?;
        with_plugin::<T, _>(|p| review(p, &ctx, requested.into()).map(Into::into))
    }
}

impl<T: Registered> ex::execution_strategy::Guest for Glue<T> {
    fn prepare(ctx: wit::Context, pod: String) -> Result<String, wit::PluginError> {
        let Some(prepare) = T::registry().prepare else { return Err(not_implemented::<T>("execution-strategy")) };
        let ctx = crate::wit::context_from(ctx)?;
        let pod = decode_pod(&pod)?;
        with_plugin::<T, _>(|p| encode_pod(&prepare(p, &ctx, pod)?))
    }

    fn run_stage(ctx: wit::Context, stage: ex::execution_strategy::Stage) -> Result<i32, wit::PluginError> {
        let Some(run_stage) = T::registry().run_stage else { return Err(not_implemented::<T>("execution-strategy")) };
        let ctx = crate::wit::context_from(ctx)?;
        let stage = Stage { name: stage.name, script: stage.script };
        with_plugin::<T, _>(|p| run_stage(p, &ctx, &stage, &StrategyHost::new()))
    }
}
