//! A command run in a compose service's container.

use futures::stream::BoxStream;
use persys_api::v1::Workload;

use crate::docker::Engine;
use crate::kit::io::{ExecInput, ExecOptions, ExecOutput, IoError, IoStream, failed};

pub(crate) fn service_exec(
    engine: &Engine,
    workload: &Workload,
    options: ExecOptions,
    input: BoxStream<'static, ExecInput>,
) -> IoStream<ExecOutput> {
    let _ = (engine, workload, options, input);
    failed(IoError::Unsupported("compose exec: being built".into()))
}
