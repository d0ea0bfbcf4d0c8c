//! Pod subresources served by the node: `log`, `exec`, `attach`.

use super::query::Query;
use super::{Shared, Target};
use crate::errors::{ApiError, Cause};
use crate::node::stream::{self, Protocol};
use crate::node::{AttachRequest, ExecRequest, LogOptions, NodeError};
use crate::store::meta;
use axum::body::Body;
use axum::extract::{FromRequestParts, Request, ws::WebSocketUpgrade};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::Value;

/// Subprotocols we speak, best first.
const PROTOCOLS: &[(&str, Protocol)] = &[("v5.channel.k8s.io", Protocol::V5), ("v4.channel.k8s.io", Protocol::V4)];

fn node_error(err: NodeError) -> ApiError {
    match err.status_code() {
        404 => ApiError::NodeNotFound(err.to_string()),
        400 => ApiError::BadRequest(err.to_string()),
        _ => ApiError::Internal(err.to_string()),
    }
}

/// The container a request is about: the named one, or the only one. Like the real server, a
/// pod with several containers needs the name.
fn container(pod: &Value, query: &Query) -> Result<String, ApiError> {
    let names: Vec<&str> = ["containers", "initContainers"]
        .iter()
        .filter_map(|k| pod.pointer(&format!("/spec/{k}")).and_then(Value::as_array))
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .collect();
    match query.get("container").filter(|c| !c.is_empty()) {
        Some(c) if names.contains(&c) => Ok(c.to_owned()),
        Some(c) => Err(ApiError::BadRequest(format!("container {c} is not valid for pod {}", meta::name(pod)))),
        None => match pod.pointer("/spec/containers").and_then(Value::as_array).map(Vec::as_slice) {
            Some([only]) => Ok(only.get("name").and_then(Value::as_str).unwrap_or_default().to_owned()),
            _ => Err(ApiError::BadRequest(format!(
                "a container name must be specified for pod {}, choose one of: [{}]",
                meta::name(pod),
                names.join(" ")
            ))),
        },
    }
}

fn pod_of(state: &Shared, t: &Target) -> Result<Value, ApiError> {
    state.store.get(t.res, t.namespace.as_deref(), t.name.as_deref().unwrap_or_default())
}

/// A pod the node has not started yet (e.g. a volume is missing) answers like a kubelet.
fn waiting(pod: &Value, container: &str, err: NodeError) -> ApiError {
    match err {
        NodeError::NoSuchPod(_) => ApiError::BadRequest(format!(
            "container {container:?} in pod {:?} is waiting to start: ContainerCreating",
            meta::name(pod)
        )),
        other => node_error(other),
    }
}

pub async fn logs(state: &Shared, t: &Target, query: &Query) -> Result<Response, ApiError> {
    let pod = pod_of(state, t)?;
    let container = container(&pod, query)?;
    let since_time = query
        .get("sinceTime")
        .map(|s| {
            s.parse::<jiff::Timestamp>()
                .map(std::time::SystemTime::from)
                .map_err(|e| ApiError::BadRequest(format!("invalid sinceTime {s:?}: {e}")))
        })
        .transpose()?;
    let opts = LogOptions {
        follow: query.flag("follow")?,
        timestamps: query.flag("timestamps")?,
        since_time,
        since_seconds: query.int("sinceSeconds")?,
        tail_lines: query.int("tailLines")?,
        limit_bytes: query.int("limitBytes")?,
        previous: query.flag("previous")?,
    };
    // Validated as the real server validates PodLogOptions: 422 with a cause per field.
    let mut causes = Vec::new();
    for (key, value) in [("sinceSeconds", opts.since_seconds), ("limitBytes", opts.limit_bytes)] {
        if let Some(v) = value.filter(|v| *v < 1) {
            causes.push(Cause::invalid_number(key, v, "must be greater than 0"));
        }
    }
    if let Some(v) = opts.tail_lines.filter(|v| *v < 0) {
        causes.push(Cause::invalid_number("tailLines", v, "must be greater than or equal to 0"));
    }
    if opts.since_seconds.is_some() && opts.since_time.is_some() {
        causes.push(Cause::forbidden("", "at most one of `sinceTime` or `sinceSeconds` may be specified"));
    }
    if !causes.is_empty() {
        return Err(ApiError::Invalid { kind: "PodLogOptions".into(), name: meta::name(&pod).into(), causes });
    }
    let stream = state.node.logs(meta::uid(&pod), &container, opts).await.map_err(|e| waiting(&pod, &container, e))?;
    let cancel = state.cancel.clone();
    // Stop following when the cluster stops, so open `kubectl logs -f` calls end cleanly.
    let body = stream
        .map(|r| r.map_err(std::io::Error::other))
        .take_until(Box::pin(async move { cancel.cancelled_owned().await }));
    let mut resp = (StatusCode::OK, Body::from_stream(body)).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(resp)
}

pub async fn stream(state: &Shared, t: &Target, query: &Query, req: Request) -> Result<Response, ApiError> {
    let pod = pod_of(state, t)?;
    let container = container(&pod, query)?;
    let (mut parts, _body) = req.into_parts();
    let offered: Vec<String> = parts
        .headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_owned()))
        .collect();
    let Some((name, protocol)) = PROTOCOLS.iter().find(|(name, _)| offered.iter().any(|o| o == name)) else {
        return Err(ApiError::BadRequest(format!(
            "unable to upgrade connection: no supported WebSocket subprotocol in {offered:?}; this server speaks v5.channel.k8s.io and v4.channel.k8s.io"
        )));
    };
    // Some clients upgrade with POST (the SPDY-era verb); the WebSocket handshake is the same.
    parts.method = Method::GET;
    let ws = WebSocketUpgrade::from_request_parts(&mut parts, &())
        .await
        .map_err(|e| ApiError::BadRequest(format!("unable to upgrade connection: {e}")))?;
    let flags = |k: &str| query.flag(k);
    let uid = meta::uid(&pod).to_owned();
    let session = if t.sub.as_deref() == Some("exec") {
        let command = query.all("command");
        let req = ExecRequest {
            command,
            stdin: flags("stdin")?,
            stdout: flags("stdout")?,
            stderr: flags("stderr")?,
            tty: flags("tty")?,
        };
        state.node.exec(&uid, &container, req).await
    } else {
        let req = AttachRequest {
            stdin: flags("stdin")?,
            stdout: flags("stdout")?,
            stderr: flags("stderr")?,
            tty: flags("tty")?,
        };
        state.node.attach(&uid, &container, req).await
    };
    let session = match session {
        Ok(s) => s,
        // A real API server upgrades first and the kubelet then finds no running container; the
        // client reads that from the error channel (kubectl: "unable to upgrade connection:
        // container not found"). Refusing before the upgrade would make kubectl retry over SPDY
        // and report a misleading protocol error instead.
        Err(NodeError::NotRunning { .. } | NodeError::NoSuchPod(_)) => crate::node::Session::failed(
            Vec::new(),
            format!("unable to upgrade connection: container not found ({container:?})"),
        ),
        Err(e) => return Err(waiting(&pod, &container, e)),
    };
    let protocol = *protocol;
    let cancel = state.cancel.clone();
    Ok(ws.protocols([*name]).on_upgrade(move |socket| async move {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = stream::serve(socket, protocol, session) => {}
        }
    }))
}
