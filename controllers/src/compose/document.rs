//! A compose file read as compose reads it, within the bounds of
//! [`persys_api::yaml::COMPOSE_FILE`] (1 MiB, 100,000 nodes once every
//! alias is expanded, 64 levels deep), checked by
//! [`persys_api::yaml::check`] before anything is built; then merge keys
//! (`<<`) applied and `${VAR}` interpolated. Parsing is CPU work: callers
//! on an async runtime run it on a blocking thread.

use std::collections::BTreeMap;

use persys_api::yaml;
use serde_yaml_ng::Value;

/// Largest compose file accepted (bytes, after base64 decoding).
pub const MAX_COMPOSE_BYTES: usize = yaml::COMPOSE_FILE.max_bytes;

/// Parses `text` as one YAML document within the bounds, with merge keys
/// applied. Errors say which bound was hit, or where the YAML is wrong.
pub fn load(text: &str) -> Result<Value, String> {
    yaml::check(text, &yaml::COMPOSE_FILE).map_err(|e| e.to_string())?;
    let mut value: Value =
        serde_yaml_ng::from_str(text).map_err(|e| format!("is not valid YAML: {e}"))?;
    value
        .apply_merge()
        .map_err(|e| format!("has a bad merge key (<<): {e}"))?;
    Ok(value)
}

/// Replaces `${VAR}` and `$VAR` in every string value of `value` as
/// compose does, from `vars` (unset is empty): `$$` is a `$`;
/// `${VAR:-default}`, `${VAR-default}`, `${VAR:+other}`, `${VAR+other}`
/// (defaults interpolated in turn); `${VAR:?message}` and `${VAR?message}`
/// fail when unset. `path` names where a failure is, for the message.
pub fn interpolate(
    value: &mut Value,
    vars: &BTreeMap<String, String>,
    path: &str,
) -> Result<(), String> {
    match value {
        Value::String(text) if text.contains('$') => {
            *text = substitute(text, vars).map_err(|why| format!("{path}: {why}"))?;
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate(item, vars, &format!("{path}[{i}]"))?;
            }
        }
        Value::Mapping(mapping) => {
            for (key, item) in mapping.iter_mut() {
                let key = key_text(key);
                let path = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                interpolate(item, vars, &path)?;
            }
        }
        Value::Tagged(tagged) => interpolate(&mut tagged.value, vars, path)?,
        _ => {}
    }
    Ok(())
}

/// A mapping key as a path names it: a string as it is, any other key
/// (a number, a tagged `!override web`) as YAML writes it.
pub(super) fn key_text(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => serde_yaml_ng::to_string(other)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    }
}

fn substitute(text: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let is_name_start = |c: char| c == '_' || c.is_ascii_alphabetic();
    let is_name = |c: char| c == '_' || c.is_ascii_alphanumeric();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        match after.chars().next() {
            Some('$') => {
                out.push('$');
                rest = &after[1..];
            }
            Some('{') => {
                let body_and_rest = &after[1..];
                let end = closing_brace(body_and_rest)
                    .ok_or_else(|| format!("{text:?} has an unclosed ${{"))?;
                out.push_str(&braced(&body_and_rest[..end], vars)?);
                rest = &body_and_rest[end + 1..];
            }
            Some(c) if is_name_start(c) => {
                let len = after.find(|c| !is_name(c)).unwrap_or(after.len());
                out.push_str(vars.get(&after[..len]).map(String::as_str).unwrap_or(""));
                rest = &after[len..];
            }
            _ => {
                return Err(format!(
                    "{text:?} has a '$' that starts no variable (write $$)"
                ));
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Where the `}` closing a `${` is, counting nested `${…}`.
fn closing_brace(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 1;
            }
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

/// The value of `${body}`.
fn braced(body: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let name_len = body
        .find(|c: char| !(c == '_' || c.is_ascii_alphanumeric()))
        .unwrap_or(body.len());
    let (name, operator) = body.split_at(name_len);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("${{{body}}} names no variable"));
    }
    let value = vars.get(name);
    let set_nonempty = value.is_some_and(|v| !v.is_empty());
    let (op, word) = [":-", ":?", ":+", "-", "?", "+"]
        .iter()
        .filter_map(|op| operator.strip_prefix(op).map(|word| (*op, word)))
        .next()
        .unwrap_or(("", operator));
    match op {
        "" if word.is_empty() => Ok(value.cloned().unwrap_or_default()),
        ":-" if !set_nonempty => substitute(word, vars),
        "-" if value.is_none() => substitute(word, vars),
        ":-" | "-" => Ok(value.cloned().unwrap_or_default()),
        ":?" if !set_nonempty => Err(format!("{name} is required: {word}")),
        "?" if value.is_none() => Err(format!("{name} is required: {word}")),
        ":?" | "?" => Ok(value.cloned().unwrap_or_default()),
        ":+" if set_nonempty => substitute(word, vars),
        "+" if value.is_some() => substitute(word, vars),
        ":+" | "+" => Ok(String::new()),
        _ => Err(format!(
            "${{{body}}} is not a variable reference compose reads"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn variables_interpolate_as_compose_does() {
        let v = vars(&[("ROOT", "/srv"), ("EMPTY", "")]);
        for (text, expected) in [
            ("$ROOT/data", "/srv/data"),
            ("${ROOT}/data", "/srv/data"),
            ("${UNSET}/etc", "/etc"),
            ("${UNSET:-/}:/host", "/:/host"),
            ("${EMPTY:-/etc}", "/etc"),
            ("${EMPTY-/etc}", ""),
            ("${UNSET:-${ROOT}/x}", "/srv/x"),
            ("${ROOT:+/y}", "/y"),
            ("${UNSET:+/y}", ""),
            ("$$ROOT", "$ROOT"),
            ("no dollar", "no dollar"),
        ] {
            assert_eq!(substitute(text, &v).unwrap(), expected, "{text}");
        }
        for bad in ["${UNSET:?needed}", "${ROOT", "$", "${1X}", "${ROOT/x}"] {
            assert!(substitute(bad, &v).is_err(), "{bad}");
        }
    }

    #[test]
    fn merge_keys_and_interpolation_are_applied() {
        let mut doc = load(
            "x-common: &common\n  privileged: true\nservices:\n  web:\n    <<: *common\n    image: \"${IMAGE}\"\n",
        )
        .unwrap();
        interpolate(&mut doc, &vars(&[("IMAGE", "nginx")]), "").unwrap();
        assert_eq!(doc["services"]["web"]["privileged"], Value::Bool(true));
        assert_eq!(doc["services"]["web"]["image"], "nginx");
        let mut doc = load("services:\n  web:\n    image: ${X:?set X}\n").unwrap();
        let error = interpolate(&mut doc, &BTreeMap::new(), "").unwrap_err();
        assert!(
            error.starts_with("services.web.image: X is required"),
            "{error}"
        );
    }

    /// Found by the compose policy property tests: under a key that is not
    /// a plain string (here tagged), a failing variable was named by a path
    /// that left the key out.
    #[test]
    fn a_failing_variable_under_a_tagged_key_is_named_by_the_key_as_written() {
        let mut doc = load("!override web:\n  environment: ['C=${X:?set X}']\n").unwrap();
        let error = interpolate(&mut doc, &BTreeMap::new(), "").unwrap_err();
        assert!(
            error.starts_with("!override web.environment[0]: X is required"),
            "{error}"
        );
    }

    pub(crate) fn billion_laughs() -> String {
        persys_test_support::billion_laughs(
            "",
            "services:\n  web:\n    image: x\n    command: *i\n",
        )
    }

    #[test]
    fn an_alias_bomb_is_refused_quickly_without_expanding_it() {
        let start = std::time::Instant::now();
        let error = load(&billion_laughs()).unwrap_err();
        assert!(error.contains("more than 100000 nodes"), "{error}");
        assert!(
            start.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn size_and_depth_are_bounded() {
        let big = format!(
            "services:\n  web:\n    image: x\n# {}\n",
            "x".repeat(MAX_COMPOSE_BYTES)
        );
        assert!(load(&big).unwrap_err().contains("limit"));
        let deep = format!("a: {}{}\n", "[".repeat(100), "]".repeat(100));
        let error = load(&deep).unwrap_err();
        assert!(
            error.contains("deeper") || error.contains("recursion"),
            "{error}"
        );
        assert!(load("services:\n  web: {image: x}\n").is_ok());
    }
}
