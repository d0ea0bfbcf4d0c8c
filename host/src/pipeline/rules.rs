//! `rules:` for `host run`'s pipelines: the first rule whose `if`, `exists` and `changes` all
//! hold decides the job's `when` (and `allow_failure`); no matching rule leaves the job out, as
//! GitLab does. `if:` is GitLab's CI/CD variable expression language: `$VAR` (set and not
//! empty), `==`/`!=` against a string, another variable or `null`, `=~`/`!~` against a
//! `/regex/flags`, `&&` (binding tighter than `||`), parentheses. `exists:` globs the source
//! directory; `changes:` globs what git reports as changed in it (uncommitted or untracked), and
//! holds for every file when the directory is not a git checkout, as GitLab's `changes` holds
//! when it has nothing to compare with.

use std::collections::BTreeMap;
use std::path::Path;

use globset::{Glob, GlobSet, GlobSetBuilder};
use regex::RegexBuilder;
use serde_yaml_ng::Value;

/// What a rule needs to know about the run.
pub struct Facts<'a> {
    pub variables: &'a BTreeMap<String, String>,
    /// Files of the source directory, relative, `/`-separated.
    pub files: &'a [String],
    /// Files git reports as changed; `None`: not a git checkout (everything counts as changed).
    pub changed: Option<&'a [String]>,
}

/// What the matching rule says; `None` from [`evaluate`]: no rule matched, the job is left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// `on_success`, `on_failure`, `always`, `manual`, `never` (GitLab's words).
    pub when: Option<String>,
    pub allow_failure: Option<bool>,
}

/// Evaluates `rules` (the job's `rules:` value).
pub fn evaluate(rules: &Value, facts: &Facts<'_>) -> Result<Option<Decision>, String> {
    let list = rules.as_sequence().ok_or("expected a list of rules")?;
    for (i, rule) in list.iter().enumerate() {
        let rule =
            rule.as_mapping().ok_or(format!("rule {i}: expected a mapping with `if`, `exists`, `changes`, `when`"))?;
        let mut holds = true;
        if let Some(cond) = rule.get("if") {
            let text = cond.as_str().ok_or(format!("rule {i}: `if` is not a string"))?;
            holds &= expression(text, facts.variables).map_err(|e| format!("rule {i}: `if: {text}`: {e}"))?;
        }
        if holds && let Some(patterns) = rule.get("exists") {
            holds &= any_match(patterns, facts.files).map_err(|e| format!("rule {i}: `exists`: {e}"))?;
        }
        if holds && let Some(patterns) = rule.get("changes") {
            holds &= match facts.changed {
                None => true,
                Some(changed) => any_match(patterns, changed).map_err(|e| format!("rule {i}: `changes`: {e}"))?,
            };
        }
        if holds {
            return Ok(Some(Decision {
                when: rule.get("when").and_then(Value::as_str).map(str::to_string),
                allow_failure: rule.get("allow_failure").and_then(Value::as_bool),
            }));
        }
    }
    Ok(None)
}

/// `exists`/`changes`: a list of globs, or `{paths: [...]}`.
fn any_match(patterns: &Value, files: &[String]) -> Result<bool, String> {
    let list = match patterns {
        Value::Mapping(m) => m.get("paths").cloned().unwrap_or(Value::Null),
        other => other.clone(),
    };
    let globs: Vec<String> = match &list {
        Value::String(s) => vec![s.clone()],
        Value::Sequence(items) => items.iter().filter_map(|i| i.as_str().map(str::to_string)).collect(),
        _ => return Err("expected a list of paths".into()),
    };
    let mut set = GlobSetBuilder::new();
    for g in &globs {
        set.add(Glob::new(g.trim_start_matches("./")).map_err(|e| format!("{g:?}: {e}"))?);
    }
    let set: GlobSet = set.build().map_err(|e| e.to_string())?;
    Ok(files.iter().any(|f| set.is_match(f)))
}

/// Files git reports as changed in `dir` (modified, added, untracked); `None` outside git.
pub fn changed_files(dir: &Path) -> Option<Vec<String>> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["status", "--porcelain", "--no-renames", "--untracked-files=all", "--relative", "."])
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.get(3..).map(str::to_string)).collect())
}

// --- the expression language ---------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Var(String),
    Str(String),
    Null,
    Regex(String, String),
    Eq,
    Ne,
    Match,
    NoMatch,
    And,
    Or,
    Open,
    Close,
}

fn tokens(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        match c {
            ' ' | '\t' | '\n' => i += 1,
            '(' => {
                out.push(Token::Open);
                i += 1;
            }
            ')' => {
                out.push(Token::Close);
                i += 1;
            }
            '$' => {
                let braced = chars.get(i + 1) == Some(&'{');
                let start = if braced { i + 2 } else { i + 1 };
                let mut end = start;
                while end < chars.len() && (chars[end].is_ascii_alphanumeric() || chars[end] == '_') {
                    end += 1;
                }
                if end == start {
                    return Err(format!("a `$` without a variable name at {i}"));
                }
                out.push(Token::Var(chars[start..end].iter().collect()));
                i = if braced { end + 1 } else { end };
            }
            '"' | '\'' => {
                let end = chars[i + 1..].iter().position(|&q| q == c).ok_or("an unterminated string")? + i + 1;
                out.push(Token::Str(chars[i + 1..end].iter().collect()));
                i = end + 1;
            }
            '/' => {
                // A regex runs to the next unescaped `/`; flags follow.
                let mut end = i + 1;
                while end < chars.len() && (chars[end] != '/' || chars[end - 1] == '\\') {
                    end += 1;
                }
                if end >= chars.len() {
                    return Err("an unterminated /regex/".into());
                }
                let mut flags_end = end + 1;
                while flags_end < chars.len() && chars[flags_end].is_ascii_alphabetic() {
                    flags_end += 1;
                }
                out.push(Token::Regex(chars[i + 1..end].iter().collect(), chars[end + 1..flags_end].iter().collect()));
                i = flags_end;
            }
            _ if two == "==" => {
                out.push(Token::Eq);
                i += 2;
            }
            _ if two == "!=" => {
                out.push(Token::Ne);
                i += 2;
            }
            _ if two == "=~" => {
                out.push(Token::Match);
                i += 2;
            }
            _ if two == "!~" => {
                out.push(Token::NoMatch);
                i += 2;
            }
            _ if two == "&&" => {
                out.push(Token::And);
                i += 2;
            }
            _ if two == "||" => {
                out.push(Token::Or);
                i += 2;
            }
            _ if chars[i..].iter().take(4).collect::<String>() == "null" => {
                out.push(Token::Null);
                i += 4;
            }
            _ => return Err(format!("unexpected {c:?} at {i}")),
        }
    }
    Ok(out)
}

/// A value on either side of a comparison: `None` is GitLab's `null` (an unset variable).
type Operand = Option<String>;

struct Parser<'a> {
    tokens: Vec<Token>,
    at: usize,
    vars: &'a BTreeMap<String, String>,
}

/// Evaluates an `if:` expression against `vars`.
pub fn expression(text: &str, vars: &BTreeMap<String, String>) -> Result<bool, String> {
    let mut p = Parser { tokens: tokens(text)?, at: 0, vars };
    let value = p.or()?;
    if p.at != p.tokens.len() {
        return Err(format!("unexpected {:?}", p.tokens[p.at]));
    }
    Ok(value)
}

impl Parser<'_> {
    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn or(&mut self) -> Result<bool, String> {
        let mut value = self.and()?;
        while self.peek() == Some(&Token::Or) {
            self.at += 1;
            value |= self.and()?;
        }
        Ok(value)
    }

    fn and(&mut self) -> Result<bool, String> {
        let mut value = self.comparison()?;
        while self.peek() == Some(&Token::And) {
            self.at += 1;
            value &= self.comparison()?;
        }
        Ok(value)
    }

    fn comparison(&mut self) -> Result<bool, String> {
        if self.peek() == Some(&Token::Open) {
            self.at += 1;
            let value = self.or()?;
            return match self.next() {
                Some(Token::Close) => Ok(value),
                _ => Err("a `(` without its `)`".into()),
            };
        }
        let left = self.operand()?;
        match self.peek().cloned() {
            Some(Token::Eq | Token::Ne) => {
                let negate = self.next() == Some(Token::Ne);
                let right = self.operand()?;
                Ok((left == right) != negate)
            }
            Some(Token::Match | Token::NoMatch) => {
                let negate = self.next() == Some(Token::NoMatch);
                let (pattern, flags) = match self.next() {
                    Some(Token::Regex(p, f)) => (p, f),
                    // GitLab also takes a variable holding `/regex/`.
                    Some(Token::Var(v)) => {
                        let text = self.vars.get(&v).cloned().unwrap_or_default();
                        let inner = text.strip_prefix('/').and_then(|t| t.rsplit_once('/'));
                        match inner {
                            Some((p, f)) => (p.to_string(), f.to_string()),
                            None => return Err(format!("${v} does not hold a /regex/")),
                        }
                    }
                    _ => return Err("`=~` needs a /regex/".into()),
                };
                let re = RegexBuilder::new(&pattern)
                    .case_insensitive(flags.contains('i'))
                    .multi_line(flags.contains('m'))
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| format!("/{pattern}/: {e}"))?;
                Ok(left.is_some_and(|l| re.is_match(&l)) != negate)
            }
            // A lone operand: true when set and not empty.
            _ => Ok(left.is_some_and(|l| !l.is_empty())),
        }
    }

    fn operand(&mut self) -> Result<Operand, String> {
        match self.next() {
            Some(Token::Var(v)) => Ok(self.vars.get(&v).cloned()),
            Some(Token::Str(s)) => Ok(Some(s)),
            Some(Token::Null) => Ok(None),
            other => Err(format!("expected a $VARIABLE, a string or null, found {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> BTreeMap<String, String> {
        [("CI_COMMIT_BRANCH", "main"), ("CI_PIPELINE_SOURCE", "push"), ("EMPTY", ""), ("RE", "/^ma/")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn expressions_as_gitlab_reads_them() {
        let v = vars();
        let t = |e: &str| expression(e, &v).unwrap_or_else(|err| panic!("{e}: {err}"));
        assert!(t("$CI_COMMIT_BRANCH == \"main\""));
        assert!(t("$CI_COMMIT_BRANCH != 'dev'"));
        assert!(!t("$EMPTY") && !t("$UNSET") && t("$CI_COMMIT_BRANCH"));
        assert!(t("$UNSET == null") && !t("$EMPTY == null"));
        assert!(t("$CI_COMMIT_BRANCH =~ /^MA/i") && t("$CI_COMMIT_BRANCH !~ /^dev/"));
        assert!(t("$CI_COMMIT_BRANCH =~ $RE"));
        assert!(t("$UNSET || $CI_PIPELINE_SOURCE == \"push\" && $CI_COMMIT_BRANCH"));
        assert!(!t("($UNSET || $CI_PIPELINE_SOURCE == \"push\") && $EMPTY"));
        assert!(t("${CI_COMMIT_BRANCH} == $CI_COMMIT_BRANCH"));
        for bad in ["$A ==", "(\"x\"", "$A =~ \"x\"", "$A == /x", "%"] {
            assert!(expression(bad, &v).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn first_matching_rule_decides() {
        let v = vars();
        let files = vec!["Cargo.toml".to_string(), "src/main.rs".to_string()];
        let changed = vec!["src/main.rs".to_string()];
        let facts = Facts { variables: &v, files: &files, changed: Some(&changed) };
        let rules = |y: &str| serde_yaml_ng::from_str::<Value>(y).unwrap();
        let d = evaluate(&rules("[{if: '$UNSET', when: always}, {if: '$CI_COMMIT_BRANCH', when: manual}]"), &facts);
        assert_eq!(d.unwrap().unwrap().when.as_deref(), Some("manual"));
        assert_eq!(evaluate(&rules("[{if: '$UNSET'}]"), &facts).unwrap(), None, "no match: left out");
        assert!(evaluate(&rules("[{exists: [Cargo.toml]}]"), &facts).unwrap().is_some());
        assert!(evaluate(&rules("[{exists: ['*.lock']}]"), &facts).unwrap().is_none());
        assert!(
            evaluate(&rules("[{changes: ['src/**/*.rs'], allow_failure: true}]"), &facts)
                .unwrap()
                .unwrap()
                .allow_failure
                == Some(true)
        );
        assert!(evaluate(&rules("[{changes: {paths: [Cargo.toml]}}]"), &facts).unwrap().is_none());
        let no_git = Facts { changed: None, ..facts };
        assert!(evaluate(&rules("[{changes: [Cargo.toml]}]"), &no_git).unwrap().is_some());
        assert!(evaluate(&rules("[{if: '$A =='}]"), &no_git).unwrap_err().contains("rule 0"));
    }
}
