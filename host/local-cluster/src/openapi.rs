//! A minimal OpenAPI v3 document. kubectl reads it to learn that the server validates fields
//! itself (`fieldValidation` query parameter on write operations); without it kubectl falls back
//! to client-side validation against `/openapi/v2` schemas and refuses to create anything.
//! Schemas are deliberately absent: kubectl then builds apply patches from its built-in types.

use crate::discovery::GIT_VERSION;
use crate::resources::RESOURCES;
use serde_json::{Map, Value, json};

/// Bumped whenever the document changes, so clients' caches (keyed by it) refresh.
const HASH: &str = "keel-1";

/// The media type client-go asks `/openapi/v2` for.
pub const V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";
/// What the API server answers it with (Go's MIME parser refuses the `@` of the asked-for type).
pub const V2_PROTOBUF_ANSWER: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

/// An OpenAPI v2 document without definitions. kubectl validates a `v1 List` on the client
/// (its field-validation check does not cover `List`) against `/openapi/v2`; a kind the
/// document has no schema for is not validated there, so the server's own checks decide, as
/// they do for every other object. Without the document kubectl refused every List.
pub fn v2() -> Value {
    json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": GIT_VERSION}, "paths": {}})
}

/// [`v2`] in gnostic's protobuf encoding (`openapi_v2.Document`): `swagger` (field 1) and
/// `info` (field 2: `title` 1, `version` 2).
pub fn v2_protobuf() -> Vec<u8> {
    use crate::protobuf::put_bytes;
    let mut info = Vec::new();
    put_bytes(&mut info, 1, b"Kubernetes");
    put_bytes(&mut info, 2, GIT_VERSION.as_bytes());
    let mut doc = Vec::new();
    put_bytes(&mut doc, 1, b"2.0");
    put_bytes(&mut doc, 2, &info);
    doc
}

pub fn root() -> Value {
    json!({"paths": {"api/v1": {"serverRelativeURL": format!("/openapi/v3/api/v1?hash={HASH}")}}})
}

fn operation(id: String, kind: &str, action: &str, with_body: bool) -> Value {
    let mut params = vec![json!({"name": "pretty", "in": "query", "schema": {"type": "string"}})];
    if with_body {
        for p in ["fieldValidation", "fieldManager", "dryRun"] {
            params.push(json!({"name": p, "in": "query", "schema": {"type": "string", "uniqueItems": true}}));
        }
    }
    let mut op = json!({
        "operationId": id,
        "parameters": params,
        "responses": {"200": {"description": "OK"}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": "", "version": "v1", "kind": kind},
    });
    if action == "patch" {
        // No strategic-merge content type here on purpose: kubectl would then try to compute
        // apply patches from (absent) schemas instead of its built-in types.
        op["requestBody"] = json!({"content": {
            "application/json-patch+json": {"schema": {"type": "object"}},
            "application/merge-patch+json": {"schema": {"type": "object"}},
        }});
    } else if with_body {
        op["requestBody"] = json!({"content": {"application/json": {"schema": {"type": "object"}}}});
    }
    op
}

pub fn core_v1() -> Value {
    let mut paths = Map::new();
    for r in RESOURCES.iter().filter(|r| r.group_version == "v1") {
        let (collection, item) = if r.namespaced {
            (
                format!("/api/v1/namespaces/{{namespace}}/{}", r.plural),
                format!("/api/v1/namespaces/{{namespace}}/{}/{{name}}", r.plural),
            )
        } else {
            (format!("/api/v1/{}", r.plural), format!("/api/v1/{}/{{name}}", r.plural))
        };
        let k = r.kind;
        paths.insert(
            collection,
            json!({
                "get": operation(format!("listCoreV1{k}"), k, "list", false),
                "post": operation(format!("createCoreV1{k}"), k, "post", true),
            }),
        );
        paths.insert(
            item,
            json!({
                "get": operation(format!("readCoreV1{k}"), k, "get", false),
                "put": operation(format!("replaceCoreV1{k}"), k, "put", true),
                "patch": operation(format!("patchCoreV1{k}"), k, "patch", true),
                "delete": operation(format!("deleteCoreV1{k}"), k, "delete", false),
            }),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": paths,
        "components": {"schemas": {}},
    })
}
