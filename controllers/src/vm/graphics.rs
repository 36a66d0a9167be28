//! The password of a VM's VNC or SPICE display. The display listens on
//! 127.0.0.1 only; the password keeps every other local user out too. It
//! is generated once per workload from the kernel's random source, kept in
//! `<state>/vm/<id>/graphics-password` (0600, removed with the workload),
//! handed to libvirt as the `passwd` attribute, and never logged: an
//! operator reads it on the node (or `virsh domdisplay --include-password`).

use std::fmt;
use std::io;
use std::path::Path;

use super::domain_xml::Graphics;

/// The password file, in the VM's state folder.
pub(crate) const PASSWORD_FILE: &str = "graphics-password";

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A display password: shown as `<redacted>` by `Debug`, so a plan that is
/// logged does not carry it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(text: impl Into<String>) -> Password {
        Password(text.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How long the password is: VNC's authentication uses 8 characters and
/// ignores the rest; SPICE takes more.
fn length(kind: Graphics) -> usize {
    match kind {
        Graphics::Vnc => 8,
        Graphics::Spice => 24,
    }
}

/// `length` characters of [`ALPHABET`] from the kernel's random source
/// (rejection sampling, so each is equally likely).
fn generate(length: usize) -> io::Result<String> {
    let limit = (256 / ALPHABET.len() * ALPHABET.len()) as u8;
    let mut out = String::with_capacity(length);
    let mut buffer = [0u8; 64];
    while out.len() < length {
        let filled =
            rustix::rand::getrandom(&mut buffer[..], rustix::rand::GetRandomFlags::empty())?;
        for &byte in &buffer[..filled] {
            if byte < limit && out.len() < length {
                out.push(ALPHABET[byte as usize % ALPHABET.len()] as char);
            }
        }
    }
    Ok(out)
}

/// The VM's display password for `kind`: the one kept in `vm_dir`, or a
/// new one (written 0600) when there is none or it was made for the other
/// kind of display.
pub(crate) async fn ensure_password(vm_dir: &Path, kind: Graphics) -> Result<Password, String> {
    let file = vm_dir.join(PASSWORD_FILE);
    let wanted = length(kind);
    if let Ok(kept) = tokio::fs::read_to_string(&file).await {
        let kept = kept.trim();
        if kept.len() == wanted && kept.bytes().all(|b| ALPHABET.contains(&b)) {
            return Ok(Password::new(kept));
        }
    }
    let password = generate(wanted).map_err(|e| format!("generating the display password: {e}"))?;
    let partial = vm_dir.join(format!("{PASSWORD_FILE}.partial"));
    let text = format!("{password}\n");
    let (written, target) = (partial.clone(), file.clone());
    tokio::task::spawn_blocking(move || -> io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(&written);
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&written)?;
        out.write_all(text.as_bytes())?;
        out.sync_all()?;
        std::fs::rename(&written, &target)
    })
    .await
    .map_err(|e| format!("writing {}: {e}", file.display()))?
    .map_err(|e| format!("writing {}: {e}", file.display()))?;
    Ok(Password::new(password))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_password_is_random_private_kept_and_sized_for_its_display() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let vnc = ensure_password(dir.path(), Graphics::Vnc).await.unwrap();
        assert_eq!(vnc.expose().len(), 8);
        assert_eq!(format!("{vnc:?}"), "<redacted>");
        let file = dir.path().join(PASSWORD_FILE);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            ensure_password(dir.path(), Graphics::Vnc).await.unwrap(),
            vnc,
            "kept across reconciles"
        );
        let spice = ensure_password(dir.path(), Graphics::Spice).await.unwrap();
        assert_eq!(spice.expose().len(), 24);
        assert_eq!(
            std::fs::read_to_string(&file).unwrap().trim(),
            spice.expose()
        );
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            ensure_password(other.path(), Graphics::Spice)
                .await
                .unwrap(),
            spice,
            "each workload has its own"
        );
    }
}
