//! API errors rendered as Kubernetes `Status` objects, so every client (kubectl, client-go,
//! kube-rs, the Python client) decodes reason/code/details exactly as against a real server.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// One field-level problem inside a 422 Invalid answer (`details.causes[]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    /// Machine reason as the real server spells it, e.g. `FieldValueRequired`.
    pub reason: &'static str,
    /// Dotted field path, e.g. `spec.containers[0].image`.
    pub field: String,
    /// Human message without the field prefix, e.g. `Required value`.
    pub message: String,
}

impl Cause {
    pub fn required(field: impl Into<String>, detail: &str) -> Self {
        let message = if detail.is_empty() { "Required value".to_owned() } else { format!("Required value: {detail}") };
        Cause { reason: "FieldValueRequired", field: field.into(), message }
    }
    pub fn invalid(field: impl Into<String>, value: &str, detail: &str) -> Self {
        Cause {
            reason: "FieldValueInvalid",
            field: field.into(),
            message: format!("Invalid value: {value:?}: {detail}"),
        }
    }
    /// A number out of range (Go prints it unquoted: `Invalid value: -1: ...`).
    pub fn invalid_number(field: impl Into<String>, value: i64, detail: &str) -> Self {
        Cause { reason: "FieldValueInvalid", field: field.into(), message: format!("Invalid value: {value}: {detail}") }
    }
    /// A value outside an enum; `supported` listed sorted, as the real server's `sets.List`.
    pub fn not_supported(field: impl Into<String>, value: &str, supported: &[&str]) -> Self {
        let mut supported = supported.to_vec();
        supported.sort_unstable();
        let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        Cause {
            reason: "FieldValueNotSupported",
            field: field.into(),
            message: format!("Unsupported value: {value:?}: supported values: {}", list.join(", ")),
        }
    }
    pub fn duplicate(field: impl Into<String>, value: &str) -> Self {
        Cause { reason: "FieldValueDuplicate", field: field.into(), message: format!("Duplicate value: {value:?}") }
    }
    pub fn forbidden(field: impl Into<String>, detail: &str) -> Self {
        Cause { reason: "FieldValueForbidden", field: field.into(), message: format!("Forbidden: {detail}") }
    }
    fn render(&self) -> String {
        format!("{}: {}", self.field, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{resource} \"{name}\" not found")]
    NotFound { resource: String, name: String },
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists { resource: String, name: String },
    #[error("Operation cannot be fulfilled on {resource} \"{name}\": {reason}")]
    Conflict { resource: String, name: String, reason: String },
    /// A server-side apply that would change fields other managers own (409, like the real server).
    #[error("{message}")]
    ApplyConflict { message: String, causes: Vec<Cause> },
    #[error("{kind} \"{name}\" is invalid: {}", render_causes(.causes))]
    Invalid { kind: String, name: String, causes: Vec<Cause> },
    #[error("{0}")]
    BadRequest(String),
    #[error("the server does not allow this method on the requested resource: {0}")]
    MethodNotAllowed(String),
    #[error("Unauthorized")]
    Unauthorized,
    #[error("too old resource version: {requested} ({oldest})")]
    Gone { requested: u64, oldest: u64 },
    /// A list continue token whose snapshot fell out of the history; `continue_token` resumes
    /// from the same key at the latest version (an inconsistent list), as the real server offers.
    #[error(
        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list."
    )]
    ContinueExpired { continue_token: String },
    #[error("Too large resource version: {requested}, current: {current}")]
    TooLargeResourceVersion { requested: u64, current: u64 },
    #[error("the body of the request was in an unknown format - accepted media types include: {accepted}; got {got}")]
    UnsupportedMediaType { got: String, accepted: String },
    /// A body or stored object over a limit (see `crate::limits`), as `errors.NewRequestEntityTooLargeError`.
    #[error("Request entity too large: {0}")]
    RequestEntityTooLarge(String),
    #[error("the server could not find the requested resource: {0}")]
    UnknownPath(String),
    #[error("{0}")]
    Forbidden(String),
    /// The node does not know the pod or container the request names.
    #[error("{0}")]
    NodeNotFound(String),
    #[error("internal error: {0}")]
    Internal(String),
}

fn render_causes(causes: &[Cause]) -> String {
    match causes {
        [one] => one.render(),
        many => format!("[{}]", many.iter().map(Cause::render).collect::<Vec<_>>().join(", ")),
    }
}

impl ApiError {
    pub fn not_found(resource: &str, name: &str) -> Self {
        ApiError::NotFound { resource: resource.to_owned(), name: name.to_owned() }
    }

    pub fn code(&self) -> u16 {
        match self {
            ApiError::NotFound { .. } | ApiError::UnknownPath(_) | ApiError::NodeNotFound(_) => 404,
            ApiError::AlreadyExists { .. } | ApiError::Conflict { .. } | ApiError::ApplyConflict { .. } => 409,
            ApiError::Invalid { .. } => 422,
            ApiError::BadRequest(_) => 400,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::Unauthorized => 401,
            ApiError::Forbidden(_) => 403,
            ApiError::Gone { .. } | ApiError::ContinueExpired { .. } => 410,
            ApiError::TooLargeResourceVersion { .. } => 504,
            ApiError::UnsupportedMediaType { .. } => 415,
            ApiError::RequestEntityTooLarge(_) => 413,
            ApiError::Internal(_) => 500,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } | ApiError::UnknownPath(_) | ApiError::NodeNotFound(_) => "NotFound",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. } | ApiError::ApplyConflict { .. } => "Conflict",
            ApiError::Invalid { .. } => "Invalid",
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::MethodNotAllowed(_) => "MethodNotAllowed",
            ApiError::Unauthorized => "Unauthorized",
            ApiError::Forbidden(_) => "Forbidden",
            ApiError::Gone { .. } | ApiError::ContinueExpired { .. } => "Expired",
            ApiError::TooLargeResourceVersion { .. } => "Timeout",
            ApiError::UnsupportedMediaType { .. } => "UnsupportedMediaType",
            ApiError::RequestEntityTooLarge(_) => "RequestEntityTooLarge",
            ApiError::Internal(_) => "InternalError",
        }
    }

    /// The `Status` object a real API server would send for this error.
    pub fn to_status(&self) -> Value {
        let details = match self {
            ApiError::NotFound { resource, name }
            | ApiError::AlreadyExists { resource, name }
            | ApiError::Conflict { resource, name, .. } => Some(json!({"name": name, "kind": resource})),
            ApiError::TooLargeResourceVersion { .. } => Some(json!({
                "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                "retryAfterSeconds": 1,
            })),
            ApiError::ApplyConflict { causes, .. } => Some(json!({
                "causes": causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect::<Vec<_>>(),
            })),
            ApiError::Invalid { kind, name, causes } => Some(json!({
                "name": name,
                "kind": kind,
                "causes": causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect::<Vec<_>>(),
            })),
            _ => None,
        };
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        if let Some(details) = details {
            status["details"] = details;
        }
        if let ApiError::ContinueExpired { continue_token } = self {
            status["metadata"]["continue"] = json!(continue_token);
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = self.to_status().to_string();
        let mut resp = (code, body).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_status_lists_causes_like_a_real_server() {
        let err = ApiError::Invalid {
            kind: "Pod".into(),
            name: "p".into(),
            causes: vec![Cause::required("spec.containers", "")],
        };
        let st = err.to_status();
        assert_eq!(st["code"], 422);
        assert_eq!(st["message"], "Pod \"p\" is invalid: spec.containers: Required value");
        assert_eq!(st["details"]["causes"][0]["field"], "spec.containers");
        assert_eq!(st["details"]["causes"][0]["reason"], "FieldValueRequired");
    }
}
