//! Just enough Kubernetes protobuf to read the bodies kubectl's typed `create` subcommands send
//! (`kubectl create namespace|secret|configmap|service` always use protobuf and do not fall
//! back to JSON on 415). Decodes the `k8s\0` envelope and those kinds into JSON (field numbers
//! from `k8s.io/api/core/v1/generated.proto`); anything else is reported as unsupported. Writes only length-delimited fields ([`put_bytes`], for the
//! schema-less `/openapi/v2` document).

use base64::Engine;
use serde_json::{Map, Value, json};

#[derive(Debug, thiserror::Error)]
pub enum ProtobufError {
    #[error("protobuf body does not start with the Kubernetes magic bytes \"k8s\\0\"")]
    Magic,
    #[error("protobuf body is truncated or malformed at byte {0}")]
    Malformed(usize),
    #[error("protobuf bodies of kind {0:?} are not supported here; send JSON")]
    UnsupportedKind(String),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, ProtobufError> {
        let mut out = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or(ProtobufError::Malformed(self.pos))?;
            self.pos += 1;
            out |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(out);
            }
        }
        Err(ProtobufError::Malformed(self.pos))
    }

    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, ProtobufError> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| ProtobufError::Malformed(self.pos))?;
                let end = self
                    .pos
                    .checked_add(len)
                    .filter(|e| *e <= self.buf.len())
                    .ok_or(ProtobufError::Malformed(self.pos))?;
                let bytes = &self.buf[self.pos..end];
                self.pos = end;
                Field::Bytes(bytes)
            }
            1 => {
                self.pos += 8;
                Field::Varint(0)
            }
            5 => {
                self.pos += 4;
                Field::Varint(0)
            }
            _ => return Err(ProtobufError::Malformed(self.pos)),
        };
        if self.pos > self.buf.len() {
            return Err(ProtobufError::Malformed(self.pos));
        }
        Ok(Some((key >> 3, field)))
    }
}

fn text(b: &[u8]) -> Value {
    json!(String::from_utf8_lossy(b))
}

/// A `map<string, string|bytes>` entry: key = field 1, value = field 2.
fn map_entry(b: &[u8], value_as_base64: bool) -> Result<(String, Value), ProtobufError> {
    let (mut k, mut v) = (String::new(), json!(""));
    let mut r = Reader::new(b);
    while let Some((n, f)) = r.next()? {
        if let Field::Bytes(bytes) = f {
            match n {
                1 => k = String::from_utf8_lossy(bytes).into_owned(),
                2 if value_as_base64 => v = json!(base64::engine::general_purpose::STANDARD.encode(bytes)),
                2 => v = text(bytes),
                _ => {}
            }
        }
    }
    Ok((k, v))
}

fn insert_entry(obj: &mut Map<String, Value>, key: &str, b: &[u8], base64: bool) -> Result<(), ProtobufError> {
    let (k, v) = map_entry(b, base64)?;
    if let Some(m) = obj.entry(key.to_owned()).or_insert_with(|| json!({})).as_object_mut() {
        m.insert(k, v);
    }
    Ok(())
}

fn push(obj: &mut Map<String, Value>, key: &str, v: Value) {
    if let Some(list) = obj.entry(key.to_owned()).or_insert_with(|| json!([])).as_array_mut() {
        list.push(v);
    }
}

fn object_meta(b: &[u8]) -> Result<Value, ProtobufError> {
    let mut md = Map::new();
    let mut r = Reader::new(b);
    while let Some((n, f)) = r.next()? {
        let Field::Bytes(bytes) = f else { continue };
        match n {
            1 => drop(md.insert("name".into(), text(bytes))),
            2 => drop(md.insert("generateName".into(), text(bytes))),
            3 => drop(md.insert("namespace".into(), text(bytes))),
            11 => insert_entry(&mut md, "labels", bytes, false)?,
            12 => insert_entry(&mut md, "annotations", bytes, false)?,
            14 => push(&mut md, "finalizers", text(bytes)),
            _ => {}
        }
    }
    Ok(Value::Object(md))
}

/// `IntOrString`: type = 1 (0 int, 1 string), intVal = 2, strVal = 3.
fn int_or_string(b: &[u8]) -> Result<Value, ProtobufError> {
    let (mut is_string, mut int, mut string) = (false, 0i64, String::new());
    let mut r = Reader::new(b);
    while let Some((n, f)) = r.next()? {
        match (n, f) {
            (1, Field::Varint(t)) => is_string = t == 1,
            (2, Field::Varint(v)) => int = v as i32 as i64,
            (3, Field::Bytes(s)) => string = String::from_utf8_lossy(s).into_owned(),
            _ => {}
        }
    }
    Ok(if is_string { json!(string) } else { json!(int) })
}

/// A string field, left out when empty: Go's zero value is what "unset" decodes to, and the
/// server's defaulting treats it so.
fn set(obj: &mut Map<String, Value>, key: &str, b: &[u8]) {
    if !b.is_empty() {
        obj.insert(key.into(), text(b));
    }
}

/// `ServicePort`: name = 1, protocol = 2, port = 3, targetPort = 4, nodePort = 5, appProtocol = 6.
fn service_port(b: &[u8]) -> Result<Value, ProtobufError> {
    let mut port = Map::new();
    let mut r = Reader::new(b);
    while let Some((n, f)) = r.next()? {
        match (n, f) {
            (1, Field::Bytes(v)) => set(&mut port, "name", v),
            (2, Field::Bytes(v)) => set(&mut port, "protocol", v),
            (3, Field::Varint(v)) => drop(port.insert("port".into(), json!(v as i32))),
            (4, Field::Bytes(v)) => drop(port.insert("targetPort".into(), int_or_string(v)?)),
            (5, Field::Varint(v)) if v != 0 => drop(port.insert("nodePort".into(), json!(v as i32))),
            (6, Field::Bytes(v)) => set(&mut port, "appProtocol", v),
            _ => {}
        }
    }
    Ok(Value::Object(port))
}

/// The `ServiceSpec` fields kubectl's `create service` sets: ports = 1, selector = 2,
/// clusterIP = 3, type = 4, externalIPs = 5, sessionAffinity = 7, externalName = 10,
/// clusterIPs = 18.
fn service_spec(b: &[u8]) -> Result<Value, ProtobufError> {
    let mut spec = Map::new();
    let mut r = Reader::new(b);
    while let Some((n, f)) = r.next()? {
        let Field::Bytes(v) = f else { continue };
        match n {
            1 => push(&mut spec, "ports", service_port(v)?),
            2 => insert_entry(&mut spec, "selector", v, false)?,
            3 => set(&mut spec, "clusterIP", v),
            4 => set(&mut spec, "type", v),
            5 => push(&mut spec, "externalIPs", text(v)),
            7 => set(&mut spec, "sessionAffinity", v),
            10 => set(&mut spec, "externalName", v),
            18 => push(&mut spec, "clusterIPs", text(v)),
            _ => {}
        }
    }
    Ok(Value::Object(spec))
}

fn decode_kind(kind: &str, raw: &[u8]) -> Result<Value, ProtobufError> {
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), json!("v1"));
    obj.insert("kind".into(), json!(kind));
    let mut r = Reader::new(raw);
    while let Some((n, f)) = r.next()? {
        match (kind, n, f) {
            (_, 1, Field::Bytes(b)) => drop(obj.insert("metadata".into(), object_meta(b)?)),
            ("Namespace", 2, Field::Bytes(b)) => {
                let mut spec = Map::new();
                let mut sr = Reader::new(b);
                while let Some((sn, sf)) = sr.next()? {
                    if let (1, Field::Bytes(fb)) = (sn, sf) {
                        push(&mut spec, "finalizers", text(fb));
                    }
                }
                obj.insert("spec".into(), Value::Object(spec));
            }
            ("Secret", 2, Field::Bytes(b)) => insert_entry(&mut obj, "data", b, true)?,
            ("Secret", 3, Field::Bytes(b)) => drop(obj.insert("type".into(), text(b))),
            ("Secret", 4, Field::Bytes(b)) => insert_entry(&mut obj, "stringData", b, false)?,
            ("Secret", 5, Field::Varint(v)) | ("ConfigMap", 4, Field::Varint(v)) => {
                drop(obj.insert("immutable".into(), json!(v != 0)))
            }
            ("ConfigMap", 2, Field::Bytes(b)) => insert_entry(&mut obj, "data", b, false)?,
            ("ConfigMap", 3, Field::Bytes(b)) => insert_entry(&mut obj, "binaryData", b, true)?,
            ("Service", 2, Field::Bytes(b)) => drop(obj.insert("spec".into(), service_spec(b)?)),
            _ => {}
        }
    }
    Ok(Value::Object(obj))
}

/// Decode an `application/vnd.kubernetes.protobuf` body into the JSON object it encodes.
pub fn decode(body: &[u8]) -> Result<Value, ProtobufError> {
    let unknown = body.strip_prefix(b"k8s\0").ok_or(ProtobufError::Magic)?;
    let (mut kind, mut raw) = (String::new(), &[][..]);
    let mut r = Reader::new(unknown);
    while let Some((n, f)) = r.next()? {
        match (n, f) {
            (1, Field::Bytes(type_meta)) => {
                let mut tr = Reader::new(type_meta);
                while let Some((tn, tf)) = tr.next()? {
                    if let (2, Field::Bytes(k)) = (tn, tf) {
                        kind = String::from_utf8_lossy(k).into_owned();
                    }
                }
            }
            (2, Field::Bytes(b)) => raw = b,
            _ => {}
        }
    }
    match kind.as_str() {
        "Namespace" | "Secret" | "ConfigMap" | "Service" => decode_kind(&kind, raw),
        _ => Err(ProtobufError::UnsupportedKind(kind)),
    }
}

/// Appends field `number` as a length-delimited value (strings, bytes, embedded messages).
pub(crate) fn put_bytes(out: &mut Vec<u8>, number: u8, bytes: &[u8]) {
    out.push(number << 3 | 2);
    let mut len = bytes.len();
    while len >= 0x80 {
        out.push((len & 0x7f) as u8 | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u8, bytes: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        put_bytes(&mut v, n, bytes);
        v
    }

    #[test]
    fn decodes_a_secret_envelope() {
        let type_meta = [field(1, b"v1"), field(2, b"Secret")].concat();
        let meta = [field(1, b"creds"), field(11, &[field(1, b"app"), field(2, b"x")].concat())].concat();
        let secret =
            [field(1, &meta), field(2, &[field(1, b"user"), field(2, b"me")].concat()), field(3, b"Opaque")].concat();
        let body = [b"k8s\0".to_vec(), field(1, &type_meta), field(2, &secret)].concat();
        let v = decode(&body).unwrap();
        assert_eq!(v["metadata"]["name"], "creds");
        assert_eq!(v["metadata"]["labels"]["app"], "x");
        assert_eq!(v["data"]["user"], "bWU=");
        assert_eq!(v["type"], "Opaque");
        assert!(matches!(decode(b"nope"), Err(ProtobufError::Magic)));
        assert!(matches!(decode(&[b"k8s\0".to_vec(), vec![0x0a, 0x7f]].concat()), Err(ProtobufError::Malformed(_))));
    }
}
