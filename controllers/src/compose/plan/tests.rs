//! The plan's rules, one table row each: a row fails when its rule breaks.

use std::path::Path;

use super::*;
use crate::compose::config::ComposeConfig;
use crate::compose::errors::FailureReason;
use crate::compose::observe::ContainerState;
use crate::kit::restart::RestartRule;
use ContainerState::{Exited, Paused, Restarting, Running};
use RestartRule::{Never as No, OnFailure};

const HASH: &str = "h2";
const WALL: i64 = 1_000_000;
const S: Duration = Duration::from_secs(1);

/// One decision: what `plan` answers `after` the first stamp of the
/// memory. By default: desired running, brought up, web and db
/// running, nothing remembered but the spec.
struct Row {
    name: &'static str,
    desired: Desired,
    observation: Observation,
    memory: Memory,
    after: Duration,
    expect: Plan,
}

fn row(name: &'static str) -> Row {
    Row {
        name,
        desired: Desired::example(HASH, false),
        observation: observed(&[("web", Running, None), ("db", Running, None)]),
        memory: memory(&[], &[]),
        after: Duration::ZERO,
        expect: Plan::Running,
    }
}

impl Row {
    fn stopped(mut self) -> Row {
        self.desired.stopped = true;
        self
    }
    fn taken_by(mut self, owner: &str) -> Row {
        self.observation.owner = Some(owner.into());
        self
    }
    fn foreign(mut self) -> Row {
        self.observation.foreign = Some("not the agent's".into());
        self
    }
    fn reported_stopped(mut self) -> Row {
        self.desired.reported_stopped = true;
        self
    }
    fn seeing(mut self, services: &[(&str, ContainerState, Option<i64>)]) -> Row {
        self.observation = observed(services);
        self
    }
    fn db_exited(self) -> Row {
        self.seeing(&[("web", Running, None), ("db", Exited, Some(3))])
    }
    /// Brought up from another spec, or never.
    fn brought_up(mut self, hash: Option<&str>) -> Row {
        self.observation.brought_up = hash.map(String::from);
        self
    }
    fn remembering(mut self, memory: Memory) -> Row {
        self.memory = memory;
        self
    }
    /// The remembered failure is one compose calls terminal.
    fn terminal(mut self) -> Row {
        if let Some(failure) = &mut self.memory.last_failure {
            failure.reason = FailureReason::InvalidSpec;
        }
        self
    }
    fn of_old_spec(mut self) -> Row {
        self.memory.spec_hash = "h1".into();
        self
    }
    /// The compose file asks these restart policies (the others say
    /// nothing: always).
    fn asking(mut self, restarts: &[(&str, RestartRule)]) -> Row {
        for (service, rule) in restarts {
            self.desired
                .prepared
                .restarts
                .insert(service.to_string(), *rule);
        }
        self
    }
    /// The service's containers lack the restart label: made before the
    /// agent took restarts from the engine.
    fn unlabelled(mut self, service: &str) -> Row {
        for container in self
            .observation
            .containers
            .by_service
            .get_mut(service)
            .unwrap()
        {
            container.asked_restart = None;
        }
        self
    }
    fn at(mut self, after: Duration) -> Row {
        self.after = after;
        self
    }
    fn expect(mut self, plan: Plan) -> Row {
        self.expect = plan;
        self
    }
}

fn observed(services: &[(&str, ContainerState, Option<i64>)]) -> Observation {
    Observation::example(services, HASH)
}

/// The memory of the current spec: repairs and failed commands at
/// these seconds after the first stamp.
fn memory(repairs: &[u32], failures: &[u32]) -> Memory {
    let at = |second: u32| (epoch() + second * S, WALL + i64::from(second) * 1000);
    let mut memory = Memory {
        spec_hash: HASH.into(),
        ..Default::default()
    };
    for (now, wall) in repairs.iter().map(|&s| at(s)) {
        memory.crash.restarted(now, wall);
    }
    for (now, wall) in failures.iter().map(|&s| at(s)) {
        memory.failures.counted(now, wall);
        memory.last_failure = Some(pull_failed());
    }
    memory
}

/// The first stamp: one fixed instant for every row.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn pull_failed() -> Failure {
    let (reason, detail) = (FailureReason::ImagePullFailed, "no such host".to_string());
    let message = format!("compose up failed ({reason}): {detail}");
    Failure {
        reason,
        message,
        detail,
    }
}

/// A service that is not running, as `assess` reports it.
fn down(name: &str, state: &'static str, exit_code: Option<i64>) -> ServiceReport {
    let (name, scale, running, orphan) = (name.to_string(), 1, 0, false);
    ServiceReport {
        name,
        scale,
        running,
        state,
        exit_code,
        orphan,
    }
}

/// A repair of the services in `unsatisfied` still in the file.
fn repair(unsatisfied: Vec<ServiceReport>) -> Plan {
    let services = unsatisfied
        .iter()
        .filter(|r| !r.orphan)
        .map(|r| r.name.clone())
        .collect();
    Plan::Up(Up::Repair {
        unsatisfied,
        services,
    })
}

/// The crash loop's gap, due `due` seconds after the first stamp.
fn crash_back_off(message: &str, remaining: Duration, due: i64) -> Plan {
    let (message, due_ms) = (message.to_string(), WALL + due * 1000);
    Plan::CrashBackOff {
        message,
        remaining,
        due_ms,
    }
}

/// The failure held, due `due_ms` after the first stamp.
fn held(remaining: Duration, due_ms: i64) -> Plan {
    let (failure, due_ms) = (pull_failed(), WALL + due_ms);
    Plan::HoldFailure {
        failure,
        remaining,
        due_ms,
    }
}

fn rows() -> Vec<Row> {
    let exited = || vec![down("db", "exited", Some(3))];
    let orphan = ServiceReport {
        running: 1,
        state: "running",
        orphan: true,
        scale: 0,
        ..down("old", "", None)
    };
    vec![
        row("every_service_running_is_reported_running"),
        row("a_project_name_another_workload_runs_is_left_alone")
            .db_exited()
            .taken_by("other")
            .expect(Plan::NameTaken {
                owner: "other".into(),
            }),
        row("a_project_the_agent_did_not_make_is_neither_brought_up_nor_stopped")
            .db_exited()
            .brought_up(None)
            .foreign()
            .expect(Plan::NotAdopted {
                why: "not the agent's".into(),
            }),
        row("a_project_the_agent_did_not_make_is_not_stopped_either")
            .stopped()
            .foreign()
            .expect(Plan::NotAdopted {
                why: "not the agent's".into(),
            }),
        row("a_spec_never_brought_up_is_brought_up")
            .seeing(&[])
            .brought_up(None)
            .expect(Plan::Up(Up::NewSpec)),
        row("a_changed_spec_is_brought_up_while_everything_runs")
            .brought_up(Some("h1"))
            .expect(Plan::Up(Up::NewSpec)),
        row("an_exited_service_is_repaired_at_once_the_first_time")
            .db_exited()
            .expect(repair(exited())),
        row("a_missing_service_is_recreated_as_a_repair")
            .seeing(&[("web", Running, None)])
            .expect(repair(vec![down("db", "missing", None)])),
        row("a_service_no_longer_in_the_file_is_removed_as_a_repair")
            .seeing(&[
                ("web", Running, None),
                ("db", Running, None),
                ("old", Running, None),
            ])
            .expect(Plan::Up(Up::Repair {
                unsatisfied: vec![orphan],
                services: vec!["db".into(), "web".into()],
            })),
        row("a_second_repair_waits_the_crash_loop_base_since_the_first")
            .db_exited()
            .remembering(memory(&[0], &[]))
            .at(S)
            .expect(crash_back_off(
                "back-off 10s restarting: db exited (code 3)",
                9 * S,
                10,
            )),
        row("a_second_repair_runs_once_the_base_has_passed")
            .db_exited()
            .remembering(memory(&[0], &[]))
            .at(10 * S)
            .expect(repair(exited())),
        row("each_further_repair_waits_double_the_gap")
            .db_exited()
            .remembering(memory(&[0, 10], &[]))
            .at(11 * S)
            .expect(crash_back_off(
                "back-off 20s restarting: db exited (code 3)",
                19 * S,
                30,
            )),
        row("a_crash_loop_is_forgotten_ten_minutes_after_the_last_repair")
            .db_exited()
            .remembering(memory(&[0, 0, 0, 0], &[]))
            .at(600 * S)
            .expect(repair(exited())),
        row("a_new_spec_starts_a_fresh_crash_loop")
            .db_exited()
            .remembering(memory(&[0, 0, 0], &[]))
            .of_old_spec()
            .at(S)
            .expect(repair(exited())),
        row("a_start_after_a_stop_is_not_a_repair_nor_held_by_the_crash_loop")
            .reported_stopped()
            .db_exited()
            .remembering(memory(&[0, 0, 0], &[]))
            .at(S)
            .expect(Plan::Up(Up::Start)),
        row("services_the_engine_restarts_itself_are_waited_for")
            .seeing(&[("web", Running, None), ("db", Restarting, None)])
            .expect(Plan::EngineRestarting {
                message: "restarting: db".into(),
            }),
        row("a_restarting_service_beside_an_exited_one_is_repaired_with_it")
            .seeing(&[("web", Restarting, None), ("db", Exited, Some(3))])
            .expect(repair(vec![
                down("db", "exited", Some(3)),
                down("web", "restarting", None),
            ])),
        row("a_failed_up_holds_the_next_up_for_the_failure_back_off")
            .db_exited()
            .brought_up(Some("h1"))
            .remembering(memory(&[], &[0]))
            .at(S / 2)
            .expect(held(S / 2, 1000)),
        row("a_failed_up_holds_a_repair_before_the_crash_loop_is_asked")
            .db_exited()
            .remembering(memory(&[], &[0]))
            .at(S / 2)
            .expect(held(S / 2, 1000)),
        row("the_failure_back_off_doubles_with_each_failure")
            .db_exited()
            .brought_up(Some("h1"))
            .remembering(memory(&[], &[0, 1]))
            .at(3 * S / 2)
            .expect(held(3 * S / 2, 3000)),
        row("up_runs_again_once_the_failure_back_off_has_passed")
            .db_exited()
            .brought_up(Some("h1"))
            .remembering(memory(&[], &[0]))
            .at(S)
            .expect(Plan::Up(Up::NewSpec)),
        row("a_failure_compose_calls_terminal_is_retried_after_the_back_off_too")
            .db_exited()
            .brought_up(Some("h1"))
            .remembering(memory(&[], &[0]))
            .terminal()
            .at(S)
            .expect(Plan::Up(Up::NewSpec)),
        row("a_failure_back_off_doubles_up_to_its_cap")
            .db_exited()
            .brought_up(Some("h1"))
            .remembering(memory(&[], &[0; 10]))
            .at(299 * S)
            .expect(held(S, 300_000)),
        row("a_held_failure_is_not_reported_once_every_service_runs")
            .remembering(memory(&[], &[0])),
        row("a_new_spec_is_not_held_by_the_old_spec_failure")
            .db_exited()
            .brought_up(Some("h1"))
            .remembering(memory(&[], &[0]))
            .of_old_spec()
            .expect(Plan::Up(Up::NewSpec)),
        row("a_one_shot_service_whose_policy_is_no_stays_exited_once_it_finished")
            .asking(&[("db", No)])
            .seeing(&[("web", Running, None), ("db", Exited, Some(0))]),
        row("a_service_whose_policy_is_no_that_failed_is_reported_and_not_restarted")
            .asking(&[("db", No)])
            .db_exited()
            .expect(Plan::GaveUp {
                message: "exited and not restarted by their restart policy: db exited (code 3)"
                    .into(),
            }),
        row("on_failure_restarts_a_failed_service_below_its_limit")
            .asking(&[("db", OnFailure { max_restarts: 2 })])
            .db_exited()
            .remembering(memory(&[0], &[]))
            .at(10 * S)
            .expect(repair(exited())),
        row("on_failure_gives_up_once_its_limit_is_reached")
            .asking(&[("db", OnFailure { max_restarts: 2 })])
            .db_exited()
            .remembering(memory(&[0, 10], &[]))
            .at(60 * S)
            .expect(Plan::GaveUp {
                message: "exited and not restarted by their restart policy: db exited (code 3)"
                    .into(),
            }),
        row("on_failure_leaves_a_service_that_exited_0_finished")
            .asking(&[("db", OnFailure { max_restarts: 0 })])
            .seeing(&[("web", Running, None), ("db", Exited, Some(0))]),
        row("a_repair_brings_back_only_what_its_policy_restarts")
            .asking(&[("db", No)])
            .seeing(&[("web", Exited, Some(3)), ("db", Exited, Some(0))])
            .expect(repair(vec![down("web", "exited", Some(3))])),
        row("a_service_with_no_policy_is_restarted_even_after_exit_0")
            .seeing(&[("web", Running, None), ("db", Exited, Some(0))])
            .expect(repair(vec![down("db", "exited", Some(0))])),
        row("a_service_the_engine_may_restart_by_itself_is_taken_over")
            .unlabelled("web")
            .expect(Plan::Up(Up::TakeOver {
                services: vec!["web".into()],
            })),
        row("a_take_over_waits_the_failure_back_off")
            .unlabelled("web")
            .remembering(memory(&[], &[0]))
            .at(S / 2)
            .expect(held(S / 2, 1000)),
        row("desired_stopped_with_nothing_up_is_already_stopped")
            .stopped()
            .seeing(&[("web", Exited, Some(0)), ("db", Exited, Some(0))])
            .remembering(memory(&[], &[0]))
            .expect(Plan::AlreadyStopped),
        row("desired_stopped_with_something_up_is_stopped_whatever_the_crash_loop")
            .stopped()
            .seeing(&[("web", Paused, None), ("db", Exited, Some(0))])
            .remembering(memory(&[0, 0], &[]))
            .expect(Plan::Stop),
        row("a_failed_stop_holds_the_next_stop_for_the_failure_back_off")
            .stopped()
            .remembering(memory(&[], &[0]))
            .at(S / 4)
            .expect(held(3 * S / 4, 1000)),
    ]
}

#[test]
fn the_plan_follows_each_rule() {
    let rules = Rules::of(&ComposeConfig::new(Path::new("/nowhere")));
    for row in rows() {
        let now = epoch() + row.after;
        let got = plan(&row.desired, &row.observation, &row.memory, &rules, now);
        assert_eq!(got, row.expect, "{}", row.name);
    }
}

#[test]
fn a_project_is_adopted_only_on_first_sight_and_a_renamed_one_is_taken_down() {
    let found = observed(&[("web", Running, None), ("db", Exited, Some(0))]);
    let renamed = Observation {
        renamed_from: Some("old".into()),
        ..observed(&[])
    };
    let first_sight = Memory::default();
    let seen = memory(&[], &[]);
    let cases = [
        (&found, &first_sight, None, Some(2)),
        (&found, &seen, None, None),
        (&observed(&[]), &first_sight, None, None),
        (&renamed, &seen, Some("old".to_string()), None),
    ];
    for (observation, memory, take_down, adopt) in cases {
        let expect = Claim { take_down, adopt };
        assert_eq!(claim(observation, memory), expect, "{observation:?}");
    }
}
