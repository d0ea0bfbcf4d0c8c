//! What a plugin instance may touch: nothing but its own memory, a clock, randomness and a log.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime::{ResourceLimiter, Trap, WasmBacktrace};
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
        // Under a limited address space (see `pool`) every plugin gets at most what is left.
        let memory_bytes = memory_bytes.min(super::pool::plugin_memory_cap());
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
            dropped: 0,
        })
    }
}

/// Bytes never hold the plugin up; complete lines are emitted at once, the rest on flush/drop.
struct LineForwarder {
    plugin: Arc<str>,
    stream: &'static str,
    last: Option<Tail>,
    /// The line so far, at most [`MAX_PLUGIN_TEXT`] bytes of it.
    pending: Vec<u8>,
    /// Bytes of the current line beyond what is kept: counted, not stored, so a plugin that
    /// writes a gigabyte without a newline costs the host nothing.
    dropped: usize,
}

/// The longest plugin log line or message the host prints; the rest is replaced by a note.
pub(crate) const MAX_PLUGIN_TEXT: usize = 4096;

/// Plugin text made fit for one host log line or error message: control characters (newlines,
/// carriage returns, terminal escape sequences), Unicode line separators and bidi overrides are
/// escaped (`\n`, `\u{1b}`), so a plugin cannot print a line that looks like the host's or
/// restyle the terminal; beyond `max` bytes it is cut with a note of how much was left out.
pub fn plugin_text(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 32);
    for (i, c) in text.char_indices() {
        if out.len() >= max {
            let _ = write!(out, "... [{} more bytes not shown]", text.len() - i);
            return out;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            // A tab cannot start a line; it stays readable as it is.
            '\t' => out.push(c),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

impl LineForwarder {
    /// Keeps what fits of `bytes` in the current line and counts the rest.
    fn take(&mut self, bytes: &[u8]) {
        let keep = MAX_PLUGIN_TEXT.saturating_sub(self.pending.len()).min(bytes.len());
        self.pending.extend_from_slice(&bytes[..keep]);
        self.dropped = self.dropped.saturating_add(bytes.len() - keep);
    }

    fn finish_line(&mut self) {
        let line = std::mem::take(&mut self.pending);
        let dropped = std::mem::take(&mut self.dropped);
        self.emit(&line, dropped);
    }

    fn emit(&self, line: &[u8], dropped: usize) {
        let raw = String::from_utf8_lossy(line);
        let raw = raw.trim_end();
        if raw.is_empty() && dropped == 0 {
            return;
        }
        let mut text = plugin_text(raw, MAX_PLUGIN_TEXT);
        if dropped > 0 {
            let _ = write!(text, "... [{dropped} more bytes not shown]");
        }
        // stderr is where a Rust panic (`panicked at ...`) and Python's tracebacks go: the
        // operator sees it at the default level, before the trap that usually follows.
        if self.stream == "stderr" {
            tracing::warn!(plugin.name = &*self.plugin, plugin.stream = self.stream, "{text}");
        } else {
            tracing::info!(plugin.name = &*self.plugin, plugin.stream = self.stream, "{text}");
        }
        if let Some(last) = &self.last
            && let Ok(mut slot) = last.lock()
        {
            if slot.len() == TAIL_LINES {
                slot.pop_front();
            }
            slot.push_back(text);
        }
    }
}

impl AsyncWrite for LineForwarder {
    fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let mut rest = buf;
        while let Some(pos) = rest.iter().position(|b| *b == b'\n') {
            self.take(&rest[..pos]);
            self.finish_line();
            rest = &rest[pos + 1..];
        }
        self.take(rest);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.pending.is_empty() || self.dropped > 0 {
            self.finish_line();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineForwarder {
    fn drop(&mut self) {
        if !self.pending.is_empty() || self.dropped > 0 {
            self.finish_line();
        }
    }
}

/// A runaway recursion in a plugin, told apart from other out-of-bounds accesses: Rust on
/// wasm32 keeps its stack in linear memory below the data, so running out of it walks below
/// address 0 and traps as `out of bounds memory access`. That trap with one function many
/// times on the call stack is reported as the stack overflow it almost certainly is.
const RECURSION_FRAMES: usize = 8;

/// Why a guest call trapped, in the operator's words.
pub(crate) fn describe_trap(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<Trap>() {
        Some(Trap::StackOverflow) => "stack overflow (the wasm call stack is exhausted: runaway recursion?)".into(),
        Some(trap @ Trap::MemoryOutOfBounds) => match e.downcast_ref::<WasmBacktrace>().and_then(recursion) {
            Some((frames, repeats, function)) => format!(
                "stack overflow: {trap} with {function} {repeats} times among {frames} calls on the stack (runaway recursion exhausted the plugin's stack)"
            ),
            None => trap.to_string(),
        },
        Some(trap) => trap.to_string(),
        None => format!("{e:#}"),
    }
}

/// (frames, how often the most frequent function appears, its name) when that suggests recursion.
fn recursion(backtrace: &WasmBacktrace) -> Option<(usize, usize, String)> {
    let frames = backtrace.frames();
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for f in frames {
        *counts.entry(f.func_index()).or_default() += 1;
    }
    let (index, repeats) = counts.into_iter().max_by_key(|(_, n)| *n)?;
    if repeats < RECURSION_FRAMES {
        return None;
    }
    let name = frames
        .iter()
        .find(|f| f.func_index() == index)
        .and_then(|f| f.func_name().map(|n| format!("`{}`", plugin_text(n, 200))))
        .unwrap_or_else(|| format!("function #{index}"));
    Some((frames.len(), repeats, name))
}
