//! Black-box test support: certificates, a real agent process, and clients.
#![allow(dead_code)] // each test binary uses part of it

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use persys_api::v1::HealthCheckRequest;
use persys_api::v1::agent_service_client::AgentServiceClient;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Runtimes enabled but unreachable: applies are accepted and stored, and
/// nothing runs anywhere.
pub const UNREACHABLE_RUNTIMES: &[(&str, &str)] = &[
    ("PERSYS_DOCKER_ENABLED", "true"),
    ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
    ("PERSYS_COMPOSE_ENABLED", "true"),
    ("PERSYS_COMPOSE_BINARY", "/nonexistent/docker-compose"),
    ("PERSYS_VM_ENABLED", "true"),
    (
        "PERSYS_LIBVIRT_URI",
        "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
    ),
];

/// The agent binary with a clean environment: plaintext on free ports,
/// state in `state`, no runtimes. For starts that must fail, and how.
pub fn offline_agent(state: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_persys-agent"));
    command
        .env_clear()
        .env("PERSYS_STATE_PATH", state)
        .env("PERSYS_TLS_ENABLED", "false")
        .env("PERSYS_GRPC_PORT", free_port().to_string())
        .env("PERSYS_METRICS_PORT", free_port().to_string())
        .env("PERSYS_DOCKER_ENABLED", "false")
        .env("PERSYS_COMPOSE_ENABLED", "false")
        .env("PERSYS_VM_ENABLED", "false");
    command
}

/// A certificate authority that signs server and client certificates.
pub struct Authority {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Authority {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM): a server certificate for localhost
    /// (serverAuth) or a client certificate (clientAuth).
    pub fn leaf(&self, name: &str, server: bool) -> (String, String) {
        let sans = if server {
            vec!["localhost".to_string(), "127.0.0.1".to_string()]
        } else {
            vec![name.to_string()]
        };
        let uses = if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        };
        self.leaf_with(name, sans, &[uses])
    }

    /// (certificate PEM, key PEM) with these SANs and extended key usages
    /// (none: no EKU extension at all).
    pub fn leaf_with(
        &self,
        name: &str,
        sans: Vec<String>,
        uses: &[ExtendedKeyUsagePurpose],
    ) -> (String, String) {
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = uses.to_vec();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// CA, server and client files in a directory, as the agent reads them.
pub struct Certs {
    pub dir: PathBuf,
    pub ca: Authority,
    pub client_cert: String,
    pub client_key: String,
}

impl Certs {
    pub fn generate(dir: &Path) -> Certs {
        std::fs::create_dir_all(dir).unwrap();
        let ca = Authority::new("persys test CA");
        let (server_cert, server_key) = ca.leaf("persys-agent", true);
        let (client_cert, client_key) = ca.leaf("persysctl", false);
        std::fs::write(dir.join("ca.crt"), &ca.cert_pem).unwrap();
        std::fs::write(dir.join("agent.crt"), server_cert).unwrap();
        std::fs::write(dir.join("agent.key"), server_key).unwrap();
        std::fs::write(dir.join("client.crt"), &client_cert).unwrap();
        std::fs::write(dir.join("client.key"), &client_key).unwrap();
        Certs {
            dir: dir.to_path_buf(),
            ca,
            client_cert,
            client_key,
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `persys-agent` process; killed when dropped.
pub struct AgentProcess {
    pub child: Child,
    pub port: u16,
    pub metrics_port: u16,
    pub state: PathBuf,
    pub certs: PathBuf,
    pub log: PathBuf,
}

impl AgentProcess {
    /// Starts the agent with mTLS on a free port, state in `state`, and
    /// `env` on top, and waits until it answers HealthCheck healthy.
    pub async fn start(state: &Path, certs: &Certs, env: &[(&str, &str)]) -> AgentProcess {
        for _ in 0..5 {
            let mut agent = AgentProcess::spawn(state, Some(certs), env);
            if agent.wait_healthy(certs).await {
                return agent;
            }
        }
        panic!("the agent could not bind free ports in 5 tries");
    }

    /// True when the agent exited because a port it was given was taken
    /// meanwhile (free ports are found by binding and releasing them, so
    /// parallel tests can race for one): the caller tries other ports.
    fn lost_port_race(&mut self) -> bool {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                let log = self.log_text();
                if log.contains("cannot listen") && log.contains("Address already in use") {
                    return true;
                }
                panic!("agent exited early ({status}):\n{log}");
            }
            _ => false,
        }
    }

    /// Starts the agent serving plaintext gRPC (PERSYS_TLS_ENABLED=false)
    /// with `env` on top, and waits until it answers HealthCheck healthy.
    pub async fn start_plaintext(state: &Path, env: &[(&str, &str)]) -> AgentProcess {
        let mut env = env.to_vec();
        env.push(("PERSYS_TLS_ENABLED", "false"));
        let mut agent = AgentProcess::spawn(state, None, &env);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut tries = 1;
        loop {
            if agent.lost_port_race() {
                assert!(tries < 5, "the agent could not bind free ports in 5 tries");
                tries += 1;
                agent = AgentProcess::spawn(state, None, &env);
                continue;
            }
            if let Ok(mut client) = plaintext_client(agent.port).await
                && let Ok(health) = client.health_check(HealthCheckRequest {}).await
                && health.get_ref().healthy
            {
                return agent;
            }
            assert!(
                Instant::now() < deadline,
                "agent not healthy within 60 s:\n{}",
                agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Spawns the agent on free ports; with `certs`, pointed at their files.
    fn spawn(state: &Path, certs: Option<&Certs>, env: &[(&str, &str)]) -> AgentProcess {
        let port = free_port();
        let metrics_port = free_port();
        let log = state.with_extension("log");
        let log_file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_persys-agent"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PERSYS_GRPC_ADDR", "127.0.0.1")
            .env("PERSYS_GRPC_PORT", port.to_string())
            .env("PERSYS_METRICS_PORT", metrics_port.to_string())
            .env("PERSYS_STATE_PATH", state)
            .env("PERSYS_LOG_LEVEL", "info")
            .env("PERSYS_DOCKER_ENABLED", "false")
            .env("PERSYS_COMPOSE_ENABLED", "false")
            .env("PERSYS_VM_ENABLED", "false");
        if let Some(certs) = certs {
            command
                .env("PERSYS_TLS_CERT", certs.dir.join("agent.crt"))
                .env("PERSYS_TLS_KEY", certs.dir.join("agent.key"))
                .env("PERSYS_TLS_CA", certs.dir.join("ca.crt"));
        }
        if let Ok(host) = std::env::var("DOCKER_HOST") {
            command.env("DOCKER_HOST", host);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        AgentProcess {
            child,
            port,
            metrics_port,
            state: state.to_path_buf(),
            certs: certs.map(|c| c.dir.clone()).unwrap_or_default(),
            log,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the agent answers healthy; false when it lost a port
    /// race and must be started again on other ports.
    async fn wait_healthy(&mut self, certs: &Certs) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.lost_port_race() {
                return false;
            }
            if let Ok(mut client) = client(self.port, certs).await
                && let Ok(health) = client.health_check(HealthCheckRequest {}).await
                && health.get_ref().healthy
            {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "agent not healthy within 60 s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a signal and waits for the exit status.
    pub async fn signal(&mut self, signal: &str) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit after SIG{signal}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An mTLS client with the test client certificate.
pub async fn client(
    port: u16,
    certs: &Certs,
) -> Result<AgentServiceClient<Channel>, tonic::transport::Error> {
    client_with(
        port,
        &certs.ca.cert_pem,
        Some((&certs.client_cert, &certs.client_key)),
    )
    .await
}

/// A client trusting `ca_pem`, presenting `identity` if given.
pub async fn client_with(
    port: u16,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<AgentServiceClient<Channel>, tonic::transport::Error> {
    Ok(AgentServiceClient::new(
        channel_with(port, ca_pem, identity).await?,
    ))
}

/// A connection trusting `ca_pem`, presenting `identity` if given.
pub async fn channel_with(
    port: u16,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await?;
    Ok(channel)
}

/// A plain HTTP/1.0 GET on loopback: (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample in a Prometheus text exposition, if present.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// A plaintext client, for an agent run with PERSYS_TLS_ENABLED=false.
pub async fn plaintext_client(
    port: u16,
) -> Result<AgentServiceClient<Channel>, tonic::transport::Error> {
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await?;
    Ok(AgentServiceClient::new(channel))
}
