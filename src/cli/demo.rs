//! `keygate demo`: an in-process echo upstream, a temporary config with one fresh key,
//! and ready-to-paste curl commands.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;

use tokio::net::TcpListener;

/// Starts an echo upstream on an ephemeral loopback port; answers with the request as JSON.
pub async fn echo_upstream() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve_echo(listener));
    Ok(addr)
}

/// `keygate echo`: the demo's echo upstream on a fixed address, so the shipped example has
/// something to forward to (every path and method answers 200 with the request as JSON).
pub async fn run_echo(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!("keygate echo: answering every request on http://{listen} with it as JSON");
    tokio::select! {
        () = serve_echo(listener) => {}
        () = crate::cli::serve::shutdown_signal() => {}
    }
    Ok(())
}

async fn serve_echo(listener: TcpListener) {
    crate::ops::admin::serve_plain(listener, || service_fn(echo)).await;
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    let doc = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.to_string(),
        "headers": headers,
        "body_bytes": body.len(),
    });
    let mut text = serde_json::to_vec_pretty(&doc).unwrap_or_default();
    text.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// Runs the demo until SIGINT/SIGTERM.
pub async fn run(listen: SocketAddr) -> anyhow::Result<()> {
    let upstream = echo_upstream()
        .await
        .context("cannot start the echo upstream")?;
    let dir: PathBuf = std::env::temp_dir().join(format!("keygate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = crate::keys::generate().context("cannot generate a key")?;
    let now = crate::keys::format_time(time::OffsetDateTime::now_utc());
    let keys_yaml = format!(
        "keys:\n  - id: demo\n    hash: {}\n    service_account: sa-demo\n    scopes: [demo.echo]\n    description: keygate demo key\n    created_at: {now}\n",
        crate::keys::hash_line(key.as_bytes())
    );
    let config_yaml = format!(
        "listen: {listen}\nkeys_file: keys.yaml\nrealm: keygate-demo\nroutes:\n  - name: echo\n    path_prefix: /echo/\n    upstream: http://{upstream}\n    scopes: [demo.echo]\n  - name: admin\n    path_prefix: /admin/\n    upstream: http://{upstream}\n    scopes: [demo.admin]\n  - name: health\n    path_prefix: /health\n    upstream: http://{upstream}\n    public: true\n"
    );
    crate::keys::file::write_atomic(&dir.join("keys.yaml"), keys_yaml.as_bytes())?;
    crate::keys::file::write_atomic(&dir.join("keygate.yaml"), config_yaml.as_bytes())?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let base = format!("http://{listen}");
    println!("keygate demo: gateway on {base}, echo upstream on {upstream}");
    println!("config: {}", dir.join("keygate.yaml").display());
    println!();
    println!("# allowed (200): the key holds demo.echo");
    println!("curl -i -H 'Authorization: Api-Key {key}' {base}/echo/hello");
    println!("# 401 missing_api_key: no key");
    println!("curl -i {base}/echo/hello");
    println!("# 403 insufficient_scope: the key lacks demo.admin");
    println!("curl -i -H 'Authorization: Api-Key {key}' {base}/admin/users");
    println!();
    println!("The demo key lives only in this temporary config. Ctrl-C stops the demo.");
    let result = crate::cli::serve::serve(
        &dir.join("keygate.yaml"),
        listener,
        crate::cli::serve::shutdown_signal(),
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result.map_err(Into::into)
}
