//! Mutual TLS with certificates reloaded from disk.
//!
//! The server's rustls configuration is rebuilt whenever the certificate,
//! key or CA file changes; new connections use the new one, established
//! connections keep theirs. A file that fails to load (half-written during a
//! rotation) keeps the previous configuration until it loads.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use super::authz::Identified;
use super::coalesce::Coalesced;

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError(format!("client verifier: {e}")))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .with_client_cert_verifier(verifier)
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
    /// them every `interval` until `shutdown`.
    pub fn watch(
        files: TlsFiles,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> Result<Self, TlsError> {
        let config = files.load()?;
        let reloading = ReloadingConfig {
            current: Arc::new(RwLock::new(config)),
        };
        let current = reloading.current.clone();
        tokio::spawn(async move {
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

/// Accepts TCP connections and completes TLS handshakes concurrently,
/// yielding established streams (wrapped so that each response leaves in
/// one write, see [`Coalesced`]). Failed handshakes (no or foreign client
/// certificate) are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    config: ReloadingConfig,
    shutdown: CancellationToken,
) -> mpsc::Receiver<Result<Coalesced<Identified<TlsStream<tokio::net::TcpStream>>>, std::io::Error>>
{
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
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
            let _ = stream.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => match Identified::new(tls) {
                        Ok(identified) => {
                            let _ = tx.send(Ok(Coalesced::new(identified))).await;
                        }
                        Err(error) => tracing::info!(%peer, %error, "TLS client refused"),
                    },
                    Ok(Err(error)) => {
                        tracing::info!(%peer, %error, "TLS handshake refused");
                    }
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}
