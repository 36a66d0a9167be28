//! Many clients applying different specs to the same workload id at once,
//! over real mutual TLS against the real agent binary: every apply is
//! acknowledged with its own generation, the last generation is what is
//! stored, and the change log (read live by a Watch opened before the
//! storm, and replayed by one opened after it) holds every generation once,
//! in order, with no gaps.

mod common;
#[path = "common/docker.rs"]
mod docker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{AgentProcess, Certs, UNREACHABLE_RUNTIMES, client};
use futures::StreamExt;
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use tonic::Streaming;
use tonic::transport::Channel;

/// Clients, each with its own connection.
const CLIENTS: usize = 32;
/// Applies each client makes, one after another, each with its own spec.
const ROUNDS: usize = 4;
const ID: &str = "contested";

/// The image that tells client `client`'s apply of round `round` apart.
fn image(client: usize, round: usize) -> String {
    format!("persys-test/busybox:c{client}-r{round}")
}

fn apply(image: &str) -> ApplyWorkloadRequest {
    // Its revision is derived from the spec: every spec is a new revision.
    docker::container_request(
        ID,
        ContainerSpec {
            image: image.into(),
            ..Default::default()
        },
    )
}

fn image_of(workload: &Workload) -> String {
    match workload.workload_spec() {
        Some(workload_spec::Spec::Container(container)) => container.image.clone(),
        other => panic!("not a container spec: {other:?}"),
    }
}

/// One acknowledged apply: the spec sent and where the agent put it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ack {
    image: String,
    generation: i64,
    resource_version: u64,
}

/// The next event that is not a bookmark, within 10 s.
async fn next_change(stream: &mut Streaming<WatchEvent>) -> WatchEvent {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a watch event within 10 s")
            .expect("the watch stream is open")
            .expect("a watch event, not an error");
        if event.r#type() != WatchEventType::Bookmark {
            return event;
        }
    }
}

/// Opens a Watch of [`ID`] from `resource_version` and, for a fresh list
/// (0), reads up to the bookmark that ends it; answers that bookmark's
/// version.
async fn watch(
    api: &mut AgentServiceClient<Channel>,
    resource_version: u64,
) -> (Streaming<WatchEvent>, u64) {
    let mut stream = api
        .watch(WatchRequest {
            resource_version,
            id: ID.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    if resource_version != 0 {
        return (stream, resource_version);
    }
    let end_of_list = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        end_of_list.r#type(),
        WatchEventType::Bookmark,
        "nothing to list before the storm: {end_of_list:?}"
    );
    (stream, end_of_list.resource_version)
}

/// Reads `stream` until the object reaches `last` generation. Checks on
/// the way that resource versions strictly increase and generations never
/// go back, and answers each generation's first event (a generation's
/// later events are status writes of the Docker controller).
async fn generations(stream: &mut Streaming<WatchEvent>, last: i64) -> Vec<(i64, u64, String)> {
    let mut seen: Vec<(i64, u64, String)> = Vec::new();
    let mut previous_version = 0;
    let mut previous_generation = 0;
    while previous_generation < last {
        let event = next_change(stream).await;
        let object = event.object.as_ref().expect("an object");
        assert!(
            event.resource_version > previous_version,
            "resource versions go back: {} after {previous_version}",
            event.resource_version
        );
        let generation = object.generation();
        assert!(
            generation >= previous_generation,
            "generation {generation} after {previous_generation}"
        );
        let expected = if seen.is_empty() {
            WatchEventType::Added
        } else {
            WatchEventType::Modified
        };
        assert_eq!(event.r#type(), expected, "{event:?}");
        if generation > previous_generation {
            seen.push((generation, event.resource_version, image_of(object)));
        }
        previous_version = event.resource_version;
        previous_generation = generation;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_applies_to_one_id_each_get_a_generation_and_watch_shows_them_all_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let agent = AgentProcess::start(&dir.path().join("state"), &certs, UNREACHABLE_RUNTIMES).await;
    let mut api = client(agent.port, &certs).await.unwrap();
    // Another workload first, so the log is not empty before the storm and
    // its version can be replayed from (version 0 would list instead).
    let mut other = apply("persys-test/busybox:other");
    other.id = "bystander".into();
    api.apply_workload(other).await.unwrap();

    // Opened before the storm, on its own connection.
    let mut watcher = client(agent.port, &certs).await.unwrap();
    let (mut live, before) = watch(&mut watcher, 0).await;
    assert!(before > 0, "the bystander is in the log");

    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(client(agent.port, &certs).await.unwrap());
    }
    let start = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let storm: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(n, mut api)| {
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let mut acks = Vec::with_capacity(ROUNDS);
                for round in 0..ROUNDS {
                    let image = image(n, round);
                    let response = api
                        .apply_workload(apply(&image))
                        .await
                        .unwrap_or_else(|e| panic!("client {n} round {round}: {e}"))
                        .into_inner();
                    assert!(
                        response.applied && !response.skipped,
                        "a new spec is applied: {response:?}"
                    );
                    let status = response.status.expect("the stored status");
                    acks.push(Ack {
                        image,
                        generation: status.metadata["generation"].parse().unwrap(),
                        resource_version: status.metadata["resource_version"].parse().unwrap(),
                    });
                }
                acks
            })
        })
        .collect();
    let mut acks: Vec<Ack> = Vec::new();
    for client in storm {
        acks.extend(client.await.unwrap());
    }
    let total = (CLIENTS * ROUNDS) as i64;

    // Every apply got a generation of its own: 1 to total, none twice.
    let by_generation: BTreeMap<i64, Ack> = acks
        .iter()
        .map(|ack| (ack.generation, ack.clone()))
        .collect();
    assert_eq!(
        by_generation.len(),
        acks.len(),
        "a generation acknowledged twice"
    );
    assert_eq!(
        by_generation.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    // A later generation was written later.
    for pair in by_generation.values().collect::<Vec<_>>().windows(2) {
        assert!(
            pair[1].resource_version > pair[0].resource_version,
            "{pair:?}"
        );
    }

    // The stored object is the last acknowledged apply.
    let last = &by_generation[&total];
    let stored = api
        .describe_workload(DescribeWorkloadRequest { id: ID.into() })
        .await
        .unwrap()
        .into_inner()
        .workload
        .unwrap();
    assert_eq!(stored.generation(), total);
    assert_eq!(image_of(&stored), last.image, "the last apply wins");
    assert!(acks.iter().any(|ack| ack.image == image_of(&stored)));

    // The watch opened before the storm saw every generation, in order,
    // each with the spec and version its apply was acknowledged with.
    let expected: Vec<(i64, u64, String)> = by_generation
        .values()
        .map(|ack| (ack.generation, ack.resource_version, ack.image.clone()))
        .collect();
    assert_eq!(generations(&mut live, total).await, expected, "live watch");

    // So does the change log, replayed from before the storm.
    let (mut replay, _) = watch(&mut watcher, before).await;
    assert_eq!(
        generations(&mut replay, total).await,
        expected,
        "replayed from the log"
    );
    drop(agent);
}
