//! The same pod mutator in two languages, through the host runtime, in one run: `labels`
//! (Rust, keel-sdk) against `labels-py` (Python, componentize-py), with the same config on
//! the same job.
//!
//! - size of the component file;
//! - load, cold: compile with an empty compile cache, link, ask the metadata, configure;
//! - load, cached: the same from the on-disk cache (what every `host` start after the first pays);
//! - per job: instantiate in a fresh store, configure, one `mutate` (pod JSON in and out,
//!   the host's checks) — what each job pays with the plugin loaded;
//! - call: one more `mutate` on the same instance (the role call alone).
//!
//! Run: `cargo bench -p host --bench languages` (needs `plugins/build.sh` first). Prints the
//! Python/Rust ratios of this run besides criterion's report.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use host::plugins::{HostOwned, JobPlugins, Plugin, PluginSpec, Runtime};

const CONFIG: &str = "labels = { team = \"platform\", tier = \"ci\" }\nnode_selector = { disk = \"ssd\" }";
const PLUGINS: [&str; 2] = ["labels", "labels-py"];

fn spec(name: &str) -> PluginSpec {
    PluginSpec { path: support::plugin(name), config: toml::from_str(CONFIG).unwrap(), ..Default::default() }
}

async fn per_job(rt: &Runtime, plugin: &Plugin) {
    let mut jp =
        JobPlugins::new(rt, std::slice::from_ref(plugin), &support::job(), &serde_json::Value::Null).await.unwrap();
    let pod = jp.mutate_pod(support::pod(), &HostOwned::default()).await.unwrap();
    assert_eq!(pod.metadata.labels.unwrap()["team"], "platform");
}

/// Mean of `n` runs after `warm` unmeasured ones.
fn time(warm: u32, n: u32, f: &mut dyn FnMut()) -> Duration {
    for _ in 0..warm {
        f();
    }
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    start.elapsed() / n
}

fn languages(c: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let rt = Runtime::new(Some(cache.path().to_path_buf())).unwrap();

    struct Row {
        size: u64,
        cold: Duration,
        cached: Duration,
        job: Duration,
        call: Duration,
    }
    let mut rows = Vec::new();
    for name in PLUGINS {
        let size = std::fs::metadata(support::plugin(name)).unwrap().len();
        // Cold: a fresh cache directory per sample, so every sample compiles.
        let cold = time(0, 3, &mut || {
            let dir = tempfile::tempdir().unwrap();
            let fresh = Runtime::new(Some(dir.path().to_path_buf())).unwrap();
            tokio.block_on(fresh.load(spec(name))).unwrap();
        });
        tokio.block_on(rt.load(spec(name))).unwrap();
        let cached = time(2, 20, &mut || {
            tokio.block_on(rt.load(spec(name))).unwrap();
        });
        let plugin = tokio.block_on(rt.load(spec(name))).unwrap();
        let job = time(10, 200, &mut || tokio.block_on(per_job(&rt, &plugin)));
        let mut jp = tokio
            .block_on(JobPlugins::new(&rt, std::slice::from_ref(&plugin), &support::job(), &serde_json::Value::Null))
            .unwrap();
        let call = time(10, 500, &mut || {
            tokio.block_on(jp.mutate_pod(support::pod(), &HostOwned::default())).unwrap();
        });
        rows.push(Row { size, cold, cached, job, call });

        let mut group = c.benchmark_group(format!("languages/{name}"));
        group.bench_function("per_job", |b| b.iter(|| tokio.block_on(per_job(&rt, &plugin))));
        group.bench_function("call", |b| {
            b.iter(|| tokio.block_on(jp.mutate_pod(support::pod(), &HostOwned::default())).unwrap())
        });
        group.finish();
    }

    let (rust, py) = (&rows[0], &rows[1]);
    let ratio = |a: Duration, b: Duration| b.as_secs_f64() / a.as_secs_f64();
    println!("\nlanguages summary (this run; Python / Rust):");
    println!(
        "  size            rust {:>10} B   python {:>10} B   {:.1}x",
        rust.size,
        py.size,
        py.size as f64 / rust.size as f64
    );
    println!(
        "  load, cold      rust {:>10.1?}   python {:>10.1?}   {:.1}x",
        rust.cold,
        py.cold,
        ratio(rust.cold, py.cold)
    );
    println!(
        "  load, cached    rust {:>10.1?}   python {:>10.1?}   {:.1}x",
        rust.cached,
        py.cached,
        ratio(rust.cached, py.cached)
    );
    println!("  per job         rust {:>10.1?}   python {:>10.1?}   {:.1}x", rust.job, py.job, ratio(rust.job, py.job));
    println!(
        "  mutate call     rust {:>10.1?}   python {:>10.1?}   {:.1}x",
        rust.call,
        py.call,
        ratio(rust.call, py.call)
    );
}

criterion_group!(benches, languages);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
