//! The command line: flags, environment variables and subcommands.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use persys_api::v1::WorkloadType;

/// persysctl: applies, lists, describes and watches the workloads of a
/// persys-agent over mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "persysctl", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// Where the agent is and how to prove who we are to it.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection")]
pub struct ConnectionArgs {
    /// The agent's gRPC address, HOST:PORT.
    #[arg(
        long,
        env = "PERSYSCTL_SERVER",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    pub server: String,

    /// CA certificate (PEM) the agent's certificate must chain to
    /// [default: ~/.persys/ca.crt].
    #[arg(long, env = "PERSYSCTL_CA", value_name = "FILE", global = true)]
    pub ca: Option<PathBuf>,

    /// Client certificate (PEM) [default: ~/.persys/client.crt].
    #[arg(long, env = "PERSYSCTL_CERT", value_name = "FILE", global = true)]
    pub cert: Option<PathBuf>,

    /// Client private key (PEM) [default: ~/.persys/client.key].
    #[arg(long, env = "PERSYSCTL_KEY", value_name = "FILE", global = true)]
    pub key: Option<PathBuf>,

    /// Name the agent's certificate must be valid for [default: the host
    /// of --server; an IP address is checked against the IP SANs].
    #[arg(long, value_name = "NAME", global = true)]
    pub tls_server_name: Option<String>,

    /// Plaintext gRPC, for an agent run with PERSYS_TLS_ENABLED=false.
    #[arg(long, global = true)]
    pub insecure: bool,

    /// How long a request may take, e.g. 10s or 1m; with `delete --wait`,
    /// how long to wait [default: 10s; 2m for delete --wait].
    #[arg(long, env = "PERSYSCTL_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, global = true)]
    pub timeout: Option<Duration>,
}

/// Request timeout when --timeout is not given.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// `delete --wait` timeout when --timeout is not given.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(120);

fn parse_duration(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value.trim())
        .map_err(|e| format!("{e} (examples: 500ms, 10s, 2m)"))?;
    if duration.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(duration)
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update workloads from manifest files (YAML or JSON).
    Apply(ApplyArgs),
    /// List workloads, or show one.
    Get(GetArgs),
    /// Show one workload in detail: spec, status, conditions, runtime and
    /// events.
    Describe(DescribeArgs),
    /// Delete workloads.
    Delete(DeleteArgs),
    /// Print a line for every change of the workloads, until Ctrl-C.
    Watch(WatchArgs),
    /// Print a workload's output: container logs, compose services' logs or
    /// a VM's serial console.
    Logs(LogsArgs),
    /// Run a command in a container or a compose service, e.g.
    /// `persysctl exec -it web -- sh`. Exits with the command's status.
    Exec(ExecArgs),
    /// Attach to a VM's serial console (Ctrl-] leaves).
    Console(ConsoleArgs),
    /// Report the agent's health and its runtimes.
    Health(HealthArgs),
    /// Print the client and the agent version.
    Version(VersionArgs),
    /// Print a shell completion script.
    Completion(CompletionArgs),
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Manifest file, or - for standard input; may be repeated. A file holds
    /// one manifest, a YAML multi-document stream or a JSON array.
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Show only this workload.
    pub id: Option<String>,

    /// Show only workloads of this type.
    #[arg(short = 't', long = "type", value_name = "TYPE")]
    pub kind: Option<KindArg>,

    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    /// After listing, print every change until Ctrl-C.
    #[arg(short = 'w', long)]
    pub watch: bool,
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    pub id: String,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The workloads to delete.
    #[arg(required = true, value_name = "ID")]
    pub ids: Vec<String>,

    /// Return only once the workloads are gone (their runtime objects
    /// removed), or fail after --timeout.
    #[arg(long)]
    pub wait: bool,

    /// Succeed when a workload does not exist.
    #[arg(long)]
    pub ignore_not_found: bool,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Watch only this workload.
    pub id: Option<String>,

    /// Watch only workloads of this type.
    #[arg(short = 't', long = "type", value_name = "TYPE")]
    pub kind: Option<KindArg>,

    /// Start after this resource version instead of with the current
    /// workloads.
    #[arg(long, value_name = "RV")]
    pub since: Option<u64>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    pub id: String,

    /// Keep printing new output until Ctrl-C or the workload is deleted.
    #[arg(short = 'f', long)]
    pub follow: bool,

    /// Only the last N lines (of each container).
    #[arg(long, value_name = "N")]
    pub tail: Option<u64>,

    /// Only output newer than this, e.g. 10m, or from a time (RFC 3339).
    #[arg(long, value_name = "DURATION|TIME")]
    pub since: Option<String>,

    /// Compose: only this service.
    #[arg(long, value_name = "SERVICE")]
    pub service: Option<String>,

    /// Prefix each line with its time.
    #[arg(long)]
    pub timestamps: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    pub id: String,

    /// Pass standard input to the command.
    #[arg(short = 'i', long)]
    pub stdin: bool,

    /// Allocate a terminal (standard output and error merge).
    #[arg(short = 't', long)]
    pub tty: bool,

    /// Compose: the service to run it in.
    #[arg(long, value_name = "SERVICE")]
    pub service: Option<String>,

    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ConsoleArgs {
    pub id: String,

    /// Take the console over from another session holding it.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Output format (table means the readable report).
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Print only the client version; do not contact the agent.
    #[arg(long)]
    pub client: bool,
}

#[derive(Debug, Args)]
pub struct CompletionArgs {
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    Container,
    Compose,
    Vm,
}

impl From<KindArg> for WorkloadType {
    fn from(kind: KindArg) -> WorkloadType {
        match kind {
            KindArg::Container => WorkloadType::Container,
            KindArg::Compose => WorkloadType::Compose,
            KindArg::Vm => WorkloadType::Vm,
        }
    }
}

/// How `get` and `health` print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Wide,
    Json,
    Yaml,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn connection_flags_are_accepted_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "persysctl",
            "delete",
            "web",
            "--wait",
            "--timeout",
            "5s",
            "--server",
            "agent:7000",
        ])
        .unwrap();
        assert_eq!(cli.connection.timeout, Some(Duration::from_secs(5)));
        assert_eq!(cli.connection.server, "agent:7000");
    }

    #[test]
    fn a_zero_timeout_is_a_usage_error() {
        let error = Cli::try_parse_from(["persysctl", "get", "--timeout", "0s"]).unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation);
    }
}
