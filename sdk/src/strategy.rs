//! Execution strategies: how a stage's script gets run in the pod.
//!
//! Design only in this release: a strategy component imports `keel:plugin/strategy-host`,
//! which this host does not provide yet, so such a component is refused at load time with a
//! "missing import" error. The API below is what GitLab's attach strategy needs (see
//! wit/README.md for a walk-through).

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
    //! Outside wasm there is no host to reach; every service says so.
    use super::*;

    const NATIVE: &str = "strategy host services exist only inside the keel host";

    pub struct Session(());

    impl Session {
        pub fn write_stdin(&self, _data: &[u8]) -> Result<(), HostError> {
            Err(HostError::Other(NATIVE.into()))
        }
        pub fn close_stdin(&self) -> Result<(), HostError> {
            Err(HostError::Other(NATIVE.into()))
        }
        pub fn read_output(&self, _max_bytes: u32) -> Result<Option<(Stream, Vec<u8>)>, HostError> {
            Err(HostError::Other(NATIVE.into()))
        }
        pub fn wait_exit(&self) -> Result<i32, HostError> {
            Err(HostError::Other(NATIVE.into()))
        }
    }

    pub fn exec(_container: &str, _command: &[String], _stdin: bool) -> Result<Session, HostError> {
        Err(HostError::Other(NATIVE.into()))
    }
    pub fn attach(_container: &str) -> Result<Session, HostError> {
        Err(HostError::Other(NATIVE.into()))
    }
    pub fn trace_write(_data: &[u8]) {}
    pub fn sleep(millis: u64) {
        std::thread::sleep(std::time::Duration::from_millis(millis))
    }
    pub fn pod_status() -> Result<String, HostError> {
        Err(HostError::Other(NATIVE.into()))
    }
}

pub use imp::Session;

/// The host services a strategy uses; all act on the job's own pod.
#[derive(Debug, Default)]
pub struct StrategyHost {
    _private: (),
}

impl StrategyHost {
    #[doc(hidden)]
    pub fn new() -> Self {
        StrategyHost { _private: () }
    }
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
