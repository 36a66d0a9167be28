//! The logs of a compose project's containers.

use persys_api::v1::Workload;

use crate::docker::Engine;
use crate::kit::io::{IoError, IoStream, LogChunk, LogOptions, failed};

pub(crate) fn project_logs(
    engine: &Engine,
    workload: &Workload,
    options: LogOptions,
) -> IoStream<LogChunk> {
    let _ = (engine, workload, options);
    failed(IoError::Unsupported("compose logs: being built".into()))
}
