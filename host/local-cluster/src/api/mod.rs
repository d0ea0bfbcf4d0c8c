//! The HTTP surface: routing of `/api/v1/...` paths to verbs, authentication, discovery.

mod continuation;
pub mod images;
mod objects;
mod pods;
pub mod query;
mod table;
mod watch;

use crate::discovery;
use crate::errors::ApiError;
use crate::resources::{self, Resource};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State as AxState};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use query::Query;
use serde_json::Value;
use std::sync::Arc;

/// Everything request handlers share: the cluster's state (its fields read through `Deref`),
/// who may call, and where the cluster listens.
pub struct ApiState {
    pub cluster: crate::state::Shared,
    pub auth: Authentication,
    /// `host:port` we listen on, for discovery's serverAddressByClientCIDRs.
    pub server_address: String,
}

impl std::ops::Deref for ApiState {
    type Target = crate::state::Cluster;
    fn deref(&self) -> &crate::state::Cluster {
        &self.cluster
    }
}

pub type Shared = Arc<ApiState>;

/// Who may call the API.
#[derive(Debug, Clone)]
pub enum Authentication {
    /// Anyone who can reach the port (`ClusterOptions::insecure_unauthenticated`).
    Disabled,
    /// A client certificate the cluster's CA issued, or this bearer token; anything else is 401,
    /// on every path, as kube-apiserver answers with anonymous auth turned off.
    Required { token: Option<String> },
}

/// Put on requests of a TLS connection whose client presented a certificate. rustls verified it
/// against the cluster's CA during the handshake (a certificate from another CA ends the
/// handshake), so its presence is the whole proof.
#[derive(Debug, Clone, Copy)]
pub struct VerifiedClientCert;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/version", get(|| async { json_response(StatusCode::OK, &discovery::version()) }))
        .route(
            "/api",
            get(|AxState(s): AxState<Shared>| async move {
                json_response(StatusCode::OK, &discovery::api_versions(&s.server_address))
            }),
        )
        .route("/apis", get(|| async { json_response(StatusCode::OK, &discovery::api_groups()) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/openapi/v2", get(openapi_v2))
        .route("/openapi/v3", get(|| async { json_response(StatusCode::OK, &crate::openapi::root()) }))
        .route("/openapi/v3/api/v1", get(|| async { json_response(StatusCode::OK, &crate::openapi::core_v1()) }))
        .route("/api/v1", get(|| async { json_response(StatusCode::OK, &discovery::core_v1_resources()) }))
        .route("/api/v1/{*rest}", axum::routing::any(dispatch))
        .route(images::PATH, axum::routing::post(images::load))
        .route(
            "/apis/{group}",
            get(|axum::extract::Path(group): axum::extract::Path<String>| async move {
                match discovery::group(&group) {
                    Some(g) => json_response(StatusCode::OK, &g),
                    None => ApiError::UnknownPath(format!("/apis/{group}")).into_response(),
                }
            }),
        )
        .route(
            "/apis/{group}/{version}",
            get(|axum::extract::Path((group, version)): axum::extract::Path<(String, String)>| async move {
                if resources::GROUPS.contains(&(group.as_str(), version.as_str())) {
                    json_response(StatusCode::OK, &discovery::resources_of(&format!("{group}/{version}")))
                } else {
                    ApiError::UnknownPath(format!("/apis/{group}/{version}")).into_response()
                }
            }),
        )
        .route("/apis/{group}/{version}/{*rest}", axum::routing::any(dispatch))
        .fallback(|req: Request| async move { ApiError::UnknownPath(req.uri().path().to_owned()) })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

async fn authenticate(AxState(state): AxState<Shared>, req: Request, next: Next) -> Response {
    if let Authentication::Required { token } = &state.auth {
        let certified = req.extensions().get::<VerifiedClientCert>().is_some();
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let token_ok = token.as_deref().is_some_and(|t| presented.is_some_and(|p| constant_time_eq(p, t)));
        if !certified && !token_ok {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first differing byte, so response times do not reveal how
/// much of a guessed token was right.
fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn json_response(code: StatusCode, body: &Value) -> Response {
    let mut resp = (code, body.to_string()).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// What a `/api/v1/...` path names.
#[derive(Debug)]
pub struct Target {
    pub res: &'static Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
}

pub fn parse_target(path: &str) -> Result<Target, ApiError> {
    // `/api/v1/...` or `/apis/<group>/<version>/...`: the group version, then the rest.
    let (group_version, rest) = match path.strip_prefix("/api/v1/") {
        Some(rest) => ("v1".to_owned(), rest),
        None => {
            let mut parts = path.trim_start_matches("/apis/").splitn(3, '/');
            let (group, version, rest) = (parts.next(), parts.next(), parts.next());
            match (group, version, rest) {
                (Some(g), Some(v), Some(rest)) => (format!("{g}/{v}"), rest),
                _ => return Err(ApiError::UnknownPath(path.to_owned())),
            }
        }
    };
    let rest = rest.trim_end_matches('/');
    let in_group = |plural: &str| resources::find(&group_version, plural);
    let resource = |plural: &str, path: &str| -> Result<&'static Resource, ApiError> {
        in_group(plural).ok_or_else(|| ApiError::UnknownPath(path.to_owned()))
    };
    let segs: Vec<&str> = rest.split('/').collect();
    let owned = |s: &str| Some(s.to_owned());
    let t = match segs.as_slice() {
        [plural] => Target { res: resource(plural, path)?, namespace: None, name: None, sub: None },
        ["namespaces", ns, plural] if in_group(plural).is_some_and(|r| r.namespaced) => {
            Target { res: resource(plural, path)?, namespace: owned(ns), name: None, sub: None }
        }
        ["namespaces", ns, plural, name] => {
            Target { res: resource(plural, path)?, namespace: owned(ns), name: owned(name), sub: None }
        }
        ["namespaces", ns, plural, name, sub] => {
            Target { res: resource(plural, path)?, namespace: owned(ns), name: owned(name), sub: owned(sub) }
        }
        [plural, name] => Target { res: resource(plural, path)?, namespace: None, name: owned(name), sub: None },
        [plural, name, sub] => {
            Target { res: resource(plural, path)?, namespace: None, name: owned(name), sub: owned(sub) }
        }
        _ => return Err(ApiError::UnknownPath(path.to_owned())),
    };
    if t.res.namespaced && t.name.is_some() && t.namespace.is_none() {
        return Err(ApiError::UnknownPath(path.to_owned()));
    }
    if let Some(sub) = &t.sub
        && !t.res.subresources.contains(&sub.as_str())
    {
        return Err(ApiError::UnknownPath(path.to_owned()));
    }
    Ok(t)
}

async fn dispatch(AxState(state): AxState<Shared>, req: Request) -> Response {
    match route(state, req).await {
        Ok(resp) => resp,
        Err(err) => {
            if err.code() >= 500 {
                tracing::error!(error = %err, "request failed");
            }
            err.into_response()
        }
    }
}

async fn route(state: Shared, req: Request) -> Result<Response, ApiError> {
    let path = req.uri().path().to_owned();
    let target = parse_target(&path)?;
    let query = Query::parse(req.uri().query());
    let method = req.method().clone();
    let not_allowed = || ApiError::MethodNotAllowed(format!("{method} {path}"));
    match (target.name.is_some(), target.sub.as_deref(), &method) {
        (false, None, &Method::GET) if query.flag("watch")? => watch::serve(&state, &target, &query, req.headers()),
        (false, None, &Method::GET) => objects::list(&state, &target, &query, req.headers()),
        (false, None, &Method::POST) => objects::create(&state, &target, req).await,
        (false, None, &Method::DELETE) => objects::delete_collection(&state, &target, &query, req).await,
        (true, None | Some("status"), &Method::GET) => objects::get(&state, &target, req.headers()),
        (true, None | Some("status"), &Method::PUT) => objects::update(&state, &target, req).await,
        (true, None | Some("status"), &Method::PATCH) => objects::patch(&state, &target, req).await,
        (true, None, &Method::DELETE) => objects::delete(&state, &target, &query, req).await,
        (true, Some("log"), &Method::GET) => pods::logs(&state, &target, &query).await,
        (true, Some("exec" | "attach"), &Method::GET | &Method::POST) => {
            pods::stream(&state, &target, &query, req).await
        }
        _ => Err(not_allowed()),
    }
}

/// Read a request body, at most `limits::MAX_REQUEST_BODY` bytes (413 beyond, as the real
/// server answers), so a hostile client cannot exhaust memory.
pub async fn body_bytes(body: Body) -> Result<bytes::Bytes, ApiError> {
    let too_large = || ApiError::RequestEntityTooLarge(format!("limit is {}", crate::limits::MAX_REQUEST_BODY));
    axum::body::to_bytes(body, crate::limits::MAX_REQUEST_BODY).await.map_err(|e| {
        // axum reports the limit only through the error's source chain.
        let mut source: Option<&dyn std::error::Error> = Some(&e);
        while let Some(s) = source {
            if s.to_string().contains("length limit exceeded") {
                return too_large();
            }
            source = s.source();
        }
        ApiError::BadRequest(format!("cannot read request body: {e}"))
    })
}

/// `/openapi/v2`: a document without schemas (see `openapi::v2`), as protobuf when asked for it
/// (client-go's discovery asks for nothing else), else as JSON.
async fn openapi_v2(req: Request) -> Response {
    let wants_protobuf = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains(crate::openapi::V2_PROTOBUF));
    if wants_protobuf {
        let mut resp = (StatusCode::OK, crate::openapi::v2_protobuf()).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::openapi::V2_PROTOBUF_ANSWER));
        return resp;
    }
    json_response(StatusCode::OK, &crate::openapi::v2())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let t = parse_target("/api/v1/namespaces/ns1/pods/p/log").unwrap();
        assert_eq!(
            (t.res.plural, t.namespace.as_deref(), t.name.as_deref(), t.sub.as_deref()),
            ("pods", Some("ns1"), Some("p"), Some("log"))
        );
        let t = parse_target("/api/v1/namespaces/ns1").unwrap();
        assert_eq!((t.res.plural, t.name.as_deref()), ("namespaces", Some("ns1")));
        let t = parse_target("/api/v1/namespaces/ns1/status").unwrap();
        assert_eq!((t.res.plural, t.name.as_deref(), t.sub.as_deref()), ("namespaces", Some("ns1"), Some("status")));
        let t = parse_target("/api/v1/namespaces/ns1/configmaps").unwrap();
        assert_eq!((t.res.plural, t.namespace.as_deref(), t.name), ("configmaps", Some("ns1"), None));
        assert!(parse_target("/api/v1/pods/p").is_err());
        assert!(parse_target("/api/v1/widgets").is_err());
        assert!(parse_target("/api/v1/namespaces/a/pods/p/bogus").is_err());
        let t = parse_target("/apis/discovery.k8s.io/v1/namespaces/ns1/endpointslices/s").unwrap();
        assert_eq!(
            (t.res.plural, t.namespace.as_deref(), t.name.as_deref()),
            ("endpointslices", Some("ns1"), Some("s"))
        );
        assert!(parse_target("/api/v1/endpointslices").is_err(), "only in its group");
        assert!(parse_target("/apis/discovery.k8s.io/v1/pods").is_err(), "core kinds are not in the group");
    }
}
