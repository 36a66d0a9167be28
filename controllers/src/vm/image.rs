//! What an image file really is, from `qemu-img info --output=json`, and
//! the rules it must pass before it is attached: its format is the one the
//! spec declares (a raw file is never taken for a qcow2, nor the other way
//! round), and whatever else qemu would open through it (a backing file,
//! an external data file) lies in the workload's own directory, so a disk
//! cannot reach a host device or another workload's image.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::disks::DiskFormat;
use super::errors::SpecError;
use crate::policy::{ALWAYS, refusal};

/// `qemu-img info` reads a header; this only bounds a hang (a file on a
/// dead network mount).
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// How many images deep a backing chain may go.
const MAX_CHAIN: usize = 8;

/// The part of `qemu-img info --output=json` the rules read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ImageInfo {
    /// `qcow2`, `raw` (an ISO is `raw`), `vmdk`…
    pub format: String,
    /// The backing file as the image names it.
    #[serde(rename = "backing-filename")]
    pub backing_filename: Option<String>,
    /// The same, resolved by qemu against the image's folder.
    #[serde(rename = "full-backing-filename")]
    pub full_backing_filename: Option<String>,
    /// The backing file's format as the image names it.
    #[serde(rename = "backing-filename-format")]
    pub backing_format: Option<String>,
    #[serde(rename = "format-specific")]
    pub format_specific: Option<FormatSpecific>,
}

/// `format-specific`: for qcow2, where an external data file is named.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct FormatSpecific {
    #[serde(default)]
    pub data: Option<FormatData>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct FormatData {
    #[serde(rename = "data-file")]
    pub data_file: Option<String>,
}

impl ImageInfo {
    pub fn parse(json: &[u8]) -> Result<ImageInfo, String> {
        serde_json::from_slice(json).map_err(|e| format!("reading qemu-img's answer: {e}"))
    }

    fn backing(&self) -> Option<&str> {
        self.full_backing_filename
            .as_deref()
            .or(self.backing_filename.as_deref())
            .filter(|b| !b.is_empty())
    }

    fn data_file(&self) -> Option<&str> {
        self.format_specific
            .as_ref()?
            .data
            .as_ref()?
            .data_file
            .as_deref()
            .filter(|d| !d.is_empty())
    }
}

/// Runs `qemu-img info --output=json -U` on `path` (`-U`: a running guest
/// holds a write lock on its images; reading the header is safe).
pub async fn probe(path: &Path) -> Result<ImageInfo, String> {
    let mut command = tokio::process::Command::new("qemu-img");
    command
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(PROBE_TIMEOUT, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {
            return Err("qemu-img is not installed (Debian: qemu-utils)".into());
        }
        Ok(Err(e)) => return Err(format!("running qemu-img: {e}")),
        Err(_) => return Err(format!("qemu-img info did not finish in {PROBE_TIMEOUT:?}")),
    };
    if !output.status.success() {
        return Err(format!(
            "qemu-img info {} failed ({}): {}",
            path.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    ImageInfo::parse(&output.stdout)
}

/// Why an image cannot be attached: a rule it breaks (the spec's to fix),
/// or a probe that failed (worth retrying).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRefusal {
    Rule(SpecError),
    Probe(String),
}

/// Probes `path` and checks it as the disk `field` (`spec.vm.disks[0]`)
/// declared `format`, following its backing chain inside `workload_dir`.
pub async fn check_image(
    field: &str,
    path: &Path,
    format: DiskFormat,
    workload_dir: &Path,
) -> Result<(), ImageRefusal> {
    let mut image = path.to_path_buf();
    let mut declared = format.driver_type().to_string();
    for depth in 0..MAX_CHAIN {
        let info = probe(&image).await.map_err(ImageRefusal::Probe)?;
        match check_info(field, &image, depth == 0, &declared, &info, workload_dir)
            .map_err(ImageRefusal::Rule)?
        {
            Next::Done => return Ok(()),
            Next::Backing { path, format } => {
                image = path;
                declared = format;
            }
        }
    }
    Err(ImageRefusal::Rule(SpecError::new(
        format!("{field}.path"),
        refusal(
            format_args!(
                "the backing chain of {} is more than {MAX_CHAIN} images deep",
                path.display()
            ),
            ALWAYS,
        ),
    )))
}

/// What to look at after one image of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Done,
    /// Its backing file, which must be of `format`.
    Backing {
        path: PathBuf,
        format: String,
    },
}

/// The rules for one image of a chain (`top`: the disk itself, else one
/// of its backing files):
/// its format is `declared`; a backing file or data file is a regular file
/// in `workload_dir`; a backing file names its format (else qemu would
/// guess it from the file's contents).
pub fn check_info(
    field: &str,
    image: &Path,
    top: bool,
    declared: &str,
    info: &ImageInfo,
    workload_dir: &Path,
) -> Result<Next, SpecError> {
    let format_field = format!("{field}.format");
    let path_field = format!("{field}.path");
    if info.format != declared {
        let found = match info.format.as_str() {
            "" => "of an unknown format",
            known => known,
        };
        let shown = image.display();
        let (field, message) = if top {
            (
                format_field,
                format!(
                    "{shown} is {found} but is declared {declared}; the declared format must be the image's"
                ),
            )
        } else {
            (
                path_field,
                format!("the backing file {shown} is {found} but its image names it {declared}"),
            )
        };
        return Err(SpecError::new(field, refusal(message, ALWAYS)));
    }
    if let Some(data_file) = info.data_file() {
        contained(&path_field, image, "data file", data_file, workload_dir)?;
    }
    let Some(backing) = info.backing() else {
        return Ok(Next::Done);
    };
    let backing_path = contained(&path_field, image, "backing file", backing, workload_dir)?;
    let Some(format) = info.backing_format.clone().filter(|f| !f.is_empty()) else {
        return Err(SpecError::new(
            path_field,
            refusal(
                format_args!(
                    "{} names its backing file {} without its format; qemu would guess it from the file's contents",
                    image.display(),
                    backing_path.display()
                ),
                ALWAYS,
            ),
        ));
    };
    Ok(Next::Backing {
        path: backing_path,
        format,
    })
}

/// Resolves a file an image refers to (`kind`: backing file, data file)
/// against the image's folder, and requires it to be a regular file in
/// `workload_dir`. Returns it resolved.
fn contained(
    field: &str,
    image: &Path,
    kind: &str,
    named: &str,
    workload_dir: &Path,
) -> Result<PathBuf, SpecError> {
    let refuse = |why: String| {
        Err(SpecError::new(
            field,
            refusal(
                format_args!(
                    "{} has the {kind} {named:?}, which {why}; a {kind} must lie in the workload's own directory {}",
                    image.display(),
                    workload_dir.display()
                ),
                ALWAYS,
            ),
        ))
    };
    // `json:{…}` and `nbd://…`: not a file at all.
    if named.starts_with("json:") || named.contains("://") {
        return refuse("is not a file".into());
    }
    let joined = match image.parent() {
        Some(folder) => folder.join(named),
        None => PathBuf::from(named),
    };
    let Ok(resolved) = joined.canonicalize() else {
        return refuse("does not exist".into());
    };
    let inside = workload_dir
        .canonicalize()
        .is_ok_and(|dir| resolved.starts_with(&dir) && resolved != dir);
    if !inside {
        return refuse(format!("resolves to {}", resolved.display()));
    }
    if !std::fs::metadata(&resolved).is_ok_and(|m| m.is_file()) {
        return refuse("is not a regular file".into());
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(format: &str, backing: Option<&str>, backing_format: Option<&str>) -> ImageInfo {
        ImageInfo {
            format: format.into(),
            backing_filename: backing.map(String::from),
            full_backing_filename: None,
            backing_format: backing_format.map(String::from),
            format_specific: None,
        }
    }

    #[test]
    fn qemu_img_json_is_read_for_format_backing_file_and_data_file() {
        let json = br#"{"virtual-size": 1073741824, "filename": "/x/a.qcow2",
            "format": "qcow2", "backing-filename": "base.qcow2",
            "full-backing-filename": "/x/base.qcow2", "backing-filename-format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
            "data-file": "/dev/sda", "lazy-refcounts": false}}}"#;
        let info = ImageInfo::parse(json).unwrap();
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.backing(), Some("/x/base.qcow2"));
        assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(info.data_file(), Some("/dev/sda"));
        let raw = ImageInfo::parse(br#"{"format": "raw", "virtual-size": 1}"#).unwrap();
        assert_eq!((raw.backing(), raw.data_file()), (None, None));
    }

    #[test]
    fn formats_must_match_and_backing_files_stay_in_the_workload_directory() {
        let dir = tempfile::tempdir().unwrap();
        let workload = dir.path().join("vm/web");
        std::fs::create_dir_all(&workload).unwrap();
        std::fs::write(workload.join("base.qcow2"), b"").unwrap();
        std::fs::write(dir.path().join("outside.qcow2"), b"").unwrap();
        let image = workload.join("top.qcow2");
        let f = "spec.vm.disks[0]";
        let check = |declared: &str, info: &ImageInfo| {
            check_info(f, &image, true, declared, info, &workload)
        };

        assert_eq!(check("qcow2", &info("qcow2", None, None)), Ok(Next::Done));
        let error = check("qcow2", &info("raw", None, None)).unwrap_err();
        assert_eq!(error.field, "spec.vm.disks[0].format");
        assert!(
            error.message.contains("is raw but is declared qcow2"),
            "{error}"
        );
        assert!(error.message.contains("whatever the policy"), "{error}");

        // A relative name resolves against the image's folder.
        assert_eq!(
            check("qcow2", &info("qcow2", Some("base.qcow2"), Some("qcow2"))),
            Ok(Next::Backing {
                path: workload.canonicalize().unwrap().join("base.qcow2"),
                format: "qcow2".into()
            })
        );
        for (backing, why) in [
            ("../../outside.qcow2", "resolves to"),
            ("/dev/null", "resolves to"),
            ("/nonexistent/base.qcow2", "does not exist"),
            ("json:{\"file.filename\": \"/etc/shadow\"}", "is not a file"),
            ("nbd://10.0.0.1/export", "is not a file"),
        ] {
            let error = check("qcow2", &info("qcow2", Some(backing), Some("raw"))).unwrap_err();
            assert_eq!(error.field, "spec.vm.disks[0].path", "{backing}");
            assert!(
                error.message.contains(why) && error.message.contains("workload's own directory"),
                "{backing}: {error}"
            );
        }
        let error = check("qcow2", &info("qcow2", Some("base.qcow2"), None)).unwrap_err();
        assert!(error.message.contains("without its format"), "{error}");

        let mut with_data_file = info("qcow2", None, None);
        with_data_file.format_specific = Some(FormatSpecific {
            data: Some(FormatData {
                data_file: Some("/dev/sda".into()),
            }),
        });
        let error = check("qcow2", &with_data_file).unwrap_err();
        assert!(error.message.contains("data file \"/dev/sda\""), "{error}");
    }

    /// A qcow2 overlay at `path` over `base` (of `base_format`).
    fn overlay(base: &str, base_format: &str, path: &str) {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            base_format,
            "-b",
            base,
            path,
        ]);
    }

    fn qemu_img(args: &[&str]) -> bool {
        match std::process::Command::new("qemu-img").args(args).output() {
            Ok(output) => {
                assert!(output.status.success(), "qemu-img {args:?}: {output:?}");
                true
            }
            Err(error) => {
                persys_test_support::skip("vm::image tests", "qemu-img", &error);
                false
            }
        }
    }

    #[tokio::test]
    async fn the_backing_chain_is_followed_and_each_link_must_stay_in_the_workload_directory() {
        let dir = tempfile::tempdir().unwrap();
        let workload = dir.path().join("vm/web");
        std::fs::create_dir_all(&workload).unwrap();
        let at = |name: &str| workload.join(name).to_string_lossy().into_owned();
        let outside = dir
            .path()
            .join("outside.raw")
            .to_string_lossy()
            .into_owned();
        if !qemu_img(&["create", "-q", "-f", "raw", &outside, "1M"]) {
            return;
        }
        // top -> middle (in the folder) -> outside.raw (not).
        overlay(&outside, "raw", &at("middle.qcow2"));
        overlay("middle.qcow2", "qcow2", &at("top.qcow2"));
        let field = "spec.vm.disks[0]";
        let top = workload.join("top.qcow2");
        match check_image(field, &top, DiskFormat::Qcow2, &workload).await {
            Err(ImageRefusal::Rule(error)) => {
                assert_eq!(error.field, "spec.vm.disks[0].path");
                assert!(
                    error.message.contains("middle.qcow2 has the backing file")
                        && error.message.contains("outside.raw"),
                    "{error}"
                );
            }
            other => panic!("the second link escapes: {other:?}"),
        }
        // With every link inside, the chain passes; a raw file declared
        // qcow2 does not, and a missing file is a probe failure, retried.
        qemu_img(&["create", "-q", "-f", "raw", &at("base.raw"), "1M"]);
        qemu_img(&[
            "rebase",
            "-u",
            "-F",
            "raw",
            "-b",
            &at("base.raw"),
            &at("middle.qcow2"),
        ]);
        assert_eq!(
            check_image(field, &top, DiskFormat::Qcow2, &workload).await,
            Ok(())
        );
        let base = workload.join("base.raw");
        assert!(matches!(
            check_image(field, &base, DiskFormat::Qcow2, &workload).await,
            Err(ImageRefusal::Rule(e)) if e.field == "spec.vm.disks[0].format"
        ));
        assert!(matches!(
            check_image(
                field,
                &workload.join("none.qcow2"),
                DiskFormat::Qcow2,
                &workload
            )
            .await,
            Err(ImageRefusal::Probe(_))
        ));
    }
}
