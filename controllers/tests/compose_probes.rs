//! Probes of compose services on the real engine, the real compose CLI and
//! the real store: the project is Ready only when every probed service
//! is, and a service's container failing its liveness probe is restarted
//! through the repair path. Nothing sleeps: the test waits on status with
//! a deadline.
//!
//! Needs a Docker engine, a compose CLI and the offline test image
//! (hack/runtimes-up.sh). Outside CI a test without them is skipped with a
//! loud message; in CI (`CI=true`) it fails.

mod compose_support;

use std::time::Duration;

use compose_support::*;
use persys_api::CONDITION_READY;
use persys_api::v1::{ActualState, DesiredState, EventType, ServiceProbes, Workload};

const CONVERGE: Duration = Duration::from_secs(45);

fn running_with_ready(w: &Workload, ready: &str) -> bool {
    let s = status(w);
    s.actual_state() == ActualState::Running
        && s.observed_generation == w.generation()
        && s.condition(CONDITION_READY)
            .is_some_and(|c| c.status == ready)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_is_ready_when_its_probed_services_are_and_liveness_restarts_a_service() {
    let Some(bed) = TestBed::new("probes").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("probed");
    let project = bed.project("probes");
    let compose = compose_file(&[
        ("web", ""),
        (
            "db",
            "restart: always\ncommand: [\"sh\", \"-c\", \"echo alive > /tmp/state; exec sleep 3600\"]",
        ),
    ]);
    let mut spec = compose_spec(&project, &compose, &[]);
    spec.probes = [
        (
            "web".to_string(),
            ServiceProbes {
                readiness_probe: Some(exec_probe("test -f /tmp/ready", 1)),
                liveness_probe: None,
            },
        ),
        (
            "db".to_string(),
            ServiceProbes {
                liveness_probe: Some(exec_probe("test \"$(cat /tmp/state)\" != dead", 2)),
                readiness_probe: None,
            },
        ),
    ]
    .into();
    agent.apply(&id, "r1", DesiredState::Running, spec).await;

    let unready = agent
        .wait_for(&id, CONVERGE, "running, web not ready", |w| {
            running_with_ready(w, "False")
                && status(w).facts.get("service.web.ready").map(String::as_str) == Some("false")
        })
        .await;
    let s = status(&unready);
    assert_eq!(s.facts["ready"], "false");
    assert_eq!(
        s.condition(CONDITION_READY).map(|c| c.reason.as_str()),
        Some("ReadinessProbeFailed")
    );
    let ids = ids_by_service(&bed.docker, &project).await;

    exec_in(&bed.docker, &ids["web"], ": > /tmp/ready").await;
    let ready = agent
        .wait_for(&id, CONVERGE, "ready", |w| running_with_ready(w, "True"))
        .await;
    assert_eq!(status(&ready).facts["ready"], "true");
    let restarts = status(&ready).restart_count;

    exec_in(&bed.docker, &ids["db"], "echo dead > /tmp/state").await;
    agent
        .wait_for(&id, CONVERGE, "db restarted", |w| {
            running_with_ready(w, "True") && status(w).restart_count > restarts
        })
        .await;
    let unhealthy = agent.event(&id, "Unhealthy").expect("an Unhealthy event");
    assert_eq!(unhealthy.r#type(), EventType::Warning);
    assert!(unhealthy.message.contains("service db"), "{unhealthy:?}");
    agent.stop().await;
}
