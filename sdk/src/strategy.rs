//! Execution strategies: how a stage's script gets run in the pod.
//!
//! A strategy reaches the job's pod only through [`StrategyHost`] (the WIT `strategy-host`
//! imports): exec and attach sessions on the pod's own containers, the trace, a back-off sleep
//! and the pod's status. In a wasm build these are the keel host's; in a native `cargo test`
//! they come from a [`fake::FakeHost`] whose sessions the test scripts (chunks, drops, exit
//! codes), so a strategy's reconnect and parsing logic is tested without a cluster.

/// One script stage.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stage {
    /// `before_script`, `script`, `after_script`...
    pub name: String,
    pub script: String,
}

/// Why a host service failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    NoSuchContainer(String),
    /// The connection dropped; reconnect (with back-off) and resume.
    Disconnected(String),
    Refused(String),
    Other(String),
}

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::*;
    use crate::bindings::keel::plugin::strategy_host as host;

    impl From<host::HostError> for HostError {
        fn from(e: host::HostError) -> Self {
            match e {
                host::HostError::NoSuchContainer(s) => HostError::NoSuchContainer(s),
                host::HostError::Disconnected(s) => HostError::Disconnected(s),
                host::HostError::Refused(s) => HostError::Refused(s),
                host::HostError::Other(s) => HostError::Other(s),
            }
        }
    }

    pub struct Session(pub(super) host::Session);

    impl Session {
        pub fn write_stdin(&self, data: &[u8]) -> Result<(), HostError> {
            self.0.write_stdin(data).map_err(Into::into)
        }
        pub fn close_stdin(&self) -> Result<(), HostError> {
            self.0.close_stdin().map_err(Into::into)
        }
        pub fn read_output(&self, max_bytes: u32) -> Result<Option<(Stream, Vec<u8>)>, HostError> {
            Ok(self.0.read_output(max_bytes)?.map(|c| {
                let stream = match c.channel {
                    host::Channel::Stdout => Stream::Stdout,
                    host::Channel::Stderr => Stream::Stderr,
                };
                (stream, c.data)
            }))
        }
        pub fn wait_exit(&self) -> Result<i32, HostError> {
            self.0.wait_exit().map_err(Into::into)
        }
    }

    pub fn exec(container: &str, command: &[String], stdin: bool) -> Result<Session, HostError> {
        Ok(Session(host::exec(container, command, stdin)?))
    }
    pub fn attach(container: &str) -> Result<Session, HostError> {
        Ok(Session(host::attach(container)?))
    }
    pub fn trace_write(data: &[u8]) {
        host::trace_write(data)
    }
    pub fn sleep(millis: u64) {
        host::sleep(millis)
    }
    pub fn pod_status() -> Result<String, HostError> {
        host::pod_status().map_err(Into::into)
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    //! Outside wasm there is no host to reach: every service says so, unless the
    //! [`StrategyHost`] was made by a [`fake::FakeHost`] for a native test.
    use super::*;

    const NATIVE: &str = "strategy host services exist only inside the keel host (use strategy::fake in tests)";

    pub struct Session(pub(super) Option<fake::FakeSession>);

    impl Session {
        pub fn write_stdin(&self, data: &[u8]) -> Result<(), HostError> {
            self.0.as_ref().ok_or_else(|| HostError::Other(NATIVE.into()))?.write_stdin(data)
        }
        pub fn close_stdin(&self) -> Result<(), HostError> {
            self.0.as_ref().ok_or_else(|| HostError::Other(NATIVE.into()))?.close_stdin()
        }
        pub fn read_output(&self, max_bytes: u32) -> Result<Option<(Stream, Vec<u8>)>, HostError> {
            self.0.as_ref().ok_or_else(|| HostError::Other(NATIVE.into()))?.read_output(max_bytes)
        }
        pub fn wait_exit(&self) -> Result<i32, HostError> {
            self.0.as_ref().ok_or_else(|| HostError::Other(NATIVE.into()))?.wait_exit()
        }
    }

    pub(super) fn unavailable<T>() -> Result<T, HostError> {
        Err(HostError::Other(NATIVE.into()))
    }
}

pub use imp::Session;

/// The host services a strategy uses; all act on the job's own pod.
#[derive(Debug, Default)]
pub struct StrategyHost {
    /// Natively, the fake a test made this host from (`None`: every call fails).
    #[cfg(not(target_arch = "wasm32"))]
    fake: Option<fake::FakeHost>,
}

impl StrategyHost {
    #[doc(hidden)]
    pub fn new() -> Self {
        StrategyHost::default()
    }
}

#[cfg(target_arch = "wasm32")]
impl StrategyHost {
    /// Run `command` in `container`; `stdin` opens its stdin for writing.
    pub fn exec(&self, container: &str, command: &[String], stdin: bool) -> Result<Session, HostError> {
        imp::exec(container, command, stdin)
    }
    /// Attach to PID 1 of `container` (needs `stdin: true`, see `prepare`).
    pub fn attach(&self, container: &str) -> Result<Session, HostError> {
        imp::attach(container)
    }
    /// Append to the job's trace.
    pub fn trace_write(&self, data: &[u8]) {
        imp::trace_write(data)
    }
    /// Back off without burning the call's CPU deadline.
    pub fn sleep(&self, millis: u64) {
        imp::sleep(millis)
    }
    /// The pod, freshly read, as JSON.
    pub fn pod_status(&self) -> Result<String, HostError> {
        imp::pod_status()
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl StrategyHost {
    fn fake(&self) -> Result<&fake::FakeHost, HostError> {
        self.fake.as_ref().map_or_else(imp::unavailable, Ok)
    }
    /// Run `command` in `container`; `stdin` opens its stdin for writing.
    pub fn exec(&self, container: &str, command: &[String], stdin: bool) -> Result<Session, HostError> {
        let call = fake::Call::Exec { container: container.into(), command: command.to_vec(), stdin };
        Ok(Session(Some(self.fake()?.open(call)?)))
    }
    /// Attach to PID 1 of `container` (needs `stdin: true`, see `prepare`).
    pub fn attach(&self, container: &str) -> Result<Session, HostError> {
        Ok(Session(Some(self.fake()?.open(fake::Call::Attach { container: container.into() })?)))
    }
    /// Append to the job's trace.
    pub fn trace_write(&self, data: &[u8]) {
        if let Some(f) = &self.fake {
            f.trace_write(data)
        }
    }
    /// Back off without burning the call's CPU deadline.
    pub fn sleep(&self, millis: u64) {
        match &self.fake {
            // A fake host records the back-off instead of waiting it out.
            Some(f) => f.slept(millis),
            None => std::thread::sleep(std::time::Duration::from_millis(millis)),
        }
    }
    /// The pod, freshly read, as JSON.
    pub fn pod_status(&self) -> Result<String, HostError> {
        self.fake()?.pod_status()
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub mod fake;
