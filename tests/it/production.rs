//! Operations: limits and their status codes, admin endpoints and metrics, access log lines,
//! and draining on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cli::{free_port, wait_listening, Proc};
use crate::support::*;

/// True when the server closes the connection within `secs`.
async fn closed_within(s: &mut TcpStream, secs: u64) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn header_and_body_limits() {
    let up = Upstream::start().await;
    let k = TestKey::new("k", "sa", &[]);
    let gw = Gateway::start_with(
        "limits:\n  max_header_bytes: 4KiB\n",
        &route(
            "small",
            "/small/",
            &up.url(),
            "    max_body: 1KiB\n    scopes: []\n",
        ),
        &[&k],
    )
    .await;
    let a = format!("Authorization: {}", k.auth());
    let big = format!("X-Big: {}", "a".repeat(6000));
    let r = get(gw.addr, "/small/x", &[&a, &big]).await;
    assert_eq!(r.status, 431);
    assert_eq!(r.code(), "headers_too_large");

    let before = up.count();
    let r = request(gw.addr, "POST", "/small/x", &[&a], &[b'x'; 2048]).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.code(), "body_too_large");
    // Chunked: the limit is enforced while streaming.
    let mut req = format!("POST /small/x HTTP/1.1\r\nHost: t\r\n{a}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").into_bytes();
    for _ in 0..4 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'y'; 512]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let r = raw(gw.addr, &req).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.code(), "body_too_large");
    // A request that fits is the barrier: once it is answered, the upstream has seen every
    // complete request sent before it, and it must be the only one since `before`.
    let r = request(gw.addr, "POST", "/small/x", &[&a], &[b'x'; 1024]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        up.count(),
        before + 1,
        "an over-limit body reached the upstream as a complete request"
    );
    gw.stop().await;
}

#[tokio::test]
async fn slow_heads_and_idle_connections_are_cut() {
    let up = Upstream::start().await;
    let gw = Gateway::start_with(
        "limits:\n  header_read_timeout: 1s\n  idle_timeout: 1s\n",
        &route("pub", "/p/", &up.url(), "    public: true\n"),
        &[],
    )
    .await;
    // A request line that never finishes.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /p/x HT").await.unwrap();
    assert!(
        closed_within(&mut s, 4).await,
        "slow request head was not cut"
    );
    // Nothing sent at all.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    assert!(
        closed_within(&mut s, 4).await,
        "silent connection was not cut"
    );
    // Idle keep-alive after a complete exchange.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /p/x HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert!(
        closed_within(&mut s, 4).await,
        "idle keep-alive connection was not cut"
    );
    gw.stop().await;
}

#[tokio::test]
async fn max_connections_holds_extra_clients_back() {
    let up = Upstream::start().await;
    let gw = Gateway::start_with(
        "limits:\n  max_connections: 2\n  idle_timeout: 30s\n",
        &route("pub", "/p/", &up.url(), "    public: true\n"),
        &[],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"GET /p/x HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 65536];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let mut third = TcpStream::connect(gw.addr).await.unwrap();
    third
        .write_all(b"GET /p/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 65536];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf))
            .await
            .is_err(),
        "a third connection was served past max_connections"
    );
    drop(held.pop());
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    gw.stop().await;
}

#[tokio::test]
async fn admin_endpoints_and_metrics() {
    let up = Upstream::start().await;
    let admin = free_port();
    let k = TestKey::new("secret-key-id", "sa", &["s.a"]);
    let gw = Gateway::start_with(
        &format!("admin_listen: 127.0.0.1:{admin}\n"),
        &format!(
            "{}{}",
            route("api", "/api/", &up.url(), "    scopes: [s.a]\n"),
            route("dead", "/dead/", "http://127.0.0.1:1", "    public: true\n")
        ),
        &[&k],
    )
    .await;
    let a = format!("Authorization: {}", k.auth());
    assert_eq!(get(gw.addr, "/api/x", &[&a]).await.status, 200);
    assert_eq!(get(gw.addr, "/api/x", &[]).await.status, 401);
    assert_eq!(get(gw.addr, "/dead/x", &[]).await.status, 502);
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    assert_eq!(get(admin_addr, "/healthz", &[]).await.status, 200);
    assert_eq!(get(admin_addr, "/readyz", &[]).await.status, 200);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let m = String::from_utf8(get(admin_addr, "/metrics", &[]).await.body).unwrap();
    for name in [
        "keygate_requests_total",
        "keygate_request_duration_seconds_bucket",
        "keygate_upstream_errors_total",
        "keygate_reloads_total",
        "keygate_keys_loaded",
        "keygate_active_connections",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics:\n{m}");
    }
    assert!(
        m.contains(r#"auth="allowed""#) && m.contains(r#"auth="missing""#),
        "{m}"
    );
    assert!(m.contains(r#"status_class="5xx""#), "{m}");
    assert!(
        !m.contains("secret-key-id"),
        "key ids must not be labels without metrics.per_key"
    );
    assert!(!m.contains(&k.secret));
    gw.stop().await;
}

#[tokio::test]
async fn access_log_lines_are_json_without_secrets_and_sigterm_drains() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = free_port();
    let k = TestKey::new("k-log", "sa-log", &["s.a"]);
    write(&dir.path().join("keys.yaml"), &key_file(&[&k]));
    write(
        &dir.path().join("keygate.yaml"),
        &format!(
            "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nkeys_file: keys.yaml\nshutdown_grace: 10s\nroutes:\n{}",
            route("api", "/api/", &up.url(), "    scopes: [s.a]\n")
        ),
    );
    let mut child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(dir.path().join("keygate.yaml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut p = Proc(child);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    wait_listening(addr).await;
    let a = format!("Authorization: {}", k.auth());
    assert_eq!(
        get(addr, "/api/x?token=abc", &[&a, "X-Request-Id: log-1"])
            .await
            .status,
        200
    );
    assert_eq!(
        get(
            addr,
            "/api/y",
            &[&format!("Authorization: Api-Key {}x", k.secret)]
        )
        .await
        .status,
        401
    );

    // A slow request in flight survives SIGTERM and completes.
    let slow = tokio::spawn(async move {
        get(addr, "/api/slow", &[&a, "X-Upstream-Mode: sleep"])
            .await
            .status
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = p.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "new connections accepted after SIGTERM"
    );
    assert_eq!(
        get(admin_addr, "/readyz", &[]).await.status,
        503,
        "still ready while draining"
    );
    assert_eq!(
        slow.await.unwrap(),
        200,
        "in-flight request did not survive SIGTERM"
    );
    let status = tokio::task::spawn_blocking(move || p.term()).await.unwrap();
    assert!(status.success(), "exit status after drain: {status:?}");

    let lines: Vec<String> = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    let hash = keygate::keys::hash_line(k.secret.as_bytes());
    for l in &lines {
        assert!(
            !l.contains(&k.secret[3..]) && !l.contains(&hash[7..]) && !l.contains("Api-Key"),
            "secret in log: {l}"
        );
        assert!(!l.contains("token=abc"), "query string in log: {l}");
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}"));
        for field in [
            "time",
            "request_id",
            "client",
            "method",
            "path",
            "route",
            "status",
            "duration_ms",
            "bytes",
            "key_id",
            "service_account",
            "auth",
            "upstream_status",
        ] {
            assert!(v.get(field).is_some(), "{field} missing: {l}");
        }
    }
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["request_id"], "log-1");
    assert_eq!(first["key_id"], "k-log");
    assert_eq!(first["service_account"], "sa-log");
    assert_eq!(first["route"], "api");
    assert_eq!(first["status"], 200);
    assert_eq!(first["upstream_status"], 200);
    assert_eq!(first["auth"], "allowed");
    let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(second["status"], 401);
    assert_eq!(second["auth"], "invalid");
    assert!(second["key_id"].is_null());
}

/// The `keygate_worker_connections` samples, by worker.
fn worker_connections(metrics: &str) -> Vec<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with("keygate_worker_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

/// A burst of connections is spread over the workers. Each worker is woken for every new
/// connection on the shared socket, and the one already running used to accept the whole
/// burst, leaving the others idle.
#[tokio::test]
async fn a_burst_of_connections_is_spread_over_the_workers() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    write(&dir.path().join("keys.yaml"), "keys: []\n");
    let cfg = dir.path().join("keygate.yaml");
    write(
        &cfg,
        &format!(
            "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nkeys_file: keys.yaml\n\
             routes:\n{}",
            route("api", "/api/", "http://127.0.0.1:1", "    public: true\n")
        ),
    );
    let _child = Proc(
        Command::new(bin())
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("KEYGATE_WORKERS", "4")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    wait_listening(addr).await;
    wait_listening(admin).await;
    assert!(eventually(20, || async { get(addr, "/", &[]).await.status == 404 }).await);

    // All connected before any request, as a client pool opens them.
    let mut conns = Vec::new();
    for _ in 0..40 {
        conns.push(TcpStream::connect(addr).await.unwrap());
    }
    for c in &mut conns {
        c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
    }
    for c in &mut conns {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 404"));
    }
    let m = String::from_utf8(get(admin, "/metrics", &[]).await.body).unwrap();
    let spread = worker_connections(&m);
    assert_eq!(spread.len(), 4, "{m}");
    assert_eq!(spread.iter().sum::<f64>(), 40.0, "{spread:?}");
    // Handed over at a difference of two: at most one above the even share each.
    assert!(
        spread.iter().all(|&n| (8.0..=12.0).contains(&n)),
        "{spread:?}"
    );

    drop(conns);
    assert!(
        eventually(10, || async {
            let m = String::from_utf8(get(admin, "/metrics", &[]).await.body).unwrap();
            worker_connections(&m).iter().all(|&n| n == 0.0)
        })
        .await,
        "closed connections are counted off their workers"
    );
}
