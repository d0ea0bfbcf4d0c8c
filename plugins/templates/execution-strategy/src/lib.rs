//! `template-execution-strategy`: a keel execution strategy. Each stage's script runs with `sh -c` in the build
//! container through the host's exec service; its output goes to the job's trace.

use keel_sdk::strategy::HostError;
use keel_sdk::{Config, Context, Error, ExecutionStrategy, Plugin, Pod, Stage, StrategyHost};

/// The plugin's settings: its table in the runner config.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The shell the script runs in.
    #[serde(default = "default_shell")]
    shell: String,
}

fn default_shell() -> String {
    "sh".into()
}

pub struct TemplateExecutionStrategy {
    settings: Settings,
}

impl Plugin for TemplateExecutionStrategy {
    const NAME: &'static str = "template-execution-strategy";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(config: Config) -> Result<Self, Error> {
        Ok(TemplateExecutionStrategy { settings: config.parse()? })
    }
}

fn host_error(e: HostError) -> Error {
    Error::internal(format!("host service failed: {e:?}"))
}

impl ExecutionStrategy for TemplateExecutionStrategy {
    fn prepare(&mut self, _ctx: &Context, pod: Pod) -> Result<Pod, Error> {
        // The host's base pod already has build and helper idling in a shell.
        Ok(pod)
    }

    fn run_stage(&mut self, _ctx: &Context, stage: &Stage, host: &StrategyHost) -> Result<i32, Error> {
        let command = vec![self.settings.shell.clone(), "-c".to_string(), stage.script.clone()];
        let session = host.exec("build", &command, false).map_err(host_error)?;
        // stdout and stderr both go to the trace, as a terminal would show them.
        while let Some((_stream, data)) = session.read_output(64 * 1024).map_err(host_error)? {
            host.trace_write(&data);
        }
        session.wait_exit().map_err(host_error)
    }
}

keel_sdk::export!(TemplateExecutionStrategy: ExecutionStrategy);

#[cfg(test)]
mod tests {
    use super::*;
    use keel_sdk::testing::{self, ContextBuilder};

    #[test]
    fn prepare_keeps_a_pod_the_host_accepts() {
        let mut plugin: TemplateExecutionStrategy = testing::configure("").unwrap();
        let ctx = ContextBuilder::new().build();
        let pod = testing::prepare(&mut plugin, &ctx, testing::pod_for(&ctx)).unwrap();
        assert!(pod.spec.unwrap().containers.iter().any(|c| c.name == "build"));
    }
}
