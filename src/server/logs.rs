//! `StreamLogs`: a workload's output through its runtime's
//! [`WorkloadIo`].
//!
//! Without follow, one runtime stream and done. With follow, a
//! `Session` outlives the runtime object: when the runtime's stream ends
//! (the container stopped, a compose container was replaced), it waits for
//! the workload to change in the informer (or a short tick), then opens a
//! new stream from the last time it delivered, dropping lines at or before
//! it: a restart neither loses nor repeats lines, as `kubectl logs -f` on a
//! restarted pod. The workload's deletion ends it cleanly (OK), and so does
//! the agent's shutdown.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use persys_api::v1::{LogChunk, LogStream as ProtoLogStream, StreamLogsRequest};
use persys_controllers::io::{IoError, IoStream, LogOptions, OutputStream, WorkloadIo};
use persys_controllers::{Cache, Notification};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use super::Agent;

pub type LogStream = Pin<Box<dyn Stream<Item = Result<LogChunk, Status>> + Send>>;

/// How long a follower waits for a change before looking again whether
/// the runtime has new output (a container the engine restarted by
/// itself says nothing through the informer).
const RESUME_TICK: Duration = Duration::from_millis(500);

/// How long a request waits for the cache to hold every acknowledged
/// write (a `logs` right after an `apply`).
const CATCH_UP: Duration = Duration::from_secs(5);

pub async fn stream_logs(
    agent: &Agent,
    request: Request<StreamLogsRequest>,
) -> Result<LogStream, Status> {
    let request = request.into_inner();
    let options = log_options(&request, SystemTime::now())?;
    let acknowledged = agent.store.resource_version();
    let _ = tokio::time::timeout(CATCH_UP, agent.informer.wait_for_version(acknowledged)).await;
    // Subscribed before the lookup, so no change after it is missed.
    let changes = agent.informer.subscribe();
    let cache = agent.informer.cache();
    let workload = cache
        .get(&request.id)
        .ok_or_else(|| Status::not_found(format!("workload {} not found", request.id)))?;
    let kind = workload.workload_type();
    let io = agent.io.get(kind).ok_or_else(|| {
        let runtime = agent.registry.get(kind);
        Status::failed_precondition(format!(
            "workload {}: the {} runtime is disabled on this node ({}=false)",
            request.id, runtime.name, runtime.variable
        ))
    })?;
    let first = io.logs(&workload, options.clone());
    let session = Session {
        id: request.id.clone(),
        uid: workload.uid().to_string(),
        io,
        cache,
        changes,
        shutdown: agent.shutdown.clone(),
        options,
        timestamps: request.timestamps,
        current: Some(first),
        last: None,
        resumed: false,
    };
    Ok(Box::pin(futures::stream::unfold(
        session,
        |mut session| async move {
            let item = session.next().await?;
            Some((item, session))
        },
    )))
}

/// The request as the runtime's options: `since_seconds` wins over
/// `since_time_ms`; negative numbers are refused.
fn log_options(request: &StreamLogsRequest, now: SystemTime) -> Result<LogOptions, Status> {
    if request.id.is_empty() {
        return Err(Status::invalid_argument("id: required"));
    }
    let tail = match request.tail_lines {
        Some(n) if n < 0 => {
            return Err(Status::invalid_argument(format!(
                "tail_lines: must not be negative (got {n})"
            )));
        }
        Some(n) => Some(n.unsigned_abs()),
        None => None,
    };
    let since = match (request.since_seconds, request.since_time_ms) {
        (s, _) if s < 0 => {
            return Err(Status::invalid_argument(format!(
                "since_seconds: must not be negative (got {s})"
            )));
        }
        (s, _) if s > 0 => Some(
            now.checked_sub(Duration::from_secs(s.unsigned_abs()))
                .unwrap_or(UNIX_EPOCH),
        ),
        (_, ms) if ms < 0 => {
            return Err(Status::invalid_argument(format!(
                "since_time_ms: must not be negative (got {ms})"
            )));
        }
        (_, ms) if ms > 0 => Some(UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())),
        _ => None,
    };
    Ok(LogOptions {
        service: (!request.service.is_empty()).then(|| request.service.clone()),
        follow: request.follow,
        tail,
        since,
    })
}

/// One client's log stream, across the runtime streams it takes.
struct Session {
    id: String,
    /// The workload's uid when the stream began: a workload deleted and
    /// applied again under the same id is another one, and ends the stream.
    uid: String,
    io: Arc<dyn WorkloadIo>,
    cache: Cache,
    /// The informer's changes: what a follower waits on between streams.
    changes: broadcast::Receiver<Arc<Notification>>,
    shutdown: CancellationToken,
    options: LogOptions,
    /// Prefix each line with its time, as `docker logs -t`.
    timestamps: bool,
    /// The runtime stream being read; none while waiting to resume.
    current: Option<IoStream<persys_controllers::io::LogChunk>>,
    /// The time of the last chunk delivered: a resumed stream starts there.
    last: Option<SystemTime>,
    /// Whether the current stream is a resumption (its errors of a missing
    /// object are waited out, not reported).
    resumed: bool,
}

impl Session {
    async fn next(&mut self) -> Option<Result<LogChunk, Status>> {
        loop {
            if let Some(stream) = self.current.as_mut() {
                let item = tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => return None,
                    item = stream.next() => item,
                };
                match item {
                    Some(Ok(chunk)) => {
                        if let (Some(last), Some(at)) = (self.last, chunk.timestamp)
                            && self.resumed
                            && at <= last
                        {
                            continue;
                        }
                        if chunk.timestamp.is_some() {
                            self.last = chunk.timestamp;
                        }
                        return Some(Ok(to_proto(chunk, self.timestamps)));
                    }
                    Some(Err(error)) => {
                        self.current = None;
                        let waitable = matches!(error, IoError::NotFound(_) | IoError::NotReady(_));
                        if !self.options.follow || !self.resumed || !waitable {
                            return Some(Err(io_status(error)));
                        }
                    }
                    None => {
                        self.current = None;
                        if !self.options.follow {
                            return None;
                        }
                    }
                }
            }
            // Following, and the runtime stream ended: wait for the
            // workload to come back (or go).
            let workload = self.cache.get(&self.id)?;
            if workload.uid() != self.uid || workload.is_deleting() {
                return None;
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return None,
                _ = next_change(&mut self.changes, &self.id) => {}
                _ = tokio::time::sleep(RESUME_TICK) => {}
            }
            let workload = self.cache.get(&self.id)?;
            if workload.uid() != self.uid || workload.is_deleting() {
                return None;
            }
            let mut options = self.options.clone();
            match self.last {
                Some(last) => {
                    options.since = Some(options.since.map_or(last, |s| s.max(last)));
                    options.tail = None;
                }
                // Nothing timed was seen: only what comes from now on.
                None => options.tail = Some(0),
            }
            self.current = Some(self.io.logs(&workload, options));
            self.resumed = true;
        }
    }
}

/// Waits for a change of workload `id` (or a lag, which may have hidden one).
async fn next_change(changes: &mut broadcast::Receiver<Arc<Notification>>, id: &str) {
    loop {
        match changes.recv().await {
            Ok(change) if change.id() == id => return,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => return,
            // The informer is gone (shutdown): leave it to the tick.
            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

fn to_proto(chunk: persys_controllers::io::LogChunk, timestamps: bool) -> LogChunk {
    let stream = match chunk.stream {
        OutputStream::Stdout => ProtoLogStream::Stdout,
        OutputStream::Stderr => ProtoLogStream::Stderr,
        OutputStream::Console => ProtoLogStream::Console,
    };
    let nanos = chunk
        .timestamp
        .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let data = match (timestamps, chunk.timestamp) {
        (true, Some(at)) => {
            let mut data = format!("{} ", humantime::format_rfc3339_nanos(at)).into_bytes();
            data.extend_from_slice(&chunk.data);
            data
        }
        _ => chunk.data.to_vec(),
    };
    LogChunk {
        stream: stream as i32,
        service: chunk.service,
        instance: chunk.instance,
        timestamp_unix_nanos: nanos,
        data,
    }
}

/// The gRPC code of a runtime's answer, as `kit::io` documents it.
pub(crate) fn io_status(error: IoError) -> Status {
    match error {
        IoError::NotFound(text) => Status::not_found(text),
        IoError::NotReady(text) => Status::failed_precondition(text),
        IoError::Invalid(text) => Status::invalid_argument(text),
        IoError::Unsupported(text) => Status::unimplemented(text),
        IoError::Runtime(text) => Status::unavailable(text),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tonic::Code;

    use super::*;

    fn request() -> StreamLogsRequest {
        StreamLogsRequest {
            id: "web".into(),
            ..Default::default()
        }
    }

    #[test]
    fn since_seconds_wins_over_since_time() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let both = StreamLogsRequest {
            since_seconds: 10,
            since_time_ms: 5_000,
            ..request()
        };
        let options = log_options(&both, now).unwrap();
        assert_eq!(options.since, Some(UNIX_EPOCH + Duration::from_secs(990)));
        let time_only = StreamLogsRequest {
            since_time_ms: 5_000,
            ..request()
        };
        let options = log_options(&time_only, now).unwrap();
        assert_eq!(options.since, Some(UNIX_EPOCH + Duration::from_secs(5)));
        assert_eq!(log_options(&request(), now).unwrap().since, None);
    }

    #[test]
    fn negative_tail_or_since_is_an_invalid_argument() {
        let now = SystemTime::now();
        for bad in [
            StreamLogsRequest {
                tail_lines: Some(-1),
                ..request()
            },
            StreamLogsRequest {
                since_seconds: -5,
                ..request()
            },
            StreamLogsRequest {
                id: String::new(),
                ..request()
            },
        ] {
            let status = log_options(&bad, now).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        }
        let tail = StreamLogsRequest {
            tail_lines: Some(5),
            service: "db".into(),
            ..request()
        };
        let options = log_options(&tail, now).unwrap();
        assert_eq!(options.tail, Some(5));
        assert_eq!(options.service.as_deref(), Some("db"));
    }

    #[test]
    fn timestamps_prefix_the_line_as_docker_logs_t_does() {
        let at = UNIX_EPOCH + Duration::from_nanos(1_764_774_976_123_456_789);
        let chunk = persys_controllers::io::LogChunk {
            stream: OutputStream::Stderr,
            service: String::new(),
            instance: "web".into(),
            timestamp: Some(at),
            data: Bytes::from_static(b"hello\n"),
        };
        let plain = to_proto(chunk.clone(), false);
        assert_eq!(plain.data, b"hello\n");
        assert_eq!(plain.timestamp_unix_nanos, 1_764_774_976_123_456_789);
        assert_eq!(plain.stream, ProtoLogStream::Stderr as i32);
        let stamped = to_proto(chunk, true);
        assert_eq!(
            String::from_utf8(stamped.data).unwrap(),
            "2025-12-03T15:16:16.123456789Z hello\n"
        );
    }
}
