//! `include:` of a `.gitlab-ci.yml`, as GitLab merges it, for the files keel can read: `local`
//! ones (a path, or a string that is not a URL), relative to the including file's project
//! directory (a leading `/` is that directory too), `*` patterns matching its files. Included
//! files are merged in order, then the including file over them: mappings merge key by key,
//! anything else is replaced, as GitLab's deep merge does. Included files may include others
//! (each file once; at most [`MAX_FILES`], GitLab's default limit). `remote`, `project`,
//! `template` and `component` need GitLab and are refused by name, as are `rules` on an entry.
//!
//! The result is the merged document as YAML text; without `include:` the text is returned
//! unchanged, so line numbers in errors stay the file's own.

use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

use super::parse::JobError;
use crate::input::{Located, limits, read_text_file};

/// How many files one pipeline may include, as GitLab's default `ci_max_includes`.
pub const MAX_FILES: usize = 150;

/// `text` (the file at `path`) with its `include:` entries merged in; `Ok(None)` when it has none.
pub fn expand(path: &Path, text: &str) -> Result<Option<String>, JobError> {
    if !text.contains("include") {
        return Ok(None);
    }
    let invalid = |key: String, message: String| JobError::Invalid { at: Located::key(path, key), message };
    let tree: Value = serde_yaml_ng::from_str(text).map_err(|e| invalid("(document)".into(), e.to_string()))?;
    if !tree.as_mapping().is_some_and(|m| m.contains_key("include")) {
        return Ok(None);
    }
    let project = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut state = State { project, seen: vec![path.to_path_buf()], bytes: text.len() };
    let merged = state.resolve(path, tree)?;
    serde_yaml_ng::to_string(&merged).map(Some).map_err(|e| invalid("(document)".into(), e.to_string()))
}

struct State {
    project: PathBuf,
    /// Files read so far (each is read once).
    seen: Vec<PathBuf>,
    /// Their total size, held to the limit of one file.
    bytes: usize,
}

impl State {
    /// `tree` (read from `path`) with its includes merged under it, `include` removed.
    fn resolve(&mut self, path: &Path, mut tree: Value) -> Result<Value, JobError> {
        let invalid = |key: String, message: String| JobError::Invalid { at: Located::key(path, key), message };
        let Some(top) = tree.as_mapping_mut() else { return Ok(tree) };
        let Some(include) = top.remove("include") else { return Ok(tree) };
        let entries: Vec<Value> = match include {
            Value::Sequence(s) => s,
            one => vec![one],
        };
        let mut base = Value::Mapping(Mapping::new());
        for (i, entry) in entries.into_iter().enumerate() {
            let key = format!("include[{i}]");
            for file in self.files(path, &key, &entry)? {
                if self.seen.contains(&file) {
                    continue;
                }
                if self.seen.len() >= MAX_FILES {
                    return Err(invalid(key, format!("more than {MAX_FILES} included files (GitLab's limit)")));
                }
                let text = read_text_file(&file, limits::YAML_BYTES)
                    .map_err(|e| invalid(key.clone(), format!("cannot read included file {}: {e}", file.display())))?;
                self.bytes += text.len();
                if self.bytes > limits::YAML_BYTES {
                    return Err(invalid(
                        key,
                        format!("the included files are over {} together (the limit of one file)", limits::YAML_BYTES),
                    ));
                }
                self.seen.push(file.clone());
                let included: Value = serde_yaml_ng::from_str(&text)
                    .map_err(|e| JobError::Invalid { at: Located::key(&file, "(document)"), message: e.to_string() })?;
                if !included.is_mapping() {
                    return Err(JobError::Invalid {
                        at: Located::key(&file, "(document)"),
                        message: "an included file must be a mapping of jobs and global keywords".into(),
                    });
                }
                let included = self.resolve(&file, included)?;
                merge(&mut base, included);
            }
        }
        merge(&mut base, tree);
        Ok(base)
    }

    /// The files one entry names.
    fn files(&self, path: &Path, key: &str, entry: &Value) -> Result<Vec<PathBuf>, JobError> {
        let invalid = |message: String| JobError::Invalid { at: Located::key(path, key.to_string()), message };
        let local = match entry {
            Value::String(s) if s.contains("://") => {
                return Err(invalid(format!(
                    "{s:?} is a remote include, which needs GitLab; `host run` reads local files only"
                )));
            }
            Value::String(s) => s.clone(),
            Value::Mapping(m) => {
                for kind in ["remote", "project", "template", "component"] {
                    if m.contains_key(kind) {
                        return Err(invalid(format!(
                            "`include:{kind}` needs GitLab; `host run` reads `local` files only"
                        )));
                    }
                }
                if m.contains_key("rules") {
                    return Err(invalid("`rules` on an include are not supported by keel".into()));
                }
                match m.get("local").and_then(Value::as_str) {
                    Some(l) => l.to_string(),
                    None => return Err(invalid("expected `local: <path>` (or a path)".into())),
                }
            }
            _ => return Err(invalid("expected a path or `local: <path>`".into())),
        };
        let relative = local.trim_start_matches('/').trim_start_matches("./");
        if relative.split('/').any(|c| c == "..") {
            return Err(invalid(format!("{local:?} leaves the project directory")));
        }
        if !relative.contains('*') {
            return Ok(vec![self.project.join(relative)]);
        }
        let files = crate::vocab::files::project_files(&self.project);
        let found = crate::vocab::files::matching(&files, relative).map_err(|e| invalid(format!("{local:?}: {e}")))?;
        if found.is_empty() {
            return Err(invalid(format!("{local:?} matches no file")));
        }
        let mut found: Vec<PathBuf> = found.iter().map(|f| self.project.join(f)).collect();
        // In path order (component by component), the order included files merge in.
        found.sort();
        Ok(found)
    }
}

/// GitLab's deep merge: `over`'s keys win; where both are mappings they merge.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) if existing.is_mapping() && v.is_mapping() => merge(existing, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn local_includes_merge_under_the_including_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ci/base.yml", "include: ci/more.yml\nvariables: {A: base, B: base}\n.t: {image: alpine}\n");
        write(dir.path(), "ci/more.yml", "lint:\n  script: [echo lint]\n");
        let main = write(
            dir.path(),
            ".gitlab-ci.yml",
            "include:\n  - local: /ci/base.yml\n  - ci/base.yml\nvariables: {B: main}\nbuild:\n  extends: .t\n  script: [make]\n",
        );
        let text = std::fs::read_to_string(&main).unwrap();
        let merged: Value = serde_yaml_ng::from_str(&expand(&main, &text).unwrap().unwrap()).unwrap();
        assert_eq!(merged["variables"]["A"], "base");
        assert_eq!(merged["variables"]["B"], "main", "the including file wins");
        assert_eq!(merged[".t"]["image"], "alpine");
        assert!(merged.get("lint").is_some(), "nested includes are read");
        assert!(merged.get("include").is_none());
        // Without `include:` nothing changes.
        assert_eq!(expand(&main, "build:\n  script: [make]\n").unwrap(), None);
    }

    #[test]
    fn what_needs_gitlab_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join(".gitlab-ci.yml");
        let err = |text: &str| expand(&main, text).unwrap_err().to_string();
        assert!(err("include:\n  - project: g/p\n    file: x.yml\n").contains("`include:project` needs GitLab"));
        assert!(err("include: https://example.com/ci.yml\n").contains("is a remote include"));
        assert!(err("include: ../outside.yml\n").contains("leaves the project directory"));
        let missing = err("include: nope.yml\n");
        assert!(missing.contains("key `include[0]`") && missing.contains("cannot read included file"), "{missing}");
        assert!(err("include: 'ci/*.yml'\n").contains("matches no file"));
    }

    #[test]
    fn patterns_and_cycles() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ci/a.yml", "include: ci/b.yml\na:\n  script: [a]\n");
        write(dir.path(), "ci/b.yml", "include: ci/a.yml\nb:\n  script: [b]\n");
        let main = write(dir.path(), ".gitlab-ci.yml", "include: 'ci/*.yml'\n");
        let text = std::fs::read_to_string(&main).unwrap();
        let merged: Value = serde_yaml_ng::from_str(&expand(&main, &text).unwrap().unwrap()).unwrap();
        assert!(merged.get("a").is_some() && merged.get("b").is_some());
    }
}
