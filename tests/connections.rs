//! The accept loop's bounds, over real sockets: a half-sent request is cut off, an idle
//! keep-alive connection is closed while a busy one is not, clients past the cap get a fast
//! 503, and shutdown lets a running request finish.

use std::time::{Duration, Instant};
use tiller::connections::{serve, ConnectionLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn app() -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route(
            "/echo",
            post(|b: axum::body::Bytes| async move { b.len().to_string() }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(2500)).await;
                "slow"
            }),
        )
}

struct Server {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

async fn start(limits: ConnectionLimits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let done = tokio::spawn(serve(listener, app(), limits, None, async move {
        let _ = rx.await;
    }));
    Server {
        addr,
        stop: Some(tx),
        done,
    }
}

fn limits(max_connections: usize, header_secs: f64, idle_secs: f64) -> ConnectionLimits {
    ConnectionLimits {
        max_connections,
        header_read_timeout: Duration::from_secs_f64(header_secs),
        keep_alive_idle: Duration::from_secs_f64(idle_secs),
        drain: Duration::from_secs(5),
    }
}

/// Reads one response (headers and a content-length body); `None` if the server closed first.
async fn read_response(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Some(String::from_utf8_lossy(&buf[..end + 4 + len]).into_owned());
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Waits (at most `within`) for the server to close the connection; returns how long it took.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut chunk = [0u8; 256];
    match tokio::time::timeout(within, s.read(&mut chunk)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Some(t.elapsed()),
        _ => None,
    }
}

async fn get(s: &mut TcpStream, path: &str) -> Option<String> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    read_response(s).await
}

#[tokio::test]
async fn a_half_sent_request_is_cut_off_at_the_header_timeout() {
    let server = start(limits(8, 1.0, 30.0)).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /ok HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let took = closed_within(&mut s, Duration::from_secs(6))
        .await
        .expect("a connection with half-sent headers stayed open");
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
}

#[tokio::test]
async fn a_stalled_request_body_fails_the_request() {
    let server = start(limits(8, 1.0, 30.0)).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let t = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(6), read_response(&mut s))
        .await
        .expect("a stalled body held the connection");
    if let Some(r) = answer {
        assert!(!r.starts_with("HTTP/1.1 200"), "{r}");
    }
    assert!(t.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn idle_connections_close_and_busy_ones_do_not() {
    // The idle timeout is shorter than a slow request: the request still gets its answer.
    let server = start(limits(8, 30.0, 1.0)).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let slow = get(&mut s, "/slow")
        .await
        .expect("the slow request was cut");
    assert!(slow.starts_with("HTTP/1.1 200"), "{slow}");
    let took = closed_within(&mut s, Duration::from_secs(6))
        .await
        .expect("an idle keep-alive connection stayed open");
    assert!(took >= Duration::from_millis(500), "closed after {took:?}");

    // The header timeout does not count the idle time between two requests.
    let server = start(limits(8, 1.0, 30.0)).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    assert!(get(&mut s, "/ok")
        .await
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let again = get(&mut s, "/ok").await.expect("closed while idle");
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
}

#[tokio::test]
async fn clients_past_the_cap_get_a_fast_503_and_room_frees_up() {
    let server = start(limits(2, 30.0, 30.0)).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        assert!(get(&mut s, "/ok")
            .await
            .unwrap()
            .starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let t = Instant::now();
    let mut extra = TcpStream::connect(server.addr).await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(3), get(&mut extra, "/ok"))
        .await
        .expect("a client past the cap hung")
        .expect("a client past the cap got no answer");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(
        refused.to_lowercase().contains("retry-after: 1"),
        "{refused}"
    );
    assert!(
        refused.contains("\"code\":\"too_many_connections\""),
        "{refused}"
    );
    drop(held.pop());
    let mut ok = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        ok = get(&mut s, "/ok")
            .await
            .filter(|r| r.starts_with("HTTP/1.1 200"));
        if ok.is_some() {
            break;
        }
    }
    assert!(ok.is_some(), "no room after a connection closed");
}

#[tokio::test]
async fn shutdown_lets_the_running_request_finish() {
    let mut server = start(limits(8, 30.0, 30.0)).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = server.stop.take().unwrap().send(());
    let resp = read_response(&mut s).await.expect("cut off by shutdown");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    tokio::time::timeout(Duration::from_secs(5), server.done)
        .await
        .expect("serve did not return after its connections ended")
        .unwrap();
    assert!(TcpStream::connect(server.addr).await.is_err());
}
