//! Running a compose command: bounded in number, in time and in output.
//!
//! Each command runs in a process group of its own, because `docker
//! compose` is the docker CLI running the compose plugin as a child: killing
//! only the process we started would leave the plugin running. When the
//! timeout passes, or the caller gives up on the command, the whole group is
//! killed.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Bytes of stdout and of stderr kept: the end, where the error is.
pub const OUTPUT_LIMIT: usize = 4096;

/// How long output is still read once the command has exited or been
/// killed: a process it started may hold the pipes open.
const DRAIN: Duration = Duration::from_secs(2);

/// One command to run.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub program: String,
    pub args: Vec<OsString>,
    /// Working directory; none: the agent's.
    pub cwd: Option<PathBuf>,
    /// The whole environment of the command: nothing is inherited.
    pub env: Vec<(String, String)>,
}

/// What a command that ran to its end left behind.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    /// The last [`OUTPUT_LIMIT`] bytes of stdout.
    pub stdout: String,
    /// The last [`OUTPUT_LIMIT`] bytes of stderr.
    pub stderr: String,
    pub took: Duration,
}

/// Why a command did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("killed after {after:?} (the timeout){}", tail_suffix(stderr))]
    TimedOut { after: Duration, stderr: String },
    #[error("waiting for {program}: {source}")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

fn tail_suffix(stderr: &str) -> String {
    let stderr = stderr.trim();
    if stderr.is_empty() {
        String::new()
    } else {
        format!("; it had written: {stderr}")
    }
}

/// Runs commands with a timeout, at most `permits` at once.
#[derive(Debug, Clone)]
pub struct CommandRunner {
    /// Bounds the compose processes alive at once; a command waits for a
    /// permit before it starts, and its timeout starts with it.
    permits: Arc<Semaphore>,
    timeout: Duration,
}

impl CommandRunner {
    pub fn new(max_concurrent: usize, timeout: Duration) -> CommandRunner {
        CommandRunner {
            permits: Arc::new(Semaphore::new(max_concurrent.max(1))),
            timeout,
        }
    }

    /// Runs `invocation` to its end, or kills its process group once the
    /// timeout has passed. Dropping the returned future kills it too.
    pub async fn run(&self, invocation: &Invocation) -> Result<Output, RunError> {
        // The semaphore is never closed; a closed one would only mean
        // running without a bound.
        let _permit = self.permits.acquire().await.ok();
        let started = Instant::now();
        let mut command = tokio::process::Command::new(&invocation.program);
        command
            .args(&invocation.args)
            .env_clear()
            .envs(invocation.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(cwd) = &invocation.cwd {
            command.current_dir(cwd);
        }
        let mut child = command.spawn().map_err(|source| RunError::Spawn {
            program: invocation.program.clone(),
            source,
        })?;
        let group = GroupKill::new(child.id());
        let stdout = PipeReader::spawn(child.stdout.take());
        let stderr = PipeReader::spawn(child.stderr.take());

        match tokio::time::timeout(self.timeout, child.wait()).await {
            Ok(Ok(status)) => {
                let (stdout, stdout_closed) = stdout.finish(DRAIN).await;
                let (stderr, stderr_closed) = stderr.finish(DRAIN).await;
                if stdout_closed && stderr_closed {
                    // Nothing of the group holds the pipes: it is gone.
                    group.disarm();
                } else {
                    // Something the command started still holds them (and
                    // so the group id): it goes with the command.
                    group.kill();
                }
                Ok(Output {
                    status,
                    stdout,
                    stderr,
                    took: started.elapsed(),
                })
            }
            Ok(Err(source)) => {
                group.kill();
                stdout.task.abort();
                stderr.task.abort();
                Err(RunError::Wait {
                    program: invocation.program.clone(),
                    source,
                })
            }
            Err(_) => {
                tracing::warn!(program = %invocation.program, timeout = ?self.timeout, "compose command timed out; killing its process group");
                group.kill();
                let _ = tokio::time::timeout(DRAIN, child.wait()).await;
                let (stderr, _) = stderr.finish(DRAIN).await;
                stdout.task.abort();
                Err(RunError::TimedOut {
                    after: self.timeout,
                    stderr,
                })
            }
        }
    }
}

/// Kills a process group when dropped, unless disarmed: a command whose
/// caller was cancelled does not outlive it.
struct GroupKill {
    pgid: Option<Pid>,
}

impl GroupKill {
    fn new(pid: Option<u32>) -> GroupKill {
        GroupKill {
            pgid: pid
                .and_then(|p| i32::try_from(p).ok())
                .and_then(Pid::from_raw),
        }
    }

    fn kill(mut self) {
        self.kill_now();
    }

    fn disarm(mut self) {
        self.pgid = None;
    }

    fn kill_now(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // ESRCH: the group has already exited.
            let _ = kill_process_group(pgid, Signal::KILL);
        }
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// A pipe being read into a [`TailBuffer`] by a task of its own.
struct PipeReader {
    /// Shared with the task, so what was read is there even when the pipe
    /// never closes. A std mutex: held only to append or take.
    tail: Arc<std::sync::Mutex<TailBuffer>>,
    task: tokio::task::JoinHandle<()>,
}

impl PipeReader {
    fn spawn(pipe: Option<impl AsyncRead + Unpin + Send + 'static>) -> PipeReader {
        let tail = Arc::new(std::sync::Mutex::new(TailBuffer::new(OUTPUT_LIMIT)));
        let task = tokio::spawn({
            let tail = tail.clone();
            async move {
                let Some(mut pipe) = pipe else {
                    return;
                };
                let mut chunk = [0u8; 4096];
                loop {
                    match pipe.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => tail
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(&chunk[..n]),
                    }
                }
            }
        });
        PipeReader { tail, task }
    }

    /// What was read, and whether the pipe closed within `wait`.
    async fn finish(self, wait: Duration) -> (String, bool) {
        let abort = self.task.abort_handle();
        let closed = matches!(tokio::time::timeout(wait, self.task).await, Ok(Ok(())));
        if !closed {
            abort.abort();
        }
        let text = self.tail.lock().unwrap_or_else(|p| p.into_inner()).text();
        (text, closed)
    }
}

/// The last `limit` bytes written to it.
#[derive(Debug)]
struct TailBuffer {
    bytes: Vec<u8>,
    limit: usize,
    /// Bytes dropped from the front, so the text can say it is cut.
    dropped: usize,
}

impl TailBuffer {
    fn new(limit: usize) -> TailBuffer {
        TailBuffer {
            bytes: Vec::with_capacity(limit.min(64 * 1024)),
            limit,
            dropped: 0,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        if self.bytes.len() > self.limit {
            let excess = self.bytes.len() - self.limit;
            self.bytes.drain(..excess);
            self.dropped += excess;
        }
    }

    /// The kept bytes as text, starting on a character boundary.
    fn text(&self) -> String {
        let mut start = 0;
        if self.dropped > 0 {
            // Skip UTF-8 continuation bytes cut in half at the front.
            while start < self.bytes.len() && (self.bytes[start] & 0b1100_0000) == 0b1000_0000 {
                start += 1;
            }
        }
        String::from_utf8_lossy(&self.bytes[start..]).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Invocation {
        Invocation {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            cwd: None,
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        }
    }

    #[tokio::test]
    async fn output_is_captured_and_stderr_keeps_only_its_end() {
        let runner = CommandRunner::new(2, Duration::from_secs(10));
        let out = runner
            .run(&sh(
                "echo out; i=0; while [ $i -lt 2000 ]; do echo line-$i >&2; i=$((i+1)); done; echo THE-END >&2; exit 3",
            ))
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout.trim(), "out");
        assert!(out.stderr.len() <= OUTPUT_LIMIT, "{}", out.stderr.len());
        assert!(out.stderr.trim_end().ends_with("THE-END"));
        assert!(!out.stderr.contains("line-0\n"));
    }

    #[tokio::test]
    async fn the_environment_is_exactly_the_one_given() {
        let runner = CommandRunner::new(1, Duration::from_secs(10));
        let mut invocation = sh("echo \"[$GREETING][$HOME]\"");
        invocation.env.push(("GREETING".into(), "hi there".into()));
        let out = runner.run(&invocation).await.unwrap();
        assert_eq!(out.stdout.trim(), "[hi there][]");
    }

    fn alive(pattern: &str) -> bool {
        std::process::Command::new("pgrep")
            .args(["-f", pattern])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    async fn until_gone(pattern: &str) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while alive(pattern) {
            assert!(Instant::now() < deadline, "{pattern} survived its kill");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The command's own child (a grandchild of the agent, as the compose
    /// plugin is under `docker compose`) would outlive a kill of the direct
    /// child alone.
    #[tokio::test]
    async fn a_timeout_kills_the_whole_process_group() {
        let runner = CommandRunner::new(1, Duration::from_millis(500));
        let n = fastrand::u32(100_000..999_999);
        let started = Instant::now();
        let error = runner
            .run(&sh(&format!(
                "echo starting >&2; sleep 900.{n} & sleep 901.{n}; echo never"
            )))
            .await
            .unwrap_err();
        assert!(matches!(error, RunError::TimedOut { .. }), "{error}");
        assert!(error.to_string().contains("starting"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
        until_gone(&format!("sleep 90[01][.]{n}")).await;
    }

    #[tokio::test]
    async fn a_background_process_left_holding_the_output_goes_with_the_command() {
        let runner = CommandRunner::new(1, Duration::from_secs(30));
        let n = fastrand::u32(100_000..999_999);
        let started = Instant::now();
        let out = runner
            .run(&sh(&format!("sleep 902.{n} & echo done")))
            .await
            .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout.trim(), "done");
        assert!(started.elapsed() < Duration::from_secs(10));
        until_gone(&format!("sleep 902[.]{n}")).await;
    }

    #[tokio::test]
    async fn commands_beyond_the_limit_wait_for_a_permit() {
        let runner = CommandRunner::new(1, Duration::from_secs(10));
        let started = Instant::now();
        let nap = sh("sleep 0.3");
        let (a, b) = tokio::join!(runner.run(&nap), runner.run(&nap));
        assert!(a.is_ok() && b.is_ok());
        assert!(started.elapsed() >= Duration::from_millis(600));
    }

    #[test]
    fn the_tail_starts_on_a_character_boundary() {
        let mut tail = TailBuffer::new(5);
        tail.push("ééé".as_bytes());
        tail.push(b"ab");
        let text = tail.text();
        assert!(text.ends_with("ab"));
        assert!(!text.contains('\u{FFFD}'), "{text:?}");
    }
}
