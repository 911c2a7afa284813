//! Accepting HTTP connections under bounds: a cap on open connections,
//! a deadline for each request's headers (which is also how long a kept-
//! alive connection may sit idle), and a bound on how long a response
//! write may make no progress (a client that stopped reading loses its
//! connection, and with it its generation and its slot). Bodies have their
//! own deadline where they are read (`read_body`), generations a
//! wall-clock cap where they stream (`Limits::max_generation`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Sleep;

/// The bounds an HTTP endpoint serves under.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections open at once; one more is closed as soon as it is
    /// accepted (the client sees the close at once rather than hanging).
    pub max_connections: usize,
    /// Time a client has to send a request's headers, counted from when the
    /// connection is ready for the next request: it also closes idle
    /// kept-alive connections.
    pub header_timeout: Duration,
    /// Time a response write may make no progress before the connection is
    /// closed (a client that stopped reading).
    pub write_stall: Duration,
    /// Kernel send buffer of each connection, in bytes (Linux doubles it
    /// for its bookkeeping): a bound on what a client that stopped reading
    /// pins in the kernel, and how much it can fall behind before its
    /// writes stall.
    pub send_buffer: usize,
    /// Generations running for HTTP clients at once; past it, 429.
    pub max_running: usize,
    /// Wall-clock cap on one generation; past it the stream ends with an
    /// error and the session is cancelled.
    pub max_generation: Duration,
}

/// Default [`Limits::max_connections`].
pub const MAX_CONNECTIONS: usize = 1024;
/// Default [`Limits::max_running`]. Each stage keeps at most this many
/// sessions' caches (`RuntimeConfig::max_sessions_per_shard`), so more
/// would evict each other.
pub const MAX_RUNNING: usize = 64;
/// Default [`Limits::send_buffer`]: room for hundreds of streamed tokens.
pub const SEND_BUFFER: usize = 64 << 10;
/// Default [`Limits::max_generation`], in seconds.
pub const MAX_GENERATION_SECS: u64 = 600;
/// Time a request body has to arrive whole.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Time open connections get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            header_timeout: Duration::from_secs(15),
            write_stall: Duration::from_secs(20),
            send_buffer: SEND_BUFFER,
            max_running: MAX_RUNNING,
            max_generation: Duration::from_secs(MAX_GENERATION_SECS),
        }
    }
}

/// Serves `router` on `listener` under `limits` until `shutdown` resolves,
/// then lets open connections finish their requests for a few seconds.
pub async fn serve_router(
    listener: TcpListener,
    router: Router,
    limits: &Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let room = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, client) = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    tracing::warn!("http accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        let Ok(permit) = room.clone().try_acquire_owned() else {
            metrics::counter!(crate::metrics::HTTP_REFUSED).increment(1);
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        set_send_buffer(&tcp, limits.send_buffer);
        let io = TokioIo::new(Stalled::new(tcp, limits.write_stall));
        // Handlers may ask who is calling (invites go to local clients only).
        let service = TowerToHyperService::new(router.clone().layer(axum::Extension(ConnectInfo(client))));
        let (header_timeout, mut stop) = (limits.header_timeout, stop_rx.clone());
        conns.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(io, service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(permit);
        });
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await;
    conns.abort_all();
    Ok(())
}

/// Bounds `tcp`'s kernel send buffer (best effort: the kernel's default
/// stays if it refuses).
fn set_send_buffer(tcp: &tokio::net::TcpStream, bytes: usize) {
    use std::os::fd::AsRawFd;
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is open for the call (we hold the stream) and
    // the option value is a c_int whose size we pass.
    let rc = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!("SO_SNDBUF: {}", io::Error::last_os_error());
    }
}

/// A connection whose writes fail once they have made no progress for a
/// bound: hyper then closes it, which drops the response body being
/// written (and the generation behind it).
struct Stalled<T> {
    io: T,
    bound: Duration,
    /// Running while a write (or flush) is pending.
    since: Option<Pin<Box<Sleep>>>,
}

impl<T> Stalled<T> {
    fn new(io: T, bound: Duration) -> Self {
        Stalled { io, bound, since: None }
    }

    /// What a write that returned `p` gives: progress resets the clock;
    /// waiting past the bound is an error.
    fn check<R>(&mut self, cx: &mut Context<'_>, p: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if p.is_ready() {
            self.since = None;
            return p;
        }
        let bound = self.bound;
        let timer = self.since.get_or_insert_with(|| Box::pin(tokio::time::sleep(bound)));
        if timer.as_mut().poll(cx).is_ready() {
            self.since = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {} s", bound.as_secs_f64()),
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Stalled<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stalled<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, p)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, p)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, p)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.io).poll_shutdown(cx);
        self.check(cx, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A server of `GET /health` under `limits`; its address and its stop.
    async fn server(limits: Limits) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<io::Result<()>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/health", get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve_router(listener, router, &limits, async move {
                let _ = stopped.await;
            })
            .await
        });
        (addr, stop, task)
    }

    /// One `GET /health` on a new connection: the status line, or `None`
    /// when the server closed the connection without answering.
    async fn health(addr: std::net::SocketAddr) -> Option<String> {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8_lossy(&out).into_owned();
        text.lines().next().map(str::to_string)
    }

    /// Whether the server has closed `s` (EOF or reset) within `wait`.
    async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
        let mut buf = [0u8; 256];
        matches!(tokio::time::timeout(wait, s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_and_slowloris_connections_do_not_stop_a_normal_request_and_are_closed_after_the_header_deadline() {
        let limits = Limits { header_timeout: Duration::from_secs(2), ..Limits::default() };
        let (addr, stop, task) = server(limits).await;
        let mut idle = Vec::new();
        for _ in 0..300 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut slow = Vec::new();
        for _ in 0..20 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").await.unwrap();
            slow.push(s);
        }
        // Slowloris: a byte of header every 300 ms, never the end.
        let drip = tokio::spawn(async move {
            let mut open = slow.len();
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                open = 0;
                for s in &mut slow {
                    open += usize::from(s.write_all(b"a").await.is_ok());
                }
            }
            (slow, open)
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = tokio::time::Instant::now();
        assert_eq!(health(addr).await.as_deref(), Some("HTTP/1.1 200 OK"));
        let took = t.elapsed();
        eprintln!("GET /health beside 300 idle and 20 slowloris connections: {took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        // Past the header deadline every one of them is closed by the server.
        let (mut slow, _) = drip.await.unwrap();
        for s in idle.iter_mut().chain(slow.iter_mut()) {
            assert!(closed_within(s, Duration::from_secs(10)).await, "a connection outlived the header deadline");
        }
        let _ = stop.send(());
        task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_the_connection_cap_a_connection_is_closed_at_once_and_room_comes_back() {
        let limits = Limits { max_connections: 8, header_timeout: Duration::from_secs(1), ..Limits::default() };
        let (addr, stop, task) = server(limits).await;
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(health(addr).await, None, "the ninth connection is closed unanswered");
        // The held ones time out on their headers; the cap frees.
        for s in &mut held {
            assert!(closed_within(s, Duration::from_secs(10)).await);
        }
        let mut answered = None;
        for _ in 0..50 {
            answered = health(addr).await;
            if answered.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(answered.as_deref(), Some("HTTP/1.1 200 OK"));
        let _ = stop.send(());
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_write_that_makes_no_progress_fails_after_the_bound() {
        // A pipe whose reader never reads: 64 bytes of room, then pending.
        let (a, _b) = tokio::io::duplex(64);
        let mut s = Stalled::new(a, Duration::from_millis(300));
        let started = tokio::time::Instant::now();
        let err = s.write_all(&[0u8; 4096]).await.expect_err("the write stalls");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(5), "{waited:?}");
    }

    #[tokio::test]
    async fn a_slow_reader_that_keeps_reading_keeps_its_connection() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = Stalled::new(a, Duration::from_secs(2));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut got = 0;
            while got < 1024 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                got += b.read(&mut buf).await.unwrap();
            }
            got
        });
        s.write_all(&[0u8; 1024]).await.expect("progress every 50 ms is within a 2 s bound");
        assert_eq!(reader.await.unwrap(), 1024);
    }
}
