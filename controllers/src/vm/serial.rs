//! A VM's serial console log: libvirt writes it to a file under the state
//! directory; this reads (and follows) it.

use persys_api::v1::Workload;

use super::io::VmIo;
use crate::kit::io::{IoError, IoStream, LogChunk, LogOptions, failed};

pub(crate) fn console_log(
    io: &VmIo,
    workload: &Workload,
    options: LogOptions,
) -> IoStream<LogChunk> {
    let _ = (io, workload, options);
    failed(IoError::Unsupported("VM logs: being built".into()))
}
