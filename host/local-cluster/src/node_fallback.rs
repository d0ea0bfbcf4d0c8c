//! Compile-only stand-in with the node contract's signatures, used only with the
//! `node-fallback` feature while the real `node` module is being written. Never shipped:
//! it runs nothing (every pod stays as the API layer stored it).

use bytes::Bytes;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub images_dir: Option<PathBuf>,
    pub unavailable_images: Vec<String>,
    pub node_name: String,
}
pub type StatusSink = Arc<dyn Fn(&str, PodStatus) + Send + Sync>;
pub type ResolvedVolumes = BTreeMap<String, BTreeMap<String, Vec<u8>>>;
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub command: Vec<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}
#[derive(Debug, Clone, Default)]
pub struct AttachRequest {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    pub follow: bool,
    pub timestamps: bool,
    pub since_time: Option<SystemTime>,
    pub since_seconds: Option<i64>,
    pub tail_lines: Option<i64>,
    pub limit_bytes: Option<i64>,
    pub previous: bool,
}
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("the fallback node runs nothing")]
    Fallback,
    #[error("pod {0} is not on this node")]
    NoSuchPod(String),
}
impl NodeError {
    pub fn status_code(&self) -> u16 {
        500
    }
}
pub struct Session;
#[derive(Clone)]
pub struct Node;
impl Node {
    pub fn new(_cfg: NodeConfig, _on_status: StatusSink) -> Result<Node, NodeError> {
        Ok(Node)
    }
    pub fn run_pod(&self, _pod: Pod, _volumes: ResolvedVolumes) {}
    pub async fn stop_pod(&self, _uid: &str, _grace: Duration) {}
    pub async fn forget_pod(&self, _uid: &str) {}
    pub async fn exec(&self, _uid: &str, _c: &str, _req: ExecRequest) -> Result<Session, NodeError> {
        Err(NodeError::Fallback)
    }
    pub async fn attach(&self, _uid: &str, _c: &str, _req: AttachRequest) -> Result<Session, NodeError> {
        Err(NodeError::Fallback)
    }
    pub async fn logs(&self, _uid: &str, _c: &str, _o: LogOptions) -> Result<BoxStream<'static, Result<Bytes, NodeError>>, NodeError> {
        Err(NodeError::Fallback)
    }
    pub async fn shutdown(&self) {}
}
pub mod stream {
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Protocol {
        V4,
        V5,
    }
    pub async fn serve(_ws: axum::extract::ws::WebSocket, _protocol: Protocol, _session: super::Session) {}
}
