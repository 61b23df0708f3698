//! Which bundles this Tron routes for a registry state, and which it
//! refuses.
//!
//! registry state + static bundles -> **plan** -> route table. Bundles
//! that cannot be routed together never stop the others: a Tron that
//! opens its store, or adopts a peer's state, routes everything it can
//! and refuses the rest, each refusal logged with a reason naming both
//! bundles of a pair ([`crate::routes::servable`] decides what
//! conflicts). Which of a pair is refused:
//!
//! - a static bundle (`--bundles`) and an enabled stored one (uploaded):
//!   the stored one; the static bundle is this Tron's own configuration
//!   and keeps serving, as it would have when the stored one was enabled
//!   beside it (that enable is refused with 409 `route_conflict`);
//! - two stored ones, or two static ones: both, as `--bundles` refuses a
//!   pair (neither was there first as far as this Tron can tell);
//! - a stored version that cannot be loaded (or names another Func):
//!   that one alone.
//!
//! A change made on this Tron (an enable, a rollback) that would refuse
//! a bundle not refused before is itself refused, and nothing changes
//! ([`Served::new_refusal`]); one that keeps an earlier refusal as it was
//! goes through, so a refused pair never blocks unrelated changes.

use std::collections::HashSet;

use funcatron_bundle::Bundle;

use super::RegistryError;
use crate::routes::servable;

/// A bundle this Tron does not route, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The Func.
    pub func: String,
    /// The enabled version (archive SHA-256); `None` for a static bundle.
    pub sha: Option<String>,
    /// The HTTP status a change that would cause this refusal answers.
    pub status: u16,
    /// The error code of that answer (`route_conflict`, ...).
    pub code: &'static str,
    /// Why, naming the other bundle of a conflicting pair.
    pub reason: String,
}

impl Refusal {
    /// The error a change causing this refusal answers.
    pub(super) fn error(&self) -> RegistryError {
        RegistryError::new(self.status, self.code, self.reason.clone())
    }

    /// Is this the refusal of the same bundle as `other`?
    fn same_bundle(&self, other: &Refusal) -> bool {
        self.func == other.func && self.sha == other.sha
    }
}

/// What this Tron routes: the bundles its route table is built from and
/// the ones it refuses.
#[derive(Debug, Default)]
pub struct Served {
    /// Static ones first, then the enabled stored ones, with their
    /// settings.
    pub bundles: Vec<Bundle>,
    /// The rest, each with its reason.
    pub refused: Vec<Refusal>,
}

impl Served {
    /// A refusal of `self` that `before` did not have: what a change
    /// from `before` to `self` would newly stop routing.
    pub(super) fn new_refusal(&self, before: &Served) -> Option<&Refusal> {
        self.refused
            .iter()
            .find(|r| !before.refused.iter().any(|b| b.same_bundle(r)))
    }
}

/// One enabled stored version: its Func, its SHA-256 and the bundle
/// (with its settings), or why it cannot be loaded.
pub(super) type Stored = (String, String, Result<Bundle, RegistryError>);

/// One bundle to place: which it is and the bundle.
struct Candidate {
    func: String,
    sha: Option<String>,
    bundle: Bundle,
}

impl Candidate {
    fn refusal(&self, reason: String) -> Refusal {
        Refusal {
            func: self.func.clone(),
            sha: self.sha.clone(),
            status: 409,
            code: "route_conflict",
            reason,
        }
    }
}

/// Place `statics` and `stored` (see the module docs for the rules).
pub(super) fn plan(statics: &[Bundle], stored: Vec<Stored>) -> Served {
    let mut refused = Vec::new();
    let mut candidates: Vec<Candidate> = statics
        .iter()
        .map(|b| Candidate {
            func: b.name.clone(),
            sha: None,
            bundle: b.clone(),
        })
        .collect();
    for (func, sha, bundle) in stored {
        match bundle {
            Ok(bundle) => candidates.push(Candidate {
                func,
                sha: Some(sha),
                bundle,
            }),
            Err(e) => refused.push(Refusal {
                func,
                sha: Some(sha),
                status: e.status,
                code: e.code,
                reason: e.message,
            }),
        }
    }
    let (kept, mut conflicts) = place(candidates);
    refused.append(&mut conflicts);
    Served {
        bundles: kept,
        refused,
    }
}

/// The candidates that route together, and refusals for the rest.
fn place(candidates: Vec<Candidate>) -> (Vec<Bundle>, Vec<Refusal>) {
    let (kept, errors) = servable(candidates.iter().map(|c| c.bundle.clone()).collect());
    if errors.is_empty() {
        return (kept, Vec::new());
    }
    // `servable` keeps at most one bundle of a name, in order, and
    // refuses both of every conflicting pair: the pairs to decide are
    // among the ones it left out.
    let kept_names: HashSet<&str> = kept.iter().map(|b| b.name.as_str()).collect();
    let out: Vec<usize> = (0..candidates.len())
        .filter(|i| !kept_names.contains(candidates[*i].bundle.name.as_str()))
        .collect();
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); candidates.len()];
    let mut bad = vec![false; candidates.len()];
    for &i in &out {
        let (_, alone) = servable(vec![candidates[i].bundle.clone()]);
        bad[i] = !alone.is_empty();
        reasons[i].extend(alone.iter().map(ToString::to_string));
    }
    for (k, &i) in out.iter().enumerate() {
        for &j in &out[k + 1..] {
            if bad[i] || bad[j] {
                continue;
            }
            let pair = vec![candidates[i].bundle.clone(), candidates[j].bundle.clone()];
            let (_, why) = servable(pair);
            let Some(first) = why.first() else {
                continue;
            };
            let (a, b) = (&candidates[i], &candidates[j]);
            let why = first.to_string();
            match (a.sha.is_none(), b.sha.is_none()) {
                (true, false) => reasons[j].push(static_wins(&why, a)),
                (false, true) => reasons[i].push(static_wins(&why, b)),
                _ => {
                    reasons[i].push(why.clone());
                    reasons[j].push(why);
                }
            }
        }
    }
    let mut kept = Vec::new();
    let mut refused = Vec::new();
    for (c, why) in candidates.into_iter().zip(reasons) {
        if why.is_empty() {
            kept.push(c.bundle);
        } else {
            refused.push(c.refusal(why.join("; ")));
        }
    }
    (kept, refused)
}

fn static_wins(why: &str, winner: &Candidate) -> String {
    format!(
        "{why}; `{}` is a static bundle of this Tron (--bundles), which is kept",
        winner.func
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A Lua bundle `name` on `servers` with one operation at `path`.
    fn bundle(root: &std::path::Path, name: &str, servers: &str, path: &str) -> Bundle {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("openapi.yaml"),
            format!(
                "openapi: 3.1.0\ninfo: {{title: {name}, version: '1'}}\nx-funcatron: {{name: {name}, runtime: lua}}\nservers: {servers}\npaths:\n  {path}:\n    get: {{operationId: hi}}\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.join("main.lua"), "return { hi = function() end }").unwrap();
        Bundle::load(&dir).unwrap()
    }

    fn stored(b: &Bundle) -> Stored {
        (b.name.clone(), format!("sha-{}", b.name), Ok(b.clone()))
    }

    fn names(s: &Served) -> Vec<&str> {
        s.bundles.iter().map(|b| b.name.as_str()).collect()
    }

    #[test]
    fn a_static_bundle_wins_over_a_stored_one_and_stored_pairs_are_both_refused() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let fixed = bundle(r, "fixed", "[{url: /shared}]", "/a");
        let clash = bundle(r, "clash", "[{url: /own}, {url: /shared}]", "/b");
        let wild = |v: &str| {
            format!("[{{url: 'https://{{{v}}}.x.io/v1', variables: {{{v}: {{default: a}}}}}}]")
        };
        let left = bundle(r, "left", &wild("t"), "/c");
        let right = bundle(r, "right", &wild("u"), "/d");
        let fine = bundle(r, "fine", "[{url: /fine}]", "/e");
        let broken: Stored = (
            "gone".into(),
            "sha-gone".into(),
            Err(RegistryError::new(500, "store_failed", "no such file")),
        );
        let served = plan(
            std::slice::from_ref(&fixed),
            vec![
                stored(&clash),
                stored(&left),
                stored(&right),
                stored(&fine),
                broken,
            ],
        );
        assert_eq!(names(&served), ["fixed", "fine"]);
        let why = |f: &str| {
            served
                .refused
                .iter()
                .find(|r| r.func == f)
                .unwrap_or_else(|| panic!("{f} is not refused: {served:?}"))
        };
        let clash = why("clash");
        assert_eq!((clash.status, clash.code), (409, "route_conflict"));
        assert!(
            clash.reason.contains("`fixed`")
                && clash.reason.contains("`clash`")
                && clash.reason.contains("static bundle"),
            "{clash:?}"
        );
        for f in ["left", "right"] {
            assert!(
                why(f).reason.contains("`left`") && why(f).reason.contains("`right`"),
                "{:?}",
                why(f)
            );
        }
        assert_eq!(why("gone").code, "store_failed");
        assert_eq!(served.refused.len(), 4);
        // A state that refuses the same bundles adds no refusal.
        let again = plan(std::slice::from_ref(&fixed), vec![stored(&left)]);
        assert!(again.new_refusal(&served).is_none());
        assert!(served.new_refusal(&Served::default()).is_some());
    }

    #[test]
    fn a_stored_bundle_named_like_a_static_one_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let fixed = bundle(root.path(), "same", "[{url: /one}]", "/a");
        let other = root.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        let upload = bundle(&other, "same", "[{url: /two}]", "/b");
        let served = plan(std::slice::from_ref(&fixed), vec![stored(&upload)]);
        assert_eq!(names(&served), ["same"]);
        assert_eq!(served.bundles[0].base_path, "/one");
        assert_eq!(served.refused.len(), 1);
        assert_eq!(served.refused[0].sha.as_deref(), Some("sha-same"));
    }
}
