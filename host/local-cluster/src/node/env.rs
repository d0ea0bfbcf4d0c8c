//! A container's environment and command line as the kubelet makes them: `env` with
//! `valueFrom` (field, Secret and ConfigMap references) and `envFrom`, `$(VAR)` expansion, and
//! the process a container on the host's root runs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};

use super::{ResolvedVolumes, sandbox};

/// The IP every pod reports (`status.podIP`, the `fieldRef`s, its own `/etc/hosts` line): each
/// pod has only a loopback of its own until the node gives pods a network.
pub(super) const POD_IP: &str = "127.0.0.1";

/// Expands `$(VAR)` references like the kubelet; `$$` escapes, unknown references stay as is.
pub(crate) fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('(') {
            match r.find(')') {
                Some(end) => {
                    let name = &r[..end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &r[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The process a container on the host's root runs (a stored image's config decides it for
/// its containers, see `image::config`). There is no image config to read, so every image is
/// taken to have an empty entrypoint and `sh` as its cmd, as busybox and alpine have: `command` replaces
/// the entrypoint (args follow it), `args` alone are the whole command line, and neither runs `sh`.
pub(crate) fn argv(c: &Container, env: &[(String, String)]) -> Vec<String> {
    let command = c.command.clone().filter(|c| !c.is_empty());
    let args = c.args.clone().filter(|a| !a.is_empty());
    let argv = match (command, args) {
        (Some(mut cmd), args) => {
            cmd.extend(args.into_iter().flatten());
            cmd
        }
        (None, Some(args)) => args,
        (None, None) => vec!["sh".into()],
    };
    argv.iter().map(|a| expand(a, env)).collect()
}

fn field_ref(pod: &Pod, path: &str) -> Result<String, String> {
    let m = &pod.metadata;
    let spec = pod.spec.clone().unwrap_or_default();
    let map_get = |map: &Option<BTreeMap<String, String>>, rest: &str| {
        let key = rest.trim_start_matches("['").trim_end_matches("']");
        map.as_ref().and_then(|l| l.get(key).cloned()).unwrap_or_default()
    };
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.node_name.clone().unwrap_or_default(),
        "spec.serviceAccountName" => spec.service_account_name.clone().unwrap_or_default(),
        // The node fills in the pod's addresses before its containers start.
        "status.podIP" | "status.podIPs" => pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or(POD_IP.into()),
        "status.hostIP" | "status.hostIPs" => {
            pod.status.as_ref().and_then(|s| s.host_ip.clone()).unwrap_or(POD_IP.into())
        }
        p if p.starts_with("metadata.labels[") => map_get(&m.labels, &p["metadata.labels".len()..]),
        p if p.starts_with("metadata.annotations[") => map_get(&m.annotations, &p["metadata.annotations".len()..]),
        p => return Err(format!("unsupported fieldRef fieldPath {p:?}")),
    })
}

fn source_data<'a>(data: &'a ResolvedVolumes, kind: &str, name: &str) -> Option<&'a BTreeMap<String, Vec<u8>>> {
    data.get(&format!("{kind}/{name}"))
}

/// The container's environment: defaults, envFrom, then env (later wins), `$(VAR)` expanded.
pub(crate) fn build_env(pod: &Pod, c: &Container, data: &ResolvedVolumes) -> Result<Vec<(String, String)>, String> {
    let defaults = vec![
        ("PATH".into(), sandbox::DEFAULT_PATH.into()),
        ("HOSTNAME".into(), pod.metadata.name.clone().unwrap_or_default()),
        ("HOME".into(), "/root".into()),
    ];
    build_env_over(pod, c, data, defaults)
}

/// The container's environment over `defaults` (the runtime's, or an image's): envFrom, then
/// env (later wins), `$(VAR)` expanded.
pub(crate) fn build_env_over(
    pod: &Pod,
    c: &Container,
    data: &ResolvedVolumes,
    defaults: Vec<(String, String)>,
) -> Result<Vec<(String, String)>, String> {
    let mut env = defaults;
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(x, _)| *x != k);
        env.push((k, v));
    };
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (kind, name, optional) = if let Some(r) = &from.config_map_ref {
            ("configMap", r.name.clone(), r.optional.unwrap_or(false))
        } else if let Some(r) = &from.secret_ref {
            ("secret", r.name.clone(), r.optional.unwrap_or(false))
        } else {
            continue;
        };
        match source_data(data, kind, &name) {
            Some(d) => {
                for (k, v) in d {
                    set(&mut env, format!("{prefix}{k}"), String::from_utf8_lossy(v).into_owned());
                }
            }
            None if optional => {}
            None => return Err(format!("{} \"{name}\" not found", kind.to_lowercase())),
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(vf) = &e.value_from {
            if let Some(f) = &vf.field_ref {
                field_ref(pod, &f.field_path)?
            } else if let Some(r) = &vf.config_map_key_ref {
                match source_data(data, "configMap", &r.name).map(|d| d.get(&r.key)) {
                    Some(Some(v)) => String::from_utf8_lossy(v).into_owned(),
                    _ if r.optional.unwrap_or(false) => continue,
                    None => return Err(format!("configmap {:?} not found", r.name)),
                    Some(None) => {
                        return Err(format!(
                            "couldn't find key {} in ConfigMap {}/{}",
                            r.key,
                            pod.metadata.namespace.as_deref().unwrap_or(""),
                            r.name
                        ));
                    }
                }
            } else if let Some(r) = &vf.secret_key_ref {
                match source_data(data, "secret", &r.name).map(|d| d.get(&r.key)) {
                    Some(Some(v)) => String::from_utf8_lossy(v).into_owned(),
                    _ if r.optional.unwrap_or(false) => continue,
                    None => return Err(format!("secret {:?} not found", r.name)),
                    Some(None) => {
                        return Err(format!(
                            "couldn't find key {} in Secret {}/{}",
                            r.key,
                            pod.metadata.namespace.as_deref().unwrap_or(""),
                            r.name
                        ));
                    }
                }
            } else if let Some(r) = &vf.resource_field_ref {
                let res = c.resources.clone().unwrap_or_default();
                let (map, key) = match r.resource.split_once('.') {
                    Some(("limits", k)) => (res.limits, k.to_string()),
                    Some(("requests", k)) => (res.requests, k.to_string()),
                    _ => return Err(format!("unsupported resourceFieldRef {:?}", r.resource)),
                };
                map.and_then(|m| m.get(&key).map(|q| q.0.clone())).unwrap_or_else(|| "0".into())
            } else {
                String::new()
            }
        } else {
            expand(e.value.as_deref().unwrap_or(""), &env)
        };
        set(&mut env, e.name.clone(), value);
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_paren_expansion_follows_kubelet_rules() {
        let env = vec![("A".to_string(), "x".to_string())];
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &env), "x-$(B)-$(A)-$");
    }

    #[test]
    fn env_resolves_field_refs_and_secret_refs_and_names_missing_keys() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"app": "web"}},
            "spec": {"serviceAccountName": "sa", "nodeName": "n1", "containers": [{"name": "c", "env": [
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
                {"name": "BOTH", "value": "$(POD)/$(APP)"}
            ]}]}
        }))
        .unwrap();
        let c = pod.spec.as_ref().unwrap().containers[0].clone();
        let mut data = ResolvedVolumes::new();
        data.insert("secret/s".into(), [("pw".to_string(), b"hunter2".to_vec())].into_iter().collect());
        let env: BTreeMap<_, _> = build_env(&pod, &c, &data).unwrap().into_iter().collect();
        assert_eq!(env["POD"], "p");
        assert_eq!(env["APP"], "web");
        assert_eq!(env["SA"], "sa");
        assert_eq!(env["IP"], "127.0.0.1");
        assert_eq!(env["PW"], "hunter2");
        assert_eq!(env["BOTH"], "p/web");
        let e = build_env(&pod, &c, &ResolvedVolumes::new()).unwrap_err();
        assert_eq!(e, "secret \"s\" not found");
        let mut no_key = ResolvedVolumes::new();
        no_key.insert("secret/s".into(), BTreeMap::new());
        assert_eq!(build_env(&pod, &c, &no_key).unwrap_err(), "couldn't find key pw in Secret ns/s");
    }
}
