//! The prober: every registered probe on one timer wheel, in one task.
//!
//! A controller registers each workload's running containers with their
//! probes ([`Prober::watch`]) after a reconcile, and drops them when they
//! stop or the workload goes ([`Prober::forget`]). The runner task keeps
//! each probe's next due time in a `DelayQueue` (a hierarchical timing
//! wheel: one timer for all probes), runs at most `limit` checks at once
//! (the rest wait their turn in order), applies the thresholds, and
//! publishes verdicts the controllers read when they build status. A
//! controller is woken only when a verdict changes.
//!
//! With no probe registered the runner is not even started; once started,
//! it sleeps on its command channel while no probe is due.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::time::{DelayQueue, delay_queue};

use super::check::{self, Outcome, Target};
use super::spec::{ProbeKind, ProbeSpec};
use crate::docker::Engine;

/// Checks in flight at once, by default: enough for a thousand probes at
/// kubelet's default period and timeout, few enough that a node of hung
/// workloads cannot flood the engine with execs.
pub const DEFAULT_CONCURRENCY: usize = 64;

/// Due times fall on this grid: probes due within the same tick run in one
/// wake-up of the runner (and their connections complete together), rather
/// than one wake-up each. A check runs at most one tick after its time;
/// periods are whole seconds, so a probe keeps its place on the grid.
const TICK: Duration = Duration::from_millis(100);

/// Wakes a controller: the workload whose verdict changed. Bounded, sent
/// with `try_send`: a full channel means a wake is pending anyway, and the
/// resync is the safety net.
pub type Notifier = mpsc::Sender<String>;

/// A running container to probe, as a controller observed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub container_id: String,
    /// The engine's `StartedAt`: a new start is a new instance, whose
    /// probes start over.
    pub started_at: String,
    /// When it started, from which initial delays count.
    pub started: SystemTime,
    /// Its address on its network, for the network handlers.
    pub address: Option<IpAddr>,
    pub liveness: Option<ProbeSpec>,
    pub readiness: Option<ProbeSpec>,
}

/// A probe's verdict on one container start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The start it is about.
    pub started_at: String,
    /// None until the first check; then passing or failing by the
    /// thresholds.
    pub passing: Option<bool>,
    /// The output of the last check.
    pub output: String,
}

/// What the probes say of one container, for the controller's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceHealth {
    /// The readiness probe's verdict; None without one.
    pub readiness: Option<Verdict>,
    /// The liveness probe's verdict; None without one.
    pub liveness: Option<Verdict>,
}

impl InstanceHealth {
    /// The liveness probe's output once it failed beyond its threshold.
    pub fn liveness_failure(&self) -> Option<&str> {
        self.liveness
            .as_ref()
            .filter(|v| v.passing == Some(false))
            .map(|v| v.output.as_str())
    }
}

/// Verdicts by workload, then by (container, probe kind).
type Verdicts = HashMap<String, HashMap<(String, ProbeKind), Verdict>>;

/// The handle controllers use; cheap to clone. The runner task stops when
/// the last handle is dropped.
#[derive(Clone)]
pub struct Prober {
    shared: Arc<Shared>,
}

struct Shared {
    /// To the runner task.
    commands: mpsc::UnboundedSender<Command>,
    /// The runner, until the first registration starts it: a node without
    /// probes runs nothing.
    runner: Mutex<Option<Runner>>,
    /// What each workload has registered, so a reconcile that observes
    /// nothing new sends nothing. A std lock: never held across an await.
    registered: Mutex<HashMap<String, Vec<Registration>>>,
    /// Written by the runner, read by the controllers' status builds.
    verdicts: Arc<RwLock<Verdicts>>,
}

/// One probe as registered, compared between reconciles.
#[derive(Debug, Clone, PartialEq)]
struct Registration {
    container_id: String,
    started_at: String,
    kind: ProbeKind,
    spec: ProbeSpec,
}

enum Command {
    /// The workload's probes are now these (none: it has none running).
    Set {
        workload: String,
        probes: Vec<NewProbe>,
    },
}

struct NewProbe {
    registration: Registration,
    started: SystemTime,
    target: Arc<Target>,
    notify: Notifier,
}

impl Default for Prober {
    fn default() -> Self {
        Prober::new(DEFAULT_CONCURRENCY)
    }
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober").finish_non_exhaustive()
    }
}

impl Prober {
    /// A prober running at most `concurrency` checks at once.
    pub fn new(concurrency: usize) -> Prober {
        let (commands, receiver) = mpsc::unbounded_channel();
        let verdicts = Arc::new(RwLock::new(Verdicts::new()));
        let runner = Runner {
            commands: receiver,
            queue: DelayQueue::new(),
            probes: HashMap::new(),
            by_workload: HashMap::new(),
            in_flight: FuturesUnordered::new(),
            backlog: VecDeque::new(),
            limit: concurrency.max(1),
            next_id: 0,
            origin: Instant::now(),
            verdicts: verdicts.clone(),
        };
        Prober {
            shared: Arc::new(Shared {
                commands,
                runner: Mutex::new(Some(runner)),
                registered: Mutex::new(HashMap::new()),
                verdicts,
            }),
        }
    }

    /// Probes `instances` of `workload` from now on, in place of what it
    /// registered before; probes of a container start registered before
    /// keep their state. `notify` is woken with the workload's id when a
    /// verdict changes. Registers nothing (and forgets what was) when no
    /// instance has a probe.
    pub fn watch(
        &self,
        workload: &str,
        engine: &Engine,
        notify: &Notifier,
        instances: &[Instance],
    ) {
        let mut wanted = Vec::new();
        let mut probes = Vec::new();
        for instance in instances {
            let target = Arc::new(Target {
                engine: engine.clone(),
                container_id: instance.container_id.clone(),
                address: instance.address,
            });
            for (kind, spec) in [
                (ProbeKind::Liveness, &instance.liveness),
                (ProbeKind::Readiness, &instance.readiness),
            ] {
                let Some(spec) = spec else { continue };
                let registration = Registration {
                    container_id: instance.container_id.clone(),
                    started_at: instance.started_at.clone(),
                    kind,
                    spec: spec.clone(),
                };
                wanted.push(registration.clone());
                probes.push(NewProbe {
                    registration,
                    started: instance.started,
                    target: target.clone(),
                    notify: notify.clone(),
                });
            }
        }
        if wanted.is_empty() {
            self.forget(workload);
            return;
        }
        {
            let mut registered = lock(&self.shared.registered);
            if registered.get(workload) == Some(&wanted) {
                return;
            }
            registered.insert(workload.to_string(), wanted);
        }
        self.start_runner();
        let _ = self.shared.commands.send(Command::Set {
            workload: workload.to_string(),
            probes,
        });
    }

    /// Stops probing `workload`'s containers and drops their verdicts.
    pub fn forget(&self, workload: &str) {
        if lock(&self.shared.registered).remove(workload).is_none() {
            return;
        }
        write(&self.shared.verdicts).remove(workload);
        let _ = self.shared.commands.send(Command::Set {
            workload: workload.to_string(),
            probes: Vec::new(),
        });
    }

    /// What the probes say of `container_id` of `workload` since the start
    /// `started_at`. A probe registered for that start but not yet run
    /// answers a verdict without a result.
    pub fn health(&self, workload: &str, container_id: &str, started_at: &str) -> InstanceHealth {
        let registered = lock(&self.shared.registered);
        let verdicts = read(&self.shared.verdicts);
        let of = |kind: ProbeKind| -> Option<Verdict> {
            let probe = registered.get(workload)?.iter().find(|r| {
                r.container_id == container_id && r.started_at == started_at && r.kind == kind
            })?;
            let verdict = verdicts
                .get(workload)
                .and_then(|v| v.get(&(container_id.to_string(), kind)))
                .filter(|v| v.started_at == probe.started_at);
            Some(verdict.cloned().unwrap_or(Verdict {
                started_at: started_at.to_string(),
                passing: None,
                output: String::new(),
            }))
        };
        InstanceHealth {
            readiness: of(ProbeKind::Readiness),
            liveness: of(ProbeKind::Liveness),
        }
    }

    /// Probes registered now, for tests and metrics.
    pub fn registered(&self) -> usize {
        lock(&self.shared.registered).values().map(Vec::len).sum()
    }

    fn start_runner(&self) {
        if let Some(runner) = lock(&self.shared.runner).take() {
            tokio::spawn(runner.run());
        }
    }
}

/// A probe the runner keeps.
struct Running {
    workload: String,
    registration: Registration,
    /// The registration's spec, shared with each check it starts.
    spec: Arc<ProbeSpec>,
    target: Arc<Target>,
    notify: Notifier,
    successes: u32,
    failures: u32,
    /// The verdict by the thresholds; None before the first check.
    passing: Option<bool>,
    /// The output of the last check, as published with the verdict: a
    /// check that changes neither touches the shared verdicts.
    output: String,
    /// When its current (or next) check is due, on the grid.
    due: Instant,
    /// Its entry on the timer wheel while it waits for its next check.
    timer: Option<delay_queue::Key>,
}

/// The task running every probe.
struct Runner {
    commands: mpsc::UnboundedReceiver<Command>,
    /// Probe ids by due time: the one timer.
    queue: DelayQueue<u64>,
    probes: HashMap<u64, Running>,
    by_workload: HashMap<String, Vec<u64>>,
    /// Checks running, polled by this task (no task per check).
    in_flight: FuturesUnordered<BoxFuture<'static, (u64, Outcome)>>,
    /// Probes due while `limit` checks were running, oldest first.
    backlog: VecDeque<u64>,
    limit: usize,
    /// Ids are never reused, so a check that ends after its probe was
    /// dropped finds nothing to update.
    next_id: u64,
    /// Where the grid of due times starts.
    origin: Instant,
    verdicts: Arc<RwLock<Verdicts>>,
}

impl Runner {
    async fn run(mut self) {
        std::future::poll_fn(|cx| self.poll_run(cx)).await
    }

    /// Does everything that is ready, in one pass per wake-up: the
    /// commands, the checks that finished (then those waiting for a
    /// slot), the probes that are due, and the first poll of each check
    /// it started; then waits for the next of them. Ready when the last
    /// handle is dropped.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut busy = false;
            loop {
                match self.commands.poll_recv(cx) {
                    Poll::Ready(Some(command)) => {
                        self.apply(command);
                        busy = true;
                    }
                    Poll::Ready(None) => return Poll::Ready(()),
                    Poll::Pending => break,
                }
            }
            while let Poll::Ready(Some((id, outcome))) = self.in_flight.poll_next_unpin(cx) {
                self.finished(id, outcome);
                busy = true;
            }
            while self.in_flight.len() < self.limit {
                let Some(next) = self.backlog.pop_front() else {
                    break;
                };
                self.start(next);
                busy = true;
            }
            while let Poll::Ready(Some(expired)) = self.queue.poll_expired(cx) {
                let id = expired.into_inner();
                if let Some(probe) = self.probes.get_mut(&id) {
                    probe.timer = None;
                    self.start(id);
                    busy = true;
                }
            }
            // Nothing new: every source has this task's waker.
            if !busy {
                return Poll::Pending;
            }
        }
    }

    fn apply(&mut self, command: Command) {
        let Command::Set { workload, probes } = command;
        let old = self.by_workload.remove(&workload).unwrap_or_default();
        let mut kept = Vec::new();
        let mut ids = Vec::new();
        for new in probes {
            let same = old.iter().copied().find(|id| {
                self.probes
                    .get(id)
                    .is_some_and(|p| p.registration == new.registration)
            });
            if let Some(id) = same {
                kept.push(id);
                ids.push(id);
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let due = new
                .started
                .checked_add(new.registration.spec.initial_delay)
                .and_then(|due| due.duration_since(SystemTime::now()).ok())
                .unwrap_or_default();
            let due = self.on_grid(Instant::now() + due);
            let timer = self.queue.insert_at(id, due);
            self.probes.insert(
                id,
                Running {
                    workload: workload.clone(),
                    spec: Arc::new(new.registration.spec.clone()),
                    registration: new.registration,
                    target: new.target,
                    notify: new.notify,
                    successes: 0,
                    failures: 0,
                    passing: None,
                    output: String::new(),
                    due,
                    timer: Some(timer),
                },
            );
            ids.push(id);
        }
        let mut verdicts = write(&self.verdicts);
        for id in old.into_iter().filter(|id| !kept.contains(id)) {
            if let Some(probe) = self.probes.remove(&id) {
                if let Some(timer) = probe.timer {
                    self.queue.remove(&timer);
                }
                let key = (
                    probe.registration.container_id.clone(),
                    probe.registration.kind,
                );
                if let Some(of_workload) = verdicts.get_mut(&workload)
                    && of_workload
                        .get(&key)
                        .is_some_and(|v| v.started_at == probe.registration.started_at)
                {
                    of_workload.remove(&key);
                }
            }
        }
        self.backlog.retain(|id| self.probes.contains_key(id));
        if ids.is_empty() {
            verdicts.remove(&workload);
        } else {
            self.by_workload.insert(workload, ids);
        }
    }

    /// `at`, or the first tick of the grid after it.
    fn on_grid(&self, at: Instant) -> Instant {
        on_grid(self.origin, at)
    }

    /// Runs probe `id`'s check now, or as soon as a slot frees.
    fn start(&mut self, id: u64) {
        if self.in_flight.len() >= self.limit {
            self.backlog.push_back(id);
            return;
        }
        let Some(probe) = self.probes.get(&id) else {
            return;
        };
        let spec = probe.spec.clone();
        let target = probe.target.clone();
        self.in_flight.push(Box::pin(async move {
            (id, check::run(&spec.action, &target, spec.timeout).await)
        }));
    }

    /// Counts a check's outcome against the thresholds, publishes the
    /// verdict, wakes the controller when it changed, and schedules the
    /// next check (none after a liveness failure: the container is being
    /// restarted, and its next start is a new registration).
    fn finished(&mut self, id: u64, outcome: Outcome) {
        let Some(probe) = self.probes.get_mut(&id) else {
            return;
        };
        let spec = &probe.registration.spec;
        let kind = probe.registration.kind;
        if outcome.passed {
            probe.successes = probe.successes.saturating_add(1);
            probe.failures = 0;
        } else {
            probe.failures = probe.failures.saturating_add(1);
            probe.successes = 0;
        }
        // Before its first verdict a readiness probe counts as failing
        // and a liveness probe as passing, as kubelet's do.
        let before = probe.passing.unwrap_or(kind == ProbeKind::Liveness);
        let passing = if outcome.passed && probe.successes >= spec.success_threshold {
            true
        } else if !outcome.passed && probe.failures >= spec.failure_threshold {
            false
        } else {
            before
        };
        let changed = probe.passing != Some(passing);
        probe.passing = Some(passing);
        // Published only when the verdict or the output differs: a probe
        // that keeps passing takes no lock and allocates nothing.
        if changed || probe.output != outcome.output {
            probe.output = outcome.output;
            let verdict = Verdict {
                started_at: probe.registration.started_at.clone(),
                passing: Some(passing),
                output: probe.output.clone(),
            };
            write(&self.verdicts)
                .entry(probe.workload.clone())
                .or_default()
                .insert((probe.registration.container_id.clone(), kind), verdict);
        }
        if changed {
            tracing::debug!(
                workload_id = %probe.workload,
                container = %probe.registration.container_id,
                probe = kind.name(),
                passing,
                "probe verdict changed"
            );
            let _ = probe.notify.try_send(probe.workload.clone());
        }
        if kind == ProbeKind::Liveness && !passing {
            return;
        }
        // Every period from the last due time, as a ticker (kubelet's):
        // a check's own duration does not stretch the period. One that
        // overran its period runs at the next tick.
        let next = probe.due + spec.period;
        let now = Instant::now();
        let due = if next > now {
            next
        } else {
            on_grid(self.origin, now)
        };
        probe.due = due;
        probe.timer = Some(self.queue.insert_at(id, due));
    }
}

/// `at`, or the first tick after it of the grid starting at `origin`.
fn on_grid(origin: Instant, at: Instant) -> Instant {
    let since = at.saturating_duration_since(origin).as_nanos();
    let tick = TICK.as_nanos();
    let ticks = since.div_ceil(tick);
    let offset = u64::try_from(ticks.saturating_mul(tick)).unwrap_or(u64::MAX);
    origin + Duration::from_nanos(offset)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_are_rounded_up_to_the_next_tick() {
        let origin = Instant::now();
        let at = |ms: u64| origin + Duration::from_millis(ms);
        assert_eq!(on_grid(origin, at(0)), at(0));
        assert_eq!(on_grid(origin, at(1)), at(100));
        assert_eq!(on_grid(origin, at(100)), at(100));
        assert_eq!(on_grid(origin, at(10_050)), at(10_100));
        // Before the origin (a start already past): the origin.
        assert_eq!(on_grid(at(500), at(20)), at(500));
    }
}
