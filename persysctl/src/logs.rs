//! `persysctl logs ID [-f] [--tail N] [--since 10m|TIME] [--service S]
//! [--timestamps]`: a workload's output, stdout to standard output and
//! stderr to standard error, with terminal control characters shown as
//! escapes (newlines and tabs kept). Ctrl-C ends a followed stream with
//! status 0.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use persys_api::v1::{LogChunk, LogStream, StreamLogsRequest};

use crate::cli::LogsArgs;
use crate::connection::Agent;
use crate::error::CliError;
use crate::terminal;

pub async fn run(agent: &Agent, args: LogsArgs) -> Result<(), CliError> {
    let request = request(&args, SystemTime::now())?;
    // Lines of a compose project name their service unless one was picked.
    let prefix_services = args.service.is_none();
    let mut interrupt = crate::interrupt()?;
    let mut stream = tokio::select! {
        _ = interrupt.recv() => return Ok(()),
        opened = agent.stream_logs(request) => match opened {
            Ok(stream) => stream,
            Err(status) => return Err(agent.failure(&status).await),
        },
    };
    loop {
        let chunk = tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            chunk = stream.message() => chunk,
        };
        match chunk {
            Ok(Some(chunk)) => {
                if !write_chunk(&chunk, prefix_services)? {
                    // The reader of our output went away (`| head`).
                    return Ok(());
                }
            }
            Ok(None) => return Ok(()),
            Err(status) => return Err(agent.failure(&status).await),
        }
    }
}

/// The request for `args`; `--since` is a duration back from `now` or a
/// time (RFC 3339).
fn request(args: &LogsArgs, now: SystemTime) -> Result<StreamLogsRequest, CliError> {
    let mut request = StreamLogsRequest {
        id: args.id.clone(),
        service: args.service.clone().unwrap_or_default(),
        follow: args.follow,
        tail_lines: args.tail.map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
        timestamps: args.timestamps,
        ..Default::default()
    };
    if let Some(since) = args.since.as_deref().map(str::trim) {
        if let Ok(duration) = humantime::parse_duration(since) {
            // Whole seconds, rounded up so nothing asked for is left out.
            let seconds = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
            request.since_seconds = i64::try_from(seconds.max(1)).unwrap_or(i64::MAX);
        } else if let Ok(at) = humantime::parse_rfc3339_weak(since) {
            let ms = at
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            if at > now {
                return Err(CliError::Config(format!(
                    "--since {since}: the time is in the future"
                )));
            }
            request.since_time_ms = i64::try_from(ms.max(1)).unwrap_or(i64::MAX);
        } else {
            return Err(CliError::Config(format!(
                "--since {since:?}: expected a duration (10m, 1h30m) or a time (2026-01-02T15:04:05Z)"
            )));
        }
    }
    Ok(request)
}

/// The text of a chunk as printed: `service | ` first when asked, control
/// characters escaped.
fn printed(chunk: &LogChunk, prefix_services: bool) -> String {
    let text = String::from_utf8_lossy(&chunk.data);
    let text = terminal::text(&text);
    if prefix_services && !chunk.service.is_empty() {
        format!("{} | {text}", terminal::line(&chunk.service))
    } else {
        text.into_owned()
    }
}

/// Writes a chunk to stdout or stderr; false once the reader is gone.
fn write_chunk(chunk: &LogChunk, prefix_services: bool) -> Result<bool, CliError> {
    let text = printed(chunk, prefix_services);
    let written = if chunk.stream == LogStream::Stderr as i32 {
        let mut err = std::io::stderr().lock();
        err.write_all(text.as_bytes()).and_then(|()| err.flush())
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes()).and_then(|()| out.flush())
    };
    match written {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn args(since: Option<&str>) -> LogsArgs {
        LogsArgs {
            id: "web".into(),
            follow: false,
            tail: Some(5),
            since: since.map(str::to_string),
            service: None,
            timestamps: false,
        }
    }

    #[test]
    fn since_takes_a_duration_or_a_time() {
        let now = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let request = request(&args(Some("10m")), now).unwrap();
        assert_eq!(request.since_seconds, 600);
        assert_eq!(request.tail_lines, Some(5));
        let request = request_at("2026-01-02T15:04:05Z", now);
        assert_eq!(request.since_time_ms, 1_767_366_245_000);
        assert!(super::request(&args(Some("yesterday")), now).is_err());
        assert!(super::request(&args(Some("2099-01-01T00:00:00Z")), now).is_err());
    }

    fn request_at(since: &str, now: SystemTime) -> StreamLogsRequest {
        request(&args(Some(since)), now).unwrap()
    }

    #[test]
    fn output_is_prefixed_by_service_and_cannot_drive_the_terminal() {
        let chunk = LogChunk {
            stream: LogStream::Stdout as i32,
            service: "db".into(),
            instance: "shop-db-1".into(),
            timestamp_unix_nanos: 0,
            data: b"ready\t\x1b[2J\x1b]52;c;ZXZpbA==\x07\n".to_vec(),
        };
        assert_eq!(
            printed(&chunk, true),
            "db | ready\t\\u{1b}[2J\\u{1b}]52;c;ZXZpbA==\\u{7}\n"
        );
        assert_eq!(
            printed(&chunk, false),
            "ready\t\\u{1b}[2J\\u{1b}]52;c;ZXZpbA==\\u{7}\n"
        );
    }
}
