//! Prometheus metrics (`/metrics`), liveness (`/healthz`) and readiness
//! (`/readyz`) on `PERSYS_METRICS_PORT`.
//!
//! Counters and histograms are updated where things happen (the store's
//! committer, the gRPC layer, the controller runtime); gauges that describe
//! current state (workloads by type and state, runtime up, log size) are
//! read from their source at scrape time, so they cannot go stale.

use std::sync::Arc;
use std::time::Duration;

use persys_api::v1::ActualState;
use persys_controllers::{ControllerObserver, Informer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::runtimes::RuntimeBoard;
use crate::store::Store;
use crate::tasks::Tasks;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadLabels {
    pub workload_type: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub controller: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuntimeLabels {
    pub runtime: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

/// A bounded reason (a fixed set of values chosen by the agent).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs … ~26 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Every metric of the agent. Cheap to clone (each metric is an `Arc`).
#[derive(Clone, Debug)]
pub struct Metrics {
    pub workloads: Family<WorkloadLabels, Gauge>,
    pub applies: Family<OutcomeLabels, Counter>,
    pub deletes: Family<OutcomeLabels, Counter>,
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub reconcile_seconds: Family<ReconcileLabels, Histogram>,
    pub queue_depth: Family<ControllerLabels, Gauge>,
    pub queue_retries: Family<ControllerLabels, Counter>,
    pub runtime_errors: Family<RuntimeLabels, Counter>,
    pub log_entries: Gauge,
    pub watch_streams: Gauge,
    /// Watch streams ended because their client fell behind, by bound.
    pub watch_expired: Family<ReasonLabels, Counter>,
    pub runtime_up: Family<RuntimeLabels, Gauge>,
    pub task_up: Family<TaskLabels, Gauge>,
    pub grpc_requests: Family<GrpcLabels, Counter>,
    pub grpc_seconds: Family<MethodLabels, Histogram>,
    pub authz: crate::server::authz::AuthzMetrics,
    pub tls_handshake_failures: Family<ReasonLabels, Counter>,
    /// Heartbeats trimmed to fit the scheduler's message limit.
    pub heartbeats_trimmed: Counter,
    registry: Arc<Registry>,
}

impl Metrics {
    /// Creates and registers every metric; the store's own counters and
    /// commit latency are registered from `store`.
    pub fn new(store: &Store, authz: crate::server::authz::AuthzMetrics) -> Metrics {
        let mut registry = Registry::with_prefix("persys_agent");
        let workloads = Family::<WorkloadLabels, Gauge>::default();
        let applies = Family::<OutcomeLabels, Counter>::default();
        let deletes = Family::<OutcomeLabels, Counter>::default();
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        let reconcile_seconds = Family::<ReconcileLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let queue_depth = Family::<ControllerLabels, Gauge>::default();
        let queue_retries = Family::<ControllerLabels, Counter>::default();
        let runtime_errors = Family::<RuntimeLabels, Counter>::default();
        let log_entries = Gauge::default();
        let watch_streams = Gauge::default();
        let watch_expired = Family::<ReasonLabels, Counter>::default();
        let runtime_up = Family::<RuntimeLabels, Gauge>::default();
        let task_up = Family::<TaskLabels, Gauge>::default();
        let grpc_requests = Family::<GrpcLabels, Counter>::default();
        let grpc_seconds = Family::<MethodLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let tls_handshake_failures = Family::<ReasonLabels, Counter>::default();

        registry.register(
            "workloads",
            "Workloads by type and actual state",
            workloads.clone(),
        );
        registry.register("applies", "ApplyWorkload calls by outcome", applies.clone());
        registry.register(
            "deletes",
            "DeleteWorkload calls by outcome",
            deletes.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciles by controller and result",
            reconciles.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Reconcile duration by controller and result",
            Unit::Seconds,
            reconcile_seconds.clone(),
        );
        registry.register(
            "workqueue_depth",
            "Keys waiting to be reconciled now",
            queue_depth.clone(),
        );
        registry.register(
            "runtime_errors",
            "Reconciles that failed on a call to their runtime (Docker engine, compose CLI, libvirt), by runtime",
            runtime_errors.clone(),
        );
        registry.register(
            "workqueue_retries",
            "Keys requeued after a failed reconcile",
            queue_retries.clone(),
        );
        let store_metrics = store.metrics();
        registry.register_with_unit(
            "store_commit_duration",
            "Time to commit and fsync one group of writes",
            Unit::Seconds,
            store_metrics.commit_seconds.clone(),
        );
        registry.register(
            "store_commits",
            "Group commits (one fsync each)",
            store_metrics.commits.clone(),
        );
        registry.register(
            "store_writes",
            "Changes written to the log",
            store_metrics.changes.clone(),
        );
        registry.register(
            "store_compactions",
            "Groups that trimmed the log",
            store_metrics.compactions.clone(),
        );
        registry.register(
            "store_log_entries",
            "Entries in the change log",
            log_entries.clone(),
        );
        registry.register("watch_streams", "Watch streams open", watch_streams.clone());
        registry.register(
            "watch_expired",
            "Watch streams expired because their client fell behind, by the bound passed (backlog: PERSYS_WATCH_MAX_BACKLOG events unsent; unread: nothing read for PERSYS_WATCH_MAX_UNREAD)",
            watch_expired.clone(),
        );
        registry.register(
            "runtime_up",
            "1 when the runtime is reachable and healthy",
            runtime_up.clone(),
        );
        registry.register(
            "background_task_up",
            "1 while the background task runs, 0 once it died (ended before shutdown or panicked)",
            task_up.clone(),
        );
        registry.register(
            "grpc_requests",
            "gRPC requests by method and status code",
            grpc_requests.clone(),
        );
        registry.register_with_unit(
            "grpc_request_duration",
            "gRPC request latency by method",
            Unit::Seconds,
            grpc_seconds.clone(),
        );
        authz.register(&mut registry);
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by reason (timeout, refused)",
            tls_handshake_failures.clone(),
        );
        let heartbeats_trimmed = Counter::default();
        registry.register(
            "heartbeats_trimmed",
            "Heartbeats whose status texts (or, past those, statuses) were cut to fit the scheduler's 4 MiB message limit",
            heartbeats_trimmed.clone(),
        );
        Metrics {
            heartbeats_trimmed,
            authz,
            workloads,
            applies,
            deletes,
            reconciles,
            reconcile_seconds,
            queue_depth,
            queue_retries,
            runtime_errors,
            log_entries,
            watch_streams,
            watch_expired,
            runtime_up,
            task_up,
            grpc_requests,
            grpc_seconds,
            tls_handshake_failures,
            registry: Arc::new(registry),
        }
    }

    pub fn apply(&self, outcome: &str) {
        self.applies
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn delete(&self, outcome: &str) {
        self.deletes
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn watch_expired(&self, expiry: crate::server::outbox::Expiry) {
        self.watch_expired
            .get_or_create(&ReasonLabels {
                reason: expiry.label(),
            })
            .inc();
    }

    /// Reads the current-state gauges from their sources, then encodes
    /// everything in the Prometheus text format.
    pub fn render(
        &self,
        store: &Store,
        informer: &Informer,
        runtimes: &RuntimeBoard,
        tasks: &Tasks,
    ) -> String {
        self.workloads.clear();
        for kind in ["container", "compose", "vm"] {
            for state in ["Pending", "Running", "Stopped", "Failed", "Unknown"] {
                self.workloads
                    .get_or_create(&WorkloadLabels {
                        workload_type: kind.into(),
                        state: state.into(),
                    })
                    .set(0);
            }
        }
        for workload in informer.cache().list() {
            let state = match workload.status.as_ref().map(|s| s.actual_state()) {
                None | Some(ActualState::Unspecified) => ActualState::Pending,
                Some(state) => state,
            };
            self.workloads
                .get_or_create(&WorkloadLabels {
                    workload_type: workload.workload_type().short_name().into(),
                    state: state.short_name().into(),
                })
                .inc();
        }
        self.log_entries.set(store.log_len() as i64);
        for (runtime, status) in runtimes.statuses() {
            self.runtime_up
                .get_or_create(&RuntimeLabels { runtime })
                .set(i64::from(status == crate::runtimes::HEALTHY));
        }
        for (task, running) in tasks.states() {
            self.task_up
                .get_or_create(&TaskLabels { task })
                .set(i64::from(running));
        }
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(%error, "encoding metrics failed");
        }
        text
    }
}

impl ControllerObserver for Metrics {
    fn reconciled(&self, controller: &'static str, result: &'static str, took: Duration) {
        let labels = ReconcileLabels {
            controller: controller.into(),
            result: result.into(),
        };
        self.reconciles.get_or_create(&labels).inc();
        self.reconcile_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        // Controllers turn store conflicts into requeues, so a failed
        // reconcile is a failed runtime call.
        if result == "error" {
            self.runtime_errors
                .get_or_create(&RuntimeLabels {
                    runtime: controller.into(),
                })
                .inc();
        }
    }

    fn retried(&self, controller: &'static str) {
        self.queue_retries
            .get_or_create(&ControllerLabels {
                controller: controller.into(),
            })
            .inc();
    }

    fn queue_depth(&self, controller: &'static str, depth: usize) {
        self.queue_depth
            .get_or_create(&ControllerLabels {
                controller: controller.into(),
            })
            .set(depth as i64);
    }
}

/// Counts a Watch stream as open for as long as it lives.
pub struct OpenStream(Gauge);

impl OpenStream {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        OpenStream(gauge.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    store: Store,
    informer: Informer,
    runtimes: RuntimeBoard,
    tasks: Tasks,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use axum::http::StatusCode;
    use axum::routing::get;

    let ready = {
        let store = store.clone();
        let informer = informer.clone();
        let tasks = tasks.clone();
        move || {
            let store = store.clone();
            let informer = informer.clone();
            let tasks = tasks.clone();
            async move {
                if let Some(problem) = store.write_problem() {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("store not writable: {problem}\n"),
                    )
                } else if !informer.is_synced() {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "informer not synced\n".into(),
                    )
                } else if !tasks.all_alive() {
                    let summary = tasks.summary();
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("background task {summary}\n"),
                    )
                } else {
                    (StatusCode::OK, "ready\n".to_string())
                }
            }
        }
    };
    let render = move || {
        let metrics = metrics.clone();
        let store = store.clone();
        let informer = informer.clone();
        let runtimes = runtimes.clone();
        let tasks = tasks.clone();
        async move {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                metrics.render(&store, &informer, &runtimes, &tasks),
            )
        }
    };
    let app = axum::Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready));
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(%error, "metrics endpoint stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    #[tokio::test]
    async fn a_dead_background_task_shows_as_down_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(dir.path().join("state"))).unwrap();
        let informer = Informer::new(Arc::new(store.clone()));
        let metrics = Metrics::new(&store, crate::server::authz::AuthzMetrics::default());
        let stop = tokio_util::sync::CancellationToken::new();
        let tasks = Tasks::new(stop.clone());
        let running = tasks.spawn("informer", {
            let stop = stop.clone();
            async move { stop.cancelled().await }
        });
        tasks
            .spawn("scheduler-link", async { panic!("a defect") })
            .await
            .unwrap();
        let text = metrics.render(&store, &informer, &RuntimeBoard::default(), &tasks);
        assert!(
            text.contains("persys_agent_background_task_up{task=\"informer\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("persys_agent_background_task_up{task=\"scheduler-link\"} 0\n"),
            "{text}"
        );
        stop.cancel();
        running.await.unwrap();
        store.close().await;
    }
}
