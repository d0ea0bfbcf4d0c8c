//! The strategy against the SDK's fake host (resume, markers, resend, refusals), and the
//! pod-side shell run for real with `sh` in a temporary directory.

use std::process::Command;

use keel_sdk::strategy::HostError;
use keel_sdk::strategy::fake::{Call, FakeHost, Scripted};

use super::*;
use crate::protocol::{READER, RS};

const NONCE: &str = "0123abcd";

fn marker(body: &str) -> Vec<u8> {
    let mut m = vec![RS];
    m.extend_from_slice(format!("keel:{NONCE}:{body}").as_bytes());
    m.push(RS);
    m
}

fn strategy() -> Attach {
    Attach::new(Settings::default(), pod::paths(), NONCE.into())
}

fn ctx() -> Context {
    keel_sdk::testing::context(serde_json::json!({}))
}

fn stage(name: &str) -> Stage {
    Stage { name: name.into(), script: "echo hi\n".into() }
}

/// What kind of exec a call is (by the name the strategy gives its `sh -c` scripts).
fn kind(call: &Call) -> &str {
    match call {
        Call::Exec { command, .. } => command.get(3).map(String::as_str).unwrap_or(""),
        Call::Attach { .. } => "attach",
    }
}

fn offset(call: &Call) -> usize {
    match call {
        Call::Exec { command, .. } => command[5].parse().unwrap(),
        Call::Attach { .. } => unreachable!("not a reader"),
    }
}

/// A log of `lines` numbered lines for stage `id` exiting with `code`.
fn log(id: &str, lines: usize, code: i32) -> Vec<u8> {
    let mut log = marker(&format!("start:{id}"));
    for i in 0..lines {
        log.extend_from_slice(format!("line {i}\n").as_bytes());
    }
    log.extend(marker(&format!("exit:{id}:{code}")));
    log
}

#[test]
fn every_byte_arrives_once_and_in_order_across_twenty_drops() {
    let full = log("1-step_script", 200, 7);
    let log_for_fake = full.clone();
    let mut readers = 0;
    let fake = FakeHost::new(move |call| {
        Ok(match kind(call) {
            "keel-read-log" => {
                readers += 1;
                let from = offset(call);
                // Each session delivers 37 bytes in uneven chunks and drops, twenty times.
                if readers <= 20 {
                    let to = (from + 37).min(log_for_fake.len());
                    let mid = from + (to - from) / 3;
                    Scripted::new().stdout(&log_for_fake[from..mid]).stdout(&log_for_fake[mid..to]).disconnect("cut")
                } else {
                    Scripted::new().stdout(&log_for_fake[from..]).exit(0)
                }
            }
            _ => Scripted::new(),
        })
    });
    let mut s = strategy();
    let code = s.run_stage(&ctx(), &stage("step_script"), &fake.host()).unwrap();
    assert_eq!(code, 7);
    let expected: String = (0..200).map(|i| format!("line {i}\n")).collect();
    assert_eq!(String::from_utf8(fake.trace()).unwrap(), expected);
    // Progress resets the back-off: every drop waited the minimum.
    assert_eq!(fake.sleeps(), vec![1000; 20]);
    assert_eq!(s.offset, full.len() as u64);
    // Script written once, started once, then 21 readers, each from where the last one stopped.
    let sessions = fake.sessions();
    assert_eq!(kind(&sessions[0].call), "keel-write-script");
    assert_eq!(sessions[0].stdin, b"echo hi\n");
    assert!(sessions[0].stdin_closed);
    assert_eq!(kind(&sessions[1].call), "attach");
    assert_eq!(sessions.iter().filter(|r| kind(&r.call) == "keel-read-log").count(), 21);
}

#[test]
fn the_next_stage_reads_on_from_the_end_of_the_last_one() {
    let mut first = log("1-step_script", 2, 0);
    first.extend_from_slice(b"late output of a background process\n");
    let first_len = first.len();
    let mut both = first.clone();
    both.extend(log("2-after_script", 1, 0));
    let mut readers = 0;
    let fake = FakeHost::new(move |call| {
        Ok(match kind(call) {
            "keel-read-log" => {
                readers += 1;
                // What the log holds when this reader runs: the second stage starts later.
                let upto = if readers == 1 { first.len() } else { both.len() };
                Scripted::new().stdout(&both[offset(call)..upto]).exit(0)
            }
            _ => Scripted::new(),
        })
    });
    let mut s = strategy();
    assert_eq!(s.run_stage(&ctx(), &stage("step_script"), &fake.host()).unwrap(), 0);
    // What followed the exit marker in the same chunk went to this stage's trace.
    assert_eq!(s.offset as usize, first_len);
    assert_eq!(s.run_stage(&ctx(), &stage("after_script"), &fake.host()).unwrap(), 0);
    let readers: Vec<_> =
        fake.sessions().into_iter().filter(|r| kind(&r.call) == "keel-read-log").map(|r| offset(&r.call)).collect();
    assert_eq!(readers, vec![0, first_len]);
    let text = String::from_utf8(fake.trace()).unwrap();
    assert_eq!(text, "line 0\nline 1\nlate output of a background process\nline 0\n");
}

#[test]
fn a_lost_start_line_is_sent_again_and_a_dropped_attach_is_retried() {
    let full = log("1-step_script", 3, 0);
    let mut attaches = 0;
    let mut readers = 0;
    let fake = FakeHost::new(move |call| {
        Ok(match kind(call) {
            "attach" => {
                attaches += 1;
                if attaches == 1 {
                    // The write may or may not have arrived: the strategy cannot know.
                    Scripted::new().stdin_fails(HostError::Disconnected("cut while writing".into()))
                } else {
                    Scripted::new()
                }
            }
            "keel-read-log" => {
                readers += 1;
                if readers == 1 {
                    // The reader saw no stage start within its wait.
                    Scripted::new().exit(protocol::NOT_STARTED)
                } else {
                    Scripted::new().stdout(&full[offset(call)..]).exit(0)
                }
            }
            _ => Scripted::new(),
        })
    });
    let mut s = strategy();
    assert_eq!(s.run_stage(&ctx(), &stage("step_script"), &fake.host()).unwrap(), 0);
    let starts: Vec<_> = fake.sessions().into_iter().filter(|r| kind(&r.call) == "attach").collect();
    assert_eq!(starts.len(), 3, "first attempt dropped, then sent, then sent again after the reader saw no start");
    // Every attempt is the same guarded line, so the pod starts the stage at most once.
    assert!(starts.iter().all(|r| r.stdin == starts[0].stdin));
    assert!(String::from_utf8_lossy(&starts[0].stdin).contains("set -C"));
}

#[test]
fn reconnects_give_up_after_the_limit_and_refusals_stop_at_once() {
    let fake = FakeHost::new(|call| match kind(call) {
        "keel-read-log" => Err(HostError::Disconnected("connection refused".into())),
        _ => Ok(Scripted::new()),
    });
    let mut s = strategy();
    let err = s.run_stage(&ctx(), &stage("step_script"), &fake.host()).unwrap_err();
    let text = format!("{err:?}");
    assert!(text.contains("lost the connection") && text.contains("12 reconnects failed"), "{text}");
    assert_eq!(fake.sleeps(), vec![1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000, 30000, 30000, 30000]);

    let fake = FakeHost::new(|call| match kind(call) {
        "keel-read-log" => Err(HostError::Refused("the job was cancelled".into())),
        _ => Ok(Scripted::new()),
    });
    let err = strategy().run_stage(&ctx(), &stage("step_script"), &fake.host()).unwrap_err();
    assert!(format!("{err:?}").contains("the job was cancelled"), "{err:?}");
    assert!(fake.sleeps().is_empty());
}

#[test]
fn a_reader_that_cannot_run_names_what_the_helper_image_needs() {
    let fake = FakeHost::new(|call| {
        Ok(match kind(call) {
            "keel-read-log" => Scripted::new().stderr(b"sh: tail: not found").exit(127),
            _ => Scripted::new(),
        })
    });
    let err = strategy().run_stage(&ctx(), &stage("script"), &fake.host()).unwrap_err();
    let text = format!("{err:?}");
    assert!(text.contains("tail: not found") && text.contains("helper image needs"), "{text}");
}

#[test]
fn configuration_is_checked() {
    let bad = Attach::configure(Config::from_json(r#"{"reconect_min_ms": 5}"#).unwrap()).unwrap_err();
    assert!(format!("{bad:?}").contains("reconect_min_ms"), "{bad:?}");
    let bad = Attach::configure(Config::from_json(r#"{"reconnect_min_ms": 50000}"#).unwrap()).unwrap_err();
    assert!(format!("{bad:?}").contains("reconnect_max_ms"), "{bad:?}");
    let ok = Attach::configure(Config::from_json(r#"{"poll_ms": 50}"#).unwrap()).unwrap();
    assert_eq!(ok.settings.poll_ms, 50);
    assert_ne!(ok.nonce, nonce(), "every job gets its own nonce");
}

// --- The pod side, run for real with sh ---

fn sh(script: &str, args: &[String]) -> std::process::Output {
    Command::new("sh").arg("-c").arg(script).arg("keel-test").args(args).output().expect("run sh")
}

/// Runs a start line the way build's shell does (with `KEEL_SHELL` from the detect script).
fn run_start_line(line: &str) {
    let out = Command::new("sh").arg("-c").arg(format!("{line}wait")).env("KEEL_SHELL", "sh").output().expect("sh");
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn the_pod_side_runs_a_stage_once_and_the_reader_streams_it_from_any_offset() {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths {
        scripts: dir.path().join("scripts").display().to_string(),
        log: dir.path().join("output.log").display().to_string(),
    };
    std::fs::create_dir(&paths.scripts).unwrap();
    std::fs::write(&paths.log, b"").unwrap();
    let id = stage_id(1, "step_script");
    // Write the script as the helper exec does.
    let w = paths.write_script(&id);
    let out = Command::new(&w[0])
        .args(&w[1..])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"echo one\nprintf 'partial'\necho ' two'\nexit 7\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!std::path::Path::new(&format!("{}.tmp", paths.script(&id))).exists());
    // The same line twice (a resend after a dropped attach): the stage runs once.
    let line = paths.start_line(&id, NONCE);
    run_start_line(&line);
    run_start_line(&line);
    // Read it all from 0, then again from the middle: the bytes are the file's, unchanged.
    let read = |from: u64| sh(READER, &paths.reader(&id, from, 20, 50)[4..]);
    let all = read(0);
    assert_eq!(all.status.code(), Some(0), "{all:?}");
    assert_eq!(all.stdout, std::fs::read(&paths.log).unwrap());
    let mut parser = MarkerParser::new(NONCE);
    let events = parser.feed(&all.stdout);
    assert_eq!(
        events,
        vec![Event::Started(id.clone()), Event::Output(b"one\npartial two\n".to_vec()), Event::Exited(id.clone(), 7)]
    );
    let tail = read(10);
    assert_eq!(tail.stdout, all.stdout[10..]);
    // A stage whose start never arrived: the reader says so instead of waiting forever.
    let never = stage_id(2, "after_script");
    let out = sh(READER, &paths.reader(&never, all.stdout.len() as u64, 10, 30)[4..]);
    assert_eq!(out.status.code(), Some(protocol::NOT_STARTED), "{out:?}");
    // A script that cannot be opened still ends with an exit marker.
    let missing = stage_id(3, "script");
    run_start_line(&paths.start_line(&missing, NONCE));
    let out = sh(READER, &paths.reader(&missing, all.stdout.len() as u64, 10, 1000)[4..]);
    let events = MarkerParser::new(NONCE).feed(&out.stdout);
    assert!(matches!(events.last(), Some(Event::Exited(s, code)) if *s == missing && *code != 0), "{events:?}");
}

#[test]
fn the_detect_shell_keeps_reading_stdin_and_ends_on_term() {
    use std::io::Write;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(protocol::DETECT_SHELL)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"echo \"shell=$KEEL_SHELL\"\n").unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // TERM to the detect script (PID 1 in the pod) ends it at once, with 0.
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("shell=/"), "{out:?}");
}
