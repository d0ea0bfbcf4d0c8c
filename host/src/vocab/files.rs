//! The project's files as GitLab's file patterns see them (`rules:exists`, `include` and
//! `cache:key:files` wildcards): GitLab matches them against the repository's tree, so here
//! every file below the project directory, relative and `/`-separated, less `.git` (which a
//! tree never holds) and what git's ignore rules exclude.

use std::path::Path;

/// Every file below `dir`, in walk order.
pub fn project_files(dir: &Path) -> Vec<String> {
    ignore::WalkBuilder::new(dir)
        .hidden(false)
        .require_git(false)
        .filter_entry(|e| e.file_name() != ".git")
        .build()
        .flatten()
        .filter(|e| e.file_type().is_some_and(|t| t.is_file()))
        .filter_map(|e| Some(e.path().strip_prefix(dir).ok()?.to_string_lossy().replace('\\', "/")))
        .collect()
}

/// The files of `files` that `pattern` names, in their order: `*` stays within a directory,
/// `**` crosses them; a leading `./` or `/` is the project directory.
pub fn matching(files: &[String], pattern: &str) -> Result<Vec<String>, globset::Error> {
    let glob = globset::GlobBuilder::new(pattern.trim_start_matches('/').trim_start_matches("./"))
        .literal_separator(true)
        .build()?
        .compile_matcher();
    Ok(files.iter().filter(|f| glob.is_match(f.as_str())).cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_and_ignored_files_are_not_the_projects() {
        let dir = tempfile::tempdir().unwrap();
        for f in [".git/HEAD", "ci/a.yml", "ci/sub/b.yml", "skip.log", ".gitignore"] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, if f == ".gitignore" { "*.log\n" } else { "" }).unwrap();
        }
        let mut files = project_files(dir.path());
        files.sort();
        // Sorted, so matching keeps that order.
        assert_eq!(files, [".gitignore", "ci/a.yml", "ci/sub/b.yml"]);
        assert_eq!(matching(&files, "ci/*.yml").unwrap(), ["ci/a.yml"]);
        assert_eq!(matching(&files, "/ci/**/*.yml").unwrap(), ["ci/a.yml", "ci/sub/b.yml"]);
    }
}
