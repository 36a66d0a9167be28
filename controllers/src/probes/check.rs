//! One execution of a probe against one container. Every handler reaches
//! only the container: exec runs inside it, the network handlers connect
//! to the address the engine gave it on its network (the spec cannot name
//! another host).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bollard::exec::{CreateExecOptions, StartExecResults};
use futures::StreamExt;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use super::spec::Action;
use crate::docker::Engine;

/// Most bytes of a probe's output kept for the status and the event.
pub(crate) const MAX_OUTPUT: usize = 1024;

/// Where a probe runs: the container, and its address on its network.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) engine: Engine,
    pub(crate) container_id: String,
    /// None when the container has no address (no network): the network
    /// handlers fail, saying so.
    pub(crate) address: Option<IpAddr>,
}

/// What one execution found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) passed: bool,
    /// The command's output, or what failed; cut to [`MAX_OUTPUT`] bytes.
    pub(crate) output: String,
}

impl Outcome {
    fn pass(output: impl Into<String>) -> Outcome {
        Outcome {
            passed: true,
            output: clean(&output.into()),
        }
    }

    fn fail(output: impl Into<String>) -> Outcome {
        Outcome {
            passed: false,
            output: clean(&output.into()),
        }
    }
}

/// Runs `action` against `target` within `timeout`.
pub(crate) async fn run(action: &Action, target: &Target, timeout: Duration) -> Outcome {
    let seconds = timeout.as_secs();
    match tokio::time::timeout(timeout, attempt(action, target)).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::fail(format!("probe timed out after {seconds}s")),
    }
}

async fn attempt(action: &Action, target: &Target) -> Outcome {
    match action {
        Action::Exec(command) => exec(target, command).await,
        Action::HttpGet {
            path,
            port,
            https,
            headers,
        } => match address(target, *port) {
            Ok(address) => http_get(address, path, *https, headers).await,
            Err(outcome) => outcome,
        },
        Action::TcpSocket { port } => match address(target, *port) {
            Ok(address) => match TcpStream::connect(address).await {
                Ok(_) => Outcome::pass(""),
                Err(error) => Outcome::fail(format!("dial tcp {address}: {error}")),
            },
            Err(outcome) => outcome,
        },
        Action::Grpc { port, service } => match address(target, *port) {
            Ok(address) => grpc(address, service).await,
            Err(outcome) => outcome,
        },
    }
}

fn address(target: &Target, port: u16) -> Result<SocketAddr, Outcome> {
    target
        .address
        .map(|ip| SocketAddr::new(ip, port))
        .ok_or_else(|| Outcome::fail("the container has no IP address to probe"))
}

/// Runs the command in the container through the engine; exit 0 passes.
async fn exec(target: &Target, command: &[String]) -> Outcome {
    let docker = match target.engine.client().await {
        Ok(docker) => docker,
        Err(error) => return Outcome::fail(format!("docker engine unreachable: {error}")),
    };
    let options = CreateExecOptions {
        cmd: Some(command.to_vec()),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        ..Default::default()
    };
    let created = match docker.create_exec(&target.container_id, options).await {
        Ok(created) => created,
        Err(error) => return Outcome::fail(format!("exec failed: {error}")),
    };
    let mut output = Vec::new();
    match docker.start_exec(&created.id, None).await {
        Ok(StartExecResults::Attached {
            output: mut stream, ..
        }) => {
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(chunk) => {
                        let bytes = chunk.into_bytes();
                        let room = MAX_OUTPUT.saturating_sub(output.len());
                        output.extend_from_slice(&bytes[..bytes.len().min(room)]);
                    }
                    Err(error) => return Outcome::fail(format!("exec failed: {error}")),
                }
            }
        }
        Ok(StartExecResults::Detached) => {}
        Err(error) => return Outcome::fail(format!("exec failed: {error}")),
    }
    let output = String::from_utf8_lossy(&output).into_owned();
    match docker.inspect_exec(&created.id).await {
        Ok(inspect) => match inspect.exit_code {
            Some(0) => Outcome::pass(output),
            Some(code) if output.trim().is_empty() => {
                Outcome::fail(format!("command {command:?} exited with {code}"))
            }
            Some(_) => Outcome::fail(output),
            None => Outcome::fail(format!("command {command:?} did not report its exit")),
        },
        Err(error) => Outcome::fail(format!("exec failed: {error}")),
    }
}

/// GET `path` at `address`; a status from 200 to 399 passes. HTTPS does
/// not verify the certificate, as kubelet does not.
async fn http_get(
    address: SocketAddr,
    path: &str,
    https: bool,
    headers: &[(String, String)],
) -> Outcome {
    let scheme = if https { "https" } else { "http" };
    let url = format!("{scheme}://{address}{path}");
    let stream = match TcpStream::connect(address).await {
        Ok(stream) => stream,
        Err(error) => return Outcome::fail(format!("Get {url:?}: dial tcp {address}: {error}")),
    };
    let result = if https {
        let connector = tokio_rustls::TlsConnector::from(insecure_tls());
        let name = rustls::pki_types::ServerName::IpAddress(address.ip().into());
        match connector.connect(name, stream).await {
            Ok(tls) => get(tls, address, path, headers).await,
            Err(error) => Err(format!("TLS handshake: {error}")),
        }
    } else {
        get(stream, address, path, headers).await
    };
    match result {
        Ok(status) if (200..400).contains(&status) => Outcome::pass(format!("HTTP {status}")),
        Ok(status) => Outcome::fail(format!("HTTP probe failed with statuscode: {status}")),
        Err(error) => Outcome::fail(format!("Get {url:?}: {error}")),
    }
}

/// One request on a fresh HTTP/1.1 connection; answers the status.
async fn get<T>(
    io: T,
    address: SocketAddr,
    path: &str,
    headers: &[(String, String)],
) -> Result<u16, String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    // Driven until the response is in; dropped with this call's future.
    let driver = tokio::spawn(connection);
    let mut request = hyper::Request::get(path)
        .header(hyper::header::HOST, address.to_string())
        .header(hyper::header::USER_AGENT, "persys-probe/1.0")
        .header(hyper::header::ACCEPT, "*/*");
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await;
    driver.abort();
    response
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

/// grpc.health.v1.Health/Check; SERVING passes.
async fn grpc(address: SocketAddr, service: &str) -> Outcome {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{address}")) {
        Ok(endpoint) => endpoint,
        Err(error) => return Outcome::fail(error.to_string()),
    };
    let channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(error) => {
            return Outcome::fail(format!(
                "failed to connect service {address:?} within the timeout: {error}"
            ));
        }
    };
    let request = HealthCheckRequest {
        service: service.to_string(),
    };
    match HealthClient::new(channel).check(request).await {
        Ok(response) => {
            let status = response.into_inner().status();
            if status == ServingStatus::Serving {
                Outcome::pass("SERVING")
            } else {
                Outcome::fail(format!(
                    "service unhealthy (responded with {:?})",
                    status.as_str_name()
                ))
            }
        }
        Err(status) => Outcome::fail(format!(
            "health rpc failed: {:?}: {}",
            status.code(),
            status.message()
        )),
    }
}

/// A TLS client that accepts any certificate: a probe checks that the
/// workload answers, not who it is (kubelet's InsecureSkipVerify).
fn insecure_tls() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let verifier = Arc::new(AnyCertificate(provider.clone()));
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| {
                    b.dangerous()
                        .with_custom_certificate_verifier(verifier)
                        .with_no_client_auth()
                });
            // The ring provider supports the default versions; should it
            // not, an empty config fails each handshake, saying why.
            Arc::new(config.unwrap_or_else(|_| {
                rustls::ClientConfig::builder()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            }))
        })
        .clone()
}

/// Accepts any server certificate, checking only the handshake signatures.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The output as kept: trimmed, control characters but newlines and tabs
/// replaced, at most [`MAX_OUTPUT`] bytes.
fn clean(output: &str) -> String {
    let trimmed = output.trim();
    let mut kept = String::with_capacity(trimmed.len().min(MAX_OUTPUT));
    for c in trimmed.chars() {
        if kept.len() + c.len_utf8() > MAX_OUTPUT {
            break;
        }
        kept.push(if c.is_control() && c != '\n' && c != '\t' {
            '?'
        } else {
            c
        });
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_trimmed_bounded_and_without_control_characters() {
        assert_eq!(clean("  ok\n"), "ok");
        assert_eq!(clean("a\x1b[31mb"), "a?[31mb");
        assert_eq!(clean(&"é".repeat(2000)).len(), MAX_OUTPUT);
    }

    #[tokio::test]
    async fn tcp_and_http_probes_reach_a_listener_and_fail_on_a_closed_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buffer = [0u8; 1024];
                let _ = socket.read(&mut buffer).await;
                let status = if buffer.starts_with(b"GET /bad") {
                    "500 Internal Server Error"
                } else {
                    "204 No Content"
                };
                let _ = socket
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let target = Target {
            engine: Engine::new(Some("unix:///nonexistent".into())),
            container_id: "none".into(),
            address: Some("127.0.0.1".parse().unwrap()),
        };
        let second = Duration::from_secs(5);
        let tcp = run(&Action::TcpSocket { port }, &target, second).await;
        assert!(tcp.passed, "{tcp:?}");
        let http = |path: &str| Action::HttpGet {
            path: path.into(),
            port,
            https: false,
            headers: vec![("X-Probe".into(), "1".into())],
        };
        let good = run(&http("/healthz"), &target, second).await;
        assert!(good.passed, "{good:?}");
        let bad = run(&http("/bad"), &target, second).await;
        assert!(!bad.passed);
        assert!(bad.output.contains("statuscode: 500"), "{bad:?}");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        let refused = run(&Action::TcpSocket { port: closed_port }, &target, second).await;
        assert!(!refused.passed);
        assert!(refused.output.contains("dial tcp"), "{refused:?}");
        let nowhere = Target {
            address: None,
            ..target
        };
        let none = run(&Action::TcpSocket { port }, &nowhere, second).await;
        assert!(none.output.contains("no IP address"), "{none:?}");
    }
}
