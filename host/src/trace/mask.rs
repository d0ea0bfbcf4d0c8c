//! Masking secrets in a byte stream: the job's secret values, and tokens by their known prefix.

use std::collections::BTreeSet;

use aho_corasick::{AhoCorasick, MatchKind};

/// What replaces every occurrence of a secret, as in GitLab's job log.
pub const MASKED: &str = "[MASKED]";
const MASK: &[u8] = MASKED.as_bytes();

/// Streaming masker of the job's secret values.
///
/// Replaces every occurrence of a secret with `[MASKED]`, also when the secret arrives split over
/// several [`ValueMasker::push`] calls. The output is the same as masking the whole stream at once with
/// leftmost-longest matching, while bytes are held back only as long as the pending tail could
/// still be the start of a secret: a trace must stay live, and a script printing a prompt without
/// a newline must show it at once.
#[derive(Debug, Clone)]
pub struct ValueMasker {
    /// `None` when there is nothing to mask, so the common case costs one copy.
    matcher: Option<AhoCorasick>,
    /// Sorted and deduplicated, to answer "is this tail a prefix of a secret" by binary search.
    secrets: Vec<Vec<u8>>,
    longest: usize,
    /// Bytes not yet emitted because a secret may start here.
    pending: Vec<u8>,
}

impl ValueMasker {
    /// Empty values are ignored: masking the empty string would mask between every byte.
    pub fn new(values: impl IntoIterator<Item = String>) -> ValueMasker {
        let secrets: Vec<Vec<u8>> = values
            .into_iter()
            .filter(|v| !v.is_empty())
            .map(String::into_bytes)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let longest = secrets.iter().map(Vec::len).max().unwrap_or(0);
        let matcher = (!secrets.is_empty()).then(|| {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&secrets)
                // Building only fails when the automaton outgrows u32 state ids, far beyond any
                // set of CI variables; there is no safe way to go on without masking.
                .expect("secret matcher is too large to build")
        });
        ValueMasker { matcher, secrets, longest, pending: Vec::new() }
    }

    /// Masks `input` as the continuation of everything pushed before, appending what is decided to
    /// `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        if self.matcher.is_none() {
            out.extend_from_slice(input);
            return;
        }
        if self.pending.is_empty() {
            let done = self.settle(input, out);
            self.pending.extend_from_slice(&input[done..]);
        } else {
            let mut buf = std::mem::take(&mut self.pending);
            buf.extend_from_slice(input);
            let done = self.settle(&buf, out);
            buf.drain(..done);
            self.pending = buf;
        }
    }

    /// Ends the stream: the held-back tail is masked as it is and emitted.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        let pending = std::mem::take(&mut self.pending);
        self.mask_into(&pending, out);
    }

    /// Masks a complete text in one go (host lines, rendered objects), independent of the stream.
    pub fn mask(&self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len());
        self.mask_into(input, &mut out);
        out
    }

    /// Number of bytes held back, waiting for the next byte to decide whether a secret starts.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn mask_into(&self, input: &[u8], out: &mut Vec<u8>) {
        match &self.matcher {
            Some(m) => m.replace_all_with_bytes(input, out, |_, _, dst| {
                dst.extend_from_slice(MASK);
                true
            }),
            None => out.extend_from_slice(input),
        }
    }

    /// Emits the decided part of `buf` and returns its length; `buf[returned..]` must be held.
    ///
    /// A position is undecided when the bytes from it to the end are a proper prefix of a longer
    /// secret: more input could make a (longer) match start there. Those positions can only lie in
    /// the last `longest - 1` bytes. Before the first undecided position, leftmost-longest search
    /// on `buf` gives exactly the matches of the whole stream, since no match could start there and
    /// reach past the end of `buf`.
    fn settle(&self, buf: &[u8], out: &mut Vec<u8>) -> usize {
        let Some(matcher) = &self.matcher else {
            out.extend_from_slice(buf);
            return buf.len();
        };
        let from = buf.len().saturating_sub(self.longest.saturating_sub(1));
        let undecided: Vec<usize> = (from..buf.len()).filter(|&at| self.is_proper_prefix(&buf[at..])).collect();
        let hold_from = |pos: usize| undecided.iter().copied().find(|&at| at >= pos).unwrap_or(buf.len());

        let mut pos = 0;
        for m in matcher.find_iter(buf) {
            if m.start() >= hold_from(pos) {
                break;
            }
            out.extend_from_slice(&buf[pos..m.start()]);
            out.extend_from_slice(MASK);
            pos = m.end();
        }
        let hold = hold_from(pos);
        out.extend_from_slice(&buf[pos..hold]);
        hold
    }

    /// Whether `tail` is the start of some secret longer than it.
    fn is_proper_prefix(&self, tail: &[u8]) -> bool {
        // Secrets starting with `tail` sort right after `tail` itself; `tail` may be a secret too.
        let at = self.secrets.partition_point(|s| s.as_slice() < tail);
        self.secrets[at..].iter().take(2).any(|s| s.len() > tail.len() && s.starts_with(tail))
    }
}

/// GitLab's token prefixes (its token overview), masked in every trace by default as GitLab does
/// since `FF_MASK_ALL_DEFAULT_TOKENS`: a token someone printed is hidden even when no variable
/// holds it.
pub const DEFAULT_TOKEN_PREFIXES: &[&str] = &[
    "glpat-", "gloas-", "gldt-", "glrt-", "glrtr-", "glcbt-", "glptt-", "glft-", "glimt-", "glagent-", "glsoat-",
    "glffct-", "glcbtr-",
];

/// The job's trace masker: the job's secret values first, then tokens by their prefix.
///
/// Both stages stream: bytes are held back only while they could still start a secret value or
/// a token prefix, so a live trace stays live.
#[derive(Debug, Clone)]
pub struct Masker {
    values: ValueMasker,
    tokens: TokenMasker,
}

impl Masker {
    /// Masks `values` (empty ones ignored) and the [`DEFAULT_TOKEN_PREFIXES`].
    pub fn new(values: impl IntoIterator<Item = String>) -> Masker {
        Masker::with_token_prefixes(values, DEFAULT_TOKEN_PREFIXES.iter().map(|p| p.to_string()))
    }

    /// Masks `values` and tokens starting with one of `prefixes` (GitLab sends more of them in a
    /// job's `features.token_mask_prefixes`).
    pub fn with_token_prefixes(
        values: impl IntoIterator<Item = String>,
        prefixes: impl IntoIterator<Item = String>,
    ) -> Masker {
        Masker { values: ValueMasker::new(values), tokens: TokenMasker::new(prefixes) }
    }

    /// Masks `input` as the continuation of everything pushed before, appending what is decided to
    /// `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut values_masked = Vec::with_capacity(input.len());
        self.values.push(input, &mut values_masked);
        self.tokens.push(&values_masked, out);
    }

    /// Ends the stream: everything held back is masked as it is and emitted.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        let mut values_masked = Vec::new();
        self.values.flush(&mut values_masked);
        self.tokens.push(&values_masked, out);
        self.tokens.flush(out);
    }

    /// Masks a complete text in one go (host lines, rendered objects), independent of the stream.
    pub fn mask(&self, input: &[u8]) -> Vec<u8> {
        let mut tokens = self.tokens.fresh();
        let mut out = Vec::with_capacity(input.len());
        tokens.push(&self.values.mask(input), &mut out);
        tokens.flush(&mut out);
        out
    }

    /// [`Masker::mask`] for text.
    pub fn mask_str(&self, input: &str) -> String {
        // Masking replaces whole matches of UTF-8 strings with ASCII, and a token's characters
        // are ASCII, so the result is UTF-8 again.
        String::from_utf8_lossy(&self.mask(input.as_bytes())).into_owned()
    }

    /// Number of bytes held back, waiting for the next byte to decide whether a secret starts.
    pub fn pending_len(&self) -> usize {
        self.values.pending_len() + self.tokens.pending.len()
    }
}

/// Masks what follows a known token prefix: `glpat-abc123` becomes `glpat-[MASKED]`, as GitLab
/// shows it. A token is the run of `[A-Za-z0-9_-]` after the prefix; a prefix with nothing of
/// that after it is left alone.
#[derive(Debug, Clone)]
struct TokenMasker {
    matcher: Option<AhoCorasick>,
    prefixes: Vec<Vec<u8>>,
    /// Bytes held back: the start of a possible prefix, or a whole prefix waiting for its next byte.
    pending: Vec<u8>,
    /// Inside a token already masked: its remaining characters are dropped, also across pushes.
    in_token: bool,
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

impl TokenMasker {
    fn new(prefixes: impl IntoIterator<Item = String>) -> TokenMasker {
        let prefixes: Vec<Vec<u8>> = prefixes
            .into_iter()
            .filter(|p| !p.is_empty())
            .map(String::into_bytes)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let matcher = (!prefixes.is_empty()).then(|| {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&prefixes)
                .expect("a few token prefixes always build")
        });
        TokenMasker { matcher, prefixes, pending: Vec::new(), in_token: false }
    }

    /// The same masker with no stream state.
    fn fresh(&self) -> TokenMasker {
        TokenMasker { pending: Vec::new(), in_token: false, ..self.clone() }
    }

    fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let Some(matcher) = self.matcher.clone() else {
            out.extend_from_slice(input);
            return;
        };
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(input);
        let mut pos = 0;
        if self.in_token {
            pos = skip_token(&buf, pos);
            if pos == buf.len() {
                return;
            }
            self.in_token = false;
        }
        while pos < buf.len() {
            let Some(m) = matcher.find(&buf[pos..]) else {
                // No whole prefix: hold back a tail that may still become one.
                let hold = (pos..buf.len()).find(|&at| self.is_proper_prefix(&buf[at..])).unwrap_or(buf.len());
                out.extend_from_slice(&buf[pos..hold]);
                self.pending = buf[hold..].to_vec();
                return;
            };
            let (start, end) = (pos + m.start(), pos + m.end());
            if end == buf.len() {
                // Whether a token follows is decided by the next byte.
                out.extend_from_slice(&buf[pos..start]);
                self.pending = buf[start..].to_vec();
                return;
            }
            if !is_token_byte(buf[end]) {
                out.extend_from_slice(&buf[pos..end]);
                pos = end;
                continue;
            }
            out.extend_from_slice(&buf[pos..end]);
            out.extend_from_slice(MASK);
            pos = skip_token(&buf, end);
            if pos == buf.len() {
                self.in_token = true;
                return;
            }
        }
    }

    fn flush(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&std::mem::take(&mut self.pending));
        self.in_token = false;
    }

    /// Whether `tail` is the start of some prefix longer than it.
    fn is_proper_prefix(&self, tail: &[u8]) -> bool {
        self.prefixes.iter().any(|p| p.len() > tail.len() && p.starts_with(tail))
    }
}

fn skip_token(buf: &[u8], mut pos: usize) -> usize {
    while pos < buf.len() && is_token_byte(buf[pos]) {
        pos += 1;
    }
    pos
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small deterministic PRNG (xorshift64*), so the property tests need no extra crate and
    /// a failure reproduces from its seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Independent oracle: leftmost-longest replacement over the whole input, by brute force.
    fn naive_mask(secrets: &[String], input: &[u8]) -> Vec<u8> {
        let secrets: Vec<&[u8]> = secrets.iter().map(|s| s.as_bytes()).filter(|s| !s.is_empty()).collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < input.len() {
            let longest = secrets.iter().filter(|s| input[i..].starts_with(s)).map(|s| s.len()).max();
            match longest {
                Some(len) => {
                    out.extend_from_slice(MASK);
                    i += len;
                }
                None => {
                    out.push(input[i]);
                    i += 1;
                }
            }
        }
        out
    }

    fn stream(masker: &mut Masker, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            masker.push(c, &mut out);
        }
        masker.flush(&mut out);
        out
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
    }

    fn secrets(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn masks_whole_and_split_values() {
        let mut m = Masker::new(secrets(&["hunter2"]));
        assert_eq!(stream(&mut m, &[b"pw=hunter2!"]), b"pw=[MASKED]!");
        let bytes: Vec<&[u8]> = b"pw=hunter2!".chunks(1).collect();
        assert_eq!(stream(&mut m, &bytes), b"pw=[MASKED]!");
        assert_eq!(stream(&mut m, &[b"pw=hun", b"ter", b"2!"]), b"pw=[MASKED]!");
    }

    #[test]
    fn output_is_live() {
        let mut m = Masker::new(secrets(&["hunter2"]));
        let mut out = Vec::new();
        m.push(b".", &mut out);
        assert_eq!(out, b".", "a byte that starts no secret is emitted at once");
        m.push(b"hun", &mut out);
        assert_eq!(out, b".", "a possible secret start is held");
        assert_eq!(m.pending_len(), 3);
        // (`k`: a `g` would be held by the token stage, as the start of `glpat-`.)
        m.push(b"k", &mut out);
        assert_eq!(out, b".hunk", "held bytes go out as soon as the next byte decides");
        m.push(b"xhunter2", &mut out);
        assert_eq!(out, b".hunkx[MASKED]", "a complete longest secret is emitted at once");
        assert_eq!(m.pending_len(), 0);
        // The tail "hu" of "xhu" is held, the "x" before it is not.
        m.push(b"xhu", &mut out);
        assert_eq!(out, b".hunkx[MASKED]x");
        m.flush(&mut out);
        assert_eq!(out, b".hunkx[MASKED]xhu");
    }

    #[test]
    fn longest_match_wins_and_waits_for_it() {
        let mut m = Masker::new(secrets(&["abc", "abcdef"]));
        let mut out = Vec::new();
        m.push(b"abc", &mut out);
        assert_eq!(out, b"", "abc could still become abcdef");
        m.push(b"de", &mut out);
        m.push(b"f", &mut out);
        assert_eq!(out, b"[MASKED]");
        m.push(b"abcdx", &mut out);
        assert_eq!(out, b"[MASKED][MASKED]dx");
        // An earlier start beats a complete later match.
        let mut m = Masker::new(secrets(&["xyz123", "yz"]));
        assert_eq!(stream(&mut m, &[b"xyz", b"123"]), b"[MASKED]");
        assert_eq!(stream(&mut m, &[b"xyz", b"12"]), b"x[MASKED]12");
    }

    #[test]
    fn ignores_empty_and_duplicate_values() {
        let mut m = Masker::new(secrets(&["", "s3", "s3"]));
        assert_eq!(stream(&mut m, &[b"as3b"]), b"a[MASKED]b");
        let mut none = Masker::new(secrets(&[""]));
        assert_eq!(stream(&mut none, &[b"abc"]), b"abc");
    }

    #[test]
    fn works_on_arbitrary_bytes() {
        let mut m = Masker::new(vec!["é€".to_string()]);
        let text = "x é€ y".as_bytes();
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(stream(&mut m, &bytes), b"x [MASKED] y");
        let raw: &[u8] = &[0xff, 0x00, 0xc3, 0xa9, 0xe2];
        assert_eq!(stream(&mut m, &[raw]), raw);
    }

    #[test]
    fn random_streams_equal_whole_masking() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // A tiny alphabet makes overlaps, shared prefixes and near misses common.
        let alphabet = b"ab\nc";
        for case in 0..3000 {
            let n_secrets = 1 + rng.below(4);
            let secrets: Vec<String> = (0..n_secrets)
                .map(|_| {
                    let len = rng.below(6);
                    (0..len).map(|_| alphabet[rng.below(alphabet.len())] as char).collect()
                })
                .collect();
            let text: Vec<u8> = (0..rng.below(60)).map(|_| alphabet[rng.below(alphabet.len())]).collect();
            let mut chunks = Vec::new();
            let mut rest = &text[..];
            while !rest.is_empty() {
                let at = rng.below(rest.len().min(8) + 1);
                let (c, r) = rest.split_at(at);
                chunks.push(c);
                rest = r;
            }
            let expected = naive_mask(&secrets, &text);
            let mut m = Masker::new(secrets.clone());
            let got = stream(&mut m, &chunks);
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&expected),
                "case {case}: secrets {secrets:?} chunks {chunks:?}"
            );
            let whole = Masker::new(secrets.clone()).mask(&text);
            assert_eq!(got, whole, "case {case}: streaming differs from mask()");
            for s in secrets.iter().filter(|s| !s.is_empty()) {
                // "[MASKED]" shares no byte with the alphabet, so a secret seen is a secret leaked.
                assert!(!contains(&got, s.as_bytes()), "case {case}: {s:?} leaked in {got:?}");
            }
        }
    }

    #[test]
    fn random_byte_streams_never_leak() {
        let mut rng = Rng(42);
        for case in 0..500 {
            let secrets: Vec<String> = (0..1 + rng.below(3))
                .map(|_| (0..1 + rng.below(10)).map(|_| (b'a' + rng.below(3) as u8) as char).collect())
                .collect();
            let text: Vec<u8> = (0..rng.below(400))
                .map(|_| if rng.below(4) == 0 { rng.below(256) as u8 } else { b'a' + rng.below(3) as u8 })
                .collect();
            let mut m = Masker::new(secrets.clone());
            let mut out = Vec::new();
            for b in text.chunks(1) {
                m.push(b, &mut out);
            }
            m.flush(&mut out);
            assert_eq!(out, naive_mask(&secrets, &text), "case {case}");
        }
    }

    #[test]
    fn tokens_masked_by_prefix_whole_and_split() {
        let text = b"push with glpat-AbC_12-x9 done; glcbt-\nglrt-; xglpat-q.";
        let want = b"push with glpat-[MASKED] done; glcbt-\nglrt-; xglpat-[MASKED].".to_vec();
        assert_eq!(Masker::new(Vec::new()).mask(text), want);
        for split in 0..text.len() {
            let mut m = Masker::new(Vec::new());
            assert_eq!(stream(&mut m, &[&text[..split], &text[split..]]), want, "split at {split}");
        }
        let mut m = Masker::new(Vec::new());
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(stream(&mut m, &bytes), want);
    }

    #[test]
    fn token_prefix_output_stays_live() {
        let mut m = Masker::new(Vec::new());
        let mut out = Vec::new();
        m.push(b"token glpa", &mut out);
        assert_eq!(out, b"token ");
        m.push(b"t-secret", &mut out);
        assert_eq!(out, b"token glpat-[MASKED]");
        m.push(b"more\nnext", &mut out);
        assert_eq!(out, b"token glpat-[MASKED]\nnext");
    }

    #[test]
    fn values_and_tokens_together() {
        let m = Masker::with_token_prefixes(secrets(&["hunter2"]), vec!["tok-".to_string()]);
        assert_eq!(m.mask_str("a hunter2 tok-hunter2x glpat-zz"), "a [MASKED] tok-[MASKED]x glpat-zz");
    }
}
