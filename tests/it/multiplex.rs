//! h2c upstreams: one connection per worker shared by its requests, replaced when it closes
//! or goes silent, and requests it did not process sent again (RFC 9113 8.7).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pooling::{connections, counting_upstream};
use crate::support::*;

/// An h2c upstream that counts connections, answers each request after `delay` (so requests
/// overlap), and closes each connection gracefully (GOAWAY) `life` after it opened. Returns
/// the connections opened and the connections closed.
async fn h2c_upstream(
    delay: Duration,
    life: Duration,
) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let closed = Arc::new(AtomicUsize::new(0));
    let ended = closed.clone();
    let (addr, conns) = counting_upstream(move |s| {
        let ended = ended.clone();
        async move {
            let svc = hyper::service::service_fn(move |_req| async move {
                tokio::time::sleep(delay).await;
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                    Bytes::from_static(b"ok"),
                )))
            });
            let conn =
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = tokio::time::sleep(life) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            ended.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    (format!("h2c://{addr}"), conns, closed)
}

/// `n` GETs of `/api/{i}`, all in flight together, the i-th sent `stagger * i` late; each
/// one's status and body.
async fn h2_burst(
    send: &hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    n: u32,
    stagger: Duration,
    auth: Option<&str>,
) -> Vec<(http::StatusCode, Bytes)> {
    let calls = (0..n).map(|i| {
        let mut send = send.clone();
        async move {
            tokio::time::sleep(stagger * i).await;
            let mut req = http::Request::builder().uri(format!("http://t/api/{i}"));
            if let Some(auth) = auth {
                req = req.header("authorization", auth);
            }
            let resp = send
                .send_request(req.body(Full::new(Bytes::new())).unwrap())
                .await
                .unwrap();
            let status = resp.status();
            (status, resp.into_body().collect().await.unwrap().to_bytes())
        }
    });
    futures_util::future::join_all(calls).await
}

fn statuses(replies: &[(http::StatusCode, Bytes)]) -> Vec<u16> {
    replies.iter().map(|(s, _)| s.as_u16()).collect()
}

#[tokio::test]
async fn an_h2c_upstream_connection_is_shared_and_replaced_once_closed() {
    let (url, conns, closed) =
        h2c_upstream(Duration::from_millis(100), Duration::from_secs(3)).await;
    let k = TestKey::new("k", "sa", &["s.a"]);
    let gw = Gateway::start(&route("api", "/api/", &url, "    scopes: [s.a]\n"), &[&k]).await;
    let send = h2_client(gw.addr).await;
    let auth = k.auth();
    let burst = async || {
        for (status, body) in h2_burst(&send, 20, Duration::ZERO, Some(&auth)).await {
            assert_eq!(status, 200);
            assert_eq!(body, "ok");
        }
    };
    // Twenty at once before any connection exists: they wait for the first one's.
    burst().await;
    connections(
        &conns,
        1,
        "twenty overlapping requests, one upstream connection",
    );
    // The connection's life ends: the upstream sends GOAWAY and closes it.
    assert!(
        eventually(10, || async { closed.load(Ordering::SeqCst) == 1 }).await,
        "the upstream never closed its connection"
    );
    burst().await;
    connections(&conns, 2, "a new connection after the GOAWAY, shared again");
    gw.stop().await;
}

#[tokio::test]
async fn requests_waiting_for_an_h2c_connection_that_cannot_open_fail_with_it() {
    // A listener whose accept queue is full: connects to it time out (SYNs are dropped).
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    full.listen(0).unwrap();
    let addr = full.local_addr().unwrap().as_socket().unwrap();
    let _queued = std::net::TcpStream::connect(addr).unwrap();
    let gw = Gateway::start_with(
        "limits:\n  upstream_connect_timeout: 1s\n",
        &route(
            "api",
            "/api/",
            &format!("h2c://{addr}"),
            "    public: true\n    timeout: 3s\n",
        ),
        &[],
    )
    .await;
    let send = h2_client(gw.addr).await;
    // Each waiter dialling again in turn would run past the route's 3 s: 504s.
    let got = statuses(&h2_burst(&send, 10, Duration::ZERO, None).await);
    assert!(
        got.iter().all(|s| *s == 502),
        "every request fails as the connection did: {got:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn requests_keep_succeeding_while_h2c_upstream_connections_come_and_go() {
    // Each connection lives 200 ms: GOAWAYs keep arriving while requests are in flight.
    let (url, conns, _) = h2c_upstream(Duration::from_millis(20), Duration::from_millis(200)).await;
    let gw = Gateway::start(&route("api", "/api/", &url, "    public: true\n"), &[]).await;
    let send = h2_client(gw.addr).await;
    let got = statuses(&h2_burst(&send, 60, Duration::from_millis(25), None).await);
    assert!(
        got.iter().all(|s| *s == 200),
        "no request lost to a closing connection: {got:?}"
    );
    assert!(
        conns.load(Ordering::SeqCst) >= 3,
        "connections were replaced along the way"
    );
    gw.stop().await;
}

/// An h2c upstream written with the h2 crate, which can refuse a stream: it answers "ok"
/// and the request body it read, but refuses (`REFUSED_STREAM`) every other stream it sees,
/// the first included. Returns the streams it saw.
async fn refusing_upstream() -> (String, Arc<AtomicUsize>) {
    let streams = Arc::new(AtomicUsize::new(0));
    let seen = streams.clone();
    let (addr, _) = counting_upstream(move |s| {
        let seen = seen.clone();
        async move {
            let Ok(mut conn) = h2::server::handshake(s).await else {
                return;
            };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                if seen.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                tokio::spawn(async move {
                    let mut got = b"ok".to_vec();
                    let mut body = req.into_body();
                    while let Some(Ok(chunk)) = body.data().await {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        got.extend_from_slice(&chunk);
                    }
                    if let Ok(mut tx) = respond.send_response(http::Response::new(()), false) {
                        let _ = tx.send_data(Bytes::from(got), true);
                    }
                });
            }
        }
    })
    .await;
    (format!("h2c://{addr}"), streams)
}

/// One request on `send`: its status and body.
async fn h2_call(
    send: &hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    method: &str,
    body: &'static str,
) -> (u16, Bytes) {
    let req = http::Request::builder()
        .method(method)
        .uri("http://t/api/x")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let resp = send.clone().send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn a_refused_stream_is_sent_again_with_its_body() {
    let (url, streams) = refusing_upstream().await;
    let gw = Gateway::start(&route("api", "/api/", &url, "    public: true\n"), &[]).await;
    let send = h2_client(gw.addr).await;
    // REFUSED_STREAM: the upstream did not act on it (RFC 9113 8.7), so any method may go
    // again; a POST without a body too.
    assert_eq!(h2_call(&send, "GET", "").await, (200, Bytes::from("ok")));
    assert_eq!(
        streams.load(Ordering::SeqCst),
        2,
        "refused, then sent again"
    );
    assert_eq!(h2_call(&send, "POST", "").await, (200, Bytes::from("ok")));
    assert_eq!(
        streams.load(Ordering::SeqCst),
        4,
        "refused, then sent again"
    );
    // The body goes again from what it gave out the first time.
    let (status, body) = h2_call(&send, "POST", "a body").await;
    assert_eq!((status, body), (200, Bytes::from("oka body")));
    assert_eq!(
        streams.load(Ordering::SeqCst),
        6,
        "refused, then sent again"
    );
    gw.stop().await;
}

#[tokio::test]
async fn requests_a_closing_h2c_upstream_did_not_take_are_sent_on_a_new_connection() {
    // One stream at a time per connection, and one request per connection: the upstream
    // takes a stream, says GOAWAY at once, and answers it a little later (nginx at its
    // `keepalive_requests`). The requests behind it wait for a stream slot, or went before
    // the SETTINGS and are refused; either way none of them is processed on that connection.
    let (addr, conns) = counting_upstream(|s| async move {
        let mut b = h2::server::Builder::new();
        b.max_concurrent_streams(1);
        let Ok(mut conn) = b.handshake::<_, Bytes>(s).await else {
            return;
        };
        let Some(Ok((_req, mut respond))) = conn.accept().await else {
            return;
        };
        conn.graceful_shutdown();
        let answer = async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Ok(mut body) = respond.send_response(http::Response::new(()), false) {
                let _ = body.send_data(Bytes::from_static(b"ok"), true);
            }
        };
        let drive = async { while let Some(Ok(_)) = conn.accept().await {} };
        tokio::join!(answer, drive);
    })
    .await;
    let url = format!("h2c://{addr}");
    let gw = Gateway::start(&route("api", "/api/", &url, "    public: true\n"), &[]).await;
    let send = h2_client(gw.addr).await;
    // Four: the last one served is refused three times, one fewer than keygate resends.
    let got = h2_burst(&send, 4, Duration::ZERO, None).await;
    assert!(
        got.iter().all(|(s, b)| *s == 200 && b == "ok"),
        "every request answered: {:?}",
        statuses(&got)
    );
    assert!(
        conns.load(Ordering::SeqCst) >= 4,
        "one request per upstream connection"
    );
    gw.stop().await;
}

#[tokio::test]
#[cfg_attr(
    not(feature = "peers"),
    ignore = "needs outside peers: cargo test --features peers"
)]
async fn an_nginx_h2c_upstream_closing_each_connection_after_ten_requests_loses_none() {
    // nginx ends an HTTP/2 connection after `keepalive_requests` with a GOAWAY naming the
    // last stream it took; the streams in flight above it are dropped unprocessed.
    let Some(nginx) = crate::edge::Nginx::start_with("keepalive_requests 10;").await else {
        return;
    };
    let url = format!("h2c://{}", nginx.addr);
    let gw = Gateway::start(&route("api", "/api/", &url, "    public: true\n"), &[]).await;
    let send = h2_client(gw.addr).await;
    let mut got = Vec::new();
    for _ in 0..10 {
        got.extend(statuses(&h2_burst(&send, 30, Duration::ZERO, None).await));
    }
    let lost = got.iter().filter(|s| **s != 200).count();
    assert_eq!(lost, 0, "300 requests over 30 connections: {got:?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_refused_stream_is_sent_again_with_the_body_still_arriving() {
    let (url, streams) = refusing_upstream().await;
    let gw = Gateway::start(&route("api", "/api/", &url, "    public: true\n"), &[]).await;
    type Chunks = http_body_util::StreamBody<
        tokio_stream::wrappers::ReceiverStream<
            Result<http_body::Frame<Bytes>, std::convert::Infallible>,
        >,
    >;
    let mut send = h2_client::<Chunks>(gw.addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let req = http::Request::builder()
        .method("POST")
        .uri("http://t/api/x")
        .body(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap();
    let call = tokio::spawn(async move {
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    });
    // The first part goes out before the refusal, the rest after: the body sent again is
    // what was given out, then what still comes.
    tx.send(Ok(http_body::Frame::data(Bytes::from("one,"))))
        .await
        .unwrap();
    assert!(
        eventually(10, || async { streams.load(Ordering::SeqCst) == 2 }).await,
        "refused, then sent again"
    );
    tx.send(Ok(http_body::Frame::data(Bytes::from("two"))))
        .await
        .unwrap();
    drop(tx);
    assert_eq!(call.await.unwrap(), (200, Bytes::from("okone,two")));
    gw.stop().await;
}

/// A TCP relay to `to` that can blackhole its connections: once the returned epoch is
/// bumped, bytes on the connections already open vanish both ways while their sockets stay
/// open (a vanished node, a dropped NAT entry); later connections pass.
async fn freezing_relay(to: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let epoch = Arc::new(AtomicUsize::new(0));
    let now = epoch.clone();
    let (addr, _) = counting_upstream(move |down| {
        let now = now.clone();
        async move {
            let born = now.load(Ordering::SeqCst);
            let Ok(up) = tokio::net::TcpStream::connect(to).await else {
                return;
            };
            let (dr, dw) = down.into_split();
            let (ur, uw) = up.into_split();
            let pass = |mut r: tokio::net::tcp::OwnedReadHalf,
                        mut w: tokio::net::tcp::OwnedWriteHalf| {
                let now = now.clone();
                async move {
                    let mut buf = [0u8; 16384];
                    while let Ok(n @ 1..) = r.read(&mut buf).await {
                        if now.load(Ordering::SeqCst) == born
                            && w.write_all(&buf[..n]).await.is_err()
                        {
                            return;
                        }
                    }
                }
            };
            tokio::join!(pass(dr, uw), pass(ur, dw));
        }
    })
    .await;
    (addr, epoch)
}

#[tokio::test]
async fn a_blackholed_h2c_upstream_connection_is_found_by_a_ping_and_replaced() {
    let (url, conns, _) = h2c_upstream(Duration::ZERO, Duration::from_secs(3600)).await;
    let (relay, epoch) = freezing_relay(url["h2c://".len()..].parse().unwrap()).await;
    // The route's timeout is far off: a request held by the dead connection until then
    // would be a 504.
    let gw = Gateway::start_with(
        "limits:\n  upstream_ping_interval: 1s\n",
        &route(
            "api",
            "/api/",
            &format!("h2c://{relay}"),
            "    public: true\n    timeout: 20s\n",
        ),
        &[],
    )
    .await;
    let send = h2_client(gw.addr).await;
    assert_eq!(
        statuses(&h2_burst(&send, 1, Duration::ZERO, None).await),
        [200]
    );
    epoch.fetch_add(1, Ordering::SeqCst);
    // Silent for upstream_ping_interval with a request waiting: pinged; unanswered for as
    // long again: closed. The request it held may have been acted on, so it is not resent.
    assert_eq!(
        statuses(&h2_burst(&send, 1, Duration::ZERO, None).await),
        [502]
    );
    assert_eq!(
        statuses(&h2_burst(&send, 1, Duration::ZERO, None).await),
        [200]
    );
    connections(&conns, 2, "the dead connection was replaced");
    gw.stop().await;
}
