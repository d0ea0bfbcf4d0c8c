//! GitLab's `$VAR` expansion, bounded.

use std::collections::HashMap;

/// An expansion that grew past its limit, with what it had produced by then.
#[derive(Debug)]
pub struct TooLong(pub String);

/// [`expand`], failing as soon as the result would exceed `max` bytes. Each variable is looked
/// up once per call, however often the text refers to it.
pub fn expand_limited(s: &str, lookup: &dyn Fn(&str) -> Option<String>, max: usize) -> Result<String, TooLong> {
    let mut out = String::with_capacity(s.len().min(max));
    let mut seen: HashMap<&str, Option<String>> = HashMap::new();
    let push = |out: &mut String, text: &str| {
        if out.len() + text.len() > max {
            let mut end = max.saturating_sub(out.len()).min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            out.push_str(&text[..end]);
            return Err(());
        }
        out.push_str(text);
        Ok(())
    };
    let bytes = s.as_bytes();
    let mut i = 0;
    let result = (|| {
        while i < s.len() {
            // Copy the run up to the next `$` at once.
            let run = s[i..].find('$').unwrap_or(s.len() - i);
            if run > 0 {
                push(&mut out, &s[i..i + run])?;
                i += run;
                continue;
            }
            debug_assert_eq!(bytes[i], b'$');
            let rest = &s[i + 1..];
            let name = if rest.starts_with('$') {
                push(&mut out, "$")?;
                i += 2;
                continue;
            } else if let Some(r) = rest.strip_prefix('{') {
                match r.find('}') {
                    Some(end) => {
                        i += 2 + end + 1;
                        &r[..end]
                    }
                    None => {
                        push(&mut out, &s[i..])?;
                        break;
                    }
                }
            } else {
                let len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
                if len == 0 {
                    push(&mut out, "$")?;
                    i += 1;
                    continue;
                }
                i += 1 + len;
                &rest[..len]
            };
            let value = seen.entry(name).or_insert_with(|| lookup(name));
            if let Some(v) = value {
                push(&mut out, v)?;
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(out),
        Err(()) => Err(TooLong(out)),
    }
}
