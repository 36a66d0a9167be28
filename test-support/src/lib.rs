//! What every test binary of the workspace shares, whichever crate it
//! belongs to: one definition of "in CI", and what a test does when a
//! runtime it needs (the Docker engine, docker-compose, libvirtd) is missing.
//!
//! - In CI ([`in_ci`]) a missing runtime fails the test: [`skip`] panics,
//!   naming the runtime and how to start it.
//! - Elsewhere the test is skipped, and says so where it cannot be missed:
//!   a `SKIPPED:` line on stdout and stderr, and a line appended to the skip
//!   log ([`skip_log`]), which `hack/test.sh` counts and lists in its summary
//!   (cargo hides the output of passing tests, so the log is what makes a
//!   skip visible).
//! - Property tests share [`mutate`] (random edits of valid inputs) and
//!   [`compose`] (random compose files with the default policy's verdict).

pub mod compose;
pub mod mutate;

use std::fmt::Display;
use std::io::Write;
use std::path::PathBuf;

/// The variable that names the skip log; `hack/test.sh` sets it.
pub const SKIP_LOG_VAR: &str = "PERSYS_TEST_SKIP_LOG";

/// The marker that starts every skip line, on the console and in the log.
pub const SKIP_MARKER: &str = "SKIPPED:";

/// How to bring the runtimes up, in every skip and failure message.
pub const HOW_TO_START: &str = "start them with `bash hack/runtimes-up.sh`";

/// Whether this run is CI: `CI` is `true` or `1` (any case), as CI
/// services and `.ci/run` set it. Anything else, or unset, is not CI.
pub fn in_ci() -> bool {
    ci_value(std::env::var("CI").ok().as_deref())
}

fn ci_value(value: Option<&str>) -> bool {
    value.is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Where skips are recorded: `PERSYS_TEST_SKIP_LOG` when set, else
/// `test-skips.log` in the target directory this test binary was built in
/// (`<target>/<profile>/deps/<binary>`). None when neither can be found.
pub fn skip_log() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(SKIP_LOG_VAR).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let exe = std::env::current_exe().ok()?;
    let target = exe.parent()?.parent()?.parent()?;
    Some(target.join("test-skips.log"))
}

/// The test `test` cannot run because `missing` is not available (`error`
/// says why). In CI this panics, naming the runtime and how to start it.
/// Elsewhere it prints `SKIPPED: <test>: …` and records the skip in the
/// [`skip_log`]; the caller then returns.
pub fn skip(test: &str, missing: &str, error: &dyn Display) {
    let test = label(test);
    let why = format!("{missing} is not available ({error}); {HOW_TO_START}");
    if in_ci() {
        panic!("{test} cannot run in CI (CI=true): {why}. In CI a missing runtime fails the test.");
    }
    let line = format!("{SKIP_MARKER} {test}: {why}");
    println!("{line}");
    eprintln!("\n!!! {line}\n");
    if let Some(path) = skip_log() {
        record(&path, &line);
    }
}

/// The test's name as libtest gave it to the thread running it (the full
/// path, which says which binary and module), with the caller's own label
/// when that says something else.
fn label(test: &str) -> String {
    match std::thread::current().name() {
        Some(thread) if thread != "main" && thread != test => format!("{thread} ({test})"),
        _ => test.to_string(),
    }
}

/// Appends `line` to the log in one write (O_APPEND), so the test binaries
/// cargo runs one after another, and tests within one binary that run in
/// parallel, never interleave within a line.
fn record(path: &std::path::Path, line: &str) {
    let opened = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path);
    let written = opened.and_then(|mut file| file.write_all(format!("{line}\n").as_bytes()));
    if let Err(error) = written {
        eprintln!("cannot record the skip in {}: {error}", path.display());
    }
}

/// A YAML alias bomb ("billion laughs"): nine anchored lists, each of nine
/// aliases of the one before, about a billion strings expanded from under a
/// kilobyte. The keys are `{prefix}a` … `{prefix}i`; `tail` follows and may
/// use the last one as `*i`.
pub fn billion_laughs(prefix: &str, tail: &str) -> String {
    let mut text = format!("{prefix}a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    for pair in names.windows(2) {
        let (prev, next) = (pair[0], pair[1]);
        let refs = vec![format!("*{prev}"); 9].join(", ");
        text.push_str(&format!("{prefix}{next}: &{next} [{refs}]\n"));
    }
    text + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_is_true_or_1_and_nothing_else() {
        for yes in ["true", "TRUE", "True", "1"] {
            assert!(ci_value(Some(yes)), "{yes}");
        }
        for no in ["", "false", "0", "no", "yes"] {
            assert!(!ci_value(Some(no)), "{no}");
        }
        assert!(!ci_value(None));
    }

    #[test]
    fn a_skip_is_appended_to_the_log_one_line_each() {
        let dir = std::env::temp_dir().join(format!("persys-skip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips.log");
        record(&log, "SKIPPED: a: x");
        record(&log, "SKIPPED: b: y");
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text, "SKIPPED: a: x\nSKIPPED: b: y\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
