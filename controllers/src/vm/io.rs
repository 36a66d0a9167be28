//! Logs and console of VM workloads: the serial console, captured by
//! libvirt to a log file, and attached to live.

use bytes::Bytes;
use futures::stream::BoxStream;
use persys_api::v1::Workload;

use super::config::VmConfig;
use super::libvirt::Hypervisor;
use crate::kit::io::{
    ExecInput, ExecOptions, ExecOutput, IoError, IoStream, LogChunk, LogOptions, WorkloadIo, failed,
};

/// The VM runtime's [`WorkloadIo`].
#[derive(Clone)]
pub struct VmIo {
    pub(crate) config: VmConfig,
    pub(crate) hypervisor: Hypervisor,
}

impl WorkloadIo for VmIo {
    fn logs(&self, workload: &Workload, options: LogOptions) -> IoStream<LogChunk> {
        super::serial::console_log(self, workload, options)
    }

    fn exec(
        &self,
        _workload: &Workload,
        _options: ExecOptions,
        _input: BoxStream<'static, ExecInput>,
    ) -> IoStream<ExecOutput> {
        failed(IoError::Unsupported(
            "a VM has no exec: attach to its serial console with `persysctl console ID` (the Console RPC)".into(),
        ))
    }

    fn console(
        &self,
        workload: &Workload,
        force: bool,
        input: BoxStream<'static, Bytes>,
    ) -> IoStream<Bytes> {
        super::console::attach(self, workload, force, input)
    }
}
