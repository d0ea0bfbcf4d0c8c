//! A fake strategy host for native tests: the same [`StrategyHost`] API a wasm build uses, with
//! sessions the test scripts.
//!
//! Every `exec` or `attach` the strategy makes is handed to the test's responder as a [`Call`];
//! the responder answers with a [`Scripted`] session (output chunks, then an end that is an exit
//! code or a dropped connection) or refuses the call with a [`HostError`]. The fake records what
//! the strategy did: every call with the bytes it wrote to stdin, the trace, and the back-off
//! sleeps (recorded, not slept, so a test of thirty reconnects takes no time).
//!
//! ```
//! use keel_sdk::strategy::fake::{Call, FakeHost, Scripted};
//! use keel_sdk::strategy::Stream;
//!
//! let fake = FakeHost::new(|call: &Call| match call {
//!     Call::Exec { .. } => Ok(Scripted::new().stdout(b"hello\n").exit(0)),
//!     Call::Attach { .. } => Ok(Scripted::new().disconnect("proxy cut")),
//! });
//! let host = fake.host();
//! let session = host.exec("build", &["sh".into()], true).unwrap();
//! session.write_stdin(b"echo hello\n").unwrap();
//! assert_eq!(session.read_output(1024).unwrap(), Some((Stream::Stdout, b"hello\n".to_vec())));
//! assert_eq!(session.read_output(1024).unwrap(), None);
//! assert_eq!(session.wait_exit(), Ok(0));
//! assert_eq!(fake.sessions()[0].stdin, b"echo hello\n");
//! ```

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{HostError, StrategyHost, Stream};

/// What the strategy asked the host for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Exec { container: String, command: Vec<String>, stdin: bool },
    Attach { container: String },
}

impl Call {
    /// The container the call addresses.
    pub fn container(&self) -> &str {
        match self {
            Call::Exec { container, .. } | Call::Attach { container } => container,
        }
    }
}

/// How a scripted session behaves: its output in order, then how it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scripted {
    output: VecDeque<(Stream, Vec<u8>)>,
    end: Result<i32, HostError>,
    stdin_error: Option<HostError>,
}

impl Default for Scripted {
    fn default() -> Self {
        Scripted::new()
    }
}

impl Scripted {
    /// No output, exit code 0.
    pub fn new() -> Self {
        Scripted { output: VecDeque::new(), end: Ok(0), stdin_error: None }
    }
    /// Then a chunk on stdout (delivered as one `read-output`, split if the strategy asks for less).
    pub fn stdout(mut self, data: impl AsRef<[u8]>) -> Self {
        self.output.push_back((Stream::Stdout, data.as_ref().to_vec()));
        self
    }
    /// Then a chunk on stderr.
    pub fn stderr(mut self, data: impl AsRef<[u8]>) -> Self {
        self.output.push_back((Stream::Stderr, data.as_ref().to_vec()));
        self
    }
    /// The process exits with `code` after its output.
    pub fn exit(mut self, code: i32) -> Self {
        self.end = Ok(code);
        self
    }
    /// The connection drops after the output: reads end, `wait-exit` is `disconnected`, and
    /// stdin writes fail, as the real host behaves.
    pub fn disconnect(mut self, why: &str) -> Self {
        self.end = Err(HostError::Disconnected(why.into()));
        self
    }
    /// Writes to stdin fail with `error` (they are still recorded: a real connection may
    /// deliver bytes and then report the drop).
    pub fn stdin_fails(mut self, error: HostError) -> Self {
        self.stdin_error = Some(error);
        self
    }
}

/// One session the strategy opened, as the fake saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub call: Call,
    /// Everything written to its stdin, in order.
    pub stdin: Vec<u8>,
    pub stdin_closed: bool,
}

type Responder = Box<dyn FnMut(&Call) -> Result<Scripted, HostError> + Send>;

struct State {
    respond: Responder,
    sessions: Vec<SessionRecord>,
    trace: Vec<u8>,
    sleeps: Vec<u64>,
    pod: Result<String, HostError>,
}

/// The fake host. Cheap to clone; clones share what they recorded.
#[derive(Clone)]
pub struct FakeHost(Arc<Mutex<State>>);

impl std::fmt::Debug for FakeHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("FakeHost").field("sessions", &s.sessions.len()).field("trace", &s.trace.len()).finish()
    }
}

impl FakeHost {
    /// A host that answers every `exec`/`attach` with `respond(call)`.
    pub fn new(respond: impl FnMut(&Call) -> Result<Scripted, HostError> + Send + 'static) -> Self {
        FakeHost(Arc::new(Mutex::new(State {
            respond: Box::new(respond),
            sessions: Vec::new(),
            trace: Vec::new(),
            sleeps: Vec::new(),
            pod: Err(HostError::Other("the fake host has no pod status (FakeHost::set_pod_status)".into())),
        })))
    }

    /// The [`StrategyHost`] to pass to `run_stage`.
    pub fn host(&self) -> StrategyHost {
        StrategyHost { fake: Some(self.clone()) }
    }

    /// What `pod-status` returns from now on.
    pub fn set_pod_status(&self, pod: Result<String, HostError>) {
        self.lock().pod = pod;
    }

    /// Every session opened so far, in order.
    pub fn sessions(&self) -> Vec<SessionRecord> {
        self.lock().sessions.clone()
    }

    /// Everything the strategy wrote to the trace.
    pub fn trace(&self) -> Vec<u8> {
        self.lock().trace.clone()
    }

    /// Every back-off the strategy asked for, in milliseconds.
    pub fn sleeps(&self) -> Vec<u64> {
        self.lock().sleeps.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked mid-call still gets to read what was recorded.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn open(&self, call: Call) -> Result<FakeSession, HostError> {
        let mut state = self.lock();
        let script = (state.respond)(&call)?;
        state.sessions.push(SessionRecord { call, stdin: Vec::new(), stdin_closed: false });
        let index = state.sessions.len() - 1;
        Ok(FakeSession { host: self.clone(), index, script: Mutex::new(script) })
    }

    pub(super) fn trace_write(&self, data: &[u8]) {
        self.lock().trace.extend_from_slice(data);
    }

    pub(super) fn slept(&self, millis: u64) {
        self.lock().sleeps.push(millis);
    }

    pub(super) fn pod_status(&self) -> Result<String, HostError> {
        self.lock().pod.clone()
    }
}

/// A session of the fake host (behind [`super::Session`]).
pub struct FakeSession {
    host: FakeHost,
    index: usize,
    script: Mutex<Scripted>,
}

impl FakeSession {
    fn script(&self) -> MutexGuard<'_, Scripted> {
        self.script.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn write_stdin(&self, data: &[u8]) -> Result<(), HostError> {
        let mut state = self.host.lock();
        let record = &mut state.sessions[self.index];
        if record.stdin_closed {
            return Err(HostError::Other("stdin is not open (closed)".into()));
        }
        record.stdin.extend_from_slice(data);
        let script = self.script();
        if let Some(e) = &script.stdin_error {
            return Err(e.clone());
        }
        match &script.end {
            Err(e) if script.output.is_empty() => Err(e.clone()),
            _ => Ok(()),
        }
    }

    pub(super) fn close_stdin(&self) -> Result<(), HostError> {
        self.host.lock().sessions[self.index].stdin_closed = true;
        Ok(())
    }

    pub(super) fn read_output(&self, max_bytes: u32) -> Result<Option<(Stream, Vec<u8>)>, HostError> {
        let mut script = self.script();
        let Some((stream, mut data)) = script.output.pop_front() else { return Ok(None) };
        let max = (max_bytes as usize).max(1);
        if data.len() > max {
            let rest = data.split_off(max);
            script.output.push_front((stream, rest));
        }
        Ok(Some((stream, data)))
    }

    pub(super) fn wait_exit(&self) -> Result<i32, HostError> {
        let mut script = self.script();
        // Like the real host, the exit comes after the output (which is then gone).
        script.output.clear();
        script.end.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_split_to_the_size_asked_for_and_a_drop_ends_the_session() {
        let fake = FakeHost::new(|_| Ok(Scripted::new().stdout(b"abcdef").stderr(b"oops").disconnect("cut")));
        let s = fake.host().exec("helper", &["cat".into()], false).unwrap();
        assert_eq!(s.read_output(4).unwrap(), Some((Stream::Stdout, b"abcd".to_vec())));
        assert_eq!(s.read_output(4).unwrap(), Some((Stream::Stdout, b"ef".to_vec())));
        assert_eq!(s.read_output(4).unwrap(), Some((Stream::Stderr, b"oops".to_vec())));
        assert_eq!(s.read_output(4).unwrap(), None);
        assert_eq!(s.wait_exit(), Err(HostError::Disconnected("cut".into())));
        assert!(s.write_stdin(b"x").is_err());
    }

    #[test]
    fn refusals_calls_trace_and_sleeps_are_recorded() {
        let fake = FakeHost::new(|call| match call.container() {
            "build" => Ok(Scripted::new()),
            other => Err(HostError::NoSuchContainer(other.into())),
        });
        let host = fake.host();
        assert!(matches!(host.attach("svc"), Err(HostError::NoSuchContainer(_))));
        host.attach("build").unwrap().write_stdin(b"line\n").unwrap();
        host.trace_write(b"out");
        host.sleep(1000);
        assert_eq!(fake.sessions().len(), 1);
        assert_eq!(fake.sessions()[0].stdin, b"line\n");
        assert_eq!((fake.trace(), fake.sleeps()), (b"out".to_vec(), vec![1000]));
        assert!(host.pod_status().is_err());
        fake.set_pod_status(Ok("{}".into()));
        assert_eq!(host.pod_status().unwrap(), "{}");
    }

    #[test]
    fn a_host_not_made_by_a_fake_refuses_everything() {
        let host = StrategyHost::new();
        assert!(matches!(host.exec("build", &["true".into()], false), Err(HostError::Other(_))));
    }
}
