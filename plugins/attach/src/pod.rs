//! `prepare`: what only the attach strategy needs in the job's pod.

use keel_sdk::Error;
use keel_sdk::k8s_openapi::api::core::v1::{Container, EmptyDirVolumeSource, Pod, Volume, VolumeMount};

use crate::protocol::{DETECT_SHELL, Paths, quote};

/// The containers of the host's base pod this strategy uses (names from the SDK, as the host's).
pub use keel_sdk::pod::{BUILD_CONTAINER as BUILD, HELPER_CONTAINER as HELPER};
/// The init container that creates the log file.
pub const INIT_CONTAINER: &str = "init-logs";
/// Volume names the host reserves for this strategy (operators cannot reuse them).
pub const SCRIPTS_VOLUME: &str = "scripts";
pub const LOGS_VOLUME: &str = "logs";
pub const SCRIPTS_DIR: &str = "/keel-scripts";
pub const LOGS_DIR: &str = "/keel-logs";

/// The files in the pod.
pub fn paths() -> Paths {
    Paths { scripts: SCRIPTS_DIR.into(), log: format!("{LOGS_DIR}/output.log") }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount { name: name.into(), mount_path: path.into(), ..Default::default() }
}

fn add_mount(c: &mut Container, m: VolumeMount) {
    let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
    if !mounts.iter().any(|x| x.mount_path == m.mount_path) {
        mounts.push(m);
    }
}

/// The scripts and logs emptyDirs in build and helper, `stdin` (no TTY) on both, build's PID 1
/// a shell found at run time, and an init container (helper image) that creates the log file
/// writable by whatever user build runs as.
pub fn prepare(mut pod: Pod) -> Result<Pod, Error> {
    let spec = pod.spec.as_mut().ok_or_else(|| Error::internal("the pod has no spec"))?;
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    for name in [SCRIPTS_VOLUME, LOGS_VOLUME] {
        if volumes.iter().any(|v| v.name == name) {
            return Err(Error::internal(format!(
                "the pod already has a volume named `{name}`, which the attach strategy needs for itself"
            )));
        }
        volumes.push(Volume {
            name: name.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
    }
    let paths = paths();
    let mut helper_image = None;
    for c in spec.containers.iter_mut().filter(|c| c.name == BUILD || c.name == HELPER) {
        add_mount(c, mount(SCRIPTS_VOLUME, SCRIPTS_DIR));
        add_mount(c, mount(LOGS_VOLUME, LOGS_DIR));
        c.stdin = Some(true);
        // Another attach must not close build's stdin; and with a TTY the log would get \r\n.
        c.stdin_once = Some(false);
        c.tty = Some(false);
        if c.name == BUILD {
            c.command = Some(vec!["sh".into(), "-c".into(), DETECT_SHELL.into()]);
            c.args = None;
        } else {
            helper_image = Some(c.clone());
        }
    }
    if !spec.containers.iter().any(|c| c.name == BUILD) {
        return Err(Error::internal("the pod has no `build` container"));
    }
    let helper =
        helper_image.ok_or_else(|| Error::internal("the pod has no `helper` container to read the log from"))?;
    let log = quote(&paths.log);
    let init = Container {
        name: INIT_CONTAINER.into(),
        image: helper.image.clone(),
        image_pull_policy: helper.image_pull_policy.clone(),
        command: Some(vec![
            "sh".into(),
            "-c".into(),
            // The directories may already be open (emptyDirs are 0777) or not ours to change.
            format!(
                "touch {log} && chmod 0666 {log} && {{ chmod 0777 {SCRIPTS_DIR} {LOGS_DIR} 2>/dev/null || true; }}"
            ),
        ]),
        volume_mounts: Some(vec![mount(SCRIPTS_VOLUME, SCRIPTS_DIR), mount(LOGS_VOLUME, LOGS_DIR)]),
        resources: helper.resources.clone(),
        security_context: helper.security_context.clone(),
        ..Default::default()
    };
    let inits = spec.init_containers.get_or_insert_with(Vec::new);
    if inits.iter().any(|c| c.name == INIT_CONTAINER) {
        return Err(Error::internal(format!("the pod already has an init container named `{INIT_CONTAINER}`")));
    }
    inits.insert(0, init);
    Ok(pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "runner-", "namespace": "ci"},
            "spec": {"containers": [
                {"name": "build", "image": "alpine:3.20", "command": ["sh", "-c", "idle"]},
                {"name": "helper", "image": "helper:1", "imagePullPolicy": "IfNotPresent",
                 "securityContext": {"runAsUser": 1000}},
                {"name": "svc-0", "image": "postgres:16"}
            ]}
        }))
        .unwrap()
    }

    #[test]
    fn adds_volumes_stdin_the_shell_and_the_init_container() {
        let pod = prepare(base()).unwrap();
        let spec = pod.spec.unwrap();
        let names: Vec<_> = spec.volumes.unwrap().iter().map(|v| v.name.clone()).collect();
        assert_eq!(names, ["scripts", "logs"]);
        let build = &spec.containers[0];
        assert_eq!((build.stdin, build.stdin_once, build.tty), (Some(true), Some(false), Some(false)));
        assert_eq!(build.command.as_ref().unwrap()[2], DETECT_SHELL);
        assert_eq!(build.volume_mounts.as_ref().unwrap().len(), 2);
        let helper = &spec.containers[1];
        assert_eq!(helper.stdin, Some(true));
        assert_eq!(helper.command, None, "the helper keeps its idle command");
        assert_eq!(spec.containers[2].stdin, None, "services are left alone");
        let init = &spec.init_containers.unwrap()[0];
        assert_eq!(init.name, INIT_CONTAINER);
        assert_eq!(init.image.as_deref(), Some("helper:1"));
        assert_eq!(init.security_context.as_ref().unwrap().run_as_user, Some(1000));
        assert!(init.command.as_ref().unwrap()[2].contains("/keel-logs/output.log"));
    }

    #[test]
    fn a_pod_that_already_uses_the_names_is_refused() {
        let mut pod = base();
        pod.spec.as_mut().unwrap().volumes = Some(vec![Volume { name: "logs".into(), ..Default::default() }]);
        let err = prepare(pod).unwrap_err();
        assert!(format!("{err:?}").contains("`logs`"), "{err:?}");
        let mut pod = base();
        pod.spec.as_mut().unwrap().containers.retain(|c| c.name != "helper");
        assert!(format!("{:?}", prepare(pod).unwrap_err()).contains("helper"));
    }
}
