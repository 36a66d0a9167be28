//! The `persys.agent.v1.AgentService` gRPC server.
//!
//! Every RPC answers from the store (reads see every acknowledged write) or
//! the informer cache; none waits on a runtime. Applies and deletes only
//! append to the log — the controllers do the work.

pub mod actions;
pub mod authz;
pub mod ceilings;
pub mod coalesce;
pub mod exec;
pub mod grpc_metrics;
pub mod logs;
pub mod outbox;
pub mod oversize;
pub mod redact;
pub mod tls;
pub mod validate;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use persys_api::v1::agent_service_server::AgentService;
use persys_api::v1::{
    AgentAction, ApplyWorkloadRequest, ApplyWorkloadResponse, DeleteWorkloadRequest,
    DeleteWorkloadResponse, DescribeWorkloadRequest, DescribeWorkloadResponse,
    GetWorkloadStatusRequest, GetWorkloadStatusResponse, HealthCheckRequest, HealthCheckResponse,
    ListActionsRequest, ListActionsResponse, ListWorkloadsRequest, ListWorkloadsResponse,
    WatchEvent, WatchEventType, WatchRequest, Workload, WorkloadStatus, WorkloadType,
    WorkloadUsageSnapshot, workload_spec,
};
use persys_controllers::Informer;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::node::NodeSampler;
use crate::runtimes::{Registry, RuntimeBoard};
use crate::store::{ApplyOutcome, DeleteOutcome, LogRecord, Store, StoreError};
use validate::Limits;

/// How long a VM apply's disk claim waits for the informer to have it.
const DISK_CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Largest request accepted (bytes).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Latest resource usage per workload id, filled by the runtime samplers.
pub type UsageLookup = Arc<dyn Fn(&str) -> Option<WorkloadUsageSnapshot> + Send + Sync>;

/// The AgentService implementation and what it reads from.
#[derive(Clone)]
pub struct Agent {
    pub store: Store,
    pub informer: Informer,
    pub limits: Arc<Limits>,
    /// The policy's ceilings, and the applies admitted under them.
    pub admission: ceilings::Admission,
    /// Compose files parsed at once, each on a blocking thread: parsing is
    /// CPU work bounded per file, and this bounds it across requests.
    pub compose_parses: Arc<tokio::sync::Semaphore>,
    /// VM applies pass the disk-ownership check and reach the informer's
    /// cache one at a time, so two concurrent applies cannot both claim
    /// one disk, each unseen by the other.
    pub vm_disk_claims: Arc<tokio::sync::Mutex<()>>,
    /// The runtimes of this node: which workload types it accepts, and the
    /// variable that turns each on.
    pub registry: Registry,
    pub runtimes: RuntimeBoard,
    pub node: NodeSampler,
    pub version: String,
    pub usage: Option<UsageLookup>,
    pub metrics: crate::metrics::Metrics,
    /// Ends Watch streams when the agent shuts down.
    pub shutdown: CancellationToken,
    /// How far a Watch client may fall behind before its stream is expired.
    pub watch_bounds: outbox::WatchBounds,
    /// Set while the scheduler drains the node: new workload ids are refused.
    pub drain: crate::scheduler::Drain,
    /// The scheduler link's state, for HealthCheck.
    pub scheduler: tokio::sync::watch::Receiver<crate::scheduler::LinkStatus>,
    /// The agent's background tasks: a dead one makes the node unhealthy.
    pub tasks: crate::tasks::Tasks,
    /// Logs, exec and console of each runtime that is enabled.
    pub io: crate::runtimes::WorkloadIoSet,
}

fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::RevisionConflict { .. }
        | StoreError::TypeMismatch { .. }
        | StoreError::BeingDeleted { .. }
        | StoreError::Conflict { .. } => Status::failed_precondition(error.to_string()),
        StoreError::NotFound(_) => Status::not_found(error.to_string()),
        StoreError::Expired { .. } => Status::failed_precondition(format!("expired: {error}")),
        StoreError::Corrupt(_) => Status::internal(error.to_string()),
        StoreError::Closed
        | StoreError::Io(_)
        | StoreError::Locked { .. }
        | StoreError::Key { .. }
        | StoreError::Open { .. }
        | StoreError::NoSpace { .. }
        | StoreError::Failed(_) => Status::unavailable(error.to_string()),
    }
}

/// Whether the caller sees secret values as stored; a request that did not
/// pass the role check (none should reach a handler) sees them redacted.
fn sees_secrets<T>(request: &Request<T>) -> bool {
    authz::Caller::of(request).is_some_and(|caller| caller.role.sees_secrets())
}

/// Who asked, for the audit trail.
fn audit_caller<T>(request: &Request<T>) -> crate::store::Caller {
    match authz::Caller::of(request) {
        Some(caller) => crate::store::Caller {
            identity: caller.identity.to_string(),
            role: caller.role.name().to_string(),
        },
        None => crate::store::Caller::default(),
    }
}

impl Agent {
    /// Validates an apply; a compose file is parsed on a blocking thread,
    /// a bounded number at a time, off the async runtime.
    async fn validated(
        &self,
        request: ApplyWorkloadRequest,
    ) -> Result<crate::store::ApplyRequest, validate::FieldError> {
        let is_compose = matches!(
            request.spec.as_ref().and_then(|s| s.spec.as_ref()),
            Some(workload_spec::Spec::Compose(_))
        );
        if !is_compose {
            return validate::apply_request(request, &self.limits);
        }
        let unavailable = |why: String| validate::FieldError {
            field: "spec.compose.compose_yaml".into(),
            message: why,
        };
        let _permit = self
            .compose_parses
            .acquire()
            .await
            .map_err(|e| unavailable(format!("cannot be parsed now: {e}")))?;
        let limits = self.limits.clone();
        tokio::task::spawn_blocking(move || validate::apply_request(request, &limits))
            .await
            .map_err(|e| unavailable(format!("parsing failed: {e}")))?
    }

    /// Refuses a VM apply whose disks are another workload's, against the
    /// stored workloads (waiting, briefly, for the informer's first list).
    async fn check_vm_disk_owners(&self, apply: &crate::store::ApplyRequest) -> Result<(), Status> {
        let synced = self.informer.wait_until_synced();
        if tokio::time::timeout(std::time::Duration::from_secs(5), synced)
            .await
            .is_err()
        {
            return Err(Status::unavailable(
                "the stored workloads are not known yet (the informer has not listed); retry",
            ));
        }
        let stored = self.informer.cache().list_type(WorkloadType::Vm);
        validate::check_vm_disk_owners(apply, &stored, &self.limits)
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }

    fn wire_status(&self, workload: &Workload) -> WorkloadStatus {
        let mut status = workload.to_wire_status();
        if let Some(usage) = &self.usage {
            status.usage = usage(workload.id());
        }
        status
    }

    /// A change-log record as an action, in the Go agent's words:
    /// `apply_workload`, `delete_workload` or `reconcile` (a controller's
    /// status write), `completed` or `failed` (a record is written once the
    /// action is done, so none is ever `pending` or `running`).
    fn action_of(record: &LogRecord) -> AgentAction {
        let object = record.object.clone().unwrap_or_default();
        let status = object.status.clone().unwrap_or_default();
        let failed = record.action == crate::store::ACTION_RECONCILE
            && (status.actual_state() == persys_api::v1::ActualState::Failed
                || !status.last_error.is_empty());
        let at = record.at_ms / 1000;
        AgentAction {
            task_id: record.resource_version.to_string(),
            workload_id: object.id().to_string(),
            action_type: actions::action_type(&record.action).to_string(),
            status: if failed {
                actions::FAILED
            } else {
                actions::COMPLETED
            }
            .to_string(),
            error: if failed {
                status.last_error.clone()
            } else {
                String::new()
            },
            created_at: at,
            started_at: at,
            ended_at: at,
            caller: record.caller.clone(),
            role: record.role.clone(),
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Agent {
    async fn apply_workload(
        &self,
        request: Request<ApplyWorkloadRequest>,
    ) -> Result<Response<ApplyWorkloadResponse>, Status> {
        let caller = audit_caller(&request);
        let mut apply = self.validated(request.into_inner()).await.map_err(|e| {
            self.metrics.apply("invalid");
            Status::invalid_argument(e.to_string())
        })?;
        let runtime = self.registry.get(apply.workload_type);
        if !runtime.enabled {
            self.metrics.apply("refused");
            return Err(Status::failed_precondition(format!(
                "{} workloads are disabled on this node ({}=false)",
                apply.workload_type.short_name(),
                runtime.variable
            )));
        }
        let disk_claim = if apply.workload_type == WorkloadType::Vm {
            let claim = self.vm_disk_claims.clone().lock_owned().await;
            self.check_vm_disk_owners(&apply).await.inspect_err(|_| {
                self.metrics.apply("invalid");
            })?;
            Some(claim)
        } else {
            None
        };
        apply.caller = caller;
        let id = apply.id.clone();
        if self.drain.is_draining() && self.store.get(&id).map_err(store_status)?.is_none() {
            self.metrics.apply("refused");
            return Err(Status::failed_precondition("node is draining"));
        }
        // Read-your-writes: the figures in use include every write
        // acknowledged before this apply.
        if !self
            .admission
            .caught_up(self.store.resource_version())
            .await
        {
            self.metrics.apply("error");
            return Err(Status::unavailable(
                "the workloads in use are not known yet (the ceilings' ledger is behind the store); retry",
            ));
        }
        let reservation = self
            .admission
            .admit(&id, &apply.spec, &apply.labels, apply.desired_state)
            .await
            .map_err(|e| {
                self.metrics.apply("refused");
                Status::resource_exhausted(e.to_string())
            })?;
        let outcome = match self.store.apply(apply).await {
            Ok(outcome) => {
                let version = outcome.workload().resource_version();
                self.admission.release_after(reservation, version);
                if let Some(claim) = disk_claim {
                    // The next VM apply checks against a cache that has
                    // this one.
                    let informer = self.informer.clone();
                    tokio::spawn(async move {
                        let seen = informer.wait_for_version(version);
                        let _ = tokio::time::timeout(DISK_CLAIM_WAIT, seen).await;
                        drop(claim);
                    });
                }
                outcome
            }
            Err(error) => {
                self.metrics.apply(
                    if error.is_retryable()
                        || matches!(error, StoreError::Closed | StoreError::Failed(_))
                    {
                        "error"
                    } else {
                        "refused"
                    },
                );
                return Err(store_status(error));
            }
        };
        self.metrics.apply(match &outcome {
            ApplyOutcome::Created(_) => "created",
            ApplyOutcome::Updated(_) => "updated",
            ApplyOutcome::Unchanged(_) => "unchanged",
        });
        let (applied, skipped, message) = match &outcome {
            ApplyOutcome::Created(w) => (
                true,
                false,
                format!("workload {id} created at revision {}", w.revision_id()),
            ),
            ApplyOutcome::Updated(w) => (
                true,
                false,
                format!(
                    "workload {id} updated to revision {} (generation {})",
                    w.revision_id(),
                    w.generation()
                ),
            ),
            ApplyOutcome::Unchanged(w) => (
                false,
                true,
                format!("workload {id} already at revision {}", w.revision_id()),
            ),
        };
        tracing::debug!(workload_id = %id, applied, skipped, "apply");
        Ok(Response::new(ApplyWorkloadResponse {
            applied,
            skipped,
            message,
            status: Some(self.wire_status(outcome.workload())),
        }))
    }

    async fn delete_workload(
        &self,
        request: Request<DeleteWorkloadRequest>,
    ) -> Result<Response<DeleteWorkloadResponse>, Status> {
        let caller = audit_caller(&request);
        let id = request.into_inner().id;
        validate::validate_id(&id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let outcome = self.store.delete_as(&id, caller).await.map_err(|e| {
            self.metrics.delete("error");
            store_status(e)
        })?;
        let (label, message) = match outcome {
            DeleteOutcome::NotFound => (
                "not_found",
                format!("workload {id} not found; nothing to delete"),
            ),
            DeleteOutcome::Deleting(_) => ("deleting", format!("workload {id} is being deleted")),
            DeleteOutcome::Deleted(_) => ("deleted", format!("workload {id} deleted")),
        };
        self.metrics.delete(label);
        tracing::info!(workload_id = %id, "delete requested");
        Ok(Response::new(DeleteWorkloadResponse {
            success: true,
            message,
        }))
    }

    async fn get_workload_status(
        &self,
        request: Request<GetWorkloadStatusRequest>,
    ) -> Result<Response<GetWorkloadStatusResponse>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(Status::invalid_argument("id: is required"));
        }
        match self.store.get(&id).map_err(store_status)? {
            Some(workload) => Ok(Response::new(GetWorkloadStatusResponse {
                status: Some(self.wire_status(&workload)),
            })),
            None => Err(Status::not_found(format!("workload {id} not found"))),
        }
    }

    async fn list_workloads(
        &self,
        request: Request<ListWorkloadsRequest>,
    ) -> Result<Response<ListWorkloadsResponse>, Status> {
        let filter = match WorkloadType::try_from(request.into_inner().r#type) {
            Ok(WorkloadType::Unspecified) => None,
            Ok(kind) => Some(kind),
            Err(_) => return Err(Status::invalid_argument("type: unknown value")),
        };
        let workloads = self
            .store
            .list(filter)
            .map_err(store_status)?
            .iter()
            .map(|w| self.wire_status(w))
            .collect();
        Ok(Response::new(ListWorkloadsResponse { workloads }))
    }

    async fn health_check(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let node = self.node.latest();
        let mut runtime_status: BTreeMap<String, String> = self.runtimes.snapshot();
        let store_problem = self.store.write_problem();
        if let Some(problem) = &store_problem {
            runtime_status.insert("store".into(), format!("not writable: {problem}"));
        }
        if !self.informer.is_synced() {
            runtime_status.insert("informer".into(), "not synced".into());
        }
        runtime_status.insert("scheduler".into(), self.scheduler.borrow().summary());
        runtime_status.insert("node".into(), self.drain.describe().into());
        runtime_status.insert("tasks".into(), self.tasks.summary());
        Ok(Response::new(HealthCheckResponse {
            healthy: store_problem.is_none() && self.informer.is_synced() && self.tasks.all_alive(),
            version: self.version.clone(),
            runtime_status,
            memory_utilization: node.memory,
            cpu_utilization: node.cpu,
            disk_utilization: node.disk,
        }))
    }

    async fn list_actions(
        &self,
        request: Request<ListActionsRequest>,
    ) -> Result<Response<ListActionsResponse>, Status> {
        let mut request = request.into_inner();
        let limit = match request.limit {
            n if n < 0 => return Err(Status::invalid_argument("limit: must not be negative")),
            0 => 100,
            n => (n as usize).min(10_000),
        };
        request.action_type = actions::type_filter(&request.action_type)?;
        request.status = actions::status_filter(&request.status)?;
        let store = self.store.clone();
        let records = tokio::task::spawn_blocking(move || {
            store.log_records(request.newest_first, limit, |record| {
                let action = Agent::action_of(record);
                (request.workload_id.is_empty() || action.workload_id == request.workload_id)
                    && (request.action_type.is_empty() || action.action_type == request.action_type)
                    && (request.status.is_empty() || action.status == request.status)
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(store_status)?;
        Ok(Response::new(ListActionsResponse {
            actions: records.iter().map(Agent::action_of).collect(),
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let reveal = sees_secrets(&request);
        let request = request.into_inner();
        let shown = move |w: &Workload| {
            let mut w = w.clone();
            if !reveal {
                redact::redact(&mut w);
            }
            w
        };
        let type_filter = match WorkloadType::try_from(request.r#type) {
            Ok(WorkloadType::Unspecified) => None,
            Ok(kind) => Some(kind as i32),
            Err(_) => return Err(Status::invalid_argument("type: unknown value")),
        };
        let id_filter = (!request.id.is_empty()).then_some(request.id.clone());
        let one_id = id_filter.clone();
        let matches = move |w: &Workload| {
            type_filter.is_none_or(|t| w.workload_type() as i32 == t)
                && id_filter.as_deref().is_none_or(|id| w.id() == id)
        };
        // From 0: the current objects first, as ADDED, then what follows.
        let listed = request.resource_version == 0;
        let (initial, from) = if listed {
            // Read-your-writes: the list includes every write acknowledged
            // before this call, so wait (briefly) for the cache to reach it.
            let acknowledged = self.store.resource_version();
            let caught_up = tokio::time::timeout(
                Duration::from_secs(5),
                self.informer.wait_for_version(acknowledged),
            )
            .await;
            if caught_up.is_err() {
                return Err(Status::unavailable(
                    "the informer cache is not caught up; retry",
                ));
            }
            let (objects, rv) = self.informer.cache().snapshot();
            let initial: Vec<WatchEvent> = objects
                .into_iter()
                .filter(|w| matches(w))
                .map(|w| WatchEvent {
                    r#type: WatchEventType::Added as i32,
                    resource_version: w.resource_version(),
                    object: Some(shown(&w)),
                })
                .collect();
            (initial, rv)
        } else {
            if request.resource_version < self.store.compacted_through() {
                return Err(store_status(StoreError::Expired {
                    requested: request.resource_version,
                    compacted_through: self.store.compacted_through(),
                }));
            }
            (Vec::new(), request.resource_version)
        };
        let bookmark_every = Duration::from_secs(match request.bookmark_interval_seconds {
            0 => 30,
            n => n.into(),
        });
        // A watch of one id is woken by that id's changes only, not by
        // every write to the node.
        let mut changes: Pin<Box<dyn Stream<Item = _> + Send>> = match &one_id {
            Some(id) => Box::pin(self.store.watch_id(from, id)),
            None => Box::pin(self.store.watch(from)),
        };
        let shutdown = self.shutdown.clone();
        // A client of a list may resume once it has the whole list.
        let (outbox, stream) = outbox::outbox(
            self.watch_bounds,
            self.informer.versions(),
            (!listed).then_some(from),
        );
        let open = crate::metrics::OpenStream::new(&self.metrics.watch_streams);
        let metrics = self.metrics.clone();
        let closed = move |closed: outbox::Closed| {
            if let outbox::Closed::Expired(expiry) = closed {
                metrics.watch_expired(expiry);
                tracing::info!(
                    reason = expiry.label(),
                    "a Watch client fell behind; its stream was expired"
                );
            }
        };
        tokio::spawn(async move {
            let _open = open;
            for event in initial {
                if let Err(why) = outbox.push(event, None).await {
                    return closed(why);
                }
            }
            // As Kubernetes marks the end of its initial events: everything
            // up to `from` has been sent.
            if listed {
                let end_of_list = WatchEvent {
                    r#type: WatchEventType::Bookmark as i32,
                    resource_version: from,
                    object: None,
                };
                if let Err(why) = outbox.push(end_of_list, Some(from)).await {
                    return closed(why);
                }
            }
            let mut last = from;
            let mut bookmark = tokio::time::interval_at(
                tokio::time::Instant::now() + bookmark_every,
                bookmark_every,
            );
            // Made once, not on every change: each one registers with its
            // token, and the shutdown token is shared by every stream, so
            // re-made per change they would serialise the streams on its
            // lock at every write.
            let shutting_down = shutdown.cancelled();
            let client_gone = outbox.gone();
            tokio::pin!(shutting_down, client_gone);
            loop {
                let item = tokio::select! {
                    _ = &mut shutting_down => return,
                    _ = &mut client_gone => return,
                    _ = bookmark.tick() => {
                        let event = WatchEvent {
                            r#type: WatchEventType::Bookmark as i32,
                            resource_version: last,
                            object: None,
                        };
                        if let Err(why) = outbox.push(event, Some(last)).await {
                            return closed(why);
                        }
                        continue;
                    }
                    item = changes.next() => item,
                };
                match item {
                    Some(Ok(change)) => {
                        last = change.resource_version;
                        if !matches(&change.object) {
                            outbox.progress(last);
                            continue;
                        }
                        bookmark.reset();
                        if one_id.is_some() {
                            // The id's changes come in order and complete:
                            // the client has every change before this one.
                            outbox.progress(last.saturating_sub(1));
                        }
                        let event = WatchEvent {
                            r#type: WatchEventType::from(change.kind) as i32,
                            resource_version: change.resource_version,
                            object: Some(shown(&change.object)),
                        };
                        if let Err(why) = outbox.push(event, Some(last)).await {
                            return closed(why);
                        }
                    }
                    Some(Err(error)) => return outbox.finish(Some(store_status(error))),
                    None => return,
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn describe_workload(
        &self,
        request: Request<DescribeWorkloadRequest>,
    ) -> Result<Response<DescribeWorkloadResponse>, Status> {
        let reveal = sees_secrets(&request);
        let id = request.into_inner().id;
        let Some(mut workload) = self.store.get(&id).map_err(store_status)? else {
            return Err(Status::not_found(format!("workload {id} not found")));
        };
        if !reveal {
            redact::redact(&mut workload);
        }
        let events = self.store.events(&id).map_err(store_status)?;
        Ok(Response::new(DescribeWorkloadResponse {
            status: Some(self.wire_status(&workload)),
            workload: Some(workload),
            events,
        }))
    }
    type StreamLogsStream = logs::LogStream;

    async fn stream_logs(
        &self,
        request: Request<persys_api::v1::StreamLogsRequest>,
    ) -> Result<Response<logs::LogStream>, Status> {
        logs::stream_logs(self, request).await.map(Response::new)
    }

    type ExecStream = exec::ExecStream;

    async fn exec(
        &self,
        request: Request<tonic::Streaming<persys_api::v1::ExecRequest>>,
    ) -> Result<Response<exec::ExecStream>, Status> {
        exec::exec(self, request).await.map(Response::new)
    }

    type ConsoleStream = exec::ConsoleStream;

    async fn console(
        &self,
        request: Request<tonic::Streaming<persys_api::v1::ConsoleRequest>>,
    ) -> Result<Response<exec::ConsoleStream>, Status> {
        exec::console(self, request).await.map(Response::new)
    }
}
