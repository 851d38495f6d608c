//! gRPC (unary, streaming, trailers, gRPC-native errors) and WebSocket through the gateway,
//! with real Python grpcio and websockets peers.

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
