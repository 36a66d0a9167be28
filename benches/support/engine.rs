//! A counting proxy between the agent and dockerd (each API call counted
//! by method and route), and a process's CPU time and RSS from /proc:
//! shared by the docker_idle and scale benchmarks, included with
//! `#[path = "support/engine.rs"] mod engine;`.
#![allow(dead_code)] // each benchmark uses part of it

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The engine's socket the proxy forwards to.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";

pub type Calls = Arc<Mutex<BTreeMap<String, u64>>>;

/// `GET /v1.41/containers/abc/json` → `GET /containers/{id}/json`.
pub fn route(method: &str, path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    let mut parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts
        .first()
        .is_some_and(|p| p.starts_with('v') && p.contains('.'))
    {
        parts.remove(0);
    }
    let shaped: Vec<String> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if i == 1 && parts[0] == "containers" && !matches!(*p, "json" | "create") {
                "{id}".to_string()
            } else {
                p.to_string()
            }
        })
        .collect();
    format!("{method} /{}", shaped.join("/"))
}

/// Forwards one connection to the engine, counting the requests on it.
pub async fn forward(client: UnixStream, calls: Calls) {
    let Ok(engine) = UnixStream::connect(DOCKER_SOCKET).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut engine_read, mut engine_write) = engine.into_split();
    let upstream = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            for line in String::from_utf8_lossy(&buffer[..n]).split("\r\n") {
                let mut words = line.split(' ');
                if let (Some(method), Some(path), Some(version)) =
                    (words.next(), words.next(), words.next())
                    && version.starts_with("HTTP/1")
                    && matches!(method, "GET" | "POST" | "DELETE" | "HEAD" | "PUT")
                {
                    *calls
                        .lock()
                        .unwrap()
                        .entry(route(method, path))
                        .or_default() += 1;
                }
            }
            if engine_write.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    };
    let downstream = async move {
        let _ = tokio::io::copy(&mut engine_read, &mut client_write).await;
    };
    tokio::join!(upstream, downstream);
}

pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}
