//! The keel host: builds a job's pod, lets sandboxed plugins shape it, and runs it.

pub mod job;
pub mod plugins;
