//! Wiring: the store, the informer, the controllers, the gRPC server and the
//! background samplers, started together and stopped in order.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use persys_api::v1::agent_service_server::AgentServiceServer;
use persys_controllers::Informer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::node::NodeSampler;
use crate::runtimes::{Registry, RuntimeBoard};
use crate::server::authz::{
    Authentication, AuthzLayer, AuthzMetrics, Policy, PolicyError, PolicyHandle,
};
use crate::server::coalesce::Coalesced;
use crate::server::grpc_metrics::GrpcMetricsLayer;
use crate::server::oversize::OversizeLayer;
use crate::server::tls::{self, ReloadingConfig, TlsFiles};
use crate::server::validate::Limits;
use crate::server::{Agent, MAX_REQUEST_BYTES};
use crate::store::{Store, StoreConfig, StoreError};
use crate::tasks::Tasks;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("invalid authorization policy: {0}")]
    Policy(#[from] PolicyError),
    #[error("invalid workload policy: {0}")]
    WorkloadPolicy(#[from] crate::policy::PolicyFileError),
    /// The Go agent's state could not be imported: the agent does not
    /// start without it.
    #[error("{0}")]
    Import(#[from] crate::import::ImportError),
    /// A write or sync of the store failed while running: the agent stops
    /// so that its service manager restarts it and recovery replays the
    /// journal.
    #[error(
        "{0}. Exiting: restarted (by systemd, or whatever supervises the agent), it recovers every acknowledged write from the journal"
    )]
    StoreFailed(StoreError),
}

impl AgentError {
    /// The process exit status: 2 for configuration the operator must fix
    /// (as for an invalid variable), 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::Policy(_) | AgentError::WorkloadPolicy(_) => 2,
            _ => 1,
        }
    }
}

/// After a shutdown signal, how long in-flight RPCs get before the server
/// stops anyway (at most PERSYS_SHUTDOWN_TIMEOUT; Watch streams end at once).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How often the TLS files are checked for rotation.
const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Concurrent HTTP/2 streams (calls in flight, open Watch streams) a client
/// may hold on one connection. The gRPC bench multiplexes 64 clients, one
/// call in flight each, over one connection; a scheduler or persysctl may
/// keep Watch streams open beside its calls. 256 leaves four times the
/// bench's 64, and bounds what one connection can make the agent buffer
/// (each stream may hold a request of up to MAX_REQUEST_BYTES while it is
/// decoded). A client over the limit waits for a stream to end (the HTTP/2
/// SETTINGS tell it); it is not refused. hyper's default would be 200.
const MAX_CONCURRENT_STREAMS: u32 = 256;

/// HTTP/2 PING after this long without a frame from the client, and the
/// connection closed when the PING is not answered within
/// HTTP2_KEEPALIVE_TIMEOUT: a peer that vanished no longer holds its
/// streams (a Watch, a stream slot) until TCP gives up, minutes later.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the agent until `shutdown` is cancelled (a signal), then stops
/// accepting, lets in-flight RPCs and reconciles finish, and syncs the store.
pub async fn run(mut config: Config, shutdown: CancellationToken) -> Result<(), AgentError> {
    // The Go agent's state.db, if this is where it left one: this agent's
    // state goes in the directory beside it.
    let go_state = crate::import::resolve(&mut config)?;
    let import = match &go_state {
        Some(found) => match crate::import::plan_start(found).await? {
            crate::import::StartPlan::Import(state) => Some((found.clone(), state)),
            crate::import::StartPlan::AlreadyImported => {
                tracing::info!(
                    file = %found.file.display(),
                    marker = %found.marker().display(),
                    "the Go agent's state was imported already; not again"
                );
                None
            }
            crate::import::StartPlan::Unrelated => {
                tracing::warn!(
                    file = %found.file.display(),
                    state_dir = %found.state_dir.display(),
                    "a Go agent state.db lies beside a state directory this agent already uses, and no import into it was started: NOT imported; `persys-agent import --from` imports it on purpose"
                );
                None
            }
        },
        None => None,
    };
    // Stopped after the gRPC server, so nothing it serves is gone early.
    let background = CancellationToken::new();
    // Every long-running task, watched: one that dies is reported.
    let tasks = Tasks::new(background.clone());
    let metrics_authz = AuthzMetrics::default();
    let authentication = authentication(&config, &metrics_authz, &tasks)?;
    let policy = Arc::new(crate::policy::load(&config)?);
    tracing::info!(
        file = ?config.policy_file,
        bind_roots = ?policy.host_paths.allowed_roots,
        vm_networks = ?policy.vm.networks,
        vm_bridges = ?policy.vm.bridges,
        "workload policy in force (persys-agent policy show prints all of it)"
    );
    let store = open_store(&config)?;
    // A failed write or sync stops the agent: nothing more can be
    // acknowledged, and a restart recovers from what is on disk.
    let store_failure = tokio::spawn({
        let failed = store.failed();
        let shutdown = shutdown.clone();
        async move {
            let error = failed.await;
            tracing::error!(%error, "the store failed: shutting down, to be restarted");
            shutdown.cancel();
        }
    });
    let informer = Informer::new(Arc::new(store.clone()));
    let informer_task = tasks.spawn("informer", {
        let informer = informer.clone();
        let stop = background.clone();
        async move { informer.run(stop).await }
    });

    let gate = crate::import::gate(&config, &policy, &informer, &tasks);
    if let Some((found, state)) = import {
        // Before any controller or client sees the store.
        crate::import::at_start(&found, state, &store, &gate).await?;
    }

    let runtimes = RuntimeBoard::default();
    let registry = Registry::new(&config);
    let metrics = Metrics::new(&store, metrics_authz);
    let controllers = crate::runtimes::start_controllers(
        &config,
        &policy,
        &store,
        &informer,
        &runtimes,
        Arc::new(metrics.clone()),
        &tasks,
    );
    let metrics_task = serve_metrics(
        &config,
        &metrics,
        &store,
        &informer,
        &runtimes,
        &tasks,
        &background,
    )
    .await?;
    let node = NodeSampler::start(config.state_path.clone(), Duration::from_secs(5), &tasks);
    let link = crate::scheduler::start(
        &config,
        &informer,
        node.clone(),
        runtimes.clone(),
        crate::scheduler::Reporting {
            usage: controllers.usage.clone(),
            heartbeats_trimmed: metrics.heartbeats_trimmed.clone(),
        },
        &tasks,
        background.clone(),
    );
    let agent = Agent {
        store: store.clone(),
        informer: informer.clone(),
        admission: gate.admission.clone(),
        vm_disk_claims: Arc::default(),
        compose_parses: Arc::new(tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        )),
        limits: gate.limits.clone(),
        registry,
        runtimes,
        node,
        version: config.agent_version(),
        usage: controllers.usage.clone(),
        metrics: metrics.clone(),
        // Watch streams end as soon as the signal comes, not after the grace.
        shutdown: shutdown.clone(),
        watch_bounds: config.watch_bounds(),
        drain: link.drain.clone(),
        scheduler: link.status.clone(),
        tasks: tasks.clone(),
        io: controllers.io.clone(),
    };
    let router = router(
        agent,
        authentication,
        &metrics,
        &store,
        &informer,
        &tasks,
        &background,
    )?;

    // Everything must be down this long after the signal.
    let deadline = tokio::spawn({
        let shutdown = shutdown.clone();
        let timeout = config.shutdown_timeout;
        async move {
            shutdown.cancelled().await;
            tokio::time::Instant::now() + timeout
        }
    });
    serve(&config, router, &metrics, &shutdown, &tasks).await?;

    tracing::info!("gRPC server stopped; stopping controllers");
    background.cancel();
    let deadline = deadline
        .await
        .unwrap_or_else(|_| tokio::time::Instant::now());
    stop_controllers(controllers.tasks, deadline).await;
    let _ = informer_task.await;
    if let Some(task) = link.task {
        let _ = task.await;
    }
    let _ = metrics_task.await;
    store.close().await;
    store_failure.abort();
    if let Some(error) = store.failure() {
        return Err(AgentError::StoreFailed(error));
    }
    tracing::info!("store closed; bye");
    Ok(())
}

/// What validation of an apply knows about this node.
pub(crate) fn apply_limits(
    config: &Config,
    policy: &Arc<persys_controllers::policy::NodePolicy>,
) -> Limits {
    Limits {
        host_paths: crate::policy::host_path_policy(config, policy),
        vm_disk_roots: persys_controllers::vm::default_disk_roots(&config.state_path),
        vm_root: persys_controllers::vm::vm_root(&config.state_path),
        policy: policy.clone(),
        compose_env: persys_controllers::compose::ComposeEnvironment::new(
            std::env::vars(),
            &config.docker_host,
        ),
        ..Limits::default()
    }
}

/// Opens the store at the configured path, with its key and log limits.
pub(crate) fn open_store(config: &Config) -> Result<Store, AgentError> {
    let mut store_config = StoreConfig::new(&config.state_path);
    store_config.key_file = config.state_key_file();
    store_config.max_log_entries = config.log_max_entries;
    store_config.max_log_age = config.log_max_age;
    Ok(Store::open(store_config)?)
}

/// Binds the metrics port and serves `/metrics`, `/healthz` and `/readyz`
/// until `stop`.
async fn serve_metrics(
    config: &Config,
    metrics: &Metrics,
    store: &Store,
    informer: &Informer,
    runtimes: &RuntimeBoard,
    tasks: &Tasks,
    stop: &CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, AgentError> {
    let addr = std::net::SocketAddr::new(config.bind_addr(), config.metrics_port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Listen { addr, source })?;
    tracing::info!(
        addr = %listener.local_addr().unwrap_or(addr),
        "serving /metrics, /healthz, /readyz"
    );
    Ok(tasks.spawn(
        "metrics-endpoint",
        crate::metrics::serve(
            listener,
            metrics.clone(),
            store.clone(),
            informer.clone(),
            runtimes.clone(),
            tasks.clone(),
            stop.clone(),
        ),
    ))
}

/// The gRPC services behind the metrics and authorization layers: the
/// agent's service, grpc.health.v1 (serving while the store is writable,
/// the informer synced and no background task dead) and reflection.
fn router(
    agent: Agent,
    authentication: Authentication,
    metrics: &Metrics,
    store: &Store,
    informer: &Informer,
    tasks: &Tasks,
    stop: &CancellationToken,
) -> Result<tonic::transport::server::Router<GrpcLayers>, AgentError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection_error = |e: tonic_reflection::server::Error| {
        AgentError::Tls(tls::TlsError::from_message(format!("reflection: {e}")))
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(persys_api::v1::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(reflection_error)?;
    // v1alpha too: Python's grpc_reflection, Postman and older grpcurl
    // speak only it.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(persys_api::v1::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(reflection_error)?;
    tasks.spawn(
        "grpc-health",
        report_health(
            health_reporter,
            store.clone(),
            informer.clone(),
            tasks.clone(),
            stop.clone(),
        ),
    );
    let service = AgentServiceServer::new(agent)
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(64 * 1024 * 1024);
    // TCP keepalive is set on accepted sockets by the accept loops in
    // `serve`: tonic's own `tcp_keepalive` does not apply to
    // `serve_with_incoming`.
    Ok(tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .layer(GrpcMetricsLayer::new(metrics.clone()))
        .layer(AuthzLayer::new(authentication, metrics.authz.clone()))
        .layer(OversizeLayer)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(service))
}

/// The layers every call passes, outermost first.
type GrpcLayers = tower::layer::util::Stack<
    OversizeLayer,
    tower::layer::util::Stack<
        AuthzLayer,
        tower::layer::util::Stack<GrpcMetricsLayer, tower::layer::util::Identity>,
    >,
>;

/// Keeps grpc.health.v1 in step with the store, the informer and the
/// background tasks, every 5 s once the informer has synced, until `stop`.
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    store: Store,
    informer: Informer,
    tasks: Tasks,
    stop: CancellationToken,
) {
    informer.wait_until_synced().await;
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    loop {
        let status = if store.is_writable() && informer.is_synced() && tasks.all_alive() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        reporter
            .set_service_status("persys.agent.v1.AgentService", status)
            .await;
        reporter.set_service_status("", status).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
    }
}

/// Serves gRPC on the configured address, with mutual TLS (certificates
/// reloaded as they rotate) or in plaintext, until `shutdown` and the
/// grace after it.
async fn serve(
    config: &Config,
    router: tonic::transport::server::Router<GrpcLayers>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    tasks: &Tasks,
) -> Result<(), AgentError> {
    let addr = config.grpc_socket();
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Listen { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    let stop = shutdown.clone();
    let grace = SHUTDOWN_GRACE.min(config.shutdown_timeout);
    if config.tls_enabled {
        let files = TlsFiles {
            cert: config.tls_cert.clone(),
            key: config.tls_key.clone(),
            ca: config.tls_ca.clone(),
        };
        let reloading = ReloadingConfig::watch(files, TLS_RELOAD_INTERVAL, tasks)?;
        tracing::info!(addr = %bound, node_id = %config.node_id(), "serving gRPC with mutual TLS");
        let failures = tls::HandshakeFailures::new(metrics.tls_handshake_failures.clone());
        let incoming = tls::incoming(listener, reloading, failures, shutdown.clone());
        let serving = router.serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(incoming),
            stop.clone().cancelled_owned(),
        );
        serve_with_grace(serving, stop, grace).await?;
    } else {
        tracing::warn!(
            addr = %bound,
            "PERSYS_TLS_ENABLED=false: serving gRPC in PLAINTEXT without client authentication; every caller is an operator, so anyone who can reach this port controls the node"
        );
        let incoming = tonic::transport::server::TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(tls::TCP_KEEPALIVE))
            .map(|accepted| accepted.map(Coalesced::new));
        let serving = router.serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
        serve_with_grace(serving, stop, grace).await?;
    }
    Ok(())
}

/// Who callers are: with mutual TLS, identities from client certificates
/// and roles from the policy (`PERSYS_AUTHZ_FILE`, loaded now and reloaded
/// when it changes, else the default); in plaintext, nobody.
fn authentication(
    config: &Config,
    metrics: &AuthzMetrics,
    tasks: &Tasks,
) -> Result<Authentication, AgentError> {
    if !config.tls_enabled {
        if let Some(file) = &config.authz_file {
            tracing::warn!(
                file = %file.display(),
                "PERSYS_AUTHZ_FILE is ignored in plaintext: there are no client identities to match"
            );
        }
        return Ok(Authentication::Plaintext);
    }
    let policy = match &config.authz_file {
        Some(file) => {
            PolicyHandle::watch(file.clone(), TLS_RELOAD_INTERVAL, metrics.clone(), tasks)?
        }
        None => {
            tracing::info!(
                "authorization: the default policy (CN persys-scheduler → scheduler, CN persysctl → operator, nobody else)"
            );
            PolicyHandle::fixed(Policy::default_policy())
        }
    };
    Ok(Authentication::MutualTls(policy))
}

/// Serves until the server stops by itself after `stop` (every connection
/// closed), or until `grace` after `stop`, whichever is first.
async fn serve_with_grace(
    serving: impl std::future::Future<Output = Result<(), tonic::transport::Error>>,
    stop: CancellationToken,
    grace: Duration,
) -> Result<(), tonic::transport::Error> {
    tokio::select! {
        result = serving => result,
        _ = async {
            stop.cancelled().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(?grace, "connections still open after the shutdown grace; closing them");
            Ok(())
        }
    }
}

/// Lets the controllers finish their in-flight reconciles until `deadline`
/// (`PERSYS_SHUTDOWN_TIMEOUT` after the signal), then cancels the rest:
/// dropping a reconcile kills the compose command it was running, process
/// group and all. Whatever a cancelled reconcile had not written is found
/// again by the next start's first reconcile.
async fn stop_controllers(tasks: Vec<tokio::task::JoinHandle<()>>, deadline: tokio::time::Instant) {
    let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
    let all = futures::future::join_all(tasks);
    if tokio::time::timeout_at(deadline, all).await.is_err() {
        tracing::warn!(
            "reconciles still running at the shutdown deadline (PERSYS_SHUTDOWN_TIMEOUT); cancelling them"
        );
        for abort in &aborts {
            abort.abort();
        }
    }
}
