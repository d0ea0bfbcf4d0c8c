//! The object verbs: create, get, list, update, patch, delete, deletecollection.

use super::query::Query;
use super::{Shared, Target, body_bytes, json_response, table};
use crate::errors::ApiError;
use crate::lifecycle;
use crate::patch::{self, PatchKind};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{Part, meta};
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

fn content_type(req: &Request) -> String {
    req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json").to_owned()
}

/// Decode a create/update body (JSON, or YAML for hand-written curl requests).
async fn object_body(req: Request) -> Result<Value, ApiError> {
    let ct = content_type(&req);
    if ct.contains("cbor") {
        return Err(ApiError::UnsupportedMediaType { got: ct, accepted: "application/json, application/yaml".into() });
    }
    let bytes = body_bytes(req.into_body()).await?;
    let value: Value = if ct.contains("protobuf") {
        crate::protobuf::decode(&bytes).map_err(|e| match e {
            crate::protobuf::ProtobufError::UnsupportedKind(_) => {
                ApiError::UnsupportedMediaType { got: format!("{ct} ({e})"), accepted: "application/json, application/yaml".into() }
            }
            other => ApiError::BadRequest(other.to_string()),
        })?
    } else if ct.contains("yaml") {
        serde_yaml_ng::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("the request body is not valid YAML: {e}")))?
    } else {
        serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("the request body is not valid JSON: {e}")))?
    };
    if !value.is_object() {
        return Err(ApiError::BadRequest("the request body must be a JSON object".into()));
    }
    Ok(value)
}

pub fn selectors(query: &Query) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or_default()).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or_default()).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok((labels, fields))
}

pub fn list(state: &Shared, t: &Target, query: &Query, headers: &HeaderMap) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(query)?;
    let (items, rv) = state.store.list(t.res, t.namespace.as_deref(), |o| labels.matches(o) && fields.matches(o));
    if let Some(mode) = table::requested(headers) {
        return Ok(json_response(StatusCode::OK, &table::render(t.res, &items, Some(rv), mode, query)));
    }
    let list = json!({
        "kind": format!("{}List", t.res.kind),
        "apiVersion": "v1",
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    });
    Ok(json_response(StatusCode::OK, &list))
}

pub fn get(state: &Shared, t: &Target, headers: &HeaderMap) -> Result<Response, ApiError> {
    let obj = state.store.get(t.res, t.namespace.as_deref(), t.name.as_deref().unwrap_or_default())?;
    if let Some(mode) = table::requested(headers) {
        let rv = meta::resource_version(&obj).parse().ok();
        return Ok(json_response(StatusCode::OK, &table::render(t.res, std::slice::from_ref(&obj), rv, mode, &Query::default())));
    }
    Ok(json_response(StatusCode::OK, &obj))
}

pub async fn create(state: &Shared, t: &Target, req: Request) -> Result<Response, ApiError> {
    let query = Query::parse(req.uri().query());
    let body = object_body(req).await?;
    if query.get("dryRun").is_some() {
        return Err(ApiError::BadRequest("dryRun is not supported by this server".into()));
    }
    let created = state.store.create(t.res, t.namespace.as_deref(), body)?;
    if t.res.is("pods") {
        lifecycle::pod_created(state, &created);
    }
    Ok(json_response(StatusCode::CREATED, &created))
}

fn part(t: &Target) -> Part {
    if t.sub.as_deref() == Some("status") { Part::Status } else { Part::Main }
}

pub async fn update(state: &Shared, t: &Target, req: Request) -> Result<Response, ApiError> {
    let body = object_body(req).await?;
    let name = t.name.as_deref().unwrap_or_default();
    let updated = state.store.update_with(t.res, t.namespace.as_deref(), name, part(t), |obj| {
        *obj = body;
        Ok(())
    })?;
    Ok(json_response(StatusCode::OK, &updated))
}

pub async fn patch(state: &Shared, t: &Target, req: Request) -> Result<Response, ApiError> {
    let ct = content_type(&req);
    let kind = PatchKind::from_content_type(&ct).map_err(|e| ApiError::UnsupportedMediaType {
        got: ct.clone(),
        accepted: format!("application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json ({e})"),
    })?;
    if kind == PatchKind::Apply {
        return Err(ApiError::UnsupportedMediaType {
            got: ct,
            accepted: "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (server-side apply is not supported)".into(),
        });
    }
    let body = body_bytes(req.into_body()).await?;
    let name = t.name.as_deref().unwrap_or_default();
    let updated = state.store.update_with(t.res, t.namespace.as_deref(), name, part(t), |obj| {
        patch::apply(kind, obj, &body).map_err(|e| match e {
            patch::PatchError::JsonPatch(_) => ApiError::Invalid {
                kind: t.res.kind.into(),
                name: name.into(),
                causes: vec![crate::errors::Cause::invalid("", "json patch", &e.to_string())],
            },
            other => ApiError::BadRequest(other.to_string()),
        })
    })?;
    Ok(json_response(StatusCode::OK, &updated))
}

/// `DeleteOptions` from the body (kubectl, kube-rs) and/or the query string.
async fn delete_options(query: &Query, req: Request) -> Result<lifecycle::DeleteOptions, ApiError> {
    let bytes = body_bytes(req.into_body()).await?;
    let body: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("DeleteOptions body is not valid JSON: {e}")))?
    };
    let grace = match query.int("gracePeriodSeconds")? {
        Some(g) => Some(g),
        None => body.get("gracePeriodSeconds").and_then(Value::as_i64),
    };
    let policy = query
        .get("propagationPolicy")
        .map(str::to_owned)
        .or_else(|| body.get("propagationPolicy").and_then(Value::as_str).map(str::to_owned))
        .or_else(|| body.get("orphanDependents").and_then(Value::as_bool).filter(|o| *o).map(|_| "Orphan".to_owned()));
    let propagation = match policy.as_deref() {
        None | Some("Background") => lifecycle::Propagation::Background,
        Some("Foreground") => lifecycle::Propagation::Foreground,
        Some("Orphan") => lifecycle::Propagation::Orphan,
        Some(other) => return Err(ApiError::BadRequest(format!("unknown propagationPolicy {other:?}; use Background, Foreground or Orphan"))),
    };
    let precondition = |k: &str| body.pointer(&format!("/preconditions/{k}")).and_then(Value::as_str).map(str::to_owned);
    Ok(lifecycle::DeleteOptions {
        grace_seconds: grace.map(|g| g.max(0)),
        propagation,
        precondition_uid: precondition("uid"),
        precondition_rv: precondition("resourceVersion"),
    })
}

pub async fn delete(state: &Shared, t: &Target, query: &Query, req: Request) -> Result<Response, ApiError> {
    let opts = delete_options(query, req).await?;
    let name = t.name.as_deref().unwrap_or_default();
    let obj = lifecycle::delete(state, t.res, t.namespace.as_deref(), name, opts).await?;
    Ok(json_response(StatusCode::OK, &obj))
}

pub async fn delete_collection(state: &Shared, t: &Target, query: &Query, req: Request) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(query)?;
    let opts = delete_options(query, req).await?;
    let (items, _) = state.store.list(t.res, t.namespace.as_deref(), |o| labels.matches(o) && fields.matches(o));
    let mut deleted = Vec::new();
    for item in items {
        let ns = (!meta::namespace(&item).is_empty()).then(|| meta::namespace(&item).to_owned());
        match lifecycle::delete(state, t.res, ns.as_deref(), meta::name(&item), opts.clone()).await {
            Ok(obj) => deleted.push(obj),
            Err(ApiError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let list = json!({
        "kind": format!("{}List", t.res.kind),
        "apiVersion": "v1",
        "metadata": {"resourceVersion": state.store.current_rv().to_string()},
        "items": deleted,
    });
    Ok(json_response(StatusCode::OK, &list))
}
