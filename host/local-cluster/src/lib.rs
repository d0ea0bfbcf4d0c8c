//! Embedded single-node Kubernetes API server.
