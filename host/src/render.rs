//! `host render`: [`crate::prepare`] — every stage a real run goes through up to the API
//! calls — then the objects are printed instead of created.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Secret};

use crate::job::{Job, Overwrites};
use crate::plugins::Runtime;
use crate::pod::JobObjects;
pub use crate::prepare::PrepareRequest;
use crate::prepare::prepare;
pub use crate::prepare::{PrepareError as RenderError, default_pull_policies, refused_overwrites};
use crate::trace::Masker;

/// What replaces secret values in rendered output unless `--show-secrets` is given.
pub use crate::trace::MASKED;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot encode the rendered objects")]
    Encode(#[source] serde_json::Error),
    #[error("cannot write the rendered objects as YAML")]
    Yaml(#[source] yaml_rust2::EmitError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    #[default]
    Yaml,
    Json,
}

/// Inputs of one render: exactly what `run` prepares (`require_strategy: false` leaves the
/// base pod when no strategy plugin is found).
pub type RenderRequest = PrepareRequest;

/// The outcome: the objects plus what happened to the requested overwrites.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub job: Job,
    pub requested: Overwrites,
    pub accepted: Overwrites,
    pub objects: JobObjects,
}

/// The same pipeline `run` goes through, up to the API calls.
pub async fn render(rt: &Runtime, req: &RenderRequest) -> Result<Rendered, RenderError> {
    let prepared = prepare(rt, req).await?;
    Ok(Rendered {
        job: prepared.job,
        requested: prepared.requested,
        accepted: prepared.accepted,
        objects: prepared.objects,
    })
}

/// Replace secret values with the trace's masker (the job's non-public values and GitLab's token
/// prefixes) in every string of the objects, and every value of the Secrets. By construction
/// no non-public value is in the Pod or a Service; this is the same net the trace has.
pub fn redact(rendered: &mut Rendered) {
    let masker = Masker::new(rendered.job.secret_values());
    mask_strings_in(&mut rendered.objects.pod, &masker);
    for service in &mut rendered.objects.services {
        mask_strings_in(service, &masker);
    }
    if let Some(secret) = rendered.objects.secret.as_mut() {
        redact_secret(secret);
    }
    redact_secret(&mut rendered.objects.variables);
}

fn mask_strings_in<T: serde::Serialize + serde::de::DeserializeOwned>(object: &mut T, masker: &Masker) {
    fn walk(v: &mut serde_json::Value, masker: &Masker) {
        match v {
            serde_json::Value::String(s) => *s = masker.mask_str(s),
            serde_json::Value::Array(items) => items.iter_mut().for_each(|i| walk(i, masker)),
            serde_json::Value::Object(map) => map.values_mut().for_each(|i| walk(i, masker)),
            _ => {}
        }
    }
    // A typed object always encodes; masking keeps every string a string, so it decodes back.
    if let Ok(mut value) = serde_json::to_value(&*object) {
        walk(&mut value, masker);
        if let Ok(masked) = serde_json::from_value(value) {
            *object = masked;
        }
    }
}

fn redact_secret(secret: &mut Secret) {
    // stringData keeps the placeholder readable instead of base64 of a placeholder.
    if let Some(data) = secret.data.take() {
        let string_data: BTreeMap<String, String> = data.into_keys().map(|k| (k, MASKED.to_string())).collect();
        secret.string_data = Some(string_data);
    }
}

/// The objects as JSON values, in creation order: Secret, Pod, Services.
pub fn to_values(objects: &JobObjects) -> Result<Vec<serde_json::Value>, OutputError> {
    let mut out = Vec::new();
    if let Some(s) = &objects.secret {
        out.push(serde_json::to_value(s).map_err(OutputError::Encode)?);
    }
    out.push(serde_json::to_value(&objects.variables).map_err(OutputError::Encode)?);
    out.push(serde_json::to_value::<&Pod>(&objects.pod).map_err(OutputError::Encode)?);
    for s in &objects.services {
        out.push(serde_json::to_value(s).map_err(OutputError::Encode)?);
    }
    Ok(out)
}

/// Multi-document YAML (`---` before each object) or one JSON `v1/List`.
pub fn format(objects: &JobObjects, format: OutputFormat) -> Result<String, OutputError> {
    let values = to_values(objects)?;
    match format {
        OutputFormat::Yaml => {
            let mut out = String::new();
            for v in values {
                yaml::emit(&v, &mut out).map_err(OutputError::Yaml)?;
            }
            Ok(out)
        }
        OutputFormat::Json => {
            let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": values});
            let mut s = serde_json::to_string_pretty(&list).map_err(OutputError::Encode)?;
            s.push('\n');
            Ok(s)
        }
    }
}

/// YAML output for rendered objects, written by yaml-rust2's emitter.
///
/// serde_yaml_ng writes YAML 1.2, where `yes`, `on` or `y` are plain strings; kubectl and most
/// Kubernetes tooling read YAML 1.1, where they are booleans. yaml-rust2's emitter quotes every
/// string a YAML 1.1 reader could take for a bool, null or number, so the output means the same
/// to both.
mod yaml {
    use serde_json::Value;
    use yaml_rust2::{Yaml, YamlEmitter, yaml::Hash};

    fn to_yaml(v: &Value) -> Yaml {
        match v {
            Value::Null => Yaml::Null,
            Value::Bool(b) => Yaml::Boolean(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Yaml::Integer(i),
                // u64 above i64::MAX and floats keep their JSON spelling, which is valid YAML.
                None => Yaml::Real(n.to_string()),
            },
            Value::String(s) => Yaml::String(s.clone()),
            Value::Array(items) => Yaml::Array(items.iter().map(to_yaml).collect()),
            Value::Object(map) => {
                let mut hash = Hash::new();
                for (k, v) in map {
                    hash.insert(Yaml::String(k.clone()), to_yaml(v));
                }
                Yaml::Hash(hash)
            }
        }
    }

    /// Appends one YAML document (with its `---` header) to `out`.
    pub fn emit(v: &Value, out: &mut String) -> Result<(), yaml_rust2::EmitError> {
        let doc = to_yaml(v);
        YamlEmitter::new(out).dump(&doc)?;
        out.push('\n');
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trips_and_quotes_yaml11_specials() {
            let v = serde_json::json!({
                "a": "yes", "b": "on", "c": "12", "d": "plain-text/x.y", "e": "has space",
                "f": [1, "two", {"g": "h", "i": ["j"]}, [], {}], "k": {"l": null, "m": true},
                "n": "multi\nline", "o": "", "p": "-", "q": "1e3", "r": [["x"]]
            });
            let mut out = String::new();
            emit(&v, &mut out).expect("emits");
            for quoted in ["a: \"yes\"", "b: \"on\"", "c: \"12\"", "o: \"\"", "q: \"1e3\""] {
                assert!(out.contains(quoted), "{quoted} missing in\n{out}");
            }
            let back: Value = serde_yaml_ng::from_str(&out).unwrap_or_else(|e| panic!("invalid YAML {e}:\n{out}"));
            assert_eq!(back, v, "\n{out}");
        }
    }
}
