//! The plan's rules, one table row each: a row fails when its rule breaks.

use super::*;
use crate::crash_loop::CrashLoop;
use ContainerStateStatusEnum::{CREATED, DEAD, EXITED, PAUSED, REMOVING, RESTARTING, RUNNING};
use RestartRule::{Never as No, OnFailure};
use bollard::models::ContainerState;

const IMAGE: &str = "registry.example/app:1";

fn desired(running: bool, restart: RestartRule, pull: PullPolicy) -> Desired {
    let config = DockerConfig::default();
    let (crash_loop, pull_backoff) = (config.crash_loop, config.pull_backoff);
    let image = IMAGE.into();
    Desired {
        running,
        image,
        pull,
        restart,
        crash_loop,
        pull_backoff,
    }
}

fn running() -> Desired {
    desired(true, RestartRule::Always, PullPolicy::IfNotPresent)
}

fn stopped() -> Desired {
    desired(false, RestartRule::Always, PullPolicy::IfNotPresent)
}

fn policy(rule: RestartRule) -> Desired {
    desired(true, rule, PullPolicy::IfNotPresent)
}

fn pull(policy: PullPolicy) -> Desired {
    desired(true, RestartRule::Always, policy)
}

/// The workload's container, in `status`, having exited with `exit_code`.
fn kept(status: Option<ContainerStateStatusEnum>, exit_code: i64) -> Observation {
    let state = ContainerState {
        status,
        exit_code: Some(exit_code),
        ..Default::default()
    };
    let id = Some("c1".into());
    let kept = Some(ContainerInspectResponse {
        id,
        state: Some(state),
        ..Default::default()
    });
    Observation {
        kept,
        ..Default::default()
    }
}

fn seen(status: ContainerStateStatusEnum) -> Observation {
    kept(Some(status), 0)
}

fn exited(exit_code: i64) -> Observation {
    kept(Some(EXITED), exit_code)
}

/// No container of the current spec; the image looked at or not.
fn none(image_present: Option<bool>) -> Observation {
    Observation {
        image_present,
        ..Default::default()
    }
}

/// The memory of the current spec, after `f`.
fn memory(f: impl FnOnce(&mut Memory)) -> Memory {
    let mut memory = Memory {
        spec_hash: "h1".into(),
        ..Default::default()
    };
    f(&mut memory);
    memory
}

fn fresh() -> Memory {
    memory(|_| {})
}

/// Started once at `t0`.
fn started(t0: Instant) -> Memory {
    memory(|m| m.crash.started(t0, 0))
}

/// Restarted `n` times, the last at `t0`.
fn restarted(t0: Instant, n: u32) -> Memory {
    memory(|m| (0..n).for_each(|_| m.crash.restarted(t0, 0)))
}

/// `n` restarts carried over from an earlier agent, none counted here.
fn carried(n: i32) -> Memory {
    memory(|m| m.crash = CrashLoop::new(n))
}

fn terminal(memory: Memory) -> Memory {
    let terminal = Some((FailureReason::InvalidSpec, "bad mount".into()));
    Memory { terminal, ..memory }
}

/// A start refused at `t0` because the port is taken.
fn failed_start(t0: Instant) -> Memory {
    let reason = FailureReason::PortBindConflict;
    let policy = CrashLoopPolicy::default();
    memory(|m| {
        kit::failed_start(
            &mut m.crash,
            &mut m.last_failure,
            reason,
            "port taken",
            &policy,
            (t0, 0),
        );
    })
}

/// A pull of `image` failed at `t0`.
fn failed_pull(t0: Instant, image: &str) -> Memory {
    memory(|m| {
        m.pull_image = image.into();
        m.pull.counted(t0, 0);
        m.last_failure = Some((FailureReason::ImagePullFailed, "denied".into()));
    })
}

fn restart(exit_code: i64) -> Plan {
    Plan::RestartAfterExit { exit_code }
}

fn create(pull_first: bool) -> Plan {
    Plan::Create { pull_first }
}

fn transient(state: &str) -> Plan {
    Plan::WaitTransient {
        state: state.into(),
    }
}

fn given_up(detail: &str) -> Plan {
    Plan::GaveUp {
        detail: detail.into(),
    }
}

fn back_off(exit_code: i64, delay: u64, remaining: u64) -> Plan {
    let (delay, remaining) = (Duration::from_secs(delay), Duration::from_secs(remaining));
    let due_ms = delay.as_millis() as i64;
    Plan::CrashLoopBackOff {
        exit_code,
        delay,
        remaining,
        due_ms,
    }
}

fn held_terminal(announced_restart: Option<i64>) -> Plan {
    let (reason, detail) = (FailureReason::InvalidSpec, "bad mount".into());
    Plan::HeldByTerminalFailure {
        reason,
        detail,
        announced_restart,
    }
}

/// Held by a failure remembered at `t0` (due at 10 s), `retry_in` s left.
fn held(reason: FailureReason, detail: &str, retry_in: u64) -> Failed {
    let (detail, retry_in) = (detail.into(), Some(Duration::from_secs(retry_in)));
    Failed {
        reason,
        detail,
        retry_in,
        due_ms: Some(10_000),
    }
}

fn port_taken(retry_in: u64) -> Plan {
    Plan::HeldByStartBackOff(held(
        FailureReason::PortBindConflict,
        "port taken",
        retry_in,
    ))
}

fn pull_back_off(retry_in: u64) -> Plan {
    Plan::PullBackOff(held(FailureReason::ImagePullFailed, "denied", retry_in))
}

/// One rule: its spec, the plan's inputs, how many seconds past the
/// memory's moments it is planned, and the plan it must give.
type Rule = (&'static str, Desired, Observation, Memory, u64, Plan);

fn check(t0: Instant, rules: Vec<Rule>) {
    for (spec, desired, observed, memory, after, expected) in rules {
        let now = t0 + Duration::from_secs(after);
        assert_eq!(plan(&desired, &observed, &memory, now), expected, "{spec}");
    }
}

#[test]
#[rustfmt::skip]
fn desired_stopped_stops_what_runs_and_leaves_the_rest() {
    check(Instant::now(), vec![
        ("a running container is stopped", stopped(), seen(RUNNING), fresh(), 1, Plan::Stop),
        ("a paused container is stopped", stopped(), seen(PAUSED), fresh(), 1, Plan::Stop),
        ("a restarting one is stopped", stopped(), seen(RESTARTING), fresh(), 1, Plan::Stop),
        ("an exited container stays stopped", stopped(), exited(1), fresh(), 1, Plan::StayStopped),
        ("a created one stays stopped", stopped(), seen(CREATED), fresh(), 1, Plan::StayStopped),
        ("no container, held or not, is stopped already",
            stopped(), none(None), terminal(fresh()), 1, Plan::StayStopped),
    ]);
}

#[test]
#[rustfmt::skip]
fn a_container_of_the_current_spec_is_run_by_its_state() {
    check(Instant::now(), vec![
        ("a running container is reported running",
            running(), seen(RUNNING), fresh(), 1, Plan::ReportRunning),
        ("a paused container is unpaused", running(), seen(PAUSED), fresh(), 1, Plan::Unpause),
        ("a created container is started", running(), seen(CREATED), fresh(), 1, Plan::StartFirst),
        ("a restarting container is looked at again",
            running(), seen(RESTARTING), fresh(), 1, transient("restarting")),
        ("a container being removed is looked at again",
            running(), seen(REMOVING), fresh(), 1, transient("removing")),
        ("a container without a state is looked at again",
            running(), kept(None, 0), fresh(), 1, transient("")),
    ]);
}

#[test]
#[rustfmt::skip]
fn an_exited_container_restarts_at_once_then_after_a_doubling_back_off() {
    let t0 = Instant::now();
    check(t0, vec![
        ("the first restart is immediate", running(), exited(1), started(t0), 1, restart(1)),
        ("exit code 0 restarts too", running(), exited(0), started(t0), 1, restart(0)),
        ("the next waits the base back-off since the restart",
            running(), exited(2), restarted(t0, 1), 1, back_off(2, 10, 9)),
        ("once it passed the restart goes", running(), exited(2), restarted(t0, 1), 10, restart(2)),
        ("each further exit doubles the wait",
            running(), exited(2), restarted(t0, 3), 30, back_off(2, 40, 10)),
        ("a restart ten minutes ago forgets the back-off",
            running(), exited(2), restarted(t0, 5), 600, restart(2)),
        ("restarts carried from an earlier agent do not delay",
            running(), exited(1), carried(7), 1, restart(1)),
        ("a dead container is replaced",
            running(), kept(Some(DEAD), 137), started(t0), 1, Plan::ReplaceDead),
        ("a dead container waits the crash-loop back-off too",
            running(), kept(Some(DEAD), 137), restarted(t0, 1), 1, back_off(137, 10, 9)),
    ]);
}

#[test]
#[rustfmt::skip]
fn the_restart_policy_decides_whether_an_exit_is_restarted() {
    let t0 = Instant::now();
    let on_failure = OnFailure { max_restarts: 2 };
    check(t0, vec![
        ("policy no: exit 0 is completed", policy(No), exited(0), started(t0), 1, Plan::Completed),
        ("policy no: a failure is given up", policy(No), exited(1), started(t0), 1,
            given_up("container exited; its restart policy is no")),
        ("on-failure: exit 0 is completed",
            policy(on_failure), exited(0), started(t0), 1, Plan::Completed),
        ("on-failure: below the limit a failure restarts",
            policy(on_failure), exited(1), carried(1), 1, restart(1)),
        ("on-failure: the limit reached gives up", policy(on_failure), exited(1), carried(2), 1,
            given_up("container exited; restart limit of 2 reached")),
        ("on-failure without a limit restarts forever",
            policy(OnFailure { max_restarts: 0 }), exited(1), carried(50), 1, restart(1)),
    ]);
}

#[test]
#[rustfmt::skip]
fn failed_starts_hold_the_next_start_and_a_terminal_failure_holds_it_until_a_new_spec() {
    let t0 = Instant::now();
    check(t0, vec![
        ("a terminal failure holds a first start",
            running(), seen(CREATED), terminal(fresh()), 1, held_terminal(None)),
        ("a terminal failure holds a create",
            running(), none(Some(true)), terminal(fresh()), 1, held_terminal(None)),
        ("a terminal failure holds a restart, once announced",
            running(), exited(127), terminal(started(t0)), 1, held_terminal(Some(127))),
        ("a terminal failure does not hide a crash-loop back-off",
            running(), exited(1), terminal(restarted(t0, 1)), 1, back_off(1, 10, 9)),
        ("a terminal failure wins over the failed-start back-off",
            running(), seen(CREATED), terminal(failed_start(t0)), 1, held_terminal(None)),
        ("a failed start holds the next first start for its back-off",
            running(), seen(CREATED), failed_start(t0), 1, port_taken(9)),
        ("a failed start holds a create for its back-off",
            running(), none(Some(true)), failed_start(t0), 4, port_taken(6)),
        ("once the back-off passed the start goes",
            running(), seen(CREATED), failed_start(t0), 10, Plan::StartFirst),
        ("a refused restart is reported, not the exit, while its back-off runs",
            running(), exited(137), failed_start(t0), 1, port_taken(9)),
        ("once that back-off passed the restart goes",
            running(), exited(137), failed_start(t0), 10, restart(137)),
        ("a terminal failure does not hold a stop",
            stopped(), seen(RUNNING), terminal(fresh()), 1, Plan::Stop),
    ]);
}

#[test]
#[rustfmt::skip]
fn a_create_looks_for_the_image_and_pulls_as_its_policy_and_back_off_say() {
    let t0 = Instant::now();
    let (always, never) = (pull(PullPolicy::Always), || pull(PullPolicy::Never));
    let refused = Plan::PullPolicyNever {
        detail: format!("image {IMAGE} is not on this node and the pull policy is Never"),
    };
    check(t0, vec![
        ("whether the image is there is looked at first",
            running(), none(None), fresh(), 1, Plan::LookForImage),
        ("an image on the node is not pulled",
            running(), none(Some(true)), fresh(), 1, create(false)),
        ("a missing image is pulled first", running(), none(Some(false)), fresh(), 1, create(true)),
        ("policy Always pulls without looking",
            always.clone(), none(None), fresh(), 1, create(true)),
        ("policy Never uses an image on the node",
            never(), none(Some(true)), fresh(), 1, create(false)),
        ("policy Never refuses a missing image", never(), none(Some(false)), fresh(), 1, refused),
        ("a failed pull waits its back-off",
            running(), none(Some(false)), failed_pull(t0, IMAGE), 1, pull_back_off(9)),
        ("policy Always waits the pull back-off too",
            always, none(None), failed_pull(t0, IMAGE), 3, pull_back_off(7)),
        ("policy Never waits the back-off of its refusal",
            never(), none(Some(false)), failed_pull(t0, IMAGE), 1, pull_back_off(9)),
        ("once the back-off passed the pull goes",
            running(), none(Some(false)), failed_pull(t0, IMAGE), 10, create(true)),
        ("the back-off of another image does not hold a new one",
            running(), none(Some(false)), failed_pull(t0, "app:0"), 1, create(true)),
        ("an image that arrived meanwhile is not pulled",
            running(), none(Some(true)), failed_pull(t0, IMAGE), 1, create(false)),
    ]);
}

#[test]
fn containers_of_an_older_spec_go_first_unless_a_create_replaces_them_after_its_pull() {
    let first = |d: Desired, o: Observation| replaces_stale_first(&d, &o);
    assert!(
        first(running(), seen(RUNNING)),
        "a container of the new spec is there"
    );
    assert!(
        first(stopped(), none(None)),
        "desired stopped: nothing old stays"
    );
    assert!(
        !first(running(), none(Some(false))),
        "the new image is pulled first"
    );
}

fn unhealthy(status: ContainerStateStatusEnum) -> Observation {
    Observation {
        unhealthy: Some("no heartbeat".into()),
        ..seen(status)
    }
}

#[test]
#[rustfmt::skip]
fn a_failed_liveness_probe_restarts_a_running_container_and_nothing_else() {
    let kill = Plan::RestartUnhealthy { output: "no heartbeat".into() };
    check(Instant::now(), vec![
        ("a running container failing liveness is restarted",
            running(), unhealthy(RUNNING), fresh(), 1, kill),
        ("desired stopped wins over liveness", stopped(), unhealthy(RUNNING), fresh(), 1, Plan::Stop),
        ("a paused container is unpaused first", running(), unhealthy(PAUSED), fresh(), 1, Plan::Unpause),
    ]);
}
