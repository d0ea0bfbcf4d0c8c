//! `exec`: the simplest execution strategy. Each stage is one exec of `sh` in the build
//! container with the host-generated stage script on stdin (stderr joined to stdout, as in a
//! terminal); output goes to the trace as it arrives and the exit code comes from the exec's
//! status.
//!
//! What it does when the connection to the API server drops: the job fails at once, naming
//! the lost connection. It never reports a success it did not see (GitLab #4119,
//! runner-container-hooks #396) and never waits for output that cannot come. The stage's
//! processes may still run in the pod; the host stops them and deletes the pod.

use keel_sdk::strategy::HostError;
use keel_sdk::{Config, Context, Error, ExecutionStrategy, Plugin, Stage, StrategyHost};

/// The container the job's scripts run in (the host's base pod always has it).
pub use keel_sdk::pod::BUILD_CONTAINER as BUILD;
/// Bytes asked for per read: the host delivers what arrived, up to this.
const READ: u32 = 64 * 1024;

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    /// The shell the script is fed to (default `sh`, which every job image must have).
    #[serde(default)]
    pub shell: Option<String>,
}

impl Plugin for Exec {
    const NAME: &'static str = "exec";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(config: Config) -> Result<Self, Error> {
        config.parse()
    }
}

fn lost(stage: &Stage, e: HostError) -> Error {
    match e {
        HostError::Disconnected(why) => Error::internal(format!(
            "lost the connection to the build container during stage {}: {why}; the stage's result is unknown",
            stage.name
        )),
        HostError::NoSuchContainer(why) => Error::internal(format!("stage {}: {why}", stage.name)),
        HostError::Refused(why) => Error::internal(format!("stage {}: the host refused: {why}", stage.name)),
        HostError::Other(why) => Error::internal(format!("stage {}: {why}", stage.name)),
    }
}

impl ExecutionStrategy for Exec {
    fn run_stage(&mut self, _ctx: &Context, stage: &Stage, host: &StrategyHost) -> Result<i32, Error> {
        let shell = self.shell.clone().unwrap_or_else(|| "sh".into());
        // stderr joins stdout in the container, so the trace keeps the order the script wrote
        // in (two streams arrive as two channels, and their interleaving would be lost).
        let command = [shell.clone(), "-c".into(), "exec 2>&1; exec \"$0\" -s".into(), shell];
        let session = host.exec(BUILD, &command, true).map_err(|e| lost(stage, e))?;
        session.write_stdin(stage.script.as_bytes()).map_err(|e| lost(stage, e))?;
        session.close_stdin().map_err(|e| lost(stage, e))?;
        // stdout and stderr interleave in the trace as they arrive, like a terminal.
        while let Some((_, data)) = session.read_output(READ).map_err(|e| lost(stage, e))? {
            host.trace_write(&data);
        }
        session.wait_exit().map_err(|e| lost(stage, e))
    }
}

keel_sdk::export!(Exec: ExecutionStrategy);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_is_checked() {
        let err =
            Exec::configure(Config::from_json(r#"{"shel": "bash"}"#).unwrap()).err().expect("unknown key refused");
        assert!(format!("{err:?}").contains("shel"), "{err:?}");
        let ok = Exec::configure(Config::from_json(r#"{"shell": "bash"}"#).unwrap()).unwrap();
        assert_eq!(ok.shell.as_deref(), Some("bash"));
    }

    #[test]
    fn a_dropped_connection_is_an_error_naming_it() {
        let stage = Stage { name: "step_script".into(), script: String::new() };
        let e = lost(&stage, HostError::Disconnected("stream ended".into()));
        let text = format!("{e:?}");
        assert!(text.contains("lost the connection") && text.contains("step_script"), "{text}");
    }
}
