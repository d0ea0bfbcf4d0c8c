//! The keel host: builds a job's pod, lets sandboxed plugins shape it, and runs it.
//!
//! Modules follow the job's data flow: `config` (config.toml) -> `job` (the job's YAML) ->
//! `pod` (build the objects) -> `render` (print what would be created).

pub mod config;
pub mod job;
pub mod plugins;
pub mod pod;
pub mod render;
