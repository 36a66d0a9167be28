//! A connection wrapper that gathers a response's writes into one.
//!
//! The HTTP/2 layer writes a gRPC response as HEADERS, DATA and trailing
//! HEADERS frames. Over a stream that reports vectored writes it keeps any
//! DATA payload over 256 bytes out of its own buffer and must flush before it
//! can queue the trailers, so a typical 0.3–1 KiB response went out as two
//! TLS records in two `writev` calls and two TCP segments, which also wake
//! the client twice. Over a stream without vectored writes it copies payloads
//! up to 1 KiB into its buffer instead; this wrapper reports no vectored
//! writes and holds what it is given until the HTTP/2 layer flushes, so such
//! a response leaves in one TLS record and one system call. Larger bodies are
//! gathered the same way up to [`GATHER_LIMIT`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Bytes held before they are written on without waiting for a flush.
pub const GATHER_LIMIT: usize = 64 * 1024;

/// Buffer capacity kept between flushes; a larger one (after a big
/// response) is released so idle connections stay small.
const KEEP_CAPACITY: usize = 16 * 1024;

/// Wraps a connection so that writes are gathered until a flush.
#[derive(Debug)]
pub struct Coalesced<S> {
    inner: S,
    pending: Vec<u8>,
    written: usize,
}

impl<S> Coalesced<S> {
    pub fn new(inner: S) -> Self {
        Coalesced {
            inner,
            pending: Vec::new(),
            written: 0,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncWrite + Unpin> Coalesced<S> {
    /// Writes everything held to the inner stream.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        if self.pending.capacity() > KEEP_CAPACITY {
            self.pending = Vec::new();
        } else {
            self.pending.clear();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.pending.is_empty() && this.pending.len() + buf.len() > GATHER_LIMIT {
            ready!(this.poll_drain(cx))?;
        }
        if this.pending.is_empty() && buf.len() >= GATHER_LIMIT {
            // Nothing to gather it with: hand it straight on.
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: Connected> Connected for Coalesced<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// An in-memory sink that records each write it is given, and can be
    /// told to accept only a few bytes per call.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        shutdowns: usize,
        max_per_write: Option<usize>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = self.max_per_write.map_or(buf.len(), |m| m.min(buf.len()));
            self.get_mut().writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shutdowns += 1;
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_before_a_flush_reach_the_connection_as_one() {
        let mut stream = Coalesced::new(Recorder::default());
        assert!(!stream.is_write_vectored());
        stream.write_all(b"headers|").await.unwrap();
        stream.write_all(&[7u8; 700]).await.unwrap();
        stream.write_all(b"|trailers").await.unwrap();
        assert!(
            stream.get_ref().writes.is_empty(),
            "nothing written before the flush"
        );
        stream.flush().await.unwrap();
        let inner = stream.get_ref();
        assert_eq!(inner.writes.len(), 1);
        assert_eq!(inner.writes[0].len(), 8 + 700 + 9);
        assert!(inner.writes[0].starts_with(b"headers|"));
        assert!(inner.writes[0].ends_with(b"|trailers"));
        assert_eq!(inner.flushes, 1);
    }

    #[tokio::test]
    async fn a_partial_write_below_is_resumed_where_it_stopped() {
        let mut stream = Coalesced::new(Recorder {
            max_per_write: Some(100),
            ..Recorder::default()
        });
        let data: Vec<u8> = (0..=255u8).cycle().take(250).collect();
        stream.write_all(&data).await.unwrap();
        stream.flush().await.unwrap();
        let inner = stream.get_ref();
        assert_eq!(inner.writes.len(), 3);
        assert_eq!(inner.writes.concat(), data);
    }

    #[tokio::test]
    async fn more_than_the_limit_is_written_on_without_waiting_for_a_flush() {
        let mut stream = Coalesced::new(Recorder::default());
        stream.write_all(&[1u8; 1000]).await.unwrap();
        stream.write_all(&[2u8; GATHER_LIMIT]).await.unwrap();
        // The held 1000 bytes went first, then the large write passed through.
        let inner = stream.get_ref();
        assert_eq!(inner.writes.len(), 2);
        assert_eq!(inner.writes[0], vec![1u8; 1000]);
        assert_eq!(inner.writes[1].len(), GATHER_LIMIT);
        stream.write_all(b"tail").await.unwrap();
        stream.shutdown().await.unwrap();
        let inner = stream.get_ref();
        assert_eq!(inner.writes.last().unwrap(), b"tail");
        assert_eq!(inner.shutdowns, 1);
    }

    #[tokio::test]
    async fn reads_pass_through() {
        use tokio::io::AsyncReadExt;
        let (mut far, near) = tokio::io::duplex(64);
        let mut stream = Coalesced::new(near);
        far.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        stream.write_all(b"pong").await.unwrap();
        stream.flush().await.unwrap();
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
    }
}
