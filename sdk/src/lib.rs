//! Write keel plugins in Rust.
//!
//! A plugin is a type implementing [`Plugin`] (who it is, how it reads its configuration) plus
//! one trait per role it plays: [`PodMutator`], [`PullPolicyRules`], [`OverwriteRules`],
//! [`ExecutionStrategy`]. [`export!`] turns it into a component for `wasm32-wasip2`:
//!
//! ```ignore
//! use keel_sdk::{Context, Error, Plugin, PodMutator, Pod};
//!
//! struct Hello;
//!
//! impl Plugin for Hello {
//!     const NAME: &'static str = "hello";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!     fn configure(_config: keel_sdk::Config) -> Result<Self, Error> { Ok(Hello) }
//! }
//!
//! impl PodMutator for Hello {
//!     fn mutate(&mut self, _ctx: &Context, pod: Pod) -> Result<Pod, Error> { Ok(pod) }
//! }
//!
//! keel_sdk::export!(Hello: PodMutator);
//! ```
//!
//! Every SDK-built component exports all role interfaces of the WIT world `keel:plugin/strategy`
//! (wit-bindgen exports per world): `plugin`, `pod-mutator`, `pull-policy`, `overwrites` *and*
//! `execution-strategy`, so `host plugin inspect` lists them all for every SDK plugin
//! (`strategy-host` is imported only by plugins that call it). The roles named in `export!` are the ones listed in the plugin's
//! metadata; the host calls only those, and the others answer `internal("plugin ... does not
//! implement role ...")`. The host gives `strategy-host` access only to the job's chosen
//! strategy; any other plugin's call is refused. See `wit/README.md`.
//!
//! What a plugin sees:
//! - **Variables.** [`Job::variables`] holds every variable of the job. A *public* variable
//!   ([`Variable::public`]) is one whose value may be shown: the host puts it in the pod's env
//!   and gives its value to every plugin. Masked variables and credentials (`CI_JOB_TOKEN`,
//!   `DOCKER_AUTH_CONFIG`, ...) are not public: their `value` is `None` unless the operator
//!   grants the plugin `grants.secrets = true`.
//! - **Images** are the job's text, not normalised: `alpine` is Docker Hub's
//!   `docker.io/library/alpine:latest`. Compare with [`image::ImageRef`], never with string
//!   prefixes.
//! - **The pod** a mutator gets is the host's base pod ([`pod::job_pod`]) after earlier
//!   mutators; [`testing::pod_for`] builds the same one for tests.
//!
//! The logic is ordinary Rust: test it natively with `cargo test` and [`testing`]. Compare
//! against the constants the host uses ([`pod::JOB_ID_LABEL`], [`pod::BUILD_CONTAINER`],
//! [`testing::DEFAULT_JOB_ID`]...), never copied strings: `CHANGELOG.md` lists every change a
//! plugin must act on, and a rename is a breaking release.
//!
//! Build components small: in the plugin crate's `Cargo.toml`,
//! `[profile.release] opt-level = "s"`, `lto = true`, `codegen-units = 1`,
//! `strip = "debuginfo"` makes a pod mutator 1.3 MB instead of 4.6 MB, and smaller
//! components compile and instantiate faster. `host plugin new` writes that profile.

extern crate self as keel_sdk;

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        // Inside the package (a copy of the repository's `wit/v0.1.0`, kept identical by a
        // test), so the published crate builds outside a keel checkout.
        path: "wit/v0.1.0",
        world: "keel:plugin/strategy",
        runtime_path: "::keel_sdk::__wit_bindgen::rt",
        pub_export_macro: true,
        export_macro_name: "__export_raw",
        default_bindings_module: "::keel_sdk::bindings",
    });
}

mod config;
mod glue;
pub mod log;
pub mod strategy;
pub mod testing;
mod wit;

/// The contract's vocabulary, shared with the host: image references, the job pod's shape,
/// quantities, strategic-merge keys, GitLab's pull-policy rule, the job's variables and their secrecy.
pub use keel_contract::{context, image, merge_keys, pod, pull_policy, quantity, variables};

/// The roles a plugin can play.
pub use bindings::keel::plugin::types::Role;
pub use config::Config;
pub use k8s_openapi;
pub use k8s_openapi::api::core::v1::Pod;
/// What a plugin sees of the job (values it may not see are `None`).
pub use keel_contract::context::{Context, Job, Service, Variable};
/// Image pull policies, as Kubernetes spells them in `imagePullPolicy`.
pub use keel_contract::job::PullPolicy;
pub use keel_contract::job::{Image, Overwrites, Resources};
/// What a pull-policy decision is asked about.
pub use keel_contract::pull_policy::Request as PullPolicyRequest;
pub use strategy::{Stage, StrategyHost};

#[doc(hidden)]
pub mod __private {
    pub use crate::glue::{Glue, Registered, Registry};
}

/// Why a plugin call did not produce a result; becomes the WIT `plugin-error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A policy said no; the job fails with this reason.
    Denied(String),
    /// The plugin's configuration is unusable (name the key).
    InvalidConfig(String),
    /// Anything else.
    Internal(String),
}

impl Error {
    pub fn denied(reason: impl Into<String>) -> Self {
        Error::Denied(reason.into())
    }
    pub fn invalid_config(reason: impl Into<String>) -> Self {
        Error::InvalidConfig(reason.into())
    }
    pub fn internal(reason: impl Into<String>) -> Self {
        Error::Internal(reason.into())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Denied(r) => write!(f, "denied: {r}"),
            Error::InvalidConfig(r) => write!(f, "invalid config: {r}"),
            Error::Internal(r) => write!(f, "internal: {r}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<keel_contract::context::RunnerConfigError> for Error {
    fn from(e: keel_contract::context::RunnerConfigError) -> Self {
        Error::InvalidConfig(e.to_string())
    }
}

/// Who the plugin is and how it is built from its configuration.
pub trait Plugin: Sized + 'static {
    /// Shown by `host plugin inspect` and in the host's logs.
    const NAME: &'static str;
    /// Usually `env!("CARGO_PKG_VERSION")`.
    const VERSION: &'static str;

    /// Called once per job before any role call, with the plugin's table from the host config.
    fn configure(config: Config) -> Result<Self, Error>;
}

/// Changes the job's pod before it is created.
pub trait PodMutator: Plugin {
    /// Return the pod to create. The host rejects a result that is not a Pod, drops the
    /// `build` container, or changes namespace, name or the host's selector label.
    fn mutate(&mut self, ctx: &Context, pod: Pod) -> Result<Pod, Error> {
        let _ = ctx;
        Ok(pod)
    }

    /// The call as it crosses the boundary: Pod JSON in, Pod JSON out. The default decodes
    /// into k8s-openapi types and calls [`PodMutator::mutate`]; override it to work on the raw
    /// JSON (e.g. to keep fields the pinned Kubernetes version does not know).
    fn mutate_json(&mut self, ctx: &Context, pod: &str) -> Result<String, Error> {
        let pod: Pod = serde_json::from_str(pod)
            .map_err(|e| Error::internal(format!("host sent a pod that does not decode: {e}")))?;
        let pod = self.mutate(ctx, pod)?;
        serde_json::to_string(&pod).map_err(|e| Error::internal(format!("cannot encode the pod: {e}")))
    }
}

/// Decides the pull policies of an image.
pub trait PullPolicyRules: Plugin {
    /// Policies to try in order; empty = the cluster's default. The default is GitLab's rule
    /// ([`pull_policy::decide`]), the one the host applies when no plugin decides.
    fn decide(&mut self, ctx: &Context, request: &PullPolicyRequest) -> Result<Vec<PullPolicy>, Error> {
        let _ = ctx;
        pull_policy::decide(request).map_err(|e| Error::denied(e.to_string()))
    }
}

/// Decides which requested overwrites are accepted.
pub trait OverwriteRules: Plugin {
    /// Return the accepted overwrites; deny (naming variable, value and rule) what is not allowed.
    fn review(&mut self, ctx: &Context, requested: Overwrites) -> Result<Overwrites, Error> {
        let _ = (ctx, requested);
        Err(Error::denied("this plugin accepts no overwrites"))
    }
}

/// Runs a job's stages in its pod through the host's exec/attach services (see
/// wit/README.md; the first-party `exec` plugin is one).
pub trait ExecutionStrategy: Plugin {
    /// Add what the strategy needs to the pod before it is created.
    fn prepare(&mut self, ctx: &Context, pod: Pod) -> Result<Pod, Error> {
        let _ = ctx;
        Ok(pod)
    }

    /// Run one stage and return its exit code.
    fn run_stage(&mut self, ctx: &Context, stage: &Stage, host: &StrategyHost) -> Result<i32, Error>;
}

/// Export `$plugin` as a keel component playing the listed roles.
///
/// `keel_sdk::export!(MyPlugin: PodMutator, PullPolicyRules);`
/// Roles: `PodMutator`, `PullPolicyRules`, `OverwriteRules`, `ExecutionStrategy`.
#[macro_export]
macro_rules! export {
    ($plugin:ty $(: $($role:ident),* $(,)?)?) => {
        impl $crate::__private::Registered for $plugin {
            fn registry() -> $crate::__private::Registry<Self> {
                $crate::__private::Registry::<Self>::new() $($( .$role() )*)?
            }
        }

        // Only a wasm build exports the component's functions: their names (`keel:plugin/...#f`)
        // are not valid symbols for native linkers, and native builds are for tests.
        #[cfg(target_arch = "wasm32")]
        #[doc(hidden)]
        type __KeelGlue = $crate::__private::Glue<$plugin>;
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::__export_raw!(__KeelGlue with_types_in $crate::bindings);
    };
}
