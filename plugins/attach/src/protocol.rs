//! What runs in the pod, and how its output is read back.
//!
//! Everything here is POSIX sh plus `cat`, `mv`, `wc`, `tr`, `tail`, `head` and `sleep`, so
//! any helper image with coreutils or busybox works; nothing is installed into an image.
//!
//! - A stage's script is written into the scripts volume by an exec into the helper, to a
//!   temporary name first and then renamed, so a half-written script is never run.
//! - The only thing sent over attach is one command line (see [`Paths::start_line`]) that
//!   starts the stage in the background of build's shell, appending its output to the log,
//!   framed by a start and an exit marker. It creates a `.started` file with noclobber first,
//!   so sending the same line twice (after a dropped attach) starts the stage once.
//! - The log is read by an exec into the helper running [`READER`] from a byte offset. It
//!   prints the file's bytes unchanged, so the strategy's offset is simply the number of bytes
//!   it has received; after a drop it resumes from there and no byte is lost or repeated.

/// The byte that opens and closes a marker (ASCII record separator): it does not occur in
/// ordinary output, and a marker also carries a per-job nonce, so output cannot fake one.
pub const RS: u8 = 0x1e;

/// Where the pod-side files live. In the pod these are the emptyDirs of [`crate::pod`]; the
/// native tests point them at a temporary directory and run the same shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub scripts: String,
    pub log: String,
}

/// A stage's files are named by its sequence number and name, e.g. `2-after_script`.
pub fn stage_id(seq: u32, name: &str) -> String {
    let name: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
    format!("{seq}-{name}")
}

/// Quote `s` for sh.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Paths {
    pub fn script(&self, id: &str) -> String {
        format!("{}/{id}", self.scripts)
    }
    pub fn started(&self, id: &str) -> String {
        format!("{}/{id}.started", self.scripts)
    }
    pub fn done(&self, id: &str) -> String {
        format!("{}/{id}.done", self.scripts)
    }

    /// The exec (in the helper) that writes stdin to the stage's script atomically.
    pub fn write_script(&self, id: &str) -> Vec<String> {
        let script = self.script(id);
        vec![
            "sh".into(),
            "-c".into(),
            "cat > \"$1.tmp\" && mv -f \"$1.tmp\" \"$1\"".into(),
            "keel-write-script".into(),
            script,
        ]
    }

    /// The line sent to build's shell over attach: start the stage once, in the background,
    /// output and markers appended to the log, then mark it done. The exit marker follows
    /// whatever the script did (even a script that cannot be opened), and the stage's shell
    /// is a child, so build's PID 1 never exits with it.
    pub fn start_line(&self, id: &str, nonce: &str) -> String {
        format!(
            "if (set -C; : > {started}) 2>/dev/null; then ( printf '\\036keel:{nonce}:start:{id}\\036'; \
             \"${{KEEL_SHELL:-sh}}\" {script}; printf '\\036keel:{nonce}:exit:{id}:%d\\036' \"$?\"; : > {done} ) \
             >> {log} 2>&1 & fi\n",
            started = quote(&self.started(id)),
            script = quote(&self.script(id)),
            done = quote(&self.done(id)),
            log = quote(&self.log),
        )
    }

    /// The exec (in the helper) that streams the log from `offset` until the stage is done,
    /// polling at most every `poll_ms`, giving up after `start_wait_ms` without a start.
    pub fn reader(&self, id: &str, offset: u64, poll_ms: u32, start_wait_ms: u32) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            READER.into(),
            "keel-read-log".into(),
            self.log.clone(),
            offset.to_string(),
            self.started(id),
            self.done(id),
            poll_ms.to_string(),
            start_wait_ms.to_string(),
        ]
    }
}

/// Exit code of [`READER`] when the stage has not started after the wait: the start line was
/// lost on its way, and sending it again is safe.
pub const NOT_STARTED: i32 = 5;
/// Exit code of [`READER`] when the log cannot be read.
pub const NO_LOG: i32 = 3;

/// Streams `$1` from byte offset `$2` as it grows. It checks for the done file `$4` *before*
/// measuring the file, so its last round reads everything the stage wrote (the exit marker is
/// written before the done file). Partial lines go out as soon as they are in the file. Ends
/// with [`NOT_STARTED`] if `$3` does not exist after `$6` ms.
///
/// The poll starts at 10 ms and doubles up to `$5` ms: a short stage (`echo hi`) ends within a
/// few ms, and a fixed 100 ms poll made it wait ~100 ms for nothing; a long one costs the same
/// few processes per `$5` as before.
pub const READER: &str = r#"f=$1 off=$2 started=$3 done=$4 max=$5 wait=$6 last= waited=0 ms=10
[ -r "$f" ] || { echo "keel attach: cannot read the log $f" >&2; exit 3; }
while :; do
  [ -e "$done" ] && last=1
  size=$(wc -c < "$f" | tr -d ' ')
  if [ "$size" -gt "$off" ] 2>/dev/null; then
    tail -c +$((off + 1)) "$f" | head -c $((size - off)) || exit 4
    off=$size
  fi
  [ -n "$last" ] && exit 0
  if [ ! -e "$started" ]; then waited=$((waited + ms)); [ "$waited" -gt "$wait" ] && exit 5; fi
  sleep "$((ms / 1000)).$(printf %03d $((ms % 1000)))" 2>/dev/null || sleep 1
  ms=$((ms * 2)); if [ "$ms" -gt "$max" ]; then ms=$max; fi
done
"#;

/// PID 1 of build: the first shell the image has (bash, then sh, then busybox's), as a child
/// reading the container's stdin, so the attach line runs in it. It is a child rather than
/// `exec`'d so that a TERM (pod deletion) ends the container at once; a shell as PID 1 would
/// ignore TERM and every cleanup would wait out the grace period.
pub const DETECT_SHELL: &str = r#"for s in /usr/local/bin/bash /usr/bin/bash /bin/bash /usr/local/bin/sh /usr/bin/sh /bin/sh /busybox/sh; do
  if [ -x "$s" ]; then
    KEEL_SHELL=$s; export KEEL_SHELL
    trap 'kill -TERM "$c" 2>/dev/null; exit 0' TERM INT
    # A background command's stdin is /dev/null unless given another fd explicitly.
    exec 3<&0
    "$s" <&3 3<&- & c=$!
    wait "$c"; exit $?
  fi
done
echo 'keel attach: no shell in the build image (looked for bash, sh and busybox sh)' >&2
exit 1
"#;

/// What the log stream holds besides the stage's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Bytes of output, to go to the trace as they are.
    Output(Vec<u8>),
    Started(String),
    Exited(String, i32),
}

/// Longest marker we parse; a record separator followed by more than this without a closing
/// one is output.
const MAX_MARKER: usize = 256;

/// Splits the log stream into output and markers. Output is passed on at once, except for a
/// tail that might be the beginning of a marker (only when the last bytes start with [`RS`]),
/// so partial lines stream live and a marker split across chunks is still found.
#[derive(Debug, Clone, Default)]
pub struct MarkerParser {
    prefix: Vec<u8>,
    held: Vec<u8>,
}

impl MarkerParser {
    pub fn new(nonce: &str) -> Self {
        let mut prefix = vec![RS];
        prefix.extend_from_slice(format!("keel:{nonce}:").as_bytes());
        MarkerParser { prefix, held: Vec::new() }
    }

    /// Feed a chunk; returns what it completes, in order.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Event> {
        self.held.extend_from_slice(chunk);
        let mut events = Vec::new();
        let mut out = Vec::new();
        let mut i = 0;
        let buf = std::mem::take(&mut self.held);
        while i < buf.len() {
            if buf[i] != RS {
                out.push(buf[i]);
                i += 1;
                continue;
            }
            let rest = &buf[i..];
            let n = rest.len().min(self.prefix.len());
            if rest[..n] != self.prefix[..n] {
                out.push(RS);
                i += 1;
                continue;
            }
            if rest.len() < self.prefix.len() {
                // Could still become a marker: hold it for the next chunk.
                self.held = rest.to_vec();
                break;
            }
            let body = &rest[self.prefix.len()..];
            match body.iter().position(|&b| b == RS) {
                Some(end) => match parse_marker(&body[..end]) {
                    Some(event) => {
                        if !out.is_empty() {
                            events.push(Event::Output(std::mem::take(&mut out)));
                        }
                        events.push(event);
                        i += self.prefix.len() + end + 1;
                    }
                    None => {
                        out.push(RS);
                        i += 1;
                    }
                },
                None if body.len() <= MAX_MARKER => {
                    self.held = rest.to_vec();
                    break;
                }
                None => {
                    out.push(RS);
                    i += 1;
                }
            }
        }
        if !out.is_empty() {
            events.push(Event::Output(out));
        }
        events
    }

    /// What is held back, as output (the stream ended, so it cannot become a marker).
    pub fn flush(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }
}

fn parse_marker(body: &[u8]) -> Option<Event> {
    let body = std::str::from_utf8(body).ok()?;
    if let Some(id) = body.strip_prefix("start:") {
        return Some(Event::Started(id.to_string()));
    }
    let rest = body.strip_prefix("exit:")?;
    let (id, code) = rest.rsplit_once(':')?;
    Some(Event::Exited(id.to_string(), code.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(nonce: &str, body: &str) -> Vec<u8> {
        let mut m = vec![RS];
        m.extend_from_slice(format!("keel:{nonce}:{body}").as_bytes());
        m.push(RS);
        m
    }

    fn outputs(events: &[Event]) -> Vec<u8> {
        events.iter().filter_map(|e| if let Event::Output(o) = e { Some(o.clone()) } else { None }).flatten().collect()
    }

    #[test]
    fn markers_are_found_in_any_split_and_output_passes_unchanged() {
        let mut stream = marker("n1", "start:1-step_script");
        stream.extend_from_slice(b"line 1\n\x1e not a marker \x1ekeel:other:exit:1-x:0\x1e dots...");
        stream.extend(marker("n1", "exit:1-step_script:7"));
        stream.extend_from_slice(b"late");
        for split in 1..stream.len() {
            let mut p = MarkerParser::new("n1");
            let mut events = Vec::new();
            for chunk in stream.chunks(split) {
                events.extend(p.feed(chunk));
            }
            let tail = p.flush();
            let mut out = outputs(&events);
            out.extend(tail);
            assert_eq!(
                String::from_utf8_lossy(&out),
                "line 1\n\x1e not a marker \x1ekeel:other:exit:1-x:0\x1e dots...late",
                "split {split}"
            );
            let marks: Vec<_> = events.iter().filter(|e| !matches!(e, Event::Output(_))).cloned().collect();
            assert_eq!(
                marks,
                vec![Event::Started("1-step_script".into()), Event::Exited("1-step_script".into(), 7)],
                "split {split}"
            );
        }
    }

    #[test]
    fn partial_lines_are_not_held_back() {
        let mut p = MarkerParser::new("n");
        assert_eq!(p.feed(b"."), vec![Event::Output(b".".to_vec())]);
        assert_eq!(p.feed(b"..\n"), vec![Event::Output(b"..\n".to_vec())]);
        // Only a possible marker start is held.
        assert_eq!(p.feed(b"x\x1ekee"), vec![Event::Output(b"x".to_vec())]);
        assert_eq!(p.flush(), b"\x1ekee");
    }

    #[test]
    fn an_unclosed_marker_becomes_output_past_the_limit() {
        let mut p = MarkerParser::new("n");
        let mut long = b"\x1ekeel:n:".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_MARKER + 1));
        assert_eq!(outputs(&p.feed(&long)), long);
    }

    #[test]
    fn stage_ids_are_safe_file_names() {
        assert_eq!(stage_id(3, "after_script"), "3-after_script");
        assert_eq!(stage_id(1, "x/../y z"), "1-x____y_z");
    }
}
