//! `Exec` and `Console`: sessions inside a workload through its runtime's
//! [`WorkloadIo`](persys_controllers::io::WorkloadIo).

use std::pin::Pin;

use futures::Stream;
use persys_api::v1::{ConsoleRequest, ConsoleResponse, ExecRequest, ExecResponse};
use tonic::{Request, Status, Streaming};

use super::Agent;

pub type ExecStream = Pin<Box<dyn Stream<Item = Result<ExecResponse, Status>> + Send>>;
pub type ConsoleStream = Pin<Box<dyn Stream<Item = Result<ConsoleResponse, Status>> + Send>>;

pub async fn exec(
    agent: &Agent,
    request: Request<Streaming<ExecRequest>>,
) -> Result<ExecStream, Status> {
    let _ = (agent, request);
    Err(Status::unimplemented("Exec is being built"))
}

pub async fn console(
    agent: &Agent,
    request: Request<Streaming<ConsoleRequest>>,
) -> Result<ConsoleStream, Status> {
    let _ = (agent, request);
    Err(Status::unimplemented("Console is being built"))
}
