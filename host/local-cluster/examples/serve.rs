//! Run the embedded cluster in the foreground, for poking at it with kubectl:
//! `cargo run -p local-cluster --example serve -- [port]`, then
//! `kubectl --kubeconfig <printed path> get pods`. Ctrl-C stops it and kills every container.

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
    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("cannot wait for Ctrl-C: {e}");
    }
    cluster.stop().await;
}
