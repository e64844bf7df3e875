//! Bounds on the connections a listener holds, so that idle or slow
//! sockets cannot use up the node's file descriptors and take its API,
//! console and health checks down.
//!
//! - At most [`GateLimits::per_listener`] connections open at once, and at
//!   most [`GateLimits::per_address`] from one client address. A new
//!   connection over either bound is not refused: the connection of that
//!   address (or of the listener) that has been quiet longest is closed
//!   to make room. A client that connects and asks at once is therefore
//!   served even while a flood of idle sockets comes from its own address,
//!   and a flood only ever evicts itself first.
//! - A connection that moves no byte in either direction for
//!   [`GateLimits::idle`] is closed. Servers behind a gate send HTTP/2
//!   keep-alive pings (or, for the console's event stream, a tick every
//!   second), so that live streams are never idle.
//! - A connection that has not sent [`GateLimits::first_bytes`] bytes
//!   within [`GateLimits::first_within`] of being accepted (less than an
//!   HTTP/2 preface, less than an HTTP/1 request line and `Host`) is
//!   closed: a client that trickles a byte now and then is not idle, but
//!   it is not a client either.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::tls::LinkInfo;

/// How many connections a listener holds, and for how long when quiet.
#[derive(Clone, Copy, Debug)]
pub struct GateLimits {
    /// Open connections at once.
    pub per_listener: usize,
    /// Open connections at once from one client address.
    pub per_address: usize,
    /// Closed after this long without a byte either way.
    pub idle: Duration,
    /// Bytes a client must send within [`GateLimits::first_within`].
    pub first_bytes: usize,
    /// See [`GateLimits::first_bytes`].
    pub first_within: Duration,
}

impl Default for GateLimits {
    fn default() -> Self {
        Self {
            per_listener: 1024,
            per_address: 256,
            idle: Duration::from_secs(30),
            first_bytes: 24,
            first_within: Duration::from_secs(10),
        }
    }
}

/// Shared by a connection and its gate.
#[derive(Debug)]
struct Ctl {
    /// Last byte read or written, in ms since the gate's epoch.
    last_ms: AtomicU64,
    /// Set when the gate closes the connection to make room.
    evicted: AtomicBool,
    waker: AtomicWaker,
}

#[derive(Debug)]
struct Entry {
    ip: IpAddr,
    ctl: Arc<Ctl>,
}

#[derive(Debug, Default)]
struct Open {
    next: u64,
    conns: HashMap<u64, Entry>,
    per_ip: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
struct Shared {
    name: &'static str,
    limits: GateLimits,
    epoch: Instant,
    open: Mutex<Open>,
    evictions: crate::Refusals,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a connection from `ip`, closing the quietest one of its
    /// address or of the listener when a bound is reached.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Ticket {
        let ctl = Arc::new(Ctl {
            last_ms: AtomicU64::new(self.now_ms()),
            evicted: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        let mut open = self.lock();
        let of_ip = open.per_ip.get(&ip).copied().unwrap_or(0);
        let victim = if of_ip >= self.limits.per_address {
            quietest(&open, Some(ip))
        } else if open.conns.len() >= self.limits.per_listener {
            quietest(&open, None)
        } else {
            None
        };
        if let Some(v) = victim {
            if let Some(e) = forget(&mut open, v) {
                e.ctl.evicted.store(true, Ordering::Relaxed);
                e.ctl.waker.wake();
                crate::refusal!(self.evictions, listener = self.name, remote = %e.ip, "closed the quietest connection to make room: this listener holds at most {} connections, {} from one address", self.limits.per_listener, self.limits.per_address);
            }
        }
        let id = open.next;
        open.next += 1;
        open.conns.insert(
            id,
            Entry {
                ip,
                ctl: ctl.clone(),
            },
        );
        *open.per_ip.entry(ip).or_default() += 1;
        Ticket {
            id,
            ctl,
            shared: self.clone(),
        }
    }
}

fn quietest(open: &Open, ip: Option<IpAddr>) -> Option<u64> {
    open.conns
        .iter()
        .filter(|(_, e)| ip.is_none_or(|ip| e.ip == ip))
        .min_by_key(|(id, e)| (e.ctl.last_ms.load(Ordering::Relaxed), **id))
        .map(|(id, _)| *id)
}

fn forget(open: &mut Open, id: u64) -> Option<Entry> {
    let e = open.conns.remove(&id)?;
    if let Some(n) = open.per_ip.get_mut(&e.ip) {
        *n -= 1;
        if *n == 0 {
            open.per_ip.remove(&e.ip);
        }
    }
    Some(e)
}

/// A connection's place in its gate; given back on drop.
#[derive(Debug)]
struct Ticket {
    id: u64,
    ctl: Arc<Ctl>,
    shared: Arc<Shared>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self.shared.lock();
        forget(&mut open, self.id);
    }
}

/// A TCP listener behind a gate.
#[derive(Debug)]
pub struct GatedListener {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl GatedListener {
    /// Puts `listener` behind a gate; `name` names it in logs.
    pub fn new(listener: TcpListener, name: &'static str, limits: GateLimits) -> Self {
        Self {
            listener,
            shared: Arc::new(Shared {
                name,
                limits,
                epoch: Instant::now(),
                open: Mutex::new(Open::default()),
                evictions: crate::Refusals::new(),
            }),
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection (Nagle's algorithm off). Errors of `accept`
    /// itself (out of file descriptors) are logged and waited out, never
    /// returned.
    pub async fn accept(&self) -> (Gated<TcpStream>, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok((tcp, remote)) => {
                    let _ = tcp.set_nodelay(true);
                    let ticket = self.shared.admit(remote.ip());
                    return (Gated::new(tcp, remote, ticket), remote);
                }
                Err(e) => {
                    tracing::warn!(listener = self.shared.name, error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Every connection, as a stream (for tonic's `serve_with_incoming`).
    pub fn incoming(
        self,
    ) -> impl tokio_stream::Stream<Item = std::io::Result<Gated<TcpStream>>> + Send + 'static {
        futures::stream::unfold(self, |l| async move {
            let (conn, _) = l.accept().await;
            Some((Ok(conn), l))
        })
    }
}

/// A connection behind a gate: closed when idle or evicted.
#[derive(Debug)]
pub struct Gated<S> {
    inner: S,
    remote: SocketAddr,
    ticket: Ticket,
    limits: GateLimits,
    /// Bytes received so far, up to [`GateLimits::first_bytes`].
    received: usize,
    accepted: tokio::time::Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<S> Gated<S> {
    fn new(inner: S, remote: SocketAddr, ticket: Ticket) -> Self {
        let limits = ticket.shared.limits;
        Self {
            inner,
            remote,
            ticket,
            limits,
            received: 0,
            accepted: tokio::time::Instant::now(),
            timer: Box::pin(tokio::time::sleep(limits.first_within.min(limits.idle))),
        }
    }

    fn touch(&self) {
        self.ticket
            .ctl
            .last_ms
            .store(self.ticket.shared.now_ms(), Ordering::Relaxed);
    }

    /// An error when the gate closed this connection, or it has been idle
    /// too long; otherwise arms the idle timer for `cx`.
    fn closed(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        self.ticket.ctl.waker.register(cx.waker());
        if self.ticket.ctl.evicted.load(Ordering::Relaxed) {
            return Some(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "closed to make room for newer connections",
            ));
        }
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return None;
            }
            let now = tokio::time::Instant::now();
            let first_due = self.accepted + self.limits.first_within;
            let slow = self.received < self.limits.first_bytes;
            if slow && now >= first_due {
                return Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "closed a connection that sent too little in its first seconds",
                ));
            }
            let last = self.ticket.ctl.last_ms.load(Ordering::Relaxed);
            let quiet = self.ticket.shared.now_ms().saturating_sub(last);
            if quiet >= self.limits.idle.as_millis() as u64 {
                return Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "idle connection closed",
                ));
            }
            let mut next = now + (self.limits.idle - Duration::from_millis(quiet));
            if slow {
                next = next.min(first_due);
            }
            self.timer.as_mut().reset(next);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gated<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    this.touch();
                    this.received = this.received.saturating_add(n);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.closed(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gated<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.ticket.ctl.evicted.load(Ordering::Relaxed) {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "closed to make room for newer connections",
            )));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S> tonic::transport::server::Connected for Gated<S> {
    type ConnectInfo = LinkInfo;

    fn connect_info(&self) -> LinkInfo {
        LinkInfo {
            remote: self.remote,
            node: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn gate(limits: GateLimits) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let l = GatedListener::new(
            TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            "test",
            limits,
        );
        let addr = l.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            loop {
                let (mut c, _) = l.accept().await;
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    while let Ok(n) = c.read(&mut b).await {
                        if n == 0 || c.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (addr, task)
    }

    /// Reads until EOF or error; true when the server closed it.
    async fn closed_within(c: &mut TcpStream, limit: Duration) -> bool {
        let mut b = [0u8; 8];
        matches!(
            tokio::time::timeout(limit, c.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
        let (addr, task) = gate(GateLimits {
            idle: Duration::from_millis(300),
            ..GateLimits::default()
        })
        .await;
        let mut idle = TcpStream::connect(addr).await.expect("connect");
        let mut busy = TcpStream::connect(addr).await.expect("connect");
        for _ in 0..8 {
            busy.write_all(b"x").await.expect("write");
            let mut b = [0u8; 1];
            busy.read_exact(&mut b).await.expect("echo");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(closed_within(&mut idle, Duration::from_secs(5)).await);
        busy.write_all(b"y").await.expect("still open");
        let mut b = [0u8; 1];
        busy.read_exact(&mut b).await.expect("echo after 800 ms");
        task.abort();
    }

    #[tokio::test]
    async fn a_trickling_connection_is_closed_and_a_talking_one_is_not() {
        let (addr, task) = gate(GateLimits {
            first_bytes: 24,
            first_within: Duration::from_millis(400),
            ..GateLimits::default()
        })
        .await;
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        let mut fine = TcpStream::connect(addr).await.expect("connect");
        fine.write_all(&[b'x'; 24]).await.expect("write");
        let mut b = [0u8; 24];
        fine.read_exact(&mut b).await.expect("echo");
        let start = std::time::Instant::now();
        let mut closed = false;
        while start.elapsed() < Duration::from_secs(5) && !closed {
            if slow.write_all(b"y").await.is_err() {
                closed = true;
                break;
            }
            let mut one = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut one)).await {
                Ok(Ok(0)) | Ok(Err(_)) => closed = true,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        assert!(
            closed,
            "a connection trickling a byte every 100 ms stayed open"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        fine.write_all(b"z").await.expect("still open");
        let mut one = [0u8; 1];
        fine.read_exact(&mut one).await.expect("echo");
        task.abort();
    }

    #[tokio::test]
    async fn a_flood_from_one_address_evicts_its_own_quietest_connections() {
        let (addr, task) = gate(GateLimits {
            per_listener: 64,
            per_address: 8,
            idle: Duration::from_secs(60),
            ..GateLimits::default()
        })
        .await;
        let mut flood = Vec::new();
        for _ in 0..8 {
            flood.push(TcpStream::connect(addr).await.expect("connect"));
        }
        // A newcomer is served at once; the oldest quiet socket is closed.
        let mut newcomer = TcpStream::connect(addr).await.expect("connect");
        newcomer.write_all(b"hi").await.expect("write");
        let mut b = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), newcomer.read_exact(&mut b))
            .await
            .expect("served in time")
            .expect("echo");
        assert!(closed_within(&mut flood[0], Duration::from_secs(5)).await);
        task.abort();
    }
}
