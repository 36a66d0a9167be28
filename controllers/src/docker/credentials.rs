//! Registry credentials for pulls, from a docker `config.json`.
//!
//! Only the `auths` section is read (what `docker login` writes without a
//! credential helper); `credsStore` / `credHelpers` are not supported. The
//! file is read at each pull, so a rotated credential applies at once.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine as _;
use bollard::auth::DockerCredentials;
use serde::Deserialize;

use super::image::DEFAULT_REGISTRY;

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    /// base64 of `user:password`.
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// The credentials for `registry` in the config file at `path`; none when
/// the file or an entry for the registry is missing.
pub async fn credentials_for(
    path: &Path,
    registry: &str,
) -> Result<Option<DockerCredentials>, String> {
    let bytes = match tokio::fs::read(path).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    parse(&bytes, registry).map_err(|e| format!("{}: {e}", path.display()))
}

fn parse(bytes: &[u8], registry: &str) -> Result<Option<DockerCredentials>, String> {
    let config: ConfigFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let wanted = normalise(registry);
    let Some(entry) = config
        .auths
        .iter()
        .find(|(key, _)| normalise(key) == wanted)
        .map(|(_, entry)| entry)
    else {
        return Ok(None);
    };
    let (mut username, mut password) = (entry.username.clone(), entry.password.clone());
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| format!("auths[{registry}].auth is not base64: {e}"))?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| format!("auths[{registry}].auth is not UTF-8"))?;
        let (user, pass) = decoded
            .split_once(':')
            .ok_or_else(|| format!("auths[{registry}].auth is not user:password"))?;
        username = Some(user.to_string());
        password = Some(pass.to_string());
    }
    Ok(Some(DockerCredentials {
        username,
        password,
        serveraddress: Some(registry.to_string()),
        identitytoken: entry.identitytoken.clone(),
        registrytoken: entry.registrytoken.clone(),
        ..Default::default()
    }))
}

/// `https://index.docker.io/v1/` and `docker.io` are the same registry;
/// a scheme and a path do not matter.
fn normalise(registry: &str) -> String {
    let without_scheme = registry
        .strip_prefix("https://")
        .or_else(|| registry.strip_prefix("http://"))
        .unwrap_or(registry);
    let host = without_scheme
        .split('/')
        .next()
        .unwrap_or(without_scheme)
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DEFAULT_REGISTRY.to_string()
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_entries_are_found_by_normalised_registry() {
        let config = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "dXNlcjpzM2NyZXQ6eA=="},
            "registry.local:5000": {"username": "bot", "password": "pw"}
        }}"#;
        let hub = parse(config, "docker.io").unwrap().unwrap();
        assert_eq!(hub.username.as_deref(), Some("user"));
        assert_eq!(hub.password.as_deref(), Some("s3cret:x"));
        let local = parse(config, "registry.local:5000").unwrap().unwrap();
        assert_eq!(local.username.as_deref(), Some("bot"));
        assert!(parse(config, "elsewhere.io").unwrap().is_none());
    }

    #[test]
    fn a_malformed_auth_is_an_error_not_anonymous() {
        let config = br#"{"auths": {"r.io": {"auth": "%%%"}}}"#;
        assert!(parse(config, "r.io").is_err());
    }
}
