//! A container's logs from the engine.

use persys_api::v1::Workload;

use super::engine::Engine;
use crate::kit::io::{IoError, IoStream, LogChunk, LogOptions, failed};

pub(crate) fn container_logs(
    engine: &Engine,
    workload: &Workload,
    options: LogOptions,
) -> IoStream<LogChunk> {
    let _ = (engine, workload, options);
    failed(IoError::Unsupported("container logs: being built".into()))
}
