//! `StreamLogs`: a workload's output through its runtime's
//! [`WorkloadIo`](persys_controllers::io::WorkloadIo).

use std::pin::Pin;

use futures::Stream;
use persys_api::v1::{LogChunk, StreamLogsRequest};
use tonic::{Request, Status};

use super::Agent;

pub type LogStream = Pin<Box<dyn Stream<Item = Result<LogChunk, Status>> + Send>>;

pub async fn stream_logs(
    agent: &Agent,
    request: Request<StreamLogsRequest>,
) -> Result<LogStream, Status> {
    let _ = (agent, request);
    Err(Status::unimplemented("StreamLogs is being built"))
}
