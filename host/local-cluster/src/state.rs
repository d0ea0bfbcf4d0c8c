//! The cluster's state below the HTTP layer: the object store, the node, and the cluster's
//! lifetime. The controllers (`kubelet`, `lifecycle`, `endpoints`) work on it alone; `api` adds
//! who may call and where the cluster listens.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::node::Node;
use crate::store::Store;

pub struct Cluster {
    pub store: Arc<Store>,
    pub node: Node,
    /// Cancelled when the cluster stops: ends watches, log streams and background deletions.
    pub cancel: CancellationToken,
}

/// What the controllers and their background tasks hold.
pub type Shared = Arc<Cluster>;
