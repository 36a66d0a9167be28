//! The connection to the agent: address, TLS files, timeouts, and turning
//! transport failures into one line that names the cause.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::{
    ApplyWorkloadRequest, ApplyWorkloadResponse, ConsoleRequest, ConsoleResponse,
    DeleteWorkloadRequest, DeleteWorkloadResponse, DescribeWorkloadRequest,
    DescribeWorkloadResponse, ExecRequest, ExecResponse, GetWorkloadStatusRequest,
    HealthCheckRequest, HealthCheckResponse, ListWorkloadsRequest, WatchEvent, WatchRequest,
    WorkloadStatus, WorkloadType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Status, Streaming};

use crate::cli::{ConnectionArgs, DEFAULT_REQUEST_TIMEOUT};
use crate::error::CliError;

/// Where the default certificate files live, under the home directory.
const DEFAULT_DIR: &str = ".persys";

/// The agent's address, split the way TLS needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Address {
    /// `host:port` as the user wrote it (IPv6 in brackets).
    authority: String,
    /// The host alone: what the certificate is checked against.
    host: String,
}

impl Address {
    fn parse(server: &str) -> Result<Address, CliError> {
        let bad = |why: &str| CliError::Config(format!("--server {server:?}: {why}"));
        let rest = server
            .trim()
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("missing ] after the IPv6 address"))?;
            (host, after.strip_prefix(':'))
        } else if rest.matches(':').count() > 1 {
            return Err(bad("write an IPv6 address in brackets, e.g. [::1]:50051"));
        } else {
            match rest.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(bad("expected HOST:PORT"));
        }
        let port: u16 = match port {
            None => 50051,
            Some(port) => port
                .parse()
                .map_err(|_| bad("the port must be a number from 1 to 65535"))?,
        };
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Address {
            authority,
            host: host.to_string(),
        })
    }
}

/// A PEM file: its path, to name it in error messages, and its contents.
#[derive(Debug, Clone)]
struct PemFile {
    path: PathBuf,
    pem: Vec<u8>,
}

/// The client certificate and its key.
#[derive(Debug, Clone)]
struct ClientIdentity {
    cert: PemFile,
    key: PemFile,
}

/// The TLS material in use.
#[derive(Debug, Clone)]
struct TlsFiles {
    ca: PemFile,
    identity: Option<ClientIdentity>,
    server_name: String,
}

/// The given file, or the default one in ~/.persys if it exists.
fn given_or_default(given: &Option<PathBuf>, name: &str) -> Option<PathBuf> {
    if given.is_some() {
        return given.clone();
    }
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(DEFAULT_DIR).join(name);
    path.is_file().then_some(path)
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, CliError> {
    std::fs::read(path)
        .map_err(|e| CliError::Config(format!("reading the {what} {}: {e}", path.display())))
}

fn read_certificates(path: &Path, what: &str) -> Result<Vec<u8>, CliError> {
    let pem = read(path, what)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CliError::Config(format!("the {what} {}: {e}", path.display())))?;
    if certificates.is_empty() {
        return Err(CliError::Config(format!(
            "the {what} {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(pem)
}

fn read_key(path: &Path) -> Result<Vec<u8>, CliError> {
    let pem = read(path, "client key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        CliError::Config(format!(
            "the client key {} holds no usable PEM private key: {e}",
            path.display()
        ))
    })?;
    Ok(pem)
}

/// A connected client of one agent. Every unary call is bounded by the
/// request timeout; streams are not.
#[derive(Clone)]
pub struct Agent {
    client: AgentServiceClient<Channel>,
    peer: Peer,
    timeout: Duration,
}

/// Who we talk to and with which files: what error messages name.
#[derive(Debug, Clone)]
struct Peer {
    /// `host:port`.
    server: String,
    /// None for a plaintext connection.
    tls: Option<TlsFiles>,
}

impl Agent {
    /// Connects now, so that a wrong address or certificate is reported
    /// before anything else happens.
    pub async fn connect(args: &ConnectionArgs) -> Result<Agent, CliError> {
        let address = Address::parse(&args.server)?;
        let timeout = args.timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        let scheme = if args.insecure { "http" } else { "https" };
        let mut endpoint = Channel::from_shared(format!("{scheme}://{}", address.authority))
            .map_err(|e| CliError::Config(format!("--server {:?}: {e}", args.server)))?
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        let tls = if args.insecure {
            None
        } else {
            let files = Agent::tls_files(args, &address)?;
            let mut config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&files.ca.pem))
                .domain_name(files.server_name.clone())
                .timeout(timeout);
            if let Some(identity) = &files.identity {
                config = config.identity(Identity::from_pem(&identity.cert.pem, &identity.key.pem));
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| CliError::Config(format!("TLS configuration: {}", chain_text(&e))))?;
            Some(files)
        };
        let peer = Peer {
            server: address.authority,
            tls,
        };
        let channel = match tokio::time::timeout(timeout, endpoint.connect()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(error)) => return Err(peer.transport_failure(&error).await),
            Err(_) => {
                return Err(CliError::Connect {
                    server: peer.server,
                    reason: format!("timed out after {}", humantime::format_duration(timeout)),
                });
            }
        };
        Ok(Agent {
            client: AgentServiceClient::new(channel),
            peer,
            timeout,
        })
    }

    fn tls_files(args: &ConnectionArgs, address: &Address) -> Result<TlsFiles, CliError> {
        let ca = given_or_default(&args.ca, "ca.crt").ok_or_else(|| {
            CliError::Config(format!(
                "no CA certificate to check the agent with: pass --ca or set PERSYSCTL_CA \
                 (~/{DEFAULT_DIR}/ca.crt does not exist), or use --insecure for a plaintext agent"
            ))
        })?;
        let cert = given_or_default(&args.cert, "client.crt");
        let key = given_or_default(&args.key, "client.key");
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some(ClientIdentity {
                cert: PemFile {
                    pem: read_certificates(&cert, "client certificate")?,
                    path: cert,
                },
                key: PemFile {
                    pem: read_key(&key)?,
                    path: key,
                },
            }),
            (None, None) => None,
            (Some(cert), None) => {
                return Err(CliError::Config(format!(
                    "client certificate {} given without its key: pass --key or set PERSYSCTL_KEY",
                    cert.display()
                )));
            }
            (None, Some(key)) => {
                return Err(CliError::Config(format!(
                    "client key {} given without its certificate: pass --cert or set PERSYSCTL_CERT",
                    key.display()
                )));
            }
        };
        let server_name = args
            .tls_server_name
            .clone()
            .unwrap_or_else(|| address.host.clone());
        Ok(TlsFiles {
            ca: PemFile {
                pem: read_certificates(&ca, "CA certificate")?,
                path: ca,
            },
            identity,
            server_name,
        })
    }

    pub fn server(&self) -> &str {
        &self.peer.server
    }

    /// Runs a unary call within the request timeout; `what` names it in
    /// errors.
    async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, CliError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(self.failure(&status).await),
            Err(_) => Err(CliError::Timeout {
                what: what.to_string(),
                server: self.peer.server.clone(),
                after: self.timeout,
            }),
        }
    }

    pub async fn apply(
        &self,
        request: ApplyWorkloadRequest,
    ) -> Result<ApplyWorkloadResponse, CliError> {
        let mut client = self.client.clone();
        self.call("apply", client.apply_workload(request)).await
    }

    pub async fn delete(&self, id: &str) -> Result<DeleteWorkloadResponse, CliError> {
        let mut client = self.client.clone();
        let request = DeleteWorkloadRequest { id: id.to_string() };
        self.call("delete", client.delete_workload(request)).await
    }

    /// The workload's status; `None` when it does not exist.
    pub async fn status(&self, id: &str) -> Result<Option<WorkloadStatus>, CliError> {
        let mut client = self.client.clone();
        let request = GetWorkloadStatusRequest { id: id.to_string() };
        match self.call("get", client.get_workload_status(request)).await {
            Ok(response) => Ok(response.status),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }

    pub async fn list(&self, kind: WorkloadType) -> Result<Vec<WorkloadStatus>, CliError> {
        let mut client = self.client.clone();
        let request = ListWorkloadsRequest {
            r#type: kind as i32,
        };
        Ok(self
            .call("list", client.list_workloads(request))
            .await?
            .workloads)
    }

    /// The whole object with its events; `None` when it does not exist.
    pub async fn describe(&self, id: &str) -> Result<Option<DescribeWorkloadResponse>, CliError> {
        let mut client = self.client.clone();
        let request = DescribeWorkloadRequest { id: id.to_string() };
        match self
            .call("describe", client.describe_workload(request))
            .await
        {
            Ok(response) => Ok(Some(response)),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }

    pub async fn health(&self) -> Result<HealthCheckResponse, CliError> {
        let mut client = self.client.clone();
        self.call("health check", client.health_check(HealthCheckRequest {}))
            .await
    }

    /// Opens a Watch stream. The raw status is returned so that the caller
    /// can tell an expired version (relist) from a failure.
    pub async fn watch(&self, request: WatchRequest) -> Result<Streaming<WatchEvent>, Status> {
        let mut client = self.client.clone();
        match tokio::time::timeout(self.timeout, client.watch(request)).await {
            Ok(result) => result.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "watch: no answer within {}",
                humantime::format_duration(self.timeout)
            ))),
        }
    }

    /// Opens a StreamLogs stream. Only the opening waits within the
    /// request timeout: a followed stream runs as long as it has output.
    pub async fn stream_logs(
        &self,
        request: persys_api::v1::StreamLogsRequest,
    ) -> Result<Streaming<persys_api::v1::LogChunk>, Status> {
        let mut client = self.client.clone();
        match tokio::time::timeout(self.timeout, client.stream_logs(request)).await {
            Ok(result) => result.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "logs: no answer within {}",
                humantime::format_duration(self.timeout)
            ))),
        }
    }

    /// Opens an Exec session: `requests` starts with its `start`. Only the
    /// opening is bounded by the request timeout, never the session.
    pub async fn exec(
        &self,
        requests: impl futures::Stream<Item = ExecRequest> + Send + 'static,
    ) -> Result<Streaming<ExecResponse>, CliError> {
        let mut client = self.client.clone();
        self.call("exec", client.exec(requests)).await
    }

    /// Opens a Console session, as [`Agent::exec`].
    pub async fn console(
        &self,
        requests: impl futures::Stream<Item = ConsoleRequest> + Send + 'static,
    ) -> Result<Streaming<ConsoleResponse>, CliError> {
        let mut client = self.client.clone();
        self.call("console", client.console(requests)).await
    }

    /// A failed call: the agent's own answer, or what broke underneath.
    pub async fn failure(&self, status: &Status) -> CliError {
        // Statuses made by the client's transport carry their cause; the
        // agent's answers do not.
        match (status.code(), status.source()) {
            (Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled, Some(_)) => {
                self.peer.transport_failure(status).await
            }
            _ => CliError::from_agent(status),
        }
    }
}

impl Peer {
    /// Names the cause of a connection failure: a TLS verdict, a refused
    /// connection, or the innermost error.
    async fn transport_failure(&self, error: &(dyn StdError + 'static)) -> CliError {
        let server = self.server.clone();
        if let Some(tls) = find_cause::<rustls::Error>(error) {
            return CliError::Tls {
                server,
                reason: self.explain_tls(tls),
            };
        }
        // With TLS 1.3 the agent judges our certificate after the handshake
        // has finished on our side: its alert arrives while HTTP/2 is
        // writing, and is lost as a broken pipe. A bare handshake that then
        // reads gets the alert itself.
        if self.tls.is_some()
            && let Some(tls) = self.probe_tls().await
        {
            return CliError::Tls {
                server,
                reason: self.explain_tls(&tls),
            };
        }
        if let Some(io) = find_cause::<std::io::Error>(error) {
            use std::io::ErrorKind::*;
            let reason = match io.kind() {
                ConnectionRefused => {
                    "connection refused (is the agent running and listening there?)".to_string()
                }
                TimedOut => "timed out".to_string(),
                ConnectionReset | BrokenPipe | UnexpectedEof | ConnectionAborted => {
                    self.closed_hint()
                }
                _ => io.to_string(),
            };
            return CliError::Connect { server, reason };
        }
        let innermost = chain(error)
            .last()
            .map(|e| e.to_string())
            .unwrap_or_default();
        let lowered = innermost.to_ascii_lowercase();
        let reason = if lowered.contains("connection closed")
            || lowered.contains("connection reset")
            || lowered.contains("broken pipe")
            || lowered.contains("frame with invalid size")
        {
            self.closed_hint()
        } else {
            innermost
        };
        CliError::Connect { server, reason }
    }

    /// Why the agent may have hung up on us.
    fn closed_hint(&self) -> String {
        match &self.tls {
            None => "the agent closed the connection (is it serving TLS? then drop --insecure)"
                .to_string(),
            Some(files) if files.identity.is_none() => {
                "the agent closed the connection (it may require a client certificate: pass --cert and --key)".to_string()
            }
            Some(_) => "the agent closed the connection (it may not trust the client certificate)"
                .to_string(),
        }
    }

    /// Handshakes with the agent over a fresh connection and reads its first
    /// record: the TLS error, if there is one.
    async fn probe_tls(&self) -> Option<rustls::Error> {
        use tokio::io::AsyncReadExt;
        let files = self.tls.as_ref()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&files.ca.pem).flatten() {
            roots.add(ca).ok()?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(roots);
        let mut config = match &files.identity {
            Some(identity) => {
                let chain = CertificateDer::pem_slice_iter(&identity.cert.pem)
                    .collect::<Result<Vec<_>, _>>()
                    .ok()?;
                let key = PrivateKeyDer::from_pem_slice(&identity.key.pem).ok()?;
                builder.with_client_auth_cert(chain, key).ok()?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = rustls_pki_types::ServerName::try_from(files.server_name.clone()).ok()?;
        let probe = async {
            let tcp = tokio::net::TcpStream::connect(&self.server).await.ok()?;
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let mut tls = match connector.connect(name, tcp).await {
                Ok(tls) => tls,
                Err(error) => return rustls_error(error),
            };
            let mut first = [0u8; 64];
            match tls.read(&mut first).await {
                Err(error) => rustls_error(error),
                Ok(_) => None,
            }
        };
        tokio::time::timeout(PROBE_TIMEOUT, probe).await.ok()?
    }

    fn explain_tls(&self, error: &rustls::Error) -> String {
        use rustls::{AlertDescription, CertificateError};
        let (ca, client_cert, name) = match &self.tls {
            Some(files) => (
                files.ca.path.display().to_string(),
                files
                    .identity
                    .as_ref()
                    .map(|identity| identity.cert.path.display().to_string()),
                files.server_name.clone(),
            ),
            None => (String::new(), None, String::new()),
        };
        let detail = error.to_string();
        match error {
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => format!(
                "the agent's certificate is not signed by the CA in {ca} ({detail})"
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => format!(
                "the agent's certificate is not valid for {name:?} ({detail}); \
                 connect by a name it lists or pass --tls-server-name"
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => format!("the agent's certificate has expired ({detail})"),
            rustls::Error::InvalidCertificate(_) => {
                format!("the agent's certificate was rejected: {detail}")
            }
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
                "the agent requires a client certificate: pass --cert and --key (or put client.crt and client.key in ~/.persys)".to_string()
            }
            rustls::Error::AlertReceived(
                AlertDescription::UnknownCA
                | AlertDescription::BadCertificate
                | AlertDescription::CertificateUnknown
                | AlertDescription::DecryptError
                | AlertDescription::AccessDenied
                | AlertDescription::CertificateExpired
                | AlertDescription::UnsupportedCertificate,
            ) => match client_cert {
                Some(cert) => format!(
                    "the agent refused the client certificate {cert} ({detail})"
                ),
                None => format!("the agent refused the connection without a client certificate ({detail})"),
            },
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                format!(
                    "the agent did not answer in TLS ({detail}); if it runs with PERSYS_TLS_ENABLED=false, use --insecure"
                )
            }
            _ => detail,
        }
    }
}

/// How long the TLS probe after a failure may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The rustls error inside an I/O error, taken out.
fn rustls_error(error: std::io::Error) -> Option<rustls::Error> {
    error
        .into_inner()?
        .downcast::<rustls::Error>()
        .ok()
        .map(|e| *e)
}

/// The error and its sources, outermost first.
fn chain<'a>(
    error: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(error), |e: &&'a (dyn StdError + 'static)| {
        (*e).source()
    })
}

/// The first cause of type `T`, looking inside `io::Error`s too (their
/// `source()` skips the error they wrap).
fn find_cause<'a, T: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    chain(error).find_map(|e| {
        e.downcast_ref::<T>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<T>())
        })
    })
}

/// Every message of the chain, joined, without repeats.
fn chain_text(error: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in chain(error) {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split_into_host_and_port() {
        let parsed = Address::parse("127.0.0.1:7000").unwrap();
        assert_eq!(parsed.authority, "127.0.0.1:7000");
        assert_eq!(parsed.host, "127.0.0.1");
        let v6 = Address::parse("[::1]:7000").unwrap();
        assert_eq!(v6.authority, "[::1]:7000");
        assert_eq!(v6.host, "::1");
        let named = Address::parse("https://agent.example:7000/").unwrap();
        assert_eq!(named.host, "agent.example");
        assert_eq!(Address::parse("agent").unwrap().authority, "agent:50051");
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        for (server, why) in [
            ("::1:7000", "brackets"),
            ("host:http", "port"),
            (":7000", "HOST:PORT"),
            ("[::1:7000", "]"),
        ] {
            let error = Address::parse(server).unwrap_err().to_string();
            assert!(error.contains(why), "{server}: {error}");
        }
    }
}
