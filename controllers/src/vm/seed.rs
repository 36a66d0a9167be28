//! The cloud-init NoCloud seed: an ISO 9660 image with the volume id
//! `cidata` holding `user-data`, `meta-data` and, when given,
//! `network-config` and `vendor-data`. Built under `<state>/vm/<id>/`,
//! rebuilt only when its content changes.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use persys_api::v1::VmSpec;
use sha2::{Digest, Sha256};

use super::errors::SpecError;
use crate::policy::{ALWAYS, refusal};

pub(crate) const SEED_FILE: &str = "seed.iso";
/// The largest user-data (and vendor-data) a seed carries, decoded: the
/// Go agent's limit, so a spec it accepted is accepted here.
pub const MAX_USER_DATA_BYTES: usize = 256 * 1024;
/// Holds the digest of the content the ISO was built from.
const DIGEST_FILE: &str = "seed.iso.sha256";
const BUILD_TIMEOUT: Duration = Duration::from_secs(60);

/// The files of a seed, decoded and completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SeedContent {
    pub(crate) user_data: String,
    pub(crate) meta_data: String,
    pub(crate) network_config: Option<String>,
    pub(crate) vendor_data: Option<String>,
}

/// Text sent as base64 (what the scheduler sends) or plain. User-data in
/// any of cloud-init's formats holds a character base64 never uses (`#`,
/// `:` or a space: `#cloud-config`, `#!`, `Content-Type:`), so the two
/// cannot be confused.
pub(crate) fn decode_text(field: &str, text: &str) -> Result<String, SpecError> {
    let trimmed = text.trim();
    let looks_base64 = !trimmed.is_empty()
        && trimmed
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '\n' | '\r'));
    if !looks_base64 {
        return Ok(text.to_string());
    }
    let compact: String = trimmed.split_whitespace().collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(compact.as_bytes()))
        .map_err(|e| {
            SpecError::new(
                field,
                format!("is neither cloud-init text nor base64 ({e})"),
            )
        })?;
    String::from_utf8(bytes)
        .map_err(|_| SpecError::new(field, "decodes from base64 to something that is not UTF-8"))
}

/// The seed a spec asks for: none without `cloud_init` or
/// `cloud_init_config`. `cloud_init_config.user_data` wins over
/// `cloud_init`. Meta-data gets an `instance-id` (the workload id and a
/// digest of the content, so changed user-data is a new instance to
/// cloud-init and runs again) and a `local-hostname` unless it has them.
pub(crate) fn seed_content(
    id: &str,
    hostname: &str,
    spec: &VmSpec,
) -> Result<Option<SeedContent>, SpecError> {
    let config = spec.cloud_init_config.clone().unwrap_or_default();
    let optional = |field: &str, text: &str| -> Result<Option<String>, SpecError> {
        if text.trim().is_empty() {
            Ok(None)
        } else {
            decode_text(field, text).map(Some)
        }
    };
    let user_data = match optional("spec.vm.cloud_init_config.user_data", &config.user_data)? {
        Some(text) => {
            capped("spec.vm.cloud_init_config.user_data", "user-data", &text)?;
            Some(text)
        }
        None => {
            let text = optional("spec.vm.cloud_init", &spec.cloud_init)?;
            if let Some(text) = &text {
                capped("spec.vm.cloud_init", "user-data", text)?;
            }
            text
        }
    };
    let meta_data = optional("spec.vm.cloud_init_config.meta_data", &config.meta_data)?;
    let network_config = optional(
        "spec.vm.cloud_init_config.network_config",
        &config.network_config,
    )?;
    let vendor_data = optional("spec.vm.cloud_init_config.vendor_data", &config.vendor_data)?;
    if let Some(text) = &vendor_data {
        capped("spec.vm.cloud_init_config.vendor_data", "vendor-data", text)?;
    }
    if user_data.is_none()
        && meta_data.is_none()
        && network_config.is_none()
        && vendor_data.is_none()
    {
        return Ok(None);
    }
    let user_data = user_data.unwrap_or_else(|| "#cloud-config\n{}\n".to_string());

    let mut digest = Sha256::new();
    for part in [
        Some(&user_data),
        meta_data.as_ref(),
        network_config.as_ref(),
        vendor_data.as_ref(),
    ] {
        digest.update(part.map(String::as_bytes).unwrap_or(b"\0none"));
        digest.update(b"\0");
    }
    let instance_id = format!("{id}-{}", &hex(&digest.finalize())[..12]);
    let meta_data = complete_meta_data(meta_data.as_deref(), &instance_id, hostname);
    Ok(Some(SeedContent {
        user_data,
        meta_data,
        network_config,
        vendor_data,
    }))
}

/// Refuses `what` (decoded) over [`MAX_USER_DATA_BYTES`], with the figures.
fn capped(field: &str, what: &str, text: &str) -> Result<(), SpecError> {
    if text.len() <= MAX_USER_DATA_BYTES {
        return Ok(());
    }
    Err(SpecError::new(
        field,
        refusal(
            format_args!(
                "{what} is {} bytes decoded, over the limit of {MAX_USER_DATA_BYTES} bytes (256 KiB)",
                text.len()
            ),
            ALWAYS,
        ),
    ))
}

/// Adds `instance-id` and `local-hostname` to YAML meta-data that lacks
/// them; JSON meta-data is left as it is.
fn complete_meta_data(given: Option<&str>, instance_id: &str, hostname: &str) -> String {
    let given = given.unwrap_or("");
    if given.trim_start().starts_with('{') {
        return given.to_string();
    }
    let has = |key: &str| given.lines().any(|l| l.starts_with(&format!("{key}:")));
    let mut out = String::new();
    if !has("instance-id") {
        out.push_str(&format!("instance-id: {instance_id}\n"));
    }
    if !has("local-hostname") {
        out.push_str(&format!("local-hostname: {hostname}\n"));
    }
    out.push_str(given);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl SeedContent {
    /// A digest of every file, names included.
    pub(crate) fn digest(&self) -> String {
        let mut digest = Sha256::new();
        for (name, text) in self.files() {
            digest.update(name.as_bytes());
            digest.update(b"\0");
            digest.update(text.as_bytes());
            digest.update(b"\0");
        }
        hex(&digest.finalize())
    }

    fn files(&self) -> Vec<(&'static str, &str)> {
        let mut files = vec![
            ("user-data", self.user_data.as_str()),
            ("meta-data", self.meta_data.as_str()),
        ];
        if let Some(text) = &self.network_config {
            files.push(("network-config", text));
        }
        if let Some(text) = &self.vendor_data {
            files.push(("vendor-data", text));
        }
        files
    }
}

/// Makes sure `<vm_dir>/seed.iso` holds `content`: builds it when it is
/// missing or was built from something else. Returns the ISO's path and
/// whether it was (re)built. The ISO is replaced by a rename, so a guest
/// that has the old one open keeps reading the old one.
pub(crate) async fn ensure_seed(
    vm_dir: &Path,
    content: &SeedContent,
) -> Result<(PathBuf, bool), String> {
    let iso = vm_dir.join(SEED_FILE);
    let digest_file = vm_dir.join(DIGEST_FILE);
    let digest = content.digest();
    let built = tokio::fs::read_to_string(&digest_file).await.ok();
    if built.as_deref().map(str::trim) == Some(digest.as_str())
        && tokio::fs::metadata(&iso).await.is_ok_and(|m| m.is_file())
    {
        return Ok((iso, false));
    }
    let files = vm_dir.join("seed");
    let io_error = |what: &str, e: io::Error| format!("{what}: {e}");
    let partial = vm_dir.join("seed.iso.partial");
    let _ = tokio::fs::remove_file(&partial).await;
    let built = build_seed(&files, content, &partial).await;
    // The files hold user-data in clear: they go as soon as the ISO is made.
    let _ = tokio::fs::remove_dir_all(&files).await;
    if let Err(error) = built {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(error);
    }
    tokio::fs::rename(&partial, &iso)
        .await
        .map_err(|e| io_error("installing seed.iso", e))?;
    tokio::fs::write(&digest_file, format!("{digest}\n"))
        .await
        .map_err(|e| io_error("recording the seed digest", e))?;
    Ok((iso, true))
}

/// Writes the seed's files (0600, in a 0700 folder) and builds the ISO
/// from them at `output`, made 0600: it carries user-data in clear.
async fn build_seed(files: &Path, content: &SeedContent, output: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let io_error = |what: &str, e: io::Error| format!("{what}: {e}");
    let _ = tokio::fs::remove_dir_all(files).await;
    tokio::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(files)
        .await
        .map_err(|e| io_error("creating the seed folder", e))?;
    let mut names = Vec::new();
    for (name, text) in content.files() {
        write_private(&files.join(name), text.as_bytes())
            .await
            .map_err(|e| io_error(&format!("writing {name}"), e))?;
        names.push(name);
    }
    build_iso(files, &names, output).await?;
    tokio::fs::set_permissions(output, std::fs::Permissions::from_mode(0o600))
        .await
        .map_err(|e| io_error("restricting seed.iso to its owner", e))
}

/// Writes a new file readable by its owner only.
async fn write_private(path: &Path, content: &[u8]) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .await?;
    file.write_all(content).await?;
    file.flush().await
}

/// The ISO tools, in order of preference: `genisoimage`, `xorriso -as
/// mkisofs`, `mkisofs`, then `cloud-localds`.
async fn build_iso(files: &Path, names: &[&str], output: &Path) -> Result<(), String> {
    let mkisofs_args = |command: &mut tokio::process::Command| {
        command
            .arg("-output")
            .arg(output)
            .args(["-volid", "cidata", "-joliet", "-rock", "-quiet"])
            .args(names)
            .current_dir(files);
    };
    let mut tried = Vec::new();
    for tool in ["genisoimage", "xorriso", "mkisofs"] {
        let mut command = tokio::process::Command::new(tool);
        if tool == "xorriso" {
            command.args(["-as", "mkisofs"]);
        }
        mkisofs_args(&mut command);
        match run(command).await {
            Ok(()) => return Ok(()),
            Err(None) => tried.push(tool),
            Err(Some(error)) => return Err(format!("{tool}: {error}")),
        }
    }
    if !names.contains(&"vendor-data") {
        let mut command = tokio::process::Command::new("cloud-localds");
        if names.contains(&"network-config") {
            command.arg(format!(
                "--network-config={}",
                files.join("network-config").display()
            ));
        }
        command
            .arg(output)
            .arg(files.join("user-data"))
            .arg(files.join("meta-data"));
        match run(command).await {
            Ok(()) => return Ok(()),
            Err(None) => tried.push("cloud-localds"),
            Err(Some(error)) => return Err(format!("cloud-localds: {error}")),
        }
    }
    Err(format!(
        "no ISO tool found to build the cloud-init seed (tried {}); install genisoimage",
        tried.join(", ")
    ))
}

/// Runs a tool: `Err(None)` when it is not installed.
async fn run(mut command: tokio::process::Command) -> Result<(), Option<String>> {
    command
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(BUILD_TIMEOUT, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => return Err(None),
        Ok(Err(e)) => return Err(Some(e.to_string())),
        Err(_) => return Err(Some(format!("did not finish in {BUILD_TIMEOUT:?}"))),
    };
    if output.status.success() {
        Ok(())
    } else {
        Err(Some(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use persys_api::v1::CloudInitConfig;

    fn spec(cloud_init: &str, config: Option<CloudInitConfig>) -> VmSpec {
        VmSpec {
            cloud_init: cloud_init.into(),
            cloud_init_config: config,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_seed_iso_is_owner_only_and_its_clear_files_do_not_stay() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let content = SeedContent {
            user_data: "#cloud-config\npassword: s3cret-seed\n".into(),
            meta_data: "instance-id: i-1\n".into(),
            network_config: None,
            vendor_data: None,
        };
        let (iso, built) = match ensure_seed(dir.path(), &content).await {
            Ok(done) => done,
            Err(error) if error.contains("no ISO tool") => {
                eprintln!("skipped: {error}");
                return;
            }
            Err(error) => panic!("{error}"),
        };
        assert!(built);
        assert_eq!(iso, dir.path().join(SEED_FILE));
        let mode = std::fs::metadata(&iso).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!dir.path().join("seed").exists(), "clear files removed");
        assert!(!dir.path().join("seed.iso.partial").exists());
    }

    #[test]
    fn user_data_is_accepted_as_base64_or_plain_text() {
        let plain = "#cloud-config\npackages: [htop]\n";
        assert_eq!(decode_text("f", plain).unwrap(), plain);
        let encoded = base64::engine::general_purpose::STANDARD.encode(plain);
        assert_eq!(decode_text("f", &encoded).unwrap(), plain);
        let wrapped = format!("{}\n{}", &encoded[..20], &encoded[20..]);
        assert_eq!(decode_text("f", &wrapped).unwrap(), plain);
        assert!(
            decode_text("f", "abc").is_err(),
            "not base64 and not cloud-init"
        );
    }

    #[test]
    fn no_cloud_init_means_no_seed() {
        assert_eq!(seed_content("w", "w", &spec("", None)).unwrap(), None);
        assert_eq!(
            seed_content("w", "w", &spec("  ", Some(CloudInitConfig::default()))).unwrap(),
            None
        );
    }

    #[test]
    fn meta_data_gets_an_instance_id_that_follows_the_content_and_a_hostname() {
        let first = seed_content("web", "web-vm", &spec("#cloud-config\n", None))
            .unwrap()
            .unwrap();
        assert!(
            first.meta_data.starts_with("instance-id: web-"),
            "{}",
            first.meta_data
        );
        assert!(first.meta_data.contains("local-hostname: web-vm\n"));
        let again = seed_content("web", "web-vm", &spec("#cloud-config\n", None))
            .unwrap()
            .unwrap();
        assert_eq!(first, again, "the same spec gives the same seed");
        let changed = seed_content("web", "web-vm", &spec("#cloud-config\nx: 1\n", None))
            .unwrap()
            .unwrap();
        assert_ne!(first.meta_data, changed.meta_data);
        assert_ne!(first.digest(), changed.digest());
    }

    #[test]
    fn the_full_config_wins_and_keeps_its_own_meta_data_keys() {
        let config = CloudInitConfig {
            user_data: "#cloud-config\nfrom: config\n".into(),
            meta_data: "instance-id: mine\nlocal-hostname: box\n".into(),
            network_config: "version: 2\n".into(),
            vendor_data: String::new(),
        };
        let content = seed_content(
            "w",
            "w",
            &spec("#cloud-config\nfrom: field\n", Some(config)),
        )
        .unwrap()
        .unwrap();
        assert_eq!(content.user_data, "#cloud-config\nfrom: config\n");
        assert_eq!(
            content.meta_data,
            "instance-id: mine\nlocal-hostname: box\n"
        );
        assert_eq!(content.network_config.as_deref(), Some("version: 2\n"));
        assert_eq!(content.vendor_data, None);
    }

    #[test]
    fn user_data_over_256_kib_is_refused_naming_the_field_and_the_figures() {
        let at_limit = format!("#cloud-config\n#{}\n", "x".repeat(MAX_USER_DATA_BYTES - 16));
        assert_eq!(at_limit.len(), MAX_USER_DATA_BYTES);
        assert!(seed_content("w", "w", &spec(&at_limit, None)).is_ok());
        let over = format!("{at_limit}#");
        let error = seed_content("w", "w", &spec(&over, None)).unwrap_err();
        assert_eq!(error.field, "spec.vm.cloud_init");
        assert!(
            error
                .message
                .contains("262145 bytes decoded, over the limit of 262144 bytes"),
            "{error}"
        );
        // Counted decoded: base64 of the limit is a third longer and passes.
        let encoded = base64::engine::general_purpose::STANDARD.encode(&at_limit);
        assert!(seed_content("w", "w", &spec(&encoded, None)).is_ok());
        let config = CloudInitConfig {
            user_data: over.clone(),
            ..Default::default()
        };
        let error = seed_content("w", "w", &spec("", Some(config))).unwrap_err();
        assert_eq!(error.field, "spec.vm.cloud_init_config.user_data");
        let config = CloudInitConfig {
            vendor_data: over,
            ..Default::default()
        };
        let error = seed_content("w", "w", &spec("", Some(config))).unwrap_err();
        assert_eq!(error.field, "spec.vm.cloud_init_config.vendor_data");
    }
}
