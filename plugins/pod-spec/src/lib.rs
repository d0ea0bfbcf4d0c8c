//! `pod-spec`: GitLab's `[[runners.kubernetes.pod_spec]]` patches, applied in order.
//!
//! Each entry: `name`, `patch` (YAML or JSON text), `patch_type` = `strategic` (default, as in
//! GitLab) | `merge` (RFC 7386) | `json` (RFC 6902). `patch_path` entries are turned into
//! `patch` by the host before the config reaches the plugin (`plugins::resolve_patch_paths`):
//! plugins have no file access, and granting one just to read a patch would widen every
//! plugin's sandbox for the sake of one.
//!
//! Strategic merge here follows Kubernetes' rules for the pod fields people patch: lists of
//! objects with a merge key (`containers`, `initContainers`, `volumes`, `env`, `volumeMounts`,
//! `ports`, `imagePullSecrets`, `hostAliases`...) are merged element-wise by that key, other
//! lists are replaced, maps are merged recursively, `null` deletes. The `$patch`/`$retainKeys`
//! directives are not supported and are rejected.

use keel_sdk::{Config, Context, Error, Plugin, Pod, PodMutator};
use serde_json::Value;

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpecPatch {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub patch: Option<String>,
    #[serde(default)]
    pub patch_path: Option<String>,
    #[serde(default)]
    pub patch_type: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct RunnerPodSpec {
    #[serde(default)]
    pod_spec: Vec<PodSpecPatch>,
}

pub struct PodSpec;

impl Plugin for PodSpec {
    const NAME: &'static str = "pod-spec";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(config: Config) -> Result<Self, Error> {
        match config.as_json() {
            Value::Object(map) if map.is_empty() => Ok(PodSpec),
            Value::Null => Ok(PodSpec),
            other => Err(Error::invalid_config(format!(
                "pod-spec takes no settings of its own (patches are [[runners.kubernetes.pod_spec]]), got {other}"
            ))),
        }
    }
}

use keel_sdk::merge_keys::merge_key;

fn strategic_merge(target: &mut Value, patch: &Value, path: &str) -> Result<(), String> {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (key, pv) in p {
                if key.starts_with('$') {
                    return Err(format!("{path}.{key}: strategic merge directives are not supported"));
                }
                if pv.is_null() {
                    t.remove(key);
                    continue;
                }
                let child = format!("{path}.{key}");
                match (t.get_mut(key), pv, merge_key(key)) {
                    (Some(Value::Array(tl)), Value::Array(pl), Some(mk)) => {
                        for item in pl {
                            let id = item.get(mk).cloned();
                            match id.and_then(|id| tl.iter_mut().find(|e| e.get(mk) == Some(&id))) {
                                Some(existing) => strategic_merge(existing, item, &child)?,
                                None => tl.push(item.clone()),
                            }
                        }
                    }
                    (Some(tv @ Value::Object(_)), Value::Object(_), _) => strategic_merge(tv, pv, &child)?,
                    _ => {
                        t.insert(key.clone(), pv.clone());
                    }
                }
            }
            Ok(())
        }
        (t, p) => {
            *t = p.clone();
            Ok(())
        }
    }
}

/// Apply one patch entry to the pod's `spec` (GitLab patches the pod spec, not the pod).
pub fn apply(spec: &mut Value, index: usize, entry: &PodSpecPatch) -> Result<(), Error> {
    let label = format!("pod_spec[{index}] ({:?})", entry.name);
    if entry.patch_path.is_some() {
        return Err(Error::invalid_config(format!(
            "{label}: patch_path reached the plugin; the host must resolve it into `patch`"
        )));
    }
    let Some(text) = entry.patch.as_deref() else {
        return Err(Error::invalid_config(format!("{label}: neither patch nor patch_path is set")));
    };
    // YAML is a superset of JSON, so one parser takes both spellings GitLab users write.
    let patch: Value = serde_yaml_ng::from_str(text)
        .map_err(|e| Error::invalid_config(format!("{label}: patch is not valid YAML/JSON: {e}")))?;
    match entry.patch_type.as_deref().unwrap_or("strategic") {
        "json" => {
            let ops: json_patch::Patch = serde_json::from_value(patch).map_err(|e| {
                Error::invalid_config(format!("{label}: not a JSON patch (RFC 6902) operation list: {e}"))
            })?;
            json_patch::patch(spec, &ops)
                .map_err(|e| Error::invalid_config(format!("{label}: JSON patch does not apply: {e}")))
        }
        "merge" => {
            json_patch::merge(spec, &patch);
            Ok(())
        }
        "strategic" => {
            strategic_merge(spec, &patch, "spec").map_err(|e| Error::invalid_config(format!("{label}: {e}")))
        }
        other => {
            Err(Error::invalid_config(format!("{label}: patch_type {other:?} is not one of json, merge, strategic")))
        }
    }
}

pub fn apply_all(pod: Pod, patches: &[PodSpecPatch]) -> Result<Pod, Error> {
    if patches.is_empty() {
        return Ok(pod);
    }
    let mut value = serde_json::to_value(&pod).map_err(|e| Error::internal(e.to_string()))?;
    let spec = value
        .as_object_mut()
        .ok_or_else(|| Error::internal("pod is not an object"))?
        .entry("spec")
        .or_insert(Value::Object(Default::default()));
    for (index, entry) in patches.iter().enumerate() {
        apply(spec, index, entry)?;
    }
    serde_json::from_value(value)
        .map_err(|e| Error::denied(format!("after the pod_spec patches the pod is no longer valid: {e}")))
}

impl PodMutator for PodSpec {
    fn mutate(&mut self, ctx: &Context, pod: Pod) -> Result<Pod, Error> {
        let config: RunnerPodSpec = ctx.runner_config()?;
        apply_all(pod, &config.pod_spec)
    }
}

keel_sdk::export!(PodSpec: PodMutator);

#[cfg(test)]
mod tests {
    use super::*;
    use keel_sdk::testing;
    use serde_json::json;

    fn patch(kind: &str, text: &str) -> PodSpecPatch {
        PodSpecPatch { name: "t".into(), patch: Some(text.into()), patch_path: None, patch_type: Some(kind.into()) }
    }

    fn run(patches: Vec<PodSpecPatch>) -> Result<Value, Error> {
        let mut plugin = PodSpec;
        // A job with two services: build, helper, svc-0, svc-1 in the host's pod.
        let ctx = testing::ContextBuilder::new()
            .service("postgres:16", Some("db"))
            .service("redis:7", None)
            .runner_config(
            json!({ "pod_spec": serde_json::to_value(patches.iter().map(|p| json!({"name": p.name, "patch": p.patch, "patch_type": p.patch_type})).collect::<Vec<_>>()).unwrap() }),
        )
            .build();
        testing::mutate(&mut plugin, &ctx, testing::pod_for(&ctx)).map(|p| serde_json::to_value(p).unwrap())
    }

    #[test]
    fn strategic_merges_containers_by_name() {
        let out = run(vec![patch(
            "strategic",
            "containers:\n  - name: build\n    env:\n      - name: A\n        value: \"1\"\n  - name: extra\n    image: busybox\n",
        )])
        .unwrap();
        let containers = out["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 5, "build merged in place, extra appended");
        assert_eq!(containers[0]["name"], "build");
        assert_eq!(containers[0]["image"], "alpine:3.20", "untouched fields stay");
        // The host's env (CI, CI_JOB_ID, ...) stays; the patch's variable is merged in by name.
        let env = containers[0]["env"].as_array().unwrap();
        assert_eq!(env.iter().find(|e| e["name"] == "A").unwrap()["value"], "1");
        assert!(env.iter().any(|e| e["name"] == "CI_JOB_ID"), "{env:?}");
        assert_eq!(containers[4]["name"], "extra");
    }

    #[test]
    fn merge_patch_replaces_lists_and_json_patch_applies_ops_in_order() {
        let out = run(vec![
            patch("merge", r#"{"hostname": "ci", "nodeSelector": {"disk": "ssd"}}"#),
            patch("json", r#"[{"op": "add", "path": "/dnsPolicy", "value": "None"}, {"op": "replace", "path": "/hostname", "value": "ci2"}]"#),
        ])
        .unwrap();
        assert_eq!(out["spec"]["hostname"], "ci2");
        assert_eq!(out["spec"]["dnsPolicy"], "None");
        assert_eq!(out["spec"]["nodeSelector"]["disk"], "ssd");
    }

    #[test]
    fn errors_name_the_entry() {
        let table = [
            (patch("strategic", "containers: ["), "pod_spec[0] (\"t\"): patch is not valid YAML/JSON"),
            (patch("xml", "{}"), "patch_type \"xml\" is not one of json, merge, strategic"),
            (patch("json", r#"[{"op": "remove", "path": "/nope"}]"#), "JSON patch does not apply"),
            (patch("strategic", "$patch: replace"), "directives are not supported"),
        ];
        for (p, want) in table {
            let err = run(vec![p]).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
        }
        let unresolved =
            PodSpecPatch { name: "f".into(), patch: None, patch_path: Some("/x".into()), patch_type: None };
        let mut spec = json!({});
        assert!(
            apply(&mut spec, 2, &unresolved)
                .unwrap_err()
                .to_string()
                .contains("pod_spec[2] (\"f\"): patch_path reached the plugin")
        );
    }
}
