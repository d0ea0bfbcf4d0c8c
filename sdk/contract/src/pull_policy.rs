//! GitLab's pull-policy rule, once: the host's fallback (no `pull-policy` plugin) and the
//! first-party `pull-policy` plugin both call [`decide`].
//!
//! - The requested list is the job's `image:pull_policy` when it sets one, else the runner's
//!   `pull_policy`; duplicates are dropped, the first occurrence keeps its place.
//! - With no `allowed_pull_policies`, the requested list is the answer (empty = the cluster's
//!   default).
//! - With an allow-list, the answer is requested ∩ allowed, in requested order; nothing left is
//!   a denial naming both lists (GitLab fails such jobs too).
//! - An allow-list but no `pull_policy` anywhere: the allow-list itself, in its order (GitLab
//!   would check its implicit default against the list and fail jobs the operator meant to
//!   allow; the operator said which policies are acceptable, so trying them in that order is
//!   the least surprising reading).

use crate::PullPolicy;

/// What a pull-policy decision is asked about.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    pub image: String,
    /// The job's `image:pull_policy` (may be empty).
    pub job: Vec<PullPolicy>,
    /// The runner's `pull_policy` (may be empty).
    pub config: Vec<PullPolicy>,
    /// The runner's `allowed_pull_policies` (empty = no restriction).
    pub allowed: Vec<PullPolicy>,
}

/// Nothing requested is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotAllowed {
    pub image: String,
    /// `the job's image:pull_policy` or `the runner's pull_policy`.
    pub source: &'static str,
    pub requested: Vec<PullPolicy>,
    pub allowed: Vec<PullPolicy>,
}

impl std::fmt::Display for NotAllowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "image {}: {} {} is not one of allowed_pull_policies {}",
            self.image,
            self.source,
            list(&self.requested),
            list(&self.allowed)
        )
    }
}

impl std::error::Error for NotAllowed {}

/// `[always, if-not-present]`.
pub fn list(ps: &[PullPolicy]) -> String {
    format!("[{}]", ps.iter().map(|p| p.as_gitlab()).collect::<Vec<_>>().join(", "))
}

/// The policies to try, most preferred first.
pub fn decide(request: &Request) -> Result<Vec<PullPolicy>, NotAllowed> {
    let (requested, source) = if !request.job.is_empty() {
        (&request.job, "the job's image:pull_policy")
    } else {
        (&request.config, "the runner's pull_policy")
    };
    if request.allowed.is_empty() {
        return Ok(dedup(requested));
    }
    if requested.is_empty() {
        return Ok(dedup(&request.allowed));
    }
    let kept: Vec<PullPolicy> = dedup(requested).into_iter().filter(|p| request.allowed.contains(p)).collect();
    if kept.is_empty() {
        return Err(NotAllowed {
            image: request.image.clone(),
            source,
            requested: requested.clone(),
            allowed: request.allowed.clone(),
        });
    }
    Ok(kept)
}

fn dedup(ps: &[PullPolicy]) -> Vec<PullPolicy> {
    let mut out = Vec::new();
    for p in ps {
        if !out.contains(p) {
            out.push(*p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use PullPolicy::{Always as A, IfNotPresent as I, Never as N};

    #[test]
    fn table() {
        type Row =
            (&'static str, Vec<PullPolicy>, Vec<PullPolicy>, Vec<PullPolicy>, Result<Vec<PullPolicy>, &'static str>);
        let rows: Vec<Row> = vec![
            ("nothing set: cluster default", vec![], vec![], vec![], Ok(vec![])),
            ("runner policy only", vec![], vec![A], vec![], Ok(vec![A])),
            ("runner list keeps order", vec![], vec![A, I], vec![], Ok(vec![A, I])),
            ("job wins over runner", vec![N], vec![A], vec![], Ok(vec![N])),
            ("job wins when allowed", vec![I], vec![A], vec![A, I], Ok(vec![I])),
            (
                "job not allowed: denied",
                vec![N],
                vec![A],
                vec![A, I],
                Err(
                    "image alpine: the job's image:pull_policy [never] is not one of allowed_pull_policies [always, if-not-present]",
                ),
            ),
            ("runner list narrowed by allow-list", vec![], vec![A, I, N], vec![N, I], Ok(vec![I, N])),
            (
                "runner policy not allowed",
                vec![],
                vec![A],
                vec![I],
                Err(
                    "image alpine: the runner's pull_policy [always] is not one of allowed_pull_policies [if-not-present]",
                ),
            ),
            ("foot-gun: allow-list only uses it", vec![], vec![], vec![I, A], Ok(vec![I, A])),
            ("duplicates collapse", vec![A, A, I], vec![], vec![], Ok(vec![A, I])),
            ("duplicates collapse under an allow-list", vec![], vec![I, I, A], vec![A, I], Ok(vec![I, A])),
        ];
        for (what, job, config, allowed, want) in rows {
            let got = decide(&Request { image: "alpine".into(), job, config, allowed });
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{what}"),
                (Err(e), Err(want)) => assert_eq!(e.to_string(), want, "{what}"),
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn gitlab_spellings_round_trip() {
        for p in [A, I, N] {
            assert_eq!(PullPolicy::from_gitlab(p.as_gitlab()), Some(p));
        }
        assert_eq!(PullPolicy::from_gitlab("IfNotPresent"), None);
    }
}
