//! Input hardening shared by every reader of untrusted files (config, job, patches, plugin
//! components): the limits, bounded reads, nesting checks before a parser runs, positions and
//! message cutting. A leaf: it knows no host type.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where in which file a bad value is: `path:line:column: key `a.b``, or `path: key `a.b`` when
/// the parser could not say where (documents resolved from YAML merge keys, checks after
/// parsing). Config and job errors both name places this way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub path: PathBuf,
    /// 1-based line and column.
    pub position: Option<(usize, usize)>,
    /// The key path, as written (`runners[0].kubernetes.cpu_limit`, `variables.A`).
    pub key: String,
}

impl Located {
    pub fn at(path: &Path, line: usize, column: usize, key: impl Into<String>) -> Located {
        Located { path: path.to_path_buf(), position: Some((line, column)), key: key.into() }
    }

    pub fn key(path: &Path, key: impl Into<String>) -> Located {
        Located { path: path.to_path_buf(), position: None, key: key.into() }
    }
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => write!(f, "{}:{line}:{column}: key `{}`", self.path.display(), self.key),
            None => write!(f, "{}: key `{}`", self.path.display(), self.key),
        }
    }
}

/// 1-based line and column of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|i| before[i + 1..].chars().count()).unwrap_or(before.chars().count()) + 1;
    (line, col)
}

/// What the host refuses to read, and why (README, "Limits"). Each limit is far beyond what a
/// real runner config or job needs and small enough that refusing costs a fraction of a second;
/// every refusal is an error naming the file, the key and the limit.
pub mod limits {
    /// `config.toml`.
    pub const CONFIG_BYTES: usize = 4 << 20;
    /// A job or pipeline file and a `pod_spec` patch: GitLab's default `max_yaml_size_bytes`.
    pub const YAML_BYTES: usize = 2 << 20;
    /// Nesting of YAML collections (GitLab's default `max_yaml_depth`) and of TOML arrays and
    /// inline tables. The YAML parser slows down quadratically with depth, so this is checked
    /// before it runs.
    pub const NESTING: usize = 100;
    /// Nodes of a YAML document with its aliases expanded (`*a` counts what `&a` holds).
    pub const YAML_NODES: usize = 1_000_000;
    /// Levels of `extends` below a job (GitLab's limit).
    pub const EXTENDS_DEPTH: usize = 11;
    /// `*_overwrite_allowed` pattern length.
    pub const REGEX_BYTES: usize = 4 << 10;
    /// Compiled size of an `*_overwrite_allowed` pattern (`RegexBuilder::size_limit`).
    pub const REGEX_COMPILED_BYTES: usize = 1 << 20;
    /// Sidecar services of a job, and `[[runners.kubernetes.services]]` of a runner.
    pub const SERVICES: usize = 64;
    /// Plugins of a runner, top-level `[[plugins]]` included: each is an instance per job, and the
    /// pool holds 64.
    pub const PLUGINS: usize = 32;
    /// `[[runners.kubernetes.pod_spec]]` patches of a runner.
    pub const PATCHES: usize = 100;
    /// Volumes of a runner, all five kinds together.
    pub const VOLUMES: usize = 256;
    /// Variables of a job: predefined, runner `environment`, top-level and the job's own.
    pub const VARIABLES: usize = 5000;
    /// Kubernetes' limit on a pod's annotations (`TotalAnnotationSizeLimitB`), for the config's
    /// `pod_annotations` as written.
    pub const ANNOTATION_BYTES: usize = 256 << 10;
    /// The largest object the API server stores (etcd's default request size): the bound on a
    /// job's expanded variables together and on what a plugin may return.
    pub const OBJECT_BYTES: usize = keel_contract::pod::MAX_OBJECT_BYTES;
    /// Error messages that quote input are cut here (with a note).
    pub const MESSAGE_BYTES: usize = 4 << 10;
}

/// `n` bytes the way the README states limits (`4 MiB`, `1.5 MiB`, `256 KiB`).
pub fn show_bytes(n: usize) -> String {
    const MIB: usize = 1 << 20;
    if n >= MIB && n.is_multiple_of(MIB / 2) {
        let whole = n / MIB;
        if n.is_multiple_of(MIB) { format!("{whole} MiB") } else { format!("{whole}.5 MiB") }
    } else if n >= 1024 && n.is_multiple_of(1024) {
        format!("{} KiB", n / 1024)
    } else {
        format!("{n} bytes")
    }
}

/// Cuts `message` at [`limits::MESSAGE_BYTES`] (on a character boundary) with a note saying
/// how much was left out, so an error quoting a 10 MB key stays readable.
pub fn cut_message(message: String) -> String {
    cut(message, limits::MESSAGE_BYTES)
}

pub fn cut(mut message: String, max: usize) -> String {
    if message.len() <= max {
        return message;
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let rest = message.len() - end;
    message.truncate(end);
    message.push_str(&format!("... [{rest} more bytes not shown]"));
    message
}

/// Reads a config, job or patch file: a regular file of at most `max` bytes. A FIFO or a device
/// would block or never end, so those are refused before they are opened.
pub fn read_text_file(path: &Path, max: usize) -> std::io::Result<String> {
    let bytes = read_regular_file(path, max)?;
    String::from_utf8(bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "stream did not contain valid UTF-8"))
}

/// [`read_text_file`] for binary files (plugin components).
pub fn read_regular_file(path: &Path, max: usize) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    // `metadata` follows symlinks and never blocks, unlike opening a FIFO. (A file swapped for a
    // FIFO between the check and the open is not defended against: that takes write access to
    // the directory, which already allows worse.)
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("it is {}, not a regular file; only regular files are read", file_kind(&meta)),
        ));
    }
    let too_big = |size: u64| {
        Error::new(ErrorKind::InvalidData, format!("the file is {size} bytes, over the limit of {}", show_bytes(max)))
    };
    if meta.len() > max as u64 {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow between the check and the read: never read more than the limit.
    std::fs::File::open(path)?.take(max as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > max {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
    }
    "a special file"
}

/// Byte offset where TOML arrays and inline tables first nest deeper than `max`. A scan of the
/// raw text (strings and comments skipped), so the parser never sees such a document.
pub fn check_toml_depth(text: &str, max: usize) -> Result<(), usize> {
    let b = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            q @ (b'"' | b'\'') => {
                let delimiter: &[u8] = if q == b'"' { b"\"\"\"" } else { b"'''" };
                let triple = b[i..].starts_with(delimiter);
                i += if triple { 3 } else { 1 };
                while i < b.len() {
                    if q == b'"' && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if triple && b[i..].starts_with(delimiter) {
                        i += 2;
                        break;
                    }
                    if !triple && (b[i] == q || b[i] == b'\n') {
                        break;
                    }
                    i += 1;
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// A YAML document over one of the shape limits, and where (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlLimit {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Whether YAML `text` stays within [`limits::NESTING`] and [`limits::YAML_NODES`], found before
/// the real parser runs. libyaml (under serde_yaml_ng) takes time quadratic in the depth (over a
/// minute for 100,000 levels) before its own recursion limit applies, and serde_yaml_ng's alias
/// limit counts alias uses, not what they expand to (100,000 aliases of a 1,000-entry mapping
/// would be 100 million nodes). yaml-rust2's pull parser stops at the first event past either
/// limit, so the check costs a fraction of a parse. Syntax errors are left to the real parser,
/// which words them as users know; after such an error a cruder scan of flow brackets stands in.
pub fn check_yaml(text: &str) -> Result<(), YamlLimit> {
    use yaml_rust2::parser::{Event, Parser};
    let mut parser = Parser::new_from_str(text);
    let mut depth = 0usize;
    let mut nodes = 0usize;
    // Expanded size of each anchored node, and of each collection still open (its anchor, the
    // node count when it began).
    let mut anchored: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    let mut open: Vec<(usize, usize)> = Vec::new();
    loop {
        let (event, mark) = match parser.next_token() {
            Ok(next) => next,
            Err(_) => {
                return crude_flow_depth(text, limits::NESTING).map_err(|offset| {
                    let (line, column) = line_col(text, offset);
                    YamlLimit { line, column, message: too_deep() }
                });
            }
        };
        let at = |message: String| YamlLimit { line: mark.line(), column: mark.col() + 1, message };
        match event {
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                depth += 1;
                if depth > limits::NESTING {
                    return Err(at(too_deep()));
                }
                open.push((anchor, nodes));
                nodes += 1;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                depth = depth.saturating_sub(1);
                if let Some((anchor, start)) = open.pop()
                    && anchor > 0
                {
                    anchored.insert(anchor, nodes - start);
                }
            }
            Event::Scalar(_, _, anchor, _) => {
                nodes += 1;
                if anchor > 0 {
                    anchored.insert(anchor, 1);
                }
            }
            Event::Alias(anchor) => nodes = nodes.saturating_add(anchored.get(&anchor).copied().unwrap_or(1)),
            Event::StreamEnd => return Ok(()),
            _ => {}
        }
        if nodes > limits::YAML_NODES {
            return Err(at(format!(
                "the document has more than {} nodes once aliases are expanded (the limit)",
                limits::YAML_NODES
            )));
        }
    }
}

fn too_deep() -> String {
    format!("collections nest deeper than {} levels (GitLab's max_yaml_depth)", limits::NESTING)
}

/// Flow-collection nesting of YAML `text`, skipping quoted scalars and comments (roughly).
fn crude_flow_depth(text: &str, max: usize) -> Result<(), usize> {
    let b = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'#' if i == 0 || b[i - 1].is_ascii_whitespace() => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            q @ (b'"' | b'\'') => {
                i += 1;
                while i < b.len() && b[i] != q && b[i] != b'\n' {
                    i += if q == b'"' && b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// An `*_overwrite_allowed` pattern compiled within [`limits::REGEX_BYTES`] and
/// [`limits::REGEX_COMPILED_BYTES`]: an unbounded 10 MB pattern once took 1.7 GB to compile.
pub fn compile_overwrite_regex(s: &str) -> Result<regex::Regex, String> {
    if s.len() > limits::REGEX_BYTES {
        return Err(format!(
            "the regular expression is {} bytes, over the limit of {}",
            s.len(),
            show_bytes(limits::REGEX_BYTES)
        ));
    }
    regex::RegexBuilder::new(s)
        .size_limit(limits::REGEX_COMPILED_BYTES)
        .dfa_size_limit(limits::REGEX_COMPILED_BYTES)
        .build()
        .map_err(|e| format!("invalid regular expression {s:?}: {e}"))
}
