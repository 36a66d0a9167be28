//! Registry credentials for pulls, from a Docker `config.json`, found as
//! the Docker CLI finds them: `credHelpers[registry]` first, then
//! `credsStore`, then the `auths` entry. A helper is run as the CLI runs it:
//! `docker-credential-<name> get`, the server address on stdin, a JSON
//! answer on stdout. The file is read at each pull, so a rotated
//! credential applies at once. Nothing here logs or returns a secret in a
//! message.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use bollard::auth::DockerCredentials;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::image::DEFAULT_REGISTRY;

/// How long a credential helper may take to answer. Helpers that ask a
/// cloud (ECR, GCR) answer in a second or two; one that hangs must not
/// hold a controller slot.
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// The address the Docker CLI stores Docker Hub's credentials under.
const DOCKER_HUB_ADDRESS: &str = "https://index.docker.io/v1/";

/// What a helper answers when it holds nothing for the server: anonymous,
/// as the Docker CLI takes it.
const NOT_FOUND_MESSAGE: &str = "credentials not found in native keychain";

/// Output of a failed helper kept in a message, in bytes.
const MAX_HELPER_OUTPUT: usize = 512;

/// The Docker `config.json` pulls take credentials from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryAuthFile {
    pub path: PathBuf,
    /// Named by the operator (`PERSYS_REGISTRY_AUTH_FILE`): missing at a
    /// pull is an error. Otherwise it is the default location, and missing
    /// means anonymous pulls.
    pub required: bool,
}

/// The credentials found for one registry, and where they came from.
#[derive(Default)]
pub struct Found {
    /// None: pull anonymously.
    pub credentials: Option<DockerCredentials>,
    /// Where they came from (or where none were found), for a message:
    /// the file and the entry or helper, never a secret.
    pub source: String,
}

/// Never the secret, whoever prints it.
impl std::fmt::Debug for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Found")
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .field("source", &self.source)
            .finish()
    }
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
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

/// What a credential helper answers to `get`.
#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(default, rename = "Username")]
    username: String,
    #[serde(default, rename = "Secret")]
    secret: String,
}

/// Where credential helpers are found, and how long they may take.
#[derive(Debug, Clone)]
struct Helpers<'a> {
    /// None: `PATH`, as the Docker CLI looks them up.
    dir: Option<&'a Path>,
    timeout: Duration,
}

/// The credentials for `registry` in the config file `file`.
pub async fn credentials_for(file: &RegistryAuthFile, registry: &str) -> Result<Found, String> {
    let helpers = Helpers {
        dir: None,
        timeout: HELPER_TIMEOUT,
    };
    lookup(file, registry, &helpers).await
}

async fn lookup(
    file: &RegistryAuthFile,
    registry: &str,
    helpers: &Helpers<'_>,
) -> Result<Found, String> {
    let path = file.path.display();
    let bytes = match tokio::fs::read(&file.path).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !file.required => {
            return Ok(Found {
                credentials: None,
                source: format!("no credentials ({path} does not exist)"),
            });
        }
        Err(e) => return Err(format!("reading {path}: {e}")),
    };
    let config: ConfigFile = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{path} is not a Docker config.json: {e}"))?;
    let wanted = normalise(registry);
    let helper = config
        .cred_helpers
        .iter()
        .find(|(key, _)| normalise(key) == wanted)
        .map(|(_, name)| ("credHelpers", name.as_str()))
        .or_else(|| {
            config
                .creds_store
                .as_deref()
                .filter(|name| !name.is_empty())
                .map(|name| ("credsStore", name))
        });
    if let Some((key, name)) = helper {
        let credentials = run_helper(name, registry, helpers)
            .await
            .map_err(|e| format!("{path} ({key}): {e}"))?;
        let source = match &credentials {
            Some(_) => format!("credentials from docker-credential-{name} ({path} {key})"),
            None => format!(
                "no credentials (docker-credential-{name} of {path} {key} has none for {registry})"
            ),
        };
        return Ok(Found {
            credentials,
            source,
        });
    }
    let credentials = from_auths(&config, registry).map_err(|e| format!("{path}: {e}"))?;
    let source = match &credentials {
        Some(_) => format!("credentials from {path} (auths)"),
        None => format!("no credentials (no entry for {registry} in {path})"),
    };
    Ok(Found {
        credentials,
        source,
    })
}

fn from_auths(config: &ConfigFile, registry: &str) -> Result<Option<DockerCredentials>, String> {
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

/// Runs `docker-credential-<name> get` for `registry`, without a shell;
/// `None` when the helper holds nothing for it.
async fn run_helper(
    name: &str,
    registry: &str,
    helpers: &Helpers<'_>,
) -> Result<Option<DockerCredentials>, String> {
    if name.is_empty() || name.contains(['/', '\0']) || name.starts_with('.') {
        return Err(format!("{name:?} is not a credential helper name"));
    }
    let program = format!("docker-credential-{name}");
    let path = match helpers.dir {
        Some(dir) => dir.join(&program),
        None => PathBuf::from(&program),
    };
    // The key the Docker CLI stores (and asks) Docker Hub under.
    let server = match normalise(registry).as_str() {
        DEFAULT_REGISTRY => DOCKER_HUB_ADDRESS,
        _ => registry,
    };
    let mut child = tokio::process::Command::new(&path)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                format!("credential helper {program} is not installed (not found in PATH)")
            }
            _ => format!("running credential helper {program}: {e}"),
        })?;
    let asked = async {
        if let Some(mut stdin) = child.stdin.take() {
            // A helper that exits without reading its input is judged by
            // its exit status and output, not by the broken pipe.
            let _ = stdin.write_all(server.as_bytes()).await;
        }
        child.wait_with_output().await
    };
    let output = tokio::time::timeout(helpers.timeout, asked)
        .await
        .map_err(|_| {
            format!(
                "credential helper {program} did not answer within {}",
                humantime::format_duration(helpers.timeout)
            )
        })?
        .map_err(|e| format!("running credential helper {program}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // Helpers write their error to stdout. It is quoted only when it
        // is not an answer, so a helper that printed credentials and then
        // failed does not put them in a status.
        if stdout.trim() == NOT_FOUND_MESSAGE {
            return Ok(None);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let said = [stderr.trim(), stdout.trim()]
            .into_iter()
            .find(|s| !s.is_empty() && serde_json::from_str::<serde_json::Value>(s).is_err())
            .map(|s| format!(": {}", cut(s, MAX_HELPER_OUTPUT)))
            .unwrap_or_default();
        return Err(format!(
            "credential helper {program} failed ({}){said}",
            output.status
        ));
    }
    let answer: HelperAnswer = serde_json::from_str(stdout.trim()).map_err(|e| {
        // serde_json's message names a position, never the input.
        format!("credential helper {program} answered something other than credentials JSON: {e}")
    })?;
    if answer.username.is_empty() && answer.secret.is_empty() {
        return Ok(None);
    }
    let mut credentials = DockerCredentials {
        serveraddress: Some(registry.to_string()),
        ..Default::default()
    };
    if answer.username == "<token>" {
        credentials.identitytoken = Some(answer.secret);
    } else {
        credentials.username = Some(answer.username);
        credentials.password = Some(answer.secret);
    }
    Ok(Some(credentials))
}

/// `text` cut to at most `max` bytes, at a character boundary, one line.
fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let kept: String = text[..end]
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if end < text.len() {
        format!("{kept}…")
    } else {
        kept
    }
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
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn parse(config: &[u8], registry: &str) -> Result<Option<DockerCredentials>, String> {
        let config: ConfigFile = serde_json::from_slice(config).map_err(|e| e.to_string())?;
        from_auths(&config, registry)
    }

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

    /// A directory with a config file and the helper scripts a test writes.
    struct Setup {
        dir: tempfile::TempDir,
    }

    impl Setup {
        fn new(config: &str) -> Setup {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("config.json"), config).unwrap();
            Setup { dir }
        }

        /// A helper `docker-credential-<name>` running `body` (sh).
        fn helper(self, name: &str, body: &str) -> Setup {
            let path = self.dir.path().join(format!("docker-credential-{name}"));
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            self
        }

        fn file(&self) -> RegistryAuthFile {
            RegistryAuthFile {
                path: self.dir.path().join("config.json"),
                required: true,
            }
        }

        async fn lookup(&self, registry: &str) -> Result<Found, String> {
            self.lookup_within(registry, HELPER_TIMEOUT).await
        }

        async fn lookup_within(&self, registry: &str, timeout: Duration) -> Result<Found, String> {
            let helpers = Helpers {
                dir: Some(self.dir.path()),
                timeout,
            };
            lookup(&self.file(), registry, &helpers).await
        }

        /// What the helpers were asked, one line per `get`.
        fn asked(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("asked")).unwrap_or_default()
        }
    }

    /// A helper that records the server it was asked for (and its
    /// argument) and answers `answer`.
    fn answering(answer: &str) -> String {
        format!(
            "read -r server || true\necho \"$1 $server\" >> \"$(dirname \"$0\")/asked\"\necho '{answer}'"
        )
    }

    #[tokio::test]
    async fn a_registry_s_own_helper_comes_before_the_store_and_the_auths_entry() {
        let setup = Setup::new(
            r#"{"credHelpers": {"r.io": "own"}, "credsStore": "store",
                "auths": {"r.io": {"username": "file", "password": "pw"}}}"#,
        )
        .helper(
            "own",
            &answering(r#"{"ServerURL":"r.io","Username":"bot","Secret":"s3cret"}"#),
        )
        .helper(
            "store",
            &answering(r#"{"ServerURL":"x","Username":"store","Secret":"other"}"#),
        );
        let found = setup.lookup("r.io").await.unwrap();
        let credentials = found.credentials.unwrap();
        assert_eq!(credentials.username.as_deref(), Some("bot"));
        assert_eq!(credentials.password.as_deref(), Some("s3cret"));
        assert_eq!(setup.asked(), "get r.io\n", "one get, the server on stdin");
        assert!(
            found.source.contains("docker-credential-own"),
            "{}",
            found.source
        );
        assert!(!found.source.contains("s3cret"));
        // Another registry goes to the store, before the auths entries.
        let found = setup.lookup("elsewhere.io").await.unwrap();
        assert_eq!(
            found.credentials.unwrap().username.as_deref(),
            Some("store")
        );
    }

    #[tokio::test]
    async fn docker_hub_is_asked_for_under_the_address_the_cli_stores_it() {
        let setup = Setup::new(r#"{"credsStore": "store"}"#).helper(
            "store",
            &answering(r#"{"ServerURL":"","Username":"<token>","Secret":"id-token"}"#),
        );
        let credentials = setup
            .lookup("docker.io")
            .await
            .unwrap()
            .credentials
            .unwrap();
        assert_eq!(setup.asked(), "get https://index.docker.io/v1/\n");
        assert_eq!(credentials.identitytoken.as_deref(), Some("id-token"));
        assert_eq!(credentials.username, None, "<token> is not a user name");
        assert_eq!(credentials.password, None);
    }

    #[tokio::test]
    async fn a_helper_without_credentials_for_the_registry_means_anonymous() {
        let setup = Setup::new(r#"{"credsStore": "store"}"#).helper(
            "store",
            "echo 'credentials not found in native keychain'; exit 1",
        );
        let found = setup.lookup("r.io").await.unwrap();
        assert!(found.credentials.is_none());
        assert!(
            found.source.contains("has none for r.io"),
            "{}",
            found.source
        );
    }

    #[tokio::test]
    async fn a_failing_helper_is_an_error_with_its_own_words_and_never_a_secret() {
        let setup = Setup::new(r#"{"credHelpers": {"r.io": "broken"}}"#)
            .helper("broken", "echo 'keyring locked' >&2; exit 3")
            .helper(
                "leaky",
                r#"echo '{"ServerURL":"r.io","Username":"u","Secret":"s3cret"}'; exit 1"#,
            );
        let error = setup.lookup("r.io").await.unwrap_err();
        assert!(error.contains("docker-credential-broken failed"), "{error}");
        assert!(error.contains("keyring locked"), "{error}");
        assert!(error.contains("config.json (credHelpers)"), "{error}");
        std::fs::write(
            setup.dir.path().join("config.json"),
            r#"{"credHelpers": {"r.io": "leaky"}}"#,
        )
        .unwrap();
        let error = setup.lookup("r.io").await.unwrap_err();
        assert!(error.contains("docker-credential-leaky failed"), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[tokio::test]
    async fn a_missing_hanging_or_garbled_helper_is_an_error_naming_it() {
        let setup = Setup::new(
            r#"{"credHelpers": {"a.io": "absent", "h.io": "hangs", "g.io": "garbled"}}"#,
        )
        .helper("hangs", "exec sleep 60")
        .helper("garbled", "echo 'user=u secret=s3cret'");
        let error = setup.lookup("a.io").await.unwrap_err();
        assert!(
            error.contains("docker-credential-absent is not installed"),
            "{error}"
        );
        let error = setup
            .lookup_within("h.io", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(error.contains("did not answer within 200ms"), "{error}");
        let error = setup.lookup("g.io").await.unwrap_err();
        assert!(error.contains("other than credentials JSON"), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[tokio::test]
    async fn a_helper_name_cannot_reach_outside_the_helpers() {
        let setup = Setup::new(r#"{"credsStore": "../../bin/sh"}"#);
        let error = setup.lookup("r.io").await.unwrap_err();
        assert!(error.contains("is not a credential helper name"), "{error}");
    }

    #[tokio::test]
    async fn a_named_file_must_be_readable_and_the_default_one_may_be_absent() {
        let setup = Setup::new("{not json");
        let error = setup.lookup("r.io").await.unwrap_err();
        assert!(
            error.contains("config.json is not a Docker config.json"),
            "{error}"
        );
        let missing = setup.dir.path().join("nope.json");
        let named = RegistryAuthFile {
            path: missing.clone(),
            required: true,
        };
        let error = credentials_for(&named, "r.io").await.unwrap_err();
        assert!(error.contains("nope.json"), "{error}");
        let default = RegistryAuthFile {
            path: missing,
            required: false,
        };
        let found = credentials_for(&default, "r.io").await.unwrap();
        assert!(found.credentials.is_none());
    }
}
