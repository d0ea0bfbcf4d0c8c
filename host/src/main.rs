//! `host`: the keel command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use host::job::parse::JobSource;
use host::plugins::Runtime;
use host::render::{self, OutputFormat, RenderRequest};

#[derive(Parser)]
#[command(name = "host", version, about = "Run GitLab CI jobs on Kubernetes, shaped by WebAssembly plugins")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the objects (Secret, Pod, Services) a job would create, after all plugins ran.
    Render(RenderArgs),
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
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Show a component's roles, WIT version and size, and whether it loads in this host.
    Inspect {
        /// The `.wasm` component.
        path: PathBuf,
        /// Where compiled plugins are cached.
        #[arg(long, env = "KEEL_PLUGIN_CACHE")]
        plugin_cache: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Yaml,
    Json,
}

#[derive(clap::Args)]
struct RenderArgs {
    /// Runner configuration (GitLab Runner's config.toml format).
    #[arg(long, short, env = "KEEL_CONFIG")]
    config: PathBuf,
    /// Which `[[runners]]` entry, by name (default: the first with executor = "kubernetes").
    #[arg(long, env = "KEEL_RUNNER")]
    runner: Option<String>,
    /// Extra plugin components, run after the config's plugins in the order given.
    #[arg(long = "plugin", value_name = "P.wasm")]
    plugins: Vec<PathBuf>,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "yaml")]
    output: Output,
    /// The job's `CI_JOB_ID`.
    #[arg(long, env = "KEEL_JOB_ID", default_value_t = 1)]
    job_id: u64,
    /// The project's `CI_PROJECT_ID`.
    #[arg(long, env = "KEEL_PROJECT_ID", default_value_t = 1)]
    project_id: u64,
    /// The project's `group/name` (`CI_PROJECT_PATH`; the checkout goes below `builds_dir`).
    #[arg(long, env = "KEEL_PROJECT_PATH", default_value = "local/project")]
    project_path: String,
    /// Print masked variables and registry credentials in clear.
    #[arg(long)]
    show_secrets: bool,
    /// Where compiled plugins are cached.
    #[arg(long, env = "KEEL_PLUGIN_CACHE")]
    plugin_cache: Option<PathBuf>,
    /// A single job file, or `path/.gitlab-ci.yml#jobname` for one job of a pipeline file.
    #[arg(value_name = "JOB")]
    job: String,
}

fn init_tracing() {
    // Logs go to stderr so rendered output on stdout stays machine-readable.
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Render(args) => {
            let rt = Runtime::new(args.plugin_cache.clone()).context("cannot start the plugin runtime")?;
            let req = RenderRequest {
                config: args.config,
                runner: args.runner,
                job: JobSource::from_arg(&args.job),
                extra_plugins: args.plugins,
                job_id: args.job_id,
                project_id: args.project_id,
                project_path: args.project_path,
                show_secrets: args.show_secrets,
                plugin_cache: args.plugin_cache,
            };
            let mut rendered = render::render(&rt, &req).await?;
            if !req.show_secrets {
                render::redact(&mut rendered);
            }
            let format = match args.output {
                Output::Yaml => OutputFormat::Yaml,
                Output::Json => OutputFormat::Json,
            };
            print!("{}", render::format(&rendered.objects, format)?);
        }
        Command::Cluster { command: ClusterCommand::Up(args) } => cluster_up(args).await?,
        Command::Plugin { command: PluginCommand::Inspect { path, plugin_cache } } => {
            let rt = Runtime::new(plugin_cache).context("cannot start the plugin runtime")?;
            let inspection = rt.inspect(&path).await.with_context(|| format!("cannot inspect {}", path.display()))?;
            println!("{inspection}");
        }
    }
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
        ..ClusterOptions::default()
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The whole chain: which file/plugin, then why.
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
