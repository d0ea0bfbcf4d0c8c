//! The object verbs: create, get, list, update, patch, delete, deletecollection.

use super::query::Query;
use super::{Shared, Target, body_bytes, continuation, json_response, table};
use crate::errors::{ApiError, Cause};
use crate::lifecycle;
use crate::patch::apply::ApplyError;
use crate::patch::{self, PatchKind};
use crate::resources::Resource;
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
            crate::protobuf::ProtobufError::UnsupportedKind(_) => ApiError::UnsupportedMediaType {
                got: format!("{ct} ({e})"),
                accepted: "application/json, application/yaml".into(),
            },
            other => ApiError::BadRequest(other.to_string()),
        })?
    } else if ct.contains("yaml") {
        check_depth(&bytes)?;
        serde_yaml_ng::from_slice(&bytes)
            .map_err(|e| ApiError::BadRequest(format!("the request body is not valid YAML: {e}")))?
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::BadRequest(format!("the request body is not valid JSON: {e}")))?
    };
    if !value.is_object() {
        return Err(ApiError::BadRequest("the request body must be a JSON object".into()));
    }
    Ok(value)
}

/// Refuses a YAML body that nests deeper than `limits::MAX_DEPTH`, before any parser sees it.
pub fn check_depth(body: &[u8]) -> Result<(), ApiError> {
    let depth = crate::limits::yaml_depth(body);
    if depth > crate::limits::MAX_DEPTH {
        return Err(ApiError::BadRequest(format!(
            "the request body nests {depth} levels deep; at most {} are allowed",
            crate::limits::MAX_DEPTH
        )));
    }
    Ok(())
}

pub fn selectors(query: &Query) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or_default())
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or_default())
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok((labels, fields))
}

pub fn list(state: &Shared, t: &Target, query: &Query, headers: &HeaderMap) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(query)?;
    // limit <= 0 means "everything", as on the real server.
    let limit = query.int("limit")?.filter(|l| *l > 0).map(|l| l as usize);
    let rv_param = query.get("resourceVersion").filter(|v| !v.is_empty());
    let continued = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(raw) => {
            if rv_param.is_some_and(|rv| rv != "0") {
                return Err(ApiError::BadRequest(
                    "specifying resource version is not allowed when using continue".into(),
                ));
            }
            if query.get("resourceVersionMatch").is_some_and(|m| !m.is_empty()) {
                return Err(ApiError::BadRequest("resourceVersionMatch is forbidden when continue is provided".into()));
            }
            Some(continuation::decode(raw, t.res.namespaced)?)
        }
        None => None,
    };
    let at = match (&continued, query.get("resourceVersionMatch").filter(|m| !m.is_empty())) {
        (Some(c), _) => c.rv,
        (None, Some("Exact")) => {
            let rv = rv_param
                .ok_or_else(|| ApiError::BadRequest("resourceVersionMatch=Exact requires resourceVersion".into()))?;
            Some(
                rv.parse()
                    .map_err(|_| ApiError::BadRequest(format!("invalid resourceVersion {rv:?}: must be an integer")))?,
            )
        }
        (None, None | Some("NotOlderThan")) => None,
        (None, Some(other)) => {
            return Err(ApiError::BadRequest(format!(
                "unknown resourceVersionMatch {other:?}; use Exact or NotOlderThan"
            )));
        }
    };
    let keep = |o: &serde_json::Value| labels.matches(o) && fields.matches(o);
    let page = match state.store.list_page(
        t.res,
        t.namespace.as_deref(),
        keep,
        at,
        continued.as_ref().map(|c| &c.after),
        limit,
    ) {
        Err(ApiError::Gone { .. }) if continued.is_some() => {
            let after = &continued.as_ref().expect("checked").after;
            return Err(ApiError::ContinueExpired {
                continue_token: continuation::encode(None, after, t.res.namespaced),
            });
        }
        other => other?,
    };
    let mut list_meta = json!({"resourceVersion": page.rv.to_string()});
    if let Some(after) = &page.continue_after {
        // An inconsistent continuation stays inconsistent: it resumes at the latest version again.
        let snapshot = if continued.as_ref().is_some_and(|c| c.rv.is_none()) { None } else { Some(page.rv) };
        list_meta["continue"] = json!(continuation::encode(snapshot, after, t.res.namespaced));
        // The real server counts only when no selector filters the rest (etcd counts keys).
        let unfiltered = |k: &str| query.get(k).is_none_or(str::is_empty);
        if unfiltered("labelSelector") && unfiltered("fieldSelector") {
            list_meta["remainingItemCount"] = json!(page.remaining);
        }
    }
    if let Some(mode) = table::requested(headers) {
        let mut table = table::render(t.res, &page.items, Some(page.rv), mode, query);
        table["metadata"] = list_meta;
        return Ok(json_response(StatusCode::OK, &table));
    }
    let list = json!({
        "kind": format!("{}List", t.res.kind),
        "apiVersion": t.res.group_version,
        "metadata": list_meta,
        "items": page.items,
    });
    Ok(json_response(StatusCode::OK, &list))
}

pub fn get(state: &Shared, t: &Target, headers: &HeaderMap) -> Result<Response, ApiError> {
    let obj = state.store.get(t.res, t.namespace.as_deref(), t.name.as_deref().unwrap_or_default())?;
    if let Some(mode) = table::requested(headers) {
        let rv = meta::resource_version(&obj).parse().ok();
        return Ok(json_response(
            StatusCode::OK,
            &table::render(t.res, std::slice::from_ref(&obj), rv, mode, &Query::default()),
        ));
    }
    Ok(json_response(StatusCode::OK, &obj))
}

/// `dryRun`: absent is a real request, `All` a dry run; anything else is refused like the real
/// server does (422 on the `<Verb>Options` kind).
fn dry_run(values: &[String], options_kind: &str) -> Result<bool, ApiError> {
    if values.is_empty() {
        return Ok(false);
    }
    if values.iter().all(|v| v == "All") {
        return Ok(true);
    }
    Err(ApiError::Invalid {
        kind: format!("{options_kind}.meta.k8s.io"),
        name: String::new(),
        causes: vec![Cause {
            reason: "FieldValueNotSupported",
            field: "dryRun".into(),
            message: format!("Unsupported value: {values:?}: supported values: \"All\""),
        }],
    })
}

/// `fieldValidation`: what a write does with fields the kind does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldValidation {
    /// Refused: 400 naming every one.
    Strict,
    /// Dropped, each named in a `Warning` header (the server's default).
    Warn,
    /// Dropped silently.
    Ignore,
}

fn field_validation(query: &Query) -> Result<FieldValidation, ApiError> {
    match query.get("fieldValidation").unwrap_or_default() {
        "Strict" => Ok(FieldValidation::Strict),
        "Warn" | "" => Ok(FieldValidation::Warn),
        "Ignore" => Ok(FieldValidation::Ignore),
        other => Err(ApiError::BadRequest(format!(
            "fieldValidation {other:?} is invalid; it must be one of \"Ignore\", \"Warn\" or \"Strict\""
        ))),
    }
}

/// Drops `obj`'s unknown fields as the server's decoder does, or refuses them (Strict) in the
/// decoder's words; returns the warnings to send (Warn).
fn unknown_fields(t: &Target, obj: &mut Value, mode: FieldValidation) -> Result<Vec<String>, ApiError> {
    let unknown = crate::store::validate::unknown_fields(t.res.group_version, t.res.plural, obj);
    if unknown.is_empty() {
        return Ok(Vec::new());
    }
    let named: Vec<String> = unknown.iter().map(|p| format!("unknown field \"{p}\"")).collect();
    if mode == FieldValidation::Strict {
        let version = t.res.group_version.rsplit('/').next().unwrap_or(t.res.group_version);
        let kind = t.res.kind;
        return Err(ApiError::BadRequest(format!(
            "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
            named.join(", ")
        )));
    }
    for path in unknown {
        path.remove_from(obj);
    }
    Ok(if mode == FieldValidation::Warn { named } else { Vec::new() })
}

/// A JSON answer with a `Warning: 299 - "..."` header per warning, as the server sends them.
fn with_warnings(code: StatusCode, body: &Value, warnings: &[String]) -> Response {
    let mut resp = json_response(code, body);
    for w in warnings {
        let quoted = w.replace('\\', "\\\\").replace('"', "\\\"");
        if let Ok(v) = axum::http::HeaderValue::from_str(&format!("299 - \"{quoted}\"")) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

pub async fn create(state: &Shared, t: &Target, req: Request) -> Result<Response, ApiError> {
    let query = Query::parse(req.uri().query());
    let dry = dry_run(&query.all("dryRun"), "CreateOptions")?;
    let validation = field_validation(&query)?;
    let mut body = object_body(req).await?;
    let warnings = unknown_fields(t, &mut body, validation)?;
    if dry {
        let would_be = state.store.create_dry_run(t.res, t.namespace.as_deref(), body)?;
        return Ok(with_warnings(StatusCode::CREATED, &would_be, &warnings));
    }
    let created = state.store.create(t.res, t.namespace.as_deref(), body)?;
    if t.res.is("pods") {
        lifecycle::pod_created(&state.cluster, &created);
    }
    Ok(with_warnings(StatusCode::CREATED, &created, &warnings))
}

fn part(t: &Target) -> Part {
    if t.sub.as_deref() == Some("status") { Part::Status } else { Part::Main }
}

/// Update or dry-run update through the store.
fn write(
    state: &Shared,
    t: &Target,
    dry: bool,
    change: impl FnOnce(&mut Value) -> Result<(), ApiError>,
) -> Result<Value, ApiError> {
    let name = t.name.as_deref().unwrap_or_default();
    if dry {
        state.store.update_dry_run(t.res, t.namespace.as_deref(), name, part(t), change)
    } else {
        state.store.update_with(t.res, t.namespace.as_deref(), name, part(t), change)
    }
}

pub async fn update(state: &Shared, t: &Target, req: Request) -> Result<Response, ApiError> {
    let query = Query::parse(req.uri().query());
    let dry = dry_run(&query.all("dryRun"), "UpdateOptions")?;
    let validation = field_validation(&query)?;
    let mut body = object_body(req).await?;
    let warnings = unknown_fields(t, &mut body, validation)?;
    let updated = write(state, t, dry, |obj| {
        // Like the real server: a PUT that leaves managedFields out keeps the recorded ones.
        if body.pointer("/metadata/managedFields").is_none()
            && let Some(managed) = obj.pointer("/metadata/managedFields").cloned()
        {
            meta::metadata_mut(&mut body).insert("managedFields".into(), managed);
        }
        *obj = body;
        Ok(())
    })?;
    Ok(with_warnings(StatusCode::OK, &updated, &warnings))
}

pub async fn patch(state: &Shared, t: &Target, req: Request) -> Result<Response, ApiError> {
    let query = Query::parse(req.uri().query());
    let dry = dry_run(&query.all("dryRun"), "PatchOptions")?;
    let ct = content_type(&req);
    let kind = PatchKind::from_content_type(&ct).map_err(|e| ApiError::UnsupportedMediaType {
        got: ct.clone(),
        accepted: format!("application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml ({e})"),
    })?;
    let options_invalid = |field: &str, cause: Cause| ApiError::Invalid {
        kind: "PatchOptions.meta.k8s.io".into(),
        name: String::new(),
        causes: vec![Cause { field: field.into(), ..cause }],
    };
    if kind != PatchKind::Apply && query.get("force").is_some() {
        return Err(options_invalid("force", Cause::forbidden("", "may not be specified for non-apply patch")));
    }
    if kind == PatchKind::Apply {
        if ct.contains("cbor") {
            return Err(ApiError::UnsupportedMediaType { got: ct, accepted: "application/apply-patch+yaml".into() });
        }
        let manager = query.get("fieldManager").filter(|m| !m.is_empty()).map(str::to_owned);
        let manager = manager
            .ok_or_else(|| options_invalid("fieldManager", Cause::required("", "is required for apply patch")))?;
        let force = query.flag("force")?;
        let body = body_bytes(req.into_body()).await?;
        check_depth(&body)?;
        return server_side_apply(state, t, dry, &manager, force, &body);
    }
    let validation = field_validation(&query)?;
    let body = body_bytes(req.into_body()).await?;
    let name = t.name.as_deref().unwrap_or_default();
    let mut warnings = Vec::new();
    let updated = write(state, t, dry, |obj| {
        patch::apply(kind, obj, &body).map_err(|e| match e {
            patch::PatchError::TooManyOperations(_) => ApiError::RequestEntityTooLarge(e.to_string()),
            patch::PatchError::JsonPatch(_) | patch::PatchError::CopyLimit { .. } => ApiError::Invalid {
                kind: t.res.kind.into(),
                name: name.into(),
                causes: vec![crate::errors::Cause::invalid("", "json patch", &e.to_string())],
            },
            other => ApiError::BadRequest(other.to_string()),
        })?;
        // What the patch brought in that the kind does not have (the stored object has none).
        warnings = unknown_fields(t, obj, validation)?;
        Ok(())
    })?;
    Ok(with_warnings(StatusCode::OK, &updated, &warnings))
}

fn apply_error(e: ApplyError) -> ApiError {
    match e {
        ApplyError::Conflicts(conflicts) => ApiError::ApplyConflict {
            message: ApplyError::Conflicts(conflicts.clone()).to_string(),
            causes: conflicts
                .into_iter()
                .map(|(manager, field)| Cause {
                    reason: "FieldManagerConflict",
                    field,
                    message: format!("conflict with {manager:?} using v1"),
                })
                .collect(),
        },
        other => ApiError::BadRequest(other.to_string()),
    }
}

/// Server-side apply: merge into the live object, or create it when missing (201).
fn server_side_apply(
    state: &Shared,
    t: &Target,
    dry: bool,
    manager: &str,
    force: bool,
    body: &[u8],
) -> Result<Response, ApiError> {
    let config = patch::apply::parse(body).map_err(apply_error)?;
    let name = t.name.as_deref().unwrap_or_default();
    if let Some(kind) = config.get("kind").and_then(Value::as_str)
        && kind != t.res.kind
    {
        return Err(ApiError::BadRequest(format!(
            "the kind of the applied object ({kind}) does not match the resource ({})",
            t.res.plural
        )));
    }
    // A create racing ours makes the second round update instead.
    for _ in 0..2 {
        match write(state, t, dry, |obj| {
            *obj = patch::apply::apply(obj, config.clone(), manager, force).map_err(apply_error)?;
            Ok(())
        }) {
            Err(ApiError::NotFound { .. }) if t.sub.is_none() => {}
            other => return other.map(|o| json_response(StatusCode::OK, &o)),
        }
        let mut fresh = patch::apply::apply(&json!({}), config.clone(), manager, force).map_err(apply_error)?;
        meta::metadata_mut(&mut fresh).entry("name").or_insert_with(|| json!(name));
        if meta::name(&fresh) != name {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta::name(&fresh)
            )));
        }
        let created = if dry {
            state.store.create_dry_run(t.res, t.namespace.as_deref(), fresh)
        } else {
            state.store.create(t.res, t.namespace.as_deref(), fresh)
        };
        match created {
            Ok(created) => {
                if t.res.is("pods") && !dry {
                    lifecycle::pod_created(&state.cluster, &created);
                }
                return Ok(json_response(StatusCode::CREATED, &created));
            }
            Err(ApiError::AlreadyExists { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::Conflict {
        resource: t.res.plural.into(),
        name: name.into(),
        reason: "the object was created and deleted concurrently; apply again".into(),
    })
}

/// `DeleteOptions` from the body (kubectl, kube-rs) and/or the query string.
async fn delete_options(query: &Query, req: Request) -> Result<(lifecycle::DeleteOptions, bool), ApiError> {
    let bytes = body_bytes(req.into_body()).await?;
    let body: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::BadRequest(format!("DeleteOptions body is not valid JSON: {e}")))?
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
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "unknown propagationPolicy {other:?}; use Background, Foreground or Orphan"
            )));
        }
    };
    let precondition =
        |k: &str| body.pointer(&format!("/preconditions/{k}")).and_then(Value::as_str).map(str::to_owned);
    // kubectl and kube-rs send dryRun in the DeleteOptions body, curl users in the query.
    let mut dry_values = query.all("dryRun");
    if let Some(list) = body.get("dryRun").and_then(Value::as_array) {
        dry_values.extend(list.iter().map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned)));
    }
    let dry = dry_run(&dry_values, "DeleteOptions")?;
    let opts = lifecycle::DeleteOptions {
        grace_seconds: grace.map(|g| g.max(0)),
        propagation,
        precondition_uid: precondition("uid"),
        precondition_rv: precondition("resourceVersion"),
    };
    Ok((opts, dry))
}

/// What a delete would answer, checked like one (existence, preconditions), changing nothing:
/// the object, marked terminating where a real delete would only mark it.
fn delete_dry_run(
    state: &Shared,
    t: &Target,
    ns: Option<&str>,
    name: &str,
    opts: &lifecycle::DeleteOptions,
) -> Result<Value, ApiError> {
    let mut obj = state.store.get(t.res, ns, name)?;
    lifecycle::check_preconditions(t.res, name, &obj, opts)?;
    if obj.pointer("/metadata/deletionTimestamp").is_some() {
        return Ok(obj);
    }
    let grace = if t.res.is("pods") {
        opts.grace_seconds
            .unwrap_or_else(|| obj.pointer("/spec/terminationGracePeriodSeconds").and_then(Value::as_i64).unwrap_or(30))
            .max(0)
    } else {
        0
    };
    let marks = (t.res.is("pods") && grace > 0) || t.res.is("namespaces") || !meta::finalizers(&obj).is_empty();
    if marks {
        let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(grace);
        let md = meta::metadata_mut(&mut obj);
        md.insert("deletionTimestamp".into(), json!(at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()));
        md.insert("deletionGracePeriodSeconds".into(), json!(grace));
        if t.res.is("namespaces") {
            obj["status"] = json!({"phase": "Terminating"});
        }
    }
    Ok(obj)
}

pub async fn delete(state: &Shared, t: &Target, query: &Query, req: Request) -> Result<Response, ApiError> {
    let (opts, dry) = delete_options(query, req).await?;
    let name = t.name.as_deref().unwrap_or_default();
    let obj = if dry {
        delete_dry_run(state, t, t.namespace.as_deref(), name, &opts)?
    } else {
        lifecycle::delete(&state.cluster, t.res, t.namespace.as_deref(), name, opts).await?
    };
    Ok(json_response(StatusCode::OK, &deleted_answer(t.res, obj)))
}

/// What a DELETE answers: an object still pending deletion (grace period, finalizers) comes back
/// as it is; a removed one as itself or, for most kinds, as a `Status` of Success naming it, as
/// the real registry does (`kubectl delete` and kube-rs accept either).
fn deleted_answer(r: &Resource, obj: Value) -> Value {
    if r.returns_deleted_object || obj.pointer("/metadata/deletionTimestamp").is_some() {
        return obj;
    }
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": meta::name(&obj), "kind": r.plural, "uid": meta::uid(&obj)},
    })
}

pub async fn delete_collection(state: &Shared, t: &Target, query: &Query, req: Request) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(query)?;
    let (opts, dry) = delete_options(query, req).await?;
    let (items, _) = state.store.list(t.res, t.namespace.as_deref(), |o| labels.matches(o) && fields.matches(o));
    let mut deleted = Vec::new();
    for item in items {
        let ns = (!meta::namespace(&item).is_empty()).then(|| meta::namespace(&item).to_owned());
        let result = if dry {
            delete_dry_run(state, t, ns.as_deref(), meta::name(&item), &opts)
        } else {
            lifecycle::delete(&state.cluster, t.res, ns.as_deref(), meta::name(&item), opts.clone()).await
        };
        match result {
            Ok(obj) => deleted.push(obj),
            Err(ApiError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let list = json!({
        "kind": format!("{}List", t.res.kind),
        "apiVersion": t.res.group_version,
        "metadata": {"resourceVersion": state.store.current_rv().to_string()},
        "items": deleted,
    });
    Ok(json_response(StatusCode::OK, &list))
}
