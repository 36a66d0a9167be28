//! Wire compatibility with the Go scheduler's `persys.control.v1`: bytes
//! encoded by protoc from the scheduler's own control.proto
//! (persys-dev/persys-cloud, pkg/proto/control.proto) decode into our types,
//! and what the agent sends encodes to the very same bytes.
//!
//! Each golden message below was produced with
//! `protoc --encode=persys.control.v1.<Message> control.proto` against the
//! scheduler's file, from the text format shown next to it. protoc writes
//! fields in number order, as prost does, so equal messages give equal
//! bytes (no map here has more than one entry).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use persys_api::control::v1::{
    FailureReason, HeartbeatRequest, HeartbeatResponse, NodeCapabilities, NodeUsage,
    RegisterNodeRequest, RegisterNodeResponse, StoragePool,
};
use persys_api::v1::{
    ActualState, ObjectMeta, ObjectStatus, Workload, WorkloadType, WorkloadUsageSnapshot,
};
use prost::Message;

use super::link::lease_end;
use super::report::{status_report, usage_snapshot};

fn bytes(hex: &str) -> Vec<u8> {
    assert_eq!(hex.len() % 2, 0);
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn unix(seconds: u64, nanos: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(seconds, nanos)
}

/// ```text
/// accepted: true reason: "registered" heartbeat_interval_seconds: 60
/// lease_expires_at { seconds: 1800000180 nanos: 250000000 }
/// ```
const REGISTER_NODE_RESPONSE: &str = "0801120a72656769737465726564183c220b08b4a5a7da061080e59a77";

/// ```text
/// acknowledged: true drain_node: true lease_expires_at { seconds: 1800000360 }
/// ```
const HEARTBEAT_RESPONSE: &str = "080110011a0608e8a6a7da06";

/// ```text
/// node_id: "node-a"
/// capabilities { cpu_total_millicores: 4000 memory_total_mb: 7900
///   storage_pools { name: "/var/lib/persys/state" type: "local" total_gb: 98 }
///   supported_workload_types: "container" supported_storage_drivers: "local" }
/// labels { key: "zone" value: "a" }
/// agent_version: "0.1.0" grpc_endpoint: "10.0.0.7:50051" cluster_id: "cluster-1"
/// timestamp { seconds: 1700000000 nanos: 5000000 }
/// ```
const REGISTER_NODE_REQUEST: &str = concat!(
    "0a066e6f64652d61123a08a01f10dc3d1a200a152f7661722f6c69622f7065727379732f7374",
    "61746512056c6f63616c18622209636f6e7461696e65722a056c6f63616c1a090a047a6f6e65",
    "1201612205302e312e302a0e31302e302e302e373a35303035313209636c75737465722d313a",
    "0b0880e2cfaa0610c096b102",
);

/// ```text
/// node_id: "node-a"
/// usage { cpu_allocated_millicores: 2500 cpu_used_millicores: 130
///   memory_allocated_mb: 356 memory_used_mb: 2048 disk_allocated_gb: 3
///   disk_used_gb: 40 }
/// workload_statuses {
///   workload_id: "web" state: "Failed" failure_reason: NETWORK_ERROR
///   message: "port 8080 is taken"
///   last_transition { seconds: 1700000000 nanos: 999000000 }
///   reason { code: "PORT_BIND_CONFLICT" message: "bind: address already in use"
///     last_transition { seconds: 1700000000 nanos: 999000000 }
///     next_retry_at { seconds: 1700000060 } retryable: true }
///   usage { <USAGE> } }
/// timestamp { seconds: 1700000100 }
/// workload_usage { <USAGE> }
/// ```
/// where `<USAGE>` is `workload_id: "web" type: "container" cpu_percent: 12.5
/// memory_bytes: 1048576 net_rx_bytes: 10 net_tx_bytes: 20
/// collected_at { seconds: 1700000050 } source: "docker"`.
const HEARTBEAT_REQUEST: &str = concat!(
    "0a066e6f64652d61121008c41310820118e402208010280330281ab0010a0377656212064661",
    "696c656418062212706f727420383038302069732074616b656e2a0c0880e2cfaa0610c08fae",
    "dc03324a0a12504f52545f42494e445f434f4e464c494354121c62696e643a20616464726573",
    "7320616c726561647920696e207573651a0c0880e2cfaa0610c08faedc03220608bce2cfaa06",
    "28013a310a037765621209636f6e7461696e657219000000000000294020808040380a40144a",
    "0608b2e2cfaa065206646f636b6572220608e4e2cfaa062a310a037765621209636f6e746169",
    "6e657219000000000000294020808040380a40144a0608b2e2cfaa065206646f636b6572",
);

#[test]
fn a_registration_answer_from_the_go_scheduler_decodes_with_its_lease() {
    let response = RegisterNodeResponse::decode(&bytes(REGISTER_NODE_RESPONSE)[..]).unwrap();
    assert!(response.accepted);
    assert_eq!(response.reason, "registered");
    assert_eq!(response.heartbeat_interval_seconds, 60);
    let lease = response.lease_expires_at.unwrap();
    assert_eq!((lease.seconds, lease.nanos), (1_800_000_180, 250_000_000));
    assert_eq!(
        lease_end(Some(lease)),
        Some(unix(1_800_000_180, 250_000_000))
    );
    // And back to the same bytes.
    assert_eq!(response.encode_to_vec(), bytes(REGISTER_NODE_RESPONSE));
}

#[test]
fn a_heartbeat_answer_from_the_go_scheduler_decodes_with_its_lease() {
    let response = HeartbeatResponse::decode(&bytes(HEARTBEAT_RESPONSE)[..]).unwrap();
    assert!(response.acknowledged);
    assert!(response.drain_node);
    assert_eq!(
        lease_end(response.lease_expires_at),
        Some(unix(1_800_000_360, 0))
    );
}

#[test]
fn no_lease_or_a_zero_go_time_is_no_lease() {
    assert_eq!(
        lease_end(HeartbeatResponse::default().lease_expires_at),
        None
    );
    // timestamppb.New(time.Time{}): 0001-01-01T00:00:00Z.
    let mut response = HeartbeatResponse {
        lease_expires_at: Some(UNIX_EPOCH.into()),
        ..Default::default()
    };
    assert_eq!(lease_end(response.lease_expires_at), None, "the epoch");
    if let Some(lease) = response.lease_expires_at.as_mut() {
        lease.seconds = -62_135_596_800;
    }
    assert_eq!(lease_end(response.lease_expires_at), None, "year 1");
}

#[test]
fn a_registration_encodes_as_the_go_scheduler_expects() {
    let request = RegisterNodeRequest {
        node_id: "node-a".into(),
        capabilities: Some(NodeCapabilities {
            cpu_total_millicores: 4000,
            memory_total_mb: 7900,
            storage_pools: vec![StoragePool {
                name: "/var/lib/persys/state".into(),
                r#type: "local".into(),
                total_gb: 98,
            }],
            supported_workload_types: vec!["container".into()],
            supported_storage_drivers: vec!["local".into()],
        }),
        labels: [("zone".to_string(), "a".to_string())].into(),
        agent_version: "0.1.0".into(),
        grpc_endpoint: "10.0.0.7:50051".into(),
        cluster_id: "cluster-1".into(),
        timestamp: Some(unix(1_700_000_000, 5_000_000).into()),
    };
    assert_eq!(request.encode_to_vec(), bytes(REGISTER_NODE_REQUEST));
    assert_eq!(
        RegisterNodeRequest::decode(&bytes(REGISTER_NODE_REQUEST)[..]).unwrap(),
        request
    );
}

#[test]
fn a_heartbeat_built_from_a_workload_encodes_as_the_go_scheduler_expects() {
    let workload = Workload {
        metadata: Some(ObjectMeta {
            id: "web".into(),
            r#type: WorkloadType::Container as i32,
            ..Default::default()
        }),
        spec: None,
        status: Some(ObjectStatus {
            actual_state: ActualState::Failed as i32,
            message: "port 8080 is taken".into(),
            last_error: "bind: address already in use".into(),
            failure_reason: "PORT_BIND_CONFLICT".into(),
            retry_terminal: false,
            last_transition_ms: 1_700_000_000_999,
            next_retry_at_ms: 1_700_000_060_000,
            ..Default::default()
        }),
    };
    let usage = usage_snapshot(&WorkloadUsageSnapshot {
        workload_id: "web".into(),
        r#type: WorkloadType::Container as i32,
        cpu_percent: 12.5,
        memory_bytes: 1 << 20,
        disk_read_bytes: 0,
        disk_write_bytes: 0,
        net_rx_bytes: 10,
        net_tx_bytes: 20,
        collected_at: 1_700_000_050,
        source: "docker".into(),
    });
    let status = status_report(&workload, Some(usage.clone()));
    assert_eq!(status.failure_reason(), FailureReason::NetworkError);
    let request = HeartbeatRequest {
        node_id: "node-a".into(),
        usage: Some(NodeUsage {
            cpu_allocated_millicores: 2500,
            cpu_used_millicores: 130,
            memory_allocated_mb: 356,
            memory_used_mb: 2048,
            disk_allocated_gb: 3,
            disk_used_gb: 40,
        }),
        workload_statuses: vec![status],
        timestamp: Some(unix(1_700_000_100, 0).into()),
        workload_usage: vec![usage],
    };
    assert_eq!(request.encode_to_vec(), bytes(HEARTBEAT_REQUEST));
    assert_eq!(
        HeartbeatRequest::decode(&bytes(HEARTBEAT_REQUEST)[..]).unwrap(),
        request
    );
}
