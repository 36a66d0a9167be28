//! Text that comes from the agent — ids, labels, specs, status and failure
//! messages, events, what runtimes said — made safe to print on a terminal.
//!
//! Whoever applies a workload chooses its spec, and whatever runs in it
//! chooses what its runtime reports. Printed raw, a control character in
//! them acts on the operator's terminal: ESC and CSI sequences clear the
//! screen or move the cursor over earlier lines, OSC sequences set the
//! title or write the clipboard (OSC 52), CR overprints a line, BEL rings.
//! Every control character is therefore shown as a visible escape, the
//! way Rust writes it in a string literal (`\u{1b}`, `\r`, `\u{9b}`): the
//! C0 controls (U+0000–U+001F), DEL (U+007F), and the C1 controls
//! (U+0080–U+009F), which terminals may take as the one-character forms
//! of ESC sequences (U+009B is CSI). Newline and tab are kept where the
//! layout has room for them ([`text()`]) and escaped in one-line places
//! such as table cells ([`line()`]).
//!
//! The JSON and YAML outputs escape them in their own syntax instead
//! ([`json()`]), so the value a script reads is unchanged.

use std::borrow::Cow;

fn is_control(c: char) -> bool {
    c.is_control()
}

fn escaped(text: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !text.chars().any(|c| is_control(c) && !keep(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_control(c) && !keep(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `text` with every control character but newline and tab escaped.
pub fn text(text: &str) -> Cow<'_, str> {
    escaped(text, |c| c == '\n' || c == '\t')
}

/// `text` on one line: every control character escaped, newline and tab
/// included.
pub fn line(text: &str) -> Cow<'_, str> {
    escaped(text, |_| false)
}

/// JSON text with the control characters serde_json leaves as they are
/// (DEL and the C1 controls; it escapes the C0 ones itself) written as
/// `\u00XX` escapes: the same JSON value, nothing raw on the terminal.
/// (Outside strings JSON has no control characters to escape.)
pub fn json(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_control_left_by_serde) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_control_left_by_serde(c) {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn is_control_left_by_serde(c: char) -> bool {
    is_control(c) && u32::from(c) >= 0x7f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hostile strings, and how each prints.
    const HOSTILE: &[(&str, &str, &str)] = &[
        // (what, raw, shown on one line)
        (
            "clear screen",
            "\u{1b}[2J\u{1b}[Hok",
            "\\u{1b}[2J\\u{1b}[Hok",
        ),
        (
            "OSC 52 clipboard write",
            "\u{1b}]52;c;Y3VybCBldmlsIHwgc2g=\u{7}",
            "\\u{1b}]52;c;Y3VybCBldmlsIHwgc2g=\\u{7}",
        ),
        (
            "window title",
            "\u{1b}]0;pwned\u{1b}\\",
            "\\u{1b}]0;pwned\\u{1b}\\",
        ),
        ("BEL", "ding\u{7}", "ding\\u{7}"),
        ("CR overprint", "Failed\rRunning", "Failed\\rRunning"),
        ("C1 CSI", "\u{9b}31mred", "\\u{9b}31mred"),
        ("C1 OSC", "\u{9d}0;t\u{9c}", "\\u{9d}0;t\\u{9c}"),
        (
            "backspace",
            "safe\u{8}\u{8}\u{8}\u{8}evil",
            "safe\\u{8}\\u{8}\\u{8}\\u{8}evil",
        ),
        ("DEL", "a\u{7f}b", "a\\u{7f}b"),
        ("NUL", "a\0b", "a\\u{0}b"),
        ("newline and tab", "a\nb\tc", "a\\nb\\tc"),
        ("plain text", "nginx:1.27 — ok ✓", "nginx:1.27 — ok ✓"),
    ];

    #[test]
    fn hostile_strings_print_as_visible_escapes() {
        for (what, raw, shown) in HOSTILE {
            assert_eq!(line(raw), *shown, "{what}");
            let shown = line(raw);
            assert!(!shown.chars().any(char::is_control), "{what}: {shown:?}");
        }
    }

    #[test]
    fn multi_line_text_keeps_its_newlines_and_tabs_only() {
        assert_eq!(text("a\nb\tc"), "a\nb\tc");
        assert_eq!(text("a\r\nb\u{1b}[2J"), "a\\r\nb\\u{1b}[2J");
        for (what, raw, _) in HOSTILE {
            let shown = text(raw);
            assert!(
                !shown
                    .chars()
                    .any(|c| c.is_control() && c != '\n' && c != '\t'),
                "{what}: {shown:?}"
            );
        }
    }

    #[test]
    fn clean_text_is_not_copied() {
        assert!(matches!(line("web-1"), Cow::Borrowed(_)));
        assert!(matches!(text("a\nb"), Cow::Borrowed(_)));
        assert!(matches!(json("{\"a\": \"b\"}"), Cow::Borrowed(_)));
    }

    #[test]
    fn json_output_escapes_what_serde_json_leaves_and_stays_the_same_value() {
        for (what, raw, _) in HOSTILE {
            let value = serde_json::json!({ "message": raw });
            let printed = json(&serde_json::to_string_pretty(&value).unwrap()).into_owned();
            assert!(
                !printed.chars().any(|c| c.is_control() && c != '\n'),
                "{what}: {printed:?}"
            );
            let read: serde_json::Value = serde_json::from_str(&printed).unwrap();
            assert_eq!(read, value, "{what}");
        }
    }
}
