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

/// Variables of the agent's own environment a compose process gets, read
/// once when the controller is made. Nothing else of the agent's
/// environment, and nothing of a spec, is in a compose process's: the spec's
/// variables reach compose only through the project's `.env`.
pub const INHERITED_ENV: &[&str] = &[
    // Finds the docker CLI, its compose plugin and credential helpers.
    "PATH",
    // Where the docker CLI and compose read `~/.docker/config.json`
    // (registry credentials, the plugin directory).
    "HOME",
    // The same file elsewhere, when the operator moved it.
    "DOCKER_CONFIG",
    // TLS to a `tcp://` engine: the operator's settings for the engine the
    // agent itself talks to (`DOCKER_HOST` is set by the agent, below).
    "DOCKER_CERT_PATH",
    "DOCKER_TLS_VERIFY",
    // Temporary files (v1 is Python; v2 buffers builds).
    "TMPDIR",
    // v1 reads compose files in the locale's encoding: without a UTF-8
    // locale a non-ASCII file fails.
    "LANG",
    "LC_ALL",
    // A node behind a proxy reaches a remote engine (and, with builds
    // allowed, registries) through it. Both spellings are read.
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
];
// Left out on purpose: `DOCKER_CONTEXT` (a context names an engine, and
// compose must drive the one the controller watches, which `DOCKER_HOST`
// says), `USER`, `XDG_*`, `SSL_CERT_*`, and every `LD_*`.

/// The `PATH` of a compose process when the agent has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// True for a variable a spec may not set, even in the project's `.env`:
/// compose reads these as its own settings (v1 takes `DOCKER_*` and
/// `COMPOSE_*` from `.env`; v2 copies `.env` into its own environment,
/// every variable in 2.17 to 2.23, `COMPOSE_*` since), and from there they
/// reach the processes compose starts (credential helpers, buildx) as root.
/// `COMPOSE_PROFILES` is the one compose setting a spec chooses.
pub fn is_reserved_env(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    (upper.starts_with("COMPOSE_") && upper != "COMPOSE_PROFILES")
        || ["DOCKER_", "LD_", "BUILDKIT_", "BUILDX_"]
            .iter()
            .any(|prefix| upper.starts_with(prefix))
        || upper == "GLIBC_TUNABLES"
        || INHERITED_ENV.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// The environment every compose process runs in: [`INHERITED_ENV`] taken
/// from the agent's environment once, `DOCKER_HOST` set to the engine the
/// controller watches, and per command `COMPOSE_PROJECT_NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposeEnvironment {
    vars: BTreeMap<String, String>,
}

impl ComposeEnvironment {
    /// From the agent's environment (`std::env::vars()`), for compose
    /// driving the engine at `docker_host`.
    pub fn new(
        agent_env: impl IntoIterator<Item = (String, String)>,
        docker_host: &str,
    ) -> ComposeEnvironment {
        let mut vars: BTreeMap<String, String> = agent_env
            .into_iter()
            .filter(|(k, _)| INHERITED_ENV.contains(&k.as_str()))
            .collect();
        vars.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.into());
        vars.insert("DOCKER_HOST".into(), docker_host.to_string());
        ComposeEnvironment { vars }
    }

    /// Compose reads registry credentials (and finds its CLI plugins) in
    /// `dir` instead of where the agent's environment says.
    pub fn with_docker_config(mut self, dir: &std::path::Path) -> ComposeEnvironment {
        self.vars
            .insert("DOCKER_CONFIG".into(), dir.display().to_string());
        self
    }

    /// The whole environment of a compose command on `project` (none: a
    /// command on no project, such as `version`).
    pub fn for_command(&self, project: Option<&str>) -> Vec<(String, String)> {
        let mut vars = self.vars.clone();
        if let Some(project) = project {
            // The same as `--project-name`; set here too so a
            // `COMPOSE_PROJECT_NAME` in `.env` cannot say otherwise.
            vars.insert("COMPOSE_PROJECT_NAME".into(), project.to_string());
        }
        vars.into_iter().collect()
    }

    /// What compose interpolates a project's file from: the `.env` the
    /// spec's variables are written to (reserved names left out), under
    /// the process's own environment, which takes precedence.
    pub fn interpolation(
        &self,
        spec_env: &BTreeMap<String, String>,
        project: &str,
    ) -> BTreeMap<String, String> {
        let mut vars: BTreeMap<String, String> = spec_env
            .iter()
            .filter(|(k, _)| !is_reserved_env(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.extend(self.for_command(Some(project)));
        vars
    }
}

/// One compose command on a project.
#[derive(Debug, Clone, Copy)]
pub struct Command<'a> {
    pub verb: Verb,
    /// The services it is limited to; none: every service. An `up` of
    /// some services leaves the others alone (`--no-deps`): a repair
    /// brings back what exited, not a finished dependency.
    pub services: &'a [String],
    /// The folder holds the agent's override file (see
    /// [`super::project::OVERRIDE_FILE`]), passed after the compose file.
    pub labelled: bool,
}

/// `command` on the project in `dir`, named `project`, in `environment`.
pub fn invocation(
    binary: &ComposeBinary,
    project: &str,
    dir: &ProjectDir,
    command: Command<'_>,
    environment: &ComposeEnvironment,
) -> Invocation {
    let Command {
        verb,
        services,
        labelled,
    } = command;
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
    ]);
    if labelled {
        args.extend(["--file".into(), dir.override_file().into_os_string()]);
    }
    args.extend([
        "--project-directory".into(),
        dir.path().as_os_str().to_owned(),
    ]);
    args.extend(verb.args().iter().map(Into::into));
    // v1's parser reads no `--`: a name that could be taken for a flag
    // makes the command one on every service instead.
    if !services.is_empty() && !services.iter().any(|s| s.starts_with('-')) {
        if verb == Verb::Up {
            args.push("--no-deps".into());
        }
        args.extend(services.iter().map(Into::into));
    }
    Invocation {
        program: binary.program.clone(),
        args,
        cwd: Some(dir.path().to_path_buf()),
        env: environment.for_command(Some(project)),
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

    fn agent_env() -> Vec<(String, String)> {
        [
            ("PATH", "/usr/bin"),
            ("HOME", "/root"),
            ("PERSYS_TLS_KEY", "secret"),
            ("COMPOSE_PROJECT_NAME", "other"),
            ("LD_PRELOAD", "/agent.so"),
            ("DOCKER_CONTEXT", "elsewhere"),
            ("DOCKER_HOST", "tcp://agent-env:2375"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn a_compose_command_gets_the_allow_list_and_nothing_of_the_spec() {
        let environment = ComposeEnvironment::new(agent_env(), "unix:///run/d.sock");
        let dir = ProjectDir::for_workload(std::path::Path::new("/state/compose"), "shop").unwrap();
        let binary = ComposeBinary {
            program: "docker-compose".into(),
            leading_args: Vec::new(),
            kind: ComposeKind::V1,
            version: "1.29.2".into(),
        };
        let up = Command {
            verb: Verb::Up,
            services: &[],
            labelled: false,
        };
        let invocation = invocation(&binary, "shop", &dir, up, &environment);
        assert_eq!(
            invocation
                .args
                .last()
                .map(|a| a.to_string_lossy().into_owned()),
            Some("--remove-orphans".to_string())
        );
        let repair = Command {
            services: &["web".to_string()],
            ..up
        };
        let limited = super::invocation(&binary, "shop", &dir, repair, &environment);
        let tail: Vec<String> = limited.args[limited.args.len() - 3..]
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(tail, ["--remove-orphans", "--no-deps", "web"]);
        let env: BTreeMap<_, _> = invocation.env.into_iter().collect();
        assert_eq!(
            env.keys().map(String::as_str).collect::<Vec<_>>(),
            ["COMPOSE_PROJECT_NAME", "DOCKER_HOST", "HOME", "PATH"]
        );
        assert_eq!(env["DOCKER_HOST"], "unix:///run/d.sock");
        assert_eq!(env["COMPOSE_PROJECT_NAME"], "shop");
        assert_eq!(env["PATH"], "/usr/bin");
        let bare = ComposeEnvironment::new(Vec::new(), "unix:///run/d.sock");
        assert_eq!(
            bare.for_command(None),
            [
                ("DOCKER_HOST".to_string(), "unix:///run/d.sock".to_string()),
                ("PATH".to_string(), DEFAULT_PATH.to_string()),
            ]
        );
    }

    #[test]
    fn compose_reads_the_registry_credentials_the_agent_pulls_with() {
        let mut env = agent_env();
        env.push(("DOCKER_CONFIG".into(), "/root/.docker".into()));
        let environment = ComposeEnvironment::new(env, "unix:///run/d.sock")
            .with_docker_config(std::path::Path::new("/etc/persys/registry"));
        let vars: BTreeMap<_, _> = environment.for_command(Some("shop")).into_iter().collect();
        assert_eq!(vars["DOCKER_CONFIG"], "/etc/persys/registry");
        // A spec's `.env` cannot point compose elsewhere.
        let spec_env = BTreeMap::from([("DOCKER_CONFIG".to_string(), "/tmp/evil".to_string())]);
        let interpolated = environment.interpolation(&spec_env, "shop");
        assert_eq!(interpolated["DOCKER_CONFIG"], "/etc/persys/registry");
    }

    #[test]
    fn spec_variables_interpolate_under_the_process_environment() {
        let environment = ComposeEnvironment::new(agent_env(), "unix:///run/d.sock");
        let spec = BTreeMap::from([
            ("GREETING".to_string(), "hi".to_string()),
            ("HOME".to_string(), "/tmp/evil".to_string()),
            ("COMPOSE_PROFILES".to_string(), "debug".to_string()),
            ("LD_PRELOAD".to_string(), "/tmp/evil.so".to_string()),
        ]);
        let vars = environment.interpolation(&spec, "shop");
        assert_eq!(vars["GREETING"], "hi");
        assert_eq!(vars["COMPOSE_PROFILES"], "debug");
        assert_eq!(vars["HOME"], "/root");
        assert_eq!(vars["COMPOSE_PROJECT_NAME"], "shop");
        assert!(!vars.contains_key("LD_PRELOAD"));
        assert!(!vars.contains_key("PERSYS_TLS_KEY"));
    }

    #[test]
    fn names_compose_or_the_loader_read_are_reserved() {
        for name in [
            "LD_PRELOAD",
            "ld_library_path",
            "PATH",
            "HOME",
            "DOCKER_HOST",
            "DOCKER_CONTEXT",
            "COMPOSE_FILE",
            "COMPOSE_PROJECT_NAME",
            "compose_env_files",
            "BUILDKIT_HOST",
            "GLIBC_TUNABLES",
            "https_proxy",
        ] {
            assert!(is_reserved_env(name), "{name}");
        }
        for name in ["GREETING", "COMPOSE_PROFILES", "DATA_PATH", "MY_HOME"] {
            assert!(!is_reserved_env(name), "{name}");
        }
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
