//! Replays the fuzz targets of `host/fuzz` (issue 10) inside `cargo test`: every seed (the
//! repository's own config and job files, golden error inputs, `host/fuzz/seeds/*`) and a
//! fixed number of deterministic mutations of each go through the same target functions
//! libFuzzer drives. A bounded run for CI; `KEEL_FUZZ_ROUNDS=N` mutates longer by hand, and
//! `host/fuzz/README.md` says how to run the real fuzzers.

#[path = "../fuzz/targets.rs"]
mod targets;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Mutations per seed in CI.
const ROUNDS: usize = 40;
/// Whatever `ROUNDS` says, a target's replay stops after this long (a bound, not a check).
const BUDGET: Duration = Duration::from_secs(20);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ is inside the repo").to_path_buf()
}

fn seeds(dirs: &[&str], extensions: &[&str]) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(root().join(dir)) else { continue };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let name = path.to_string_lossy();
            if path.is_file() && (extensions.is_empty() || extensions.iter().any(|e| name.ends_with(e))) {
                out.push((path.clone(), std::fs::read(&path).expect("read seed")));
            }
        }
    }
    assert!(!out.is_empty(), "no seeds in {dirs:?}");
    out
}

/// xorshift64*: deterministic, so a failure found here reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
}

/// Tokens that matter to the parsers under test.
const TOKENS: &[&str] = &[
    "[",
    "]",
    "{",
    "}",
    "[[",
    "]]",
    ",",
    ":",
    ": ",
    "- ",
    "\n",
    "\n  ",
    "'",
    "\"",
    "'''",
    "\"\"\"",
    "#",
    "&a ",
    "*a",
    "<<: *a",
    "!!str ",
    "extends: ",
    "variables:",
    "$",
    "${",
    "$$",
    "}",
    "=",
    "\\",
    "\u{1b}",
    "\u{2028}",
    "\r\n",
    "---\n",
    "...\n",
    "patch = ",
    "[[runners]]",
    "[runners.kubernetes]",
    "executor = \"kubernetes\"",
    "script: [x]",
    "image: alpine",
    "\"apiVersion\":\"v1\"",
    "\"kind\":\"Pod\"",
    "null",
    "1e999",
    "-0",
    "18446744073709551616",
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(6) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                data.splice(at..at, t.iter().copied());
            }
            2 if !data.is_empty() => {
                let end = (at + 1 + rng.below(32)).min(data.len());
                let start = at.min(end);
                data.drain(start..end);
            }
            3 if !data.is_empty() => {
                // Repeat a slice: deep nesting, long keys, many entries.
                let start = rng.below(data.len());
                let end = (start + 1 + rng.below(16)).min(data.len());
                let piece = data[start..end].to_vec();
                let times = 1 + rng.below(200);
                let insert: Vec<u8> = piece.iter().copied().cycle().take(piece.len() * times).collect();
                data.splice(start..start, insert);
            }
            4 => data.truncate(at),
            _ => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                let times = 1 + rng.below(300);
                let insert: Vec<u8> = t.iter().copied().cycle().take(t.len() * times).collect();
                data.splice(at..at, insert);
            }
        }
    }
    data
}

fn replay(name: &str, target: fn(&[u8]), seeds: Vec<(PathBuf, Vec<u8>)>) {
    let rounds = std::env::var("KEEL_FUZZ_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(ROUNDS);
    let budget = if rounds == ROUNDS { BUDGET } else { Duration::MAX };
    let started = Instant::now();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    let mut runs = 0usize;
    for (path, seed) in &seeds {
        target(seed);
        runs += 1;
        for round in 0..rounds {
            if started.elapsed() > budget {
                eprintln!("{name}: time budget reached after {runs} inputs");
                return;
            }
            let input = mutate(&mut rng, seed);
            let outcome = std::panic::catch_unwind(|| target(&input));
            if outcome.is_err() {
                let out = std::env::temp_dir().join(format!("keel-fuzz-{name}-crash"));
                let _ = std::fs::write(&out, &input);
                panic!("{name}: mutation {round} of {} panicked; input saved to {}", path.display(), out.display());
            }
            runs += 1;
        }
    }
    eprintln!("{name}: {runs} inputs");
}

#[test]
fn config_target() {
    let seeds =
        seeds(&["examples", "host/tests/fixtures", "host/tests/config_errors", "host/fuzz/seeds/config"], &[".toml"]);
    replay("config", targets::config, seeds);
}

#[test]
fn job_target() {
    let seeds = seeds(&["examples", "host/tests/job_errors", "host/fuzz/seeds/job"], &[".yml"]);
    replay("job", targets::job, seeds);
}

#[test]
fn plugin_output_target() {
    let mut seeds = seeds(&["host/fuzz/seeds/plugin_output"], &[]);
    seeds.push(("(base pod)".into(), serde_json::to_vec(&targets::pod()).expect("encode")));
    replay("plugin_output", targets::plugin_output, seeds);
}
