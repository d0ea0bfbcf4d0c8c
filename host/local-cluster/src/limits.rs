//! What one request may cost, so no single client can take the server down: the limits a real
//! API server (and its etcd) enforces, and a nesting bound for bodies.

/// kube-apiserver's `--max-request-body-bytes` default (3 MiB); larger bodies get 413.
pub const MAX_REQUEST_BODY: usize = 3 * 1024 * 1024;

/// etcd's default request limit (1.5 MiB), which bounds every stored object; a create, update
/// or patch whose result is larger is refused (413) instead of stored.
pub const MAX_OBJECT: usize = 1536 * 1024;

/// kube-apiserver's limit on the operations of one JSON patch.
pub const MAX_JSON_PATCH_OPERATIONS: usize = 10_000;

/// How much a JSON patch's `copy` operations may add up to: the request body limit, as the real
/// server passes it to its JSON patch library (each copy can double an object otherwise).
pub const MAX_JSON_PATCH_COPIED: usize = MAX_REQUEST_BODY;

/// Nesting levels a YAML body may have, checked before parsing: libyaml is quadratic in deep
/// flow nesting, and a recursive decoder would need a stack for each level. serde_json already
/// stops JSON bodies at 128 levels; real objects nest far less.
pub const MAX_DEPTH: usize = 128;

/// The deepest nesting in a YAML (or JSON) document, by a linear scan that needs no parser:
/// flow collections (`[`, `{`) count one level each, block collections one per indentation step
/// or `- ` item marker. Quoted scalars and comments are skipped; block scalars' lines count as
/// one level deeper than their key, which can only overestimate by one.
pub fn yaml_depth(body: &[u8]) -> usize {
    let mut max = 0usize;
    // Block indentation levels open on the current line's path.
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    let mut quote: Option<u8> = None;
    for line in body.split(|b| *b == b'\n') {
        let mut i = 0;
        if flow == 0 && quote.is_none() {
            // Leading spaces and sequence markers: the block structure of this line.
            let mut markers = 0;
            loop {
                while line.get(i) == Some(&b' ') {
                    i += 1;
                }
                if line.get(i) == Some(&b'-') && matches!(line.get(i + 1), Some(b' ') | None) {
                    markers += 1;
                    i += 1;
                } else {
                    break;
                }
            }
            let blank = line[i..].iter().all(|b| b.is_ascii_whitespace()) || line.get(i) == Some(&b'#');
            if !blank {
                let indent = i;
                while indents.last().is_some_and(|top| *top >= indent) {
                    indents.pop();
                }
                indents.push(indent);
                max = max.max(indents.len() + markers);
            }
        }
        let mut prev = b' ';
        while let Some(&b) = line.get(i) {
            match quote {
                Some(q) => {
                    if b == b'\\' && q == b'"' {
                        i += 1;
                    } else if b == q {
                        quote = None;
                    }
                }
                None => match b {
                    b'"' | b'\'' if matches!(prev, b' ' | b'[' | b'{' | b',' | b':') => quote = Some(b),
                    b'#' if prev == b' ' || prev == b'\t' => break,
                    b'[' | b'{' => {
                        flow += 1;
                        max = max.max(indents.len() + flow);
                    }
                    b']' | b'}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            prev = b;
            i += 1;
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_flow_and_block_nesting_and_skips_strings() {
        assert_eq!(yaml_depth(b"a: 1\nb: 2\n"), 1);
        assert_eq!(yaml_depth(b"a:\n  b:\n    c: 1\n"), 3);
        assert_eq!(yaml_depth(b"spec:\n  containers:\n  - name: c\n    args: [\"[[[[\", '{{{{']\n"), 4);
        assert_eq!(yaml_depth(b"a: [[[[1]]]]\n"), 5);
        assert_eq!(yaml_depth(b"# [[[[[[\na: 1 # {{{{{\n"), 1);
        let deep = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(yaml_depth(deep.as_bytes()), 100_001);
        let mut block = String::new();
        for i in 0..200 {
            block.push_str(&" ".repeat(i));
            block.push_str("k:\n");
        }
        assert_eq!(yaml_depth(block.as_bytes()), 200);
        assert_eq!(yaml_depth(b"- - - - x\n"), 5);
        assert_eq!(yaml_depth(br#"{"a": {"b": "}}}\"{{"}}"#), 3);
    }
}
