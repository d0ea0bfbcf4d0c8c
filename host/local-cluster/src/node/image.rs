//! What a kubelet decides about a container's image before it starts it: whether the name
//! parses, whether the image is present, and whether the pull policy lets it pull.
//!
//! There are no registries here: every well-formed image is present and pullable (it runs on the
//! host's root or its `images_dir` rootfs), except those the node is told about:
//! `unavailable_images` are neither present nor pullable, `cached_unpullable_images` are present
//! but cannot be pulled (a cached image whose registry is gone).

use std::sync::LazyLock;

use regex::Regex;

/// The outcome of the kubelet's `EnsureImageExists` for one container start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ImageCheck {
    /// Present (or pulled): the container can start.
    Ready,
    /// `InvalidImageName`, with the kubelet's message; retrying does not help.
    InvalidName(String),
    /// `ErrImageNeverPull`: absent and the policy forbids pulling.
    NeverPull(String),
    /// The pull failed (`ErrImagePull`, then `ImagePullBackOff` until the next attempt).
    PullFailed(String),
}

/// The images this node knows to be special (see the module doc).
#[derive(Debug, Clone, Default)]
pub(crate) struct Images {
    pub unavailable: Vec<String>,
    pub cached_unpullable: Vec<String>,
}

impl Images {
    /// The decision for `image` under `policy` (`None`: the API server's default for the image).
    pub fn check(&self, image: &str, policy: Option<&str>) -> ImageCheck {
        if let Err(e) = parse_normalized(image) {
            return ImageCheck::InvalidName(format!(
                "Failed to apply default image tag {image:?}: couldn't parse image name {image:?}: {e}"
            ));
        }
        let listed = |l: &[String]| l.iter().any(|i| i == image);
        let present = !listed(&self.unavailable);
        let pullable = !listed(&self.unavailable) && !listed(&self.cached_unpullable);
        let policy = policy.map_or_else(|| default_pull_policy(image), str::to_owned);
        let must_pull = match policy.as_str() {
            "Never" if !present => {
                return ImageCheck::NeverPull(format!(
                    "Container image {image:?} is not present with pull policy of Never"
                ));
            }
            "Never" => false,
            "IfNotPresent" => !present,
            _ => true,
        };
        if must_pull && !pullable {
            // containerd's words when a registry has no such image.
            return ImageCheck::PullFailed(format!(
                "failed to pull and unpack image {:?}: failed to resolve reference {:?}: not found",
                normalized(image),
                normalized(image)
            ));
        }
        ImageCheck::Ready
    }
}

/// The API server's default: `Always` for `:latest` or no tag (and no digest), else `IfNotPresent`.
pub(crate) fn default_pull_policy(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    let tagged_latest = last.rsplit_once(':').is_none_or(|(_, tag)| tag == "latest");
    if image.contains('@') || !tagged_latest { "IfNotPresent".into() } else { "Always".into() }
}

const DEFAULT_DOMAIN: &str = "docker.io";

/// The reference as containerd names it (`busybox` -> `docker.io/library/busybox:latest`).
fn normalized(image: &str) -> String {
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
fn parse_normalized(image: &str) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_as_distribution_reference_parses_them() {
        for ok in [
            "busybox",
            "busybox:1.36",
            "library/busybox:latest",
            "registry.example.com:5000/team/app:v1.2-rc_3",
            "localhost/app",
            "ghcr.io/o/r@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "a__b.c--d/e",
        ] {
            assert_eq!(parse_normalized(ok), Ok(()), "{ok}");
        }
        assert_eq!(
            parse_normalized("localhost/Busy Box:UPPER").unwrap_err(),
            "invalid reference format: repository name (Busy Box) must be lowercase"
        );
        for bad in ["busybox:", "bad image", "-lead", "a/b:-tag", "a//b", "x@sha256:12"] {
            assert_eq!(parse_normalized(bad).unwrap_err(), "invalid reference format", "{bad}");
        }
    }

    #[test]
    fn pull_policy_decides_with_presence_and_pullability() {
        let images = Images { unavailable: vec!["gone:1".into()], cached_unpullable: vec!["cached:1".into()] };
        assert_eq!(images.check("busybox", Some("Always")), ImageCheck::Ready);
        assert_eq!(images.check("cached:1", Some("IfNotPresent")), ImageCheck::Ready);
        assert_eq!(images.check("cached:1", Some("Never")), ImageCheck::Ready);
        assert!(matches!(images.check("cached:1", Some("Always")), ImageCheck::PullFailed(_)));
        assert!(matches!(images.check("gone:1", Some("IfNotPresent")), ImageCheck::PullFailed(_)));
        assert_eq!(
            images.check("gone:1", Some("Never")),
            ImageCheck::NeverPull("Container image \"gone:1\" is not present with pull policy of Never".into())
        );
        // No policy: `:1` defaults to IfNotPresent, so the cached image runs.
        assert_eq!(images.check("cached:1", None), ImageCheck::Ready);
        assert_eq!(
            images.check("bad name", None),
            ImageCheck::InvalidName(
                "Failed to apply default image tag \"bad name\": couldn't parse image name \"bad name\": invalid reference format".into()
            )
        );
        assert_eq!(
            Images { unavailable: vec!["nope".into()], ..Images::default() }.check("nope", None),
            ImageCheck::PullFailed(
                "failed to pull and unpack image \"docker.io/library/nope:latest\": failed to resolve reference \"docker.io/library/nope:latest\": not found".into()
            )
        );
    }
}
