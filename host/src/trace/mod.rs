//! The job's trace: the byte stream a CI user sees, made of the script's output and the host's own
//! GitLab-style lines.
//!
//! Everything that reaches the trace goes through one path: mask the job's secrets, apply the
//! output limit, prefix line starts with timestamps, then write to the live sink (flushed at once,
//! the trace is watched while the job runs) and to the optional trace file.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

mod mask;
pub use mask::{DEFAULT_TOKEN_PREFIXES, MASKED, Masker};

// GitLab's job log colours (its `helpers/ansi.go`), so a trace looks the same in its log viewer.
const ANSI_YELLOW: &str = "\x1b[0;33m";
const ANSI_BOLD_RED: &str = "\x1b[31;1m";
const ANSI_BOLD_GREEN: &str = "\x1b[32;1m";
const ANSI_RESET: &str = "\x1b[0;m";

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot open trace file {path}")]
    OpenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the trace to its sink")]
    WriteSink {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write trace file {path}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceOptions {
    /// Prefix every line with an RFC 3339 UTC timestamp (GitLab's `FF_TIMESTAMPS`).
    pub timestamps: bool,
    /// Bytes of output (after masking, before timestamps) after which script output is dropped.
    /// `u64::MAX` for no limit; 0 really means nothing.
    pub output_limit: u64,
    /// A copy of the trace, created (truncated) when the trace starts.
    pub trace_file: Option<PathBuf>,
    /// ANSI colours on host lines.
    pub color: bool,
    /// Token prefixes masked besides [`DEFAULT_TOKEN_PREFIXES`] (GitLab's job payload lists its
    /// instance's in `features.token_mask_prefixes`).
    pub token_prefixes: Vec<String>,
}

/// The job's trace, shared by the stage loop and the plugin host calls.
///
/// Cloning is cheap; all clones write to the same stream. Writing never fails: a sink or file that
/// stops accepting bytes is recorded (see [`Trace::take_errors`]) and left alone from then on, because
/// a closed stdout must not stop a job.
#[derive(Clone)]
pub struct Trace {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trace").field("bytes_written", &self.bytes_written()).finish_non_exhaustive()
    }
}

/// Which rule of the output limit a piece of output follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Budget {
    /// Cut at the limit, then dropped.
    Limited,
    /// Written even past the limit: the job's final result line must be seen.
    Always,
}

struct Inner {
    opts: TraceOptions,
    masker: Masker,
    sink: Option<Box<dyn Write + Send>>,
    file: Option<File>,
    /// Whether the emitted stream (not the masker's input) is at the start of a line.
    at_line_start: bool,
    written: u64,
    limit_reached: bool,
    errors: Vec<TraceError>,
}

impl Trace {
    pub fn new(opts: TraceOptions, secrets: Vec<String>, sink: Box<dyn Write + Send>) -> Result<Trace, TraceError> {
        let file = match &opts.trace_file {
            Some(path) => {
                Some(File::create(path).map_err(|source| TraceError::OpenFile { path: path.clone(), source })?)
            }
            None => None,
        };
        let masker = Masker::with_token_prefixes(
            secrets,
            DEFAULT_TOKEN_PREFIXES.iter().map(|p| p.to_string()).chain(opts.token_prefixes.iter().cloned()),
        );
        let inner = Inner {
            opts,
            masker,
            sink: Some(sink),
            file,
            at_line_start: true,
            written: 0,
            limit_reached: false,
            errors: Vec::new(),
        };
        Ok(Trace { inner: Arc::new(Mutex::new(inner)) })
    }

    /// Script output, as it arrives (any chunking).
    pub fn write(&self, bytes: &[u8]) {
        let mut inner = self.lock();
        let mut masked = Vec::with_capacity(bytes.len());
        inner.masker.push(bytes, &mut masked);
        inner.emit(&masked, Budget::Limited);
    }

    /// Emits the masker's held-back tail; call at the end of each stage, when the script's output
    /// has ended and a partial secret can no longer complete.
    pub fn flush_stage(&self) {
        let mut inner = self.lock();
        let mut masked = Vec::new();
        inner.masker.flush(&mut masked);
        inner.emit(&masked, Budget::Limited);
    }

    /// A plain host line such as `Executing "step_script" stage`.
    pub fn line(&self, text: &str) {
        self.host_line(text, None, Budget::Limited);
    }

    /// A section or progress line, green when colours are on.
    pub fn info(&self, text: &str) {
        self.host_line(text, Some(ANSI_BOLD_GREEN), Budget::Limited);
    }

    /// Yellow when colours are on. The caller writes any `WARNING: ` prefix.
    pub fn warning(&self, text: &str) {
        self.host_line(text, Some(ANSI_YELLOW), Budget::Limited);
    }

    /// Red when colours are on, and shown even past the output limit, because the job's result is
    /// its last line. The caller writes any `ERROR: ` prefix.
    pub fn error(&self, text: &str) {
        self.host_line(text, Some(ANSI_BOLD_RED), Budget::Always);
    }

    /// The job's final result line (`Job succeeded`), green, shown even past the output limit.
    pub fn success(&self, text: &str) {
        self.host_line(text, Some(ANSI_BOLD_GREEN), Budget::Always);
    }

    /// Bytes emitted so far, counted after masking and before timestamps (colour codes, the limit
    /// notice and lines shown past the limit included).
    pub fn bytes_written(&self) -> u64 {
        self.lock().written
    }

    /// Write errors of the sink and the trace file so far; each one stopped writing to its target.
    pub fn take_errors(&self) -> Vec<TraceError> {
        std::mem::take(&mut self.lock().errors)
    }

    fn host_line(&self, text: &str, color: Option<&str>, budget: Budget) {
        let mut inner = self.lock();
        // Host lines are complete texts, masked on their own: the script's held-back tail stays
        // held, so a secret split around a plugin's log line still cannot leak in pieces.
        let masked = inner.masker.mask(text.as_bytes());
        let mut line = Vec::with_capacity(masked.len() + 16);
        if !inner.at_line_start {
            line.push(b'\n');
        }
        match color.filter(|_| inner.opts.color) {
            Some(c) => {
                line.extend_from_slice(c.as_bytes());
                line.extend_from_slice(&masked);
                line.extend_from_slice(ANSI_RESET.as_bytes());
            }
            None => line.extend_from_slice(&masked),
        }
        line.push(b'\n');
        inner.emit(&line, budget);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves a consistent enough trace to go on
        // writing; losing the rest of the job's log would be worse.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    /// Applies the output limit to masked bytes and writes what passes.
    fn emit(&mut self, masked: &[u8], budget: Budget) {
        if masked.is_empty() {
            return;
        }
        if budget == Budget::Always {
            self.out(masked);
            return;
        }
        if self.limit_reached {
            return;
        }
        let left = self.opts.output_limit.saturating_sub(self.written);
        match usize::try_from(left) {
            Ok(left) if left < masked.len() => {
                self.out(&masked[..left]);
                self.limit_reached = true;
                let notice = self.limit_notice();
                self.out(&notice);
            }
            _ => self.out(masked),
        }
    }

    fn limit_notice(&self) -> Vec<u8> {
        let (on, off) = if self.opts.color { (ANSI_YELLOW, ANSI_RESET) } else { ("", "") };
        let text = format!(
            "\n{on}Job's log exceeded limit of {} bytes.{off}\n\
             {on}Job execution will continue but no more output will be collected.{off}\n",
            self.opts.output_limit
        );
        self.masker.mask(text.as_bytes())
    }

    /// Counts, timestamps line starts, and writes to the sink and the trace file.
    fn out(&mut self, bytes: &[u8]) {
        self.written = self.written.saturating_add(bytes.len() as u64);
        let stamped;
        let bytes = if self.opts.timestamps {
            stamped = self.stamp(bytes);
            &stamped[..]
        } else {
            self.at_line_start = bytes.last() == Some(&b'\n');
            bytes
        };
        if let Some(sink) = &mut self.sink
            && let Err(source) = sink.write_all(bytes).and_then(|()| sink.flush())
        {
            tracing::warn!(error = %source, "trace sink failed; no more output goes to it");
            self.sink = None;
            self.errors.push(TraceError::WriteSink { source });
        }
        if let Some(file) = &mut self.file
            && let Err(source) = file.write_all(bytes)
        {
            let path = self.opts.trace_file.clone().unwrap_or_default();
            tracing::warn!(error = %source, path = %path.display(), "trace file failed; no more output goes to it");
            self.file = None;
            self.errors.push(TraceError::WriteFile { path, source });
        }
    }

    /// Prefixes each line start with a timestamp. A line's stamp is written with its first byte,
    /// not with the previous newline, so it tells when the line began.
    fn stamp(&mut self, bytes: &[u8]) -> Vec<u8> {
        let now = format!("{:.6} ", jiff::Timestamp::now());
        let mut out = Vec::with_capacity(bytes.len() + now.len());
        let mut rest = bytes;
        while !rest.is_empty() {
            if self.at_line_start {
                out.extend_from_slice(now.as_bytes());
            }
            match rest.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    out.extend_from_slice(&rest[..=nl]);
                    rest = &rest[nl + 1..];
                    self.at_line_start = true;
                }
                None => {
                    out.extend_from_slice(rest);
                    rest = &[];
                    self.at_line_start = false;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// A sink the test can read back, shared with the trace.
    #[derive(Clone, Default)]
    struct Sink {
        bytes: Arc<Mutex<Vec<u8>>>,
        flushes: Arc<Mutex<usize>>,
    }
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            *self.flushes.lock().unwrap() += 1;
            Ok(())
        }
    }
    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.bytes.lock().unwrap().clone()).unwrap()
        }
    }

    fn opts() -> TraceOptions {
        TraceOptions {
            timestamps: false,
            output_limit: u64::MAX,
            trace_file: None,
            color: false,
            token_prefixes: vec![],
        }
    }

    fn trace(opts: TraceOptions, secrets: &[&str]) -> (Trace, Sink) {
        let sink = Sink::default();
        let t = Trace::new(opts, self::secrets(secrets), Box::new(sink.clone())).unwrap();
        (t, sink)
    }

    /// Checks every line's timestamp and returns the lines without it.
    fn strip_stamps(text: &str) -> Vec<String> {
        let mut lines: Vec<&str> = text.split('\n').collect();
        if lines.last() == Some(&"") {
            lines.pop();
        }
        lines
            .into_iter()
            .map(|line| {
                let (stamp, rest) = line.split_once(' ').unwrap_or_else(|| panic!("line {line:?} has no timestamp"));
                assert_eq!(stamp.len(), "2026-12-01T20:00:00.123456Z".len(), "{line:?}");
                assert!(stamp.ends_with('Z'), "{line:?}");
                stamp.parse::<jiff::Timestamp>().unwrap_or_else(|e| panic!("bad timestamp in {line:?}: {e}"));
                rest.to_string()
            })
            .collect()
    }

    #[test]
    fn trace_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone>() {}
        check::<Trace>();
    }

    #[test]
    fn trace_masks_across_chunk_borders_and_flushes_each_write() {
        let (t, sink) = trace(opts(), &["hunter2", "s3cr3t"]);
        t.write(b"pass: hun");
        assert_eq!(sink.text(), "pass: ");
        t.write(b"ter");
        t.write(b"2 and s3");
        assert_eq!(sink.text(), "pass: [MASKED] and ");
        t.write(b"cr3");
        t.flush_stage();
        assert_eq!(sink.text(), "pass: [MASKED] and s3cr3");
        assert!(*sink.flushes.lock().unwrap() >= 3, "every write is flushed to the sink");
        t.line("value s3cr3t in a host line");
        assert_eq!(sink.text(), "pass: [MASKED] and s3cr3\nvalue [MASKED] in a host line\n");
    }

    #[test]
    fn host_line_does_not_release_a_held_secret_start() {
        let (t, sink) = trace(opts(), &["hunter2"]);
        t.write(b"x hun");
        t.line("plugin says hi");
        t.write(b"ter2\n");
        let text = sink.text();
        assert_eq!(text, "x \nplugin says hi\n[MASKED]\n");
    }

    #[test]
    fn timestamps_at_every_line_start() {
        let (t, sink) = trace(TraceOptions { timestamps: true, ..opts() }, &[]);
        t.write(b"one\ntw");
        t.write(b"o\n");
        t.write(b"\nthr");
        t.write(b"ee");
        t.line("host");
        t.write(b"four\nfive\n");
        let text = sink.text();
        assert_eq!(strip_stamps(&text), ["one", "two", "", "three", "host", "four", "five"], "{text}");
        assert!(text.ends_with("five\n"), "no stamp before a line has started: {text:?}");
        // Partial writes of one line carry one stamp.
        assert_eq!(text.matches('Z').count(), 7, "{text}");
    }

    #[test]
    fn timestamps_count_nothing_towards_the_limit() {
        let (t, _sink) = trace(TraceOptions { timestamps: true, ..opts() }, &[]);
        t.write(b"ab\ncd\n");
        assert_eq!(t.bytes_written(), 6);
    }

    #[test]
    fn host_lines_end_a_partial_line_first() {
        let (t, sink) = trace(opts(), &[]);
        t.write(b"partial");
        t.line(r#"Executing "after_script" stage"#);
        t.write(b"full\n");
        t.line("next");
        assert_eq!(sink.text(), "partial\nExecuting \"after_script\" stage\nfull\nnext\n");
    }

    #[test]
    fn output_limit_notice_once_and_error_lines_still_shown() {
        let (t, sink) = trace(TraceOptions { output_limit: 10, ..opts() }, &[]);
        t.write(b"12345");
        t.write(b"6789abcdef");
        t.write(b"more\n");
        t.line("Executing stage");
        t.warning("dropped too");
        t.flush_stage();
        t.error("ERROR: Job failed: exit code 1");
        let text = sink.text();
        assert_eq!(
            text,
            "123456789a\nJob's log exceeded limit of 10 bytes.\n\
             Job execution will continue but no more output will be collected.\n\
             ERROR: Job failed: exit code 1\n"
        );
        assert_eq!(text.matches("exceeded limit").count(), 1);
    }

    #[test]
    fn output_limit_counts_masked_bytes() {
        // "hunter2" becomes 8 bytes; the limit is on what the user sees.
        let (t, sink) = trace(TraceOptions { output_limit: 9, ..opts() }, &["hunter2"]);
        t.write(b"hunter2!");
        assert_eq!(t.bytes_written(), 9);
        t.write(b"x");
        assert!(sink.text().starts_with("[MASKED]!\nJob's log exceeded limit of 9 bytes."));
    }

    #[test]
    fn limit_notice_in_warning_colour_with_timestamps() {
        let o = TraceOptions { output_limit: 3, color: true, timestamps: true, ..opts() };
        let (t, sink) = trace(o, &[]);
        t.write(b"abcdef");
        t.error("bad");
        let lines = strip_stamps(&sink.text());
        assert_eq!(
            lines,
            [
                "abc",
                "\x1b[0;33mJob's log exceeded limit of 3 bytes.\x1b[0;m",
                "\x1b[0;33mJob execution will continue but no more output will be collected.\x1b[0;m",
                "\x1b[31;1mbad\x1b[0;m",
            ]
        );
    }

    #[test]
    fn colours_on_and_off() {
        let (t, sink) = trace(TraceOptions { color: true, ..opts() }, &["pw"]);
        t.line("plain");
        t.info("Executing \"step_script\" stage");
        t.warning("WARNING: careful pw");
        t.error("ERROR: Job failed");
        assert_eq!(
            sink.text(),
            "plain\n\
             \x1b[32;1mExecuting \"step_script\" stage\x1b[0;m\n\
             \x1b[0;33mWARNING: careful [MASKED]\x1b[0;m\n\
             \x1b[31;1mERROR: Job failed\x1b[0;m\n"
        );
        let (t, sink) = trace(opts(), &[]);
        t.info("i");
        t.warning("w");
        t.error("e");
        assert_eq!(sink.text(), "i\nw\ne\n");
    }

    #[test]
    fn trace_file_gets_what_the_sink_got() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.log");
        std::fs::write(&path, "stale content from an earlier job").unwrap();
        let o =
            TraceOptions { timestamps: true, output_limit: 80, trace_file: Some(path.clone()), color: true, ..opts() };
        let (t, sink) = trace(o, &["hunter2"]);
        let other = t.clone();
        t.info("Executing \"step_script\" stage");
        t.write(b"echo hun");
        other.write(b"ter2\npartial");
        t.warning("WARNING: x");
        t.write(b"a lot of output that goes past the limit\n");
        t.error("ERROR: Job failed");
        drop(t);
        drop(other);
        let file = std::fs::read_to_string(&path).unwrap();
        assert_eq!(file, sink.text());
        assert!(file.contains("echo [MASKED]\n"));
        assert!(!file.contains("hunter2"));
    }

    #[test]
    fn trace_file_error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("job.log");
        let err =
            Trace::new(TraceOptions { trace_file: Some(path.clone()), ..opts() }, vec![], Box::new(std::io::sink()))
                .unwrap_err();
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }

    struct Broken {
        writes: Arc<Mutex<usize>>,
    }
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            *self.writes.lock().unwrap() += 1;
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn sink_failure_is_recorded_and_the_trace_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.log");
        let writes = Arc::new(Mutex::new(0));
        let t = Trace::new(
            TraceOptions { trace_file: Some(path.clone()), ..opts() },
            vec![],
            Box::new(Broken { writes: writes.clone() }),
        )
        .unwrap();
        t.write(b"one\n");
        t.write(b"two\n");
        t.error("done");
        assert_eq!(*writes.lock().unwrap(), 1, "a failed sink is not written again");
        let errors = t.take_errors();
        assert_eq!(errors.len(), 1);
        assert!(matches!(errors[0], TraceError::WriteSink { .. }));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\ndone\n");
        assert_eq!(t.bytes_written(), 13);
    }

    #[test]
    fn concurrent_writers_share_one_stream() {
        let (t, sink) = trace(opts(), &["hunter2"]);
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        t.line(&format!("thread {i} hunter2"));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let text = sink.text();
        assert_eq!(text.lines().count(), 200);
        assert!(text.lines().all(|l| l.starts_with("thread ") && l.ends_with(" [MASKED]")));
    }
}
