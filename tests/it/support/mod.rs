//! Test support: a recording upstream on port 0, a gateway in a temp folder, raw HTTP clients.

#![allow(dead_code)]

pub mod certs;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body_len: usize,
    pub body_sha256: String,
    pub trailers: Option<http::HeaderMap>,
}

/// A real HTTP server on 127.0.0.1:0 that records requests and answers per `x-upstream-mode`:
/// `big` (10 MiB body), `sleep` (3 s before answering), `hop` (hop-by-hop response headers),
/// otherwise a JSON summary of the request.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

pub const BIG: usize = 10 * 1024 * 1024;

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let rec = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let rec = rec.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(rec.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { addr, seen }
    }

    /// The same upstream behind TLS with `leaf`'s certificate.
    pub async fn start_tls(leaf: &certs::Leaf) -> Upstream {
        use rustls::pki_types::pem::PemObject;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let chain =
            vec![
                rustls::pki_types::CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes())
                    .unwrap(),
            ];
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let rec = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let rec = rec.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let svc = service_fn(move |req| answer(rec.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Upstream { addr, seen }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("upstream saw no request")
    }
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

async fn answer(
    seen: Arc<Mutex<Vec<Seen>>>,
    req: Request<Incoming>,
) -> Result<Response<UpBody>, hyper::Error> {
    let (parts, body) = req.into_parts();
    let mode = parts
        .headers
        .get("x-upstream-mode")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let mut hasher = Sha256::new();
    let mut len = 0usize;
    let mut body = body;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(data) => {
                len += data.len();
                hasher.update(&data);
            }
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    let sha = hex::encode(hasher.finalize());
    seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        version: parts.version,
        headers: parts.headers.clone(),
        body_len: len,
        body_sha256: sha.clone(),
        trailers,
    });
    match mode.as_str() {
        "big" => {
            let chunks = (0..BIG / 65536).map(|i| {
                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![
                    (i % 251) as u8;
                    65536
                ])))
            });
            let stream = futures_util_stream(chunks.collect());
            return Ok(Response::new(BodyExt::boxed(StreamBody::new(stream))));
        }
        "sleep" => tokio::time::sleep(Duration::from_secs(3)).await,
        "trailers" => {
            // A chunked body with a declared trailer field.
            let mut t = http::HeaderMap::new();
            t.insert("x-upstream-trailer", "done".parse().unwrap());
            let frames = vec![
                Ok(Frame::data(Bytes::from_static(b"body"))),
                Ok(Frame::trailers(t)),
            ];
            let mut resp =
                Response::new(BodyExt::boxed(StreamBody::new(futures_util_stream(frames))));
            resp.headers_mut()
                .insert("trailer", "x-upstream-trailer".parse().unwrap());
            return Ok(resp);
        }
        "sse" => {
            // Three events 700 ms apart: a buffering proxy would hold the first one back.
            let (tx, rx) =
                tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
            tokio::spawn(async move {
                for i in 0..3 {
                    let _ = tx
                        .send(Ok(Frame::data(Bytes::from(format!("data: {i}\n\n")))))
                        .await;
                    tokio::time::sleep(Duration::from_millis(700)).await;
                }
            });
            let mut resp = Response::new(BodyExt::boxed(StreamBody::new(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )));
            resp.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            return Ok(resp);
        }
        _ => {}
    }
    let mut headers = HashMap::new();
    for (k, v) in &parts.headers {
        headers.insert(
            k.to_string(),
            String::from_utf8_lossy(v.as_bytes()).to_string(),
        );
    }
    let doc = serde_json::json!({
        "method": parts.method.as_str(),
        "uri": parts.uri.to_string(),
        "headers": headers,
        "body_len": len,
        "body_sha256": sha,
    });
    let mut resp = Response::new(BodyExt::boxed(Full::new(Bytes::from(doc.to_string()))));
    if mode == "hop" {
        let h = resp.headers_mut();
        h.insert("connection", "x-upstream-private".parse().unwrap());
        h.insert("x-upstream-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-upstream-public", "1".parse().unwrap());
    }
    Ok(resp)
}

fn futures_util_stream(
    items: Vec<Result<Frame<Bytes>, std::convert::Infallible>>,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, std::convert::Infallible>> + Send + Sync
{
    tokio_stream::iter(items)
}

/// A key with its file entry.
#[derive(Clone)]
pub struct TestKey {
    pub id: String,
    pub secret: String,
    pub sa: String,
    pub scopes: Vec<String>,
    pub extra: String,
}

impl TestKey {
    pub fn new(id: &str, sa: &str, scopes: &[&str]) -> TestKey {
        TestKey {
            id: id.into(),
            secret: keygate::keys::generate().unwrap(),
            sa: sa.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            extra: String::new(),
        }
    }

    /// Adds raw YAML fields (e.g. "    expires_at: ...\n").
    pub fn with(mut self, extra: &str) -> TestKey {
        self.extra.push_str(extra);
        self
    }

    pub fn entry(&self) -> String {
        let scopes: Vec<String> = self.scopes.iter().map(|s| format!("\"{s}\"")).collect();
        format!(
            "  - id: {}\n    hash: {}\n    service_account: {}\n    scopes: [{}]\n    created_at: 2026-01-01T00:00:00Z\n{}",
            self.id,
            keygate::keys::hash_line(self.secret.as_bytes()),
            self.sa,
            scopes.join(", "),
            self.extra
        )
    }

    pub fn auth(&self) -> String {
        format!("Api-Key {}", self.secret)
    }
}

pub fn key_file(keys: &[&TestKey]) -> String {
    if keys.is_empty() {
        return "keys: []\n".into();
    }
    let mut s = String::from("keys:\n");
    for k in keys {
        s.push_str(&k.entry());
    }
    s
}

/// A running gateway over files in a temp folder.
pub struct Gateway {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Gateway {
    /// Starts a gateway with `routes` (YAML list items, indented by two spaces) and `keys`.
    pub async fn start(routes: &str, keys: &[&TestKey]) -> Gateway {
        Gateway::start_with("", routes, keys).await
    }

    pub async fn start_with(top: &str, routes: &str, keys: &[&TestKey]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keys.yaml"), key_file(keys)).unwrap();
        let cfg = format!("keys_file: keys.yaml\n{top}routes:\n{routes}");
        std::fs::write(dir.path().join("keygate.yaml"), cfg).unwrap();
        Gateway::start_in(dir).await
    }

    /// Runs `keygate::serve` on the config in `dir` in a task of the test's runtime.
    fn spawn(dir: tempfile::TempDir, listener: TcpListener) -> Gateway {
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let path = dir.path().join("keygate.yaml");
        let task = tokio::spawn(async move {
            keygate::serve(&path, listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Gateway {
            addr,
            dir,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn start_in(dir: tempfile::TempDir) -> Gateway {
        let gw = Gateway::spawn(dir, TcpListener::bind("127.0.0.1:0").await.unwrap());
        let addr = gw.addr;
        // Serving starts after the first load; tests must not race it with file edits.
        assert!(
            eventually(60, || async {
                get(addr, "/__keygate_ready", &[]).await.status > 0
            })
            .await,
            "gateway did not start"
        );
        gw
    }

    /// Starts a gateway whose listener speaks TLS (readiness cannot be probed in clear text).
    pub async fn start_in_tls(dir: tempfile::TempDir) -> Gateway {
        let gw = Gateway::spawn(dir, TcpListener::bind("127.0.0.1:0").await.unwrap());
        tokio::time::sleep(Duration::from_millis(500)).await;
        gw
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Stops the gateway and hands back its folder, for a restart over the same files.
    pub async fn stop_keeping_files(mut self) -> tempfile::TempDir {
        self.halt().await;
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    pub async fn stop(mut self) {
        self.halt().await;
    }

    async fn halt(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

/// An HTTP/2 (prior knowledge) client connection to `addr`, driven by a task of its own. Its
/// requests run on one gateway worker.
pub async fn h2_client<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `error` code of a JSON error body.
    pub fn code(&self) -> String {
        self.json()["error"].as_str().unwrap_or("").to_string()
    }

    /// The upstream's view of the headers (from the echo JSON).
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_string)
    }
}

/// Sends raw bytes on a fresh connection and reads one response (the connection is closed after).
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut chunk = vec![0u8; 65536];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(r) = try_parse(&buf) {
                return Some(r);
            }
        }
        try_parse(&buf)
    })
    .await;
    match read {
        Ok(Some(r)) => r,
        _ => panic!(
            "no complete response; got {:?}",
            String::from_utf8_lossy(&buf)
        ),
    }
}

fn try_parse(buf: &[u8]) -> Option<Reply> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut headers = http::HeaderMap::new();
    for l in lines {
        let (k, v) = l.split_once(':')?;
        headers.append(
            http::HeaderName::from_bytes(k.trim().as_bytes()).ok()?,
            http::HeaderValue::from_str(v.trim()).ok()?,
        );
    }
    let rest = &buf[end + 4..];
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v == "chunked")
    {
        dechunk(rest)?
    } else if let Some(len) = headers.get("content-length") {
        let len: usize = len.to_str().ok()?.parse().ok()?;
        if rest.len() < len {
            return None;
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Some(Reply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(
            std::str::from_utf8(&b[..eol])
                .ok()?
                .split(';')
                .next()?
                .trim(),
            16,
        )
        .ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// GET with optional extra header lines ("Name: value").
pub async fn get(addr: SocketAddr, path: &str, headers: &[&str]) -> Reply {
    request(addr, "GET", path, headers, b"").await
}

/// One HTTP/1.1 request with `Connection: close`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> Reply {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    raw(addr, &bytes).await
}

/// Polls `f` until it returns true or `secs` pass.
pub async fn eventually<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// `keygate_reloads_total{file, result}` on the admin listener `admin` (0 before the first one):
/// the event a test waits for instead of sleeping after a write that must change nothing.
pub async fn reload_count(admin: SocketAddr, file: &str, result: &str) -> u64 {
    let body = String::from_utf8(get(admin, "/metrics", &[]).await.body).unwrap_or_default();
    let want = format!("keygate_reloads_total{{file=\"{file}\",result=\"{result}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the `file` reload counter for `result` passes `before`.
pub async fn reload_counted(admin: SocketAddr, file: &str, result: &str, before: u64) -> bool {
    eventually(10, || async {
        reload_count(admin, file, result).await > before
    })
    .await
}

/// A free port on 127.0.0.1, for listeners the gateway binds itself (`admin_listen`).
pub fn free_loopback_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A route item for a config.
pub fn route(name: &str, prefix: &str, upstream: &str, extra: &str) -> String {
    format!("  - name: {name}\n    path_prefix: {prefix}\n    upstream: {upstream}\n{extra}")
}

/// Path to the built binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_keygate")
}

pub fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

pub fn ok_status() -> StatusCode {
    StatusCode::OK
}

/// Sends raw bytes, reads until the server closes (or 5 s pass), and returns the status of
/// every response seen, in order. An empty list means the server closed without answering.
pub async fn raw_statuses(addr: SocketAddr, request: &[u8]) -> Vec<u16> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        let mut chunk = vec![0u8; 65536];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&buf);
    text.match_indices("HTTP/1.1 ")
        .filter(|(i, _)| *i == 0 || text[..*i].ends_with('\n'))
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// True when an external test peer (a command, or `python3 -c` import) is installed.
///
/// Tests that need one are ignored unless the `peers` feature is on, and `.ci/run` installs every
/// peer before it runs them, so under the feature a missing peer fails loudly. Without the
/// feature (a test not yet marked) it skips loudly.
pub fn peer_available(what: &str, probe: &mut std::process::Command) -> bool {
    let ok = probe
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if cfg!(feature = "peers") {
            panic!("{what} is required with --features peers (.ci/run installs it)");
        }
        eprintln!("SKIPPED: {what} is not installed here");
    }
    ok
}
