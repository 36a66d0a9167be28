//! Logs and exec of container workloads, through the engine's API.

use futures::stream::BoxStream;
use persys_api::v1::Workload;

use super::engine::Engine;
use crate::kit::io::{
    ExecInput, ExecOptions, ExecOutput, IoStream, LogChunk, LogOptions, WorkloadIo,
};

/// The Docker runtime's [`WorkloadIo`].
#[derive(Debug, Clone)]
pub struct DockerIo {
    pub(crate) engine: Engine,
}

impl DockerIo {
    pub fn new(engine: Engine) -> Self {
        DockerIo { engine }
    }
}

impl WorkloadIo for DockerIo {
    fn logs(&self, workload: &Workload, options: LogOptions) -> IoStream<LogChunk> {
        super::logs::container_logs(&self.engine, workload, options)
    }

    fn exec(
        &self,
        workload: &Workload,
        options: ExecOptions,
        input: BoxStream<'static, ExecInput>,
    ) -> IoStream<ExecOutput> {
        super::exec::container_exec(&self.engine, workload, options, input)
    }
}
