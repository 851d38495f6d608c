//! Edge trust: upgrade smuggling, path parameters, transfer codings, tunnels that outlive
//! their key, HTTP/2 `:authority`, keep-alive timers, cancelled requests, trailers, readiness
//! during rollouts. Each test fails on a gateway without the fix.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::cli::free_port;
use crate::support::*;

/// A raw HTTP/1.1 upstream that accepts any `Upgrade` it is offered (as an h2c-capable
/// server does), then records every byte that follows, and answers 200 otherwise.
/// `always_switch` makes it answer 101 even to a request that asked for nothing.
#[derive(Clone)]
struct SwitchingUpstream {
    addr: std::net::SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    after_switch: Arc<Mutex<Vec<u8>>>,
}

impl SwitchingUpstream {
    async fn start(always_switch: bool) -> SwitchingUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = SwitchingUpstream {
            addr: listener.local_addr().unwrap(),
            heads: Arc::default(),
            after_switch: Arc::default(),
        };
        let rec = up.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let rec = rec.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        buf.drain(..end + 4);
                        rec.heads.lock().unwrap().push(head.clone());
                        let upgrade = head
                            .lines()
                            .find_map(|l| l.strip_prefix("upgrade:"))
                            .map(|v| v.trim().to_string());
                        if let Some(proto) = upgrade.or(always_switch.then(|| "h2c".into())) {
                            let resp = format!(
                                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {proto}\r\n\r\n"
                            );
                            let _ = s.write_all(resp.as_bytes()).await;
                            rec.after_switch.lock().unwrap().extend_from_slice(&buf);
                            while let Ok(n) = s.read(&mut chunk).await {
                                if n == 0 {
                                    return;
                                }
                                rec.after_switch
                                    .lock()
                                    .unwrap()
                                    .extend_from_slice(&chunk[..n]);
                                // Echo, as a WebSocket echo server would.
                                let _ = s.write_all(&chunk[..n]).await;
                            }
                            return;
                        }
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await;
                    }
                });
            }
        });
        up
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

const H2C_UPGRADE: &str = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n";

#[tokio::test]
async fn h2c_upgrade_is_never_forwarded() {
    let up = SwitchingUpstream::start(false).await;
    let k = TestKey::new("k", "sa", &["p.read"]);
    let routes = format!(
        "{}{}",
        route("pub", "/pub/", &up.url(), "    public: true\n"),
        route("p", "/p/", &up.url(), "    scopes: [p.read]\n"),
    );
    let gw = Gateway::start(&routes, &[&k]).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let req = format!("GET /pub/x HTTP/1.1\r\nHost: test.local\r\n{H2C_UPGRADE}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The client now tries HTTP/2 on that connection, as the smuggling attack does.
    let _ = s
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    let heads = up.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(!heads[0].contains("upgrade"), "{}", heads[0]);
    assert!(!heads[0].contains("http2-settings"), "{}", heads[0]);
    assert!(up.after_switch.lock().unwrap().is_empty());
    // Without `Connection: upgrade` too, and on protected routes.
    let a = format!("Authorization: {}", k.auth());
    for extra in [
        &["Upgrade: h2c", "HTTP2-Settings: AAMAAABk"][..],
        &["Connection: upgrade", "Upgrade: foo/1"][..],
        &["Connection: upgrade", "Upgrade: h2c", &a][..],
    ] {
        let r = get(gw.addr, "/p/secret", extra).await;
        assert!(
            r.status == 200 || r.status == 401,
            "{extra:?}: {}",
            r.status
        );
    }
    for h in up.heads.lock().unwrap().iter() {
        assert!(
            !h.contains("upgrade:") && !h.contains("http2-settings"),
            "{h}"
        );
    }
    gw.stop().await;
}

#[tokio::test]
#[cfg_attr(
    not(feature = "peers"),
    ignore = "needs outside peers: cargo test --features peers"
)]
async fn hypercorn_h2c_upgrade_gets_no_tunnel() {
    if !peer_available(
        "hypercorn",
        std::process::Command::new("python3").args(["-c", "import hypercorn"]),
    ) {
        return;
    }
    let port = free_port();
    let app = format!("{}/tests/it/py", env!("CARGO_MANIFEST_DIR"));
    let mut child = std::process::Command::new("python3")
        .args(["-m", "hypercorn", "--bind", &format!("127.0.0.1:{port}")])
        .arg("asgi_echo:app")
        .current_dir(&app)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let up_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    crate::cli::wait_listening(up_addr).await;
    let routes = format!(
        "{}{}",
        route(
            "pub",
            "/pub/",
            &format!("http://{up_addr}"),
            "    public: true\n"
        ),
        route(
            "p",
            "/p/",
            &format!("http://{up_addr}"),
            "    scopes: [p.read]\n"
        ),
    );
    let gw = Gateway::start(&routes, &[]).await;
    // Straight to hypercorn, the upgrade is accepted: the test peer is a real h2c server.
    let direct = raw(
        up_addr,
        format!("GET /pub/x HTTP/1.1\r\nHost: test.local\r\n{H2C_UPGRADE}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(direct.status, 101);
    let via = raw(
        gw.addr,
        b"GET /pub/x HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\n\r\n",
    )
    .await;
    assert_eq!(via.status, 200, "{}", String::from_utf8_lossy(&via.body));
    let _ = child.kill();
    let _ = child.wait();
    gw.stop().await;
}

#[tokio::test]
async fn unasked_switch_is_502_and_websocket_false_forwards_no_upgrade() {
    let rogue = SwitchingUpstream::start(true).await;
    let ws = SwitchingUpstream::start(false).await;
    let routes = format!(
        "{}{}",
        route("rogue", "/rogue/", &rogue.url(), "    public: true\n"),
        route(
            "nows",
            "/nows/",
            &ws.url(),
            "    public: true\n    websocket: false\n"
        ),
    );
    let gw = Gateway::start(&routes, &[]).await;
    let r = get(gw.addr, "/rogue/x", &[]).await;
    assert_eq!(r.status, 502);
    let r = get(
        gw.addr,
        "/nows/x",
        &[
            "Connection: Upgrade",
            "Upgrade: websocket",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let heads = ws.heads.lock().unwrap().clone();
    assert!(!heads[0].contains("upgrade:"), "{}", heads[0]);
    gw.stop().await;
}

#[tokio::test]
async fn path_parameters_do_not_dodge_routes() {
    let public = Upstream::start().await;
    let private = Upstream::start().await;
    let k = TestKey::new("k", "sa", &["p.read"]);
    let routes = format!(
        "{}{}",
        route("p", "/p/", &private.url(), "    scopes: [p.read]\n"),
        route("all", "/", &public.url(), "    public: true\n"),
    );
    let gw = Gateway::start(&routes, &[&k]).await;
    // The readiness probe went to the catch-all route.
    let base = public.count();
    for p in [
        "/p;x/secret",
        "/p;/secret",
        "/p%3Bx/secret",
        "/p;jsessionid=1/secret",
        "/;x/p/secret",
        "/%3Bx/p/secret",
    ] {
        assert_eq!(get(gw.addr, p, &[]).await.status, 401, "{p}");
    }
    assert_eq!(public.count() + private.count(), base);
    let a = format!("Authorization: {}", k.auth());
    assert_eq!(get(gw.addr, "/p;x/secret", &[&a]).await.status, 200);
    assert_eq!(
        private.last().uri,
        "/p;x/secret",
        "parameters reach the upstream"
    );
    for p in [
        "/pub/..%3B/p/secret",
        "/pub/..%3b/p/secret",
        "/pub/.%3Bx/p/secret",
        "/pub/%2e%2e;/p/secret",
        "/pub/..;/p/secret",
    ] {
        let r = get(gw.addr, p, &[]).await;
        assert_eq!(r.status, 400, "{p}");
        assert_eq!(r.code(), "bad_request", "{p}");
    }
    assert_eq!(public.count(), base);
    // A key sent with a tab after the scheme is still a key: never forwarded, even on a
    // public route.
    let tabbed = format!("Authorization: Api-Key\t{}", k.secret);
    assert_eq!(get(gw.addr, "/open", &[&tabbed]).await.status, 200);
    assert!(public.last().headers.get("authorization").is_none());
    gw.stop().await;
}

#[tokio::test]
async fn repeated_chunked_is_400_and_not_forwarded() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&route("pub", "/", &up.url(), "    public: true\n"), &[]).await;
    let base = up.count();
    for te in [
        "Transfer-Encoding: chunked, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: gzip, chunked\r\n",
    ] {
        let req = format!(
            "POST /x HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n{te}\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let r = raw(gw.addr, req.as_bytes()).await;
        assert_eq!(r.status, 400, "{te:?}");
        assert_eq!(r.code(), "bad_request", "{te:?}");
    }
    assert_eq!(up.count(), base);
    let ok = "POST /x HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    assert_eq!(raw(gw.addr, ok.as_bytes()).await.status, 200);
    gw.stop().await;
}

const WS_REQUEST: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// Opens a WebSocket tunnel through the gateway with `key` and checks that bytes echo.
async fn open_tunnel(addr: std::net::SocketAddr, key: &TestKey) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws/chat HTTP/1.1\r\nHost: test.local\r\nAuthorization: {}\r\n{WS_REQUEST}\r\n",
        key.auth()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    s.write_all(b"ping").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"ping");
    s
}

/// Seconds until the peer closes `s`, or None if it stays open `limit` seconds.
async fn closes_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

async fn metric(admin: std::net::SocketAddr, name: &str) -> f64 {
    let m = String::from_utf8(get(admin, "/metrics", &[]).await.body).unwrap();
    m.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test]
async fn websocket_counts_as_a_connection_and_ends_with_its_key() {
    let up = SwitchingUpstream::start(false).await;
    let admin = free_port();
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let k = TestKey::new("ws-key", "sa", &["ws.use"]);
    let gw = Gateway::start_with(
        &format!("admin_listen: 127.0.0.1:{admin}\nlimits:\n  max_connections: 2\n"),
        &route("ws", "/ws/", &up.url(), "    scopes: [ws.use]\n"),
        &[&k],
    )
    .await;
    let mut tunnel = open_tunnel(gw.addr, &k).await;
    assert!(
        eventually(5, || async {
            metric(admin_addr, "keygate_active_connections").await == 1.0
        })
        .await,
        "an open tunnel is an active connection"
    );
    // With one of two slots held by the tunnel, a second tunnel fills the cap and a third
    // client waits in the accept queue.
    let mut second = open_tunnel(gw.addr, &k).await;
    let mut third = TcpStream::connect(gw.addr).await.unwrap();
    third
        .write_all(b"GET /ws/x HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(800), third.read(&mut buf))
            .await
            .is_err(),
        "tunnels must count toward max_connections"
    );
    let _ = second.shutdown().await;
    drop(second);
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("served once a tunnel closed")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 401"), "{:?}", &buf[..n]);

    // Revoking the key closes the tunnel it opened.
    let revoked = TestKey {
        id: k.id.clone(),
        secret: k.secret.clone(),
        sa: k.sa.clone(),
        scopes: k.scopes.clone(),
        extra: "    revoked_at: 2026-01-02T00:00:00Z\n".into(),
    };
    let t0 = Instant::now();
    write(&gw.path("keys.yaml"), &key_file(&[&revoked]));
    let closed = closes_within(&mut tunnel, Duration::from_secs(6)).await;
    assert!(closed.is_some(), "tunnel outlived its revoked key");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(
        eventually(5, || async {
            metric(admin_addr, "keygate_active_connections").await == 0.0
        })
        .await
    );
    gw.stop().await;
}

#[tokio::test]
async fn websocket_ends_when_its_key_expires_and_at_shutdown_grace() {
    let up = SwitchingUpstream::start(false).await;
    let expires = (time::OffsetDateTime::now_utc() + time::Duration::seconds(3))
        .replace_nanosecond(0)
        .unwrap();
    let expiring = TestKey::new("short", "sa", &["ws.use"]).with(&format!(
        "    expires_at: {}\n",
        expires
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    ));
    let lasting = TestKey::new("long", "sa", &["ws.use"]);
    let gw = Gateway::start_with(
        "shutdown_grace: 1s\n",
        &route("ws", "/ws/", &up.url(), "    scopes: [ws.use]\n"),
        &[&expiring, &lasting],
    )
    .await;
    let mut short = open_tunnel(gw.addr, &expiring).await;
    let mut long = open_tunnel(gw.addr, &lasting).await;
    let closed = closes_within(&mut short, Duration::from_secs(8)).await;
    let now = time::OffsetDateTime::now_utc();
    assert!(closed.is_some(), "tunnel outlived its expired key");
    assert!(
        now >= expires && now - expires < time::Duration::seconds(2),
        "{now} vs {expires}"
    );
    long.write_all(b"still").await.unwrap();
    let mut buf = [0u8; 16];
    let n = long.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"still");
    // Shutdown: the remaining tunnel is closed at the end of the 1 s grace.
    let t0 = Instant::now();
    let stop = tokio::spawn(gw.stop());
    let closed = closes_within(&mut long, Duration::from_secs(6)).await;
    assert!(closed.is_some(), "tunnel outlived shutdown_grace");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    stop.await.unwrap();
}

/// nginx with `listen ... http2` (h2c with prior knowledge) that echoes the host it saw.
pub(crate) struct Nginx {
    child: std::process::Child,
    pub(crate) addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    async fn start() -> Option<Nginx> {
        Nginx::start_with("").await
    }

    /// With `http` added to its `http` block.
    pub(crate) async fn start_with(http: &str) -> Option<Nginx> {
        if !peer_available("nginx", std::process::Command::new("nginx").arg("-v")) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let p = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {p}/nginx.pid;\nerror_log {p}/error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {p};\n  {http}\n  server {{\n    listen 127.0.0.1:{port} http2;\n    location / {{ return 200 \"host=$host http_host=$http_host proto=$server_protocol\\n\"; }}\n  }}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = std::process::Command::new("nginx")
            .args(["-p"])
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        crate::cli::wait_listening(addr).await;
        Some(Nginx {
            child,
            addr,
            _dir: dir,
        })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "peers"),
    ignore = "needs outside peers: cargo test --features peers"
)]
async fn h2c_upstream_nginx_gets_the_client_host_as_authority() {
    let Some(nginx) = Nginx::start().await else {
        return;
    };
    let k = TestKey::new("k", "sa", &["n.read"]);
    let gw = Gateway::start(
        &route(
            "nginx",
            "/",
            &format!("h2c://{}", nginx.addr),
            "    scopes: [n.read]\n",
        ),
        &[&k],
    )
    .await;
    let a = format!("Authorization: {}", k.auth());
    let r = get(gw.addr, "/x", &[&a]).await;
    let body = String::from_utf8_lossy(&r.body).to_string();
    assert_eq!(r.status, 200, "{body}");
    assert!(body.contains("host=test.local"), "{body}");
    assert!(body.contains("proto=HTTP/2.0"), "{body}");

    // Through an HTTP/2 client too.
    let mut send = h2_client(gw.addr).await;
    let req = http::Request::builder()
        .uri("http://api.example.com/y")
        .header("authorization", k.auth())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("host=api.example.com"), "{body}");
    gw.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_lives_idle_timeout_and_slow_heads_are_cut() {
    let up = Upstream::start().await;
    let gw = Gateway::start_with(
        "limits:\n  header_read_timeout: 1s\n  idle_timeout: 4s\n",
        &route("pub", "/", &up.url(), "    public: true\n"),
        &[],
    )
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let req = b"GET /a HTTP/1.1\r\nHost: test.local\r\n\r\n";
    let mut buf = vec![0u8; 65536];
    for round in 0..2 {
        s.write_all(req).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "round {round}: closed early"
        );
        // Idle well past header_read_timeout, inside idle_timeout.
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    let closed = closes_within(&mut s, Duration::from_secs(6)).await;
    assert!(closed.is_some(), "idle connection never closed");

    // A head that starts and stalls is cut at header_read_timeout.
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    slow.write_all(b"GET /a HTTP/1.1\r\n").await.unwrap();
    let t0 = Instant::now();
    let closed = closes_within(&mut slow, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "stalled head never cut");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    gw.stop().await;
}

#[tokio::test]
async fn idle_http2_connection_gets_goaway_despite_pings() {
    let up = Upstream::start().await;
    let gw = Gateway::start_with(
        "limits:\n  idle_timeout: 2s\n",
        &route("pub", "/", &up.url(), "    public: true\n"),
        &[],
    )
    .await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            // The client pings too: answered pings must not count as activity.
            .keep_alive_interval(Duration::from_millis(300))
            .keep_alive_while_idle(true)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let driver = tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("http://test.local/x")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(8), driver).await;
    assert!(ended.is_ok(), "idle HTTP/2 connection kept open by pings");
    gw.stop().await;
}

#[tokio::test]
async fn changed_timeouts_apply_to_new_connections() {
    let up = Upstream::start().await;
    let routes = route("pub", "/", &up.url(), "    public: true\n");
    let gw = Gateway::start_with("limits:\n  header_read_timeout: 30s\n", &routes, &[]).await;
    write(
        &gw.path("keygate.yaml"),
        &format!("keys_file: keys.yaml\nlimits:\n  header_read_timeout: 1s\nroutes:\n{routes}"),
    );
    // Wait for the reload to land: a stalled head on a new connection is cut at 1 s.
    let cut = eventually(10, || async {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        closes_within(&mut s, Duration::from_secs(3))
            .await
            .is_some()
    })
    .await;
    assert!(cut, "new header_read_timeout never applied");
    gw.stop().await;
}

#[tokio::test]
async fn cancelled_requests_are_logged_as_499() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("keys.yaml"), &key_file(&[]));
    // Free ports are picked, then bound by the child: another test can take one in between,
    // so a child that exits at once is started again on new ports.
    let (mut p, stdout, port, admin) = loop {
        let (port, admin) = (free_port(), free_port());
        write(
            &dir.path().join("keygate.yaml"),
            &format!(
                "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nkeys_file: keys.yaml\nroutes:\n{}",
                route("slow", "/", &up.url(), "    public: true\n")
            ),
        );
        let mut child = std::process::Command::new(bin())
            .args(["serve", "--config"])
            .arg(dir.path().join("keygate.yaml"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut p = crate::cli::Proc(child);
        let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
        let mut up_and_ours = false;
        for _ in 0..400 {
            if p.0.try_wait().unwrap().is_some() {
                break;
            }
            if TcpStream::connect(admin_addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                up_and_ours = p.0.try_wait().unwrap().is_none();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if up_and_ours {
            break (p, stdout, port, admin);
        }
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    crate::cli::wait_listening(addr).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /gone HTTP/1.1\r\nHost: test.local\r\nX-Upstream-Mode: sleep\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    drop(s);
    assert!(
        eventually(5, || async {
            let m = String::from_utf8(get(admin_addr, "/metrics", &[]).await.body).unwrap();
            m.lines().any(|l| {
                l.starts_with("keygate_requests_total")
                    && l.contains(r#"status_class="4xx""#)
                    && l.contains(r#"route="slow""#)
            })
        })
        .await,
        "cancelled request not counted"
    );
    assert_eq!(metric(admin_addr, "keygate_active_connections").await, 0.0);
    tokio::task::spawn_blocking(move || p.term()).await.unwrap();
    let lines: Vec<serde_json::Value> = std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .map_while(Result::ok)
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["status"] == 499 && l["path"] == "/gone"),
        "{lines:?}"
    );
}

#[tokio::test]
async fn http1_trailers_cross_both_ways_without_identity() {
    let up = Upstream::start().await;
    let k = TestKey::new("k", "sa", &["t.use"]);
    let gw = Gateway::start(&route("t", "/", &up.url(), "    scopes: [t.use]\n"), &[&k]).await;
    let req = format!(
        "POST /t HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\nAuthorization: {}\r\nTE: trailers\r\nTrailer: x-checksum, x-api-key-id\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-checksum: abc\r\nx-api-key-id: forged\r\nauthorization: Api-Key leaked\r\n\r\n",
        k.auth()
    );
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    let seen = up.last();
    let t = seen
        .trailers
        .expect("request trailers reached the upstream");
    assert_eq!(t.get("x-checksum").unwrap(), "abc");
    assert!(
        t.get("x-api-key-id").is_none(),
        "forged identity in trailers"
    );
    assert!(t.get("authorization").is_none());

    // Response trailers declared by the upstream reach an HTTP/1.1 client that accepts them.
    let req = format!(
        "GET /t HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\nAuthorization: {}\r\nTE: trailers\r\nX-Upstream-Mode: trailers\r\n\r\n",
        k.auth()
    );
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(text.contains("trailer: x-upstream-trailer"), "{text}");
    assert!(
        text.contains("\r\n0\r\nx-upstream-trailer: done\r\n"),
        "{text}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_delay_keeps_serving_while_not_ready() {
    let up = Upstream::start().await;
    let admin = free_port();
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let gw = Gateway::start_with(
        &format!("admin_listen: 127.0.0.1:{admin}\nshutdown_delay: 2s\nshutdown_grace: 1s\n"),
        &route("pub", "/", &up.url(), "    public: true\n"),
        &[],
    )
    .await;
    let addr = gw.addr;
    assert_eq!(get(admin_addr, "/readyz", &[]).await.status, 200);
    let t0 = Instant::now();
    let stop = tokio::spawn(gw.stop());
    assert!(
        eventually(1, || async {
            get(admin_addr, "/readyz", &[]).await.status == 503
        })
        .await,
        "readyz did not turn 503 at once"
    );
    // New connections are still served during the delay...
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(get(addr, "/x", &[]).await.status, 200);
    assert!(t0.elapsed() < Duration::from_millis(1900));
    // ...and refused after it.
    assert!(
        eventually(4, || async { TcpStream::connect(addr).await.is_err() }).await,
        "listener never closed"
    );
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    stop.await.unwrap();
}

#[tokio::test]
async fn diagnostics_are_json_lines_without_colour() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    write(&dir.path().join("keys.yaml"), &key_file(&[]));
    for (format, json) in [("", true), ("log_format: text\n", false)] {
        write(
            &dir.path().join("keygate.yaml"),
            &format!(
                "listen: 127.0.0.1:{port}\nkeys_file: keys.yaml\n{format}routes:\n{}",
                route("pub", "/", "http://127.0.0.1:1", "    public: true\n")
            ),
        );
        let child = std::process::Command::new(bin())
            .args(["serve", "--config"])
            .arg(dir.path().join("keygate.yaml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut p = crate::cli::Proc(child);
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        crate::cli::wait_serving(addr).await;
        // A rejected reload writes an error diagnostic.
        write(&dir.path().join("keys.yaml"), "keys: [oops\n");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        write(&dir.path().join("keys.yaml"), &key_file(&[]));
        let stderr = p.0.stderr.take().unwrap();
        tokio::task::spawn_blocking(move || p.term()).await.unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut { stderr }, &mut text).unwrap();
        assert!(!text.contains('\u{1b}'), "escape codes in a pipe: {text}");
        assert!(text.lines().count() >= 2, "{text}");
        for line in text.lines() {
            let parsed = serde_json::from_str::<serde_json::Value>(line);
            assert_eq!(parsed.is_ok(), json, "{format:?}: {line}");
        }
    }
}

#[tokio::test]
async fn websocket_ends_when_its_key_loses_the_routes_scope() {
    let up = SwitchingUpstream::start(false).await;
    let k = TestKey::new("ws-key", "sa", &["ws.use"]);
    let gw = Gateway::start(
        &route("ws", "/ws/", &up.url(), "    scopes: [ws.use]\n"),
        &[&k],
    )
    .await;
    let mut tunnel = open_tunnel(gw.addr, &k).await;
    let narrowed = TestKey {
        id: k.id.clone(),
        secret: k.secret.clone(),
        sa: k.sa.clone(),
        scopes: vec!["other.scope".into()],
        extra: String::new(),
    };
    write(&gw.path("keys.yaml"), &key_file(&[&narrowed]));
    let closed = closes_within(&mut tunnel, Duration::from_secs(6)).await;
    assert!(
        closed.is_some(),
        "tunnel outlived the scope its route needs"
    );
    gw.stop().await;
}
