use persys_agent::config::{Config, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// mimalloc, built without transparent huge pages (see Cargo.toml): faster
/// than the system allocator on the apply path, and no multi-millisecond
/// stalls zeroing fresh 2 MiB pages in the store's committer.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logging(config: &Config) {
    // The storage engine's own info logs are noise at the agent's info level.
    let directives = if config.log_level.contains('=') {
        config.log_level.clone()
    } else {
        format!("{},fjall=warn,lsm_tree=warn", config.log_level)
    };
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| {
        eprintln!(
            "persys-agent: invalid configuration: PERSYS_LOG_LEVEL: {:?} is not a level or filter",
            config.log_level
        );
        std::process::exit(2);
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Cancels `token` on the first SIGTERM or SIGINT.
fn on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
}

/// Raises this process's soft limit of open files to its hard limit, as
/// the Go runtime and dockerd do: the usage samplers keep each container's
/// counter files open between rounds (five per container, within half of
/// the limit), besides connections, the store's files and log streams.
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(%error, soft = ?limit.current, "cannot raise the open-file limit");
            return;
        }
    }
    tracing::debug!(limit = ?limit.maximum, "open-file limit");
}

fn main() {
    let config = Config::load();
    init_logging(&config);
    if let Some(command) = &config.command {
        std::process::exit(persys_agent::commands::run(&config, command));
    }
    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("persys-agent: cannot start the runtime: {error}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        on_signal(shutdown.clone());
        persys_agent::agent::run(config, shutdown).await
    });
    // Blocking calls still running (a libvirt call cannot be cancelled)
    // get a moment, not forever: the shutdown deadline has passed.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    if let Err(error) = result {
        tracing::error!(%error, "persys-agent failed");
        eprintln!("persys-agent: {error}");
        std::process::exit(error.exit_code());
    }
}
