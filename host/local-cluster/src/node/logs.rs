//! Container logs: one file per container instance, one timestamped entry per line, in the
//! CRI logging format (`<RFC3339Nano> <stdout|stderr> <F|P> <content>`; `P` marks a line that
//! continues in the next entry). The file is written once per chunk read from the container's
//! pipe (not per byte or per line), so the writer keeps up with a fast producer.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::stream::BoxStream;
use tokio::sync::{mpsc, watch};

use super::{LogOptions, NodeError};

/// Which pipe a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pipe {
    Stdout,
    Stderr,
}

impl Pipe {
    fn name(self) -> &'static str {
        match self {
            Pipe::Stdout => "stdout",
            Pipe::Stderr => "stderr",
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    written: u64,
    closed: bool,
}

/// The log of one container instance.
#[derive(Debug)]
pub(crate) struct LogFile {
    path: PathBuf,
    writer: Mutex<Option<BufWriter<File>>>,
    progress: watch::Sender<Progress>,
}

/// RFC 3339 with nanoseconds, always 9 fractional digits so entries sort as text.
pub(crate) fn rfc3339_nanos(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = jiff::Timestamp::from_second(d.as_secs() as i64).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    format!("{}.{:09}Z", secs.strftime("%Y-%m-%dT%H:%M:%S"), d.subsec_nanos())
}

impl LogFile {
    pub fn create(path: &Path) -> std::io::Result<Arc<LogFile>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = File::create(path)?;
        Ok(Arc::new(LogFile {
            path: path.to_path_buf(),
            writer: Mutex::new(Some(BufWriter::with_capacity(256 * 1024, file))),
            progress: watch::Sender::new(Progress::default()),
        }))
    }

    /// Appends one chunk read from a pipe. `partial` tracks, per pipe, whether the previous
    /// chunk ended mid-line (only needed to keep entries well formed; readers join `P` entries).
    pub fn append(&self, pipe: Pipe, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        let ts = rfc3339_nanos(SystemTime::now());
        let mut guard = self.writer.lock().expect("log writer lock");
        let Some(w) = guard.as_mut() else { return };
        let mut n: u64 = 0;
        let mut write = |w: &mut BufWriter<File>, content: &[u8], tag: &[u8]| -> std::io::Result<()> {
            w.write_all(ts.as_bytes())?;
            w.write_all(b" ")?;
            w.write_all(pipe.name().as_bytes())?;
            w.write_all(tag)?;
            w.write_all(content)?;
            w.write_all(b"\n")?;
            n += (ts.len() + 1 + pipe.name().len() + tag.len() + content.len() + 1) as u64;
            Ok(())
        };
        let mut rest = chunk;
        let result = (|| -> std::io::Result<()> {
            while !rest.is_empty() {
                match memchr(b'\n', rest) {
                    Some(i) => {
                        write(w, &rest[..i], b" F ")?;
                        rest = &rest[i + 1..];
                    }
                    None => {
                        write(w, rest, b" P ")?;
                        rest = &[];
                    }
                }
            }
            w.flush()
        })();
        drop(guard);
        if let Err(e) = result {
            tracing::warn!(log.path = %self.path.display(), error = %e, "writing container log failed");
        }
        self.progress.send_modify(|p| p.written += n);
    }

    /// No more output: followers end once they have read everything.
    pub fn close(&self) {
        if let Some(mut w) = self.writer.lock().expect("log writer lock").take() {
            let _ = w.flush();
        }
        self.progress.send_modify(|p| p.closed = true);
    }
}

/// The kubelet's bounds on a termination message taken from the log
/// (`terminationMessagePolicy: FallbackToLogsOnError`): the last 80 lines, at most 2048 bytes.
const MESSAGE_LINES: u64 = 80;
const MESSAGE_BYTES: usize = 2048;

impl LogFile {
    /// The end of the log as the kubelet's fallback termination message: the last 80 lines,
    /// the last 2048 bytes of them, both pipes as they came. Call after `close`.
    pub fn fallback_message(&self) -> std::io::Result<String> {
        let start = tail_offset(&self.path, MESSAGE_LINES)?;
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(start))?;
        let mut raw = Vec::new();
        file.read_to_end(&mut raw)?;
        let mut text = Vec::with_capacity(raw.len());
        for e in raw.split(|b| *b == b'\n').filter_map(parse_entry) {
            text.extend_from_slice(e.content);
            if e.full {
                text.push(b'\n');
            }
        }
        let from = text.len().saturating_sub(MESSAGE_BYTES);
        Ok(String::from_utf8_lossy(&text[from..]).into_owned())
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    memchr::memchr(needle, hay)
}

/// One parsed entry.
struct Entry<'a> {
    ts: &'a [u8],
    full: bool,
    content: &'a [u8],
}

fn parse_entry(line: &[u8]) -> Option<Entry<'_>> {
    let sp1 = memchr(b' ', line)?;
    let rest = &line[sp1 + 1..];
    let sp2 = memchr(b' ', rest)?;
    let rest = &rest[sp2 + 1..];
    let tag = *rest.first()?;
    let content = rest.get(2..).unwrap_or(&[]);
    Some(Entry { ts: &line[..sp1], full: tag == b'F', content })
}

/// Offset where the last `n` lines begin (a line ends with an `F` entry).
fn tail_offset(path: &Path, n: u64) -> std::io::Result<u64> {
    let mut f = File::open(path)?;
    let mut starts: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut pos: u64 = 0;
    let mut line_start = true;
    let mut carry: Vec<u8> = Vec::new();
    let mut entry_start: u64 = 0;
    loop {
        let r = f.read(&mut buf)?;
        if r == 0 {
            break;
        }
        carry.extend_from_slice(&buf[..r]);
        let mut consumed = 0;
        while let Some(i) = memchr(b'\n', &carry[consumed..]) {
            let line = &carry[consumed..consumed + i];
            if line_start {
                starts.push_back(entry_start);
                if starts.len() as u64 > n {
                    starts.pop_front();
                }
            }
            line_start = parse_entry(line).is_some_and(|e| e.full);
            consumed += i + 1;
            entry_start = pos + consumed as u64;
        }
        pos += consumed as u64;
        carry.drain(..consumed);
    }
    if n == 0 {
        return Ok(entry_start);
    }
    Ok(starts.front().copied().unwrap_or(entry_start))
}

/// Serves a log as a byte stream according to `opts`.
pub(crate) async fn serve(
    log: Arc<LogFile>,
    opts: LogOptions,
) -> Result<BoxStream<'static, Result<Bytes, NodeError>>, NodeError> {
    let path = log.path.clone();
    let start = match opts.tail_lines {
        Some(n) if n >= 0 => {
            let p = path.clone();
            tokio::task::spawn_blocking(move || tail_offset(&p, n as u64))
                .await
                .map_err(|e| NodeError::LogRead { path: path.clone(), source: std::io::Error::other(e) })?
                .map_err(|source| NodeError::LogRead { path: path.clone(), source })?
        }
        _ => 0,
    };
    let file = File::open(&path).map_err(|source| NodeError::LogRead { path: path.clone(), source })?;
    let since = match (opts.since_time, opts.since_seconds) {
        (Some(t), _) => Some(rfc3339_nanos(t)),
        (None, Some(s)) => Some(rfc3339_nanos(SystemTime::now() - Duration::from_secs(s.max(0) as u64))),
        _ => None,
    };
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, NodeError>>(16);
    let progress = log.progress.subscribe();
    let rt = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let r = pump(file, start, &opts, since.as_deref(), progress, &tx, &rt);
        if let Err(source) = r {
            let _ = tx.blocking_send(Err(NodeError::LogRead { path, source }));
        }
    });
    Ok(Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx))))
}

fn pump(
    mut file: File,
    start: u64,
    opts: &LogOptions,
    since: Option<&str>,
    mut progress: watch::Receiver<Progress>,
    tx: &mpsc::Sender<Result<Bytes, NodeError>>,
    rt: &tokio::runtime::Handle,
) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(start))?;
    let mut offset = start;
    let mut buf = vec![0u8; 256 * 1024];
    let mut carry: Vec<u8> = Vec::new();
    let mut remaining = opts.limit_bytes.filter(|l| *l >= 0).map(|l| l as u64);
    let mut passed_since = since.is_none();
    let mut at_line_start = true;
    loop {
        // Read the state before the data: if it said "closed", everything is already on disk.
        let state = *progress.borrow_and_update();
        let r = file.read(&mut buf)?;
        if r == 0 {
            if !opts.follow {
                return Ok(());
            }
            if state.closed {
                if offset >= state.written {
                    return Ok(());
                }
                continue;
            }
            // Wait for the writer (or for the receiver to go away).
            let gone = rt.block_on(async {
                tokio::select! {
                    c = progress.changed() => c.is_err(),
                    _ = tx.closed() => true,
                }
            });
            if gone {
                return Ok(());
            }
            continue;
        }
        offset += r as u64;
        carry.extend_from_slice(&buf[..r]);
        let mut out: Vec<u8> = Vec::with_capacity(carry.len());
        let mut consumed = 0;
        while let Some(i) = memchr(b'\n', &carry[consumed..]) {
            let line = &carry[consumed..consumed + i];
            consumed += i + 1;
            let Some(e) = parse_entry(line) else { continue };
            if !passed_since {
                if since.is_some_and(|s| e.ts < s.as_bytes()) {
                    continue;
                }
                passed_since = true;
            }
            if opts.timestamps && at_line_start {
                out.extend_from_slice(e.ts);
                out.push(b' ');
            }
            out.extend_from_slice(e.content);
            if e.full {
                out.push(b'\n');
            }
            at_line_start = e.full;
        }
        carry.drain(..consumed);
        if let Some(rem) = remaining.as_mut() {
            if out.len() as u64 >= *rem {
                out.truncate(*rem as usize);
                if !out.is_empty() {
                    let _ = tx.blocking_send(Ok(Bytes::from(out)));
                }
                return Ok(());
            }
            *rem -= out.len() as u64;
        }
        if !out.is_empty() && tx.blocking_send(Ok(Bytes::from(out))).is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    async fn collect(log: &Arc<LogFile>, opts: LogOptions) -> String {
        let mut s = serve(log.clone(), opts).await.unwrap();
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c.unwrap());
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_fallback_message_is_the_last_80_lines_and_2048_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::create(&dir.path().join("c.log")).unwrap();
        log.append(Pipe::Stdout, b"early\n");
        log.append(Pipe::Stderr, b"bwrap: ");
        log.append(Pipe::Stderr, b"failed\n");
        log.close();
        assert_eq!(log.fallback_message().unwrap(), "early\nbwrap: failed\n");

        let log = LogFile::create(&dir.path().join("long.log")).unwrap();
        for i in 0..100 {
            log.append(Pipe::Stdout, format!("line {i}\n").as_bytes());
        }
        log.close();
        let m = log.fallback_message().unwrap();
        assert!(m.starts_with("line 20\n") && m.ends_with("line 99\n"), "{m}");
        let log = LogFile::create(&dir.path().join("wide.log")).unwrap();
        log.append(Pipe::Stdout, &[b'x'; 5000]);
        log.append(Pipe::Stdout, b"\nend\n");
        log.close();
        let m = log.fallback_message().unwrap();
        assert_eq!(m.len(), 2048);
        assert!(m.ends_with("x\nend\n"));
    }

    #[tokio::test]
    async fn lines_split_across_chunks_are_joined_and_tail_counts_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::create(&dir.path().join("c/0.log")).unwrap();
        log.append(Pipe::Stdout, b"one\ntw");
        log.append(Pipe::Stdout, b"o\nthree\n");
        log.append(Pipe::Stderr, b"four");
        log.close();
        assert_eq!(collect(&log, LogOptions::default()).await, "one\ntwo\nthree\nfour");
        let tail = LogOptions { tail_lines: Some(2), ..Default::default() };
        assert_eq!(collect(&log, tail).await, "three\nfour");
        let tail = LogOptions { tail_lines: Some(3), ..Default::default() };
        assert_eq!(collect(&log, tail).await, "two\nthree\nfour");
        let tail = LogOptions { tail_lines: Some(0), ..Default::default() };
        assert_eq!(collect(&log, tail).await, "");
        let limit = LogOptions { limit_bytes: Some(5), ..Default::default() };
        assert_eq!(collect(&log, limit).await, "one\nt");
    }

    #[tokio::test]
    async fn timestamps_prefix_each_line_and_since_filters() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::create(&dir.path().join("0.log")).unwrap();
        log.append(Pipe::Stdout, b"old\n");
        let cut = SystemTime::now();
        std::thread::sleep(Duration::from_millis(2));
        log.append(Pipe::Stdout, b"new\n");
        log.close();
        let ts = collect(&log, LogOptions { timestamps: true, ..Default::default() }).await;
        let lines: Vec<_> = ts.lines().collect();
        assert_eq!(lines.len(), 2);
        let (stamp, text) = lines[0].split_once(' ').unwrap();
        assert_eq!(text, "old");
        stamp.parse::<jiff::Timestamp>().expect("an RFC 3339 timestamp");
        let since = collect(&log, LogOptions { since_time: Some(cut), ..Default::default() }).await;
        assert_eq!(since, "new\n");
    }

    #[tokio::test]
    async fn follow_ends_when_the_log_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::create(&dir.path().join("0.log")).unwrap();
        log.append(Pipe::Stdout, b"a\n");
        let mut s = serve(log.clone(), LogOptions { follow: true, ..Default::default() }).await.unwrap();
        assert_eq!(&s.next().await.unwrap().unwrap()[..], b"a\n");
        let writer = log.clone();
        tokio::spawn(async move {
            writer.append(Pipe::Stdout, b"b\n");
            writer.close();
        });
        let mut rest = Vec::new();
        while let Some(c) = s.next().await {
            rest.extend_from_slice(&c.unwrap());
        }
        assert_eq!(rest, b"b\n");
    }
}
