//! The keel host: builds a job's pod, lets sandboxed plugins shape it, and runs it.
//!
//! Modules follow the job's data flow, each using only those before it: `input` (limits and
//! bounded reads) and `vocab` (leaf vocabulary) -> `config` (config.toml) -> `job` (the job's YAML) ->
//! `pod` (the base objects) -> `plugins` (mutate, decide, the strategy's host services) ->
//! `prepare` (all of that as one step) -> `render` (print) or `cluster` (connect, create,
//! watch, exec) -> `run` (the stages) -> `trace` (mask, stream) -> `cleanup`. `pipeline` runs a
//! whole `.gitlab-ci.yml` through `run`, job after job. `gitlab` is the GitLab runner API client
//! and `serve` the loop that takes jobs from GitLab (`host serve`).

pub mod cluster;
pub mod config;
pub mod gitlab;
pub mod input;
pub mod job;
pub mod metrics;
pub mod pipeline;
pub mod plugins;
pub mod pod;
pub mod prepare;
pub mod render;
pub mod run;
pub mod scaffold;
pub mod serve;
pub mod sources;
pub mod trace;
pub mod vocab;
