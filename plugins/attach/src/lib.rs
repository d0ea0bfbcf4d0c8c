//! `attach`: the default execution strategy, GitLab Runner's attach strategy as a plugin.
//!
//! Each stage:
//! 1. its script is written into the scripts volume by an exec into the helper (atomically);
//! 2. one command line sent over attach to build's shell starts it in the background, output
//!    appended to the log between a start and an exit marker (see [`protocol`]);
//! 3. the log is read back by an exec into the helper from a byte offset, and its bytes go to
//!    the trace as they arrive, partial lines included.
//!
//! What it does when the connection to the API server drops: nothing is lost. The stage keeps
//! running in the pod (it does not hang on any connection); the strategy reconnects with
//! back-off (1 s doubling to 30 s by default) and reads on from the last byte it received, so
//! every byte reaches the trace exactly once and in order. A start line whose delivery is
//! uncertain is sent again: the pod side starts a stage at most once. After
//! `max_reconnects` failed attempts in a row the job fails, naming the lost connection.

pub mod pod;
pub mod protocol;

use std::hash::{BuildHasher, Hasher};

use keel_sdk::strategy::{HostError, Stream};
use keel_sdk::{Config, Context, Error, ExecutionStrategy, Plugin, Pod, Stage, StrategyHost};

use crate::pod::{BUILD, HELPER};
use crate::protocol::{Event, MarkerParser, NO_LOG, NOT_STARTED, Paths, stage_id};

/// Bytes asked for per read: the host delivers what arrived, up to this.
const READ: u32 = 64 * 1024;
/// Kept of a reader's stderr for an error message.
const STDERR_KEPT: usize = 4096;
/// Times a start line is sent again because the stage did not start.
const RESENDS: u32 = 3;

fn default_min() -> u64 {
    1000
}
fn default_max() -> u64 {
    30_000
}
fn default_reconnects() -> u32 {
    12
}
fn default_poll() -> u32 {
    100
}
fn default_start_wait() -> u32 {
    10
}

/// The `[[runners.kubernetes.plugins]]` table of the attach strategy (all optional).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// First back-off after a dropped connection, in milliseconds (doubles each time).
    #[serde(default = "default_min")]
    pub reconnect_min_ms: u64,
    /// Longest back-off, in milliseconds.
    #[serde(default = "default_max")]
    pub reconnect_max_ms: u64,
    /// Failed reconnects in a row (no byte received in between) before the job fails.
    #[serde(default = "default_reconnects")]
    pub max_reconnects: u32,
    /// How often the log reader looks for new output, in milliseconds.
    #[serde(default = "default_poll")]
    pub poll_ms: u32,
    /// Seconds to wait for a stage to start before its start line is sent again.
    #[serde(default = "default_start_wait")]
    pub start_wait_s: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            reconnect_min_ms: default_min(),
            reconnect_max_ms: default_max(),
            max_reconnects: default_reconnects(),
            poll_ms: default_poll(),
            start_wait_s: default_start_wait(),
        }
    }
}

/// The strategy's state for one job.
#[derive(Debug)]
pub struct Attach {
    settings: Settings,
    paths: Paths,
    /// Marks this job's markers, so output cannot fake an exit code.
    nonce: String,
    /// Stages started so far (names the stage's files).
    seq: u32,
    /// Bytes of the log received so far: where the next read starts.
    offset: u64,
}

impl Attach {
    pub fn new(settings: Settings, paths: Paths, nonce: String) -> Self {
        Attach { settings, paths, nonce, seq: 0, offset: 0 }
    }
}

fn nonce() -> String {
    // std's RandomState is seeded from the host's randomness (wasi:random).
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    format!("{:016x}", h.finish())
}

impl Plugin for Attach {
    const NAME: &'static str = "attach";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(config: Config) -> Result<Self, Error> {
        let settings: Settings = config.parse()?;
        if settings.reconnect_min_ms == 0 || settings.reconnect_max_ms < settings.reconnect_min_ms {
            return Err(Error::invalid_config("reconnect_min_ms must be > 0 and at most reconnect_max_ms".to_string()));
        }
        if settings.poll_ms == 0 || settings.poll_ms > 10_000 {
            return Err(Error::invalid_config("poll_ms must be between 1 and 10000".to_string()));
        }
        Ok(Attach::new(settings, pod::paths(), nonce()))
    }
}

/// Back-off between reconnects, reset whenever a session made progress.
struct Retry<'a> {
    settings: &'a Settings,
    stage: &'a str,
    delay: u64,
    failures: u32,
}

impl<'a> Retry<'a> {
    fn new(settings: &'a Settings, stage: &'a str) -> Self {
        Retry { settings, stage, delay: settings.reconnect_min_ms, failures: 0 }
    }

    fn progress(&mut self) {
        self.delay = self.settings.reconnect_min_ms;
        self.failures = 0;
    }

    /// After `error` while `doing`: back off and return `Ok` to try again, or the job's error.
    fn after(&mut self, host: &StrategyHost, error: HostError, doing: &str) -> Result<(), Error> {
        match error {
            HostError::Disconnected(why) if self.failures < self.settings.max_reconnects => {
                self.failures += 1;
                keel_sdk::info!(
                    "stage {}: connection lost while {doing} ({why}); retrying in {} ms",
                    self.stage,
                    self.delay
                );
                host.sleep(self.delay);
                self.delay = (self.delay * 2).min(self.settings.reconnect_max_ms);
                Ok(())
            }
            HostError::Disconnected(why) => Err(Error::internal(format!(
                "lost the connection to the job's pod during stage {} while {doing}, and {} reconnects failed (last: {why}); \
                 the stage's result is unknown",
                self.stage, self.failures
            ))),
            HostError::Refused(why) => {
                Err(Error::internal(format!("stage {}: the host refused {doing}: {why}", self.stage)))
            }
            HostError::NoSuchContainer(why) => Err(Error::internal(format!("stage {}: {doing}: {why}", self.stage))),
            HostError::Other(why) => Err(Error::internal(format!("stage {}: {doing}: {why}", self.stage))),
        }
    }
}

impl Attach {
    fn write_script(&self, host: &StrategyHost, id: &str, script: &str) -> Result<(), HostError> {
        let session = host.exec(HELPER, &self.paths.write_script(id), true)?;
        session.write_stdin(script.as_bytes())?;
        session.close_stdin()?;
        let mut err = Vec::new();
        while let Some((_, data)) = session.read_output(READ)? {
            keep_tail(&mut err, &data);
        }
        match session.wait_exit()? {
            0 => Ok(()),
            code => Err(HostError::Other(format!(
                "writing the stage script in the helper exited with {code}: {}",
                String::from_utf8_lossy(&err).trim()
            ))),
        }
    }

    fn send_start(&self, host: &StrategyHost, id: &str, retry: &mut Retry) -> Result<(), Error> {
        let line = self.paths.start_line(id, &self.nonce);
        loop {
            // The session is dropped right after the write: the stage runs in the background of
            // build's shell and needs no connection.
            match host.attach(BUILD).and_then(|s| s.write_stdin(line.as_bytes())) {
                Ok(()) => return Ok(()),
                Err(e) => retry.after(host, e, "sending the stage to build's shell")?,
            }
        }
    }
}

fn keep_tail(kept: &mut Vec<u8>, data: &[u8]) {
    kept.extend_from_slice(data);
    if kept.len() > STDERR_KEPT {
        kept.drain(..kept.len() - STDERR_KEPT);
    }
}

impl ExecutionStrategy for Attach {
    fn prepare(&mut self, _ctx: &Context, pod: Pod) -> Result<Pod, Error> {
        pod::prepare(pod)
    }

    fn run_stage(&mut self, _ctx: &Context, stage: &Stage, host: &StrategyHost) -> Result<i32, Error> {
        self.seq += 1;
        let id = stage_id(self.seq, &stage.name);
        let mut retry = Retry::new(&self.settings, &stage.name);
        while let Err(e) = self.write_script(host, &id, &stage.script) {
            retry.after(host, e, "writing the stage script")?;
        }
        retry.progress();
        self.send_start(host, &id, &mut retry)?;

        let start_wait_ms = self.settings.start_wait_s.saturating_mul(1000);
        let mut parser = MarkerParser::new(&self.nonce);
        let mut started = false;
        let mut resends = 0;
        loop {
            let command = self.paths.reader(&id, self.offset, self.settings.poll_ms, start_wait_ms);
            let session = match host.exec(HELPER, &command, false) {
                Ok(s) => s,
                Err(e) => {
                    retry.after(host, e, "starting the log reader")?;
                    continue;
                }
            };
            let mut stderr = Vec::new();
            let mut exited = None;
            let mut read_error = None;
            loop {
                match session.read_output(READ) {
                    Ok(Some((Stream::Stdout, data))) => {
                        self.offset += data.len() as u64;
                        retry.progress();
                        for event in parser.feed(&data) {
                            match event {
                                Event::Output(bytes) => host.trace_write(&bytes),
                                Event::Started(s) if s == id => started = true,
                                Event::Exited(s, code) if s == id => exited = Some(code),
                                // Another stage's marker (one that ended before) carries nothing now.
                                Event::Started(_) | Event::Exited(..) => {}
                            }
                        }
                        if exited.is_some() {
                            break;
                        }
                    }
                    Ok(Some((Stream::Stderr, data))) => keep_tail(&mut stderr, &data),
                    Ok(None) => break,
                    Err(e) => {
                        read_error = Some(e);
                        break;
                    }
                }
            }
            if let Some(code) = exited {
                // Output after the marker (a background process of the stage) is the stage's too.
                let rest = parser.flush();
                host.trace_write(&rest);
                // The reader ends by itself at its next poll (the done file exists).
                return Ok(code);
            }
            let ended = match read_error {
                Some(e) => Err(e),
                None => session.wait_exit(),
            };
            let stderr = String::from_utf8_lossy(&stderr).trim().to_string();
            match ended {
                Ok(NOT_STARTED) if !started && resends < RESENDS => {
                    resends += 1;
                    keel_sdk::warn!(
                        "stage {}: did not start within {} s; sending it again",
                        stage.name,
                        self.settings.start_wait_s
                    );
                    self.send_start(host, &id, &mut retry)?;
                }
                Ok(NOT_STARTED) => {
                    return Err(Error::internal(format!(
                        "stage {} did not start in the build container after {} attempts: its shell (PID 1, \
                         reading stdin) did not run the start line",
                        stage.name,
                        resends + 1
                    )));
                }
                Ok(0) => {
                    return Err(Error::internal(format!(
                        "stage {}: the log ended without the stage's exit marker (was {} changed by the job?)",
                        stage.name, self.paths.log
                    )));
                }
                Ok(NO_LOG) => {
                    return Err(Error::internal(format!("stage {}: {stderr}", stage.name)));
                }
                Ok(code) => {
                    return Err(Error::internal(format!(
                        "stage {}: the log reader in the helper exited with {code}: {stderr} (the helper image needs sh, \
                         wc, tr, tail, head and sleep)",
                        stage.name
                    )));
                }
                Err(e) => retry.after(host, e, "reading the log")?,
            }
        }
    }
}

keel_sdk::export!(Attach: ExecutionStrategy);

#[cfg(test)]
mod tests;
