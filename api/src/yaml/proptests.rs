//! The bounded YAML check against the parser it guards: on any text, and
//! on compose files and alias-heavy texts with random edits, [`check`]
//! answers without a panic; a text it passes is built by the parser within
//! the parser's own limits (it may still be refused for what only building
//! shows, such as a key given twice), and one it calls invalid does not
//! parse. The node bound is exact: a flat list is refused exactly when it
//! has more nodes than the bound.

use persys_test_support::compose::{YAML_SYNTAX, compose_file};
use persys_test_support::mutate::{apply_text, edits};
use proptest::prelude::*;
use serde::Deserialize;

use super::{Bounds, COMPOSE_FILE, MANIFEST, YamlError, check};

/// Small bounds, so random texts reach them.
const SMALL: Bounds = Bounds {
    what: "test text",
    max_bytes: 4096,
    max_nodes: 64,
    max_depth: 6,
};

/// Whether every document of `text` parses as YAML values.
fn parses(text: &str) -> bool {
    parse_error(text).is_none()
}

/// The parser's error on `text`, if any.
fn parse_error(text: &str) -> Option<String> {
    serde_yaml_ng::Deserializer::from_str(text)
        .find_map(|document| serde_yaml_ng::Value::deserialize(document).err())
        .map(|e| e.to_string())
}

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,200}",
        prop::collection::vec(prop::sample::select(YAML_SYNTAX), 0..60).prop_map(|p| p.concat()),
        (compose_file(), edits(YAML_SYNTAX, 8)).prop_map(|(f, e)| apply_text(&f.text, &e)),
        (1..6usize, 1..6usize, edits(YAML_SYNTAX, 4)).prop_map(|(levels, fan, e)| {
            let mut text = String::from("a0: &a0 [x]\n");
            for i in 1..=levels {
                let refs = vec![format!("*a{}", i - 1); fan].join(", ");
                text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
            }
            apply_text(&text, &e)
        }),
    ]
}

proptest! {
    #[test]
    fn the_yaml_check_agrees_with_the_parser_and_never_panics(text in any_text()) {
        for bounds in [&SMALL, &COMPOSE_FILE, &MANIFEST] {
            match check(&text, bounds) {
                Ok(()) => {
                    let error = parse_error(&text).unwrap_or_default();
                    prop_assert!(
                        !error.contains("recursion limit") && !error.contains("repetition limit"),
                        "passed, then the parser hit its own limit ({}):\n{}", error, text
                    );
                }
                Err(YamlError::Invalid(why)) => {
                    prop_assert!(!parses(&text), "called invalid ({}) but parses:\n{}", why, text)
                }
                Err(YamlError::Bound(_)) => {}
            }
        }
    }

    #[test]
    fn a_flat_list_is_refused_exactly_when_it_passes_the_node_bound(
        items in prop::collection::vec("[a-z0-9]{1,8}", 0..80),
    ) {
        // The mapping, its key, the list and each item.
        let text = format!("k: [{}]\n", items.join(", "));
        let nodes = 3 + items.len();
        match check(&text, &SMALL) {
            Ok(()) => prop_assert!(nodes <= SMALL.max_nodes, "{} nodes passed", nodes),
            Err(error) => prop_assert!(
                nodes > SMALL.max_nodes && error.is_bound(),
                "{} nodes: {}", nodes, error
            ),
        }
    }
}
