//! Upstream HTTP/1.1 connections are kept and reused per worker, and one the upstream closed
//! while idle is never used again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::*;

/// A bare HTTP/1.1 upstream that counts connections. On each connection it answers up to
/// `answers` requests and closes, unanswered, when one more arrives (a keep-alive close racing
/// the next request); like nginx's `keepalive_timeout`, it also closes after `idle` without
/// a request. It never says `Connection: close` first. With `reset`, that close is a TCP reset
/// (what a restarted upstream, or one closing with unread bytes, sends).
async fn bare_upstream(idle: Duration, answers: usize, reset: bool) -> (String, Arc<AtomicUsize>) {
    let (addr, conns) = counting_upstream(move |mut s| async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut answered = 0;
        loop {
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                if answered == answers {
                    if reset {
                        let _ = s.set_zero_linger();
                    }
                    return;
                }
                buf.drain(..end + 4);
                answered += 1;
                let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if s.write_all(reply).await.is_err() {
                    return;
                }
            }
            match tokio::time::timeout(idle, s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        }
    })
    .await;
    (format!("http://{addr}"), conns)
}

/// Accepts connections on 127.0.0.1:0, counts them, and serves each with `serve`.
pub(crate) async fn counting_upstream<F, Fut>(serve: F) -> (std::net::SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let count = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(s));
        }
    });
    (addr, conns)
}
pub(crate) fn connections(conns: &AtomicUsize, want: usize, why: &str) {
    assert_eq!(conns.load(Ordering::SeqCst), want, "{why}");
}

#[tokio::test]
async fn upstream_connections_are_reused_and_dropped_once_closed() {
    let (url, conns) = bare_upstream(Duration::from_millis(300), usize::MAX, false).await;
    let k = TestKey::new("k", "sa", &["s.a"]);
    let gw = Gateway::start(&route("api", "/api/", &url, "    scopes: [s.a]\n"), &[&k]).await;
    // One downstream connection: its requests stay on one worker, and so on one pool.
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut burst = async |n: usize| {
        for i in 0..n {
            let req = http::Request::builder()
                .uri(format!("/api/{i}"))
                .header("host", "t")
                .header("authorization", k.auth())
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200, "request {i}");
            assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        }
    };
    burst(10).await;
    connections(&conns, 1, "ten requests, one upstream connection");
    // Long past the upstream's idle timeout: the pooled connection is closed on its side.
    tokio::time::sleep(Duration::from_millis(900)).await;
    burst(10).await;
    connections(&conns, 2, "a new connection after the close, then reuse");
    gw.stop().await;
}

#[tokio::test]
async fn a_get_the_upstream_drops_on_a_kept_alive_connection_is_sent_again_a_post_is_not() {
    dropped_kept_alive_connection(false).await;
}

#[tokio::test]
async fn a_get_the_upstream_resets_on_a_kept_alive_connection_is_sent_again_a_post_is_not() {
    dropped_kept_alive_connection(true).await;
}

async fn dropped_kept_alive_connection(reset: bool) {
    let (url, conns) = bare_upstream(Duration::from_secs(30), 1, reset).await;
    let k = TestKey::new("k", "sa", &["s.a"]);
    let gw = Gateway::start(&route("api", "/api/", &url, "    scopes: [s.a]\n"), &[&k]).await;
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut call = async |method: &str, body: &'static str| {
        let req = http::Request::builder()
            .method(method)
            .uri("/api/x")
            .header("host", "t")
            .header("authorization", k.auth())
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        send.send_request(req).await.unwrap().status()
    };
    assert_eq!(call("GET", "").await, 200);
    // The kept connection takes the second GET and closes: sent again on a new one.
    assert_eq!(call("GET", "").await, 200);
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    // A POST may have been acted on before the close: never sent twice.
    assert_eq!(call("POST", "x").await, 502);
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    gw.stop().await;
}
