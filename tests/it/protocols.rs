//! gRPC (unary, streaming, trailers, gRPC-native errors) and WebSocket through the gateway:
//! Rust peers (tonic, tokio-tungstenite) by default, Python grpcio and websockets under the
//! `peers` feature.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::support::*;

fn py(script: &str) -> String {
    format!("{}/tests/it/py/{script}", env!("CARGO_MANIFEST_DIR"))
}

/// A Python server that prints its port first; killed on drop.
struct PyServer(Child, u16);

impl PyServer {
    fn start(script: &str) -> PyServer {
        let mut child = Command::new("python3")
            .arg(py(script))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect(
                "python3 is required for protocol tests (.ci/run installs grpcio and websockets)",
            );
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{script} did not print a port: {line:?}"));
        PyServer(child, port)
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn run_client(args: Vec<String>) -> serde_json::Value {
    let out =
        tokio::task::spawn_blocking(move || Command::new("python3").args(&args).output().unwrap())
            .await
            .unwrap();
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("bad output: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test]
#[cfg_attr(
    not(feature = "peers"),
    ignore = "needs outside peers: cargo test --features peers"
)]
async fn grpc_unary_streaming_trailers_and_native_errors() {
    let server = PyServer::start("grpc_server.py");
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let up = format!("h2c://127.0.0.1:{}", server.1);
    let k = TestKey::new("grpc-key", "sa-grpc", &["grpc.call"]);
    let routes = format!(
        "{}{}{}",
        route("echo", "/test.Echo/", &up, "    scopes: [grpc.call]\n"),
        route("admin", "/admin.Svc/", &up, "    scopes: [grpc.admin]\n"),
        route(
            "down",
            "/down.Svc/",
            &format!("h2c://{dead}"),
            "    scopes: []\n"
        ),
    );
    let admin = crate::cli::free_port();
    let gw = Gateway::start_with(
        &format!("admin_listen: 127.0.0.1:{admin}\n"),
        &routes,
        &[&k],
    )
    .await;
    let r = run_client(vec![
        py("grpc_client.py"),
        gw.addr.to_string(),
        k.secret.clone(),
    ])
    .await;
    assert_eq!(r["unary"], "olleh", "{r}");
    assert_eq!(r["trailers"]["x-trailer"], "done", "{r}");
    assert_eq!(r["trailers"]["x-seen-key-id"], "grpc-key", "{r}");
    assert_eq!(
        r["stream"],
        serde_json::json!(["00036162", "01036162", "02036162"]),
        "{r}"
    );
    assert_eq!(r["missing"], "UNAUTHENTICATED");
    assert_eq!(r["invalid"], "UNAUTHENTICATED");
    assert_eq!(r["scope"], "PERMISSION_DENIED");
    assert_eq!(r["noroute"], "UNIMPLEMENTED");
    assert_eq!(r["down"], "UNAVAILABLE");
    // gRPC failures travel as HTTP 200: the gRPC metric carries their status.
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let m = String::from_utf8(get(admin_addr, "/metrics", &[]).await.body).unwrap();
    let grpc = |route: &str, status: &str| {
        m.lines().any(|l| {
            l.starts_with("keygate_grpc_requests_total")
                && l.contains(&format!("route=\"{route}\""))
                && l.contains(&format!("grpc_status=\"{status}\""))
        })
    };
    assert!(grpc("echo", "0"), "{m}");
    assert!(grpc("echo", "16"), "{m}");
    assert!(grpc("admin", "7"), "{m}");
    assert!(grpc("down", "14"), "{m}");
    gw.stop().await;
}

#[tokio::test]
#[cfg_attr(
    not(feature = "peers"),
    ignore = "needs outside peers: cargo test --features peers"
)]
async fn websocket_upgrade_after_auth() {
    let server = PyServer::start("ws_server.py");
    let k = TestKey::new("ws-key", "sa", &["ws.use"]);
    let routes = route(
        "ws",
        "/ws/",
        &format!("http://127.0.0.1:{}", server.1),
        "    scopes: [ws.use]\n",
    );
    let gw = Gateway::start(&routes, &[&k]).await;
    let url = format!("ws://{}/ws/echo", gw.addr);
    let r = run_client(vec![py("ws_client.py"), url.clone(), k.secret.clone()]).await;
    assert_eq!(
        r["replies"],
        serde_json::json!(["one|ws-key|clean", "two|ws-key|clean"]),
        "{r}"
    );
    let r = run_client(vec![py("ws_client.py"), url]).await;
    assert_eq!(r["status"], 401, "{r}");
    gw.stop().await;
}

/// The one message both Rust gRPC peers exchange: raw bytes in field 1.
#[derive(Clone, PartialEq, prost::Message)]
struct Payload {
    #[prost(bytes = "vec", tag = "1")]
    data: Vec<u8>,
}

type Codec = tonic_prost::ProstCodec<Payload, Payload>;

/// `/test.Echo/Unary`: the request reversed.
struct Reverse;

impl tower_service::Service<tonic::Request<Payload>> for Reverse {
    type Response = tonic::Response<Payload>;
    type Error = tonic::Status;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<Payload>) -> Self::Future {
        let mut data = req.into_inner().data;
        data.reverse();
        std::future::ready(Ok(tonic::Response::new(Payload { data })))
    }
}

type Replies = tokio_stream::Iter<std::vec::IntoIter<Result<Payload, tonic::Status>>>;

/// `/test.Echo/Stream`: the request N times, each prefixed with its index (N = first byte).
struct Repeat;

impl tower_service::Service<tonic::Request<Payload>> for Repeat {
    type Response = tonic::Response<Replies>;
    type Error = tonic::Status;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<Payload>) -> Self::Future {
        let data = req.into_inner().data;
        let n = data.first().copied().unwrap_or(1);
        let replies: Vec<_> = (0..n)
            .map(|i| {
                let mut m = vec![i];
                m.extend_from_slice(&data);
                Ok(Payload { data: m })
            })
            .collect();
        std::future::ready(Ok(tonic::Response::new(tokio_stream::iter(replies))))
    }
}

type GrpcBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, tonic::Status>;

/// One gRPC call on the tonic upstream. A call that still carries `authorization` fails with
/// INTERNAL; the unary answer's trailers gain `x-trailer: done` and the key id the call carried,
/// so the client can see trailers cross the gateway.
async fn tonic_call(req: http::Request<hyper::body::Incoming>) -> http::Response<GrpcBody> {
    use http_body_util::BodyExt;
    let mut grpc = tonic::server::Grpc::new(Codec::default());
    if req.headers().contains_key("authorization") {
        let status = tonic::Status::internal("authorization reached the upstream");
        return status
            .into_http::<tonic::body::Body>()
            .map(BodyExt::boxed_unsync);
    }
    let seen = req
        .headers()
        .get("x-api-key-id")
        .cloned()
        .unwrap_or(http::HeaderValue::from_static(""));
    match req.uri().path() {
        "/test.Echo/Unary" => grpc.unary(Reverse, req).await.map(|body| {
            body.map_frame(move |f| match f.into_trailers() {
                Ok(mut t) => {
                    t.insert("x-trailer", http::HeaderValue::from_static("done"));
                    t.insert("x-seen-key-id", seen.clone());
                    hyper::body::Frame::trailers(t)
                }
                Err(f) => f,
            })
            .boxed_unsync()
        }),
        "/test.Echo/Stream" => grpc
            .server_streaming(Repeat, req)
            .await
            .map(BodyExt::boxed_unsync),
        _ => tonic::Status::unimplemented("no such method")
            .into_http::<tonic::body::Body>()
            .map(BodyExt::boxed_unsync),
    }
}

/// A tonic gRPC server (HTTP/2 in clear text) on 127.0.0.1:0.
async fn tonic_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req| async move {
                    Ok::<_, std::convert::Infallible>(tonic_call(req).await)
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
            });
        }
    });
    addr
}

/// A tonic client call of `path` with an optional `Authorization` value.
fn grpc_request(auth: Option<&str>, data: &[u8]) -> tonic::Request<Payload> {
    let mut req = tonic::Request::new(Payload {
        data: data.to_vec(),
    });
    req.set_timeout(std::time::Duration::from_secs(10));
    if let Some(a) = auth {
        req.metadata_mut()
            .insert("authorization", a.parse().unwrap());
    }
    req
}

#[tokio::test]
async fn tonic_unary_streaming_trailers_and_native_errors() {
    use http::uri::PathAndQuery;
    let up = format!("h2c://{}", tonic_upstream().await);
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let k = TestKey::new("grpc-key", "sa-grpc", &["grpc.call"]);
    let routes = format!(
        "{}{}{}",
        route("echo", "/test.Echo/", &up, "    scopes: [grpc.call]\n"),
        route("admin", "/admin.Svc/", &up, "    scopes: [grpc.admin]\n"),
        route(
            "down",
            "/down.Svc/",
            &format!("h2c://{dead}"),
            "    scopes: []\n"
        ),
    );
    let admin = crate::cli::free_port();
    let gw = Gateway::start_with(
        &format!("admin_listen: 127.0.0.1:{admin}\n"),
        &routes,
        &[&k],
    )
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", gw.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);
    let auth = k.auth();

    client.ready().await.unwrap();
    let r = client
        .unary(
            grpc_request(Some(&auth), b"hello"),
            PathAndQuery::from_static("/test.Echo/Unary"),
            Codec::default(),
        )
        .await
        .unwrap();
    // Unary calls merge the trailers into the response metadata.
    assert_eq!(r.metadata().get("x-trailer").unwrap(), "done");
    assert_eq!(r.metadata().get("x-seen-key-id").unwrap(), "grpc-key");
    assert_eq!(r.into_inner().data, b"olleh");

    client.ready().await.unwrap();
    let mut stream = client
        .server_streaming(
            grpc_request(Some(&auth), b"\x03ab"),
            PathAndQuery::from_static("/test.Echo/Stream"),
            Codec::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        got.push(hex::encode(m.data));
    }
    assert_eq!(got, ["00036162", "01036162", "02036162"]);

    let bad_key = "Api-Key kg_nope".to_string();
    for (auth, path, code) in [
        (None, "/test.Echo/Unary", tonic::Code::Unauthenticated),
        (
            Some(&bad_key),
            "/test.Echo/Unary",
            tonic::Code::Unauthenticated,
        ),
        (
            Some(&auth),
            "/admin.Svc/Call",
            tonic::Code::PermissionDenied,
        ),
        (
            Some(&auth),
            "/nothing.Here/Call",
            tonic::Code::Unimplemented,
        ),
        (Some(&auth), "/down.Svc/Call", tonic::Code::Unavailable),
    ] {
        client.ready().await.unwrap();
        let r = client
            .unary(
                grpc_request(auth.map(String::as_str), b"x"),
                PathAndQuery::try_from(path).unwrap(),
                Codec::default(),
            )
            .await;
        assert_eq!(r.map(|_| ()).unwrap_err().code(), code, "{path} {auth:?}");
    }

    // gRPC failures travel as HTTP 200: the gRPC metric carries their status.
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let m = String::from_utf8(get(admin_addr, "/metrics", &[]).await.body).unwrap();
    let grpc = |route: &str, status: &str| {
        m.lines().any(|l| {
            l.starts_with("keygate_grpc_requests_total")
                && l.contains(&format!("route=\"{route}\""))
                && l.contains(&format!("grpc_status=\"{status}\""))
        })
    };
    assert!(grpc("echo", "0"), "{m}");
    assert!(grpc("echo", "16"), "{m}");
    assert!(grpc("admin", "7"), "{m}");
    assert!(grpc("down", "14"), "{m}");
    gw.stop().await;
}

/// A tokio-tungstenite echo server on 127.0.0.1:0: each text message comes back as
/// `message|x-api-key-id seen|clean` (or `leaked` when `authorization` reached it).
// tungstenite's handshake callback signature fixes its (large) error type.
#[allow(clippy::result_large_err)]
async fn tungstenite_upstream() -> std::net::SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = (String::new(), false);
                let callback =
                    |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                        let h = req.headers();
                        seen.0 = h
                            .get("x-api-key-id")
                            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                            .unwrap_or_default();
                        seen.1 = h.contains_key("authorization");
                        Ok(resp)
                    };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                let tag = if seen.1 { "leaked" } else { "clean" };
                while let Some(Ok(msg)) = ws.next().await {
                    if let Ok(text) = msg.to_text() {
                        if msg.is_text() {
                            let reply = format!("{text}|{}|{tag}", seen.0);
                            if ws.send(reply.into()).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn tungstenite_upgrade_after_auth() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Error, Message};
    let up = tungstenite_upstream().await;
    let k = TestKey::new("ws-key", "sa", &["ws.use"]);
    let routes = route(
        "ws",
        "/ws/",
        &format!("http://{up}"),
        "    scopes: [ws.use]\n",
    );
    let gw = Gateway::start(&routes, &[&k]).await;
    let url = format!("ws://{}/ws/echo", gw.addr);

    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", k.auth().parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut ws, resp) = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio_tungstenite::client_async(req, tcp),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.status(), 101);
    let mut replies = Vec::new();
    for m in ["one", "two"] {
        ws.send(Message::text(m)).await.unwrap();
        let reply = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        replies.push(reply.to_text().unwrap().to_string());
    }
    assert_eq!(replies, ["one|ws-key|clean", "two|ws-key|clean"]);
    let _ = ws.close(None).await;

    // Without a key the handshake is refused before any upgrade.
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    match tokio_tungstenite::client_async(url.as_str(), tcp).await {
        Err(Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected a 401 answer, got {:?}", other.map(|(_, r)| r)),
    }
    gw.stop().await;
}
