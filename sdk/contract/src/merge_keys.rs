//! Strategic-merge keys of the core/v1 list fields (the `patchMergeKey` tags of Kubernetes' Go
//! types, `x-kubernetes-patch-merge-key` in its OpenAPI): lists of objects with a key are merged
//! element-wise by it; other lists are replaced. One table for the embedded API server and the
//! `pod-spec` plugin.

/// The merge key of list field `field`, if it has one.
pub fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "containerStatuses"
        | "initContainerStatuses"
        | "ephemeralContainerStatuses"
        | "resourceClaims" => "name",
        "readinessGates" => "conditionType",
        "ports" => "containerPort",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ownerReferences" => "uid",
        "conditions" => "type",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::merge_key;

    #[test]
    fn keys_of_the_pod_fields_people_patch() {
        assert_eq!(merge_key("containers"), Some("name"));
        assert_eq!(merge_key("readinessGates"), Some("conditionType"));
        assert_eq!(merge_key("volumeMounts"), Some("mountPath"));
        assert_eq!(merge_key("ports"), Some("containerPort"));
        assert_eq!(merge_key("args"), None);
    }
}
