//! The kinds this server knows, with the facts discovery and the store need about each.

/// Static description of one resource type of the core (`v1`) group.
#[derive(Debug)]
pub struct Resource {
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

pub fn by_plural(plural: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.plural == plural)
}

impl Resource {
    pub fn verbs(&self) -> &'static [&'static str] {
        ALL_VERBS
    }
    pub fn is(&self, plural: &str) -> bool {
        self.plural == plural
    }
}
