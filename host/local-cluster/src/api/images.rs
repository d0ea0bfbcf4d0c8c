//! `POST /keel/v1/images`: loads the image archive in the request body (docker-archive or OCI
//! layout tarball, optionally gzip-compressed) into the node's store, as `kind load
//! image-archive` does for a kind node. Not a Kubernetes API (a kubelet's images are not API
//! objects), so it lives outside `/api` and `/apis`, behind the same authentication.
//!
//! The answer is `{"images": [{"names": [...], "id": "sha256:...", "repoDigest": "sha256:..."}]}`;
//! a body that is no image archive is a 400 Status naming what is wrong with it.

use axum::body::Body;
use axum::extract::{Request, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::{Shared, json_response};
use crate::errors::ApiError;
use crate::node::{NodeError, StoreError};

pub const PATH: &str = "/keel/v1/images";

pub async fn load(AxState(state): AxState<Shared>, req: Request) -> Response {
    match load_archive(&state, req.into_body()).await {
        Ok(resp) => resp,
        Err(err) => {
            if err.code() >= 500 {
                tracing::error!(error = %err, "image load failed");
            }
            err.into_response()
        }
    }
}

async fn load_archive(state: &Shared, body: Body) -> Result<Response, ApiError> {
    // Archives are large: staged on disk (next to the store, so loading reads it from there),
    // never held in memory.
    let dir = state.node.image_upload_dir();
    let staged = tempfile::Builder::new()
        .prefix(".upload-")
        .suffix(".tar")
        .tempfile_in(&dir)
        .map_err(|e| ApiError::Internal(format!("cannot stage the archive in {}: {e}", dir.display())))?;
    let mut file = tokio::fs::File::from_std(
        staged.as_file().try_clone().map_err(|e| ApiError::Internal(format!("cannot stage the archive: {e}")))?,
    );
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("cannot read request body: {e}")))?;
        file.write_all(&chunk).await.map_err(|e| ApiError::Internal(format!("cannot stage the archive: {e}")))?;
    }
    file.flush().await.map_err(|e| ApiError::Internal(format!("cannot stage the archive: {e}")))?;
    drop(file);
    let loaded = state.node.load_image_archive(staged.path()).await.map_err(|e| match &e {
        NodeError::ImageLoad { source: StoreError::Io { .. }, .. } => ApiError::Internal(e.to_string()),
        NodeError::ImageLoad { source, .. } => ApiError::BadRequest(format!("cannot load the image archive: {source}")),
        _ => ApiError::Internal(e.to_string()),
    })?;
    Ok(json_response(StatusCode::OK, &serde_json::json!({ "images": loaded })))
}
