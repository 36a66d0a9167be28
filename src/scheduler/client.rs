//! The scheduler over gRPC: dialling with the agent's client certificate, and
//! the address the agent advertises.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use persys_api::control::v1::agent_control_client::AgentControlClient;
use persys_api::control::v1::{
    HeartbeatRequest, HeartbeatResponse, RegisterNodeRequest, RegisterNodeResponse,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::link::{LinkError, Scheduler};
use crate::config::Config;
use crate::server::tls::TlsFiles;

/// The scheduler answers within its own 10 s RPC budget or not at all.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `persys.control.v1.AgentControl` at `addr`.
pub struct GrpcScheduler {
    /// host:port, as configured.
    addr: String,
    /// The agent's client certificate, key and CA; none for plaintext.
    tls: Option<TlsFiles>,
    /// PERSYS_AGENT_GRPC_ENDPOINT, when set.
    endpoint: Option<String>,
    /// Where the agent's gRPC server is bound.
    bind: SocketAddr,
    /// The last registration's connection; heartbeats reuse it.
    client: Option<AgentControlClient<Channel>>,
}

impl GrpcScheduler {
    pub fn new(config: &Config, addr: String) -> Self {
        // A client certificate of its own when one is configured; else the
        // agent's server certificate, which then needs clientAuth too.
        let (cert, key) = match (&config.scheduler_tls_cert, &config.scheduler_tls_key) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            _ => (config.tls_cert.clone(), config.tls_key.clone()),
        };
        let tls = (!config.scheduler_insecure).then(|| TlsFiles {
            cert,
            key,
            ca: config.tls_ca.clone(),
        });
        GrpcScheduler {
            addr,
            tls,
            endpoint: config.agent_grpc_endpoint.clone(),
            bind: config.grpc_socket(),
            client: None,
        }
    }

    /// A new connection; the TLS files are read now, so a rotated
    /// certificate is used from the next registration on.
    async fn dial(&self) -> Result<Channel, LinkError> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let unreachable = |detail: String| LinkError::Unreachable {
            addr: self.addr.clone(),
            detail,
        };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", self.addr))
            .map_err(|e| unreachable(error_chain(&e)))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(RPC_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(files) = &self.tls {
            let read = |path: &std::path::Path, what: &str| {
                std::fs::read(path).map_err(|e| {
                    LinkError::Tls(format!("reading the {what} {}: {e}", path.display()))
                })
            };
            let cert = read(&files.cert, "certificate")?;
            let key = read(&files.key, "private key")?;
            let ca = read(&files.ca, "CA certificate")?;
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(cert, key))
                .domain_name(host_of(&self.addr));
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| LinkError::Tls(error_chain(&e)))?;
        }
        endpoint
            .connect()
            .await
            .map_err(|e| unreachable(error_chain(&e)))
    }
}

impl Scheduler for GrpcScheduler {
    async fn register(
        &mut self,
        request: RegisterNodeRequest,
    ) -> Result<RegisterNodeResponse, LinkError> {
        self.client = None;
        let mut client = AgentControlClient::new(self.dial().await?);
        let response = client
            .register_node(request)
            .await
            .map_err(|status| rpc_error("RegisterNode", status))?;
        self.client = Some(client);
        Ok(response.into_inner())
    }

    async fn heartbeat(
        &mut self,
        request: HeartbeatRequest,
    ) -> Result<HeartbeatResponse, LinkError> {
        let client = self.client.as_mut().ok_or(LinkError::NotConnected)?;
        client
            .heartbeat(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| rpc_error("Heartbeat", status))
    }

    /// PERSYS_AGENT_GRPC_ENDPOINT; else the bind address when it is a
    /// specific one; else the local address of the route toward the
    /// scheduler (a connected UDP socket sends nothing), with the gRPC port.
    async fn advertised_endpoint(&mut self) -> Result<String, LinkError> {
        if let Some(endpoint) = &self.endpoint {
            return Ok(endpoint.clone());
        }
        if !self.bind.ip().is_unspecified() {
            return Ok(self.bind.to_string());
        }
        let unreachable = |detail: String| LinkError::Unreachable {
            addr: self.addr.clone(),
            detail,
        };
        let target = tokio::net::lookup_host(&self.addr)
            .await
            .map_err(|e| unreachable(format!("resolving: {e}")))?
            .next()
            .ok_or_else(|| unreachable("resolves to no address".into()))?;
        let any: SocketAddr = if target.is_ipv4() {
            (IpAddr::from([0u8; 4]), 0).into()
        } else {
            (IpAddr::from([0u16; 8]), 0).into()
        };
        let route = async {
            let socket = tokio::net::UdpSocket::bind(any).await?;
            socket.connect(target).await?;
            socket.local_addr()
        };
        let local = route
            .await
            .map_err(|e| unreachable(format!("no route: {e}")))?;
        Ok(SocketAddr::new(local.ip(), self.bind.port()).to_string())
    }
}

fn rpc_error(rpc: &'static str, status: tonic::Status) -> LinkError {
    LinkError::Rpc {
        rpc,
        code: status.code(),
        message: status.message().to_string(),
    }
}

/// The host of `host:port`, without IPv6 brackets: the name the scheduler's
/// certificate must carry.
fn host_of(addr: &str) -> String {
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// An error with its sources: tonic's transport errors say little at the top.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_name_is_the_host_without_brackets() {
        assert_eq!(host_of("sched.example:8085"), "sched.example");
        assert_eq!(host_of("10.0.0.1:8085"), "10.0.0.1");
        assert_eq!(host_of("[fd00::1]:8085"), "fd00::1");
    }

    #[tokio::test]
    async fn the_advertised_endpoint_is_configured_or_bound_or_routed() {
        let parse = |args: &[&str]| {
            let mut all = vec!["persys-agent", "--grpc-port", "50099"];
            all.extend_from_slice(args);
            Config::try_parse_from_iter(all).unwrap()
        };
        let mut configured = GrpcScheduler::new(
            &parse(&["--agent-grpc-endpoint", "node7.example:443"]),
            "127.0.0.1:8085".into(),
        );
        assert_eq!(
            configured.advertised_endpoint().await.unwrap(),
            "node7.example:443"
        );
        let mut bound = GrpcScheduler::new(
            &parse(&["--grpc-addr", "127.0.0.2"]),
            "127.0.0.1:8085".into(),
        );
        assert_eq!(
            bound.advertised_endpoint().await.unwrap(),
            "127.0.0.2:50099"
        );
        let mut routed = GrpcScheduler::new(&parse(&[]), "127.0.0.1:8085".into());
        assert_eq!(
            routed.advertised_endpoint().await.unwrap(),
            "127.0.0.1:50099"
        );
    }
}
