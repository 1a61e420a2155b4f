//! HTTP/1 connections: the accept loop, with every connection's cost bounded.
//!
//! - **A cap on open connections** (`server.max_connections`): past it, a new client gets an
//!   immediate `503` with the error envelope and `Retry-After`, and the socket is closed, so a
//!   flood of clients can neither exhaust the process's file descriptors nor hang.
//! - **A header-read timeout** (`server.header_read_timeout_secs`): once a client starts a
//!   request, its headers must arrive within this time, or the connection is closed; a request
//!   body that stalls for as long fails the request (a half-sent request does not hold a
//!   socket forever).
//! - **A client that stops reading** its response (the socket's buffer full for
//!   `server.keep_alive_idle_secs`) is disconnected.
//! - **A keep-alive idle timeout** (`server.keep_alive_idle_secs`): a connection with no
//!   request in flight and no bytes for this long is closed.
//! - **Graceful shutdown**: on the signal, stop accepting and let each connection finish the
//!   request it is serving (HTTP/1 keep-alive is turned off for them), for at most
//!   `server.shutdown_grace_secs` and a few seconds more.
//!
//! The timeouts are watched per connection from what its socket reads and whether a response
//! is still being sent, so a long generation (or a quiet SSE stream) is never cut by them.

use axum::body::{Body, Bytes};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// The bounds on connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub keep_alive_idle: Duration,
    /// After the shutdown signal, how long connections may take to finish.
    pub drain: Duration,
}

impl ConnectionLimits {
    pub fn from_config(s: &crate::config::ServerConfig) -> Self {
        Self {
            max_connections: s.max_connections,
            header_read_timeout: Duration::from_secs(s.header_read_timeout_secs),
            keep_alive_idle: Duration::from_secs(s.keep_alive_idle_secs),
            drain: Duration::from_secs(s.shutdown_grace_secs.saturating_add(5)),
        }
    }
}

/// What one connection is doing, as its watchdog sees it.
struct Activity {
    /// Requests whose response is not fully sent yet.
    in_flight: AtomicUsize,
    clock: Mutex<Clock>,
}

struct Clock {
    /// When the connection last became idle (accepted, or a response finished).
    idle_since: Instant,
    /// The first byte of a request not yet handed to the router.
    request_started: Option<Instant>,
    /// Since when a write has been waiting for the client to read.
    write_stalled: Option<Instant>,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            clock: Mutex::new(Clock {
                idle_since: Instant::now(),
                request_started: None,
                write_stalled: None,
            }),
        })
    }

    fn clock(&self) -> std::sync::MutexGuard<'_, Clock> {
        self.clock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            self.clock()
                .request_started
                .get_or_insert_with(Instant::now);
        }
    }

    fn write_progress(&self, pending: bool) {
        let mut clock = self.clock();
        if pending {
            clock.write_stalled.get_or_insert_with(Instant::now);
        } else {
            clock.write_stalled = None;
        }
    }

    fn request_began(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.clock().request_started = None;
        InFlight(self.clone())
    }

    /// Why the connection should be closed now, if it should.
    fn expired(&self, limits: &ConnectionLimits) -> Option<&'static str> {
        let clock = self.clock();
        if clock
            .write_stalled
            .is_some_and(|t| t.elapsed() >= limits.keep_alive_idle)
        {
            return Some("the client stopped reading");
        }
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        match clock.request_started {
            Some(t) if t.elapsed() >= limits.header_read_timeout => Some("header read timeout"),
            None if clock.idle_since.elapsed() >= limits.keep_alive_idle => Some("idle"),
            _ => None,
        }
    }
}

/// Held by a response body until it is sent (or dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.clock().idle_since = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its connection marked busy until it ends.
struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that fails when no data arrives for `stall` (a client that stops sending
/// mid-body does not hold its connection).
struct StallingBody {
    inner: Incoming,
    stall: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl StallingBody {
    fn new(inner: Incoming, stall: Duration) -> Self {
        Self {
            inner,
            stall,
            timer: Box::pin(tokio::time::sleep(stall)),
        }
    }
}

impl http_body::Body for StallingBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + self.stall;
                self.timer.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(std::io::Error::other)))
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the request body stalled",
                )))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A socket that tells the watchdog when request bytes arrive.
struct WatchedStream {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        r
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.write_progress(r.is_pending());
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.write_progress(r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then waits for the connections to
/// finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: ConnectionLimits,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Refusals in progress (each holds its socket for at most a second).
    let refusals = Arc::new(Semaphore::new(64));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut stopping = stop_rx.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopping.wait_for(|s| *s) => break,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors or a reset before accept: back off briefly, keep serving.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if let Some(m) = &metrics {
                m.add(
                    crate::metrics::REJECTED,
                    &[("reason", "too_many_connections")],
                    1.0,
                );
            }
            if let Ok(slot) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream, limits.max_connections).await;
                    drop(slot);
                });
            }
            continue;
        };
        if let Some(m) = &metrics {
            let open = limits.max_connections - permits.available_permits();
            m.set(crate::metrics::OPEN_CONNECTIONS, open as f64);
        }
        let (app, stop_rx, metrics, permits) = (
            app.clone(),
            stop_rx.clone(),
            metrics.clone(),
            permits.clone(),
        );
        tokio::spawn(async move {
            serve_connection(stream, app, limits, stop_rx).await;
            drop(permit);
            if let Some(m) = &metrics {
                let open = limits.max_connections - permits.available_permits();
                m.set(crate::metrics::OPEN_CONNECTIONS, open as f64);
            }
        });
    }
    drop(listener);
    // Every connection holds a permit until it ends; a client that never finishes does not
    // hold the process past the drain time.
    let all = permits.acquire_many(limits.max_connections as u32);
    if tokio::time::timeout(limits.drain, all).await.is_err() {
        tracing::warn!("shutdown: connections still open after the drain time; closing them");
    }
}

async fn serve_connection(
    stream: TcpStream,
    app: axum::Router,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) {
    use tower::ServiceExt;
    let activity = Activity::new();
    let io = TokioIo::new(WatchedStream {
        inner: stream,
        activity: activity.clone(),
    });
    let service = hyper::service::service_fn({
        let activity = activity.clone();
        move |req: hyper::Request<Incoming>| {
            let in_flight = activity.request_began();
            let app = app.clone();
            let stall = limits.header_read_timeout;
            async move {
                let req = req.map(|b| Body::new(StallingBody::new(b, stall)));
                let resp = app.oneshot(req).await?;
                Ok::<_, std::convert::Infallible>(resp.map(|inner| {
                    Body::new(TrackedBody {
                        inner,
                        _in_flight: in_flight,
                    })
                }))
            }
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.header_read_timeout(None);
    let mut conn = pin!(builder.serve_connection(io, service));
    let tick =
        (limits.header_read_timeout.min(limits.keep_alive_idle) / 4).max(Duration::from_millis(50));
    let mut watchdog = tokio::time::interval(tick);
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = watchdog.tick() => {
                if let Some(why) = activity.expired(&limits) {
                    tracing::debug!(reason = why, "closing a connection");
                    return;
                }
            }
            _ = stop.wait_for(|s| *s), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Answers a connection past the cap with a 503 and closes it. The request is read (briefly,
/// and at most 64 KiB) before closing, so the client gets the answer rather than a reset.
async fn refuse(mut stream: TcpStream, cap: usize) {
    let body = crate::error::ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        format!("the server has {cap} open connections (server.max_connections); retry shortly"),
    )
    .to_json();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}
