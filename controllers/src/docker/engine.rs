//! The connection to the Docker engine.

use std::fmt;
use std::sync::{Arc, RwLock};

use bollard::Docker;
use bollard::errors::Error as EngineError;

/// Where the engine listens when neither the config nor `DOCKER_HOST` say.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// A lazily connected, version-negotiated engine client; cheap to clone.
///
/// The agent must start (and report `Unknown`) while the engine is down, but
/// bollard refuses to build a unix-socket client whose socket does not exist
/// yet; so the client is built on first use and kept once the API version
/// has been negotiated (this engine speaks 1.41, bollard defaults to 1.53).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    /// `unix:///var/run/docker.sock`, `tcp://…`.
    host: String,
    /// A std lock: held only to copy the client out, never across an await.
    client: RwLock<Option<Docker>>,
    /// One connection attempt at a time: reconciles that find no client
    /// together (at start, after an outage) wait for one negotiation
    /// instead of each making their own.
    connecting: tokio::sync::Mutex<()>,
}

/// What the engine says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineVersion {
    pub version: String,
    pub api_version: String,
}

impl fmt::Display for EngineVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "docker {} (API {})", self.version, self.api_version)
    }
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("host", &self.inner.host)
            .finish()
    }
}

impl Engine {
    /// An engine at `host`; without one, `DOCKER_HOST` or the default socket.
    pub fn new(host: Option<String>) -> Engine {
        let host = host
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| DEFAULT_HOST.to_string());
        Engine {
            inner: Arc::new(EngineInner {
                host,
                client: RwLock::new(None),
                connecting: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn host(&self) -> &str {
        &self.inner.host
    }

    fn connected(&self) -> Option<Docker> {
        self.inner
            .client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The client, connecting and negotiating the API version on first use.
    pub async fn client(&self) -> Result<Docker, EngineError> {
        if let Some(client) = self.connected() {
            return Ok(client);
        }
        let _connecting = self.inner.connecting.lock().await;
        // Another caller may have connected while this one waited.
        if let Some(client) = self.connected() {
            return Ok(client);
        }
        let client = Docker::connect_with_host(&self.inner.host)?
            .negotiate_version()
            .await?;
        let version = client.client_version();
        tracing::info!(host = %self.inner.host, api_version = %version, "connected to the docker engine");
        *self.inner.client.write().unwrap_or_else(|p| p.into_inner()) = Some(client.clone());
        Ok(client)
    }

    /// Asks the engine who it is: the health probe.
    pub async fn version(&self) -> Result<EngineVersion, EngineError> {
        let version = self.client().await?.version().await?;
        Ok(EngineVersion {
            version: version.version.unwrap_or_default(),
            api_version: version.api_version.unwrap_or_default(),
        })
    }
}
