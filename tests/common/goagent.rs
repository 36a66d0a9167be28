//! The Go agent's state file as it leaves it: the Go program in
//! `tests/fixtures/goagent-state`, built with Debian's Go and bbolt. A test
//! binary includes it as `#[path = "common/goagent.rs"] mod goagent;`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The fixture program, built once per test binary with Debian's Go and
/// bbolt (GOPATH mode, no module download). Without `go`: a failure in CI,
/// a skip elsewhere (None).
pub fn fixture_program(test: &str) -> Option<&'static Path> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/goagent-state");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("goagent-state");
        std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
        let program = out.join("goagent-state");
        let output = Command::new("go")
            .args(["build", "-o"])
            .arg(&program)
            .arg("main.go")
            .current_dir(&source)
            .env("GOPATH", "/usr/share/gocode")
            .env("GO111MODULE", "off")
            .env("GOFLAGS", "")
            .env(
                "GOCACHE",
                std::env::var_os("GOCACHE").unwrap_or_else(|| out.join("gocache").into()),
            )
            .output()
            .map_err(|e| {
                format!("go: {e} (install golang-go golang-github-coreos-bbolt-dev: hack/deps.sh)")
            })?;
        if !output.status.success() {
            return Err(format!(
                "go build of the fixture failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(program)
    });
    match built {
        Ok(program) => Some(program),
        Err(why) => {
            persys_test_support::skip(test, "the Go toolchain with bbolt", why);
            None
        }
    }
}
