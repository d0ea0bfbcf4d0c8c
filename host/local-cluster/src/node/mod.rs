//! The node: runs a pod's containers as sandboxed local processes and reports their status.
//!
//! CONTRACT between the API layer (`crate::api`, `crate::store`) and the node. Owned by the node
//! side; the API side calls only what is listed here. Signatures may grow (new fields, new
//! methods) but existing ones change only by agreement.
//!
//! ```ignore
//! pub struct NodeConfig {
//!     pub data_dir: PathBuf,               // per-pod directories live under data_dir/pods/<uid>
//!     pub images_dir: Option<PathBuf>,     // images_dir/<image name with / and : mapped> = rootfs
//!     pub unavailable_images: Vec<String>, // image names that fail with ErrImagePull -> ImagePullBackOff
//!     pub node_name: String,
//! }
//! /// Called (from any thread) whenever a pod's status changes; the API layer stores it
//! /// (new resourceVersion, MODIFIED watch event).
//! pub type StatusSink = Arc<dyn Fn(&str /* pod uid */, PodStatus) + Send + Sync>;
//!
//! #[derive(Clone)] pub struct Node { .. }
//! impl Node {
//!     pub fn new(cfg: NodeConfig, on_status: StatusSink) -> Result<Node, NodeError>;
//!     /// The pod is stored, defaulted, has uid/name/namespace. `volumes` carries the data of its
//!     /// configMap and secret volumes (volume name -> key -> bytes), resolved by the API layer.
//!     /// Returns at once; progress is reported through the StatusSink.
//!     pub fn run_pod(&self, pod: Pod, volumes: ResolvedVolumes);
//!     /// TERM every container process, KILL after `grace`; returns once all are gone and the
//!     /// final statuses were reported. Directories are removed by `forget_pod`.
//!     pub async fn stop_pod(&self, uid: &str, grace: Duration);
//!     /// Drop the pod's logs and directories (after the API layer removed the pod).
//!     pub async fn forget_pod(&self, uid: &str);
//!     pub async fn exec(&self, uid: &str, container: &str, req: ExecRequest) -> Result<Session, NodeError>;
//!     pub async fn attach(&self, uid: &str, container: &str, req: AttachRequest) -> Result<Session, NodeError>;
//!     pub async fn logs(&self, uid: &str, container: &str, opts: LogOptions)
//!         -> Result<BoxStream<'static, Result<Bytes, NodeError>>, NodeError>;
//!     /// Kill everything, remove every directory. Idempotent; also run from Drop.
//!     pub async fn shutdown(&self);
//! }
//! /// node::stream::serve runs the k8s channel protocol (v4/v5.channel.k8s.io) over an upgraded
//! /// axum WebSocket for an exec/attach Session, including the final Status on the error channel.
//! pub async fn stream::serve(ws: axum::extract::ws::WebSocket, protocol: stream::Protocol, session: Session);
//! ```
//! NodeError maps to HTTP statuses via `NodeError::status_code()` (404 no such pod/container,
//! 400 bad request such as container not running, 500 otherwise).
//!
// API-SIDE REQUEST: concrete shapes the API side codes against (change freely, just keep names):
//   Pod = k8s_openapi::api::core::v1::Pod; PodStatus = k8s_openapi::api::core::v1::PodStatus;
//   pub type ResolvedVolumes = BTreeMap<String /*volume*/, BTreeMap<String /*key*/, Vec<u8>>>;
//   pub struct ExecRequest { pub command: Vec<String>, pub stdin: bool, pub stdout: bool, pub stderr: bool, pub tty: bool }
//   pub struct AttachRequest { pub stdin: bool, pub stdout: bool, pub stderr: bool, pub tty: bool }
//   pub struct LogOptions { pub follow: bool, pub timestamps: bool, pub since_time: Option<std::time::SystemTime>,
//       pub since_seconds: Option<i64>, pub tail_lines: Option<i64>, pub limit_bytes: Option<i64>, pub previous: bool }
//   pub mod stream { pub enum Protocol { V4, V5 } }  (API side negotiates the subprotocol and passes it)
//   NodeError: std::error::Error + `fn status_code(&self) -> u16`.
//   The API side derives kubelet-like events (Created/Started/Failed...) from status transitions, so
//   the node need not report events. lib.rs declares `pub mod node;` already.
