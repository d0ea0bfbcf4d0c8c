//! Hostile inputs for the real `host render` binary (issue 10): each case ends in a clean error
//! naming the file, the key and the limit, or in a quick success, under a 2 GiB address space
//! limit. Inputs are generated here, never stored. The only time check is a generous guard
//! against hangs; nothing asserts how fast a case is.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Address space limit for every run, as a container or batch system might set it.
const ADDRESS_SPACE: u64 = 2 << 30;
/// Far longer than any case takes on a loaded 2-core machine; only a hang gets here.
const HANG_GUARD: Duration = Duration::from_secs(120);

const CONFIG: &str =
    "[[runners]]\n  name = \"t\"\n  executor = \"kubernetes\"\n  [runners.kubernetes]\n    namespace = \"ci\"\n";
const JOB: &str = "image: alpine\nscript: [echo hi]\n";

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    /// A clean failure: exit status 2 (the host's status for an error that is not a job's script failing) and no sign of a crash.
    fn clean_error(&self, expected: &[&str]) -> &Self {
        self.no_crash();
        assert_eq!(self.code, Some(2), "expected a clean error, stderr:\n{}", self.head());
        for e in expected {
            assert!(self.stderr.contains(e), "stderr lacks {e:?}:\n{}", self.head());
        }
        self
    }

    fn success(&self) -> &Self {
        self.no_crash();
        assert_eq!(self.code, Some(0), "expected success, stderr:\n{}", self.head());
        self
    }

    fn no_crash(&self) {
        assert!(self.code.is_some(), "killed by a signal (abort?), stderr:\n{}", self.head());
        // The host's own lines; what a plugin prints about itself (its panics, its allocation
        // failures) is tagged with its name and is not the host crashing.
        for line in self.stderr.lines().filter(|l| !l.contains("plugin.name=")) {
            for sign in ["panicked", "overflowed its stack", "memory allocation of", "SIGSEGV", "mmap failed"] {
                assert!(!line.contains(sign), "{sign:?} in stderr:\n{}", self.head());
            }
        }
    }

    fn head(&self) -> String {
        let mut s: String = self.stderr.chars().take(4000).collect();
        if s.len() < self.stderr.len() {
            s.push_str(&format!("... ({} bytes in all)", self.stderr.len()));
        }
        s
    }
}

/// Runs `host render` with `args` under the address space limit.
fn host(args: &[&str], dir: &Path) -> Outcome {
    host_with_log(args, dir, "warn")
}

/// [`host`] with `KEEL_LOG` set to `log`.
fn host_with_log(args: &[&str], dir: &Path, log: &str) -> Outcome {
    let mut child = Command::new("prlimit")
        .arg(format!("--as={ADDRESS_SPACE}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_host"))
        .arg("render")
        .args(args)
        .current_dir(dir)
        .env("KEEL_PLUGIN_CACHE", support::cache_dir())
        .env("KEEL_LOG", log)
        .env_remove("KEEL_PLUGIN_POOL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run prlimit (util-linux) and the host binary");
    // Drain both pipes on their own threads so a chatty child never blocks on a full pipe.
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for host") {
            break status;
        }
        if started.elapsed() > HANG_GUARD {
            let _ = child.kill();
            let _ = child.wait();
            panic!("host render {args:?} still running after {HANG_GUARD:?}: a hang");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&out.join().expect("stdout reader")).into_owned();
    let stderr = String::from_utf8_lossy(&err.join().expect("stderr reader")).into_owned();
    Outcome { code: status.code(), stdout, stderr }
}

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Case {
        Case { dir: tempfile::tempdir().expect("temp dir") }
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write input");
        path
    }

    /// `host render -c config.toml <job>`; `job` is relative to the case directory.
    fn render(&self, config: &str, job_name: &str, job: &str) -> Outcome {
        self.file("config.toml", config);
        let arg = job_name.split('#').next().expect("a name");
        self.file(arg, job);
        host(&["-c", "config.toml", job_name], self.dir.path())
    }
}

fn job(text: &str) -> Outcome {
    Case::new().render(CONFIG, "job.yml", text)
}

fn pipeline(text: &str, name: &str) -> Outcome {
    Case::new().render(CONFIG, &format!(".gitlab-ci.yml#{name}"), text)
}

fn config(text: &str) -> Outcome {
    Case::new().render(text, "job.yml", JOB)
}

fn chain(jobs: usize) -> String {
    let mut text = String::from(".j0:\n  image: alpine\n  script: [echo]\n");
    for i in 1..=jobs {
        text.push_str(&format!(".j{i}:\n  extends: .j{}\n", i - 1));
    }
    text.push_str(&format!("job:\n  extends: .j{jobs}\n"));
    text
}

// --- sanity -----------------------------------------------------------------------------------

#[test]
fn a_plain_job_renders() {
    job(JOB).success();
}

// --- extends ----------------------------------------------------------------------------------

#[test]
fn extends_5000_deep_is_refused_naming_the_limit() {
    pipeline(&chain(5000), "job").clean_error(&[".gitlab-ci.yml", "key `job.extends`", "11 levels"]);
}

#[test]
fn extends_at_the_limit_works_and_one_more_is_refused() {
    // `job` -> .j10 -> ... -> .j0 is 11 levels.
    pipeline(&chain(10), "job").success();
    pipeline(&chain(11), "job").clean_error(&["11 levels"]);
}

#[test]
fn extends_cycle_is_refused() {
    pipeline(".a:\n  extends: .b\n  script: [x]\n.b:\n  extends: .a\njob:\n  image: alpine\n  extends: .a\n", "job")
        .clean_error(&["loops back"]);
}

#[test]
fn extends_diamonds_merge_once() {
    // 11 levels of 8 parents each: merged per path this would be 8^11 merges.
    let mut text = String::from(".l0:\n  image: alpine\n  script: [echo]\n");
    for level in 1..=10 {
        for k in 0..8 {
            let parents: Vec<String> = (0..8)
                .map(|p| format!("\".l{}{}\"", level - 1, if level == 1 { String::new() } else { format!("-{p}") }))
                .collect();
            text.push_str(&format!(".l{level}-{k}:\n  extends: [{}]\n", parents.join(", ")));
        }
    }
    let top: Vec<String> = (0..8).map(|p| format!("\".l10-{p}\"")).collect();
    text.push_str(&format!("job:\n  extends: [{}]\n", top.join(", ")));
    pipeline(&text, "job").success();
}

// --- expansion --------------------------------------------------------------------------------

#[test]
fn variable_expansion_bomb_is_refused() {
    let v0 = "x".repeat(20_000);
    let v1 = "${V0}".repeat(100_000);
    job(&format!("image: alpine\nscript: [echo]\nvariables:\n  V0: {v0}\n  V1: \"{v1}\"\n")).clean_error(&[
        "job.yml",
        "variables.V1",
        "1.5 MiB",
    ]);
}

// --- regexes ----------------------------------------------------------------------------------

#[test]
fn a_huge_overwrite_regex_is_refused() {
    let pattern = "a".repeat(3 << 20);
    config(&format!("{CONFIG}    namespace_overwrite_allowed = \"{pattern}\"\n")).clean_error(&[
        "config.toml",
        "namespace_overwrite_allowed",
        "4 KiB",
    ]);
}

#[test]
fn a_regex_that_compiles_huge_is_refused() {
    config(&format!("{CONFIG}    namespace_overwrite_allowed = '(\\w{{100}}){{100}}'\n")).clean_error(&[
        "config.toml",
        "namespace_overwrite_allowed",
        "size limit",
    ]);
}

// --- nesting ----------------------------------------------------------------------------------

const DEEP: usize = 100_000;

#[test]
fn deep_flow_lists_are_refused_quickly() {
    job(&format!("image: alpine\nscript: {}{}\n", "[".repeat(DEEP), "]".repeat(DEEP))).clean_error(&[
        "job.yml:2:",
        "(document)",
        "100 levels",
    ]);
}

#[test]
fn deep_flow_maps_are_refused_quickly() {
    job(&format!("image: alpine\nscript: [x]\nvariables: {}{}\n", "{a: ".repeat(DEEP), "}".repeat(DEEP)))
        .clean_error(&["job.yml:3:", "100 levels"]);
}

#[test]
fn deep_extends_list_is_refused_quickly() {
    pipeline(
        &format!("job:\n  image: alpine\n  script: [x]\n  extends: {}.a{}\n", "[".repeat(DEEP), "]".repeat(DEEP)),
        "job",
    )
    .clean_error(&[".gitlab-ci.yml:4:", "100 levels"]);
}

#[test]
fn deep_block_sequences_are_refused_quickly() {
    job(&format!("image: alpine\nscript:\n  {}x\n", "- ".repeat(DEEP))).clean_error(&["job.yml:3:", "100 levels"]);
}

#[test]
fn deep_json_pod_spec_patch_is_refused_quickly() {
    config(&format!(
        "{CONFIG}    [[runners.kubernetes.pod_spec]]\n      name = \"deep\"\n      patch_type = \"json\"\n      patch = '''{}{}'''\n",
        "[".repeat(DEEP),
        "]".repeat(DEEP)
    ))
    .clean_error(&["config.toml", "pod_spec[0].patch", "100 levels"]);
}

#[test]
fn deep_toml_arrays_are_refused_quickly() {
    config(&format!("concurrent = 1\nx = {}{}\n{CONFIG}", "[".repeat(DEEP), "]".repeat(DEEP)))
        .clean_error(&["config.toml:2:", "100 levels"]);
}

#[test]
fn deep_toml_inline_tables_are_refused_quickly() {
    config(&format!("x = {}1{}\n{CONFIG}", "{a = ".repeat(DEEP), "}".repeat(DEEP)))
        .clean_error(&["config.toml:1:", "100 levels"]);
}

#[test]
fn alias_expansion_is_bounded() {
    // "Billion laughs": each level refers to the previous one ten times.
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    text.push_str("job:\n  image: alpine\n  script: [x]\n");
    let out = pipeline(&text, "job");
    out.no_crash();
}

#[test]
fn aliases_of_a_big_mapping_are_refused() {
    // Few alias uses (serde_yaml_ng's repetition limit allows them), each 1,000 nodes.
    let mut text = String::from("job:\n  image: alpine\n  script: [x]\n  variables:\n");
    let map: Vec<String> = (0..1000).map(|i| format!("k{i}: v")).collect();
    text.push_str(&format!("    A: &a {{{}}}\n", map.join(", ")));
    for i in 0..20_000 {
        text.push_str(&format!("    B{i}: *a\n"));
    }
    pipeline(&text, "job").clean_error(&[".gitlab-ci.yml:", "1000000 nodes"]);
}

// --- counts -----------------------------------------------------------------------------------

#[test]
fn five_thousand_services_are_refused() {
    let services: String = (0..5000).map(|i| format!("  - name: svc{i}:1\n")).collect();
    job(&format!("image: alpine\nscript: [x]\nservices:\n{services}")).clean_error(&[
        "job.yml",
        "key `services`",
        "64",
    ]);
}

#[test]
fn five_thousand_config_services_are_refused() {
    let services: String =
        (0..5000).map(|i| format!("    [[runners.kubernetes.services]]\n      name = \"s{i}\"\n")).collect();
    config(&format!("{CONFIG}{services}")).clean_error(&["config.toml", "runners[0].kubernetes.services", "64"]);
}

#[test]
fn many_plugins_and_patches_are_refused() {
    let plugins: String = (0..1000).map(|_| "    [[runners.kubernetes.plugins]]\n      path = \"p.wasm\"\n").collect();
    config(&format!("{CONFIG}{plugins}")).clean_error(&["config.toml", "runners[0].kubernetes.plugins", "32"]);
    let patches: String = (0..50_000).map(|_| "    [[runners.kubernetes.pod_spec]]\n      patch = \"{}\"\n").collect();
    config(&format!("{CONFIG}{patches}")).clean_error(&["config.toml", "runners[0].kubernetes.pod_spec", "100"]);
}

#[test]
fn many_services_within_the_limit_render() {
    let services: String = (0..60).map(|i| format!("  - name: svc{i}:1\n    alias: s{i}\n")).collect();
    job(&format!("image: alpine\nscript: [x]\nservices:\n{services}")).success();
}

#[test]
fn many_variables_are_refused_without_quadratic_time() {
    let vars: String = (0..150_000).map(|i| format!("  V{i}: x\n")).collect();
    job(&format!("image: alpine\nscript: [x]\nvariables:\n{vars}")).clean_error(&[
        "job.yml",
        "key `variables`",
        "5000",
    ]);
}

#[test]
fn many_variables_within_the_limit_render() {
    let mut vars: String = (0..4900).map(|i| format!("  V{i}: \"$V0-{i}\"\n")).collect();
    vars.push_str("  KUBERNETES_POD_LABELS_1: a=b\n");
    job(&format!("image: alpine\nscript: [x]\nvariables:\n{vars}")).success();
}

// --- files ------------------------------------------------------------------------------------

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().expect("run mkfifo");
    assert!(status.success());
}

#[test]
fn a_fifo_as_the_job_is_refused() {
    let case = Case::new();
    case.file("config.toml", CONFIG);
    mkfifo(&case.dir.path().join("job.yml"));
    host(&["-c", "config.toml", "job.yml"], case.dir.path()).clean_error(&["job.yml", "FIFO", "not a regular file"]);
}

#[test]
fn a_fifo_as_the_config_is_refused() {
    let case = Case::new();
    case.file("job.yml", JOB);
    mkfifo(&case.dir.path().join("config.toml"));
    host(&["-c", "config.toml", "job.yml"], case.dir.path()).clean_error(&["config.toml", "FIFO"]);
}

#[test]
fn a_fifo_as_a_patch_file_is_refused() {
    let case = Case::new();
    case.file("job.yml", JOB);
    case.file("config.toml", &format!("{CONFIG}    [[runners.kubernetes.pod_spec]]\n      patch_path = \"p.yaml\"\n"));
    mkfifo(&case.dir.path().join("p.yaml"));
    host(&["-c", "config.toml", "job.yml"], case.dir.path()).clean_error(&["patch_path", "FIFO"]);
}

#[test]
fn a_device_as_the_job_is_refused() {
    let case = Case::new();
    case.file("config.toml", CONFIG);
    host(&["-c", "config.toml", "/dev/zero"], case.dir.path()).clean_error(&["/dev/zero", "a device"]);
}

#[test]
fn a_fifo_as_a_plugin_is_refused() {
    let case = Case::new();
    case.file("config.toml", CONFIG);
    case.file("job.yml", JOB);
    mkfifo(&case.dir.path().join("p.wasm"));
    host(&["-c", "config.toml", "--plugin", "p.wasm", "job.yml"], case.dir.path()).clean_error(&["p.wasm", "FIFO"]);
}

#[test]
fn a_huge_job_file_is_refused() {
    job(&format!("image: alpine\nscript: [x]\n# {}\n", "x".repeat(3 << 20))).clean_error(&["job.yml", "2 MiB"]);
}

#[test]
fn a_huge_config_file_is_refused() {
    config(&format!("{CONFIG}# {}\n", "x".repeat(5 << 20))).clean_error(&["config.toml", "4 MiB"]);
}

#[test]
fn huge_config_annotations_are_refused() {
    config(&format!("{CONFIG}    [runners.kubernetes.pod_annotations]\n      a = \"{}\"\n", "v".repeat(300 << 10)))
        .clean_error(&["config.toml", "pod_annotations", "256 KiB"]);
}

// --- address space ----------------------------------------------------------------------------

#[test]
fn the_sample_renders_with_every_plugin_under_2_gib() {
    let root = support::repo_root();
    for p in support::PLUGINS {
        support::plugin(p);
    }
    let out = host(
        &["-c", &root.join("examples/config.toml").to_string_lossy(), &root.join("examples/job.yml").to_string_lossy()],
        &root,
    );
    out.success();
    assert!(out.stdout.contains("kind: Pod"), "{}", out.stdout);
    // It says what it chose.
    assert!(out.stderr.contains("address space is limited to 2 GiB"), "{}", out.head());
}

// --- plugin output ----------------------------------------------------------------------------

fn fault(mode: &str, extra: &str) -> Outcome {
    let wasm = support::plugin("fixture-fault");
    let case = Case::new();
    case.file(
        "config.toml",
        &format!(
            "{CONFIG}    [[runners.kubernetes.plugins]]\n      name = \"fault\"\n      path = \"{}\"\n{extra}      [runners.kubernetes.plugins.config]\n        mode = \"{mode}\"\n",
            wasm.display()
        ),
    );
    case.file("job.yml", JOB);
    // Plugin log lines are info events.
    host_with_log(&["-c", "config.toml", "job.yml"], case.dir.path(), "info")
}

/// No line of stderr starts like a line the host writes about itself.
fn no_forged_lines(out: &Outcome) {
    for line in out.stderr.lines() {
        assert!(!line.starts_with("2026-01-01T00:00:00.000000Z"), "forged line: {line:?}");
        assert!(!line.contains('\u{1b}'), "escape sequence in: {line:?}");
    }
}

#[test]
fn plugin_log_lines_cannot_forge_host_lines() {
    let out = fault("log-forge", "");
    out.success();
    no_forged_lines(&out);
    assert!(out.stderr.contains("harmless\\n2026-01-01"), "{}", out.head());
}

#[test]
fn a_huge_plugin_log_line_is_cut() {
    let out = fault("log-flood", "");
    out.success();
    assert!(out.stderr.contains("more bytes not shown"), "{}", out.head());
    assert!(out.stderr.len() < 64 << 10, "stderr is {} bytes", out.stderr.len());
}

#[test]
fn a_huge_plugin_stdout_line_is_cut_and_not_buffered() {
    let out = fault("stdout-flood", "      memory_limit = \"128Mi\"\n");
    out.success();
    assert!(out.stderr.contains("more bytes not shown"), "{}", out.head());
    assert!(out.stderr.len() < 64 << 10, "stderr is {} bytes", out.stderr.len());
}

#[test]
fn a_huge_denial_is_escaped_and_cut() {
    let out = fault("long-deny", "");
    out.clean_error(&["plugin `fault`", "denied", "no\\nERROR host: forged", "more bytes not shown"]);
    assert!(out.stderr.len() < 64 << 10, "stderr is {} bytes", out.stderr.len());
    assert!(!out.stderr.lines().any(|l| l.starts_with("ERROR host")), "{}", out.head());
}

#[test]
fn a_huge_returned_pod_is_refused() {
    fault("huge-annotation", "      memory_limit = \"128Mi\"\n").clean_error(&["plugin `fault`", "1.5 MiB"]);
}

#[test]
fn deep_recursion_in_a_plugin_is_a_stack_overflow() {
    fault("deep-recursion", "").clean_error(&["plugin `fault`", "stack overflow"]);
}

#[test]
fn a_plugin_asking_for_more_memory_than_the_address_space_allows_is_capped() {
    // 3 GiB cannot exist under a 2 GiB limit; the memory bomb hits the cap, not the host.
    fault("memory-bomb", "      memory_limit = \"3Gi\"\n")
        .clean_error(&["plugin `fault`", "memory limit of 134217728 bytes"]);
}
