//! What the gRPC benchmarks share: the apply they send, the open-loop
//! pacing of calls, percentiles, and the agent process's CPU time from
//! /proc.

use std::time::{Duration, Instant};

use persys_api::v1::*;

/// A new revision of workload `id`: every call is a durable write (a
/// creation the first time, then a spec change).
pub fn request(id: String, revision: String) -> ApplyWorkloadRequest {
    ApplyWorkloadRequest {
        id,
        r#type: WorkloadType::Container as i32,
        revision_id: String::new(),
        desired_state: DesiredState::Running as i32,
        spec: Some(WorkloadSpec {
            spec: Some(workload_spec::Spec::Container(ContainerSpec {
                image: "persys-test/busybox:latest".into(),
                command: vec!["httpd".into(), "-f".into(), "-p".into(), "8080".into()],
                ports: vec![PortMapping {
                    host_port: 0,
                    container_port: 8080,
                    protocol: "tcp".into(),
                }],
                env: [("REVISION".to_string(), revision)].into(),
                ..Default::default()
            })),
        }),
    }
}

/// The `p` percentile (0..=1) of `sorted`, in milliseconds.
pub fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

/// CPU time the process has used, in clock ticks (100 a second).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| {
        fields
            .get(n)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line.
    field(11) + field(12)
}

/// Makes `rate × window` calls, open loop: the n-th is started at its due
/// time `started + n / rate` by a pacing thread of its own, whatever the
/// earlier ones are doing, so a stall delays every call behind it and each
/// call can count its latency from when it was due (no coordinated
/// omission). `call(n, due)` makes the n-th call's future, run as a task;
/// answers each task's output, in order, once all have finished.
pub async fn open_loop<T, F>(
    rate: f64,
    window: Duration,
    mut call: impl FnMut(usize, Instant) -> F + Send + 'static,
) -> Vec<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + Send + 'static,
{
    let runtime = tokio::runtime::Handle::current();
    let started = Instant::now();
    let tasks = tokio::task::spawn_blocking(move || {
        let every = Duration::from_secs_f64(1.0 / rate);
        let total = (rate * window.as_secs_f64()) as u32;
        let mut tasks = Vec::with_capacity(total as usize);
        for n in 0..total {
            let due = started + every * n;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            tasks.push(runtime.spawn(call(n as usize, due)));
        }
        tasks
    })
    .await
    .unwrap();
    let mut outputs = Vec::with_capacity(tasks.len());
    for task in tasks {
        outputs.push(task.await.unwrap());
    }
    outputs
}
