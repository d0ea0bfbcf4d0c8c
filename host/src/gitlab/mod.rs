//! GitLab's runner API, as `host serve` speaks it (see `shared/gitlab-runner-api.md` for the
//! wire facts): the client ([`client`]), the job it hands out ([`payload`]) and what a running
//! job reports back ([`report`]: trace, keep-alive, final update, cancels).

pub mod client;
pub mod payload;
pub mod report;
pub mod secret;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
pub(crate) mod tests;

pub use client::{
    ApiObserver, ArtifactsUpload, Client, ClientOptions, Endpoint, Features, GitlabError, JobCredentials, JobRequest,
    RemoteStatus, RetryPolicy, RunnerIdentity, UploadOutcome, VerifiedRunner, VersionInfo,
};
pub use payload::{JobPayload, PayloadError};
pub use report::{Cancel, FailureReason, Finish, JobOutcome, JobReporter, JobSession, ReportError, ReportOptions};
pub use secret::Secret;
