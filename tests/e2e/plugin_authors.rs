//! A plugin author's path, end to end with the real `host` binary: names in errors are the
//! plugin's own, `--plugin P.wasm=CONFIG` configures a plugin from the command line, a
//! configuration is checked when plugins load (with the table's `file:line:col`), a crash is
//! logged at ERROR, the Python plugin renders like the Rust one, `host plugin new` gives a
//! crate that builds, tests and renders first try, and the SDK packages for crates.io.

#[path = "../support/mod.rs"]
mod support;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::{host_bin, succeeded, workspace_root};

fn plugin(name: &str) -> PathBuf {
    let path = workspace_root().join("target/plugins").join(format!("{name}.wasm"));
    assert!(path.exists(), "{} is missing: build the plugins with `plugins/build.sh`", path.display());
    path
}

/// Compiled plugins are cached across tests and runs; the Python component alone takes
/// seconds to compile.
fn host(args: &[&str], dir: &Path) -> Output {
    Command::new(host_bin())
        .args(args)
        .current_dir(dir)
        .env("KEEL_PLUGIN_CACHE", workspace_root().join("target/tmp/e2e-authors-plugin-cache"))
        .env_remove("KEEL_CONFIG")
        .env_remove("KEEL_LOG")
        .output()
        .expect("run host")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn failed(o: &Output) -> String {
    assert!(!o.status.success(), "host unexpectedly succeeded:\n{}", text(&o.stdout));
    let err = text(&o.stderr);
    // A plugin's own panic is logged (as a plugin line); the host itself must never panic.
    assert!(!err.lines().any(|l| l.contains("panicked") && !l.contains("plugin")), "host panicked:\n{err}");
    err
}

fn pod_of(yaml: &str) -> serde_json::Value {
    yaml.split("\n---\n")
        .map(|d| d.trim_start_matches("---\n"))
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml_ng::from_str::<serde_json::Value>(d).expect("YAML"))
        .find(|o| o["kind"] == "Pod")
        .expect("a Pod")
}

const JOB: &str = "image: alpine:3.20\nscript:\n  - echo hi\n";

fn job_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("job.yml"), JOB).unwrap();
    dir
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn errors_name_the_plugins_metadata_name_and_the_configs_name_when_it_differs() {
    let dir = job_dir();
    let fault = plugin("fixture-fault");
    // From the command line: the file is fixture-fault.wasm, the plugin calls itself fixture-fault.
    let denied = format!("{}={{ mode = \"deny\" }}", arg(&fault));
    let err = failed(&host(&["render", "--plugin", &denied, "job.yml"], dir.path()));
    assert!(err.contains("plugin `fixture-fault` 0.1.0 denied (pod-mutator): fixture says no"), "{err}");
    // Copied under cargo's artifact name: still the metadata name, never the file stem.
    std::fs::copy(&fault, dir.path().join("team_policy.wasm")).unwrap();
    let err = failed(&host(&["render", "--plugin", "team_policy.wasm={ mode = \"deny\" }", "job.yml"], dir.path()));
    assert!(err.contains("plugin `fixture-fault` 0.1.0 denied"), "{err}");
    assert!(!err.contains("team_policy`"), "{err}");
    // The config's `name` wins, and the plugin's own is shown next to it.
    std::fs::write(
        dir.path().join("config.toml"),
        "[[runners]]\n  name = \"r\"\n  executor = \"kubernetes\"\n  [runners.kubernetes]\n    [[runners.kubernetes.plugins]]\n      name = \"my-policy\"\n      path = \"team_policy.wasm\"\n      config = { mode = \"deny\" }\n",
    )
    .unwrap();
    let err = failed(&host(&["render", "--config", "config.toml", "job.yml"], dir.path()));
    assert!(err.contains("plugin `my-policy` (fixture-fault) 0.1.0 denied (pod-mutator)"), "{err}");
}

#[test]
fn plugin_configuration_from_the_command_line_inline_or_from_a_file() {
    let dir = job_dir();
    let labels = plugin("labels");
    let inline = format!("{}={{ labels = {{ team = \"inline\" }} }}", arg(&labels));
    let out = succeeded(host(&["render", "--plugin", &inline, "job.yml"], dir.path()), "render inline");
    assert_eq!(pod_of(&out)["metadata"]["labels"]["team"], "inline");

    std::fs::write(dir.path().join("labels.toml"), "[labels]\nteam = \"from-file\"\n").unwrap();
    let from_file = format!("{}=labels.toml", arg(&labels));
    let out = succeeded(host(&["render", "--plugin", &from_file, "job.yml"], dir.path()), "render file");
    assert_eq!(pod_of(&out)["metadata"]["labels"]["team"], "from-file");

    // A rejected key in the file is reported at its line in that file.
    std::fs::write(dir.path().join("bad.toml"), "# the labels plugin's table\n\nlables = { team = \"x\" }\n").unwrap();
    let bad = format!("{}=bad.toml", arg(&labels));
    let err = failed(&host(&["render", "--plugin", &bad, "job.yml"], dir.path()));
    assert!(err.contains("bad.toml:3:1: key `lables`: plugin `labels` 0.1.0: configuration rejected"), "{err}");
    // Not TOML: the file's own line and column.
    std::fs::write(dir.path().join("broken.toml"), "labels = {\n").unwrap();
    let broken = format!("{}=broken.toml", arg(&labels));
    let err = failed(&host(&["render", "--plugin", &broken, "job.yml"], dir.path()));
    assert!(err.contains("broken.toml:"), "{err}");
    // `run` takes the same argument: the table reaches the plugin before any cluster work.
    let run = host(&["run", "--plugin", &bad, "job.yml"], dir.path());
    assert_eq!(run.status.code(), Some(2), "a system failure");
    // `run` reports on the trace (stdout), GitLab style.
    let trace = text(&run.stdout);
    assert!(trace.contains("bad.toml:3:1: key `lables`: plugin `labels` 0.1.0: configuration rejected"), "{trace}");
}

#[test]
fn configs_are_checked_when_plugins_load_and_by_inspect_with_the_tables_line() {
    let dir = job_dir();
    let config = format!(
        r#"[[runners]]
  name = "r"
  executor = "kubernetes"
  [runners.kubernetes]
    [[runners.kubernetes.plugins]]
      path = "{}"
      [runners.kubernetes.plugins.config]
        labels = {{ team = "platform" }}
        node_selectr = {{ "kubernetes.io/os" = "linux" }}
"#,
        arg(&plugin("labels"))
    );
    std::fs::write(dir.path().join("config.toml"), config).unwrap();
    let want = "config.toml:9:9: key `runners[0].kubernetes.plugins[0].config.node_selectr`: plugin `labels` 0.1.0: configuration rejected: plugin table: unknown field `node_selectr`";
    let err = failed(&host(&["render", "--config", "config.toml", "job.yml"], dir.path()));
    assert!(err.contains(want), "{err}");

    // inspect without the config: the component loads; with it: the entry does not, and why.
    let alone = host(&["plugin", "inspect", arg(&plugin("labels"))], dir.path());
    assert!(text(&alone.stdout).contains("loads:       yes"), "{}", text(&alone.stdout));
    let checked = host(&["plugin", "inspect", "--config", "config.toml"], dir.path());
    assert_eq!(checked.status.code(), Some(1), "a rejected config fails inspect");
    let out = text(&checked.stdout);
    assert!(out.contains("config:      config.toml:7:7"), "{out}");
    assert!(out.contains(&format!("loads:       no: {want}")), "{out}");

    // A required key missing, with no table at all: pointed at the entry's `path`.
    let fixed =
        std::fs::read_to_string(dir.path().join("config.toml")).unwrap().replace("node_selectr", "node_selector");
    std::fs::write(dir.path().join("config.toml"), fixed).unwrap();
    let ok = host(&["plugin", "inspect", "--config", "config.toml", arg(&plugin("labels"))], dir.path());
    assert!(ok.status.success(), "{}", text(&ok.stdout));
    assert!(text(&ok.stdout).contains("(accepted)"), "{}", text(&ok.stdout));
}

#[test]
fn a_plugin_crash_is_logged_at_error_with_the_trap_and_panic_message() {
    let dir = job_dir();
    let panic = format!("{}={{ mode = \"panic\" }}", arg(&plugin("fixture-fault")));
    // Default log level (warn): the crash must be visible without KEEL_LOG.
    let err = failed(&host(&["render", "--plugin", &panic, "job.yml"], dir.path()));
    let log_line =
        err.lines().find(|l| l.contains("ERROR") && l.contains("plugin stopped")).unwrap_or_else(|| panic!("{err}"));
    assert!(log_line.contains("crashed (trap)") && log_line.contains("fixture panics on purpose"), "{log_line}");
    assert!(err.lines().any(|l| l.contains("WARN") && l.contains("panicked at")), "stderr at WARN: {err}");
}

#[test]
fn the_python_plugin_renders_the_same_pod_as_the_rust_one() {
    let dir = job_dir();
    let config = "{ labels = { team = \"platform\", \"keel.dev/job-id\" = \"hijack\" }, node_selector = { \"kubernetes.io/arch\" = \"amd64\" } }";
    let render = |name: &str| {
        let spec = format!("{}={config}", arg(&plugin(name)));
        pod_of(&succeeded(host(&["render", "--plugin", &spec, "job.yml"], dir.path()), name))
    };
    let python = render("labels-py");
    assert_eq!(python["metadata"]["labels"]["team"], "platform");
    assert_eq!(python["metadata"]["labels"]["keel.dev/job-id"], "1", "existing labels are kept");
    assert_eq!(python["spec"]["nodeSelector"]["kubernetes.io/arch"], "amd64");
    assert_eq!(python, render("labels"), "Python and Rust plugins disagree");

    let inspect = succeeded(host(&["plugin", "inspect", arg(&plugin("labels-py"))], dir.path()), "inspect");
    assert!(inspect.contains("name:        labels-py") && inspect.contains("roles:       pod-mutator"), "{inspect}");
    let typo = format!("{}={{ lables = {{}} }}", arg(&plugin("labels-py")));
    let err = failed(&host(&["render", "--plugin", &typo, "job.yml"], dir.path()));
    assert!(
        err.contains("plugin `labels-py` 0.1.0: configuration rejected: plugin table: unknown field `lables`"),
        "{err}"
    );
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // The generated crate is built as an author builds it, not with this test's settings.
    for var in ["RUSTFLAGS", "CARGO_BUILD_TARGET", "CARGO_ENCODED_RUSTFLAGS", "CARGO_TARGET_DIR"] {
        c.env_remove(var);
    }
    c
}

#[test]
fn plugin_new_gives_a_crate_that_tests_builds_and_renders_first_try() {
    let root = tempfile::tempdir().unwrap();
    // Shared between runs so a second run does not rebuild k8s-openapi; a fresh machine
    // builds it once.
    let target = workspace_root().join("target/e2e-plugin-new");
    let sdk = workspace_root().join("sdk");
    let roles = ["pod-mutator", "pull-policy", "overwrites", "execution-strategy"];
    for role in roles {
        let name = format!("team-{role}");
        let out = host(&["plugin", "new", &name, "--role", role, "--sdk-path", arg(&sdk)], root.path());
        let next = succeeded(out, "plugin new");
        assert!(next.contains("cargo build --release --target wasm32-wasip2"), "{next}");
        let krate = root.path().join(&name);
        for f in ["Cargo.toml", "src/lib.rs", "README.md", "job.yml"] {
            assert!(krate.join(f).is_file(), "{role}: {f} missing");
        }
        let test =
            cargo().args(["test", "--quiet"]).current_dir(&krate).env("CARGO_TARGET_DIR", &target).output().unwrap();
        succeeded(test, &format!("cargo test of the generated {role} crate"));
    }

    // The pod mutator all the way: build the component and render with it.
    let krate = root.path().join("team-pod-mutator");
    let build = cargo()
        .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2"])
        .current_dir(&krate)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    succeeded(build, "cargo build of the generated crate");
    let wasm = target.join("wasm32-wasip2/release/team_pod_mutator.wasm");
    let with_config = format!("{}={{ team = \"platform\" }}", arg(&wasm));
    let out = succeeded(host(&["render", "--plugin", &with_config, "job.yml"], &krate), "render");
    assert_eq!(pod_of(&out)["metadata"]["annotations"]["example.com/team"], "platform");
    // inspect: its own name (not cargo's team_pod_mutator), and that it needs a table.
    let inspect = succeeded(host(&["plugin", "inspect", arg(&wasm)], &krate), "inspect");
    assert!(inspect.contains("name:        team-pod-mutator"), "{inspect}");
    assert!(
        inspect.contains("config:      required (an empty table is rejected: plugin table: missing field `team`)"),
        "{inspect}"
    );
    assert!(inspect.contains("loads:       yes"), "{inspect}");
    // Its required key, missing: the load fails naming the plugin by its own name.
    let err = failed(&host(&["render", "--plugin", arg(&wasm), "job.yml"], &krate));
    assert!(
        err.contains("plugin `team-pod-mutator` 0.1.0: configuration rejected: plugin table: missing field `team`"),
        "{err}"
    );
    // The README's commands are the ones that just worked.
    let readme = std::fs::read_to_string(krate.join("README.md")).unwrap();
    assert!(
        readme.contains(
            "host render --plugin 'target/wasm32-wasip2/release/team_pod_mutator.wasm={ team = \"platform\" }' job.yml"
        ),
        "{readme}"
    );
    // The size profile is in the crate.
    let manifest = std::fs::read_to_string(krate.join("Cargo.toml")).unwrap();
    assert!(manifest.contains("opt-level = \"s\"") && manifest.contains("lto = true"), "{manifest}");
    // The other roles: built, and rendered with the command their README gives.
    for (role, check) in [("pull-policy", "pull"), ("overwrites", "namespace"), ("execution-strategy", "strategy")] {
        let krate = root.path().join(format!("team-{role}"));
        let build = cargo()
            .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2"])
            .current_dir(&krate)
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .unwrap();
        succeeded(build, &format!("cargo build of the generated {role} crate"));
        let wasm = target.join(format!("wasm32-wasip2/release/team_{}.wasm", role.replace('-', "_")));
        let args: Vec<String> = match role {
            "pull-policy" => vec!["--plugin".into(), format!("{}={{ policy = \"if-not-present\" }}", arg(&wasm))],
            "overwrites" => vec!["--plugin".into(), format!("{}={{ namespaces = [\"ci-\"] }}", arg(&wasm))],
            _ => vec!["--strategy".into(), arg(&wasm).to_string()],
        };
        let mut all = vec!["render".to_string()];
        all.extend(args);
        all.push("job.yml".into());
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let pod = pod_of(&succeeded(host(&all, &krate), &format!("render with the {role} plugin")));
        match check {
            "pull" => assert_eq!(pod["spec"]["containers"][0]["imagePullPolicy"], "IfNotPresent", "{pod}"),
            // job.yml asks for KUBERNETES_NAMESPACE_OVERWRITE=ci-blue; the rule accepts it.
            "namespace" => assert_eq!(pod["metadata"]["namespace"], "ci-blue", "{pod}"),
            _ => assert!(pod["spec"]["containers"].as_array().is_some_and(|c| c[0]["name"] == "build"), "{pod}"),
        }
    }

    // Without --sdk-path a crate built from outside a checkout asks crates.io.
    let out = host(&["plugin", "new", "outside", "--sdk-from-registry"], root.path());
    succeeded(out, "plugin new --sdk-from-registry");
    let manifest = std::fs::read_to_string(root.path().join("outside/Cargo.toml")).unwrap();
    assert!(manifest.contains(&format!("keel-sdk = \"{}\"", host::scaffold::SDK_VERSION)), "{manifest}");
    let again = host(&["plugin", "new", "outside"], root.path());
    assert!(text(&again.stderr).contains("exists and is not empty"), "{}", text(&again.stderr));
}

#[test]
fn the_sdk_packages_as_a_crate_that_builds_outside_the_repository() {
    // `cargo package` builds the packaged crate from its .crate file, alone: no workspace
    // inheritance, no `../wit`. k8s-openapi wants a Kubernetes version for a library build;
    // K8S_OPENAPI_ENABLED_VERSION is its documented way for library crates (the SDK leaves the
    // choice to plugin crates).
    // keel-contract (the vocabulary the SDK shares with the host) is published with it: cargo
    // packages both and verifies the SDK against the packaged contract.
    let out = cargo()
        .args(["package", "-p", "keel-contract", "-p", "keel-sdk", "--allow-dirty", "--target-dir"])
        .arg(workspace_root().join("target/e2e-package"))
        .current_dir(workspace_root())
        .env("K8S_OPENAPI_ENABLED_VERSION", "1.34")
        .output()
        .unwrap();
    succeeded(out, "cargo package -p keel-contract -p keel-sdk");
    let list = succeeded(
        cargo()
            .args(["package", "-p", "keel-sdk", "--allow-dirty", "--list"])
            .current_dir(workspace_root())
            .output()
            .unwrap(),
        "cargo package --list",
    );
    assert!(list.lines().any(|l| l == "wit/v0.1.0/plugin.wit"), "{list}");
    assert!(list.lines().any(|l| l == "CHANGELOG.md"), "{list}");
    let manifest = std::fs::read_to_string(workspace_root().join("sdk/Cargo.toml")).unwrap();
    assert!(!manifest.contains(".workspace = true") && !manifest.contains("workspace = true"), "{manifest}");
}
