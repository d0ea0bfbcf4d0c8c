//! The kinds this server knows, with the facts discovery and the store need about each.

/// Static description of one resource type this server serves.
#[derive(Debug)]
pub struct Resource {
    /// `v1` for the core group, `group/version` otherwise (the objects' `apiVersion`).
    pub group_version: &'static str,
    /// URL plural, e.g. `pods`.
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Names must be DNS-1035/1123 labels instead of subdomains.
    pub label_names: bool,
    pub subresources: &'static [&'static str],
    /// A completed DELETE answers with the deleted object (as the real registry does for pods,
    /// services, service accounts and namespaces) rather than a `Status` of Success.
    pub returns_deleted_object: bool,
}

const ALL_VERBS: &[&str] = &["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];

pub static RESOURCES: &[Resource] = &[
    Resource {
        group_version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        label_names: true,
        subresources: &["status"],
        returns_deleted_object: true,
    },
    Resource {
        group_version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        label_names: false,
        subresources: &["status"],
        returns_deleted_object: false,
    },
    Resource {
        group_version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        label_names: false,
        subresources: &["status", "log", "exec", "attach"],
        returns_deleted_object: true,
    },
    Resource {
        group_version: "v1",
        plural: "secrets",
        singular: "secret",
        kind: "Secret",
        namespaced: true,
        short_names: &[],
        label_names: false,
        subresources: &[],
        returns_deleted_object: false,
    },
    Resource {
        group_version: "v1",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short_names: &["cm"],
        label_names: false,
        subresources: &[],
        returns_deleted_object: false,
    },
    Resource {
        group_version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        label_names: true,
        subresources: &["status"],
        returns_deleted_object: true,
    },
    Resource {
        group_version: "v1",
        plural: "endpoints",
        singular: "endpoints",
        kind: "Endpoints",
        namespaced: true,
        short_names: &["ep"],
        label_names: false,
        subresources: &[],
        returns_deleted_object: false,
    },
    Resource {
        group_version: "v1",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        kind: "ServiceAccount",
        namespaced: true,
        short_names: &["sa"],
        label_names: false,
        subresources: &[],
        returns_deleted_object: true,
    },
    Resource {
        group_version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        label_names: false,
        subresources: &[],
        returns_deleted_object: false,
    },
    Resource {
        group_version: "discovery.k8s.io/v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: &[],
        label_names: false,
        subresources: &[],
        returns_deleted_object: false,
    },
    // The core Events seen through their own group (store/views.rs): listed after core's, so
    // `by_plural("events")` is the core resource the store holds them as.
    Resource {
        group_version: "events.k8s.io/v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        label_names: false,
        subresources: &[],
        returns_deleted_object: false,
    },
];

/// The API groups besides core, as `(group, version)`.
pub const GROUPS: &[(&str, &str)] = &[("discovery.k8s.io", "v1"), ("events.k8s.io", "v1")];

/// The resource by plural, the core group's first (the one the store keys objects by).
pub fn by_plural(plural: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.plural == plural)
}

/// The resource `plural` of the group version `group_version` (`v1` for core).
pub fn find(group_version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.plural == plural && r.group_version == group_version)
}

impl Resource {
    pub fn verbs(&self) -> &'static [&'static str] {
        ALL_VERBS
    }
    /// The URL prefix of this resource's group version (`/api/v1`, `/apis/<group>/<version>`).
    pub fn prefix(&self) -> String {
        if self.group_version == "v1" { "/api/v1".into() } else { format!("/apis/{}", self.group_version) }
    }
    pub fn is(&self, plural: &str) -> bool {
        self.plural == plural
    }
}
