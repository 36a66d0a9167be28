//! Manifests: any request written as a manifest (one YAML document, a YAML
//! stream, a YAML list or a JSON array) reads back as that request, with
//! every string YAML could mistake for something else (`yes`, `~`, `1e3`,
//! `- a`, line breaks…). And a manifest with random edits is read or
//! refused naming its file, never with a panic.

use std::collections::BTreeMap;
use std::path::PathBuf;

use persys_api::v1::{
    ApplyWorkloadRequest, CloudInitConfig, ComposeSpec, ContainerSpec, DesiredState, DiskConfig,
    ManagedVolumeSpec, NetworkConfig, PortMapping, ResourceLimits, RestartPolicy, VmSpec,
    VolumeMount, WorkloadSpec, WorkloadType, workload_spec,
};
use persys_test_support::compose::YAML_SYNTAX;
use persys_test_support::mutate::{apply_text, edits};
use proptest::prelude::*;
use serde::Serialize;

use super::{Source, parse_text};

const SOURCE: &str = "proptest-manifest.yaml";

fn source() -> Source {
    Source {
        name: SOURCE.into(),
        dir: PathBuf::from("/nonexistent"),
    }
}

/// Strings, with those YAML reads as something else when unquoted.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9._/-]{0,12}",
        2 => prop::sample::select(vec![
            "", "yes", "no", "on", "off", "true", "False", "null", "~", "1", "-1", "0x1F", "0o7",
            "1e3", ".inf", "-.nan", "- a", "a: b", ": ", "#x", "a #b", "'", "\"", "&a", "*a",
            "!tag x", " lead", "trail ", "\n", "two\nlines", "\t", "é", "日本", "🦀", "---",
            "...", "<<", "=", "{a}", "[a]", "%x", "@x", "`x", "\\", "\u{85}", "\u{feff}x",
            "\u{2028}", "\r\n",
        ])
        .prop_map(String::from),
        1 => ".{0,12}",
    ]
}

fn texts() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(text(), 0..3)
}

fn map() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(text(), text(), 0..3)
}

fn managed_volume() -> impl Strategy<Value = ManagedVolumeSpec> {
    (
        text(),
        text(),
        any::<i64>(),
        text(),
        text(),
        text(),
        any::<bool>(),
        text(),
    )
        .prop_map(
            |(
                name,
                driver,
                size_gb,
                access_mode,
                fs_type,
                mount_path,
                read_only,
                retain_policy,
            )| {
                ManagedVolumeSpec {
                    name,
                    driver,
                    size_gb,
                    access_mode,
                    fs_type,
                    mount_path,
                    read_only,
                    retain_policy,
                }
            },
        )
}

fn container() -> impl Strategy<Value = ContainerSpec> {
    (
        (text(), texts(), texts(), map()),
        prop::collection::vec(
            (text(), text(), any::<bool>()).prop_map(|(host_path, container_path, read_only)| {
                VolumeMount {
                    host_path,
                    container_path,
                    read_only,
                }
            }),
            0..2,
        ),
        prop::collection::vec(
            (any::<i32>(), any::<i32>(), text()).prop_map(
                |(host_port, container_port, protocol)| PortMapping {
                    host_port,
                    container_port,
                    protocol,
                },
            ),
            0..2,
        ),
        prop::option::of(
            (any::<i64>(), any::<i64>(), any::<i64>()).prop_map(|(c, m, s)| ResourceLimits {
                cpu_shares: c,
                memory_bytes: m,
                memory_swap_bytes: s,
            }),
        ),
        prop::option::of(
            (text(), any::<i32>()).prop_map(|(policy, max_retry_count)| RestartPolicy {
                policy,
                max_retry_count,
            }),
        ),
        map(),
        prop::collection::vec(managed_volume(), 0..2),
        (text(), any::<i32>()),
    )
        .prop_map(
            |(
                (image, command, args, env),
                volumes,
                ports,
                resources,
                restart_policy,
                labels,
                managed_volumes,
                (image_pull_policy, stop_grace_period_seconds),
            )| ContainerSpec {
                liveness_probe: None,
                readiness_probe: None,
                image,
                command,
                args,
                env,
                volumes,
                ports,
                resources,
                restart_policy,
                labels,
                managed_volumes,
                image_pull_policy,
                stop_grace_period_seconds,
            },
        )
}

fn vm() -> impl Strategy<Value = VmSpec> {
    (
        (text(), any::<i32>(), any::<i64>()),
        prop::collection::vec(
            (text(), text(), text(), any::<i64>(), text(), any::<bool>()).prop_map(
                |(path, device, format, size_gb, r#type, boot)| DiskConfig {
                    path,
                    device,
                    format,
                    size_gb,
                    r#type,
                    boot,
                },
            ),
            0..2,
        ),
        prop::collection::vec(
            (text(), text(), text()).prop_map(|(network, mac_address, ip_address)| NetworkConfig {
                network,
                mac_address,
                ip_address,
            }),
            0..2,
        ),
        text(),
        map(),
        prop::option::of((text(), text(), text(), text()).prop_map(|(u, m, n, v)| {
            CloudInitConfig {
                user_data: u,
                meta_data: m,
                network_config: n,
                vendor_data: v,
            }
        })),
        prop::collection::vec(managed_volume(), 0..2),
    )
        .prop_map(
            |(
                (name, vcpus, memory_mb),
                disks,
                networks,
                cloud_init,
                metadata,
                cloud_init_config,
                managed_volumes,
            )| VmSpec {
                name,
                vcpus,
                memory_mb,
                disks,
                networks,
                cloud_init,
                metadata,
                cloud_init_config,
                managed_volumes,
            },
        )
}

fn compose() -> impl Strategy<Value = ComposeSpec> {
    (
        text(),
        text().prop_filter("required", |t| !t.is_empty()),
        map(),
    )
        .prop_map(|(project_name, compose_yaml, env)| ComposeSpec {
            probes: Default::default(),
            project_name,
            compose_yaml,
            env,
        })
}

fn request() -> impl Strategy<Value = ApplyWorkloadRequest> {
    (
        text(),
        text(),
        prop::sample::select(vec![
            DesiredState::Unspecified,
            DesiredState::Running,
            DesiredState::Stopped,
        ]),
        prop_oneof![
            container().prop_map(workload_spec::Spec::Container),
            compose().prop_map(workload_spec::Spec::Compose),
            vm().prop_map(workload_spec::Spec::Vm),
        ],
    )
        .prop_map(|(id, revision_id, desired, spec)| ApplyWorkloadRequest {
            id,
            r#type: WorkloadType::of(&spec) as i32,
            revision_id,
            desired_state: desired as i32,
            spec: Some(WorkloadSpec { spec: Some(spec) }),
        })
}

/// A request as a manifest writes it.
#[derive(Serialize)]
struct Written<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    revision_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    desired_state: Option<&'static str>,
    spec: WrittenSpec<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum WrittenSpec<'a> {
    Container(&'a ContainerSpec),
    Compose(&'a ComposeSpec),
    Vm(&'a VmSpec),
}

fn written(request: &ApplyWorkloadRequest) -> Written<'_> {
    let spec = match request.spec.as_ref().and_then(|s| s.spec.as_ref()) {
        Some(workload_spec::Spec::Container(c)) => WrittenSpec::Container(c),
        Some(workload_spec::Spec::Compose(c)) => WrittenSpec::Compose(c),
        Some(workload_spec::Spec::Vm(v)) => WrittenSpec::Vm(v),
        None => unreachable!("every generated request has a spec"),
    };
    Written {
        id: &request.id,
        kind: match spec {
            WrittenSpec::Container(_) => "container",
            WrittenSpec::Compose(_) => "compose",
            WrittenSpec::Vm(_) => "vm",
        },
        revision_id: &request.revision_id,
        desired_state: match request.desired_state() {
            DesiredState::Unspecified => None,
            DesiredState::Running => Some("running"),
            DesiredState::Stopped => Some("stopped"),
        },
        spec,
    }
}

/// What the reader makes of a request: an unspecified state is running.
fn as_read(mut request: ApplyWorkloadRequest) -> ApplyWorkloadRequest {
    if request.desired_state() == DesiredState::Unspecified {
        request.desired_state = DesiredState::Running as i32;
    }
    request
}

#[derive(Debug, Clone, Copy)]
enum Layout {
    YamlStream,
    YamlList,
    JsonArray,
    JsonObject,
}

fn render(requests: &[ApplyWorkloadRequest], layout: Layout) -> Result<String, String> {
    let written: Vec<Written<'_>> = requests.iter().map(written).collect();
    let text = match layout {
        Layout::YamlStream => {
            let mut text = String::new();
            for manifest in &written {
                text.push_str("---\n");
                text.push_str(&serde_yaml_ng::to_string(manifest).map_err(|e| e.to_string())?);
            }
            text
        }
        Layout::YamlList => serde_yaml_ng::to_string(&written).map_err(|e| e.to_string())?,
        Layout::JsonArray => serde_json::to_string_pretty(&written).map_err(|e| e.to_string())?,
        Layout::JsonObject => serde_json::to_string(&written[0]).map_err(|e| e.to_string())?,
    };
    Ok(text)
}

fn layout() -> impl Strategy<Value = Layout> {
    prop::sample::select(vec![
        Layout::YamlStream,
        Layout::YamlList,
        Layout::JsonArray,
        Layout::JsonObject,
    ])
}

proptest! {
    #[test]
    fn a_request_written_as_a_manifest_reads_back_as_that_request(
        requests in prop::collection::vec(request(), 1..4),
        layout in layout(),
    ) {
        let text = render(&requests, layout).map_err(TestCaseError::fail)?;
        let read = parse_text(&text, &source(), false)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let read: Vec<ApplyWorkloadRequest> = read.into_iter().map(|m| m.request).collect();
        let expected: Vec<ApplyWorkloadRequest> = match layout {
            Layout::JsonObject => vec![as_read(requests[0].clone())],
            _ => requests.into_iter().map(as_read).collect(),
        };
        prop_assert_eq!(read, expected, "{}", text);
    }

    #[test]
    fn an_edited_manifest_is_read_or_refused_naming_its_file(
        requests in prop::collection::vec(request(), 1..3),
        layout in layout(),
        edits in edits(YAML_SYNTAX, 6),
    ) {
        let text = render(&requests, layout).map_err(TestCaseError::fail)?;
        let text = apply_text(&text, &edits);
        if let Err(error) = parse_text(&text, &source(), false) {
            let message = error.to_string();
            prop_assert!(message.contains(SOURCE), "{}", message);
        }
    }
}
