//! `host`: the keel command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use host::job::parse::JobSource;
use host::plugins::Runtime;
use host::render::{self, OutputFormat};
use host::run::{ClusterChoice, RunOptions, Sources};

#[derive(Parser)]
#[command(name = "host", version, about = "Run GitLab CI jobs on Kubernetes, shaped by WebAssembly plugins")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job on a cluster: create its pod, run its scripts through the execution strategy,
    /// stream the masked trace to stdout, clean up. Exit status: 0 success, 1 the script
    /// failed, 2 system failure (config, cluster, pod, plugin), 3 job timeout, 130 cancelled.
    // Boxed: the largest variant by far (clippy::large_enum_variant).
    Run(Box<RunArgs>),
    /// Print the objects (Secrets, Pod, Services) a job would create, after all plugins ran.
    Render(RenderArgs),
    /// Be a GitLab runner: take jobs from the GitLab instances of the config's `[[runners]]`
    /// (executor = "kubernetes") and run them as `run` does. SIGQUIT drains, SIGTERM/SIGINT
    /// cancel the running jobs (twice: at once); every job's objects are removed either way.
    Serve(ServeArgs),
    /// Delete what keel left behind (pods, secrets, services labelled
    /// app.kubernetes.io/managed-by=keel), e.g. after a host was killed with -9.
    Cleanup(CleanupArgs),
    /// Work with plugin components.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// The embedded single-node cluster (the real Kubernetes API on loopback).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Serve the cluster in the foreground and print the path of a kubeconfig for it.
    /// Ctrl-C (or SIGTERM) stops it, kills every container and removes its directories.
    Up(ClusterUpArgs),
    /// Load image archives (docker-archive or OCI layout, as `docker save` and `skopeo copy
    /// ... oci-archive:` write them) into a running embedded cluster, as `kind load` does.
    Load(ClusterLoadArgs),
}

/// The embedded cluster's images and pod network.
#[derive(clap::Args, Clone)]
struct EmbeddedClusterArgs {
    /// How pods are networked: `egress` (IPs of their own, Services, and what the host
    /// reaches, the host's loopback as host.keel.internal; needs slirp4netns),
    /// `bridge` (IPs and Services, no way out of the node) or `none` (each pod only its own
    /// loopback). Default: egress.
    #[arg(long, env = "KEEL_CLUSTER_POD_NETWORK", value_name = "MODE")]
    pod_network: Option<local_cluster::node::PodNetwork>,
    /// Load every image archive in DIR (docker-archive or OCI layout: *.tar, *.tar.gz, *.tgz)
    /// into the embedded cluster at start.
    #[arg(long, env = "KEEL_CLUSTER_IMAGES_FROM", value_name = "DIR")]
    images_from: Option<PathBuf>,
    /// Images not in the embedded cluster's store run on the host's root filesystem instead of
    /// being pulled from their registries (no network needed; `image:` is then only a name).
    #[arg(long, env = "KEEL_CLUSTER_HOST_ROOTFS", num_args = 0..=1, default_missing_value = "true",
          require_equals = true, action = clap::ArgAction::Set)]
    host_rootfs: Option<bool>,
    /// Pull REGISTRY's images from URL first, as containerd's mirrors (e.g.
    /// docker.io=http://127.0.0.1:5000). Repeatable.
    #[arg(long = "registry-mirror", value_name = "REGISTRY=URL", value_parser = local_cluster::node::parse_mirror)]
    registry_mirrors: Vec<(String, String)>,
    /// Reach this registry over plain HTTP (loopback registries always are). Repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// Trust this CA (PEM) for registries' TLS, beside the system's. Repeatable.
    #[arg(long = "registry-ca", value_name = "FILE")]
    registry_cas: Vec<PathBuf>,
    /// Percent of the image store's filesystem in use at which unused images are deleted,
    /// least recently used first (the kubelet's flag; default 85; 100 disables it).
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(0..=100))]
    image_gc_high_threshold: Option<u8>,
    /// Percent of that filesystem the deletion goes down to (below the high threshold; default 80).
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(0..=100))]
    image_gc_low_threshold: Option<u8>,
}

impl EmbeddedClusterArgs {
    /// The embedded cluster's options: these flags over the config's `[embedded_cluster]`
    /// (lists: the flags' entries first, then the file's).
    fn embedded(&self, file: Option<&host::config::EmbeddedCluster>) -> anyhow::Result<local_cluster::ClusterOptions> {
        let file = file.cloned().unwrap_or_default();
        let (high, low) = file.image_gc_thresholds();
        let image_gc = local_cluster::node::ImageGcPolicy::with_thresholds(
            self.image_gc_high_threshold.unwrap_or(high),
            self.image_gc_low_threshold.unwrap_or(low),
        )?;
        let mut mirrors = self.registry_mirrors.clone();
        mirrors.extend(file.registry_mirrors);
        Ok(local_cluster::ClusterOptions {
            image_gc,
            images_from: self.images_from.clone().or(file.images_from),
            host_rootfs: self.host_rootfs.or(file.host_rootfs).unwrap_or(false),
            pod_network: self.pod_network.or(file.pod_network).unwrap_or(local_cluster::node::PodNetwork::Egress),
            registries: local_cluster::node::RegistryOptions {
                mirrors,
                insecure: [self.insecure_registries.clone(), file.insecure_registries].concat(),
                ca_files: [self.registry_cas.clone(), file.registry_cas].concat(),
                docker_config: None,
            },
            ..local_cluster::ClusterOptions::default()
        })
    }
}

/// `[embedded_cluster]` of the config at `path`, if any.
fn embedded_section(path: Option<&std::path::Path>) -> anyhow::Result<Option<host::config::EmbeddedCluster>> {
    Ok(match path {
        Some(path) => host::config::Config::load(path)?.embedded_cluster,
        None => None,
    })
}

#[derive(clap::Args)]
struct ClusterLoadArgs {
    /// Image archives to load.
    #[arg(required = true, value_name = "IMAGE.tar")]
    archives: Vec<PathBuf>,
    /// The embedded cluster's kubeconfig (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "KEEL_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ClusterUpArgs {
    /// Port on 127.0.0.1 (default: a free one).
    #[arg(long, env = "KEEL_CLUSTER_PORT")]
    port: Option<u16>,
    /// Where pods, logs and the kubeconfig live (default: a temporary directory removed at exit).
    #[arg(long, env = "KEEL_CLUSTER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A directory of root filesystems: an image whose name maps to a directory here runs in it.
    #[arg(long, env = "KEEL_CLUSTER_IMAGES_DIR")]
    images_dir: Option<PathBuf>,
    /// Images the node treats as unpullable (ErrImagePull, then ImagePullBackOff). Repeatable.
    #[arg(long = "unavailable-image", value_name = "IMAGE")]
    unavailable_images: Vec<String>,
    /// Images cached on the node that no registry serves: pulls fail (imagePullPolicy Always),
    /// IfNotPresent and Never run them. Repeatable.
    #[arg(long = "cached-unpullable-image", value_name = "IMAGE")]
    cached_unpullable_images: Vec<String>,
    /// Accept this bearer token instead of the client certificate (it replaces the certificate
    /// in the kubeconfig). HTTPS only.
    #[arg(long, env = "KEEL_CLUSTER_TOKEN", conflicts_with = "insecure_no_auth")]
    token: Option<String>,
    /// HTTPS is the default (a CA made at start; the kubeconfig carries it and a client
    /// certificate); kept so older scripts that pass it still work.
    #[arg(long, hide = true, conflicts_with = "insecure_no_auth")]
    tls: bool,
    /// DANGEROUS: serve plain HTTP and accept every request without credentials, so any local
    /// user can run processes as this user and read the cluster's secrets.
    #[arg(long, env = "KEEL_CLUSTER_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
    #[command(flatten)]
    images: EmbeddedClusterArgs,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Show a component's roles, WIT version and size, and whether it loads in this host.
    /// With --config, every entry of that config using the component (every plugin of the
    /// config when no component is given) is loaded as configured there, so a table the
    /// plugin rejects shows with its file and line. Exit status 1 when one does not load.
    Inspect {
        /// The `.wasm` component (optional with --config).
        #[arg(required_unless_present = "config")]
        path: Option<PathBuf>,
        /// A config.toml whose plugin entries are checked.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Where compiled plugins are cached.
        #[arg(long, env = "KEEL_PLUGIN_CACHE")]
        plugin_cache: Option<PathBuf>,
    },
    /// Write a ready plugin crate: the SDK dependency, a size-optimised release profile, a
    /// typed config, the role's trait implemented, native tests, and a README with the build
    /// and `host render` commands.
    New(NewArgs),
}

#[derive(clap::Args)]
struct NewArgs {
    /// The plugin's name (its metadata name and crate name), e.g. `team-policy`.
    name: String,
    /// The role it plays.
    #[arg(long, value_enum, default_value = "pod-mutator")]
    role: host::scaffold::ScaffoldRole,
    /// Where to create it (default: ./NAME). Must not exist or be empty.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Use the SDK at this path instead of the published crate (`keel-sdk = "0.3"`). Default:
    /// this host's own checkout's `sdk/` when the binary was built from one.
    #[arg(long, value_name = "DIR")]
    sdk_path: Option<PathBuf>,
    /// Depend on the published `keel-sdk` even when built from a checkout.
    #[arg(long, conflicts_with = "sdk_path")]
    sdk_from_registry: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Yaml,
    Json,
}

/// What `run` and `render` both take: the job, the config and runner, the plugins.
#[derive(clap::Args, Clone)]
struct JobArgs {
    /// Runner configuration (GitLab Runner's config.toml format); default: built-in defaults.
    #[arg(long, short, env = "KEEL_CONFIG")]
    config: Option<PathBuf>,
    /// Which `[[runners]]` entry, by name (default: the first with executor = "kubernetes").
    #[arg(long, env = "KEEL_RUNNER")]
    runner: Option<String>,
    /// Extra plugin components, run after the config's plugins in the order given. With a
    /// configuration: `P.wasm=CONFIG.toml` (the file is the plugin's table) or
    /// `P.wasm='{ key = "value" }'` (an inline TOML table).
    #[arg(long = "plugin", value_name = "P.wasm[=CONFIG]")]
    plugins: Vec<String>,
    /// The execution strategy: a plugin name (`exec`) or a `.wasm` file.
    #[arg(long, env = "KEEL_STRATEGY", value_name = "NAME|P.wasm")]
    strategy: Option<String>,
    /// The project's `CI_PROJECT_ID`.
    #[arg(long, env = "KEEL_PROJECT_ID", default_value_t = 1)]
    project_id: u64,
    /// Where compiled plugins are cached.
    #[arg(long, env = "KEEL_PLUGIN_CACHE")]
    plugin_cache: Option<PathBuf>,
    /// A single job file, `path/.gitlab-ci.yml#jobname` for one job of a pipeline file, or
    /// `path/.gitlab-ci.yml` for the whole pipeline (`run` only).
    #[arg(value_name = "JOB")]
    job: String,
}

impl JobArgs {
    fn runtime(&self) -> anyhow::Result<Runtime> {
        Runtime::new(self.plugin_cache.clone()).context("cannot start the plugin runtime")
    }

    /// The prepare request for this job; the rest is the command's own.
    fn request(
        self,
        job_id: u64,
        project_path: String,
        object_suffix: String,
        commit: Option<host::sources::Commit>,
        require_strategy: bool,
    ) -> anyhow::Result<host::prepare::PrepareRequest> {
        Ok(host::prepare::PrepareRequest {
            extra_plugins: extra_plugins(&self.plugins)?,
            config: self.config,
            runner: self.runner,
            job: JobSource::from_arg(&self.job).into(),
            strategy: self.strategy,
            job_id,
            project_id: self.project_id,
            project_path,
            object_suffix,
            commit,
            require_strategy,
            pipeline_id: None,
            instance_variables: Vec::new(),
        })
    }
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    job: JobArgs,
    #[command(flatten)]
    images: EmbeddedClusterArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The project's files, copied into $CI_PROJECT_DIR (default: the job file's directory).
    #[arg(long)]
    source: Option<PathBuf>,
    /// Prefix every trace line with an RFC 3339 time.
    #[arg(long)]
    timestamps: bool,
    /// Keep a copy of the trace in this file.
    #[arg(long)]
    trace_file: Option<PathBuf>,
    /// The job's `CI_JOB_ID` (default: random, so concurrent runs never share labels).
    #[arg(long, env = "KEEL_JOB_ID")]
    job_id: Option<u64>,
    /// The project's `group/name` (default: `local/<source dir name>`).
    #[arg(long, env = "KEEL_PROJECT_PATH")]
    project_path: Option<String>,
    /// Pipeline: run only this job and what it needs (repeatable).
    #[arg(long = "job", value_name = "NAME")]
    only_jobs: Vec<String>,
    /// Pipeline: jobs at once.
    #[arg(long = "jobs", value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    parallel: u16,
    /// Pipeline: where each job's trace and artifacts are kept (default: `.keel/` beside the
    /// pipeline file).
    #[arg(long, value_name = "DIR")]
    artifacts_dir: Option<PathBuf>,
    /// Where `cache:` is kept when `[runners.cache]` names no store (default: `.keel/cache/`
    /// beside the job file).
    #[arg(long, env = "KEEL_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// GitLab Runner's config.toml (default: /etc/gitlab-runner/config.toml when it exists,
    /// else ~/.gitlab-runner/config.toml, as gitlab-runner looks).
    #[arg(long, short, env = "KEEL_CONFIG")]
    config: Option<PathBuf>,
    /// For runners whose `[runners.kubernetes]` names no `host`.
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Where compiled plugins are cached.
    #[arg(long, env = "KEEL_PLUGIN_CACHE")]
    plugin_cache: Option<PathBuf>,
    /// Bare mirrors of the repositories jobs fetch, so repeat jobs fetch only what is new
    /// (default: $XDG_CACHE_HOME/keel/git or ~/.cache/keel/git).
    #[arg(long, env = "KEEL_GIT_CACHE")]
    git_cache: Option<PathBuf>,
    #[command(flatten)]
    images: EmbeddedClusterArgs,
}

impl ServeArgs {
    fn config_path(&self) -> PathBuf {
        if let Some(c) = &self.config {
            return c.clone();
        }
        let system = PathBuf::from("/etc/gitlab-runner/config.toml");
        if system.is_file() {
            return system;
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        home.join(".gitlab-runner/config.toml")
    }
}

#[derive(clap::Args)]
struct CleanupArgs {
    /// Only objects created longer ago than this (`90s`, `10m`, `2h`; default: all).
    #[arg(long, value_name = "DURATION")]
    older_than: Option<String>,
    /// Runner configuration, for its `host` (default: the kubeconfig).
    #[arg(long, short, env = "KEEL_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// Which cluster, when the runner config names none (`run`, `serve`, `cleanup`).
#[derive(clap::Args, Clone)]
struct ClusterArgs {
    /// Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "KEEL_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: its current context).
    #[arg(long)]
    context: Option<String>,
}

impl ClusterArgs {
    fn connect(&self, embedded: local_cluster::ClusterOptions) -> host::cluster::ConnectOptions {
        host::cluster::ConnectOptions { kubeconfig: self.kubeconfig.clone(), context: self.context.clone(), embedded }
    }
}

#[derive(clap::Args)]
struct RenderArgs {
    #[command(flatten)]
    job: JobArgs,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "yaml")]
    output: Output,
    /// The job's `CI_JOB_ID`.
    #[arg(long, env = "KEEL_JOB_ID", default_value_t = 1)]
    job_id: u64,
    /// The project's `group/name` (`CI_PROJECT_PATH`; the checkout goes below `builds_dir`).
    #[arg(long, env = "KEEL_PROJECT_PATH", default_value = "local/project")]
    project_path: String,
    /// Print masked variables and registry credentials in clear.
    #[arg(long)]
    show_secrets: bool,
}

/// Logs go to stderr so the trace or rendered output on stdout stays clean. `KEEL_LOG` (an
/// env-filter) wins over the config's `log_level`; `log_format = "json"` gives JSON lines.
fn init_tracing(cli: &Cli) {
    use host::config::{Config, LogFormat, LogLevel};
    let config_path = match &cli.command {
        Command::Run(a) => a.job.config.clone(),
        Command::Render(a) => a.job.config.clone(),
        Command::Serve(a) => Some(a.config_path()),
        _ => None,
    };
    // A long-running service says what it does (runners verified, jobs taken) by default.
    let default_level = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    // Read again (and checked with file:line) by the command itself; here only the two keys.
    let config = config_path.and_then(|p| Config::load(&p).ok());
    let level = match config.as_ref().and_then(|c| c.log_level) {
        Some(LogLevel::Debug) => "debug",
        Some(LogLevel::Info) => "info",
        Some(LogLevel::Warn) => "warn",
        None => default_level,
        Some(LogLevel::Error | LogLevel::Fatal | LogLevel::Panic) => "error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if config.and_then(|c| c.log_format) == Some(LogFormat::Json) {
        builder.json().try_init()
    } else {
        builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init()
    };
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => return run_job(*args).await,
        Command::Serve(args) => return serve(args).await,
        Command::Cleanup(args) => cleanup(args).await?,
        Command::Render(args) => {
            let rt = args.job.runtime()?;
            let req = args.job.request(args.job_id, args.project_path, String::new(), None, false)?;
            let mut rendered = render::render(&rt, &req).await?;
            if !args.show_secrets {
                render::redact(&mut rendered);
            }
            let format = match args.output {
                Output::Yaml => OutputFormat::Yaml,
                Output::Json => OutputFormat::Json,
            };
            print!("{}", render::format(&rendered.objects, format)?);
        }
        Command::Cluster { command: ClusterCommand::Up(args) } => cluster_up(args).await?,
        Command::Cluster { command: ClusterCommand::Load(args) } => cluster_load(args).await?,
        Command::Plugin { command: PluginCommand::Inspect { path, config, plugin_cache } } => {
            return inspect(path, config, plugin_cache).await;
        }
        Command::Plugin { command: PluginCommand::New(args) } => new_plugin(args)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn extra_plugins(args: &[String]) -> anyhow::Result<Vec<host::config::PluginConfig>> {
    Ok(args.iter().map(|a| host::config::PluginConfig::from_arg(a)).collect::<Result<_, _>>()?)
}

async fn inspect(
    path: Option<PathBuf>,
    config: Option<PathBuf>,
    plugin_cache: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let rt = Runtime::new(plugin_cache).context("cannot start the plugin runtime")?;
    let Some(config_path) = config else {
        let path = path.context("give a component or --config")?;
        let inspection = rt.inspect(&path).await.with_context(|| format!("cannot inspect {}", path.display()))?;
        println!("{inspection}");
        return Ok(if inspection.load_error.is_none() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    };
    let config = host::config::Config::load(&config_path)?;
    let same_file =
        |a: &std::path::Path, b: &std::path::Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        };
    let entries: Vec<&host::config::PluginConfig> = config
        .plugins
        .iter()
        .chain(config.runners.iter().filter_map(|r| r.kubernetes.as_ref()).flat_map(|k| &k.plugins))
        .filter(|p| path.as_deref().is_none_or(|path| same_file(&p.path, path)))
        .collect();
    if entries.is_empty() {
        match &path {
            Some(path) => anyhow::bail!("{}: no plugin entry uses {}", config_path.display(), path.display()),
            None => anyhow::bail!("{}: the config has no plugins", config_path.display()),
        }
    }
    let mut all_load = true;
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let spec = host::prepare::plugin_spec(entry);
        let inspection =
            rt.inspect_spec(spec).await.with_context(|| format!("cannot inspect {}", entry.path.display()))?;
        all_load &= inspection.load_error.is_none();
        println!("{inspection}");
    }
    Ok(if all_load { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn new_plugin(args: NewArgs) -> anyhow::Result<()> {
    use host::scaffold::{Scaffold, SdkSource};
    let sdk = if args.sdk_from_registry {
        SdkSource::Registry
    } else {
        match args.sdk_path {
            Some(path) => SdkSource::Path(std::path::absolute(&path).context("cannot resolve --sdk-path")?),
            None => host::scaffold::checkout_sdk().map(SdkSource::Path).unwrap_or(SdkSource::Registry),
        }
    };
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    let scaffold = Scaffold::new(&args.name, args.role, sdk)?;
    let written = scaffold.write(&dir)?;
    for file in &written {
        eprintln!("created {}", file.display());
    }
    println!("{}", scaffold.next_steps(&dir));
    Ok(())
}

/// Ctrl-C and SIGTERM, counted: the first cancels the job, the second skips after_script.
fn interrupts() -> anyhow::Result<tokio::sync::watch::Receiver<u32>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let (tx, rx) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            let n = *tx.borrow() + 1;
            eprintln!(
                "keel: {}",
                if n == 1 {
                    "interrupted: stopping the job (after_script still runs; interrupt again to skip it)"
                } else {
                    "interrupted again: skipping after_script, cleaning up"
                }
            );
            let _ = tx.send(n);
        }
    });
    Ok(rx)
}

async fn run_job(args: RunArgs) -> anyhow::Result<ExitCode> {
    // Signals first: no window where Ctrl-C kills the process without cleanup.
    let interrupts = interrupts()?;
    let rt = args.job.runtime()?;
    let job = JobSource::from_arg(&args.job.job);
    let cache_dir = args.cache_dir.clone().unwrap_or_else(|| {
        job.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new(".")).join(".keel/cache")
    });
    let source_dir = args.source.clone().unwrap_or_else(|| match job.path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    });
    let project_path = project_path(&args, &source_dir);
    if job.job_name.is_none() && is_pipeline_file(&job.path) {
        return run_pipeline(args, rt, job.path, source_dir, project_path, interrupts).await;
    }
    if !args.only_jobs.is_empty() || args.artifacts_dir.is_some() || args.parallel > 1 {
        anyhow::bail!("--job, --jobs and --artifacts-dir apply to a pipeline (a .gitlab-ci.yml without #job)");
    }
    let job_id = args.job_id.unwrap_or_else(|| fastrand::u64(1..1_000_000_000));
    let object_suffix = format!("{job_id}-{}", fastrand::u32(..) % 100_000);
    let commit = host::sources::git_facts(&source_dir);
    let embedded = embedded_section(args.job.config.as_deref())?;
    let req = args.job.request(job_id, project_path, object_suffix, commit, true)?;
    let opts = RunOptions {
        // Authenticated HTTPS with a client certificate: the embedded cluster's default.
        cluster: ClusterChoice::Connect(Box::new(args.cluster.connect(args.images.embedded(embedded.as_ref())?))),
        sources: Sources::Dir(source_dir),
        timestamps: args.timestamps,
        trace_file: args.trace_file,
        color: std::io::IsTerminal::is_terminal(&std::io::stdout()),
        extra_secrets: Vec::new(),
        token_prefixes: Vec::new(),
        on_stage: None,
        on_outcome: None,
        artifacts: None,
        cache_dir: Some(cache_dir),
    };
    let outcome = host::run::run(&rt, req, opts, Box::new(std::io::stdout()), interrupts).await;
    Ok(ExitCode::from(outcome.exit_status()))
}

/// A job file is one job; a file whose top level has no `script` is a pipeline of jobs.
fn is_pipeline_file(path: &std::path::Path) -> bool {
    host::input::read_text_file(path, host::input::limits::YAML_BYTES)
        .map(|text| host::pipeline::plan::is_pipeline(&text))
        .unwrap_or(false)
}

/// `--project-path`, else `local/<source dir name>`.
fn project_path(args: &RunArgs, source_dir: &std::path::Path) -> String {
    args.project_path.clone().unwrap_or_else(|| {
        let name = std::fs::canonicalize(source_dir)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "project".into());
        format!("local/{}", host::pod::dns_label(&name, 63).chars().take(40).collect::<String>())
    })
}

/// `host run .gitlab-ci.yml`: every job (or `--job`s and what they need) on one cluster.
async fn run_pipeline(
    args: RunArgs,
    rt: Runtime,
    path: PathBuf,
    source_dir: PathBuf,
    project_path: String,
    interrupts: tokio::sync::watch::Receiver<u32>,
) -> anyhow::Result<ExitCode> {
    use std::sync::Arc;
    if args.trace_file.is_some() || args.job_id.is_some() {
        anyhow::bail!("--trace-file and --job-id apply to one job; a pipeline keeps each job's trace in its store");
    }
    let commit = host::sources::git_facts(&source_dir);
    let facts = host::pipeline::plan::RunFacts { source_dir: source_dir.clone(), commit: commit.clone() };
    let plan = host::pipeline::plan::load(&path, &facts)?.select(&args.only_jobs)?;
    let (k8s, embedded) = match &args.job.config {
        Some(path) => {
            let config = host::config::Config::load(path)?;
            let k8s = config.runner(args.job.runner.as_deref(), path)?.kubernetes.clone().unwrap_or_default();
            (k8s, config.embedded_cluster)
        }
        None => (host::config::Kubernetes::default(), None),
    };
    let connection = host::cluster::connect(&k8s, &args.cluster.connect(args.images.embedded(embedded.as_ref())?))
        .await
        .context("cannot connect to a cluster for the pipeline")?;
    if connection.embedded.is_some() {
        eprintln!("keel: no cluster configured; started an embedded one for the pipeline");
    }
    let connection = Arc::new(connection);
    let store = args.artifacts_dir.clone().unwrap_or_else(|| match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(".keel"),
        _ => PathBuf::from(".keel"),
    });
    let template = args.job.clone();
    let run_id = fastrand::u32(..) % 100_000;
    let file = path.display().to_string();
    let pipeline_id = u64::from(run_id) + 1;
    let make_request: host::pipeline::MakeRequest = Arc::new(move |planned, job_id| {
        let mut job = template.clone();
        job.job = format!("{file}#{}", planned.source);
        let suffix = format!("{job_id}-{run_id}");
        let mut req = job
            .request(job_id, project_path.clone(), suffix, commit.clone(), true)
            .expect("the plugin arguments were checked before the pipeline started");
        req.pipeline_id = Some(pipeline_id);
        req.instance_variables = planned.variables.clone();
        req
    });
    // Check the plugin arguments once, up front, so no job fails on them half way.
    extra_plugins(&args.job.plugins)?;
    let opts = host::pipeline::PipelineOptions {
        parallel: usize::from(args.parallel),
        store: store.clone(),
        source_dir,
        connection: connection.clone(),
        timestamps: args.timestamps,
        color: std::io::IsTerminal::is_terminal(&std::io::stdout()),
        cache_dir: Some(args.cache_dir.clone().unwrap_or_else(|| store.join("cache"))),
    };
    eprintln!(
        "keel: pipeline {} ({} jobs, {} at a time; traces and artifacts in {})",
        path.display(),
        plan.jobs.len(),
        args.parallel,
        store.display()
    );
    let result = host::pipeline::run(Arc::new(rt), plan, opts, make_request, interrupts).await;
    if let Ok(connection) = Arc::try_unwrap(connection) {
        connection.close().await;
    }
    println!("\n{}", result.table());
    Ok(ExitCode::from(result.exit_status()))
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    use host::serve::{Controller, Metrics, ServeSettings, executor};
    use std::collections::HashMap;
    use std::sync::Arc;
    // Signals first: a SIGTERM from here on cancels jobs and cleans up instead of killing us.
    let controller = Controller::new();
    tokio::spawn(controller.clone().handle_signals().context("cannot listen for signals")?);
    let path = args.config_path();
    let config = host::config::Config::load(&path)?;
    let config_dir = path.parent().map(|p| p.to_path_buf()).unwrap_or_else(|| PathBuf::from("."));
    let settings = ServeSettings::from_config(
        &config,
        &path,
        executor::features(),
        host::serve::settings::system_id(&config_dir),
    )?;
    let rt = Arc::new(Runtime::new(args.plugin_cache.clone()).context("cannot start the plugin runtime")?);
    // One connection per runner, shared by its jobs; runners that name the same cluster (or
    // none, and so the same embedded one) share it.
    let connect = args.cluster.connect(args.images.embedded(config.embedded_cluster.as_ref())?);
    let mut by_cluster: Vec<(Option<String>, Arc<host::cluster::Connection>)> = Vec::new();
    let mut connections = HashMap::new();
    for runner in &settings.runners {
        let k8s = runner.config.kubernetes.clone().unwrap_or_default();
        let key = k8s.host.clone();
        let connection = match by_cluster.iter().find(|(k, _)| *k == key) {
            Some((_, c)) => c.clone(),
            None => {
                let c = host::cluster::connect(&k8s, &connect)
                    .await
                    .with_context(|| format!("runner {:?}: cannot connect to a cluster", runner.name))?;
                if c.embedded.is_some() {
                    eprintln!("keel: runner {:?} names no cluster; started an embedded one for its jobs", runner.name);
                }
                tracing::info!(runner = %runner.name, cluster = %c.via, "serve.cluster_connected");
                let c = Arc::new(c);
                by_cluster.push((key, c.clone()));
                c
            }
        };
        connections.insert(runner.config.name.clone(), connection);
    }
    let git = host::sources::git::GitCache::new(
        args.git_cache.clone().unwrap_or_else(host::sources::git::GitCache::default_dir),
    );
    let executor = Arc::new(executor::Executor::new(rt, path.clone(), connections, git));
    let result = host::serve::serve(settings, executor, controller, Arc::new(Metrics::new())).await;
    for (_, connection) in by_cluster {
        if let Ok(connection) = Arc::try_unwrap(connection) {
            connection.close().await;
        }
    }
    let summary = result?;
    eprintln!("keel: stopped after {} job(s)", summary.jobs_finished);
    if !summary.jobs_abandoned.is_empty() {
        eprintln!("keel: jobs still running at the end of the shutdown grace: {:?}", summary.jobs_abandoned);
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

async fn cleanup(args: CleanupArgs) -> anyhow::Result<()> {
    let older_than = match &args.older_than {
        Some(d) => Some(
            host::vocab::values::parse_duration(d)
                .with_context(|| format!("--older-than {d:?}: not a duration (90s, 10m, 2h)"))?,
        ),
        None => None,
    };
    let k8s = match &args.config {
        Some(path) => {
            let config = host::config::Config::load(path)?;
            config.runner(None, path)?.kubernetes.clone().unwrap_or_default()
        }
        None => host::config::Kubernetes::default(),
    };
    let opts = args.cluster.connect(local_cluster::ClusterOptions::default());
    if k8s.host.is_none() && opts.kubeconfig.is_none() && std::env::var_os("KUBECONFIG").is_none() {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        if !home.join(".kube/config").is_file() && std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            anyhow::bail!("no cluster to clean: give --kubeconfig, KUBECONFIG or a config with `host`");
        }
    }
    let connection = host::cluster::connect(&k8s, &opts).await?;
    let cutoff = older_than
        .map(|d| jiff::Timestamp::now() - jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX));
    let removed = host::cluster::leftovers::remove(&connection.client, cutoff).await;
    connection.close().await;
    let removed = removed?;
    for object in &removed {
        println!("deleted {object}");
    }
    eprintln!("keel cleanup: {} objects removed", removed.len());
    Ok(())
}

async fn cluster_up(args: ClusterUpArgs) -> anyhow::Result<()> {
    use local_cluster::{ClusterOptions, LocalCluster};
    use tokio::signal::unix::{SignalKind, signal};

    // Listen for signals before anything starts, so no window exists where Ctrl-C kills the
    // process without the cluster's cleanup.
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let opts = ClusterOptions {
        port: args.port,
        data_dir: args.data_dir,
        images_dir: args.images_dir,
        unavailable_images: args.unavailable_images,
        cached_unpullable_images: args.cached_unpullable_images,
        token: args.token,
        insecure_unauthenticated: args.insecure_no_auth,
        ..args.images.embedded(None)?
    };
    // `--tls` asks for what is the default now.
    let _ = args.tls;
    if args.insecure_no_auth {
        eprintln!(
            "WARNING: --insecure-no-auth: the cluster serves plain HTTP without authentication; \
             every local user can create pods (running as this user) and read its secrets"
        );
    }
    let cluster = LocalCluster::start(opts).await.context("cannot start the local cluster")?;
    // stdout carries only the kubeconfig path, so `export KUBECONFIG=$(host cluster up &)`-style
    // scripting works; the human-facing line goes to stderr.
    println!("{}", cluster.kubeconfig_path().display());
    eprintln!("local cluster serving {} (Ctrl-C to stop)", cluster.url());
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    eprintln!("stopping: killing containers and removing the cluster's directories");
    cluster.stop().await;
    Ok(())
}

async fn cluster_load(args: ClusterLoadArgs) -> anyhow::Result<()> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await.context("no kubeconfig: give --kubeconfig or set KUBECONFIG")?,
    };
    let client = kube::Client::try_from(config)?;
    for archive in &args.archives {
        let body = std::fs::read(archive).with_context(|| format!("cannot read {}", archive.display()))?;
        let request = http::Request::post(local_cluster::api::images::PATH)
            .header("content-type", "application/x-tar")
            .body(body)?;
        let loaded: serde_json::Value = client
            .request(request)
            .await
            .with_context(|| format!("{}: the cluster refused the archive", archive.display()))?;
        for image in loaded["images"].as_array().into_iter().flatten() {
            let names: Vec<&str> = image["names"].as_array().into_iter().flatten().filter_map(|n| n.as_str()).collect();
            println!("loaded {} {}", image["id"].as_str().unwrap_or("?"), names.join(" "));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli);
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(code) => code,
        Err(error) => {
            // The whole chain: which file/plugin, then why.
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            // Nothing ran: a configuration or invocation problem is a system failure too.
            ExitCode::from(2)
        }
    }
}
