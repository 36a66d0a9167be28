//! The plan's rules as tables: each row a situation and the plan it must
//! get, at fixed instants after one `t0` (no clock, no sleeps).

use super::*;
use crate::vm::errors::FailureReason;
use crate::vm::libvirt::DomainState;
use PowerState::*;
use virt::sys;

const SECOND: Duration = Duration::from_secs(1);

fn marks(id: &str, scope: &str, revision: &str, spec_hash: &str) -> Marks {
    let (workload_id, scope) = (id.into(), scope.into());
    let (revision, spec_hash) = (revision.into(), spec_hash.into());
    Marks {
        workload_id,
        scope,
        revision,
        spec_hash,
        ..Default::default()
    }
}

/// The workload's domain "web", of its current spec (`h2`, `r2`).
fn domain(power: PowerState, reason: u32) -> FoundDomain {
    let marks = Some(marks("web", "test", "r2", "h2"));
    let state = DomainState {
        power,
        reason: reason as i32,
    };
    let (uuid, name) = ("u-1".into(), "web".into());
    FoundDomain {
        uuid,
        name,
        marks,
        state,
    }
}

fn power(power: PowerState) -> FoundDomain {
    domain(power, 0)
}

fn running() -> FoundDomain {
    domain(Running, sys::VIR_DOMAIN_RUNNING_BOOTED)
}

/// Shut off by a destroy: it ran before.
fn off() -> FoundDomain {
    domain(Shutoff, sys::VIR_DOMAIN_SHUTOFF_DESTROYED)
}

/// Defined, never started.
fn fresh() -> FoundDomain {
    domain(Shutoff, sys::VIR_DOMAIN_SHUTOFF_UNKNOWN)
}

/// Of the older spec `h1`, revision `r1`.
fn stale(found: FoundDomain) -> FoundDomain {
    let marks = Some(marks("web", "test", "r1", "h1"));
    FoundDomain { marks, ..found }
}

/// The workload's situation: desired state, status, what libvirt
/// shows, what is remembered, and how long after `t0` it is planned.
#[derive(Clone, Default)]
struct Case {
    stopped: bool,
    reported_running: bool,
    observed: Observation,
    memory: Memory,
    at: Duration,
}

/// A running workload whose domain is `found`.
fn on(found: FoundDomain) -> Case {
    Case::default().with(found)
}

impl Case {
    fn with(mut self, found: FoundDomain) -> Self {
        self.observed.current = Some(found);
        self
    }
    fn stopped(mut self) -> Self {
        self.stopped = true;
        self
    }
    fn reported_running(mut self) -> Self {
        self.reported_running = true;
        self
    }
    fn at(mut self, at: Duration) -> Self {
        self.at = at;
        self
    }
    fn memory(mut self, f: impl FnOnce(&mut Memory)) -> Self {
        f(&mut self.memory);
        self
    }
}

/// Rows of one rule set, planned against fixed instants from `t0`.
struct Table {
    t0: Instant,
    ours: Marks,
}

impl Table {
    fn new() -> Self {
        let ours = marks("web", "test", "r2", "h2");
        let t0 = Instant::now();
        Table { t0, ours }
    }

    /// Each case must get its plan; the rule names a row that does not.
    fn check(&self, rows: Vec<(&str, Case, Plan)>) {
        let rules = Rules {
            crash_loop: CrashLoopPolicy::default(),
            stop_timeout: 30 * SECOND,
        };
        for (rule, case, want) in rows {
            let desired = Desired {
                name: "web",
                marks: &self.ours,
                running: !case.stopped,
                reported_running: case.reported_running,
                rules,
            };
            let got = plan(&desired, &case.observed, &case.memory, self.t0 + case.at);
            assert_eq!(got, want, "{rule}");
        }
    }

    /// The last start failed at `t0` (a retry can help).
    fn failed_start(&self) -> impl FnOnce(&mut Memory) {
        let t0 = self.t0;
        move |m: &mut Memory| {
            m.crash.start_failed(t0, 0);
            m.last_failure = Some((FailureReason::RuntimeError, "boom".into()));
        }
    }

    /// A restart at `t0`.
    fn restarted(&self) -> impl Fn(&mut Memory) {
        let t0 = self.t0;
        move |m: &mut Memory| m.crash.restarted(t0, 0)
    }

    /// An ACPI shutdown was asked for at `t0`.
    fn shutting_down(&self) -> impl FnOnce(&mut Memory) {
        let t0 = self.t0;
        move |m: &mut Memory| m.shutdown_since = Some(t0)
    }
}

/// What the back-off of a start failed at `t0` reports at `t0 + 1s`.
fn held() -> Failed {
    Failed {
        reason: FailureReason::RuntimeError,
        detail: "boom".into(),
        retry_in: Some(9 * SECOND),
        due_ms: Some(10_000),
    }
}

fn report(domain: FoundDomain) -> Plan {
    Plan::Report { domain }
}

fn start(domain: FoundDomain) -> Plan {
    Plan::Start { domain }
}

fn stop(domain: FoundDomain, step: StopStep) -> Plan {
    Plan::Stop { domain, step }
}

fn hold(domain_off: bool) -> Plan {
    let failed = held();
    Plan::HoldStart { failed, domain_off }
}

fn restart_of(domain: FoundDomain, why: &str) -> Restart {
    let crashed = domain.state.power == Crashed;
    let why = why.into();
    Restart {
        domain,
        why,
        crashed,
    }
}

fn restart(domain: FoundDomain, why: &str) -> Plan {
    Plan::Restart(restart_of(domain, why))
}

/// The back-off after one restart at `t0`, seen at `t0 + 1s`.
fn back_off(domain: FoundDomain, why: &str) -> Plan {
    let restart = restart_of(domain, why);
    let (delay, remaining) = (10 * SECOND, 9 * SECOND);
    Plan::BackOff {
        restart,
        delay,
        remaining,
        due_ms: 10_000,
    }
}

fn replace(domain: FoundDomain, step: StopStep, held: Option<Failed>) -> Plan {
    let renamed = domain.name != "web";
    let old = domain.marks.as_ref().map_or("", |m| m.revision.as_str());
    let why = format!("the spec changed (revision {old} → r2)");
    Plan::Replace(Replacement {
        domain,
        why,
        step,
        renamed,
        held,
    })
}

#[test]
fn a_running_guest_is_reported_a_paused_one_resumed_and_a_passing_state_awaited() {
    let awaited = |domain| Plan::AwaitTransient { domain };
    let resume = |domain| Plan::Resume { domain };
    #[rustfmt::skip]
    Table::new().check(vec![
        ("running",                  on(running()),            report(running())),
        ("blocked on I/O",           on(power(Blocked)),       report(power(Blocked))),
        ("paused",                   on(power(Paused)),        resume(power(Paused))),
        ("shutting down on its own", on(power(ShuttingDown)),  awaited(power(ShuttingDown))),
        ("suspended",                on(power(Suspended)),     awaited(power(Suspended))),
    ]);
}

#[test]
fn a_guest_that_stopped_on_its_own_restarts_at_once_then_waits_the_crash_loop_back_off() {
    let t = Table::new();
    let stopped = on(off()).reported_running();
    let again = stopped.clone().memory(t.restarted());
    let restarted = t.restarted();
    let thrice = stopped
        .clone()
        .memory(|m| (0..3).for_each(|_| restarted(m)));
    let crashed = on(power(Crashed));
    let (why, crash) = ("the guest stopped (destroyed)", "the guest crashed");
    #[rustfmt::skip]
    t.check(vec![
        ("the first restart is immediate", stopped,               restart(off(), why)),
        ("the next waits the back-off",    again.clone().at(SECOND), back_off(off(), why)),
        ("until it has passed",            again.at(10 * SECOND), restart(off(), why)),
        ("a count past the reset is gone", thrice.at(600 * SECOND), restart(off(), why)),
        ("a crash restarts, status aside", crashed.clone(),       restart(power(Crashed), crash)),
        ("and backs off alike", crashed.memory(t.restarted()).at(SECOND), back_off(power(Crashed), crash)),
    ]);
}

#[test]
fn a_guest_off_but_not_on_its_own_gets_a_first_start_not_a_restart() {
    let t = Table::new();
    let by_the_agent = on(off()).reported_running().memory(t.shutting_down());
    #[rustfmt::skip]
    t.check(vec![
        ("just defined",                    on(fresh()).reported_running(), start(fresh())),
        ("not reported running",            on(off()),                       start(off())),
        ("stopped by the agent's shutdown", by_the_agent,                    start(off())),
    ]);
}

#[test]
fn failed_starts_hold_every_start_until_their_back_off_has_passed() {
    let t = Table::new();
    let failed = Case::default().memory(t.failed_start());
    let backing_off = Case::default().memory(t.restarted()).at(SECOND);
    let stale_off = failed.clone().with(stale(off())).at(SECOND);
    let stop_then_hold = replace(stale(off()), StopStep::AlreadyOff, Some(held()));
    #[rustfmt::skip]
    t.check(vec![
        ("nothing failed: create",        Case::default(),                       Plan::Create),
        ("a create is held",              failed.clone().at(SECOND),             hold(false)),
        ("until the back-off has passed", failed.clone().at(10 * SECOND),        Plan::Create),
        ("a start of a defined domain",   failed.with(fresh()).at(SECOND),       hold(true)),
        ("a replacement stops, then holds", stale_off,                           stop_then_hold),
        ("a crash loop alone holds no first start", backing_off,                 Plan::Create),
    ]);
}

#[test]
fn a_new_spec_or_name_replaces_the_domain_after_a_graceful_stop() {
    let t = Table::new();
    let old = stale(running());
    let renamed = FoundDomain {
        name: "old-web".into(),
        ..running()
    };
    let stopping = on(old.clone()).memory(t.shutting_down());
    let step = |step| replace(old.clone(), step, None);
    #[rustfmt::skip]
    t.check(vec![
        ("a new spec: shut down first",   on(old.clone()),               step(StopStep::Shutdown)),
        ("a new name: define anew",       on(renamed.clone()),           replace(renamed, StopStep::Shutdown, None)),
        ("within the stop timeout",       stopping.clone().at(10 * SECOND), step(StopStep::Wait(20 * SECOND))),
        ("then forced off",               stopping.at(30 * SECOND),      step(StopStep::ForceOff)),
    ]);
}

#[test]
fn desired_stopped_shuts_down_gracefully_then_forces_off_after_the_stop_timeout() {
    let t = Table::new();
    let stopped = Case::default().stopped();
    let stopping = stopped.clone().with(running()).memory(t.shutting_down());
    let almost = 30 * SECOND - MIN_REQUEUE / 2;
    let old = stale(running());
    let step = |step| stop(running(), step);
    #[rustfmt::skip]
    t.check(vec![
        ("nothing defined stays so",     stopped.clone(),                  Plan::StayUndefined),
        ("an ACPI shutdown first",       stopped.clone().with(running()),  step(StopStep::Shutdown)),
        ("then the stop timeout runs",   stopping.clone().at(10 * SECOND), step(StopStep::Wait(20 * SECOND))),
        ("never a wait under the floor", stopping.clone().at(almost),      step(StopStep::Wait(MIN_REQUEUE))),
        ("then it is forced off",        stopping.at(30 * SECOND),         step(StopStep::ForceOff)),
        ("off already",                  stopped.clone().with(off()),      stop(off(), StopStep::AlreadyOff)),
        ("an older spec is not replaced", stopped.with(old.clone()),       stop(old, StopStep::Shutdown)),
    ]);
}

#[test]
fn the_first_look_adopts_the_domain_found_and_duplicates_are_removed_first() {
    let mut first = Case::default();
    first.observed.first_look = true;
    let twice = |mut case: Case| {
        case.observed.duplicates = vec![stale(fresh())];
        case
    };
    let adopt = |then| Plan::Adopt {
        domain: running(),
        then: Box::new(then),
    };
    let without = |then| Plan::RemoveDuplicates {
        duplicates: vec![stale(fresh())],
        then: Box::new(then),
    };
    let shutdown = stop(running(), StopStep::Shutdown);
    #[rustfmt::skip]
    Table::new().check(vec![
        ("found on the first look",   first.clone().with(running()),      adopt(report(running()))),
        ("nothing found, no adoption", first.clone(),                     Plan::Create),
        ("found later: ours already", on(running()),                      report(running())),
        ("duplicates go first",       twice(first.with(running())),       without(adopt(report(running())))),
        ("also before a stop",        twice(on(running()).stopped()),     without(shutdown)),
    ]);
}

#[test]
fn a_name_held_by_another_domain_is_reported_and_never_touched() {
    let held_by = |marks: Option<Marks>| {
        let mut case = on(running());
        case.observed.by_name = Some(FoundDomain { marks, ..fresh() });
        case
    };
    let taken = |holder: &str| Plan::NameTaken {
        holder: holder.into(),
    };
    let unmanaged = "a domain persys does not manage";
    #[rustfmt::skip]
    Table::new().check(vec![
        ("an unmanaged domain", held_by(None),                                 taken(unmanaged)),
        ("another workload's",  held_by(Some(marks("db", "test", "r1", "h1"))), taken("the domain of workload \"db\"")),
        ("another scope's",     held_by(Some(marks("web", "else", "r1", "h1"))), taken("a domain of another persys scope (\"else\")")),
        ("even while stopping", held_by(None).stopped(),                       taken(unmanaged)),
        ("the workload's own",  held_by(Some(marks("web", "test", "r2", "h2"))), report(running())),
    ]);
}
