//! The vocabulary keel's host, its SDK and its first-party plugins share.
//!
//! Every record and rule of the plugin contract has its home here, once: the job and what a
//! plugin sees of it ([`job`], [`context`]), the job's variables and the one rule that decides
//! who may see a value ([`variables`]), overwrites and resources, Kubernetes quantities
//! ([`quantity`]), pull policies with GitLab's rule ([`pull_policy`]), image references
//! ([`image`]), the job pod's shape ([`pod`]) and strategic-merge keys ([`merge_keys`]).
//!
//! Nothing here knows about wasm: the host and the SDK each convert these records to and from
//! the WIT types of their side, one `From` pair each.

pub mod context;
pub mod expand;
pub mod image;
pub mod job;
pub mod merge_keys;
pub mod pod;
pub mod pull_policy;
pub mod quantity;
pub mod variables;

pub use job::{Image, Job, Overwrites, PullPolicy, Resources, Service, ServicePort, Stage, Variable};
