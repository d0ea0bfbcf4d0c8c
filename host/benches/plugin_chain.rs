//! Per-job plugin cost against the same logic compiled natively, measured in the same run.
//!
//! Chain: `labels` -> `pod-spec` (a strategic patch) -> `fixture-fault` in `echo-variables`
//! mode (annotates the pod with the job's variables), on a pod with build, helper and two
//! service containers.
//!
//! - `per_job/wasm`: what the host pays per job with plugins loaded at startup: instantiate
//!   three components in fresh stores, configure each, run the chain (pod JSON in and out of
//!   each, the host's validation after each step).
//! - `per_job/wasm_on_demand`: the same with wasmtime's on-demand instance allocator instead
//!   of the pooling allocator the host uses (fresh mappings per instance).
//! - `per_job/wasm_pool_unmap`: pooling, but every page unmapped between jobs (no pages kept
//!   resident), to show what each part of the allocator setting buys.
//! - `per_job/wasm_with_cached_load`: the same plus loading all three from the on-disk cache.
//! - `per_job/native`: the plugin crates linked natively: configure each from the same JSON,
//!   run the chain through the same `mutate_json` entry point the component uses, and decode
//!   the result as a Pod after each step (the host's validation).
//! - `compile/cold` vs `compile/cached`: one plugin, empty cache vs warm cache.
//!
//! - `per_job/wasm_alt_build`: only when `PLUGIN_CHAIN_ALT=<dir>` names a directory holding
//!   another build of the same three plugins (e.g. another opt-level), to compare builds in
//!   one run.
//!
//! Run: `cargo bench -p host --bench plugin_chain` (builds the plugins first if needed).
//! Besides criterion's report it prints the wasm/native ratios of this run.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use host::plugins::{Allocation, HostOwned, JobPlugins, Plugin, PluginSpec, Runtime};
use k8s_openapi::api::core::v1::Pod;
use keel_sdk::{Config, PodMutator};

const PATCH: &str = "containers:\n  - name: build\n    env:\n      - name: FROM_PATCH\n        value: \"1\"\n";

fn runner_config() -> serde_json::Value {
    serde_json::json!({ "pod_spec": [{ "name": "env", "patch_type": "strategic", "patch": PATCH }] })
}

/// (plugin file, plugin config TOML)
const CHAIN: [(&str, &str); 3] = [
    ("labels", "labels = { team = \"platform\", tier = \"ci\" }\nnode_selector = { disk = \"ssd\" }"),
    ("pod-spec", ""),
    ("fixture-fault", "mode = \"echo-variables\""),
];

fn specs() -> Vec<PluginSpec> {
    specs_in(None)
}

/// `dir`: another build of the same plugins (see `PLUGIN_CHAIN_ALT` above); default the
/// project's own build in target/plugins.
fn specs_in(dir: Option<&std::path::Path>) -> Vec<PluginSpec> {
    CHAIN
        .iter()
        .map(|(name, config)| PluginSpec {
            name: name.to_string(),
            path: dir.map_or_else(|| support::plugin(name), |d| d.join(format!("{name}.wasm"))),
            config: toml::from_str(config).unwrap(),
            ..Default::default()
        })
        .collect()
}

async fn wasm_job(rt: &Runtime, plugins: &[Plugin], runner: &serde_json::Value) -> Pod {
    let job = support::job();
    let mut jp = JobPlugins::new(rt, plugins, &job, runner).await.unwrap();
    jp.mutate_pod(support::pod(), &HostOwned::label("keel.dev/job")).await.unwrap()
}

async fn wasm_job_with_load(rt: &Runtime, runner: &serde_json::Value) -> Pod {
    let mut plugins = Vec::new();
    for spec in specs() {
        plugins.push(rt.load(spec).await.unwrap());
    }
    wasm_job(rt, &plugins, runner).await
}

/// The SDK context the component would build from the same job (public values only).
fn native_context(runner: &serde_json::Value) -> keel_sdk::Context {
    keel_sdk::Context::for_plugin(&support::job(), runner.clone(), false)
}

fn config_json(toml_text: &str) -> String {
    let table: toml::Table = toml::from_str(toml_text).unwrap();
    serde_json::to_string(&table).unwrap()
}

fn native_step<P: PodMutator>(config: &str, ctx: &keel_sdk::Context, pod: &str) -> String {
    let mut plugin = P::configure(Config::from_json(config).unwrap()).unwrap();
    let out = plugin.mutate_json(ctx, pod).unwrap();
    // The host decodes every step's output as a Pod.
    let _: Pod = serde_json::from_str(&out).unwrap();
    out
}

fn native_job(runner: &serde_json::Value, configs: &[String; 3]) -> Pod {
    let ctx = native_context(runner);
    let pod = serde_json::to_string(&support::pod()).unwrap();
    let pod = native_step::<labels::Labels>(&configs[0], &ctx, &pod);
    let pod = native_step::<pod_spec::PodSpec>(&configs[1], &ctx, &pod);
    let pod = native_step::<fixture_fault::Fault>(&configs[2], &ctx, &pod);
    serde_json::from_str(&pod).unwrap()
}

fn per_job(c: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let rt = Runtime::new(Some(cache.path().to_path_buf())).unwrap();
    let on_demand = Runtime::with_allocation(Some(cache.path().to_path_buf()), Allocation::OnDemand).unwrap();
    let pool_unmap = Runtime::with_allocation(
        Some(cache.path().to_path_buf()),
        Allocation::Pooling { plugin_instances: host::plugins::DEFAULT_PLUGIN_INSTANCES, keep_resident_bytes: 0 },
    )
    .unwrap();
    let runner = runner_config();
    let load_all = |rt: &Runtime| -> Vec<Plugin> {
        tokio.block_on(async {
            let mut v = Vec::new();
            for spec in specs() {
                v.push(rt.load(spec).await.unwrap());
            }
            v
        })
    };
    let plugins = load_all(&rt);
    let plugins_on_demand = load_all(&on_demand);
    let plugins_pool_unmap = load_all(&pool_unmap);
    let alt_dir = std::env::var_os("PLUGIN_CHAIN_ALT").map(std::path::PathBuf::from);
    let plugins_alt: Option<Vec<Plugin>> = alt_dir.as_deref().map(|dir| {
        tokio.block_on(async {
            let mut v = Vec::new();
            for spec in specs_in(Some(dir)) {
                v.push(rt.load(spec).await.unwrap());
            }
            v
        })
    });
    let configs = CHAIN.map(|(_, c)| config_json(c));

    // Same answer both ways, or the comparison is meaningless.
    let wasm_pod = tokio.block_on(wasm_job(&rt, &plugins, &runner));
    let native_pod = native_job(&runner, &configs);
    assert_eq!(wasm_pod, native_pod, "wasm and native chains must produce the same pod");
    assert_eq!(tokio.block_on(wasm_job(&on_demand, &plugins_on_demand, &runner)), native_pod);
    assert_eq!(tokio.block_on(wasm_job(&pool_unmap, &plugins_pool_unmap, &runner)), native_pod);
    if let Some(alt) = &plugins_alt {
        assert_eq!(tokio.block_on(wasm_job(&rt, alt, &runner)), native_pod);
    }

    let mut group = c.benchmark_group("per_job");
    group.bench_function("native", |b| b.iter(|| native_job(&runner, &configs)));
    group.bench_function("wasm", |b| b.iter(|| tokio.block_on(wasm_job(&rt, &plugins, &runner))));
    group.bench_function("wasm_on_demand", |b| {
        b.iter(|| tokio.block_on(wasm_job(&on_demand, &plugins_on_demand, &runner)))
    });
    group.bench_function("wasm_pool_unmap", |b| {
        b.iter(|| tokio.block_on(wasm_job(&pool_unmap, &plugins_pool_unmap, &runner)))
    });
    if let Some(alt) = &plugins_alt {
        group.bench_function("wasm_alt_build", |b| b.iter(|| tokio.block_on(wasm_job(&rt, alt, &runner))));
    }
    group.bench_function("wasm_with_cached_load", |b| b.iter(|| tokio.block_on(wasm_job_with_load(&rt, &runner))));
    group.finish();

    // Ratios of this run, from a plain timed loop over the same functions.
    let time = |f: &mut dyn FnMut()| {
        for _ in 0..20 {
            f();
        }
        let n = 300;
        let start = Instant::now();
        for _ in 0..n {
            f();
        }
        start.elapsed() / n
    };
    let native = time(&mut || {
        native_job(&runner, &configs);
    });
    let wasm = time(&mut || {
        tokio.block_on(wasm_job(&rt, &plugins, &runner));
    });
    let wasm_on_demand = time(&mut || {
        tokio.block_on(wasm_job(&on_demand, &plugins_on_demand, &runner));
    });
    let wasm_pool_unmap = time(&mut || {
        tokio.block_on(wasm_job(&pool_unmap, &plugins_pool_unmap, &runner));
    });
    let wasm_alt = plugins_alt.as_ref().map(|alt| {
        time(&mut || {
            tokio.block_on(wasm_job(&rt, alt, &runner));
        })
    });
    // Where the wasm time goes: instantiating and configuring the three plugins alone.
    let job = support::job();
    let instantiate = time(&mut || {
        tokio.block_on(JobPlugins::new(&rt, &plugins, &job, &runner)).unwrap();
    });
    let instantiate_on_demand = time(&mut || {
        tokio.block_on(JobPlugins::new(&on_demand, &plugins_on_demand, &job, &runner)).unwrap();
    });
    let wasm_load = time(&mut || {
        tokio.block_on(wasm_job_with_load(&rt, &runner));
    });
    println!("\nplugin_chain summary (mean per job, this run):");
    println!("  native                  {native:>10.1?}");
    println!(
        "  wasm                    {wasm:>10.1?}   ratio {:.2}x native",
        wasm.as_secs_f64() / native.as_secs_f64()
    );
    println!(
        "  wasm, on-demand alloc   {wasm_on_demand:>10.1?}   ratio {:.2}x native",
        wasm_on_demand.as_secs_f64() / native.as_secs_f64()
    );
    println!(
        "  wasm, pool, no resident {wasm_pool_unmap:>10.1?}   ratio {:.2}x native",
        wasm_pool_unmap.as_secs_f64() / native.as_secs_f64()
    );
    if let (Some(alt), Some(dir)) = (wasm_alt, &alt_dir) {
        println!(
            "  wasm, plugins from {}: {alt:.1?}   ratio {:.2}x native",
            dir.display(),
            alt.as_secs_f64() / native.as_secs_f64()
        );
    }
    println!("  of which instantiate + configure x3: pooling {instantiate:.1?}, on-demand {instantiate_on_demand:.1?}");
    println!(
        "  wasm + cached load x3   {wasm_load:>10.1?}   ratio {:.2}x native",
        wasm_load.as_secs_f64() / native.as_secs_f64()
    );
}

fn compile(c: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let spec = specs().remove(0);
    let warm = tempfile::tempdir().unwrap();
    let warm_rt = Runtime::new(Some(warm.path().to_path_buf())).unwrap();
    tokio.block_on(warm_rt.load(spec.clone())).unwrap();

    let mut group = c.benchmark_group("compile");
    group.sample_size(10).measurement_time(Duration::from_secs(20));
    group.bench_function("cold", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                let rt = Runtime::new(Some(dir.path().to_path_buf())).unwrap();
                (dir, rt)
            },
            |(dir, rt)| {
                tokio.block_on(rt.load(spec.clone())).unwrap();
                drop(dir);
            },
            criterion::BatchSize::PerIteration,
        )
    });
    group.bench_function("cached", |b| b.iter(|| tokio.block_on(warm_rt.load(spec.clone())).unwrap()));
    group.finish();

    let cold = {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new(Some(dir.path().to_path_buf())).unwrap();
        let start = Instant::now();
        tokio.block_on(rt.load(spec.clone())).unwrap();
        start.elapsed()
    };
    let start = Instant::now();
    let n = 20;
    for _ in 0..n {
        tokio.block_on(warm_rt.load(spec.clone())).unwrap();
    }
    let cached = start.elapsed() / n;
    println!("\ncompile summary (labels.wasm, this run):");
    println!("  cold compile + load     {cold:>10.1?}");
    println!(
        "  cached load             {cached:>10.1?}   cold/cached {:.0}x",
        cold.as_secs_f64() / cached.as_secs_f64()
    );
}

criterion_group!(benches, per_job, compile);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
