//! The command each stage runs in the helper, and what goes to its stdin.

use crate::probe::{Target, shell_quote};

/// `env -i <build's environment> nsenter -t PID -m -u -i -n -p [--wdns=DIR] [-S UID] [-G GID]
/// -- <shell>`, run in the helper with the stage script on stdin.
///
/// - `env -i` with the target's own environment: the stage sees what an exec into build would
///   (the image's PATH, the pod's env), never the helper's. The job's variables come from the
///   host-generated script itself (it sources `/keel-vars/env.sh`, mounted in build).
/// - Short options only for the namespaces: util-linux and busybox both have them.
/// - `--wdns` (util-linux 2.38) sets the working directory inside build; a nsenter without it
///   gets a `cd` at the top of the script instead (see [`stage_stdin`]): `-w DIR` would resolve DIR
///   in the helper's filesystem, before the mount namespace changes.
/// - build's user and group: files the stage writes belong to whom they would with an exec into
///   build, and the host's kill script, which runs in build as that user, may signal them. A
///   non-root uid also leaves the stage without the helper's capabilities.
pub fn stage_argv(target: &Target, shell: &str) -> Vec<String> {
    let mut argv = vec!["env".to_string(), "-i".to_string(), "--".to_string()];
    argv.extend(target.environ.iter().cloned());
    argv.extend(["nsenter", "-t"].map(String::from));
    argv.push(target.pid.to_string());
    argv.extend(["-m", "-u", "-i", "-n", "-p"].map(String::from));
    if target.wdns {
        argv.push(format!("--wdns={}", target.cwd));
    }
    if target.gid != 0 {
        argv.extend(["-G".to_string(), target.gid.to_string()]);
    }
    if target.uid != 0 {
        argv.extend(["-S".to_string(), target.uid.to_string()]);
    }
    argv.extend(["--".to_string(), shell.to_string()]);
    argv
}

/// The stage script as sent to the shell's stdin. Its stderr joins stdout first, so the trace
/// keeps the order the script wrote in (two streams would arrive as two channels).
pub fn stage_stdin(target: &Target, script: &str) -> String {
    if target.wdns {
        format!("exec 2>&1\n{script}")
    } else {
        format!("exec 2>&1\ncd {} || exit 1\n{script}", shell_quote(&target.cwd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            pid: 31,
            uid: 0,
            gid: 0,
            cwd: "/builds/group/project".into(),
            wdns: true,
            environ: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into(), "HOME=/root".into()],
        }
    }

    #[test]
    fn root_build_util_linux_nsenter() {
        assert_eq!(
            stage_argv(&target(), "sh"),
            [
                "env",
                "-i",
                "--",
                "PATH=/usr/local/bin:/usr/bin:/bin",
                "HOME=/root",
                "nsenter",
                "-t",
                "31",
                "-m",
                "-u",
                "-i",
                "-n",
                "-p",
                "--wdns=/builds/group/project",
                "--",
                "sh"
            ]
        );
        assert_eq!(stage_stdin(&target(), "echo hi\n"), "exec 2>&1\necho hi\n");
    }

    #[test]
    fn a_non_root_build_user_is_kept() {
        let t = Target { uid: 1000, gid: 50, ..target() };
        let argv = stage_argv(&t, "bash");
        let tail: Vec<&str> = argv.iter().skip_while(|a| !a.starts_with("--wdns")).map(String::as_str).collect();
        assert_eq!(tail, ["--wdns=/builds/group/project", "-G", "50", "-S", "1000", "--", "bash"]);
    }

    #[test]
    fn without_wdns_the_script_changes_directory_itself() {
        let t = Target { wdns: false, cwd: "/it's here".into(), ..target() };
        assert!(!stage_argv(&t, "sh").iter().any(|a| a.starts_with("--wd")));
        assert_eq!(stage_stdin(&t, "echo hi\n"), "exec 2>&1\ncd '/it'\\''s here' || exit 1\necho hi\n");
    }
}
