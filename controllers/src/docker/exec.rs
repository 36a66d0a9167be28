//! A command run in a container (Docker exec).

use futures::stream::BoxStream;
use persys_api::v1::Workload;

use super::engine::Engine;
use crate::kit::io::{ExecInput, ExecOptions, ExecOutput, IoError, IoStream, failed};

pub(crate) fn container_exec(
    engine: &Engine,
    workload: &Workload,
    options: ExecOptions,
    input: BoxStream<'static, ExecInput>,
) -> IoStream<ExecOutput> {
    let _ = (engine, workload, options, input);
    failed(IoError::Unsupported("container exec: being built".into()))
}
