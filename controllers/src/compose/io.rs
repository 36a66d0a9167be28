//! Logs and exec of compose workloads: their services' containers,
//! found by compose's project and service labels through the engine.

use futures::stream::BoxStream;
use persys_api::v1::Workload;

use crate::docker::Engine;
use crate::kit::io::{
    ExecInput, ExecOptions, ExecOutput, IoStream, LogChunk, LogOptions, WorkloadIo,
};

/// The Compose runtime's [`WorkloadIo`].
#[derive(Debug, Clone)]
pub struct ComposeIo {
    pub(crate) engine: Engine,
}

impl ComposeIo {
    pub fn new(engine: Engine) -> Self {
        ComposeIo { engine }
    }
}

impl WorkloadIo for ComposeIo {
    fn logs(&self, workload: &Workload, options: LogOptions) -> IoStream<LogChunk> {
        super::logs::project_logs(&self.engine, workload, options)
    }

    fn exec(
        &self,
        workload: &Workload,
        options: ExecOptions,
        input: BoxStream<'static, ExecInput>,
    ) -> IoStream<ExecOutput> {
        super::exec::service_exec(&self.engine, workload, options, input)
    }
}
