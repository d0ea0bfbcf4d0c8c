//! The preflight: one exec into the helper, before the first stage, that finds the build
//! container's main process and checks that this helper can enter its namespaces. Its output
//! is a few `key value` lines and then the target's environment; [`Probe::parse`] reads it and
//! [`Probe::into_target`] turns it into what every stage needs, or into a [`Missing`] that says
//! what the image or the cluster lacks.
//!
//! Nothing here runs in the pod but the script; parsing and diagnosis are plain functions so
//! they are tested natively.

/// The environment variable `prepare` gives the build container. The helper finds build's main
/// process as the oldest process carrying it: every process of build inherits it from there,
/// nothing in the helper (or a service, or the pause container) has it, and children always start
/// after their parent.
pub const MARKER: &str = "KEEL_NSENTER_CONTAINER";
pub const MARKER_VALUE: &str = "build";

/// Capability numbers (`linux/capability.h`) the strategy relies on.
pub const CAP_SYS_CHROOT: u32 = 18;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;

/// Tools the preflight and the stage command use in the helper, besides `sh`. All are in
/// util-linux + coreutils and in busybox.
pub const HELPER_TOOLS: [&str; 7] = ["nsenter", "env", "tr", "sed", "cut", "readlink", "cat"];

/// Single-quotes `s` for POSIX sh.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The preflight script (POSIX sh, run in the helper). It changes nothing in the pod: the only
/// thing it starts in the build container is `<shell> -c 'exit 0'` through nsenter, which proves
/// that the namespaces can be joined and that build has the shell.
pub fn script(shell: &str) -> String {
    format!(
        r#"# keel nsenter preflight
marker={marker}
missing=
for tool in {tools}; do
  command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then echo "missing$missing"; exit 0; fi
echo "caps $(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status)"
case "$(nsenter --help 2>&1)" in *--wdns*) echo "wdns yes" ;; *) echo "wdns no" ;; esac
pid= start= unreadable=0
for d in /proc/[0-9]*; do
  env=$(tr '\0' '\n' < "$d/environ" 2>/dev/null) || {{ [ -e "$d" ] && unreadable=$((unreadable + 1)); continue; }}
  case "
$env
" in
    *"
$marker
"*) ;;
    *) continue ;;
  esac
  s=$(sed 's/^.*) //' "$d/stat" 2>/dev/null | cut -d ' ' -f 20)
  [ -n "$s" ] || continue
  if [ -z "$pid" ] || [ "$s" -lt "$start" ]; then pid=${{d#/proc/}}; start=$s; fi
done
echo "unreadable $unreadable"
[ -n "$pid" ] || exit 0
echo "pid $pid"
sed -n 's/^Uid:[[:space:]]*[0-9]*[[:space:]]*\([0-9]*\).*/uid \1/p; s/^Gid:[[:space:]]*[0-9]*[[:space:]]*\([0-9]*\).*/gid \1/p' "/proc/$pid/status"
echo "cwd $(readlink "/proc/$pid/cwd" 2>/dev/null)"
if out=$(nsenter -t "$pid" -m -u -i -n -p -- {shell} -c 'exit 0' 2>&1); then
  echo "enter ok"
else
  echo "enter failed $?"
  printf '%s\n' "$out" | sed 's/^/said /'
fi
echo environ
cat "/proc/$pid/environ"
"#,
        marker = shell_quote(&format!("{MARKER}={MARKER_VALUE}")),
        tools = HELPER_TOOLS.join(" "),
        shell = shell_quote(shell),
    )
}

/// How the trial nsenter went.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Enter {
    /// The script stopped before it (a tool missing, no target found).
    #[default]
    NotTried,
    Ok,
    Failed {
        code: i32,
        said: String,
    },
}

/// What the preflight reported.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Probe {
    /// Tools not found in the helper's PATH.
    pub missing: Vec<String>,
    /// The helper's effective capabilities (`CapEff`).
    pub caps: Option<u64>,
    /// Whether the helper's nsenter has `--wdns` (util-linux 2.38 and later; busybox has not).
    pub wdns: bool,
    /// Processes whose environment the helper may not read.
    pub unreadable: u32,
    /// Build's main process, in the pod's (shared) PID namespace.
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Its working directory, as the helper's /proc shows it (the path inside build).
    pub cwd: Option<String>,
    pub enter: Enter,
    /// Its environment, `KEY=value` each.
    pub environ: Vec<String>,
}

impl Probe {
    pub fn parse(output: &[u8]) -> Probe {
        let (head, environ) = if let Some(rest) = output.strip_prefix(b"environ\n") {
            (&[][..], Some(rest))
        } else {
            match output.windows(9).position(|w| w == b"\nenviron\n") {
                Some(i) => (&output[..i], Some(&output[i + 9..])),
                None => (output, None),
            }
        };
        let mut probe = Probe::default();
        let mut said = Vec::new();
        for line in String::from_utf8_lossy(head).lines() {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "missing" => probe.missing = value.split_whitespace().map(str::to_string).collect(),
                "caps" => probe.caps = u64::from_str_radix(value.trim(), 16).ok(),
                "wdns" => probe.wdns = value == "yes",
                "unreadable" => probe.unreadable = value.parse().unwrap_or(0),
                "pid" => probe.pid = value.parse().ok(),
                "uid" => probe.uid = value.parse().ok(),
                "gid" => probe.gid = value.parse().ok(),
                "cwd" => probe.cwd = Some(value.to_string()).filter(|v| v.starts_with('/')),
                "enter" if value == "ok" => probe.enter = Enter::Ok,
                "enter" => {
                    let code = value.strip_prefix("failed ").and_then(|c| c.trim().parse().ok()).unwrap_or(-1);
                    probe.enter = Enter::Failed { code, said: String::new() };
                }
                "said" => said.push(value.to_string()),
                _ => {}
            }
        }
        if let Enter::Failed { said: s, .. } = &mut probe.enter {
            *s = said.join("\n").trim().to_string();
        }
        probe.environ = environ
            .unwrap_or_default()
            .split(|b| *b == 0)
            .map(|e| String::from_utf8_lossy(e).into_owned())
            // An entry without a name cannot be passed on (and `env` would take it for a command).
            .filter(|e| e.split_once('=').is_some_and(|(k, _)| !k.is_empty()))
            .collect();
        probe
    }

    /// What the stages need, or what is missing for them to run.
    pub fn into_target(self, shell: &str) -> Result<Target, Missing> {
        if !self.missing.is_empty() {
            return Err(Missing::Tools(self.missing));
        }
        let caps = self.caps;
        let Some(pid) = self.pid else {
            return Err(if self.unreadable > 0 {
                Missing::Inspect { unreadable: self.unreadable, caps }
            } else {
                Missing::BuildProcess
            });
        };
        match self.enter {
            Enter::Ok => {}
            Enter::NotTried => return Err(Missing::Incomplete),
            // util-linux and busybox exit 126/127 when they cannot execute the program.
            Enter::Failed { code: 126 | 127, said } => return Err(Missing::Shell { shell: shell.to_string(), said }),
            Enter::Failed { said, .. } => return Err(Missing::Enter { said, caps }),
        }
        Ok(Target {
            pid,
            uid: self.uid.unwrap_or(0),
            gid: self.gid.unwrap_or(0),
            cwd: self.cwd.unwrap_or_else(|| "/".into()),
            wdns: self.wdns,
            environ: self.environ,
        })
    }
}

/// Build's main process and how to enter it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cwd: String,
    pub wdns: bool,
    pub environ: Vec<String>,
}

fn has(caps: Option<u64>, cap: u32) -> bool {
    caps.is_some_and(|c| c & (1 << cap) != 0)
}

fn caps_shown(caps: Option<u64>) -> String {
    caps.map_or_else(|| "unknown".to_string(), |c| format!("{c:016x}"))
}

/// Capabilities nsenter needs that the helper does not hold, by name.
fn lacking(caps: Option<u64>, needed: &[(u32, &'static str)]) -> Vec<&'static str> {
    needed.iter().filter(|(n, _)| !has(caps, *n)).map(|(_, name)| *name).collect()
}

/// Why the stages cannot run, in words that say what the image or the cluster lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Missing {
    #[error(
        "the helper container's image has no {} in its PATH; the nsenter strategy runs every stage through these tools (util-linux and coreutils, or busybox): use a helper image that has them, or another strategy",
        .0.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", ")
    )]
    Tools(Vec<String>),
    #[error(
        "the helper cannot see the build container's processes: {unreadable} process(es) of the pod would not show their environment to it{}",
        match lacking(*caps, &[(CAP_SYS_PTRACE, "CAP_SYS_PTRACE")]).as_slice() {
            [] => format!(" although it holds CAP_SYS_PTRACE (CapEff {}); a seccomp, AppArmor or SELinux profile may forbid it", caps_shown(*caps)),
            _ => format!(" because it lacks CAP_SYS_PTRACE (CapEff {}): the cluster or a policy removed the capability the strategy adds to the helper", caps_shown(*caps)),
        }
    )]
    Inspect { unreadable: u32, caps: Option<u64> },
    #[error(
        "no process of the build container is visible from the helper (none carries {MARKER}={MARKER_VALUE}): the pod does not share one process namespace (the strategy sets shareProcessNamespace: true; did a policy remove it?), or the build container has ended"
    )]
    BuildProcess,
    #[error("the preflight in the helper container stopped before it could try nsenter (its output was cut short)")]
    Incomplete,
    #[error(
        "nsenter joined the build container's namespaces but could not start `{shell}` there: {said}; the build image needs that shell"
    )]
    Shell { shell: String, said: String },
    #[error(
        "nsenter from the helper into the build container's namespaces failed: {said}; {}",
        match lacking(*caps, &[(CAP_SYS_ADMIN, "CAP_SYS_ADMIN"), (CAP_SYS_CHROOT, "CAP_SYS_CHROOT")]).as_slice() {
            [] => format!("the helper holds CAP_SYS_ADMIN and CAP_SYS_CHROOT (CapEff {}), so a seccomp, AppArmor or SELinux profile (or a user namespace) forbids setns here", caps_shown(*caps)),
            names => format!("the helper lacks {} (CapEff {}): the strategy adds what it needs to the helper's securityContext, but the cluster or a policy (a capabilities drop, an admission controller) took them away", names.join(" and "), caps_shown(*caps)),
        }
    )]
    Enter { said: String, caps: Option<u64> },
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_CAPS: u64 = 0xa80425fb;
    const WITH_ADMIN: u64 = DEFAULT_CAPS | 1 << CAP_SYS_ADMIN | 1 << CAP_SYS_PTRACE;

    fn ok_output() -> Vec<u8> {
        let mut out = format!(
            "caps {WITH_ADMIN:016x}\nwdns yes\nunreadable 0\npid 7\nuid 1000\ngid 1000\ncwd /builds/p\nenter ok\nenviron\n"
        )
        .into_bytes();
        out.extend_from_slice(b"PATH=/usr/bin:/bin\0KEEL_NSENTER_CONTAINER=build\0ODD=a\nb=c\0=nameless\0");
        out
    }

    #[test]
    fn a_full_report_parses_into_a_target() {
        let t = Probe::parse(&ok_output()).into_target("sh").expect("target");
        assert_eq!(
            t,
            Target {
                pid: 7,
                uid: 1000,
                gid: 1000,
                cwd: "/builds/p".into(),
                wdns: true,
                environ: vec!["PATH=/usr/bin:/bin".into(), "KEEL_NSENTER_CONTAINER=build".into(), "ODD=a\nb=c".into()],
            }
        );
    }

    #[test]
    fn a_missing_nsenter_is_named() {
        let e = Probe::parse(b"missing nsenter\n").into_target("sh").unwrap_err();
        assert_eq!(e, Missing::Tools(vec!["nsenter".into()]));
        assert!(e.to_string().starts_with("the helper container's image has no `nsenter` in its PATH"), "{e}");
    }

    #[test]
    fn no_build_process_blames_the_shared_namespace_or_ptrace() {
        let e = Probe::parse(b"caps 00000000a80425fb\nwdns yes\nunreadable 0\n").into_target("sh").unwrap_err();
        assert_eq!(e, Missing::BuildProcess);
        assert!(e.to_string().contains("shareProcessNamespace"), "{e}");
        let e = Probe::parse(b"caps 00000000a80425fb\nwdns yes\nunreadable 3\n").into_target("sh").unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("3 process(es)") && text.contains("lacks CAP_SYS_PTRACE (CapEff 00000000a80425fb)"),
            "{text}"
        );
    }

    #[test]
    fn a_refused_setns_names_the_missing_capability() {
        let out = b"caps 00000000a80425fb\nwdns yes\nunreadable 0\npid 9\ncwd /\nenter failed 1\nsaid nsenter: reassociate to namespace 'ns/ipc' failed: Operation not permitted\nenviron\n";
        let e = Probe::parse(out).into_target("sh").unwrap_err();
        assert_eq!(
            e.to_string(),
            "nsenter from the helper into the build container's namespaces failed: nsenter: reassociate to namespace 'ns/ipc' failed: Operation not permitted; \
             the helper lacks CAP_SYS_ADMIN (CapEff 00000000a80425fb): the strategy adds what it needs to the helper's securityContext, but the cluster or a policy \
             (a capabilities drop, an admission controller) took them away"
        );
        // With the capabilities there, something else refused it.
        let out = format!("caps {WITH_ADMIN:x}\npid 9\nenter failed 1\nsaid denied\n");
        let text = Probe::parse(out.as_bytes()).into_target("sh").unwrap_err().to_string();
        assert!(text.contains("seccomp, AppArmor or SELinux"), "{text}");
    }

    #[test]
    fn a_build_image_without_the_shell_is_named() {
        let out = b"caps ffffffffff\npid 9\nenter failed 127\nsaid nsenter: failed to execute bash: No such file or directory\n";
        let e = Probe::parse(out).into_target("bash").unwrap_err();
        assert!(e.to_string().contains("could not start `bash` there"), "{e}");
    }

    #[test]
    fn the_script_quotes_the_shell_and_runs_under_sh() {
        let s = script("it's");
        assert!(s.contains(r#"-- 'it'\''s' -c 'exit 0'"#), "{s}");
        // Syntax check by the system's sh (no execution).
        let st = std::process::Command::new("sh").arg("-n").arg("-c").arg(&s).status().expect("sh");
        assert!(st.success());
    }

    #[test]
    fn the_script_finds_the_oldest_marked_process_on_this_machine() {
        // Two marked processes, parent and child: the parent (older) is the target. Without
        // privileges nsenter may fail here; only the search is checked.
        let mut parent = std::process::Command::new("sh")
            .arg("-c")
            .arg("sleep 30 & wait")
            .env(MARKER, MARKER_VALUE)
            .spawn()
            .expect("spawn marked sh");
        std::thread::sleep(std::time::Duration::from_millis(200));
        let out = std::process::Command::new("sh").arg("-c").arg(script("sh")).output().expect("run preflight");
        parent.kill().ok();
        parent.wait().ok();
        let probe = Probe::parse(&out.stdout);
        if probe.missing.iter().any(|t| t == "nsenter") {
            eprintln!("no nsenter on this machine: search not checked");
            return;
        }
        assert_eq!(probe.pid, Some(parent.id()), "{}", String::from_utf8_lossy(&out.stdout));
        assert!(probe.environ.iter().any(|e| e == "KEEL_NSENTER_CONTAINER=build"), "{probe:?}");
    }
}
