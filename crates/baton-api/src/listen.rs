//! A listener that holds a bounded number of client connections open at once.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Accepts at most `max` connections at a time; further clients wait in the kernel's backlog
/// until one closes, so clients cannot exhaust the process's descriptors (which its worker links
/// and control connections need too).
pub struct Capped {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

impl Capped {
    pub fn new(inner: TcpListener, max: usize) -> Self {
        Capped { inner, slots: Arc::new(Semaphore::new(max.max(1))) }
    }
}

/// A connection holding its slot until it is dropped.
pub struct CappedIo {
    io: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl axum::serve::Listener for Capped {
    type Io = CappedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (CappedIo, SocketAddr) {
        let slot = self.slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (CappedIo { io, _slot: slot }, addr)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl AsyncRead for CappedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::serve::Listener;

    use super::*;

    #[tokio::test]
    async fn a_connection_beyond_the_cap_waits_until_one_closes() {
        let mut capped = Capped::new(TcpListener::bind("127.0.0.1:0").await.unwrap(), 2);
        let addr = capped.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let first = capped.accept().await.0;
        let _second = capped.accept().await.0;
        assert!(
            tokio::time::timeout(Duration::from_millis(300), capped.accept()).await.is_err(),
            "a third connection was taken while two were open"
        );
        drop(first);
        tokio::time::timeout(Duration::from_secs(10), capped.accept())
            .await
            .expect("the slot of a closed connection was not reused");
    }
}
