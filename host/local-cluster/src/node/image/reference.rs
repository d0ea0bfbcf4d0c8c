//! Image references as distribution/reference parses and normalizes them (the names containerd
//! stores and a kubelet reports).

use std::sync::LazyLock;

use regex::Regex;

/// The API server's default: `Always` for `:latest` or no tag (and no digest), else `IfNotPresent`.
pub(crate) fn default_pull_policy(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    let tagged_latest = last.rsplit_once(':').is_none_or(|(_, tag)| tag == "latest");
    if image.contains('@') || !tagged_latest { "IfNotPresent".into() } else { "Always".into() }
}

const DEFAULT_DOMAIN: &str = "docker.io";

/// The reference as containerd names it (`busybox` -> `docker.io/library/busybox:latest`).
pub(crate) fn normalized(image: &str) -> String {
    let (domain, rest) = split_domain(image);
    let tagged = rest.contains('@') || rest.rsplit('/').next().is_some_and(|last| last.contains(':'));
    format!("{domain}/{rest}{}", if tagged { "" } else { ":latest" })
}

/// distribution/reference's `splitDockerDomain`: the first component is a registry only if it
/// looks like a host (a dot or port, `localhost`, or upper case).
fn split_domain(image: &str) -> (String, String) {
    let (mut domain, mut rest) = match image.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" || first.to_lowercase() != first => {
            (first.to_owned(), rest.to_owned())
        }
        _ => (DEFAULT_DOMAIN.to_owned(), image.to_owned()),
    };
    if domain == "index.docker.io" {
        domain = DEFAULT_DOMAIN.into();
    }
    if domain == DEFAULT_DOMAIN && !rest.contains('/') {
        rest = format!("library/{rest}");
    }
    (domain, rest)
}

/// distribution/reference's grammar (`reference.go`, `regexp.go`), anchored.
static REFERENCE: LazyLock<Regex> = LazyLock::new(|| {
    let alnum = "[a-z0-9]+";
    let separator = "(?:[._]|__|[-]+)";
    let path_component = format!("{alnum}(?:{separator}{alnum})*");
    let domain_component = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
    let ipv6 = r"\[(?:[a-fA-F0-9:]+)\]";
    let host = format!("(?:{domain_component}(?:\\.{domain_component})*|{ipv6})");
    let domain = format!("{host}(?::[0-9]+)?");
    let name = format!("(?:{domain}/)?{path_component}(?:/{path_component})*");
    // Go's `\w` is ASCII-only.
    let tag = "[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}";
    let digest = "[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}";
    Regex::new(&format!("^({name})(?::({tag}))?(?:@({digest}))?$")).expect("the reference grammar compiles")
});

/// distribution/reference's `ParseNormalizedNamed`, for its error messages (which the kubelet
/// puts into InvalidImageName's message).
pub(crate) fn parse_normalized(image: &str) -> Result<(), String> {
    let hex64 = image.len() == 64 && image.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    if hex64 {
        return Err(format!("invalid repository name ({image}), cannot specify 64-byte hexadecimal strings"));
    }
    let (domain, rest) = split_domain(image);
    let remote = rest.split_once(':').map_or(rest.as_str(), |(r, _)| r);
    if remote.to_lowercase() != remote {
        return Err(format!("invalid reference format: repository name ({remote}) must be lowercase"));
    }
    let full = format!("{domain}/{rest}");
    let Some(caps) = REFERENCE.captures(&full) else {
        return Err("invalid reference format".into());
    };
    if caps.get(1).is_some_and(|n| n.as_str().len() > 255) {
        return Err("repository name must not be more than 255 characters".into());
    }
    Ok(())
}

/// `sha256:` and 64 lower-case hex digits: the only digests the store names files by.
pub(crate) fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// The registry (domain) of an image reference, as containerd resolves it (`busybox` ->
/// `docker.io`, `localhost:5000/a` -> `localhost:5000`).
pub(crate) fn domain(image: &str) -> String {
    split_domain(image).0
}

/// The repository of a normalized reference, without tag or digest
/// (`docker.io/library/busybox:1.36` -> `docker.io/library/busybox`).
pub(crate) fn repository(normalized: &str) -> &str {
    let no_digest = normalized.split_once('@').map_or(normalized, |(r, _)| r);
    match no_digest.rsplit_once(':') {
        // A colon after the last slash is a tag; before it, a registry's port.
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => no_digest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalize_as_containerd_names_them() {
        assert_eq!(normalized("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(normalized("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(normalized("localhost:5000/a/b"), "localhost:5000/a/b:latest");
        assert_eq!(normalized("ghcr.io/o/r@sha256:00"), "ghcr.io/o/r@sha256:00");
        assert_eq!(repository("docker.io/library/busybox:1.36"), "docker.io/library/busybox");
        assert_eq!(repository("localhost:5000/a/b"), "localhost:5000/a/b");
        assert_eq!(repository("ghcr.io/o/r@sha256:00"), "ghcr.io/o/r");
    }
}
