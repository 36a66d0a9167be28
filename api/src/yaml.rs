//! YAML read within bounds, for every YAML input the agent and `persysctl`
//! parse: a compose file, a manifest.
//!
//! serde_yaml_ng bounds nesting (128) and alias jumps (100 per event), but
//! a 50 KB alias bomb still expands within those bounds into millions of
//! nodes. So [`check`] walks the text through the deserializer without
//! building anything and stops at the node budget: a bomb costs at most
//! [`Bounds::max_nodes`] visits and no memory beyond the parser's events
//! (proportional to the text, so bounded by the size cap). Only a text that
//! fits is then built as values by the caller. Parsing is CPU work: callers
//! on an async runtime run it on a blocking thread.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};

/// What a YAML text may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// What the text is, for messages: `"compose file"`, `"manifest"`.
    pub what: &'static str,
    /// Largest text accepted, in bytes.
    pub max_bytes: usize,
    /// Most nodes, every alias counted at every use, over all the
    /// documents of the stream. 100,000 values take a few MiB.
    pub max_nodes: usize,
    /// Deepest nesting accepted.
    pub max_depth: usize,
}

/// Why a YAML text was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum YamlError {
    /// A bound, not the YAML, stopped the read. The message names the bound
    /// and its figure.
    #[error("is refused: {0}")]
    Bound(String),
    /// The text is not YAML; the parser's message, with its location.
    #[error("is not valid YAML: {0}")]
    Invalid(String),
}

impl YamlError {
    /// True when a bound stopped the read.
    pub fn is_bound(&self) -> bool {
        matches!(self, YamlError::Bound(_))
    }
}

/// A compose file: what the agent accepts, and `persysctl` sends.
pub const COMPOSE_FILE: Bounds = Bounds {
    what: "compose file",
    max_bytes: 1024 * 1024,
    // Real files have hundreds of nodes.
    max_nodes: 100_000,
    // Compose files nest a handful of levels.
    max_depth: 64,
};

/// A `persysctl` manifest file (or standard input): one or many
/// workloads, a compose file possibly inline.
pub const MANIFEST: Bounds = Bounds {
    what: "manifest",
    max_bytes: 4 * 1024 * 1024,
    max_nodes: 100_000,
    max_depth: 64,
};

/// Checks that `text`, every document of it, fits `bounds`: its size, its
/// node count with aliases expanded, its depth. Builds nothing.
pub fn check(text: &str, bounds: &Bounds) -> Result<(), YamlError> {
    if text.len() > bounds.max_bytes {
        return Err(YamlError::Bound(format!(
            "it is {} bytes, over the {}-byte limit for a {}",
            text.len(),
            bounds.max_bytes,
            bounds.what
        )));
    }
    let budget = Budget {
        bounds,
        nodes: Cell::new(0),
        exceeded: Cell::new(false),
    };
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        Node {
            budget: &budget,
            depth: 0,
        }
        .deserialize(document)
        .map_err(|e| {
            let message = e.to_string();
            if budget.exceeded.get() {
                YamlError::Bound(message)
            } else if message.contains("repetition limit exceeded") {
                // The parser's own guard against alias replay, which may
                // stop a bomb before the node budget does.
                YamlError::Bound(format!(
                    "its aliases expand more than the parser allows in a {} (an alias bomb): {message}",
                    bounds.what
                ))
            } else if message.contains("recursion limit exceeded") {
                YamlError::Bound(format!(
                    "it nests deeper than the parser allows in a {}: {message}",
                    bounds.what
                ))
            } else {
                YamlError::Invalid(message)
            }
        })?;
    }
    Ok(())
}

/// Nodes visited so far, shared by the whole walk.
struct Budget<'a> {
    bounds: &'a Bounds,
    nodes: Cell<usize>,
    /// Set when a bound, not the YAML, stopped the walk.
    exceeded: Cell<bool>,
}

/// One node of the walk: counts itself, then its children one level down.
#[derive(Clone, Copy)]
struct Node<'a> {
    budget: &'a Budget<'a>,
    depth: usize,
}

impl Node<'_> {
    fn visit<E: de::Error>(self) -> Result<(), E> {
        let nodes = self.budget.nodes.get() + 1;
        self.budget.nodes.set(nodes);
        let Bounds {
            what,
            max_nodes,
            max_depth,
            ..
        } = *self.budget.bounds;
        let exceeded = if nodes > max_nodes {
            format!(
                "it expands to more than {max_nodes} nodes, the limit for a {what} (aliases are counted at every use)"
            )
        } else if self.depth > max_depth {
            format!("it nests deeper than {max_depth} levels, the limit for a {what}")
        } else {
            return Ok(());
        };
        self.budget.exceeded.set(true);
        Err(E::custom(exceeded))
    }

    fn child(self) -> Self {
        Node {
            budget: self.budget,
            depth: self.depth + 1,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.visit()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.visit()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.visit()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.visit()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.visit()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.visit()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.visit()
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        self.deserialize(deserializer)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.visit()?;
        while seq.next_element_seed(self.child())?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.visit()?;
        while map.next_key_seed(self.child())?.is_some() {
            map.next_value_seed(self.child())?;
        }
        Ok(())
    }
    /// A tagged value (`!reset`, `!override`): the tag, then its value.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        self.visit()?;
        let (_, variant) = data.variant::<de::IgnoredAny>()?;
        de::VariantAccess::newtype_variant_seed(variant, self.child())
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Bounds = Bounds {
        what: "test file",
        max_bytes: 1024 * 1024,
        max_nodes: 100_000,
        max_depth: 64,
    };

    fn billion_laughs() -> String {
        persys_test_support::billion_laughs("", "")
    }

    #[test]
    fn an_alias_bomb_is_refused_naming_the_bound() {
        let error = check(&billion_laughs(), &SMALL).unwrap_err();
        assert!(error.is_bound(), "{error}");
        assert!(error.to_string().contains("alias bomb"), "{error}");
        let used = format!("{}x: *i\n", billion_laughs());
        let error = check(&used, &SMALL).unwrap_err();
        assert!(error.is_bound(), "{error}");
        assert!(
            error
                .to_string()
                .contains("more than 100000 nodes, the limit for a test file"),
            "{error}"
        );
    }

    #[test]
    fn every_document_of_a_stream_counts_against_one_budget() {
        let one = "a: [1, 2, 3]\n";
        let stream = vec![one; 30].join("---\n");
        let bounds = Bounds {
            max_nodes: 100,
            ..SMALL
        };
        assert!(check(one, &bounds).is_ok());
        assert!(check(&stream, &bounds).unwrap_err().is_bound());
    }

    #[test]
    fn size_and_depth_are_bounded_and_bad_yaml_is_not_a_bound() {
        let big = "x".repeat(SMALL.max_bytes + 1);
        let error = check(&big, &SMALL).unwrap_err();
        assert!(error.to_string().contains("1048576-byte limit"), "{error}");
        let deep = format!("a: {}{}\n", "[".repeat(100), "]".repeat(100));
        let error = check(&deep, &SMALL).unwrap_err();
        assert!(
            error.to_string().contains("deeper") || error.to_string().contains("recursion"),
            "{error}"
        );
        let error = check("a: [", &SMALL).unwrap_err();
        assert!(!error.is_bound(), "{error}");
    }
}
