//! Mutual TLS with certificates reloaded from disk.
//!
//! The server's rustls configuration is rebuilt whenever the certificate,
//! key or CA file changes; new connections use the new one, established
//! connections keep theirs. A file that fails to load (half-written during a
//! rotation) keeps the previous configuration until it loads.
//!
//! A client certificate must chain to the CA and carry the clientAuth
//! extended key usage ([`ClientAuthOnly`]): a server certificate from the
//! same CA (another node's) is refused. Handshakes are bounded in time
//! ([`HANDSHAKE_TIMEOUT`]) and in number ([`MAX_CONCURRENT_HANDSHAKES`]);
//! failures are counted by reason and logged at most once a minute per peer
//! address ([`FailureLog`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, ExtendedKeyPurpose, RootCertStore,
    ServerConfig, SignatureScheme,
};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use super::authz::Identified;
use super::coalesce::Coalesced;
use crate::metrics::ReasonLabels;
use crate::tasks::Tasks;

/// How long a client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once. The accept loop waits for a slot before
/// it accepts the next connection (the kernel's backlog holds the rest), so
/// a flood of connections that never finish their handshake costs at most
/// this many tasks and buffers, each freed by [`HANDSHAKE_TIMEOUT`]. An
/// honest handshake holds its slot for a round trip or two; 256 is far
/// above what the scheduler and operators open at once. It bounds the
/// agent's memory, not the flood's effect: a peer holding every slot with
/// silent connections delays new connections until the timeouts free them.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 256;

/// Idle time before TCP keepalive probes start on an accepted connection,
/// so a peer that vanished (power loss, a dropped route) is noticed even
/// when the HTTP/2 keepalive cannot reach it.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// At most one log line per peer address in this period for failed
/// handshakes (the metric counts every one).
const FAILURE_LOG_PERIOD: Duration = Duration::from_secs(60);

/// Peer addresses remembered by [`FailureLog`].
const FAILURE_LOG_PEERS: usize = 1024;

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("TLS configuration: {0}")]
pub struct TlsError(String);

impl TlsError {
    pub fn from_message(message: String) -> Self {
        TlsError(message)
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError(format!("reading the {what} {}: {e}", path.display())))
}

impl TlsFiles {
    /// Builds a server configuration that requires a client certificate
    /// chaining to the CA.
    pub fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read(&self.cert, "certificate")?)
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError(format!("{}: {e}", self.cert.display())))?;
        if certs.is_empty() {
            return Err(TlsError(format!("{}: no certificate", self.cert.display())));
        }
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key, "private key")?)
            .map_err(|e| TlsError(format!("{}: {e}", self.key.display())))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&read(&self.ca, "CA certificate")?) {
            let ca = ca.map_err(|e| TlsError(format!("{}: {e}", self.ca.display())))?;
            roots
                .add(ca)
                .map_err(|e| TlsError(format!("{}: {e}", self.ca.display())))?;
        }
        if roots.is_empty() {
            return Err(TlsError(format!(
                "{}: no CA certificate",
                self.ca.display()
            )));
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsError(format!("client verifier: {e}")))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .with_client_cert_verifier(Arc::new(ClientAuthOnly { inner: webpki }))
            .with_single_cert(certs, key)
            .map_err(|e| {
                TlsError(format!(
                    "{} with {}: {e}",
                    self.cert.display(),
                    self.key.display()
                ))
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    fn fingerprint(&self) -> Vec<Option<(SystemTime, u64)>> {
        [&self.cert, &self.key, &self.ca]
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
            })
            .collect()
    }
}

/// The webpki client verifier, and then: the client's certificate carries
/// the extended key usage clientAuth.
///
/// webpki checks the EKU only when the extension is present (RFC 5280's
/// "required if present"): a certificate with serverAuth alone is refused,
/// but one without the extension at all passes. Asking webpki for
/// clientAuth as *required* would apply to the intermediates too, and CA
/// certificates rarely carry an EKU. So the chain is left to webpki and the
/// leaf's extension is read here, after webpki has verified (and so parsed)
/// the certificate.
#[derive(Debug)]
pub struct ClientAuthOnly {
    inner: Arc<dyn ClientCertVerifier>,
}

/// id-kp-clientAuth, 1.3.6.1.5.5.7.3.2.
const EKU_CLIENT_AUTH: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 2];

/// The extended key usages of a DER certificate: `None` without the
/// extension, else its purposes as OID arcs (the well-known ones first).
pub fn extended_key_usages(cert: &[u8]) -> Result<Option<Vec<Vec<u64>>>, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert).map_err(|e| e.to_string())?;
    let Some(eku) = cert.extended_key_usage().map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let eku = eku.value;
    let known: [(bool, &[u64]); 7] = [
        (eku.any, &[2, 5, 29, 37, 0]),
        (eku.server_auth, &[1, 3, 6, 1, 5, 5, 7, 3, 1]),
        (eku.client_auth, EKU_CLIENT_AUTH),
        (eku.code_signing, &[1, 3, 6, 1, 5, 5, 7, 3, 3]),
        (eku.email_protection, &[1, 3, 6, 1, 5, 5, 7, 3, 4]),
        (eku.time_stamping, &[1, 3, 6, 1, 5, 5, 7, 3, 8]),
        (eku.ocsp_signing, &[1, 3, 6, 1, 5, 5, 7, 3, 9]),
    ];
    let mut purposes: Vec<Vec<u64>> = known
        .iter()
        .filter(|(present, _)| *present)
        .map(|(_, arcs)| arcs.to_vec())
        .collect();
    for oid in &eku.other {
        purposes.push(oid.iter().map(|arcs| arcs.collect()).unwrap_or_default());
    }
    Ok(Some(purposes))
}

fn purpose(arcs: &[u64]) -> ExtendedKeyPurpose {
    match arcs {
        [1, 3, 6, 1, 5, 5, 7, 3, 1] => ExtendedKeyPurpose::ServerAuth,
        [1, 3, 6, 1, 5, 5, 7, 3, 2] => ExtendedKeyPurpose::ClientAuth,
        other => ExtendedKeyPurpose::Other(other.iter().map(|&a| a as usize).collect()),
    }
}

/// Ok when `cert` carries the clientAuth extended key usage.
pub fn check_client_auth(cert: &[u8]) -> Result<(), tokio_rustls::rustls::Error> {
    // webpki has parsed the certificate already: a parse failure here is
    // an encoding webpki tolerates and this reader does not.
    let bad = |_| tokio_rustls::rustls::Error::InvalidCertificate(CertificateError::BadEncoding);
    match extended_key_usages(cert).map_err(bad)? {
        Some(purposes) if purposes.iter().any(|p| p.as_slice() == EKU_CLIENT_AUTH) => Ok(()),
        purposes => Err(tokio_rustls::rustls::Error::InvalidCertificate(
            CertificateError::InvalidPurposeContext {
                required: ExtendedKeyPurpose::ClientAuth,
                presented: purposes
                    .unwrap_or_default()
                    .iter()
                    .map(|p| purpose(p))
                    .collect(),
            },
        )),
    }
}

impl ClientCertVerifier for ClientAuthOnly {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, tokio_rustls::rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_client_auth(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

/// The current server configuration, replaced when the files change.
#[derive(Clone)]
pub struct ReloadingConfig {
    /// A std lock: read once per handshake, written once per rotation.
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ReloadingConfig {
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads the files now (failing if they cannot be loaded) and watches
    /// them every `interval` until the tasks stop, as the background task
    /// `tls-reloader` (one that dies is reported, see [`Tasks`]).
    pub fn watch(files: TlsFiles, interval: Duration, tasks: &Tasks) -> Result<Self, TlsError> {
        let config = files.load()?;
        let reloading = ReloadingConfig {
            current: Arc::new(RwLock::new(config)),
        };
        let current = reloading.current.clone();
        let shutdown = tasks.stop().clone();
        tasks.spawn("tls-reloader", async move {
            let mut seen = files.fingerprint();
            let mut ticker = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let now = files.fingerprint();
                if now == seen {
                    continue;
                }
                match files.load() {
                    Ok(config) => {
                        *current.write().unwrap_or_else(|p| p.into_inner()) = config;
                        seen = now;
                        tracing::info!(cert = %files.cert.display(), "TLS certificates reloaded");
                    }
                    Err(error) => {
                        tracing::warn!(%error, "TLS files changed but do not load; keeping the previous ones");
                    }
                }
            }
        });
        Ok(reloading)
    }
}

/// Why a handshake failed: the `reason` label of
/// `persys_agent_tls_handshake_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Not finished within [`HANDSHAKE_TIMEOUT`].
    Timeout,
    /// Refused by TLS (no, foreign or unfit client certificate, a protocol
    /// error) or closed by the peer.
    Refused,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 2] = [HandshakeFailure::Timeout, HandshakeFailure::Refused];

    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Refused => "refused",
        }
    }
}

/// Which failed handshakes to log: at most one line per peer address per
/// `FAILURE_LOG_PERIOD`, each saying how many were not logged since.
/// Remembers at most `capacity` addresses: entries older than the period
/// are dropped when it is full, and while it is still full (failures from
/// more addresses than that within one period) the failures of addresses it
/// does not hold are only counted, and summed up in one line per period.
#[derive(Debug)]
pub struct FailureLog {
    period: Duration,
    capacity: usize,
    peers: HashMap<IpAddr, Peer>,
    /// Failures of addresses that did not fit, since `others_logged`.
    others: u64,
    others_logged: Option<Instant>,
}

#[derive(Debug)]
struct Peer {
    logged: Instant,
    suppressed: u64,
}

/// What to log for one failure.
#[derive(Debug, PartialEq, Eq)]
pub enum LogDecision {
    /// Log it, with the number of this peer's failures not logged since its
    /// last line.
    Log { suppressed: u64 },
    /// Log a line for the failures of the addresses not remembered.
    Others { failures: u64 },
    /// Nothing.
    Quiet,
}

impl FailureLog {
    pub fn new(period: Duration, capacity: usize) -> Self {
        FailureLog {
            period,
            capacity,
            peers: HashMap::new(),
            others: 0,
            others_logged: None,
        }
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn failure(&mut self, peer: IpAddr, now: Instant) -> LogDecision {
        if let Some(entry) = self.peers.get_mut(&peer) {
            if now.duration_since(entry.logged) < self.period {
                entry.suppressed += 1;
                return LogDecision::Quiet;
            }
            let suppressed = std::mem::take(&mut entry.suppressed);
            entry.logged = now;
            return LogDecision::Log { suppressed };
        }
        if self.peers.len() >= self.capacity {
            let period = self.period;
            self.peers
                .retain(|_, entry| now.duration_since(entry.logged) < period);
        }
        if self.peers.len() < self.capacity {
            self.peers.insert(
                peer,
                Peer {
                    logged: now,
                    suppressed: 0,
                },
            );
            return LogDecision::Log { suppressed: 0 };
        }
        self.others += 1;
        match self.others_logged {
            Some(at) if now.duration_since(at) < self.period => LogDecision::Quiet,
            _ => {
                self.others_logged = Some(now);
                LogDecision::Others {
                    failures: std::mem::take(&mut self.others),
                }
            }
        }
    }
}

/// Counts and logs failed handshakes.
#[derive(Clone)]
pub struct HandshakeFailures {
    counter: Family<ReasonLabels, Counter>,
    log: Arc<Mutex<FailureLog>>,
}

impl HandshakeFailures {
    /// Counting into `counter` (every reason present from the start, at 0).
    pub fn new(counter: Family<ReasonLabels, Counter>) -> Self {
        for reason in HandshakeFailure::ALL {
            let _ = counter.get_or_create(&ReasonLabels {
                reason: reason.label(),
            });
        }
        HandshakeFailures {
            counter,
            log: Arc::new(Mutex::new(FailureLog::new(
                FAILURE_LOG_PERIOD,
                FAILURE_LOG_PEERS,
            ))),
        }
    }

    fn record(
        &self,
        peer: std::net::SocketAddr,
        reason: HandshakeFailure,
        error: &dyn std::fmt::Display,
    ) {
        self.counter
            .get_or_create(&ReasonLabels {
                reason: reason.label(),
            })
            .inc();
        let decision = self
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failure(peer.ip(), Instant::now());
        let reason = reason.label();
        match decision {
            LogDecision::Log { suppressed } => tracing::info!(
                %peer,
                reason,
                %error,
                suppressed,
                "TLS handshake failed (logged at most once a minute per address; `suppressed` failures from it since the last line)"
            ),
            LogDecision::Others { failures } => tracing::warn!(
                failures,
                "TLS handshakes failing from more than {FAILURE_LOG_PEERS} addresses within a minute; failures from the addresses not logged individually"
            ),
            LogDecision::Quiet => {}
        }
    }
}

/// TCP settings of an accepted connection: no Nagle delay, keepalive probes.
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// Accepts TCP connections and completes TLS handshakes concurrently (at
/// most [`MAX_CONCURRENT_HANDSHAKES`] at once), yielding established streams
/// (wrapped so that each response leaves in one write, see [`Coalesced`]).
/// Failed handshakes (no, foreign or unfit client certificate, too slow)
/// are counted, logged (rate-limited) and dropped.
pub fn incoming(
    listener: TcpListener,
    config: ReloadingConfig,
    failures: HandshakeFailures,
    shutdown: CancellationToken,
) -> mpsc::Receiver<Result<Coalesced<Identified<TlsStream<TcpStream>>>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let slot = tokio::select! {
                _ = shutdown.cancelled() => return,
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return,
                },
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            tune(&stream);
            let acceptor = TlsAcceptor::from(config.current());
            let tx = tx.clone();
            let failures = failures.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                drop(slot);
                match handshake {
                    Ok(Ok(tls)) => match Identified::new(tls) {
                        Ok(identified) => {
                            let _ = tx.send(Ok(Coalesced::new(identified))).await;
                        }
                        Err(error) => failures.record(peer, HandshakeFailure::Refused, &error),
                    },
                    Ok(Err(error)) => failures.record(peer, HandshakeFailure::Refused, &error),
                    Err(_) => failures.record(
                        peer,
                        HandshakeFailure::Timeout,
                        &format_args!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
                    ),
                }
            });
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};

    fn cert(ekus: &[ExtendedKeyUsagePurpose]) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["client".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "client");
        params.extended_key_usages = ekus.to_vec();
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_extended_key_usages_are_read_from_the_certificate() {
        assert_eq!(extended_key_usages(&cert(&[])).unwrap(), None);
        assert_eq!(
            extended_key_usages(&cert(&[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth
            ]))
            .unwrap(),
            Some(vec![
                vec![1, 3, 6, 1, 5, 5, 7, 3, 1],
                vec![1, 3, 6, 1, 5, 5, 7, 3, 2]
            ])
        );
        assert!(extended_key_usages(b"\x30\x03\x02\x01\x01").is_err());
        assert!(extended_key_usages(b"").is_err());
    }

    #[test]
    fn only_a_certificate_carrying_client_auth_passes() {
        use ExtendedKeyUsagePurpose::*;
        assert!(check_client_auth(&cert(&[ClientAuth])).is_ok());
        assert!(check_client_auth(&cert(&[ServerAuth, ClientAuth])).is_ok());
        assert!(check_client_auth(&cert(&[Other(vec![1, 3, 6, 1, 4, 1, 99]), ClientAuth])).is_ok());
        let refused = check_client_auth(&cert(&[ServerAuth])).unwrap_err();
        assert_eq!(
            refused,
            tokio_rustls::rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurposeContext {
                    required: ExtendedKeyPurpose::ClientAuth,
                    presented: vec![ExtendedKeyPurpose::ServerAuth],
                }
            )
        );
        // No extension at all: refused too (webpki alone would accept it).
        let refused = check_client_auth(&cert(&[])).unwrap_err();
        assert!(
            refused.to_string().contains("client authentication"),
            "{refused}"
        );
        assert!(check_client_auth(&cert(&[CodeSigning])).is_err());
    }

    #[test]
    fn failures_are_logged_once_a_period_per_address_with_the_count_since() {
        let mut log = FailureLog::new(Duration::from_secs(60), 3);
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(log.failure(a, t0), LogDecision::Log { suppressed: 0 });
        for s in 1..=5 {
            assert_eq!(
                log.failure(a, t0 + Duration::from_secs(s)),
                LogDecision::Quiet
            );
        }
        assert_eq!(log.failure(b, t0), LogDecision::Log { suppressed: 0 });
        assert_eq!(
            log.failure(a, t0 + Duration::from_secs(60)),
            LogDecision::Log { suppressed: 5 }
        );
        assert_eq!(
            log.failure(a, t0 + Duration::from_secs(61)),
            LogDecision::Quiet
        );
    }

    #[test]
    fn the_failure_log_stays_bounded_and_sums_up_the_addresses_it_cannot_hold() {
        let mut log = FailureLog::new(Duration::from_secs(60), 4);
        let t0 = Instant::now();
        let ip = |n: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
        for n in 0..4 {
            assert_eq!(log.failure(ip(n), t0), LogDecision::Log { suppressed: 0 });
        }
        // Full of recent entries: a fifth address is only summed up, once a
        // period.
        assert_eq!(log.failure(ip(4), t0), LogDecision::Others { failures: 1 });
        for n in 5..100 {
            assert_eq!(
                log.failure(ip(n), t0 + Duration::from_secs(1)),
                LogDecision::Quiet
            );
        }
        assert_eq!(log.len(), 4);
        // A period later the old entries make room again...
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(log.failure(ip(200), t1), LogDecision::Log { suppressed: 0 });
        assert_eq!(log.len(), 1);
        // ...and the sum carries what was not logged.
        for n in 300..303 {
            log.failure(ip(n), t1);
        }
        assert_eq!(
            log.failure(ip(400), t1),
            LogDecision::Others { failures: 96 }
        );
        assert!(log.len() <= 4);
    }
}
