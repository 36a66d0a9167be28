//! Which compose CLI runs projects: `PERSYS_COMPOSE_BINARY`, else `docker
//! compose` (v2), else `docker-compose` (v1). Both kinds take the same
//! flags for everything the controller does.

use std::fmt;
use std::time::Duration;

use super::command::{CommandRunner, Invocation};

/// A detection gives up on a `version` that takes longer than this.
const DETECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The two generations of compose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComposeKind {
    /// `docker-compose`, the Python program (1.x). No `ps --format json`;
    /// an unknown flag prints usage and exits 0.
    V1,
    /// The Go rewrite (2.x), usually the `docker compose` CLI plugin.
    V2,
}

impl ComposeKind {
    pub fn short_name(self) -> &'static str {
        match self {
            ComposeKind::V1 => "v1",
            ComposeKind::V2 => "v2",
        }
    }
}

impl fmt::Display for ComposeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

/// A compose CLI that answered `version --short`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposeBinary {
    /// The program: `docker`, `/usr/bin/docker-compose`…
    pub program: String,
    /// Words before the compose arguments: `["compose"]` for the plugin.
    pub leading_args: Vec<String>,
    pub kind: ComposeKind,
    /// As it reports it, without a leading `v`: `1.29.2`, `2.24.5`.
    pub version: String,
}

impl ComposeBinary {
    /// The command line it is run as: `docker compose`, `docker-compose`.
    pub fn command_line(&self) -> String {
        std::iter::once(self.program.as_str())
            .chain(self.leading_args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl fmt::Display for ComposeBinary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} ({})",
            self.command_line(),
            self.version,
            self.kind
        )
    }
}

/// Why no compose CLI can be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetectError {
    /// `PERSYS_COMPOSE_BINARY` names nothing.
    #[error("PERSYS_COMPOSE_BINARY is set but empty")]
    EmptyCommand,
    /// The configured command does not work as compose.
    #[error("`{command}` (PERSYS_COMPOSE_BINARY) is not a usable compose: {reason}")]
    Unusable { command: String, reason: String },
    /// Neither candidate works.
    #[error("neither `docker compose` ({v2}) nor `docker-compose` ({v1}) is usable")]
    NotFound { v2: String, v1: String },
}

/// Finds the compose CLI: the configured command line, else the first of
/// `docker compose` and `docker-compose` that reports a version. `env` is
/// the environment it runs with (PATH, HOME, DOCKER_HOST).
pub async fn detect(
    configured: Option<&str>,
    env: &[(String, String)],
) -> Result<ComposeBinary, DetectError> {
    let runner = CommandRunner::new(2, DETECT_TIMEOUT);
    if let Some(configured) = configured {
        let words: Vec<String> = configured.split_whitespace().map(String::from).collect();
        if words.is_empty() {
            return Err(DetectError::EmptyCommand);
        }
        return probe(&runner, words, env)
            .await
            .map_err(|reason| DetectError::Unusable {
                command: configured.trim().to_string(),
                reason,
            });
    }
    let v2 = match probe(&runner, vec!["docker".into(), "compose".into()], env).await {
        Ok(found) => return Ok(found),
        Err(reason) => reason,
    };
    match probe(&runner, vec!["docker-compose".into()], env).await {
        Ok(found) => Ok(found),
        Err(v1) => Err(DetectError::NotFound { v2, v1 }),
    }
}

/// Runs `<words> version --short`; the answer must be a version number
/// (an unknown flag makes v1 print usage and still exit 0).
async fn probe(
    runner: &CommandRunner,
    words: Vec<String>,
    env: &[(String, String)],
) -> Result<ComposeBinary, String> {
    let mut words = words.into_iter();
    let program = words.next().unwrap_or_default();
    let leading_args: Vec<String> = words.collect();
    let mut args: Vec<std::ffi::OsString> = leading_args.iter().map(Into::into).collect();
    args.extend(["version".into(), "--short".into()]);
    let output = runner
        .run(&Invocation {
            program: program.clone(),
            args,
            cwd: None,
            env: env.to_vec(),
        })
        .await
        .map_err(|e| e.to_string())?;
    if !output.status.success() {
        let said = last_line(&output.stderr).or_else(|| last_line(&output.stdout));
        return Err(format!(
            "exited with {}{}",
            output.status,
            said.map(|s| format!(": {s}")).unwrap_or_default()
        ));
    }
    let version = parse_version(&output.stdout).ok_or_else(|| {
        format!(
            "`version --short` printed {:?}, not a version",
            output.stdout.trim().chars().take(80).collect::<String>()
        )
    })?;
    let kind = if version.starts_with("1.") {
        ComposeKind::V1
    } else {
        ComposeKind::V2
    };
    Ok(ComposeBinary {
        program,
        leading_args,
        kind,
        version,
    })
}

fn last_line(text: &str) -> Option<String> {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| l.chars().take(200).collect())
}

/// `1.29.2`, `v2.24.5`, `2.27.0-desktop.1` → the version without a `v`;
/// anything else (a usage text) → none.
pub fn parse_version(stdout: &str) -> Option<String> {
    let text = stdout.trim();
    if text.lines().count() != 1 {
        return None;
    }
    let version = text.strip_prefix('v').unwrap_or(text);
    let numeric = version.split(['-', '+']).next().unwrap_or("");
    let parts: Vec<&str> = numeric.split('.').collect();
    let ok = parts.len() >= 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    ok.then(|| version.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_told_from_usage_texts() {
        assert_eq!(parse_version("1.29.2\n").as_deref(), Some("1.29.2"));
        assert_eq!(parse_version("v2.24.5").as_deref(), Some("2.24.5"));
        assert_eq!(
            parse_version("2.27.0-desktop.1").as_deref(),
            Some("2.27.0-desktop.1")
        );
        assert_eq!(
            parse_version("Define and run multi-container applications with Docker.\n\nUsage:"),
            None
        );
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("1"), None);
    }

    #[tokio::test]
    async fn a_configured_command_that_is_not_compose_is_refused_with_the_reason() {
        let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
        // `echo version --short` exits 0 and prints no version.
        let error = detect(Some("echo"), &env).await.unwrap_err();
        assert!(
            matches!(&error, DetectError::Unusable { command, reason }
                if command == "echo" && reason.contains("not a version")),
            "{error}"
        );
        let error = detect(Some("/nonexistent/compose"), &env)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/compose"),
            "{error}"
        );
        assert_eq!(
            detect(Some("  "), &env).await.unwrap_err(),
            DetectError::EmptyCommand
        );
    }
}
