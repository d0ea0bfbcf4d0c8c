//! Image references as Docker and Kubernetes read them.
//!
//! The host hands plugins image names as the job wrote them: `alpine`, `alpine:3.20` and
//! `docker.io/library/alpine:3.20` are the same image, and a policy comparing strings
//! (`starts_with("docker.io/")`) misses the first two. Parse instead:
//!
//! ```
//! use keel_contract::image::ImageRef;
//!
//! let image = ImageRef::parse("alpine").unwrap();
//! assert_eq!(image.registry, "docker.io");
//! assert_eq!(image.repository, "library/alpine");
//! assert_eq!(image.tag.as_deref(), Some("latest"));
//! assert!(image.is_docker_hub());
//! assert_eq!(image.to_string(), "docker.io/library/alpine:latest");
//!
//! let own = ImageRef::parse("registry.example.com:5000/team/app@sha256:0123abcd").unwrap();
//! assert_eq!((own.registry.as_str(), own.repository.as_str()), ("registry.example.com:5000", "team/app"));
//! assert_eq!(own.tag, None);
//! assert_eq!(own.digest.as_deref(), Some("sha256:0123abcd"));
//! ```

use std::fmt;

/// Docker Hub's canonical registry name (`index.docker.io` and `registry-1.docker.io` are
/// read as this too).
pub const DOCKER_HUB: &str = "docker.io";

/// An image reference, normalised the way Docker's reference library does it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// `docker.io` when the name has no registry part.
    pub registry: String,
    /// With `library/` in front of a single-part Docker Hub name (`alpine` -> `library/alpine`).
    pub repository: String,
    /// `latest` when neither a tag nor a digest is given; `None` with only a digest.
    pub tag: Option<String>,
    /// `algorithm:hex`, e.g. `sha256:...`.
    pub digest: Option<String>,
}

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRefError {
    pub image: String,
    pub reason: &'static str,
}

impl fmt::Display for ImageRefError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not an image reference: {}", self.image, self.reason)
    }
}

impl std::error::Error for ImageRefError {}

impl ImageRef {
    /// Parses `[registry/]repository[:tag][@digest]`. The first `/`-separated part is a
    /// registry when it has a `.` or a `:` or is `localhost` (Docker's rule).
    pub fn parse(image: &str) -> Result<ImageRef, ImageRefError> {
        let err = |reason| ImageRefError { image: image.to_string(), reason };
        if image.is_empty() {
            return Err(err("it is empty"));
        }
        if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("it contains whitespace"));
        }
        let (name, digest) = match image.split_once('@') {
            Some((n, d)) => {
                if !d.contains(':') {
                    return Err(err("the digest is not `algorithm:hex`"));
                }
                (n, Some(d.to_string()))
            }
            None => (image, None),
        };
        // A ':' after the last '/' starts the tag; one before it is a registry's port.
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => {
                if t.is_empty() {
                    return Err(err("the tag is empty"));
                }
                (n, Some(t.to_string()))
            }
            _ => (name, None),
        };
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        if repository.is_empty() || repository.split('/').any(str::is_empty) {
            return Err(err("the repository name is empty"));
        }
        if repository.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(err("repository names are lower case"));
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let tag = if tag.is_none() && digest.is_none() { Some("latest".to_string()) } else { tag };
        Ok(ImageRef { registry, repository, tag, digest })
    }

    /// Whether the image comes from Docker Hub (written with or without `docker.io/`).
    pub fn is_docker_hub(&self) -> bool {
        self.registry == DOCKER_HUB
    }

    /// An official Docker Hub image (`library/...`: `alpine`, `postgres`).
    pub fn is_docker_official(&self) -> bool {
        self.is_docker_hub() && self.repository.starts_with("library/")
    }
}

/// The fully qualified form: `registry/repository[:tag][@digest]`.
impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_spellings_are_one_image() {
        let want = "docker.io/library/alpine:3.20";
        for spelling in
            ["alpine:3.20", "library/alpine:3.20", "docker.io/alpine:3.20", "index.docker.io/library/alpine:3.20"]
        {
            assert_eq!(ImageRef::parse(spelling).unwrap().to_string(), want, "{spelling}");
        }
        assert!(ImageRef::parse("bitnami/redis").unwrap().is_docker_hub());
        assert!(!ImageRef::parse("bitnami/redis").unwrap().is_docker_official());
    }

    #[test]
    fn registries_ports_and_digests() {
        let r = ImageRef::parse("localhost:5000/app:1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("localhost:5000", "app", Some("1"))
        );
        let r = ImageRef::parse("localhost/app").unwrap();
        assert_eq!((r.registry.as_str(), r.tag.as_deref()), ("localhost", Some("latest")));
        let r = ImageRef::parse("ghcr.io/o/app:v1@sha256:ab").unwrap();
        assert_eq!((r.tag.as_deref(), r.digest.as_deref()), (Some("v1"), Some("sha256:ab")));
    }

    #[test]
    fn malformed_references_are_errors() {
        for bad in ["", "Busy Box", "UPPER/case", "alpine:", "a//b", "x@nodigest"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?}");
        }
    }
}
