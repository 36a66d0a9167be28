//! Exec and Console end to end: the agent binary and persysctl against
//! the real Docker engine, docker compose and libvirt.

mod common;
#[path = "common/ctl.rs"]
mod ctl;
#[path = "common/docker.rs"]
mod docker;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{AgentProcess, Certs, client};
use ctl::persysctl;
use futures::StreamExt;
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use tokio::sync::mpsc;
use tonic::Code;
use tonic::transport::Channel;

use docker::test_image;

fn docker_available(test: &str) -> bool {
    docker::engine_ready(test, "the Docker engine or the test image", &[])
}

fn compose_available(test: &str) -> bool {
    docker::engine_ready(
        test,
        "the Docker engine, the test image and docker-compose",
        &[("docker-compose", &["version"])],
    )
}

fn libvirt_available(test: &str) -> bool {
    let ok = Command::new("virsh")
        .args(["-c", "qemu:///system", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        persys_test_support::skip(
            test,
            "libvirtd on qemu:///system",
            &"`virsh -c qemu:///system version` failed",
        );
    }
    ok
}

/// Runs persysctl against `agent` as the operator, with `stdin` piped in.
fn ctl(agent: &AgentProcess, certs: &Certs, args: &[&str], stdin: &[u8]) -> Output {
    let dir = certs.dir.to_str().unwrap();
    let mut child = Command::new(persysctl())
        .env_clear()
        .arg("--server")
        .arg(agent.endpoint())
        .args(["--ca", &format!("{dir}/ca.crt")])
        .args(["--cert", &format!("{dir}/client.crt")])
        .args(["--key", &format!("{dir}/client.key")])
        .args(["--tls-server-name", "localhost"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn wait_running(api: &mut AgentServiceClient<Channel>, agent: &AgentProcess, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(status) = api
            .get_workload_status(GetWorkloadStatusRequest { id: id.into() })
            .await
            && status
                .into_inner()
                .status
                .is_some_and(|s| s.actual_state() == ActualState::Running)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id}: not running within 90 s:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn delete(api: &mut AgentServiceClient<Channel>, id: &str) {
    let _ = api
        .delete_workload(DeleteWorkloadRequest { id: id.into() })
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while api
        .get_workload_status(GetWorkloadStatusRequest { id: id.into() })
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "{id}: not deleted within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sleeper(id: &str) -> ApplyWorkloadRequest {
    docker::sleeper(id, &test_image())
}

/// An Exec session driven over the RPC: the requests after `start` are
/// sent through the returned sender; the session stays open until it is
/// dropped.
async fn open_exec(
    api: &mut AgentServiceClient<Channel>,
    start: ExecStart,
) -> Result<(mpsc::Sender<ExecRequest>, tonic::Streaming<ExecResponse>), tonic::Status> {
    let (tx, mut rx) = mpsc::channel(16);
    let first = ExecRequest {
        request: Some(exec_request::Request::Start(start)),
    };
    let requests =
        futures::stream::iter([first]).chain(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let responses = api.exec(requests).await?.into_inner();
    Ok((tx, responses))
}

/// Everything a session sends: stdout, stderr and the exit status, or the
/// error that ended it.
async fn collect(
    mut responses: tonic::Streaming<ExecResponse>,
) -> Result<(String, String, i32), tonic::Status> {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let collected = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(message) = responses.message().await? {
            match message.response {
                Some(exec_response::Response::Stdout(b)) => stdout.extend(b),
                Some(exec_response::Response::Stderr(b)) => stderr.extend(b),
                Some(exec_response::Response::ExitCode(code)) => {
                    return Ok::<i32, tonic::Status>(code);
                }
                None => {}
            }
        }
        panic!("the session ended without an exit status");
    })
    .await
    .expect("no exit status within 60 s")?;
    Ok((text(&stdout), text(&stderr), collected))
}

#[tokio::test]
async fn exec_gives_the_remote_output_apart_its_exit_status_a_terminal_and_stdin() {
    if !docker_available("exec_gives_the_remote_output_apart_its_exit_status_a_terminal_and_stdin")
    {
        return;
    }
    let id = format!("exec-e2e-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let env = [("PERSYS_DOCKER_ENABLED", "true")];
    let agent = AgentProcess::start(&dir.path().join("state"), &certs, &env).await;
    let mut api = client(agent.port, &certs).await.unwrap();
    api.apply_workload(sleeper(&id)).await.unwrap();
    wait_running(&mut api, &agent, &id).await;

    // The CLI: stdout and stderr apart, the remote exit status as its own.
    let script = "echo out; echo err >&2; exit 3";
    let ran = ctl(
        &agent,
        &certs,
        &["exec", &id, "--", "sh", "-c", script],
        b"",
    );
    assert_eq!(text(&ran.stdout), "out\n", "stderr: {}", text(&ran.stderr));
    assert_eq!(text(&ran.stderr), "err\n");
    assert_eq!(ran.status.code(), Some(3));

    // -i: standard input reaches the command, and its end ends `cat`.
    let ran = ctl(
        &agent,
        &certs,
        &["exec", "-i", &id, "--", "cat"],
        b"one\ntwo\n",
    );
    assert_eq!(
        text(&ran.stdout),
        "one\ntwo\n",
        "stderr: {}",
        text(&ran.stderr)
    );
    assert_eq!(ran.status.code(), Some(0));

    // -t: the command has a terminal (the CLI's own stdin is a pipe here,
    // so it stays cooked; the remote side is a tty all the same).
    let ran = ctl(
        &agent,
        &certs,
        &[
            "exec",
            "-t",
            &id,
            "--",
            "sh",
            "-c",
            "test -t 1 && echo is-a-tty",
        ],
        b"",
    );
    assert!(
        text(&ran.stdout).starts_with("is-a-tty"),
        "stdout: {:?} stderr: {}",
        text(&ran.stdout),
        text(&ran.stderr)
    );
    assert_eq!(ran.status.code(), Some(0));

    // Without -t, no terminal.
    let ran = ctl(
        &agent,
        &certs,
        &["exec", &id, "--", "sh", "-c", "test -t 1"],
        b"",
    );
    assert_eq!(ran.status.code(), Some(1));

    // persysctl's own failures are status 1 and say why.
    let ran = ctl(&agent, &certs, &["exec", "nothing-here", "--", "true"], b"");
    assert_eq!(ran.status.code(), Some(1));
    assert!(
        text(&ran.stderr).contains("nothing-here"),
        "{}",
        text(&ran.stderr)
    );

    // The RPC with a terminal: a resize reaches the terminal before the
    // next input, and the exit status comes last.
    let (tx, responses) = open_exec(
        &mut api,
        ExecStart {
            id: id.clone(),
            command: vec!["sh".into()],
            tty: true,
            stdin: true,
            size: Some(TerminalSize {
                rows: 24,
                columns: 80,
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let resize = TerminalSize {
        rows: 33,
        columns: 101,
    };
    tx.send(ExecRequest {
        request: Some(exec_request::Request::Resize(resize)),
    })
    .await
    .unwrap();
    tx.send(ExecRequest {
        request: Some(exec_request::Request::Stdin(
            b"test -t 0 && echo is-a-tty; stty size; exit 7\n".to_vec(),
        )),
    })
    .await
    .unwrap();
    let (stdout, stderr, code) = collect(responses).await.unwrap();
    assert!(stdout.contains("is-a-tty"), "{stdout:?}");
    assert!(stdout.contains("33 101"), "{stdout:?}");
    assert!(stderr.is_empty(), "a terminal merges stderr: {stderr:?}");
    assert_eq!(code, 7);
    drop(tx);

    // close_stdin is the end of file the command reads.
    let (tx, responses) = open_exec(
        &mut api,
        ExecStart {
            id: id.clone(),
            command: vec!["wc".into(), "-c".into()],
            stdin: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for request in [
        exec_request::Request::Stdin(b"12345".to_vec()),
        exec_request::Request::CloseStdin(true),
    ] {
        tx.send(ExecRequest {
            request: Some(request),
        })
        .await
        .unwrap();
    }
    let (stdout, _, code) = collect(responses).await.unwrap();
    assert_eq!(stdout.trim(), "5");
    assert_eq!(code, 0);

    // Refusals: no command; a first request that is not start.
    let refused = open_exec(
        &mut api,
        ExecStart {
            id: id.clone(),
            ..Default::default()
        },
    )
    .await
    .err()
    .unwrap();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let not_start = ExecRequest {
        request: Some(exec_request::Request::Stdin(b"x".to_vec())),
    };
    let refused = api
        .exec(futures::stream::iter([not_start]).chain(futures::stream::pending()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    // The audit line names the program, never its arguments.
    let log = agent.log_text();
    assert!(log.contains("exec session"), "{log}");
    assert!(!log.contains("echo err"), "arguments logged:\n{log}");
    delete(&mut api, &id).await;
}

#[tokio::test]
async fn exec_in_a_compose_project_runs_in_the_named_service() {
    if !compose_available("exec_in_a_compose_project_runs_in_the_named_service") {
        return;
    }
    let id = format!("exec-compose-{}", std::process::id());
    let project = format!("persys-exec-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let env = [
        ("PERSYS_DOCKER_ENABLED", "true"),
        ("PERSYS_COMPOSE_ENABLED", "true"),
    ];
    let agent = AgentProcess::start(&dir.path().join("state"), &certs, &env).await;
    let mut api = client(agent.port, &certs).await.unwrap();
    let service = |name: &str| {
        format!(
            "  {name}:\n    image: {}\n    init: true\n    command: [\"sleep\", \"3600\"]\n    environment:\n      ROLE: {name}\n",
            test_image()
        )
    };
    let yaml = format!("services:\n{}{}", service("web"), service("db"));
    api.apply_workload(ApplyWorkloadRequest {
        id: id.clone(),
        r#type: WorkloadType::Compose as i32,
        revision_id: String::new(),
        desired_state: DesiredState::Running as i32,
        spec: Some(WorkloadSpec {
            spec: Some(workload_spec::Spec::Compose(ComposeSpec {
                project_name: project.clone(),
                compose_yaml: yaml,
                ..Default::default()
            })),
        }),
    })
    .await
    .unwrap();
    wait_running(&mut api, &agent, &id).await;

    let ran = ctl(
        &agent,
        &certs,
        &[
            "exec",
            &id,
            "--service",
            "db",
            "--",
            "sh",
            "-c",
            "echo $ROLE",
        ],
        b"",
    );
    assert_eq!(text(&ran.stdout), "db\n", "stderr: {}", text(&ran.stderr));
    assert_eq!(ran.status.code(), Some(0));

    // Several services: one must be named; an unknown one is not found.
    let start = |service: &str| ExecStart {
        id: id.clone(),
        service: service.into(),
        command: vec!["true".into()],
        ..Default::default()
    };
    let (_tx, responses) = open_exec(&mut api, start("")).await.unwrap();
    let refused = collect(responses).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("db, web"), "{refused:?}");
    let (_tx, responses) = open_exec(&mut api, start("cache")).await.unwrap();
    let missing = collect(responses).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert!(missing.message().contains("db, web"), "{missing:?}");
    delete(&mut api, &id).await;
}

#[tokio::test]
async fn a_vm_has_no_exec_but_its_serial_console_shows_the_firmware() {
    if !libvirt_available("a_vm_has_no_exec_but_its_serial_console_shows_the_firmware") {
        return;
    }
    let id = format!("console-e2e-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let env = [
        ("PERSYS_VM_ENABLED", "true"),
        ("PERSYS_VM_STOP_TIMEOUT", "2s"),
    ];
    let agent = AgentProcess::start(&dir.path().join("state"), &certs, &env).await;
    let mut api = client(agent.port, &certs).await.unwrap();
    api.apply_workload(ApplyWorkloadRequest {
        id: id.clone(),
        r#type: WorkloadType::Vm as i32,
        revision_id: String::new(),
        desired_state: DesiredState::Running as i32,
        spec: Some(WorkloadSpec {
            spec: Some(workload_spec::Spec::Vm(VmSpec {
                vcpus: 1,
                memory_mb: 64,
                ..Default::default()
            })),
        }),
    })
    .await
    .unwrap();
    wait_running(&mut api, &agent, &id).await;

    let exec = open_exec(
        &mut api,
        ExecStart {
            id: id.clone(),
            command: vec!["sh".into()],
            ..Default::default()
        },
    )
    .await;
    let refused = match exec {
        Ok((_tx, responses)) => collect(responses).await.unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    assert!(refused.message().contains("console"), "{refused:?}");

    let attach = |force: bool| {
        let start = ConsoleRequest {
            request: Some(console_request::Request::Start(ConsoleStart {
                id: id.clone(),
                force,
            })),
        };
        futures::stream::iter([start]).chain(futures::stream::pending())
    };
    let mut console = api.console(attach(false)).await.unwrap().into_inner();
    // A diskless VM's firmware retries its boot every 10 s on the console.
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(message) = console.message().await.unwrap() {
            seen.extend(message.output);
            let shown = text(&seen);
            if shown.contains("SeaBIOS") || shown.contains("bootable") || shown.contains("Boot") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "console output: {:?}", text(&seen));

    // A second session is refused while the first holds the console, and
    // takes it over with force.
    let mut second = api.console(attach(false)).await.unwrap().into_inner();
    let busy = tokio::time::timeout(Duration::from_secs(30), second.message())
        .await
        .expect("no answer for a busy console")
        .unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition, "{busy:?}");
    assert!(busy.message().contains("--force"), "{busy:?}");
    drop(console);
    let mut forced = api.console(attach(true)).await.unwrap().into_inner();
    let output = tokio::time::timeout(Duration::from_secs(60), forced.message())
        .await
        .expect("no output on the forced session within 60 s")
        .unwrap()
        .expect("the forced session ended");
    assert!(!output.output.is_empty());
    delete(&mut api, &id).await;
}
