//! Random edits of valid inputs, for property tests. A parser meets the
//! inputs that hurt it near valid ones: a document with a byte flipped, a
//! piece of syntax inserted, a stretch cut out or repeated, or the end
//! missing. One strategy for every crate's targets: [`edits`], applied to
//! bytes by [`apply_bytes`] or to text by [`apply_text`] (edits of text fall
//! on character boundaries, so the text stays UTF-8).

use proptest::prelude::*;
use proptest::sample::Index;

/// One edit. Positions are [`Index`]es, scaled to the input's length
/// when applied.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Replaces one unit (byte or character) with one of the inserts.
    Replace(Index, String),
    /// Inserts before a unit (or at the end).
    Insert(Index, String),
    /// Removes up to `n` units.
    Remove(Index, usize),
    /// Repeats up to `n` units right after themselves.
    Repeat(Index, usize),
    /// Cuts everything from there on.
    Truncate(Index),
    /// Sets one unit to a byte (for text: the character of that code).
    Set(Index, u8),
}

/// Up to `max` edits; inserted text is one of `syntax` (the pieces of the
/// format that change its structure) or a few arbitrary characters.
pub fn edits(syntax: &'static [&'static str], max: usize) -> impl Strategy<Value = Vec<Edit>> {
    let insert = prop_oneof![
        3 => prop::sample::select(syntax).prop_map(String::from),
        1 => prop::collection::vec(any::<char>(), 0..4).prop_map(|c| c.into_iter().collect()),
    ];
    let edit = prop_oneof![
        3 => (any::<Index>(), insert.clone()).prop_map(|(at, s)| Edit::Replace(at, s)),
        4 => (any::<Index>(), insert).prop_map(|(at, s)| Edit::Insert(at, s)),
        2 => (any::<Index>(), 1..16usize).prop_map(|(at, n)| Edit::Remove(at, n)),
        1 => (any::<Index>(), 1..64usize).prop_map(|(at, n)| Edit::Repeat(at, n)),
        1 => any::<Index>().prop_map(Edit::Truncate),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(at, b)| Edit::Set(at, b)),
    ];
    prop::collection::vec(edit, 1..=max.max(1))
}

/// `units` with `edits` applied, in order.
fn apply<T: Clone>(
    mut units: Vec<T>,
    edits: &[Edit],
    split: impl Fn(&str) -> Vec<T>,
    unit: impl Fn(u8) -> T,
) -> Vec<T> {
    for edit in edits {
        let at = |index: &Index, extra: usize| index.index(units.len() + extra);
        match edit {
            Edit::Replace(index, with) if !units.is_empty() => {
                let at = at(index, 0);
                units.splice(at..at + 1, split(with));
            }
            Edit::Replace(..) => {}
            Edit::Insert(index, what) => {
                let at = at(index, 1);
                units.splice(at..at, split(what));
            }
            Edit::Remove(index, n) if !units.is_empty() => {
                let at = at(index, 0);
                let end = (at + n).min(units.len());
                units.drain(at..end);
            }
            Edit::Repeat(index, n) if !units.is_empty() => {
                let at = at(index, 0);
                let end = (at + n).min(units.len());
                let copy: Vec<T> = units[at..end].to_vec();
                units.splice(end..end, copy);
            }
            Edit::Set(index, byte) if !units.is_empty() => {
                let at = at(index, 0);
                units[at] = unit(*byte);
            }
            Edit::Remove(..) | Edit::Repeat(..) | Edit::Set(..) => {}
            Edit::Truncate(index) => {
                let at = at(index, 1);
                units.truncate(at);
            }
        }
    }
    units
}

/// `bytes` with `edits` applied.
pub fn apply_bytes(bytes: &[u8], edits: &[Edit]) -> Vec<u8> {
    apply(bytes.to_vec(), edits, |s| s.as_bytes().to_vec(), |b| b)
}

/// `text` with `edits` applied, on character boundaries.
pub fn apply_text(text: &str, edits: &[Edit]) -> String {
    apply(
        text.chars().collect(),
        edits,
        |s| s.chars().collect(),
        char::from,
    )
    .into_iter()
    .collect()
}
