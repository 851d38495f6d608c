//! Faults: upstreams that refuse, reset, hang or speak garbage; reload storms under load.
//! The gateway keeps serving, answers 502/504, and leaks neither connections nor memory.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::cli::{free_port, wait_listening, Proc};
use crate::support::*;

/// `KEYGATE_SOAK=N` multiplies fault counts and storm length (benches/soak.sh); 1 in CI.
fn soak() -> usize {
    std::env::var("KEYGATE_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// A TCP server that misbehaves in one way after reading a request head.
async fn faulty(kind: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                match kind {
                    "reset" => {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Le").await;
                        // Linger 0 turns the close into a reset; with a zero timeout the drop
                        // does not block, which is what the deprecation warns about.
                        #[allow(deprecated)]
                        let _ = s.set_linger(Some(Duration::ZERO));
                    }
                    "garbage" => {
                        let _ = s
                            .write_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n\x00\x01\x02")
                            .await;
                    }
                    _ => {
                        // hang: hold the connection until the gateway gives up on it.
                        let _ = s.read(&mut buf).await;
                    }
                }
            });
        }
    });
    addr
}

fn proc_stats(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (fds, rss_kib)
}

fn start_binary(dir: &std::path::Path) -> Proc {
    Proc(
        Command::new(bin())
            .args(["serve", "--config"])
            .arg(dir.join("keygate.yaml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Sends `n` GETs to `path` over `conc` keep-alive clients; returns the status counts.
async fn hammer(
    addr: SocketAddr,
    path: &'static str,
    n: usize,
    conc: usize,
) -> std::collections::HashMap<u16, usize> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let left = Arc::new(AtomicUsize::new(n));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (client, left) = (client.clone(), left.clone());
        tasks.push(tokio::spawn(async move {
            let mut counts = std::collections::HashMap::new();
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
                .is_ok()
            {
                let uri: http::Uri = format!("http://{addr}{path}").parse().unwrap();
                let status = match client.get(uri).await {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        let _ = r.into_body().collect().await;
                        s
                    }
                    Err(_) => 0,
                };
                *counts.entry(status).or_insert(0) += 1;
            }
            counts
        }));
    }
    let mut all = std::collections::HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *all.entry(k).or_insert(0) += v;
        }
    }
    all
}

#[tokio::test]
async fn ten_thousand_upstream_faults_leak_nothing() {
    let good = Upstream::start().await;
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], crate::cli::free_port()));
    let (reset, garbage, hang) = (
        faulty("reset").await,
        faulty("garbage").await,
        faulty("hang").await,
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    write(&dir.path().join("keys.yaml"), "keys: []\n");
    let r = |name: &str, up: String, extra: &str| {
        route(
            name,
            &format!("/{name}/"),
            &up,
            &format!("    public: true\n{extra}"),
        )
    };
    write(
        &dir.path().join("keygate.yaml"),
        &format!(
            "listen: 127.0.0.1:{port}\nkeys_file: keys.yaml\nroutes:\n{}{}{}{}{}",
            r("refuse", format!("http://{dead}"), ""),
            r("reset", format!("http://{reset}"), ""),
            r("garbage", format!("http://{garbage}"), ""),
            r("hang", format!("http://{hang}"), "    timeout: 100ms\n"),
            r("good", good.url(), ""),
        ),
    );
    let p = start_binary(dir.path());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr).await;
    let pid = p.0.id();
    // Warm up pools, buffers and the allocator before taking the baseline.
    for path in ["/refuse/x", "/reset/x", "/garbage/x", "/hang/x"] {
        hammer(addr, path, 100, 16).await;
    }
    assert_eq!(hammer(addr, "/good/x", 100, 16).await.get(&200), Some(&100));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (fds0, rss0) = proc_stats(pid);

    let mut total = 0;
    let k = soak();
    for (path, n, want) in [
        ("/refuse/x", 3000 * k, 502),
        ("/reset/x", 3000 * k, 502),
        ("/garbage/x", 3000 * k, 502),
        ("/hang/x", 1000 * k, 504),
    ] {
        let counts = hammer(addr, path, n, 16).await;
        assert_eq!(counts.get(&want), Some(&n), "{path}: {counts:?}");
        total += n;
        // Other routes keep working between and after faults.
        assert_eq!(hammer(addr, "/good/x", 20, 4).await.get(&200), Some(&20));
    }
    assert_eq!(total, 10_000 * k);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fds1, rss1) = proc_stats(pid);
    eprintln!("faults: fds {fds0} -> {fds1}, rss {rss0} KiB -> {rss1} KiB");
    assert!(
        fds1 <= fds0 + 40,
        "file descriptors grew from {fds0} to {fds1}"
    );
    assert!(
        rss1 <= rss0 + 32 * 1024,
        "memory grew from {rss0} KiB to {rss1} KiB"
    );
}

#[tokio::test]
async fn reload_storm_under_load_loses_nothing() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let good = TestKey::new("good", "sa", &["s.a"]);
    let bad = TestKey::new("bad", "sa", &["s.a"]).with("    revoked_at: 2026-01-01T00:00:00Z\n");
    let filler: Vec<TestKey> = (0..50)
        .map(|i| TestKey::new(&format!("f{i}"), "sa", &["s.a"]))
        .collect();
    let versions: Vec<String> = (0..2)
        .map(|v| {
            let mut keys: Vec<&TestKey> = vec![&good, &bad];
            keys.extend(filler.iter().skip(v * 10).take(30));
            key_file(&keys)
        })
        .collect();
    write(&dir.path().join("keys.yaml"), &versions[0]);
    write(
        &dir.path().join("keygate.yaml"),
        &format!(
            "listen: 127.0.0.1:{port}\nkeys_file: keys.yaml\nroutes:\n{}",
            route("api", "/api/", &up.url(), "    scopes: [s.a]\n")
        ),
    );
    let p = start_binary(dir.path());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr).await;
    let pid = p.0.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, rss0) = proc_stats(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, dir) = (stop.clone(), dir.path().to_path_buf());
        tokio::task::spawn_blocking(move || {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) && n < 400 * soak() {
                let text = &versions[n % 2];
                if n.is_multiple_of(3) {
                    // In-place rewrite, as a careless editor would.
                    std::fs::write(dir.join("keys.yaml"), text).unwrap();
                } else {
                    let tmp = dir.join(format!(".keys.{n}.tmp"));
                    std::fs::write(&tmp, text).unwrap();
                    std::fs::rename(&tmp, dir.join("keys.yaml")).unwrap();
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            n
        })
    };
    let client: Client<_, http_body_util::Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (client, stop) = (client.clone(), stop.clone());
        let (key, want) = if t % 2 == 0 {
            (good.secret.clone(), 200)
        } else {
            (bad.secret.clone(), 401)
        };
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut wrong) = (0usize, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get(format!("http://{addr}/api/x"))
                    .header("authorization", format!("Api-Key {key}"))
                    .body(http_body_util::Empty::new())
                    .unwrap();
                match client.request(req).await {
                    Ok(r) if r.status().as_u16() == want => {
                        let _ = r.into_body().collect().await;
                        ok += 1;
                    }
                    Ok(r) => wrong.push(r.status().as_u16()),
                    Err(_) => wrong.push(0),
                }
            }
            (ok, wrong)
        }));
    }
    tokio::time::sleep(Duration::from_secs(4 * soak() as u64)).await;
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    let mut served = 0;
    for t in tasks {
        let (ok, wrong) = t.await.unwrap();
        assert!(
            wrong.is_empty(),
            "failed or wrongly authorized requests: {wrong:?}"
        );
        served += ok;
    }
    let (_, rss1) = proc_stats(pid);
    eprintln!("reload storm: {writes} rewrites, {served} requests, rss {rss0} KiB -> {rss1} KiB");
    assert!(writes >= 200 * soak(), "only {writes} rewrites happened");
    assert!(served > 100);
    assert!(
        rss1 <= rss0 + 32 * 1024,
        "memory grew from {rss0} KiB to {rss1} KiB"
    );
}
