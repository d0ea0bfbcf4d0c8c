//! The job as the host understands it, independent of the file format it came from.
//!
//! Parsing (GitLab CI YAML, a single job file or `.gitlab-ci.yml` + job name) lives in
//! `job::parse`; everything downstream (pod building, plugins, strategies) sees only these types.

pub mod cache;
pub mod from_gitlab;
pub mod include;
pub mod overwrites;
pub mod parse;
pub mod resolve;

pub use keel_contract::job::{Image, Job, Overwrites, PullPolicy, Resources, Service, ServicePort, Stage, Variable};
/// The job's variables and the one rule that decides who may see a value.
pub use keel_contract::variables;
