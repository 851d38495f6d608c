//! Hostile input: smuggling and desync, header abuse, path abuse, framing, slow clients.
//! Each case checks the status and that no upstream saw what it must not.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::*;

struct Setup {
    public: Upstream,
    private: Upstream,
    gw: Gateway,
    key: TestKey,
}

async fn setup() -> Setup {
    let public = Upstream::start().await;
    let private = Upstream::start().await;
    let key = TestKey::new("k", "sa", &["s.a"]);
    let routes = format!(
        "{}{}",
        route("pub", "/pub/", &public.url(), "    public: true\n"),
        route(
            "api",
            "/api/",
            &private.url(),
            "    scopes: [s.a]\n    timeout: 1s\n"
        ),
    );
    let gw = Gateway::start(&routes, &[&key]).await;
    Setup {
        public,
        private,
        gw,
        key,
    }
}

impl Setup {
    fn private_paths(&self) -> Vec<String> {
        self.private
            .seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.uri.clone())
            .collect()
    }
}

const SMUGGLED: &str = "GET /api/secret HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";

#[tokio::test]
async fn smuggling_and_desync_never_bypass_auth() {
    let s = setup().await;
    let n = SMUGGLED.len();
    let cases: Vec<(&str, String)> = vec![
        ("CL+TE", format!("POST /pub/x HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}")),
        ("TE+CL", format!("POST /pub/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: {n}\r\n\r\n0\r\n\r\n{SMUGGLED}")),
        ("two CL", format!("POST /pub/x HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nContent-Length: {n}\r\n\r\n{SMUGGLED}")),
        ("CL list", format!("POST /pub/x HTTP/1.1\r\nHost: t\r\nContent-Length: 0, {n}\r\n\r\n{SMUGGLED}")),
        ("TE space", format!("POST /pub/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked \r\nContent-Length: {n}\r\n\r\n{SMUGGLED}")),
        ("TE xchunked", format!("POST /pub/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\nContent-Length: {n}\r\n\r\n{SMUGGLED}")),
        ("TE chunked,identity", format!("POST /pub/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, identity\r\nContent-Length: {n}\r\n\r\n{SMUGGLED}")),
        ("TE tab", format!("POST /pub/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\tchunked\r\nContent-Length: {n}\r\n\r\n0\r\n\r\n{SMUGGLED}")),
        ("TE obs-fold", format!("POST /pub/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: {n}\r\n\r\n{SMUGGLED}")),
        ("bare LF", format!("POST /pub/x HTTP/1.1\nHost: t\nContent-Length: {n}\n\n{SMUGGLED}")),
        ("bad chunk size", format!("POST /pub/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n{SMUGGLED}")),
        ("chunk size overflow", format!("POST /pub/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nabc\r\n0\r\n\r\n{SMUGGLED}")),
        ("body hides request", format!("POST /pub/x HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\n\r\n{SMUGGLED}")),
        ("chunked hides request", format!("POST /pub/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{n:x}\r\n{SMUGGLED}\r\n0\r\n\r\n")),
    ];
    for (name, req) in &cases {
        let statuses = raw_statuses(s.gw.addr, req.as_bytes()).await;
        eprintln!("{name}: {statuses:?}");
        // Whatever the framing decision, the smuggled request may only ever be seen by the
        // gateway itself as a separate request, where it needs a key like any other.
        assert!(
            !statuses.contains(&200) || statuses[0] == 200,
            "{name}: {statuses:?}"
        );
        assert!(
            statuses.iter().skip(1).all(|&st| st == 401 || st == 400),
            "{name}: {statuses:?}"
        );
        assert!(
            s.private_paths().is_empty(),
            "{name}: private upstream saw {:?}",
            s.private_paths()
        );
    }
    // The body that hid a request reached the public upstream as one request with that body.
    let seen = s.public.seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|r| r.uri == "/pub/x"),
        "{:?}",
        seen.iter().map(|r| &r.uri).collect::<Vec<_>>()
    );
    assert!(seen.iter().any(|r| r.body_len == n));
    s.gw.stop().await;
}

#[tokio::test]
async fn conflicting_framing_is_rejected() {
    let s = setup().await;
    for (name, req) in [
        (
            "two CL",
            "POST /pub/x HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ),
        (
            "folded header",
            "GET /pub/x HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n  continued\r\n\r\n",
        ),
        (
            "TE not chunked",
            "POST /pub/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nab",
        ),
        (
            "space before colon",
            "GET /pub/x HTTP/1.1\r\nHost: t\r\nContent-Length : 0\r\n\r\n",
        ),
    ] {
        let st = raw_statuses(s.gw.addr, req.as_bytes()).await;
        assert!(
            st.is_empty() || st == vec![400] || st == vec![501],
            "{name}: {st:?}"
        );
    }
    assert_eq!(s.public.count(), 0);
    s.gw.stop().await;
}

#[tokio::test]
async fn header_abuse() {
    let s = setup().await;
    let addr = s.gw.addr;
    let key = s.key.secret.clone();
    let send = |h: Vec<u8>| async move {
        let mut req = b"GET /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n".to_vec();
        req.extend_from_slice(&h);
        req.extend_from_slice(b"\r\n");
        raw_statuses(addr, &req).await
    };
    assert_eq!(
        send(
            format!("Authorization: Api-Key {key}\r\nAuthorization: Api-Key {key}\r\n")
                .into_bytes()
        )
        .await,
        vec![400]
    );
    assert_eq!(
        send(format!("Authorization: Api-Key {key}\r\nauthorization: Bearer x\r\n").into_bytes())
            .await,
        vec![400]
    );
    assert_eq!(
        send(format!("Authorization: Api-Key {} {}\r\n", &key[..20], &key[20..]).into_bytes())
            .await,
        vec![401]
    );
    let ctl = send(
        format!(
            "Authorization: Api-Key {}\x01{}\r\n",
            &key[..20],
            &key[20..]
        )
        .into_bytes(),
    )
    .await;
    assert!(ctl.is_empty() || ctl == vec![400], "control char: {ctl:?}");
    let mut non_utf8 = b"Authorization: Api-Key kg_\xff\xfe\xfd".to_vec();
    non_utf8.extend_from_slice(b"\r\n");
    assert_eq!(send(non_utf8).await, vec![401]);
    let mut latin = b"Authorization: Api-Key caf\xe9-key".to_vec();
    latin.extend_from_slice(b"\r\n");
    assert_eq!(send(latin).await, vec![401]);
    let folded = send(format!("Authorization: Api-Key\r\n {key}\r\n").into_bytes()).await;
    assert!(
        folded.is_empty() || folded == vec![400],
        "split Authorization: {folded:?}"
    );
    let huge =
        send(format!("Authorization: Api-Key {}\r\n", "k".repeat(1 << 20)).into_bytes()).await;
    assert!(
        huge.is_empty() || huge == vec![431],
        "megabyte key: {huge:?}"
    );
    let many: String = (0..5000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = send(many.into_bytes()).await;
    assert!(
        many.is_empty() || many == vec![431],
        "thousands of headers: {many:?}"
    );
    let block = send(format!("X-Pad: {}\r\n", "p".repeat(100_000)).into_bytes()).await;
    assert!(
        block.is_empty() || block == vec![431],
        "oversized block: {block:?}"
    );
    assert!(s.private_paths().is_empty());
    s.gw.stop().await;
}

#[tokio::test]
async fn request_targets_and_hosts() {
    let s = setup().await;
    let cases: Vec<(&str, &str, Vec<u16>)> = vec![
        (
            "CONNECT",
            "CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\n\r\n",
            vec![400],
        ),
        (
            "OPTIONS *",
            "OPTIONS * HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            vec![400],
        ),
        (
            "two Host",
            "GET /pub/x HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
            vec![400],
        ),
        (
            "no Host",
            "GET /pub/x HTTP/1.1\r\nConnection: close\r\n\r\n",
            vec![400],
        ),
        (
            "double encoding",
            "GET /pub/%252e%252e/api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            vec![200],
        ),
        (
            "encoded dot-dot into api",
            "GET /pub/%2e%2e/api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            vec![401],
        ),
        (
            "absolute-form into api",
            "GET http://t/api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            vec![401],
        ),
        (
            "overlong dot",
            "GET /pub/%c0%ae%c0%ae/api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            vec![400],
        ),
        (
            "params dot-dot",
            "GET /pub/..;/api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            vec![400],
        ),
        (
            "backslash",
            "GET /pub\\..\\api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            vec![400],
        ),
    ];
    for (name, req, want) in cases {
        let st = raw_statuses(s.gw.addr, req.as_bytes()).await;
        assert!(
            st == want || (st.is_empty() && want == vec![400]),
            "{name}: got {st:?}, want {want:?}"
        );
    }
    // Double encoding stays encoded: the public upstream gets it as one opaque segment.
    assert_eq!(s.public.last().uri, "/pub/%252e%252e/api/x");
    assert!(s.private_paths().is_empty());
    s.gw.stop().await;
}

#[tokio::test]
async fn host_that_matches_no_route_is_404() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        &route(
            "h",
            "/",
            &up.url(),
            "    public: true\n    host: api.example.com\n",
        ),
        &[],
    )
    .await;
    let st = raw_statuses(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: evil.example.net\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(st, vec![404]);
    assert_eq!(up.count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn slow_clients_do_not_starve_well_behaved_ones() {
    let up = Upstream::start().await;
    let gw = Gateway::start_with(
        "limits:\n  header_read_timeout: 2s\n",
        &route(
            "pub",
            "/pub/",
            &up.url(),
            "    public: true\n    timeout: 1s\n",
        ),
        &[],
    )
    .await;
    // 500 slowloris connections: a partial head, then a byte now and then.
    let mut slow = Vec::new();
    for i in 0..500 {
        let mut c = TcpStream::connect(gw.addr).await.unwrap();
        c.write_all(format!("GET /pub/{i} HTTP/1.1\r\nHost: t\r\nX-Slow: ").as_bytes())
            .await
            .unwrap();
        slow.push(c);
    }
    // And a slow body: headers promise 1000 bytes, 10 arrive.
    let mut slow_body = TcpStream::connect(gw.addr).await.unwrap();
    slow_body
        .write_all(b"POST /pub/body HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut ok = 0;
    for i in 0..100 {
        if get(gw.addr, &format!("/pub/ok{i}"), &[]).await.status == 200 {
            ok += 1;
        }
    }
    assert_eq!(
        ok, 100,
        "well-behaved requests failed while 500 slow connections were open"
    );
    // The timeouts cut the slow ones.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut cut = 0;
    for c in slow.iter_mut() {
        let mut b = [0u8; 1024];
        if let Ok(Ok(0)) | Ok(Err(_)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::io::AsyncReadExt::read(c, &mut b),
        )
        .await
        {
            cut += 1;
        }
    }
    assert_eq!(
        cut, 500,
        "slowloris connections still open after header_read_timeout"
    );
    let mut reply = vec![0u8; 4096];
    let n = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::io::AsyncReadExt::read(&mut slow_body, &mut reply),
    )
    .await
    .expect("slow body not cut")
    .unwrap_or(0);
    let text = String::from_utf8_lossy(&reply[..n]);
    assert!(
        n == 0 || text.starts_with("HTTP/1.1 504") || text.starts_with("HTTP/1.1 400"),
        "{text}"
    );
    assert!(
        up.seen.lock().unwrap().iter().all(|r| r.uri != "/pub/body"),
        "an incomplete body reached the upstream as a complete request"
    );
    gw.stop().await;
}
