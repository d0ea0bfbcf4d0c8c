//! `nsenter`: GoCD's model of running a job. The build container only idles in its own image;
//! the helper, in the same process namespace, runs each stage with `nsenter` into the build
//! container's mount, UTS, IPC, network and PID namespaces, so the job's image needs nothing
//! but a shell and the tooling (nsenter, capabilities) stays in the helper.
//!
//! `prepare`: `shareProcessNamespace: true`; the marker variable [`probe::MARKER`] on build, by
//! which the helper finds build's main process in `/proc`; `SYS_ADMIN`, `SYS_PTRACE` and
//! `SYS_CHROOT` added to the helper's capabilities:
//! - `SYS_ADMIN`: setns(2) into namespaces the helper does not own (every one of them).
//! - `SYS_CHROOT`: setns(2) into a mount namespace also needs it. containerd's default set has
//!   it; it is named so that a `drop: [ALL]` elsewhere in the pod's config does not remove it
//!   (named adds are applied after dropping ALL).
//! - `SYS_PTRACE`: opening `/proc/PID/ns/*` and reading `/proc/PID/environ` of build's process
//!   is a ptrace access check; it passes without the capability only while build runs as the
//!   helper's user with no capability the helper lacks. With it, a build image with `USER 1000`
//!   or extra capabilities still works.
//!
//! The first `run_stage` runs a preflight in the helper (see [`probe`]); where the image or the
//! cluster cannot do this, the job fails there, before any script ran, naming what is missing.
//! Each stage is then one exec into the helper (see [`command`]); its output goes to the trace
//! as it arrives and its exit code is the stage's.
//!
//! What it does when the connection to the API server drops: the job fails at once, naming the
//! lost connection, as `exec` does. It never reports a success it did not see. The stage's
//! processes may still run in the pod; the host stops them (its kill script, exec'd into build,
//! finds them through build's `/tmp/keel-stage-*.pid` and the shared `/proc`) and deletes the pod.

pub mod command;
pub mod probe;

use k8s_openapi::api::core::v1::{Capabilities, EnvVar, Pod, SecurityContext};
use keel_sdk::strategy::HostError;
use keel_sdk::{Config, Context, Error, ExecutionStrategy, Plugin, Stage, StrategyHost};

use probe::{MARKER, MARKER_VALUE, Probe, Target};

/// The container the job's scripts run in, and the one the stages are started from (the
/// host's base pod always has both; names from the SDK, as the host's).
pub use keel_sdk::pod::{BUILD_CONTAINER as BUILD, HELPER_CONTAINER as HELPER};
/// Added to the helper's `securityContext.capabilities.add` (see the crate docs for why each).
pub const HELPER_CAPABILITIES: [&str; 3] = ["SYS_ADMIN", "SYS_PTRACE", "SYS_CHROOT"];
/// Bytes asked for per read: the host delivers what arrived, up to this.
const READ: u32 = 64 * 1024;

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nsenter {
    /// The shell, inside the build container, the stage script is fed to (default `sh`).
    #[serde(default)]
    pub shell: Option<String>,
    /// Build's main process as found by the preflight (the first stage), or why not: a failed
    /// preflight fails every later stage the same way without trying again.
    #[serde(skip)]
    target: Option<Result<Target, String>>,
}

impl Plugin for Nsenter {
    const NAME: &'static str = "nsenter";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(config: Config) -> Result<Self, Error> {
        let plugin: Nsenter = config.parse()?;
        if plugin.shell.as_deref().is_some_and(|s| s.trim().is_empty()) {
            return Err(Error::invalid_config("shell: must name a shell (e.g. \"sh\" or \"bash\"), not be empty"));
        }
        Ok(plugin)
    }
}

impl Nsenter {
    fn shell(&self) -> &str {
        self.shell.as_deref().unwrap_or("sh")
    }
}

fn same_capability(a: &str, b: &str) -> bool {
    let bare = |s: &str| {
        let up = s.to_ascii_uppercase();
        up.strip_prefix("CAP_").map(str::to_string).unwrap_or(up)
    };
    bare(a) == bare(b)
}

/// The pod changes of this strategy (see the crate docs).
pub fn prepare_pod(mut pod: Pod) -> Result<Pod, Error> {
    let spec = pod.spec.as_mut().ok_or_else(|| Error::internal("the host sent a pod without a spec"))?;
    spec.share_process_namespace = Some(true);
    let build = spec
        .containers
        .iter_mut()
        .find(|c| c.name == BUILD)
        .ok_or_else(|| Error::internal(format!("the pod has no `{BUILD}` container")))?;
    let env = build.env.get_or_insert_with(Vec::new);
    env.retain(|e| e.name != MARKER);
    env.push(EnvVar { name: MARKER.into(), value: Some(MARKER_VALUE.into()), ..Default::default() });
    let helper = spec.containers.iter_mut().find(|c| c.name == HELPER).ok_or_else(|| {
        Error::internal(format!(
            "the pod has no `{HELPER}` container to run the stages from (did a pod mutator remove it?)"
        ))
    })?;
    let sc = helper.security_context.get_or_insert_with(SecurityContext::default);
    let add = sc.capabilities.get_or_insert_with(Capabilities::default).add.get_or_insert_with(Vec::new);
    for cap in HELPER_CAPABILITIES {
        if !add.iter().any(|a| same_capability(a, cap)) {
            add.push(cap.to_string());
        }
    }
    // An operator's `drop` stays: if it names one of these the cluster will not grant it, and the
    // preflight says so with the helper's actual capabilities.
    Ok(pod)
}

fn lost(stage: &Stage, what: &str, e: HostError) -> Error {
    match e {
        HostError::Disconnected(why) => Error::internal(format!(
            "lost the connection to the helper container during stage {} ({what}): {why}; the stage's result is unknown",
            stage.name
        )),
        HostError::NoSuchContainer(why) => Error::internal(format!("stage {} ({what}): {why}", stage.name)),
        HostError::Refused(why) => Error::internal(format!("stage {} ({what}): the host refused: {why}", stage.name)),
        HostError::Other(why) => Error::internal(format!("stage {} ({what}): {why}", stage.name)),
    }
}

/// The helper's image, for messages; best effort.
fn helper_image(host: &StrategyHost) -> Option<String> {
    let pod: Pod = serde_json::from_str(&host.pod_status().ok()?).ok()?;
    pod.spec?.containers.into_iter().find(|c| c.name == HELPER)?.image
}

impl Nsenter {
    /// Runs the preflight once (see [`probe`]); later calls return its result.
    fn target(&mut self, stage: &Stage, host: &StrategyHost) -> Result<Target, Error> {
        if let Some(found) = &self.target {
            return found.clone().map_err(Error::internal);
        }
        let what = "the nsenter preflight";
        let command = vec!["sh".to_string(), "-c".to_string(), probe::script(self.shell())];
        let session = host.exec(HELPER, &command, false).map_err(|e| lost(stage, what, e))?;
        let mut out = Vec::new();
        while let Some((_, data)) = session.read_output(READ).map_err(|e| lost(stage, what, e))? {
            out.extend(data);
        }
        let code = session.wait_exit().map_err(|e| lost(stage, what, e))?;
        let found = if code != 0 {
            Err(format!(
                "the nsenter preflight in the helper container exited with {code} before stage {}: {}",
                stage.name,
                String::from_utf8_lossy(&out).trim()
            ))
        } else {
            Probe::parse(&out).into_target(self.shell()).map_err(|missing| {
                let image = helper_image(host).map(|i| format!(" (helper image {i})")).unwrap_or_default();
                format!("cannot run stage {} with the nsenter strategy{image}: {missing}", stage.name)
            })
        };
        self.target = Some(found.clone());
        found.map_err(Error::internal)
    }
}

impl ExecutionStrategy for Nsenter {
    fn prepare(&mut self, _ctx: &Context, pod: Pod) -> Result<Pod, Error> {
        prepare_pod(pod)
    }

    fn run_stage(&mut self, _ctx: &Context, stage: &Stage, host: &StrategyHost) -> Result<i32, Error> {
        let target = self.target(stage, host)?;
        let what = "nsenter into the build container";
        let argv = command::stage_argv(&target, self.shell());
        let session = host.exec(HELPER, &argv, true).map_err(|e| lost(stage, what, e))?;
        session
            .write_stdin(command::stage_stdin(&target, &stage.script).as_bytes())
            .map_err(|e| lost(stage, what, e))?;
        session.close_stdin().map_err(|e| lost(stage, what, e))?;
        // stdout and stderr interleave in the trace as they arrive, like a terminal.
        while let Some((_, data)) = session.read_output(READ).map_err(|e| lost(stage, what, e))? {
            host.trace_write(&data);
        }
        session.wait_exit().map_err(|e| lost(stage, what, e))
    }
}

keel_sdk::export!(Nsenter: ExecutionStrategy);

#[cfg(test)]
mod tests {
    use super::*;
    use keel_sdk::testing;

    #[test]
    fn configuration_is_checked() {
        let err = testing::configure::<Nsenter>("shel = \"bash\"").expect_err("unknown key refused");
        assert!(format!("{err:?}").contains("shel"), "{err:?}");
        let err = testing::configure::<Nsenter>("shell = \" \"").expect_err("empty shell refused");
        assert!(format!("{err}").contains("shell: must name a shell"), "{err}");
        let ok = testing::configure::<Nsenter>("shell = \"bash\"").unwrap();
        assert_eq!(ok.shell(), "bash");
        assert_eq!(testing::configure::<Nsenter>("").unwrap().shell(), "sh");
    }

    #[test]
    fn prepare_shares_the_pid_namespace_marks_build_and_empowers_the_helper() {
        let mut pod = testing::pod();
        let spec = pod.spec.as_mut().unwrap();
        // A service container (the default test job has none).
        spec.containers.push(keel_sdk::k8s_openapi::api::core::v1::Container {
            name: "svc-0".into(),
            image: Some("postgres:16".into()),
            ..Default::default()
        });
        // An operator's own additions and drops stay; a spelling with CAP_ is not doubled.
        spec.containers[1].security_context = Some(SecurityContext {
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "CAP_SYS_PTRACE".into()]),
                drop: Some(vec!["NET_RAW".into()]),
            }),
            ..Default::default()
        });
        spec.containers[0].env = Some(vec![EnvVar { name: "A".into(), value: Some("1".into()), ..Default::default() }]);
        let out = prepare_pod(pod.clone()).expect("prepared");
        let spec = out.spec.as_ref().unwrap();
        assert_eq!(spec.share_process_namespace, Some(true));
        let env: Vec<(String, Option<String>)> =
            spec.containers[0].env.clone().unwrap().into_iter().map(|e| (e.name, e.value)).collect();
        assert_eq!(env, [("A".into(), Some("1".into())), (MARKER.into(), Some("build".into()))]);
        let caps = spec.containers[1].security_context.clone().unwrap().capabilities.unwrap();
        assert_eq!(caps.add.unwrap(), ["NET_ADMIN", "CAP_SYS_PTRACE", "SYS_ADMIN", "SYS_CHROOT"]);
        assert_eq!(caps.drop.unwrap(), ["NET_RAW"]);
        // Only build and helper change; services do not get capabilities or the marker.
        assert_eq!(spec.containers[2], pod.spec.as_ref().unwrap().containers[2]);
        // Idempotent: a second prepare changes nothing more.
        assert_eq!(prepare_pod(out.clone()).unwrap(), out);
        // It survives the host's JSON round trip with the build container kept.
        let json = serde_json::to_string(&out).unwrap();
        let back: Pod = serde_json::from_str(&json).unwrap();
        assert_eq!(back, out);
    }

    #[test]
    fn prepare_without_a_helper_says_so() {
        let mut pod = testing::pod();
        pod.spec.as_mut().unwrap().containers.retain(|c| c.name != HELPER);
        let e = prepare_pod(pod).unwrap_err();
        assert!(e.to_string().contains("no `helper` container"), "{e}");
    }

    #[test]
    fn a_dropped_connection_is_an_error_naming_it() {
        let stage = Stage { name: "step_script".into(), script: String::new() };
        let e = lost(&stage, "nsenter into the build container", HostError::Disconnected("stream ended".into()));
        let text = e.to_string();
        assert!(
            text.contains("lost the connection") && text.contains("step_script") && text.contains("result is unknown"),
            "{text}"
        );
    }
}
