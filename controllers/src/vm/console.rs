//! Attaching to a VM's serial console (`virDomainOpenConsole`).

use bytes::Bytes;
use futures::stream::BoxStream;
use persys_api::v1::Workload;

use super::io::VmIo;
use crate::kit::io::{IoError, IoStream, failed};

pub(crate) fn attach(
    io: &VmIo,
    workload: &Workload,
    force: bool,
    input: BoxStream<'static, Bytes>,
) -> IoStream<Bytes> {
    let _ = (io, workload, force, input);
    failed(IoError::Unsupported("VM console: being built".into()))
}
