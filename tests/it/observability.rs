//! What an operator reads: access log fields for refusals, upstream failures and hyper's own
//! rejections, the client's protocol version kept, gRPC status in metrics.

use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::cli::{free_port, wait_listening, Proc};
use crate::support::*;

/// Runs the binary on `routes` and returns its access log lines after `traffic` ran.
pub(crate) async fn log_lines<F, Fut>(
    routes: &str,
    keys: &[&TestKey],
    traffic: F,
) -> Vec<serde_json::Value>
where
    F: FnOnce(std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    write(&dir.path().join("keys.yaml"), &key_file(keys));
    write(
        &dir.path().join("keygate.yaml"),
        &format!("listen: 127.0.0.1:{port}\nkeys_file: keys.yaml\nroutes:\n{routes}"),
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
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr).await;
    traffic(addr).await;
    tokio::task::spawn_blocking(move || p.term()).await.unwrap();
    std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .map_while(Result::ok)
        .map(|l| serde_json::from_str(&l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect()
}

fn find<'a>(lines: &'a [serde_json::Value], path: &str) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|l| l["path"] == path || l["raw_path"] == path)
        .unwrap_or_else(|| panic!("no line for {path}: {lines:?}"))
}

#[tokio::test]
async fn access_log_names_refused_keys_failures_and_normalized_paths() {
    let up = Upstream::start().await;
    let k = TestKey::new("k-scope", "sa-scope", &["a.read"]);
    let routes = format!(
        "{}{}{}",
        route("api", "/api/", &up.url(), "    scopes: [a.read]\n"),
        route("admin", "/admin/", &up.url(), "    scopes: [a.admin]\n"),
        route("dead", "/dead/", "http://127.0.0.1:1", "    public: true\n"),
    );
    let auth = format!("Authorization: {}", k.auth());
    let key = k.auth();
    let lines = log_lines(&routes, &[&k], |addr| async move {
        let a = auth.as_str();
        assert_eq!(get(addr, "/admin/x", &[a]).await.status, 403);
        assert_eq!(get(addr, "/dead/x", &[]).await.status, 502);
        let r = get(
            addr,
            "/api/../api/y?token=abc",
            &[a, "User-Agent: probe/1.0"],
        )
        .await;
        assert_eq!(r.status, 200);
        // Bytes hyper refuses before keygate sees the request.
        let r = raw_statuses(
            addr,
            b"GET /api/z HTTP/1.1\r\nHost: t\r\nX-Bad: a\x01b\r\n\r\n",
        )
        .await;
        assert_eq!(r, vec![400]);
        // HTTP/2 names its host in `:authority`, with no Host header.
        let mut h2 = h2_client(addr).await;
        let req = http::Request::builder()
            .uri("http://h2.example/api/h2")
            .header("authorization", key)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        assert_eq!(h2.send_request(req).await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    })
    .await;
    assert_eq!(find(&lines, "/api/h2")["host"], "h2.example");
    let forbidden = find(&lines, "/admin/x");
    assert_eq!(forbidden["status"], 403);
    assert_eq!(forbidden["key_id"], "k-scope");
    assert_eq!(forbidden["service_account"], "sa-scope");
    let dead = find(&lines, "/dead/x");
    assert_eq!(dead["status"], 502);
    assert_eq!(dead["error"], "refused");
    assert_eq!(dead["upstream"], "127.0.0.1:1");
    let ok = find(&lines, "/api/y");
    assert_eq!(ok["raw_path"], "/api/../api/y");
    assert_eq!(ok["host"], "test.local");
    assert_eq!(ok["user_agent"], "probe/1.0");
    assert_eq!(ok["upstream"], up.addr.to_string());
    assert!(ok["upstream_ms"].as_f64().is_some(), "{ok}");
    assert!(ok["error"].is_null());
    let rejected: Vec<_> = lines.iter().filter(|l| l["status"] == 400).collect();
    assert_eq!(rejected.len(), 1, "{lines:?}");
    for l in &lines {
        let text = l.to_string();
        assert!(
            !text.contains("token=abc") && !text.contains(&k.secret),
            "{text}"
        );
    }
}

#[tokio::test]
async fn http10_upstream_answer_keeps_the_clients_version() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    let gw = Gateway::start(
        &route("old", "/", &format!("http://{up}"), "    public: true\n"),
        &[],
    )
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    gw.stop().await;
}

#[tokio::test]
#[cfg_attr(
    not(feature = "peers"),
    ignore = "needs outside peers: cargo test --features peers"
)]
async fn clients_cannot_flood_the_log_through_tls_handshakes() {
    if !peer_available("openssl", Command::new("openssl").arg("version")) {
        return;
    }
    let leaf = crate::support::certs::Ca::new().leaf();
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("cert.pem"), &leaf.cert_pem);
    write(&dir.path().join("key.pem"), &leaf.key_pem);
    write(&dir.path().join("keys.yaml"), &key_file(&[]));
    let port = free_port();
    write(
        &dir.path().join("keygate.yaml"),
        &format!(
            "listen: 127.0.0.1:{port}\nkeys_file: keys.yaml\ntls:\n  cert: cert.pem\n  key: key.pem\nroutes:\n{}",
            route("pub", "/", "http://127.0.0.1:1", "    public: true\n")
        ),
    );
    let mut child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(dir.path().join("keygate.yaml"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut p = Proc(child);
    wait_listening(format!("127.0.0.1:{port}").parse().unwrap()).await;
    // An IP address as SNI is illegal; rustls used to warn once per handshake.
    for _ in 0..10 {
        let _ = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(["-servername", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    tokio::task::spawn_blocking(move || p.term()).await.unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut { stderr }, &mut text).unwrap();
    let lines = text.lines().count();
    assert!(lines <= 4, "10 handshakes wrote {lines} lines:\n{text}");
    assert!(!text.contains("SNI"), "{text}");
}
