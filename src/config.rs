//! Configuration: every setting is an environment variable (the original
//! agent's names) and a flag of the same meaning.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use persys_controllers::docker::credentials::RegistryAuthFile;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value.trim()).map_err(|e| format!("{e} (examples: 30s, 5m, 1h30m)"))
}

/// A deadline: a duration, and not zero (which would fail every attempt).
fn parse_deadline(value: &str) -> Result<Duration, String> {
    match parse_duration(value)? {
        d if d.is_zero() => Err("must be longer than zero (examples: 90s, 10m)".to_string()),
        d => Ok(d),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum StoreCommand {
    /// Re-seal every stored value under a new state key, then replace the
    /// key file. Safe to run again after an interruption.
    RotateKey,
    /// Verify the state directory offline (on a copy): every record opens
    /// under the key and decodes, the log is whole, and objects agree with
    /// it. Exit status 0 when sound, 1 naming the problem.
    Check,
}

/// persys-agent: runs the containers, compose projects and VMs declared for
/// this node, and keeps them that way.
#[derive(Debug, Clone, Parser)]
#[command(name = "persys-agent", version, about, long_about = None)]
pub struct Config {
    /// gRPC (and metrics) bind address. Default: every address with mutual
    /// TLS, loopback only in plaintext.
    #[arg(long, env = "PERSYS_GRPC_ADDR")]
    pub grpc_addr: Option<IpAddr>,

    /// gRPC port.
    #[arg(long, env = "PERSYS_GRPC_PORT", default_value_t = 50051)]
    pub grpc_port: u16,

    /// Require mutual TLS. When false, gRPC is served in plaintext (for
    /// development only).
    #[arg(long, env = "PERSYS_TLS_ENABLED", default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub tls_enabled: bool,

    /// Server certificate (PEM). Reloaded when it changes on disk.
    #[arg(
        long,
        env = "PERSYS_TLS_CERT",
        default_value = "/etc/persys/certs/agent.crt"
    )]
    pub tls_cert: PathBuf,

    /// Server private key (PEM).
    #[arg(
        long,
        env = "PERSYS_TLS_KEY",
        default_value = "/etc/persys/certs/agent.key"
    )]
    pub tls_key: PathBuf,

    /// CA that client certificates must chain to (PEM).
    #[arg(
        long,
        env = "PERSYS_TLS_CA",
        default_value = "/etc/persys/certs/ca.crt"
    )]
    pub tls_ca: PathBuf,

    /// After SIGTERM or SIGINT, everything is down within this long:
    /// in-flight reconciles past it are cancelled (their compose commands
    /// killed). Under Kubernetes' 30 s grace and systemd's 90 s default.
    #[arg(long, env = "PERSYS_SHUTDOWN_TIMEOUT", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Authorization policy (YAML rules mapping client certificate names to
    /// roles), reloaded when it changes. Default: CN persys-scheduler is the
    /// scheduler, CN persysctl an operator, everyone else is refused.
    #[arg(long, env = "PERSYS_AUTHZ_FILE")]
    pub authz_file: Option<PathBuf>,

    /// State directory (the event log). A bbolt file here (the Go agent's
    /// state.db) is imported once, and the state goes in the directory
    /// beside it: /var/lib/persys/state for /var/lib/persys/state.db.
    #[arg(
        long,
        visible_alias = "state-dir",
        global = true,
        env = "PERSYS_STATE_PATH",
        default_value = "/var/lib/persys/state"
    )]
    pub state_path: PathBuf,

    /// Key the state is sealed under (created 0600 with a new store).
    /// Default: the state path with `.key` appended, beside the state
    /// directory and never inside it.
    #[arg(long, global = true, env = "PERSYS_STATE_KEY_FILE")]
    pub state_key_file: Option<PathBuf>,

    /// The change log keeps about this many entries (watches from older
    /// versions must list again).
    #[arg(long, env = "PERSYS_LOG_MAX_ENTRIES", default_value_t = 100_000)]
    pub log_max_entries: u64,

    /// The change log keeps nothing older than this (the newest entry stays).
    #[arg(long, env = "PERSYS_LOG_MAX_AGE", default_value = "24h", value_parser = parse_duration)]
    pub log_max_age: Duration,

    /// A Watch stream whose client reads too slowly is expired
    /// (RESOURCE_EXHAUSTED, naming the version to watch again from) once
    /// it is more than this many changes behind the log…
    #[arg(long, env = "PERSYS_WATCH_MAX_BACKLOG", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub watch_max_backlog: u64,

    /// … or once its events have waited this long without the client
    /// taking any.
    #[arg(long, env = "PERSYS_WATCH_MAX_UNREAD", default_value = "60s", value_parser = parse_deadline)]
    pub watch_max_unread: Duration,

    /// Run Docker containers.
    #[arg(long, env = "PERSYS_DOCKER_ENABLED", default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub docker_enabled: bool,

    /// Docker Engine endpoint.
    #[arg(
        long,
        env = "DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock"
    )]
    pub docker_host: String,

    /// An image pull still running after this long is abandoned, and the
    /// workload fails with IMAGE_PULL_FAILED (retried with the pull back-off).
    #[arg(long, env = "PERSYS_PULL_TIMEOUT", default_value = "10m", value_parser = parse_deadline)]
    pub pull_timeout: Duration,

    /// The `persys.scope` label of this agent's containers: it adopts,
    /// watches and removes only containers of its own scope, so two agents
    /// (or a benchmark beside a node's agent) can share one engine.
    #[arg(long, env = "PERSYS_DOCKER_SCOPE", default_value = persys_controllers::docker::config::DEFAULT_SCOPE)]
    pub docker_scope: String,

    /// Image pulls running at once. Pulls run outside the reconcile slots,
    /// so a slow registry holds only these.
    #[arg(long, env = "PERSYS_MAX_CONCURRENT_PULLS", default_value_t = persys_controllers::docker::config::DEFAULT_PULL_CONCURRENCY as u16, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_concurrent_pulls: u16,

    /// Reconciles running at once in each runtime's controller (Docker,
    /// Compose, VM each have this many slots).
    #[arg(long, env = "PERSYS_MAX_CONCURRENT_RECONCILES", default_value_t = persys_controllers::DEFAULT_CONCURRENCY as u16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub max_concurrent_reconciles: u16,

    /// Registry credentials for image pulls: a Docker `config.json`
    /// (`auths`, `credsStore`, `credHelpers`), read at each pull. Default:
    /// `$DOCKER_CONFIG/config.json`, else /root/.docker/config.json, when
    /// present. A file named here must be readable at every pull.
    #[arg(long, env = "PERSYS_REGISTRY_AUTH_FILE")]
    pub registry_auth_file: Option<PathBuf>,

    /// Run Docker Compose projects.
    #[arg(long, env = "PERSYS_COMPOSE_ENABLED", default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub compose_enabled: bool,

    /// Compose binary; detected (`docker compose`, then `docker-compose`) when unset.
    #[arg(long, env = "PERSYS_COMPOSE_BINARY")]
    pub compose_binary: Option<String>,

    /// A compose command still running after this long is killed with its
    /// process group.
    #[arg(long, env = "PERSYS_COMPOSE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub compose_timeout: Duration,

    /// Run libvirt virtual machines.
    #[arg(long, env = "PERSYS_VM_ENABLED", default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub vm_enabled: bool,

    /// libvirt connection URI.
    #[arg(long, env = "PERSYS_LIBVIRT_URI", default_value = "qemu:///system")]
    pub libvirt_uri: String,

    /// Graceful VM stop: ACPI shutdown, then destroy after this long.
    #[arg(long, env = "PERSYS_VM_STOP_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub vm_stop_timeout: Duration,

    /// VM domain type, `kvm` or `qemu` (TCG); default: `kvm` when /dev/kvm
    /// can be opened read-write.
    #[arg(long, env = "PERSYS_VM_DOMAIN_TYPE", value_parser = ["kvm", "qemu"])]
    pub vm_domain_type: Option<String>,

    /// Resync every workload periodically (the safety net behind events).
    #[arg(long, env = "PERSYS_RECONCILE_ENABLED", default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub reconcile_enabled: bool,

    /// How often every workload is resynced.
    #[arg(long, env = "PERSYS_RECONCILE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub reconcile_interval: Duration,

    /// How often every running workload's usage (CPU, memory, disk and
    /// network counters) is sampled: containers and compose services from
    /// their cgroups, VMs from libvirt's bulk statistics.
    #[arg(long, env = "PERSYS_USAGE_INTERVAL", default_value = "15s", value_parser = parse_deadline)]
    pub usage_interval: Duration,

    /// Log level or filter (error, warn, info, debug, trace, or a tracing filter).
    #[arg(long, env = "PERSYS_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format.
    #[arg(long, env = "PERSYS_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Node identifier (default: the host name).
    #[arg(long, env = "PERSYS_NODE_ID")]
    pub node_id: Option<String>,

    /// Version reported by HealthCheck (default: the build's version).
    #[arg(long = "reported-version", env = "PERSYS_VERSION")]
    pub reported_version: Option<String>,

    /// Port of the metrics and health HTTP endpoint.
    #[arg(long, env = "PERSYS_METRICS_PORT", default_value_t = 8089)]
    pub metrics_port: u16,

    /// Node workload policy (YAML): bind-mount roots, container
    /// privileges, compose features, VM networks, ceilings. Default: the
    /// secure default (`persys-agent policy show` prints the one in force).
    #[arg(long, global = true, env = "PERSYS_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,

    /// Policy override, host_paths.allowed_roots: bind mounts must lie
    /// under one of these (comma-separated; `/` for anywhere but the
    /// always-refused paths). Default: /var/lib/persys/volumes.
    #[arg(
        long,
        global = true,
        env = "PERSYS_ALLOWED_HOST_PATHS",
        value_delimiter = ','
    )]
    pub allowed_host_paths: Option<Vec<PathBuf>>,

    /// Policy override, containers.privileged: compose services may run
    /// privileged.
    #[arg(long, global = true, env = "PERSYS_POLICY_PRIVILEGED", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub policy_privileged: Option<bool>,

    /// Policy override, containers.host_network: compose services may use
    /// the host's network namespace.
    #[arg(long, global = true, env = "PERSYS_POLICY_HOST_NETWORK", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub policy_host_network: Option<bool>,

    /// Policy override, containers.devices: compose services may map host
    /// devices.
    #[arg(long, global = true, env = "PERSYS_POLICY_DEVICES", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub policy_devices: Option<bool>,

    /// Policy override, containers.capabilities: capabilities `cap_add`
    /// may name (comma-separated; ALL for any).
    #[arg(
        long,
        global = true,
        env = "PERSYS_POLICY_CAPABILITIES",
        value_delimiter = ','
    )]
    pub policy_capabilities: Option<Vec<String>>,

    /// Policy override, compose.build: compose may build images.
    #[arg(long, global = true, env = "PERSYS_POLICY_COMPOSE_BUILD", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub policy_compose_build: Option<bool>,

    /// Policy override, vm.networks: libvirt networks VMs may attach to
    /// (comma-separated). Default: default.
    #[arg(
        long,
        global = true,
        env = "PERSYS_POLICY_VM_NETWORKS",
        value_delimiter = ','
    )]
    pub policy_vm_networks: Option<Vec<String>>,

    /// Policy override, vm.bridges: host bridges VMs may attach to
    /// (comma-separated; never docker0). Default: none.
    #[arg(
        long,
        global = true,
        env = "PERSYS_POLICY_VM_BRIDGES",
        value_delimiter = ','
    )]
    pub policy_vm_bridges: Option<Vec<String>>,

    /// Policy override, ceilings.node.workloads: workloads stored on this
    /// node. Default: 1000.
    #[arg(long, global = true, env = "PERSYS_POLICY_MAX_WORKLOADS")]
    pub policy_max_workloads: Option<u64>,

    /// Policy override, ceilings.node.vcpus. Default: 4 × the node's CPUs.
    #[arg(long, global = true, env = "PERSYS_POLICY_NODE_VCPUS")]
    pub policy_node_vcpus: Option<u64>,

    /// Policy override, ceilings.node.memory_mib. Default: the node's memory.
    #[arg(long, global = true, env = "PERSYS_POLICY_NODE_MEMORY_MIB")]
    pub policy_node_memory_mib: Option<u64>,

    /// Policy override, ceilings.node.disk_gib. Default: the size of the
    /// root filesystem.
    #[arg(long, global = true, env = "PERSYS_POLICY_NODE_DISK_GIB")]
    pub policy_node_disk_gib: Option<u64>,

    /// The scheduler's AgentControl service (host:port). When set, the agent
    /// registers with it and heartbeats; unset, the agent runs standalone.
    #[arg(long, env = "PERSYS_SCHEDULER_ADDR", value_parser = parse_host_port)]
    pub scheduler_addr: Option<String>,

    /// Dial the scheduler in plaintext instead of mutual TLS with the agent's
    /// own certificate (for development only).
    #[arg(long, env = "PERSYS_SCHEDULER_INSECURE", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub scheduler_insecure: bool,

    /// Client certificate (PEM, extended key usage clientAuth) the agent
    /// presents to the scheduler. Default: PERSYS_TLS_CERT, which then needs
    /// clientAuth besides serverAuth. Read again at every registration.
    #[arg(long, env = "PERSYS_SCHEDULER_TLS_CERT")]
    pub scheduler_tls_cert: Option<PathBuf>,

    /// Private key (PEM) of PERSYS_SCHEDULER_TLS_CERT.
    #[arg(long, env = "PERSYS_SCHEDULER_TLS_KEY")]
    pub scheduler_tls_key: Option<PathBuf>,

    /// host:port the scheduler dials this agent at (default: the bind
    /// address when it is a specific one, else the local address of the
    /// route toward the scheduler; with PERSYS_GRPC_PORT).
    #[arg(long, env = "PERSYS_AGENT_GRPC_ENDPOINT", value_parser = parse_host_port)]
    pub agent_grpc_endpoint: Option<String>,

    /// Node labels sent to the scheduler: key=value pairs, comma-separated.
    #[arg(long, env = "PERSYS_NODE_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub node_labels: Vec<(String, String)>,

    /// Cluster this node belongs to, sent to the scheduler.
    #[arg(long, env = "PERSYS_CLUSTER_ID")]
    pub cluster_id: Option<String>,

    /// Region of the node, sent as the label `region`.
    #[arg(long, env = "PERSYS_NODE_REGION")]
    pub node_region: Option<String>,

    /// Environment of the node (prod, staging…), sent as the label `env`.
    #[arg(long, env = "PERSYS_NODE_ENV")]
    pub node_env: Option<String>,

    /// A one-shot command instead of running the agent.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// One-shot commands; without one, the agent runs.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Maintain the state store (offline: stop the agent first).
    Store {
        #[command(subcommand)]
        action: StoreCommand,
    },
    /// Authorization: which role the policy in force gives a caller.
    Authz {
        #[command(subcommand)]
        action: AuthzCommand,
    },
    /// The node's workload policy.
    Policy {
        #[command(subcommand)]
        action: PolicyCommand,
    },
    /// Import the Go agent's state (its bbolt state.db) into the state
    /// directory, through the checks an apply passes. Offline: stop both
    /// agents first. Workloads already there at the same revision are
    /// skipped. Exit status 0 when every workload is (or would be)
    /// imported, 3 when some are refused (listed with the rule), 1 when
    /// the file or the state directory cannot be used.
    Import {
        /// The Go agent's state file (PERSYS_STATE_PATH of the Go agent,
        /// by default /var/lib/persys/state.db). Opened read-only.
        #[arg(long)]
        from: PathBuf,
        /// Print what would be imported (id, type, desired state, revision,
        /// refusals) and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum PolicyCommand {
    /// Prints the workload policy in force (PERSYS_POLICY_FILE, else the
    /// default, with the environment's overrides) as YAML. Exits 2 on a
    /// bad file or override.
    Show,
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum AuthzCommand {
    /// Prints the identity a client certificate carries and the role the
    /// policy (PERSYS_AUTHZ_FILE, else the default) gives it. Exits 0 with
    /// a role, 1 when every call would be refused, 2 on a bad file.
    Check {
        /// The client certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
    },
}

/// `host:port` (a leading `http://` or `https://` is dropped: whether TLS is
/// used is PERSYS_SCHEDULER_INSECURE's call). IPv6 hosts in brackets.
fn parse_host_port(value: &str) -> Result<String, String> {
    let trimmed = value.trim().trim_end_matches('/');
    let bare = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"))
        .unwrap_or(trimmed);
    let (host, port) = bare
        .rsplit_once(':')
        .ok_or_else(|| format!("{value:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{value:?}: {port:?} is not a port"))?;
    let unbracketed = host.trim_start_matches('[').trim_end_matches(']');
    if unbracketed.is_empty() || port == 0 || unbracketed.contains(['/', ' ']) {
        return Err(format!("{value:?} is not host:port"));
    }
    if unbracketed.contains(':') && !host.starts_with('[') {
        return Err(format!(
            "{value:?}: write an IPv6 host in brackets, [{host}]:{port}"
        ));
    }
    Ok(format!("{host}:{port}"))
}

fn parse_label(value: &str) -> Result<(String, String), String> {
    let (key, label) = value
        .split_once('=')
        .ok_or_else(|| format!("{value:?} is not key=value"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("{value:?} has an empty key"));
    }
    Ok((key.to_string(), label.trim().to_string()))
}

impl Config {
    /// Parses flags and environment; on a bad value prints which variable
    /// is wrong and exits non-zero.
    pub fn load() -> Config {
        match Config::try_parse().and_then(Config::checked) {
            Ok(config) => config,
            Err(error) => exit_with(error),
        }
    }

    pub fn try_parse_from_iter<I, T>(args: I) -> Result<Config, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Config::try_parse_from(args).and_then(Config::checked)
    }

    /// Rules across settings. (clap's `requires` does not see values that
    /// come from the environment.)
    fn checked(self) -> Result<Config, clap::Error> {
        if self.scheduler_tls_cert.is_some() != self.scheduler_tls_key.is_some() {
            let (set, unset) = if self.scheduler_tls_cert.is_some() {
                ("PERSYS_SCHEDULER_TLS_CERT", "PERSYS_SCHEDULER_TLS_KEY")
            } else {
                ("PERSYS_SCHEDULER_TLS_KEY", "PERSYS_SCHEDULER_TLS_CERT")
            };
            return Err(Config::command().error(
                clap::error::ErrorKind::MissingRequiredArgument,
                format!(
                    "{set} is set but {unset} is not: the scheduler client certificate needs both"
                ),
            ));
        }
        Ok(self)
    }

    /// The address gRPC and metrics listen on: the one given, else every
    /// address with mutual TLS and loopback in plaintext (where nothing
    /// proves who calls, only this host may).
    pub fn bind_addr(&self) -> IpAddr {
        match self.grpc_addr {
            Some(addr) => addr,
            None if self.tls_enabled => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            None => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        }
    }

    pub fn grpc_socket(&self) -> SocketAddr {
        SocketAddr::new(self.bind_addr(), self.grpc_port)
    }

    /// The state key file: as given, or beside the state directory.
    pub fn state_key_file(&self) -> PathBuf {
        self.state_key_file
            .clone()
            .unwrap_or_else(|| crate::store::seal::default_key_file(&self.state_path))
    }

    /// The Docker `config.json` pulls take credentials from: the one
    /// named, else the default location, which may be absent.
    pub fn registry_auth(&self) -> RegistryAuthFile {
        registry_auth(
            self.registry_auth_file.as_deref(),
            std::env::var_os("DOCKER_CONFIG"),
        )
    }

    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(hostname)
    }

    /// How far a Watch client may fall behind.
    pub fn watch_bounds(&self) -> crate::server::outbox::WatchBounds {
        crate::server::outbox::WatchBounds {
            max_backlog: self.watch_max_backlog,
            max_unread: self.watch_max_unread,
        }
    }

    pub fn agent_version(&self) -> String {
        self.reported_version
            .clone()
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
    }
}

/// Where the Docker CLI keeps root's `config.json` without `DOCKER_CONFIG`.
pub const DEFAULT_REGISTRY_AUTH_FILE: &str = "/root/.docker/config.json";

/// The registry auth file: `named` (required), else
/// `$DOCKER_CONFIG/config.json`, else [`DEFAULT_REGISTRY_AUTH_FILE`] (both
/// optional).
fn registry_auth(named: Option<&Path>, docker_config: Option<OsString>) -> RegistryAuthFile {
    match (named, docker_config.filter(|d| !d.is_empty())) {
        (Some(path), _) => RegistryAuthFile {
            path: path.to_path_buf(),
            required: true,
        },
        (None, Some(dir)) => RegistryAuthFile {
            path: PathBuf::from(dir).join("config.json"),
            required: false,
        },
        (None, None) => RegistryAuthFile {
            path: PathBuf::from(DEFAULT_REGISTRY_AUTH_FILE),
            required: false,
        },
    }
}

/// The environment variable behind a flag named in a clap error, if any.
pub fn env_of_error(error: &clap::Error) -> Option<String> {
    let invalid = error.get(clap::error::ContextKind::InvalidArg)?.to_string();
    let long = invalid.split_whitespace().next()?.trim_start_matches("--");
    Config::command()
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
}

fn exit_with(error: clap::Error) -> ! {
    use clap::error::ErrorKind;
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => error.exit(),
        _ => {
            let detail = error.render().to_string();
            let detail = detail.trim().trim_start_matches("error: ");
            match env_of_error(&error) {
                Some(var) => eprintln!("persys-agent: invalid configuration: {var}: {detail}"),
                None => eprintln!("persys-agent: invalid configuration: {detail}"),
            }
            std::process::exit(2);
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_original_agent() {
        let config = Config::try_parse_from_iter(["persys-agent"]).unwrap();
        assert_eq!(config.grpc_socket().to_string(), "0.0.0.0:50051");
        assert!(config.tls_enabled);
        assert_eq!(config.state_path, PathBuf::from("/var/lib/persys/state"));
        assert_eq!(config.reconcile_interval, Duration::from_secs(30));
        assert_eq!(config.libvirt_uri, "qemu:///system");
        assert_eq!(config.metrics_port, 8089);
        assert_eq!(config.pull_timeout, Duration::from_secs(600));
        assert_eq!(config.max_concurrent_pulls, 2);
        assert_eq!(
            usize::from(config.max_concurrent_reconciles),
            persys_controllers::DEFAULT_CONCURRENCY
        );
        assert_eq!(
            config.watch_bounds(),
            crate::server::outbox::WatchBounds::default()
        );
    }

    #[test]
    fn the_pull_deadline_reads_durations_as_operators_write_them() {
        let config =
            Config::try_parse_from_iter(["persys-agent", "--pull-timeout", "90s"]).unwrap();
        assert_eq!(config.pull_timeout, Duration::from_secs(90));
        for bad in ["0s", "soon"] {
            let error =
                Config::try_parse_from_iter(["persys-agent", "--pull-timeout", bad]).unwrap_err();
            assert_eq!(
                env_of_error(&error).as_deref(),
                Some("PERSYS_PULL_TIMEOUT"),
                "{bad}"
            );
        }
    }

    #[test]
    fn registry_credentials_come_from_the_named_file_else_where_docker_keeps_them() {
        let config = Config::try_parse_from_iter([
            "persys-agent",
            "--registry-auth-file",
            "/etc/persys/registry/config.json",
        ])
        .unwrap();
        assert_eq!(
            config.registry_auth_file,
            Some(PathBuf::from("/etc/persys/registry/config.json"))
        );
        let named = registry_auth(config.registry_auth_file.as_deref(), Some("/d".into()));
        assert_eq!(
            named,
            RegistryAuthFile {
                path: "/etc/persys/registry/config.json".into(),
                required: true
            }
        );
        let from_env = registry_auth(None, Some("/srv/docker".into()));
        assert_eq!(from_env.path, PathBuf::from("/srv/docker/config.json"));
        assert!(!from_env.required, "the default file may be absent");
        let fallback = registry_auth(None, Some("".into()));
        assert_eq!(fallback.path, PathBuf::from(DEFAULT_REGISTRY_AUTH_FILE));
        assert!(!fallback.required);
        assert_eq!(registry_auth(None, None), fallback);
    }

    #[test]
    fn plaintext_binds_to_loopback_unless_an_address_is_given() {
        let config =
            Config::try_parse_from_iter(["persys-agent", "--tls-enabled", "false"]).unwrap();
        assert_eq!(config.grpc_socket().to_string(), "127.0.0.1:50051");
        let config = Config::try_parse_from_iter([
            "persys-agent",
            "--tls-enabled",
            "false",
            "--grpc-addr",
            "0.0.0.0",
        ])
        .unwrap();
        assert_eq!(config.grpc_socket().to_string(), "0.0.0.0:50051");
    }

    #[test]
    fn the_state_key_sits_beside_the_state_directory_unless_given() {
        let config = Config::try_parse_from_iter(["persys-agent"]).unwrap();
        assert_eq!(config.command, None);
        assert_eq!(
            config.state_key_file(),
            PathBuf::from("/var/lib/persys/state.key")
        );
        let config =
            Config::try_parse_from_iter(["persys-agent", "--state-key-file", "/etc/persys/k"])
                .unwrap();
        assert_eq!(config.state_key_file(), PathBuf::from("/etc/persys/k"));
    }

    #[test]
    fn store_rotate_key_is_a_subcommand_taking_the_state_flags() {
        let config = Config::try_parse_from_iter([
            "persys-agent",
            "store",
            "rotate-key",
            "--state-path",
            "/srv/state",
        ])
        .unwrap();
        assert_eq!(
            config.command,
            Some(Command::Store {
                action: StoreCommand::RotateKey
            })
        );
        assert_eq!(config.state_path, PathBuf::from("/srv/state"));
        assert_eq!(config.state_key_file(), PathBuf::from("/srv/state.key"));
    }

    #[test]
    fn store_check_takes_the_state_directory_as_state_dir() {
        let config = Config::try_parse_from_iter([
            "persys-agent",
            "store",
            "check",
            "--state-dir",
            "/srv/state",
        ])
        .unwrap();
        assert_eq!(
            config.command,
            Some(Command::Store {
                action: StoreCommand::Check
            })
        );
        assert_eq!(config.state_path, PathBuf::from("/srv/state"));
        assert_eq!(config.state_key_file(), PathBuf::from("/srv/state.key"));
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let error =
            Config::try_parse_from_iter(["persys-agent", "--grpc-port", "http"]).unwrap_err();
        assert_eq!(env_of_error(&error).as_deref(), Some("PERSYS_GRPC_PORT"));
        let error = Config::try_parse_from_iter(["persys-agent", "--reconcile-interval", "soon"])
            .unwrap_err();
        assert_eq!(
            env_of_error(&error).as_deref(),
            Some("PERSYS_RECONCILE_INTERVAL")
        );
    }

    #[test]
    fn booleans_accept_the_usual_spellings() {
        for (value, expected) in [
            ("false", false),
            ("0", false),
            ("no", false),
            ("true", true),
            ("1", true),
        ] {
            let config =
                Config::try_parse_from_iter(["persys-agent", "--tls-enabled", value]).unwrap();
            assert_eq!(config.tls_enabled, expected, "{value}");
        }
    }

    #[test]
    fn the_scheduler_link_is_off_unless_an_address_is_given() {
        let config = Config::try_parse_from_iter(["persys-agent"]).unwrap();
        assert_eq!(config.scheduler_addr, None);
        assert!(!config.scheduler_insecure);
        assert!(config.node_labels.is_empty());
    }

    #[test]
    fn scheduler_addresses_are_host_port_with_an_optional_scheme() {
        for (value, expected) in [
            ("sched:8085", "sched:8085"),
            ("https://sched.example:8085/", "sched.example:8085"),
            ("http://10.0.0.1:8085", "10.0.0.1:8085"),
            ("[fd00::1]:8085", "[fd00::1]:8085"),
        ] {
            let config =
                Config::try_parse_from_iter(["persys-agent", "--scheduler-addr", value]).unwrap();
            assert_eq!(config.scheduler_addr.as_deref(), Some(expected), "{value}");
        }
        for value in ["sched", "sched:http", ":8085", "fd00::1:8085", "sched:0"] {
            let error = Config::try_parse_from_iter(["persys-agent", "--scheduler-addr", value])
                .unwrap_err();
            assert_eq!(
                env_of_error(&error).as_deref(),
                Some("PERSYS_SCHEDULER_ADDR"),
                "{value}"
            );
        }
    }

    #[test]
    fn the_scheduler_client_certificate_defaults_to_the_agent_s_and_comes_with_its_key() {
        let config = Config::try_parse_from_iter(["persys-agent"]).unwrap();
        assert_eq!(config.scheduler_tls_cert, None);
        let config = Config::try_parse_from_iter([
            "persys-agent",
            "--scheduler-tls-cert",
            "/c/node.crt",
            "--scheduler-tls-key",
            "/c/node.key",
        ])
        .unwrap();
        assert_eq!(
            config.scheduler_tls_cert,
            Some(PathBuf::from("/c/node.crt"))
        );
        assert_eq!(config.scheduler_tls_key, Some(PathBuf::from("/c/node.key")));
        for alone in ["--scheduler-tls-cert", "--scheduler-tls-key"] {
            assert!(Config::try_parse_from_iter(["persys-agent", alone, "/c/x"]).is_err());
        }
    }

    #[test]
    fn node_labels_are_comma_separated_key_value_pairs() {
        let config = Config::try_parse_from_iter([
            "persys-agent",
            "--node-labels",
            "zone=a, rack = r7,gpu=",
        ])
        .unwrap();
        assert_eq!(
            config.node_labels,
            [
                ("zone".to_string(), "a".to_string()),
                ("rack".to_string(), "r7".to_string()),
                ("gpu".to_string(), String::new()),
            ]
        );
        let error =
            Config::try_parse_from_iter(["persys-agent", "--node-labels", "zone"]).unwrap_err();
        assert_eq!(env_of_error(&error).as_deref(), Some("PERSYS_NODE_LABELS"));
    }
}
