//! A VM's serial console log. libvirt has qemu append everything the guest
//! (and its firmware) writes to the serial port to
//! `<state>/vm/<id>/console.log` (the domain XML's `<log file=…
//! append='on'/>`); this reads it: the last lines, then, when following,
//! what is appended, polling for growth.
//!
//! Rotation: with `stdio_handler = "file"` (how this agent's hosts run
//! libvirt) qemu writes the file itself and nothing rotates it, so
//! [`rotate_console_logs`] does: a file over [`CONSOLE_LOG_CAP`] is copied
//! to `console.log.0` (replacing the previous one) and truncated in
//! place, which qemu's append-mode descriptor follows. A reader reads
//! `console.log.0` then `console.log`, and a follower that sees the file
//! shrink finishes its place in `console.log.0` first.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::{self, StreamExt};
use persys_api::v1::Workload;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::sync::CancellationToken;

use super::config::vm_root;
use super::io::VmIo;
use crate::kit::io::{IoError, IoStream, LogChunk, LogOptions, OutputStream};

/// The console log's file name in the VM's folder.
pub const CONSOLE_LOG: &str = "console.log";

/// The size at which the console log is rotated; with its one rotated
/// copy a VM keeps at most about twice this.
pub const CONSOLE_LOG_CAP: u64 = 2 * 1024 * 1024;

/// How often followers look for new output.
const POLL: Duration = Duration::from_millis(200);

/// How often the rotator looks at every VM's log.
const ROTATE_EVERY: Duration = Duration::from_secs(10);

/// How much is read at a time; also the longest piece of a line without a
/// newline handed out (a console need not write lines).
const BLOCK: usize = 16 * 1024;

/// The rotated copy of a log.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".0");
    PathBuf::from(name)
}

pub(crate) fn console_log(
    io: &VmIo,
    workload: &Workload,
    options: LogOptions,
) -> IoStream<LogChunk> {
    let id = workload.id().to_string();
    let path = io.config.vm_dir(&id).join(CONSOLE_LOG);
    let instance = workload
        .status
        .as_ref()
        .map(|s| s.runtime_ref.clone())
        .unwrap_or_default();
    stream::once(async move { open(id, path, instance, options).await })
        .flat_map(|opened| match opened {
            Ok(stream) => stream,
            Err(error) => stream::once(async move { Err(error) }).boxed(),
        })
        .boxed()
}

/// Where reading starts: the files and offsets, after tail and since.
async fn open(
    id: String,
    path: PathBuf,
    instance: String,
    options: LogOptions,
) -> Result<IoStream<LogChunk>, IoError> {
    let old = rotated(&path);
    let current_meta = match tokio::fs::metadata(&path).await {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(IoError::NotFound(format!(
                "workload {id}: no console log yet ({} does not exist: the VM has not started since the agent began capturing its console)",
                path.display()
            )));
        }
        Err(e) => {
            return Err(IoError::Runtime(format!(
                "workload {id}: reading {}: {e}",
                path.display()
            )));
        }
    };
    let old_meta = tokio::fs::metadata(&old).await.ok();
    // A raw console has no times: `since` keeps a file only if it was
    // written to since then (its modification time).
    let recent = |meta: &std::fs::Metadata| match options.since {
        Some(since) => meta.modified().map(|m| m >= since).unwrap_or(true),
        None => true,
    };
    let mut start_current = if recent(&current_meta) {
        0
    } else {
        current_meta.len()
    };
    let mut from_old = old_meta
        .as_ref()
        .filter(|m| recent(m) && start_current == 0)
        .map(|_| 0u64);
    if let Some(lines) = options.tail {
        let (offset, found) = tail_offset(&path, current_meta.len(), lines)
            .await
            .map_err(|e| read_error(&id, &path, e))?;
        start_current = start_current.max(offset);
        from_old = match from_old {
            Some(_) if found < lines && offset == 0 => {
                let len = old_meta.as_ref().map_or(0, |m| m.len());
                let (old_offset, _) = tail_offset(&old, len, lines - found)
                    .await
                    .map_err(|e| read_error(&id, &old, e))?;
                Some(old_offset)
            }
            _ => None,
        };
    }
    let reader = Reader {
        id,
        path,
        instance,
        follow: options.follow,
        pending_old: from_old,
        file: None,
        offset: start_current,
        partial: BytesMut::new(),
        ready: std::collections::VecDeque::new(),
    };
    Ok(stream::unfold(reader, |mut reader| async move {
        let item = reader.next().await?;
        Some((item, reader))
    })
    .boxed())
}

/// Reads a console log on, line by line.
struct Reader {
    id: String,
    path: PathBuf,
    instance: String,
    follow: bool,
    /// The rotated copy still to read from this offset, first.
    pending_old: Option<u64>,
    file: Option<tokio::fs::File>,
    /// Where in `path` the next read starts.
    offset: u64,
    /// A line begun but not ended yet.
    partial: BytesMut,
    /// Lines read, not handed out yet (at most one block's worth).
    ready: std::collections::VecDeque<Bytes>,
}

impl Reader {
    async fn next(&mut self) -> Option<Result<LogChunk, IoError>> {
        loop {
            if let Some(line) = self.ready.pop_front() {
                return Some(Ok(self.chunk(line)));
            }
            if let Some(from) = self.pending_old.take() {
                let old = rotated(&self.path);
                match read_range(&old, from).await {
                    Ok(data) => self.split(data),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Some(Err(read_error(&self.id, &old, e))),
                }
                continue;
            }
            match self.read_more().await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // The VM's folder is gone with its workload.
                    return self.take_partial().map(Ok);
                }
                Err(e) => return Some(Err(read_error(&self.id, &self.path, e))),
            }
            if !self.follow {
                return self.take_partial().map(Ok);
            }
            if self.partial.len() >= BLOCK {
                return self.take_partial().map(Ok);
            }
            tokio::time::sleep(POLL).await;
            match tokio::fs::metadata(&self.path).await {
                Ok(meta) if meta.len() < self.offset => {
                    // Rotated (or truncated): finish our place in the
                    // rotated copy, then read the new file from its start.
                    let copied = tokio::fs::metadata(rotated(&self.path))
                        .await
                        .map(|m| m.len())
                        .unwrap_or(0);
                    if copied > self.offset {
                        self.pending_old = Some(self.offset);
                    }
                    self.offset = 0;
                    self.file = None;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return self.take_partial().map(Ok);
                }
                Err(e) => return Some(Err(read_error(&self.id, &self.path, e))),
            }
        }
    }

    /// Reads one block at the offset; false at the end of the file.
    async fn read_more(&mut self) -> std::io::Result<bool> {
        if self.file.is_none() {
            let mut file = tokio::fs::File::open(&self.path).await?;
            file.seek(SeekFrom::Start(self.offset)).await?;
            self.file = Some(file);
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(false);
        };
        let mut block = vec![0u8; BLOCK];
        let read = file.read(&mut block).await?;
        if read == 0 {
            return Ok(false);
        }
        block.truncate(read);
        self.offset += read as u64;
        self.split(Bytes::from(block));
        Ok(true)
    }

    /// Adds data to the partial line and moves finished lines to `ready`.
    fn split(&mut self, data: Bytes) {
        self.partial.extend_from_slice(&data);
        while let Some(newline) = self.partial.iter().position(|b| *b == b'\n') {
            let line = self.partial.split_to(newline + 1).freeze();
            self.ready.push_back(line);
        }
        while self.partial.len() >= BLOCK {
            let piece = self.partial.split_to(BLOCK).freeze();
            self.ready.push_back(piece);
        }
    }

    fn take_partial(&mut self) -> Option<LogChunk> {
        if self.partial.is_empty() {
            return None;
        }
        let piece = self.partial.split().freeze();
        Some(self.chunk(piece))
    }

    fn chunk(&self, line: Bytes) -> LogChunk {
        LogChunk {
            stream: OutputStream::Console,
            service: String::new(),
            instance: self.instance.clone(),
            timestamp: None,
            data: plain_newline(line),
        }
    }
}

/// A serial line ends in CR LF; the log's reader gets LF, as from a
/// container.
fn plain_newline(line: Bytes) -> Bytes {
    if line.ends_with(b"\r\n") {
        let mut plain = BytesMut::from(&line[..line.len() - 2]);
        plain.extend_from_slice(b"\n");
        plain.freeze()
    } else {
        line
    }
}

/// The whole of `path` from `from`: a rotated copy, at most about
/// [`CONSOLE_LOG_CAP`] long.
async fn read_range(path: &Path, from: u64) -> std::io::Result<Bytes> {
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(SeekFrom::Start(from)).await?;
    let mut data = Vec::new();
    file.take(CONSOLE_LOG_CAP.saturating_mul(2))
        .read_to_end(&mut data)
        .await?;
    Ok(Bytes::from(data))
}

/// Where the last `lines` lines of the first `len` bytes of `path` begin,
/// and how many lines were found (fewer than asked when the file is
/// shorter). Reads backwards a block at a time.
async fn tail_offset(path: &Path, len: u64, lines: u64) -> std::io::Result<(u64, u64)> {
    if lines == 0 {
        return Ok((len, 0));
    }
    let mut file = tokio::fs::File::open(path).await?;
    let mut end = len;
    let mut found = 0u64;
    // A last line without its newline counts as a line.
    let mut skip_final_newline = true;
    let mut block = vec![0u8; BLOCK];
    while end > 0 {
        let start = end.saturating_sub(BLOCK as u64);
        let size = usize::try_from(end - start).unwrap_or(BLOCK);
        file.seek(SeekFrom::Start(start)).await?;
        file.read_exact(&mut block[..size]).await?;
        for (i, byte) in block[..size].iter().enumerate().rev() {
            if *byte != b'\n' {
                skip_final_newline = false;
                continue;
            }
            if skip_final_newline {
                skip_final_newline = false;
                continue;
            }
            found += 1;
            if found == lines {
                return Ok((start + i as u64 + 1, found));
            }
        }
        end = start;
    }
    // The file's first line is one more.
    let has_text = len > 0 && !(len == 1 && skip_final_newline);
    Ok((0, found + u64::from(has_text)))
}

fn read_error(id: &str, path: &Path, error: std::io::Error) -> IoError {
    IoError::Runtime(format!(
        "workload {id}: reading {}: {error}",
        path.display()
    ))
}

/// Rotates a console log over `cap`: copied to its `.0` (written aside,
/// then renamed over the previous copy), then truncated in place. Output
/// qemu writes between the copy and the truncation is lost. Returns
/// whether it rotated.
pub async fn rotate_if_over(path: &Path, cap: u64) -> std::io::Result<bool> {
    let len = match tokio::fs::metadata(path).await {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= cap {
        return Ok(false);
    }
    let old = rotated(path);
    let mut partial = old.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    tokio::fs::copy(path, &partial).await?;
    tokio::fs::rename(&partial, &old).await?;
    let file = tokio::fs::OpenOptions::new().write(true).open(path).await?;
    file.set_len(0).await?;
    Ok(true)
}

/// Keeps every VM's console log under the cap, until shutdown: the
/// agent's `vm-console-log-rotator` task.
pub async fn rotate_console_logs(state_dir: PathBuf, shutdown: CancellationToken) {
    let root = vm_root(&state_dir);
    loop {
        if let Ok(mut dirs) = tokio::fs::read_dir(&root).await {
            while let Ok(Some(dir)) = dirs.next_entry().await {
                let path = dir.path().join(CONSOLE_LOG);
                match rotate_if_over(&path, CONSOLE_LOG_CAP).await {
                    Ok(true) => {
                        tracing::info!(path = %path.display(), cap = CONSOLE_LOG_CAP, "rotated a VM console log")
                    }
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "rotating a VM console log failed")
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(ROTATE_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;

    async fn read_all(path: PathBuf, options: LogOptions) -> Vec<String> {
        open("vm-1".into(), path, "uuid".into(), options)
            .await
            .unwrap()
            .map(|c| String::from_utf8(c.unwrap().data.to_vec()).unwrap())
            .collect()
            .await
    }

    fn numbered(from: u32, to: u32) -> String {
        (from..=to).map(|n| format!("line {n}\r\n")).collect()
    }

    #[tokio::test]
    async fn tail_reads_the_last_lines_across_the_rotated_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONSOLE_LOG);
        std::fs::write(rotated(&path), numbered(1, 10)).unwrap();
        std::fs::write(&path, numbered(11, 13)).unwrap();
        let tail = |n| LogOptions {
            tail: Some(n),
            ..Default::default()
        };
        assert_eq!(
            read_all(path.clone(), tail(2)).await,
            ["line 12\n", "line 13\n"]
        );
        assert_eq!(
            read_all(path.clone(), tail(5)).await,
            [
                "line 9\n",
                "line 10\n",
                "line 11\n",
                "line 12\n",
                "line 13\n"
            ]
        );
        assert_eq!(read_all(path.clone(), Default::default()).await.len(), 13);
        assert!(read_all(path.clone(), tail(0)).await.is_empty());
        // A last line without its newline is a line.
        std::fs::write(&path, "a\nb\nc").unwrap();
        assert_eq!(read_all(path.clone(), tail(2)).await, ["b\n", "c"]);
    }

    #[tokio::test]
    async fn since_after_the_last_write_shows_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONSOLE_LOG);
        std::fs::write(&path, numbered(1, 3)).unwrap();
        let later = LogOptions {
            since: Some(SystemTime::now() + Duration::from_secs(3600)),
            ..Default::default()
        };
        assert!(read_all(path.clone(), later).await.is_empty());
        let earlier = LogOptions {
            since: Some(UNIX_EPOCH),
            ..Default::default()
        };
        assert_eq!(read_all(path, earlier).await.len(), 3);
    }

    #[tokio::test]
    async fn a_missing_log_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let opened = open(
            "vm-1".into(),
            dir.path().join(CONSOLE_LOG),
            String::new(),
            LogOptions::default(),
        )
        .await;
        assert!(matches!(opened, Err(IoError::NotFound(m)) if m.contains("vm-1")));
    }

    #[tokio::test]
    async fn follow_carries_on_across_a_rotation_without_losing_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONSOLE_LOG);
        std::fs::write(&path, numbered(1, 2)).unwrap();
        let follow = LogOptions {
            follow: true,
            ..Default::default()
        };
        let mut stream = open("vm-1".into(), path.clone(), String::new(), follow)
            .await
            .unwrap();
        let mut next = async || {
            String::from_utf8(stream.next().await.unwrap().unwrap().data.to_vec()).unwrap()
        };
        assert_eq!(next().await, "line 1\n");
        assert_eq!(next().await, "line 2\n");
        // Appended as qemu does, then rotated before the follower looked.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, numbered(3, 4).as_bytes()).unwrap();
        assert!(rotate_if_over(&path, 10).await.unwrap());
        std::io::Write::write_all(&mut file, numbered(5, 5).as_bytes()).unwrap();
        for n in 3..=5 {
            assert_eq!(next().await, format!("line {n}\n"));
        }
        // The folder goes with the workload: the stream ends.
        drop(file);
        std::fs::remove_file(&path).unwrap();
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn rotation_keeps_one_copy_and_leaves_small_logs_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONSOLE_LOG);
        std::fs::write(&path, "0123456789").unwrap();
        assert!(!rotate_if_over(&path, 10).await.unwrap());
        std::fs::write(&path, "0123456789A").unwrap();
        assert!(rotate_if_over(&path, 10).await.unwrap());
        assert_eq!(std::fs::read(rotated(&path)).unwrap(), b"0123456789A");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        assert!(
            !rotate_if_over(&dir.path().join("absent"), 10)
                .await
                .unwrap()
        );
    }
}
