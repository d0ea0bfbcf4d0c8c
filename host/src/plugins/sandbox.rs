//! What a plugin instance may touch: nothing but its own memory, a clock, randomness and a log.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{ResourceTable, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// Per-instance host state. One per plugin per job: a trap can never leak state into the
/// next job because the next job gets a new one.
pub struct StoreState {
    wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) plugin: Arc<str>,
    /// The last lines the plugin wrote to stderr; a panic message ends up here.
    last_stderr: Tail,
    /// Pod access for the job's execution strategy; `None` for every other plugin.
    pub(crate) strategy: Option<Arc<crate::plugins::strategy_host::StrategyServices>>,
    /// Set when a host call returns: the CPU deadline counts time inside wasm since then, not
    /// the time a strategy spent waiting on the cluster (see `Instance::new`).
    pub(crate) renew_deadline: bool,
}

impl StoreState {
    pub fn new(plugin: Arc<str>, memory_bytes: u64) -> Self {
        // Deny by default: no preopened directories, no environment, no arguments, no network
        // (WasiCtxBuilder's defaults refuse sockets and name lookups). Clocks and randomness
        // stay: they reveal nothing about the host.
        let last_stderr: Tail = Arc::new(Mutex::new(VecDeque::new()));
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(LogStream { plugin: plugin.clone(), stream: "stdout", last: None });
        wasi.stderr(LogStream { plugin: plugin.clone(), stream: "stderr", last: Some(last_stderr.clone()) });
        StoreState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(memory_bytes),
            plugin,
            last_stderr,
            strategy: None,
            renew_deadline: false,
        }
    }

    pub(crate) fn host_call_returned(&mut self) {
        self.renew_deadline = true;
    }

    /// What the plugin last said on stderr: a Rust panic's `panicked at ...` line and its
    /// message when there is one (skipping the backtrace hint after it), else the last line.
    pub fn stderr_tail(&self) -> Option<String> {
        let lines = self.last_stderr.lock().ok()?;
        if let Some(start) = lines.iter().rposition(|l| l.contains("panicked at")) {
            let panic: Vec<&str> =
                lines.iter().skip(start).take_while(|l| !l.starts_with("note: run with")).map(String::as_str).collect();
            return Some(panic.join(" "));
        }
        lines.back().cloned()
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Caps linear memory growth. Remembers a refusal so that the trap which usually follows
/// (Rust's allocator aborts on OOM) can be reported as "memory limit" rather than "unreachable".
pub struct MemoryLimiter {
    pub(crate) limit: u64,
    pub(crate) exceeded: Arc<AtomicBool>,
}

impl MemoryLimiter {
    fn new(limit: u64) -> Self {
        MemoryLimiter { limit, exceeded: Arc::new(AtomicBool::new(false)) }
    }

    pub fn was_exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Relaxed)
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let ok = desired as u64 <= self.limit;
        if !ok {
            self.exceeded.store(true, Ordering::Relaxed);
        }
        Ok(ok)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        // Tables hold function references; a million is far beyond any real plugin.
        Ok(desired <= 1_000_000)
    }
}

/// Recent stderr lines, shared between the stream and the store.
type Tail = Arc<Mutex<VecDeque<String>>>;
const TAIL_LINES: usize = 8;

/// A plugin's stdout/stderr: each line becomes a tracing event tagged with the plugin's name.
#[derive(Clone)]
struct LogStream {
    plugin: Arc<str>,
    stream: &'static str,
    last: Option<Tail>,
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineForwarder {
            plugin: self.plugin.clone(),
            stream: self.stream,
            last: self.last.clone(),
            pending: Vec::new(),
        })
    }
}

/// Bytes never hold the plugin up; complete lines are emitted at once, the rest on flush/drop.
struct LineForwarder {
    plugin: Arc<str>,
    stream: &'static str,
    last: Option<Tail>,
    pending: Vec<u8>,
}

/// A plugin that never writes a newline must not make the host buffer without bound.
const MAX_LINE: usize = 16 * 1024;

impl LineForwarder {
    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end();
        if text.is_empty() {
            return;
        }
        tracing::info!(plugin.name = &*self.plugin, plugin.stream = self.stream, "{text}");
        if let Some(last) = &self.last
            && let Ok(mut slot) = last.lock()
        {
            if slot.len() == TAIL_LINES {
                slot.pop_front();
            }
            slot.push_back(text.to_string());
        }
    }

    fn drain_lines(&mut self) {
        while let Some(pos) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=pos).collect();
            self.emit(&line);
        }
        if self.pending.len() >= MAX_LINE {
            let line = std::mem::take(&mut self.pending);
            self.emit(&line);
        }
    }
}

impl AsyncWrite for LineForwarder {
    fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.pending.extend_from_slice(buf);
        self.drain_lines();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let rest = std::mem::take(&mut self.pending);
        if !rest.is_empty() {
            self.emit(&rest);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineForwarder {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.emit(&rest);
        }
    }
}
