//! Image garbage collection, as the kubelet's image GC manager does it: when the filesystem of
//! the store is at or above `high_threshold` percent used, images no container uses are
//! deleted, least recently used first, until usage is at or below `low_threshold`. Images
//! younger than `min_age` stay (the kubelet's `ImageMinimumGCAge`), so a fresh pull is not
//! collected before its pod starts. The node runs it every `period` (the kubelet's 5 minutes)
//! and on demand (`Node::collect_images`).
//!
//! An image is in use while a container of a pod the node still has was started from it (the
//! kubelet counts exited containers too): each holds the image (`Arc`), so the store sees it.
//! Deleting an image removes its names, its merged root, and those of its unpacked layers and
//! blobs no other image needs.

use std::time::Duration;

/// The kubelet's image GC settings (`--image-gc-high-threshold`, `--image-gc-low-threshold`,
/// `ImageMinimumGCAge`, `ImageGCPeriod`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageGcPolicy {
    /// Percent of the store's filesystem in use at which collection starts (100: never).
    pub high_threshold: u8,
    /// Percent it collects down to.
    pub low_threshold: u8,
    /// Images loaded or pulled more recently are never collected.
    pub min_age: Duration,
    /// How often the node checks.
    pub period: Duration,
}

impl Default for ImageGcPolicy {
    /// The kubelet's defaults: 85 %, 80 %, 2 minutes, every 5 minutes.
    fn default() -> Self {
        ImageGcPolicy {
            high_threshold: 85,
            low_threshold: 80,
            min_age: Duration::from_secs(120),
            period: Duration::from_secs(300),
        }
    }
}

/// Thresholds the kubelet would refuse, in its words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageGcPolicyError {
    #[error("invalid configuration: {flag} ({value}) must be between 0 and 100, inclusive")]
    OutOfRange { flag: &'static str, value: u8 },
    #[error(
        "invalid configuration: --image-gc-low-threshold ({low}) must be less than --image-gc-high-threshold ({high})"
    )]
    LowNotBelowHigh { low: u8, high: u8 },
}

impl ImageGcPolicy {
    /// The policy with these thresholds (percent), checked as the kubelet checks them.
    pub fn with_thresholds(high: u8, low: u8) -> Result<ImageGcPolicy, ImageGcPolicyError> {
        for (flag, value) in [("--image-gc-high-threshold", high), ("--image-gc-low-threshold", low)] {
            if value > 100 {
                return Err(ImageGcPolicyError::OutOfRange { flag, value });
            }
        }
        if low >= high {
            return Err(ImageGcPolicyError::LowNotBelowHigh { low, high });
        }
        Ok(ImageGcPolicy { high_threshold: high, low_threshold: low, ..ImageGcPolicy::default() })
    }
}

/// What one collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageGcReport {
    /// Percent of the filesystem in use before and after.
    pub usage_before: u8,
    pub usage_after: u8,
    /// The deleted images' IDs and names, oldest use first.
    pub deleted: Vec<(String, Vec<String>)>,
    /// Bytes the filesystem gained.
    pub freed: u64,
    /// Why nothing was tried although usage was above the threshold (a pull in progress).
    pub skipped: Option<String>,
}

/// Capacity and available bytes of the filesystem holding `path`.
pub(crate) fn fs_space(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    let st = rustix::fs::statvfs(path).map_err(std::io::Error::from)?;
    let block = st.f_frsize.max(1);
    Ok((st.f_blocks * block, st.f_bavail * block))
}

/// Percent used, as the kubelet computes it (`100 - available * 100 / capacity`).
pub(crate) fn usage_percent((capacity, available): (u64, u64)) -> u8 {
    if capacity == 0 {
        return 0;
    }
    (100 - (u128::from(available.min(capacity)) * 100 / u128::from(capacity)) as u64) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_checked_as_the_kubelet_checks_them() {
        assert_eq!(ImageGcPolicy::with_thresholds(85, 80).unwrap(), ImageGcPolicy::default());
        assert_eq!(
            ImageGcPolicy::with_thresholds(101, 80).unwrap_err().to_string(),
            "invalid configuration: --image-gc-high-threshold (101) must be between 0 and 100, inclusive"
        );
        assert_eq!(
            ImageGcPolicy::with_thresholds(80, 80).unwrap_err().to_string(),
            "invalid configuration: --image-gc-low-threshold (80) must be less than --image-gc-high-threshold (80)"
        );
    }

    #[test]
    fn usage_is_the_kubelets_percentage() {
        assert_eq!(usage_percent((1000, 1000)), 0);
        assert_eq!(usage_percent((1000, 151)), 85);
        assert_eq!(usage_percent((1000, 0)), 100);
        assert_eq!(usage_percent((0, 0)), 0);
        assert_eq!(usage_percent((u64::MAX, 1)), 100);
    }
}
