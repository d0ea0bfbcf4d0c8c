//! `host cleanup`: what a killed host left behind. Every object keel creates carries the label
//! `app.kubernetes.io/managed-by=keel`, so what is left is found by label, across namespaces,
//! optionally only when older than a cutoff (so a running job's objects can be spared).

use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::Client;
use kube::api::ObjectMeta;

use super::{ClusterError, Created, delete, list_managed};

/// One object removed: `namespace/kind/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed(pub String);

impl std::fmt::Display for Removed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Deletes keel's pods, secrets and services created before `cutoff` (all of them: `None`).
pub async fn remove(client: &Client, cutoff: Option<jiff::Timestamp>) -> Result<Vec<Removed>, ClusterError> {
    let old_enough = |meta: &ObjectMeta| match (cutoff, &meta.creation_timestamp) {
        (None, _) => true,
        (Some(cutoff), Some(t)) => t.0 < cutoff,
        (Some(_), None) => false,
    };
    let namespace = |meta: &ObjectMeta| meta.namespace.clone().unwrap_or_default();
    let name = |meta: &ObjectMeta| meta.name.clone().unwrap_or_default();
    let mut found: Vec<(Created, String)> = Vec::new();
    for pod in list_managed::<Pod>(client).await? {
        let m = &pod.metadata;
        if old_enough(m) {
            let created = Created {
                namespace: namespace(m),
                pod: Some((name(m), m.uid.clone().unwrap_or_default())),
                ..Default::default()
            };
            found.push((created, format!("pod/{}", name(m))));
        }
    }
    for secret in list_managed::<Secret>(client).await? {
        let m = &secret.metadata;
        if old_enough(m) {
            found.push((
                Created { namespace: namespace(m), secrets: vec![name(m)], ..Default::default() },
                format!("secret/{}", name(m)),
            ));
        }
    }
    for service in list_managed::<Service>(client).await? {
        let m = &service.metadata;
        if old_enough(m) {
            found.push((
                Created { namespace: namespace(m), services: vec![name(m)], ..Default::default() },
                format!("service/{}", name(m)),
            ));
        }
    }
    let mut removed = Vec::with_capacity(found.len());
    for (created, what) in found {
        delete(client, &created, Some(0)).await?;
        removed.push(Removed(format!("{}/{what}", created.namespace)));
    }
    Ok(removed)
}
