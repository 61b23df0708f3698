//! The bound on Lua string-pattern work, for the Lua runtime's sandbox
//! ([`crate::lua`]): `string.find`, `match`, `gmatch` and `gsub` run their
//! matcher in C, where the instruction hook that enforces a Func's time
//! limit never fires, and a backtracking pattern can take centuries
//! (`string.rep("a", 300000):find(".-.-.-.-b")`). The sandbox's wrappers
//! ask [`refusal`] first and raise its message instead of matching.
//!
//! The estimate is an upper bound on the matcher's steps, read from the
//! pattern and the subject (`n` bytes):
//!
//! - each single-character item quantified with `*`, `+` or `-` multiplies
//!   by `1 + r`, where `r` is the longest run of subject bytes its class
//!   matches (the most ways it can expand), unless it is *final*: followed
//!   by nothing but captures, or by captures and the `$` anchor when its
//!   class is `.` (it then cannot make what follows fail);
//! - `?` multiplies by 2; `%bxy` and back-references `%1`..`%9` by `n + 1`
//!   (each scans or compares up to the rest of the subject);
//! - the product is multiplied by the number of items, and by `n + 1` when
//!   the search is not anchored with `^` (every start position is tried;
//!   `gmatch` never anchors);
//! - a plain search (`find` with `plain`, or `find` with a pattern without
//!   specials) costs `(n - m + 1) * m / 16` (a vectorised compare of the `m`-byte
//!   needle at every position).
//!
//! Past [`BUDGET`] steps the call is refused. The run lengths are only
//! measured when the cheap estimate with `r = n` is over the budget, so
//! short subjects cost a few comparisons.

/// Most estimated matcher steps one call may take (a few seconds of C at
/// worst; far less in practice, the estimate is pessimistic).
pub const BUDGET: f64 = 1e9;

/// Which function is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Search {
    /// `find` (not plain): a leading `^` anchors; without specials it is
    /// a plain search.
    Find,
    /// `match`, `gsub`: a leading `^` anchors.
    Anchorable,
    /// `gmatch`: `^` is an ordinary character.
    Unanchored,
    /// `find` with `plain`.
    Plain,
}

/// One pattern item, as far as its cost goes.
enum Item<'p> {
    /// A single-character class (`.`, `%a`, `[set]`, a literal), with its
    /// quantifier byte (0 when none) and whether it is final.
    Class {
        class: &'p [u8],
        quantifier: u8,
        last: bool,
    },
    /// `%b`, a back-reference: up to the rest of the subject per attempt.
    Scan,
}

/// Longest runs already measured in one subject, by class (a loop of
/// `s:find(p, pos)` over one big subject measures it once).
#[derive(Default)]
pub struct Runs(Vec<(Vec<u8>, usize)>);

impl Runs {
    fn get(&mut self, subject: &[u8], class: &[u8]) -> usize {
        if let Some((_, run)) = self.0.iter().find(|(c, _)| c == class) {
            return *run;
        }
        let run = longest_run(subject, class);
        if self.0.len() < 64 {
            self.0.push((class.to_vec(), run));
        }
        run
    }
}

/// Why this search must not run, or `None` when it is within [`BUDGET`];
/// `runs` holds what was measured in this same subject before.
pub fn refusal(subject: &[u8], pattern: &[u8], search: Search, runs: &mut Runs) -> Option<String> {
    let n = subject.len() as f64;
    let specials = pattern.iter().any(|b| b"^$*+?.([%-".contains(b));
    if search == Search::Plain || (search == Search::Find && !specials) {
        let m = pattern.len() as f64;
        let cost = ((n - m + 1.0).max(0.0)) * m / 16.0;
        return over(cost, subject.len());
    }
    let (anchored, body) = match (search, pattern.first()) {
        (Search::Anchorable | Search::Find, Some(b'^')) => (true, &pattern[1..]),
        _ => (false, pattern),
    };
    let items = parse(body);
    let starts = if anchored { 1.0 } else { n + 1.0 };
    let base = (items.len() as f64 + 1.0) * starts;
    let pessimistic = base * items.iter().map(|i| factor(i, n, None)).product::<f64>();
    if pessimistic <= BUDGET {
        return None;
    }
    // Measuring every class is itself work: refuse absurd pattern sizes.
    if items.len() as f64 * n > BUDGET {
        return over(items.len() as f64 * n, subject.len());
    }
    let mut cost = base;
    for item in &items {
        cost *= factor(item, n, Some((subject, &mut *runs)));
        if cost > BUDGET {
            break;
        }
    }
    over(cost, subject.len())
}

fn over(cost: f64, len: usize) -> Option<String> {
    (cost > BUDGET).then(|| {
        format!(
            "pattern too costly for a {len}-byte subject (about {cost:.1e} steps; the sandbox allows {BUDGET:.0e}): simplify the pattern or split the input"
        )
    })
}

/// What one item multiplies the estimate by; `subject` given: measured,
/// else with every class matching everything.
fn factor(item: &Item<'_>, n: f64, subject: Option<(&[u8], &mut Runs)>) -> f64 {
    match item {
        Item::Scan => n + 1.0,
        Item::Class {
            quantifier: b'?', ..
        } => 2.0,
        Item::Class {
            class,
            quantifier: b'*' | b'+' | b'-',
            last: false,
        } => match subject {
            Some((s, runs)) => runs.get(s, class) as f64 + 1.0,
            None => n + 1.0,
        },
        Item::Class { .. } => 1.0,
    }
}

/// The items of `p` (after any `^`), as the matcher reads them; a
/// malformed pattern is read as far as it goes (the matcher reports it).
fn parse(p: &[u8]) -> Vec<Item<'_>> {
    let mut items = Vec::new();
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'(' | b')' => i += 1,
            b'$' if i + 1 == p.len() => i += 1,
            b'%' if p.get(i + 1) == Some(&b'b') => {
                items.push(Item::Scan);
                i += 4;
            }
            b'%' if p.get(i + 1) == Some(&b'f') => {
                // A frontier: one test, no expansion.
                i = class_end(p, i + 2);
            }
            b'%' if p.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                items.push(Item::Scan);
                i += 2;
            }
            _ => {
                let end = class_end(p, i);
                let quantifier = match p.get(end) {
                    Some(&q @ (b'*' | b'+' | b'-' | b'?')) => q,
                    _ => 0,
                };
                let next = if quantifier == 0 { end } else { end + 1 };
                let class = &p[i..end.min(p.len())];
                items.push(Item::Class {
                    class,
                    quantifier,
                    last: is_final(class, p.get(next..).unwrap_or_default()),
                });
                i = next;
            }
        }
    }
    items
}

/// Nothing after the item can fail: only captures follow, or captures and
/// the final `$` after a `.` (which expands to the end of the subject).
fn is_final(class: &[u8], rest: &[u8]) -> bool {
    let captures = |r: &[u8]| r.iter().all(|&b| b == b'(' || b == b')');
    captures(rest)
        || (class == b"." && rest.last() == Some(&b'$') && captures(&rest[..rest.len() - 1]))
}

/// Where the single-character class starting at `i` ends (lstrlib's
/// `classEnd`).
fn class_end(p: &[u8], i: usize) -> usize {
    match p.get(i) {
        Some(b'%') => i + 2,
        Some(b'[') => {
            let mut j = i + 1;
            if p.get(j) == Some(&b'^') {
                j += 1;
            }
            // The first byte is part of the set even when it is `]`.
            loop {
                match p.get(j) {
                    None => return p.len(),
                    Some(b'%') => j += 2,
                    Some(_) => j += 1,
                }
                if p.get(j) == Some(&b']') {
                    return j + 1;
                }
            }
        }
        _ => i + 1,
    }
}

/// The longest run of bytes of `s` that `class` matches.
fn longest_run(s: &[u8], class: &[u8]) -> usize {
    let (mut best, mut run) = (0, 0);
    for &c in s {
        if single_match(c, class) {
            run += 1;
            best = best.max(run);
        } else {
            run = 0;
        }
    }
    best
}

/// lstrlib's `singlematch`.
fn single_match(c: u8, class: &[u8]) -> bool {
    match class {
        [b'.'] => true,
        [b'%', cl] => match_class(c, *cl),
        [b'[', ..] => bracket(c, class),
        [lit, ..] => *lit == c,
        [] => false,
    }
}

/// lstrlib's `match_class`, in the C locale.
fn match_class(c: u8, cl: u8) -> bool {
    let res = match cl.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        b's' => matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r'),
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        b'z' => c == 0,
        _ => return cl == c,
    };
    if cl.is_ascii_lowercase() {
        res
    } else {
        !res
    }
}

/// lstrlib's `matchbracketclass`; `set` is `[...]` including the brackets.
fn bracket(c: u8, set: &[u8]) -> bool {
    let end = set.len().saturating_sub(1);
    let mut p = 1;
    let sig = set.get(1) != Some(&b'^');
    if !sig {
        p += 1;
    }
    while p < end {
        if set[p] == b'%' {
            p += 1;
            if set.get(p).is_some_and(|&cl| match_class(c, cl)) {
                return sig;
            }
        } else if set.get(p + 1) == Some(&b'-') && p + 2 < end {
            if set[p] <= c && c <= set[p + 2] {
                return sig;
            }
            p += 2;
        } else if set[p] == c {
            return sig;
        }
        p += 1;
    }
    !sig
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_match_like_lstrlib() {
        assert!(single_match(b'x', b"."));
        assert!(single_match(b' ', b"%s") && !single_match(b'a', b"%s"));
        assert!(single_match(b'a', b"%S"));
        assert!(single_match(b'q', b"[a-z]") && !single_match(b'Q', b"[a-z]"));
        assert!(single_match(b'Q', b"[^a-z]"));
        assert!(single_match(b']', b"[]]"));
        assert!(single_match(b'5', b"[%d_]") && single_match(b'_', b"[%d_]"));
        assert!(single_match(b'%', b"%%"));
        assert_eq!(longest_run(b"ab   c  d", b"%s"), 3);
    }

    #[test]
    fn finality_and_anchoring() {
        let s = vec![b'a'; 100_000];
        let check = |p: &[u8]| refusal(&s, p, Search::Anchorable, &mut Runs::default());
        assert!(check(b"^(.-)=(.*)$").is_none());
        assert!(check(b"%s+").is_none());
        assert!(check(b"^%s*(.-)%s*$").is_none());
        assert!(check(b".-.-b").is_some());
        assert!(check(b"a*$").is_some());
    }
}
