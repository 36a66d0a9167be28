//! Wiring: the store, the informer, the controllers, the gRPC server and the
//! background samplers, started together and stopped in order.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use persys_api::v1::WorkloadType;
use persys_api::v1::agent_service_server::AgentServiceServer;
use persys_controllers::Informer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::node::NodeSampler;
use crate::runtimes::RuntimeBoard;
use crate::server::coalesce::Coalesced;
use crate::server::grpc_metrics::GrpcMetricsLayer;
use crate::server::tls::{self, ReloadingConfig, TlsFiles};
use crate::server::validate::Limits;
use crate::server::{Agent, MAX_REQUEST_BYTES};
use crate::store::{Store, StoreConfig, StoreError};

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
}

/// After a shutdown signal, how long in-flight RPCs and open streams get
/// before the server stops anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How often the TLS files are checked for rotation.
const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Runs the agent until `shutdown` is cancelled (a signal), then stops
/// accepting, lets in-flight RPCs and reconciles finish, and syncs the store.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), AgentError> {
    let mut store_config = StoreConfig::new(&config.state_path);
    store_config.key_file = config.state_key_file();
    store_config.max_log_entries = config.log_max_entries;
    store_config.max_log_age = config.log_max_age;
    let store = Store::open(store_config)?;
    let background = CancellationToken::new();

    let informer = Informer::new(Arc::new(store.clone()));
    let informer_task = tokio::spawn({
        let informer = informer.clone();
        let stop = background.clone();
        async move { informer.run(stop).await }
    });

    let runtimes = RuntimeBoard::default();
    let mut enabled = BTreeSet::new();
    if config.docker_enabled {
        enabled.insert(WorkloadType::Container as i32);
    }
    if config.compose_enabled {
        enabled.insert(WorkloadType::Compose as i32);
    }
    if config.vm_enabled {
        enabled.insert(WorkloadType::Vm as i32);
    }
    let metrics = Metrics::new(&store);
    let controllers = crate::runtimes::start_controllers(
        &config,
        &store,
        &informer,
        &runtimes,
        Arc::new(metrics.clone()),
        background.clone(),
    );
    let metrics_addr = std::net::SocketAddr::new(config.grpc_addr, config.metrics_port);
    let metrics_listener =
        TcpListener::bind(metrics_addr)
            .await
            .map_err(|source| AgentError::Listen {
                addr: metrics_addr,
                source,
            })?;
    tracing::info!(
        addr = %metrics_listener.local_addr().unwrap_or(metrics_addr),
        "serving /metrics, /healthz, /readyz"
    );
    let metrics_task = tokio::spawn(crate::metrics::serve(
        metrics_listener,
        metrics.clone(),
        store.clone(),
        informer.clone(),
        runtimes.clone(),
        background.clone(),
    ));

    let node = NodeSampler::start(
        config.state_path.clone(),
        Duration::from_secs(5),
        background.clone(),
    );
    let link = crate::scheduler::start(
        &config,
        &informer,
        node.clone(),
        runtimes.clone(),
        controllers.usage.clone(),
        background.clone(),
    );
    let agent = Agent {
        store: store.clone(),
        informer: informer.clone(),
        limits: Arc::new(Limits {
            host_paths: crate::runtimes::host_path_policy(&config),
            vm_disk_roots: persys_controllers::vm::default_disk_roots(&config.state_path),
        }),
        enabled: Arc::new(enabled),
        runtimes: runtimes.clone(),
        node,
        version: config.agent_version(),
        usage: controllers.usage.clone(),
        metrics: metrics.clone(),
        shutdown: background.clone(),
        drain: link.drain.clone(),
        scheduler: link.status.clone(),
    };

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(persys_api::v1::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| AgentError::Tls(tls::TlsError::from_message(format!("reflection: {e}"))))?;
    tokio::spawn({
        let informer = informer.clone();
        let store = store.clone();
        let stop = background.clone();
        async move {
            informer.wait_until_synced().await;
            let mut ticker = tokio::time::interval(Duration::from_secs(5));
            loop {
                let serving = store.is_writable() && informer.is_synced();
                let status = if serving {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                health_reporter
                    .set_service_status("persys.agent.v1.AgentService", status)
                    .await;
                health_reporter.set_service_status("", status).await;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticker.tick() => {}
                }
            }
        }
    });

    let service = AgentServiceServer::new(agent)
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(64 * 1024 * 1024);
    let router = tonic::transport::Server::builder()
        .layer(GrpcMetricsLayer::new(metrics.clone()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service);

    let addr = config.grpc_socket();
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Listen { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    let stop_serving = shutdown.clone();
    if config.tls_enabled {
        let files = TlsFiles {
            cert: config.tls_cert.clone(),
            key: config.tls_key.clone(),
            ca: config.tls_ca.clone(),
        };
        let reloading = ReloadingConfig::watch(files, TLS_RELOAD_INTERVAL, background.clone())?;
        tracing::info!(addr = %bound, node_id = %config.node_id(), "serving gRPC with mutual TLS");
        let incoming = tls::incoming(listener, reloading, shutdown.clone());
        let serving = router.serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(incoming),
            stop_serving.clone().cancelled_owned(),
        );
        serve_with_grace(serving, stop_serving).await?;
    } else {
        tracing::warn!(
            addr = %bound,
            "PERSYS_TLS_ENABLED=false: serving gRPC in PLAINTEXT without client authentication; anyone who can reach this port controls the node"
        );
        let incoming = tonic::transport::server::TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .map(|accepted| accepted.map(Coalesced::new));
        let serving =
            router.serve_with_incoming_shutdown(incoming, stop_serving.clone().cancelled_owned());
        serve_with_grace(serving, stop_serving).await?;
    }

    tracing::info!("gRPC server stopped; stopping controllers");
    background.cancel();
    for task in controllers.tasks {
        let _ = task.await;
    }
    let _ = informer_task.await;
    if let Some(task) = link.task {
        let _ = task.await;
    }
    let _ = metrics_task.await;
    store.close().await;
    tracing::info!("store closed; bye");
    Ok(())
}

/// Serves until the server stops by itself after `stop` (every connection
/// closed), or until [`SHUTDOWN_GRACE`] after `stop`, whichever is first.
async fn serve_with_grace(
    serving: impl std::future::Future<Output = Result<(), tonic::transport::Error>>,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    tokio::select! {
        result = serving => result,
        _ = async {
            stop.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the shutdown grace; closing them");
            Ok(())
        }
    }
}
