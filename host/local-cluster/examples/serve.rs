//! Run the embedded cluster in the foreground, for poking at it with kubectl:
//! `cargo run -p local-cluster --example serve -- [port]`, then
//! `kubectl --kubeconfig <printed path> get pods`. Ctrl-C or SIGTERM stops it and kills every container.

use local_cluster::{ClusterOptions, LocalCluster};

#[tokio::main]
async fn main() {
    let port = std::env::args().nth(1).and_then(|p| p.parse().ok());
    let cluster = match LocalCluster::start(ClusterOptions { port, ..ClusterOptions::default() }).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot start the local cluster: {e}");
            std::process::exit(1);
        }
    };
    println!("{}", cluster.kubeconfig_path().display());
    eprintln!("serving {} (Ctrl-C to stop)", cluster.url());
    // SIGTERM too, so `kill <pid>` also kills the containers and removes the data dir.
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot listen for SIGTERM: {e}");
            cluster.stop().await;
            std::process::exit(1);
        }
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => if let Err(e) = r { eprintln!("cannot wait for Ctrl-C: {e}") },
        _ = term.recv() => {}
    }
    cluster.stop().await;
}
