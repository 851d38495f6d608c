//! What reaches the upstream and what comes back: headers, streaming bodies, HTTP/2, faults.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::support::*;

async fn setup(k: &TestKey) -> (Upstream, Gateway) {
    let up = Upstream::start().await;
    let routes = format!(
        "{}{}",
        route("api", "/api/", &up.url(), "    scopes: [s.a]\n"),
        route("health", "/health", &up.url(), "    public: true\n"),
    );
    (up.clone(), Gateway::start(&routes, &[k]).await)
}

#[tokio::test]
async fn identity_headers_replace_spoofed_ones() {
    let k = TestKey::new("real-id", "real-sa", &["s.a"]);
    let (up, gw) = setup(&k).await;
    let a = format!("Authorization: {}", k.auth());
    let r = get(
        gw.addr,
        "/api/x",
        &[
            &a,
            "X-Api-Key-Id: forged",
            "X-Service-Account: root",
            "x-api-key-id: forged2",
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    let ids: Vec<_> = seen.headers.get_all("x-api-key-id").iter().collect();
    assert_eq!(ids, vec!["real-id"]);
    let sas: Vec<_> = seen.headers.get_all("x-service-account").iter().collect();
    assert_eq!(sas, vec!["real-sa"]);
    // On public routes spoofed identity is removed and nothing is set.
    let r = get(
        gw.addr,
        "/health",
        &["X-Api-Key-Id: forged", "X-Service-Account: root"],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert!(seen.headers.get("x-api-key-id").is_none());
    assert!(seen.headers.get("x-service-account").is_none());
    gw.stop().await;
}

#[tokio::test]
async fn custom_identity_header_names() {
    let up = Upstream::start().await;
    let k = TestKey::new("kid", "ksa", &[]);
    let gw = Gateway::start_with(
        "identity_headers:\n  key_id: X-Caller-Key\n  service_account: X-Caller\n",
        &route("api", "/api/", &up.url(), "    scopes: []\n"),
        &[&k],
    )
    .await;
    let r = get(
        gw.addr,
        "/api/x",
        &[&format!("Authorization: {}", k.auth()), "X-Caller: forged"],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert_eq!(seen.headers.get("x-caller-key").unwrap(), "kid");
    assert_eq!(
        seen.headers.get_all("x-caller").iter().collect::<Vec<_>>(),
        vec!["ksa"]
    );
    gw.stop().await;
}

#[tokio::test]
async fn public_routes_drop_api_keys_but_pass_other_schemes() {
    let k = TestKey::new("k", "sa", &["s.a"]);
    let (up, gw) = setup(&k).await;
    let r = get(
        gw.addr,
        "/health",
        &[&format!("Authorization: {}", k.auth())],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(up.last().headers.get("authorization").is_none());
    let r = get(gw.addr, "/health", &["Authorization: api-key whatever"]).await;
    assert_eq!(r.status, 200);
    assert!(up.last().headers.get("authorization").is_none());
    let r = get(gw.addr, "/health/x", &["Authorization: Bearer tok"]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        up.last().headers.get("authorization").unwrap(),
        "Bearer tok"
    );
    gw.stop().await;
}

#[tokio::test]
async fn forwarded_headers_and_request_id() {
    let k = TestKey::new("k", "sa", &["s.a"]);
    let (up, gw) = setup(&k).await;
    let a = format!("Authorization: {}", k.auth());
    let r = get(
        gw.addr,
        "/api/x",
        &[
            &a,
            "X-Forwarded-For: 203.0.113.9",
            "X-Forwarded-Proto: https",
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert_eq!(
        seen.headers.get("x-forwarded-for").unwrap(),
        "203.0.113.9, 127.0.0.1"
    );
    assert_eq!(seen.headers.get("x-forwarded-proto").unwrap(), "http");
    assert_eq!(seen.headers.get("x-forwarded-host").unwrap(), "test.local");
    assert_eq!(seen.headers.get("host").unwrap(), "test.local");
    let generated = seen.headers.get("x-request-id").unwrap().clone();
    assert!(!generated.is_empty());
    assert_eq!(r.headers.get("x-request-id").unwrap(), &generated);
    let r = get(gw.addr, "/api/x", &[&a, "X-Request-Id: trace-123"]).await;
    assert_eq!(up.last().headers.get("x-request-id").unwrap(), "trace-123");
    assert_eq!(r.headers.get("x-request-id").unwrap(), "trace-123");
    // Error answers carry the id too.
    let r = get(gw.addr, "/api/x", &["X-Request-Id: trace-456"]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.headers.get("x-request-id").unwrap(), "trace-456");
    gw.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_dropped_both_ways() {
    let k = TestKey::new("k", "sa", &["s.a"]);
    let (up, gw) = setup(&k).await;
    let a = format!("Authorization: {}", k.auth());
    let r = get(
        gw.addr,
        "/api/x",
        &[
            &a,
            "Connection: close, X-Private",
            "X-Private: 1",
            "Keep-Alive: 5",
            "Proxy-Authorization: Basic x",
            "X-Upstream-Mode: hop",
            "TE: trailers",
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    for h in ["x-private", "keep-alive", "proxy-authorization"] {
        assert!(seen.headers.get(h).is_none(), "{h} reached the upstream");
    }
    assert_eq!(seen.headers.get("te").unwrap(), "trailers");
    assert!(r.headers.get("x-upstream-private").is_none());
    assert!(r.headers.get("keep-alive").is_none());
    assert_eq!(r.headers.get("x-upstream-public").unwrap(), "1");
    gw.stop().await;
}

#[tokio::test]
async fn ten_mib_request_body_streams_intact() {
    let k = TestKey::new("k", "sa", &["s.a"]);
    let (up, gw) = setup(&k).await;
    let body: Vec<u8> = (0..BIG).map(|i| (i * 7 % 256) as u8).collect();
    let expect = hex::encode(Sha256::digest(&body));
    // Chunked upload: the gateway cannot know the length, so it must stream.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /api/upload HTTP/1.1\r\nHost: t\r\nAuthorization: {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        k.auth()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.chunks(256 * 1024) {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(chunk).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf)
        .await
        .unwrap();
    assert!(
        buf.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..64.min(buf.len())])
    );
    let seen = up.last();
    assert_eq!(seen.body_len, BIG);
    assert_eq!(seen.body_sha256, expect);
    gw.stop().await;
}

#[tokio::test]
async fn ten_mib_response_streams_back() {
    let k = TestKey::new("k", "sa", &["s.a"]);
    let (_up, gw) = setup(&k).await;
    let r = get(
        gw.addr,
        "/api/big",
        &[
            &format!("Authorization: {}", k.auth()),
            "X-Upstream-Mode: big",
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), BIG);
    assert!(r
        .body
        .chunks(65536)
        .enumerate()
        .all(|(i, c)| c.iter().all(|&b| b == (i % 251) as u8)));
    gw.stop().await;
}

#[tokio::test]
async fn http2_prior_knowledge_on_the_same_port() {
    let k = TestKey::new("k", "sa", &["s.a"]);
    let (up, gw) = setup(&k).await;
    let mut send = h2_client(gw.addr).await;
    for (auth, want) in [(Some(k.auth()), 200), (None, 401)] {
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}/api/h2", gw.addr));
        if let Some(a) = &auth {
            req = req.header("authorization", a);
        }
        let resp = send
            .send_request(
                req.body(Full::new(Bytes::from_static(b"hello h2")))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), want);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let _ = resp.into_body().collect().await.unwrap();
    }
    let seen = up.last();
    assert_eq!(seen.body_len, 8);
    assert_eq!(seen.headers.get("x-api-key-id").unwrap(), "k");
    gw.stop().await;
}

#[tokio::test]
async fn keep_alive_serves_many_requests_on_one_connection() {
    let k = TestKey::new("k", "sa", &["s.a"]);
    let (up, gw) = setup(&k).await;
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    for i in 0..20 {
        let req = http::Request::builder()
            .uri(format!("/api/{i}"))
            .header("host", "t")
            .header("authorization", k.auth())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let _ = resp.into_body().collect().await.unwrap();
    }
    assert_eq!(up.count(), 20);
    gw.stop().await;
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_upstream_is_504() {
    let up = Upstream::start().await;
    // A free port outside the range port-0 binds draw from: nothing listens there.
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], crate::cli::free_port()));
    let routes = format!(
        "{}{}{}",
        route(
            "dead",
            "/dead/",
            &format!("http://{dead}"),
            "    public: true\n"
        ),
        route(
            "slow",
            "/slow/",
            &up.url(),
            "    public: true\n    timeout: 500ms\n"
        ),
        route("ok", "/ok/", &up.url(), "    public: true\n"),
    );
    let gw = Gateway::start(&routes, &[]).await;
    let r = get(gw.addr, "/dead/x", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.code(), "upstream_unavailable");
    let started = std::time::Instant::now();
    let r = get(gw.addr, "/slow/x", &["X-Upstream-Mode: sleep"]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.code(), "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Other routes keep working.
    assert_eq!(get(gw.addr, "/ok/x", &[]).await.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn grpc_clients_get_grpc_status() {
    let k = TestKey::new("k", "sa", &["s.a"]);
    let (_up, gw) = setup(&k).await;
    let r = request(
        gw.addr,
        "POST",
        "/api/pkg.Svc/Call",
        &["Content-Type: application/grpc"],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.get("grpc-status").unwrap(), "16");
    let r = request(
        gw.addr,
        "POST",
        "/nothing",
        &["Content-Type: application/grpc+proto"],
        b"",
    )
    .await;
    assert_eq!(r.headers.get("grpc-status").unwrap(), "12");
    gw.stop().await;
}

#[tokio::test]
async fn server_sent_events_are_not_buffered() {
    let k = TestKey::new("k", "sa", &["s.a"]);
    let (_up, gw) = setup(&k).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = format!(
        "GET /api/events HTTP/1.1\r\nHost: t\r\nAuthorization: {}\r\nX-Upstream-Mode: sse\r\n\r\n",
        k.auth()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data: 0") {
        let n = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut s, &mut buf),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    // A buffering proxy would deliver the first event only together with the last.
    assert!(
        !String::from_utf8_lossy(&got).contains("data: 2"),
        "events arrived all at once"
    );
    gw.stop().await;
}
