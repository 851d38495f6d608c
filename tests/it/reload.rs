//! Hot reload: in-place writes, renames, Kubernetes `..data` swaps, invalid files, SIGHUP-free.

use std::os::unix::fs::symlink;
use std::time::{Duration, Instant};

use crate::support::*;

async fn status(gw: &Gateway, path: &str, k: &TestKey) -> u16 {
    get(gw.addr, path, &[&format!("Authorization: {}", k.auth())])
        .await
        .status
}

async fn becomes(gw: &Gateway, path: &str, k: &TestKey, want: u16) -> bool {
    eventually(2, || async { status(gw, path, k).await == want }).await
}

async fn setup(keys: &[&TestKey]) -> (Upstream, Gateway) {
    let up = Upstream::start().await;
    let gw = Gateway::start(&route("api", "/api/", &up.url(), "    scopes: []\n"), keys).await;
    (up, gw)
}

/// `setup` with an admin listener, whose reload counters tell when a write was read.
async fn setup_admin(keys: &[&TestKey]) -> (Upstream, Gateway, std::net::SocketAddr) {
    let up = Upstream::start().await;
    let admin = free_loopback_addr();
    let gw = Gateway::start_with(
        &format!("admin_listen: {admin}\n"),
        &route("api", "/api/", &up.url(), "    scopes: []\n"),
        keys,
    )
    .await;
    (up, gw, admin)
}

#[tokio::test]
async fn in_place_write_is_picked_up() {
    let a = TestKey::new("a", "sa", &[]);
    let b = TestKey::new("b", "sa", &[]);
    let (_up, gw) = setup(&[&a]).await;
    assert_eq!(status(&gw, "/api/x", &b).await, 401);
    write(&gw.path("keys.yaml"), &key_file(&[&a, &b]));
    assert!(
        becomes(&gw, "/api/x", &b, 200).await,
        "new key not picked up within 2 s"
    );
    gw.stop().await;
}

#[tokio::test]
async fn rename_is_picked_up() {
    let a = TestKey::new("a", "sa", &[]);
    let (_up, gw) = setup(&[&a]).await;
    for round in 0..3 {
        let revoked = a.entry().replace(
            "created_at",
            "revoked_at: 2026-01-01T00:00:00Z\n    created_at",
        );
        let text = if round % 2 == 0 {
            format!("keys:\n{revoked}")
        } else {
            key_file(&[&a])
        };
        let tmp = gw.path(".keys.yaml.swp");
        write(&tmp, &text);
        std::fs::rename(&tmp, gw.path("keys.yaml")).unwrap();
        let want = if round % 2 == 0 { 401 } else { 200 };
        assert!(becomes(&gw, "/api/x", &a, want).await, "round {round}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn kubernetes_data_symlink_swap_is_picked_up() {
    let a = TestKey::new("a", "sa", &[]);
    let b = TestKey::new("b", "sa", &[]);
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..2026_11_29_a")).unwrap();
    write(&d.join("..2026_11_29_a/keys.yaml"), &key_file(&[&a]));
    symlink("..2026_11_29_a", d.join("..data")).unwrap();
    symlink("..data/keys.yaml", d.join("keys.yaml")).unwrap();
    write(
        &d.join("keygate.yaml"),
        &format!(
            "keys_file: keys.yaml\nroutes:\n{}",
            route("api", "/api/", &up.url(), "    scopes: []\n")
        ),
    );
    let gw = Gateway::start_in(dir).await;
    assert_eq!(status(&gw, "/api/x", &a).await, 200);
    for (i, keys) in [[&b], [&a]].iter().enumerate() {
        // What the kubelet does: new folder, new symlink, atomic rename over ..data.
        let new_dir = format!("..2026_11_29_{i}");
        std::fs::create_dir(gw.path(&new_dir)).unwrap();
        write(
            &gw.path(&new_dir).join("keys.yaml"),
            &key_file(keys.as_slice()),
        );
        symlink(&new_dir, gw.path("..data_tmp")).unwrap();
        std::fs::rename(gw.path("..data_tmp"), gw.path("..data")).unwrap();
        let (on, off) = if i == 0 { (&b, &a) } else { (&a, &b) };
        assert!(
            becomes(&gw, "/api/x", on, 200).await,
            "swap {i}: new key not active"
        );
        assert_eq!(
            status(&gw, "/api/x", off).await,
            401,
            "swap {i}: old key still active"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn invalid_file_keeps_the_last_good_snapshot() {
    let a = TestKey::new("a", "sa", &[]);
    let b = TestKey::new("b", "sa", &[]);
    let (_up, gw, admin) = setup_admin(&[&a]).await;
    let bad_texts = [
        format!("keys:\n{}    surprise: 1\n", b.entry()),
        "keys:\n  - id: [broken\n".to_string(),
        String::new(),
        format!("keys:\n{}", b.entry().replace("sha256:", "md5:")),
    ];
    for bad in &bad_texts {
        let before = reloads(admin, "error").await;
        write(&gw.path("keys.yaml"), bad);
        assert!(
            reload_counted(admin, "keys", "error", before).await,
            "{bad:?} was never read"
        );
        assert_eq!(
            status(&gw, "/api/x", &a).await,
            200,
            "old snapshot lost after {bad:?}"
        );
        assert_eq!(status(&gw, "/api/x", &b).await, 401);
    }
    // Deleted, then replaced by a directory: still serving.
    let before = reloads(admin, "error").await;
    std::fs::remove_file(gw.path("keys.yaml")).unwrap();
    assert!(reload_counted(admin, "keys", "error", before).await);
    assert_eq!(status(&gw, "/api/x", &a).await, 200);
    let before = reloads(admin, "error").await;
    std::fs::create_dir(gw.path("keys.yaml")).unwrap();
    assert!(reload_counted(admin, "keys", "error", before).await);
    assert_eq!(status(&gw, "/api/x", &a).await, 200);
    std::fs::remove_dir(gw.path("keys.yaml")).unwrap();
    write(&gw.path("keys.yaml"), &key_file(&[&b]));
    assert!(becomes(&gw, "/api/x", &b, 200).await);
    assert_eq!(status(&gw, "/api/x", &a).await, 401);
    gw.stop().await;
}

#[tokio::test]
async fn config_changes_reload_routes_and_bad_config_keeps_old() {
    let a = TestKey::new("a", "sa", &[]);
    let (up, gw, admin) = setup_admin(&[&a]).await;
    assert_eq!(status(&gw, "/new/x", &a).await, 404);
    let good = format!(
        "admin_listen: {admin}\nkeys_file: keys.yaml\nroutes:\n{}{}",
        route("api", "/api/", &up.url(), "    scopes: []\n"),
        route("new", "/new/", &up.url(), "    scopes: []\n")
    );
    write(&gw.path("keygate.yaml"), &good);
    assert!(becomes(&gw, "/new/x", &a, 200).await);
    let before = reload_count(admin, "config", "error").await;
    write(
        &gw.path("keygate.yaml"),
        &good.replace("path_prefix: /new/", "path_prefx: /new/"),
    );
    assert!(reload_counted(admin, "config", "error", before).await);
    assert_eq!(status(&gw, "/new/x", &a).await, 200);
    gw.stop().await;
}

#[tokio::test]
async fn hundred_thousand_keys_load() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::with_capacity(100_000 * 200);
    text.push_str("keys:\n");
    let probe = TestKey::new("probe", "sa-probe", &["s.x"]);
    for i in 0..99_999 {
        let hash = keygate::keys::hash_line(format!("bulk-key-{i}").as_bytes());
        text.push_str(&format!(
            "  - id: bulk{i}\n    hash: {hash}\n    service_account: sa-{}\n    scopes: [s.x]\n    created_at: 2026-01-01T00:00:00Z\n",
            i % 100
        ));
    }
    text.push_str(&probe.entry());
    write(&dir.path().join("keys.yaml"), &text);
    write(
        &dir.path().join("keygate.yaml"),
        &format!(
            "keys_file: keys.yaml\nroutes:\n{}",
            route("api", "/api/", &up.url(), "    scopes: [s.x]\n")
        ),
    );
    let started = Instant::now();
    let gw = Gateway::start_in(dir).await;
    assert!(eventually(60, || async { status(&gw, "/api/x", &probe).await == 200 }).await);
    eprintln!(
        "100k keys: first request served after {:?}",
        started.elapsed()
    );
    let r = get(gw.addr, "/api/x", &["Authorization: Api-Key bulk-key-4242"]).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().headers.get("x-api-key-id").unwrap(), "bulk4242");
    gw.stop().await;
}

/// A 3,000-key file: bulk keys, `revoked` late in the file, `last` at the very end, and
/// `fresh` first when given.
fn big_key_file(revoked: &TestKey, last: &TestKey, fresh: Option<&TestKey>) -> String {
    let mut text = String::with_capacity(3_000 * 200);
    text.push_str("keys:\n");
    if let Some(f) = fresh {
        text.push_str(&f.entry());
    }
    for i in 0..2_998 {
        if i == 2_990 {
            text.push_str(&revoked.entry());
        }
        let hash = keygate::keys::hash_line(format!("bulk-key-{i}").as_bytes());
        text.push_str(&format!(
            "  - id: bulk{i}\n    hash: {hash}\n    service_account: sa-bulk\n    scopes: []\n    created_at: 2026-01-01T00:00:00Z\n"
        ));
    }
    text.push_str(&last.entry());
    text
}

#[tokio::test]
async fn file_rewritten_in_place_in_pieces_is_taken_only_once_complete() {
    use std::io::Write;
    let revoked = TestKey::new("revoked", "sa", &[]).with("    revoked_at: 2026-01-02T00:00:00Z\n");
    let last = TestKey::new("last", "sa", &[]);
    let fresh = TestKey::new("fresh", "sa", &[]);
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keys.yaml"),
        &big_key_file(&revoked, &last, None),
    );
    write(
        &dir.path().join("keygate.yaml"),
        &format!(
            "keys_file: keys.yaml\nroutes:\n{}",
            route("api", "/api/", &up.url(), "    scopes: []\n")
        ),
    );
    let gw = Gateway::start_in(dir).await;
    assert_eq!(status(&gw, "/api/x", &last).await, 200);
    assert_eq!(status(&gw, "/api/x", &fresh).await, 401);

    // What `cat > keys.yaml` and config tools do: truncate, then write in pieces over ~4 s.
    let text = big_key_file(&revoked, &last, Some(&fresh)).into_bytes();
    let pieces = text.len().div_ceil(2048);
    let pause = Duration::from_millis(4_000 / pieces as u64);
    let path = gw.path("keys.yaml");
    let writer = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .unwrap();
        for piece in text.chunks(2048) {
            f.write_all(piece).unwrap();
            std::thread::sleep(pause);
        }
    });

    let started = Instant::now();
    let mut rounds = 0;
    // Through the write and one quiet period past it, bounded in count and time.
    let mut finished_at = None;
    while rounds < 5_000 && started.elapsed() < Duration::from_secs(20) {
        let r = get(
            gw.addr,
            "/api/x",
            &[&format!("Authorization: {}", last.auth())],
        )
        .await;
        assert_eq!(
            r.status,
            200,
            "valid key refused in round {rounds} after {:?}",
            started.elapsed()
        );
        let r = get(
            gw.addr,
            "/api/x",
            &[&format!("Authorization: {}", revoked.auth())],
        )
        .await;
        assert_eq!(
            r.status,
            401,
            "revoked key allowed in round {rounds} after {:?}",
            started.elapsed()
        );
        assert_eq!(r.code(), "revoked_api_key", "round {rounds}");
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
        match finished_at {
            None if writer.is_finished() => finished_at = Some(Instant::now()),
            Some(t) if t.elapsed() > Duration::from_millis(1_000) => break,
            _ => {}
        }
    }
    assert!(
        writer.is_finished(),
        "the writer did not finish within 20 s"
    );
    writer.await.unwrap();
    assert!(rounds >= 20, "only {rounds} rounds ran during the rewrite");
    assert!(
        eventually(5, || async { status(&gw, "/api/x", &fresh).await == 200 }).await,
        "the completed file was never applied"
    );
    assert_eq!(status(&gw, "/api/x", &last).await, 200);
    assert_eq!(status(&gw, "/api/x", &revoked).await, 401);
    gw.stop().await;
}

#[tokio::test]
async fn restart_only_settings_are_named_when_changed() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = crate::cli::free_port();
    write(&dir.path().join("keys.yaml"), "keys: []\n");
    let config = |extra: &str| {
        format!(
            "listen: 127.0.0.1:{port}\nkeys_file: keys.yaml\n{extra}routes:\n{}",
            route("api", "/api/", &up.url(), "    scopes: []\n")
        )
    };
    let cfg = dir.path().join("keygate.yaml");
    write(&cfg, &config("limits:\n  max_connections: 100\n"));
    let mut child = crate::cli::Proc(
        Command::new(bin())
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    crate::cli::wait_listening(addr).await;
    // The port is bound before the first load; requests are answered only after it.
    assert!(
        eventually(20, || async {
            get(addr, "/__keygate_ready", &[]).await.status > 0
        })
        .await
    );
    let admin = crate::cli::free_port();
    let changed = config(&format!(
        "admin_listen: 127.0.0.1:{admin}\nlimits:\n  max_connections: 200\n"
    ));
    let mut pending = vec!["limits.max_connections", "admin_listen"];
    let mut seen = Vec::new();
    // The watcher may start just after serving does: rewrite (new bytes each time) until the
    // reload is seen, bounded.
    for attempt in 0..10 {
        write(&cfg, &format!("# attempt {attempt}\n{changed}"));
        let deadline = Instant::now() + Duration::from_secs(2);
        while !pending.is_empty() && Instant::now() < deadline {
            let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            pending.retain(|s| !(line.contains(&format!("\"{s}\"")) && line.contains("restart")));
            seen.push(line);
        }
        if pending.is_empty() {
            break;
        }
    }
    assert!(
        pending.is_empty(),
        "no restart warning for {pending:?}; stderr: {seen:#?}"
    );
    child.term();
}

async fn reloads(admin: std::net::SocketAddr, result: &str) -> u64 {
    reload_count(admin, "keys", result).await
}

#[tokio::test]
async fn a_key_file_gone_for_three_seconds_is_logged_once_and_retried() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (crate::cli::free_port(), crate::cli::free_port());
    let keys = dir.path().join("keys.yaml");
    write(&keys, "keys: []\n");
    let cfg = dir.path().join("keygate.yaml");
    write(
        &cfg,
        &format!(
            "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nkeys_file: keys.yaml\nroutes:\n{}",
            route("api", "/api/", &up.url(), "    scopes: []\n")
        ),
    );
    let mut child = crate::cli::Proc(
        Command::new(bin())
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    crate::cli::wait_listening(admin).await;
    // The watcher may start just after serving does: rewrite until a reload proves it runs.
    for attempt in 0..20 {
        write(&keys, &format!("# attempt {attempt}\nkeys: []\n"));
        if eventually(1, || async { reloads(admin, "ok").await >= 1 }).await {
            break;
        }
    }
    assert!(reloads(admin, "ok").await >= 1, "watcher never reloaded");

    let away = dir.path().join("keys.away");
    std::fs::rename(&keys, &away).unwrap();
    let gone = Instant::now();
    assert!(
        eventually(6, || async { reloads(admin, "error").await >= 2 }).await,
        "a missing key file was not retried"
    );
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(gone.elapsed())).await;
    std::fs::rename(&away, &keys).unwrap();
    assert!(
        eventually(10, || async { reloads(admin, "ok").await >= 2 }).await,
        "the key file coming back was not reloaded"
    );

    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let cleared = |lines: &[String]| {
        let last_error = lines.iter().rposition(|l| l.contains("ERROR"));
        last_error.is_some_and(|e| {
            lines[e..]
                .iter()
                .any(|l| l.contains("INFO") && l.contains("keys.yaml"))
        })
    };
    while !cleared(&lines) && Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            lines.push(l);
        }
    }
    let errors = lines.iter().filter(|l| l.contains("ERROR")).count();
    assert!(
        (1..=2).contains(&errors),
        "{errors} ERROR lines: {lines:#?}"
    );
    assert!(
        cleared(&lines),
        "no INFO line once the file was back: {lines:#?}"
    );
    child.term();
}
