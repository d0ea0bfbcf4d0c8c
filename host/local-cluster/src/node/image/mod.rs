//! Images on the node: the store of images loaded from archives (`store`, `archive`, `layer`),
//! their configs applied to containers (`config`), and what a kubelet decides about a
//! container's image before it starts it: whether the name parses, whether the image is
//! present, and whether the pull policy lets it pull.
//!
//! Without `host_rootfs`, the node is a real one: images come from the store or from registries
//! (`pull`). `IfNotPresent` and `Never` use the store (or an `images_dir` rootfs mapped to the
//! name); `Always` resolves the name at its registry and fetches only when the digest is not
//! the stored one. A pull is reported as the kubelet reports it (`Pulling`, `Pulled` with size
//! and duration, see `PullEvent`) and fails with containerd's words.
//!
//! With `host_rootfs` (only when asked: tests, machines without a network) no registry is asked: an image in the store is
//! present whatever the pull policy, and an image not in the store runs on the host's root
//! filesystem (or its `images_dir` rootfs): then every well-formed image is present and
//! pullable, except those the node is told about: `unavailable_images` are neither present
//! nor pullable, `cached_unpullable_images` are present but cannot be pulled (a cached image
//! whose registry is gone).

mod archive;
pub(crate) mod config;
mod gc;
mod layer;
pub(crate) mod pull;
mod reference;
mod run;
pub(crate) mod store;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) use gc::fs_space;
pub use gc::{ImageGcPolicy, ImageGcPolicyError, ImageGcReport};
pub(crate) use layer::remove_all;
pub(crate) use pull::{DockerConfig, Puller, pod_configs};
pub use pull::{RegistryOptions, RegistryOptionsError, mirror_endpoint, parse_mirror};
use reference::parse_normalized;
pub(crate) use reference::{default_pull_policy, normalized, repository};
pub(crate) use run::{defaults as image_defaults, etc_hosts, host_root_identity, make_mount_points, writable_root};
pub use store::{LoadedImage, StoreError};
pub(crate) use store::{Store, StoredImage};

/// The outcome of the kubelet's `EnsureImageExists` for one container start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ImageCheck {
    /// Present (or pulled): the container can start, on the stored image (`None`: on the host's
    /// root filesystem).
    Ready(Option<Arc<StoredImage>>),
    /// `InvalidImageName`, with the kubelet's message; retrying does not help.
    InvalidName(String),
    /// `ErrImageNeverPull`: absent and the policy forbids pulling.
    NeverPull(String),
    /// The pull failed (`ErrImagePull`, then `ImagePullBackOff` until the next attempt).
    PullFailed(String),
}

/// The node's images (see the module doc).
#[derive(Clone)]
pub(crate) struct Images {
    pub store: Option<Arc<Store>>,
    /// An image not in the store runs on the host's root filesystem.
    pub host_rootfs: bool,
    /// `images_dir`: an image with a rootfs here runs on it, even without `host_rootfs` (the
    /// image name is mapped explicitly).
    pub images_dir: Option<std::path::PathBuf>,
    pub unavailable: Vec<String>,
    pub cached_unpullable: Vec<String>,
    /// Pulls from registries (used without `host_rootfs`).
    pub puller: Option<Arc<Puller>>,
}

/// What the kubelet records about a container's image before each start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageEvent {
    /// `Pulling image "x"`: the policy makes the node pull (a registry is asked).
    Pulling,
    /// `Successfully pulled image "x" in 1.2s (1.2s including waiting). Image size: N bytes.`
    Pulled { took: Duration, size: u64 },
    /// `Container image "x" already present on machine`: no pull needed.
    AlreadyPresent,
}

impl Images {
    /// The kubelet's `EnsureImageExists` for `image` under `policy`: as `check`, with pulls from
    /// registries when the node has no host rootfs to fall back on. `on_pull` hears of each
    /// pull (a registry asked), as the kubelet records it.
    pub async fn ensure(
        &self,
        image: &str,
        policy: Option<&str>,
        secrets: &[DockerConfig],
        on_pull: &(dyn Fn(ImageEvent) + Send + Sync),
    ) -> ImageCheck {
        let Some(puller) = self.puller.as_ref().filter(|_| !self.host_rootfs) else {
            let check = self.check(image, policy);
            match &check {
                ImageCheck::PullFailed(_) => on_pull(ImageEvent::Pulling),
                ImageCheck::Ready(_) => on_pull(ImageEvent::AlreadyPresent),
                _ => {}
            }
            return check;
        };
        if let Err(e) = parse_normalized(image) {
            return ImageCheck::InvalidName(format!(
                "Failed to apply default image tag {image:?}: couldn't parse image name {image:?}: {e}"
            ));
        }
        let stored = self.store.as_ref().and_then(|s| s.get(image));
        let mapped = self.images_dir.as_ref().is_some_and(|d| d.join(image.replace(['/', ':'], "_")).is_dir());
        let policy = policy.map_or_else(|| default_pull_policy(image), str::to_owned);
        match policy.as_str() {
            "Never" | "IfNotPresent" if stored.is_some() || mapped => {
                on_pull(ImageEvent::AlreadyPresent);
                return ImageCheck::Ready(stored);
            }
            "Never" => {
                return ImageCheck::NeverPull(format!(
                    "Container image {image:?} is not present with pull policy of Never"
                ));
            }
            // A name mapped to a rootfs explicitly has no registry to ask.
            _ if mapped && stored.is_none() => {
                on_pull(ImageEvent::AlreadyPresent);
                return ImageCheck::Ready(None);
            }
            _ => {}
        }
        on_pull(ImageEvent::Pulling);
        let started = Instant::now();
        match puller.pull(image, secrets).await {
            Ok(p) => {
                on_pull(ImageEvent::Pulled { took: started.elapsed(), size: p.size });
                ImageCheck::Ready(Some(p.image))
            }
            Err(e) => ImageCheck::PullFailed(e.to_string()),
        }
    }

    /// The decision for `image` under `policy` (`None`: the API server's default for the image).
    pub fn check(&self, image: &str, policy: Option<&str>) -> ImageCheck {
        if let Err(e) = parse_normalized(image) {
            return ImageCheck::InvalidName(format!(
                "Failed to apply default image tag {image:?}: couldn't parse image name {image:?}: {e}"
            ));
        }
        let listed = |l: &[String]| l.iter().any(|i| i == image);
        let stored = self.store.as_ref().and_then(|s| s.get(image));
        let mapped = self.images_dir.as_ref().is_some_and(|d| d.join(image.replace(['/', ':'], "_")).is_dir());
        let on_host = (self.host_rootfs || mapped) && !listed(&self.unavailable);
        let present = stored.is_some() || on_host;
        let pullable = stored.is_some() || (on_host && !listed(&self.cached_unpullable));
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
        ImageCheck::Ready(stored)
    }
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
    fn without_the_host_rootfs_an_image_not_in_the_store_fails_its_pull() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("mapped_1")).unwrap();
        let images = Images {
            store: None,
            host_rootfs: false,
            images_dir: Some(dir.path().to_path_buf()),
            unavailable: vec![],
            cached_unpullable: vec![],
            puller: None,
        };
        assert_eq!(images.check("mapped:1", None), ImageCheck::Ready(None), "mapped explicitly by images_dir");
        assert_eq!(
            images.check("x:1", None),
            ImageCheck::PullFailed(
                "failed to pull and unpack image \"docker.io/library/x:1\": failed to resolve reference \"docker.io/library/x:1\": not found".into()
            )
        );
        assert_eq!(
            images.check("x:1", Some("Never")),
            ImageCheck::NeverPull("Container image \"x:1\" is not present with pull policy of Never".into())
        );
    }

    #[test]
    fn pull_policy_decides_with_presence_and_pullability() {
        let images = Images {
            store: None,
            host_rootfs: true,
            images_dir: None,
            unavailable: vec!["gone:1".into()],
            cached_unpullable: vec!["cached:1".into()],
            puller: None,
        };
        assert_eq!(images.check("busybox", Some("Always")), ImageCheck::Ready(None));
        assert_eq!(images.check("cached:1", Some("IfNotPresent")), ImageCheck::Ready(None));
        assert_eq!(images.check("cached:1", Some("Never")), ImageCheck::Ready(None));
        assert!(matches!(images.check("cached:1", Some("Always")), ImageCheck::PullFailed(_)));
        assert!(matches!(images.check("gone:1", Some("IfNotPresent")), ImageCheck::PullFailed(_)));
        assert_eq!(
            images.check("gone:1", Some("Never")),
            ImageCheck::NeverPull("Container image \"gone:1\" is not present with pull policy of Never".into())
        );
        // No policy: `:1` defaults to IfNotPresent, so the cached image runs.
        assert_eq!(images.check("cached:1", None), ImageCheck::Ready(None));
        assert_eq!(
            images.check("bad name", None),
            ImageCheck::InvalidName(
                "Failed to apply default image tag \"bad name\": couldn't parse image name \"bad name\": invalid reference format".into()
            )
        );
        assert_eq!(
            Images { unavailable: vec!["nope".into()], ..images.clone() }.check("nope", None),
            ImageCheck::PullFailed(
                "failed to pull and unpack image \"docker.io/library/nope:latest\": failed to resolve reference \"docker.io/library/nope:latest\": not found".into()
            )
        );
    }
}
