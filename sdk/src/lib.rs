//! Rust SDK for keel plugins.
