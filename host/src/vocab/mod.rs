//! Leaf vocabulary shared along the flow (config, job, pod): Kubernetes spellings GitLab's
//! config and job files use. It imports nothing of the host, so no module needs to reach
//! backwards for these.

pub use keel_contract::job::{PullPolicy, Resources};

/// Volume names the host's base pod and the strategies use; operators cannot take them.
pub const RESERVED_VOLUMES: &[&str] = &["repo", "scripts", "logs", "keel-vars"];

pub mod expand;
pub mod files;
pub mod values;
