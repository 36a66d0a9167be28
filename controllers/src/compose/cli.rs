//! The compose commands the controller runs — `up`, `stop`, `down` — and
//! the environment they run in.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;

use super::binary::{ComposeBinary, ComposeKind};
use super::command::Invocation;
use super::project::ProjectDir;

/// A compose command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `up -d --remove-orphans`: create, recreate (what changed) and start.
    Up,
    /// `stop`: stop the containers, keep them.
    Stop,
    /// `down --remove-orphans`: remove containers and networks; named
    /// volumes stay (no `-v`).
    Down,
}

impl Verb {
    fn args(self) -> &'static [&'static str] {
        match self {
            Verb::Up => &["up", "-d", "--remove-orphans"],
            Verb::Stop => &["stop"],
            Verb::Down => &["down", "--remove-orphans"],
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verb::Up => "up",
            Verb::Stop => "stop",
            Verb::Down => "down",
        })
    }
}

/// Variables of the agent's own environment a compose process gets: what
/// it needs to find the docker CLI, its plugins and registry credentials.
const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "XDG_RUNTIME_DIR",
    "DOCKER_CONFIG",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// True for a variable a spec may not set for the compose process: it
/// would point compose at another engine, file or project, or break how
/// the agent's binary is found. Such variables are not passed and not
/// written to `.env` (which v1 also reads for its own settings).
pub fn is_reserved_env(name: &str) -> bool {
    name.starts_with("DOCKER_")
        || matches!(
            name,
            "PATH" | "HOME" | "COMPOSE_FILE" | "COMPOSE_PROJECT_NAME" | "COMPOSE_PATH_SEPARATOR"
        )
}

/// The environment of a compose process: the inherited basics, the spec's
/// variables (so `${VAR}` interpolates; they take precedence over `.env`),
/// and `DOCKER_HOST`, so compose drives the engine the controller watches.
pub fn environment(
    agent_env: impl IntoIterator<Item = (String, String)>,
    docker_host: &str,
    spec_env: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = agent_env
        .into_iter()
        .filter(|(k, _)| INHERITED_ENV.contains(&k.as_str()))
        .collect();
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    for (key, value) in spec_env {
        if !is_reserved_env(key) {
            env.insert(key.clone(), value.clone());
        }
    }
    env.insert("DOCKER_HOST".into(), docker_host.to_string());
    env.into_iter().collect()
}

/// `verb` on the project in `dir`, named `project`.
pub fn invocation(
    binary: &ComposeBinary,
    project: &str,
    dir: &ProjectDir,
    verb: Verb,
    env: Vec<(String, String)>,
) -> Invocation {
    let mut args: Vec<OsString> = binary.leading_args.iter().map(Into::into).collect();
    if binary.kind == ComposeKind::V2 {
        // v1 writes no colours without a terminal, and would take an
        // unknown flag for a usage error that exits 0.
        args.extend(["--ansi".into(), "never".into()]);
    }
    args.extend([
        "--project-name".into(),
        project.into(),
        "--file".into(),
        dir.compose_file().into_os_string(),
        "--project-directory".into(),
        dir.path().as_os_str().to_owned(),
    ]);
    args.extend(verb.args().iter().map(Into::into));
    Invocation {
        program: binary.program.clone(),
        args,
        cwd: Some(dir.path().to_path_buf()),
        env,
    }
}

/// True when a command that exited 0 printed compose's usage instead of
/// doing anything: how v1 answers a flag it does not know.
pub fn printed_usage(stdout: &str, stderr: &str) -> bool {
    let says_usage = |text: &str| {
        text.lines()
            .any(|l| l.trim_start().starts_with("Usage:") || l.trim_start().starts_with("usage:"))
    };
    says_usage(stdout) || says_usage(stderr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_cannot_redirect_compose_but_does_interpolate() {
        let agent = [
            ("PATH".to_string(), "/usr/bin".to_string()),
            ("HOME".to_string(), "/root".to_string()),
            ("PERSYS_TLS_KEY".to_string(), "secret".to_string()),
            ("COMPOSE_PROJECT_NAME".to_string(), "other".to_string()),
        ];
        let spec = BTreeMap::from([
            ("GREETING".to_string(), "hi".to_string()),
            (
                "DOCKER_HOST".to_string(),
                "tcp://elsewhere:2375".to_string(),
            ),
            ("PATH".to_string(), "/tmp/evil".to_string()),
            ("COMPOSE_PROFILES".to_string(), "debug".to_string()),
        ]);
        let env: BTreeMap<_, _> = environment(agent, "unix:///run/d.sock", &spec)
            .into_iter()
            .collect();
        assert_eq!(env["GREETING"], "hi");
        assert_eq!(env["COMPOSE_PROFILES"], "debug");
        assert_eq!(env["DOCKER_HOST"], "unix:///run/d.sock");
        assert_eq!(env["PATH"], "/usr/bin");
        assert_eq!(env["HOME"], "/root");
        assert!(
            !env.contains_key("PERSYS_TLS_KEY"),
            "the agent's secrets stay"
        );
        assert!(!env.contains_key("COMPOSE_PROJECT_NAME"));
    }

    #[test]
    fn usage_texts_are_recognised() {
        assert!(printed_usage(
            "Define and run multi-container applications with Docker.\n\nUsage:\n  docker-compose [-f <arg>...]",
            ""
        ));
        assert!(!printed_usage("", "Creating p_web_1 ... done\n"));
    }
}
