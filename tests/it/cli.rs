//! The binary: `validate`, `serve` (flag and env), `demo`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

/// A loopback port nothing listens on, for a gateway process to bind.
///
/// Taken outside the kernel's ephemeral range: a port-0 bind elsewhere in this run (an upstream,
/// an in-process gateway, a client socket) is handed ports from that range, and could take a
/// port this returned before the gateway process binds it, leaving the test talking to some
/// other test's server.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let range: Vec<u32> = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let (low, high) = match range[..] {
        [low, high] => (low, high),
        _ => (32768, 60999),
    };
    // Below the range when it leaves room there, else above it.
    let (start, span) = if low >= 1024 + 4096 {
        let span = (low - 1024).min(16384);
        (low - span, span)
    } else {
        (high + 1, 65535u32.saturating_sub(high))
    };
    if span < 1024 {
        // No room outside the range (a tuned host): the old way, with its small race.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
    }
    // Another run of these tests at the same moment starts elsewhere in the span.
    let offset = std::process::id().wrapping_mul(2_654_435_761) >> 8;
    for _ in 0..span {
        let port = start + offset.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {start}..{}", start + span);
}

/// A gateway process; killed with SIGTERM on drop.
pub struct Proc(pub std::process::Child);

impl Proc {
    pub fn term(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Ok(Some(s)) = self.0.try_wait() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        self.0.wait().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn wait_listening(addr: std::net::SocketAddr) {
    assert!(
        eventually(20, || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await,
        "gateway did not start listening on {addr}"
    );
}

/// Waits until a plain-HTTP gateway answers: the port is bound before the first load, so a
/// test that edits files after a mere connect could race that load.
pub async fn wait_serving(addr: std::net::SocketAddr) {
    wait_listening(addr).await;
    assert!(
        eventually(20, || async {
            get(addr, "/__keygate_ready", &[]).await.status > 0
        })
        .await,
        "gateway did not start serving on {addr}"
    );
}

#[test]
fn validate_accepts_the_shipped_example() {
    let out = Command::new(bin())
        .args([
            "validate",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/keygate.yaml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn validate_lists_every_problem_with_positions() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        "keys_file: keys.yaml\nroutes:\n  - name: a\n    path_prefix: /a\n    upstream: nope://x\n    scopes: []\n  - name: a\n    path_prefix: /b\n    upstream: http://127.0.0.1:1\n    timeout: forever\n    scopes: []\n",
    );
    write(&dir.path().join("keys.yaml"), "keys: []\n");
    let cfg = dir.path().join("keygate.yaml");
    let out = Command::new(bin())
        .args(["validate", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let c = cfg.display().to_string();
    assert!(lines[0].starts_with(&format!("{c}:5:15: ")), "{text}");
    assert!(lines[1].starts_with(&format!("{c}:7:11: ")), "{text}");
    assert!(lines[2].starts_with(&format!("{c}:10:14: ")), "{text}");

    // A bad key file is reported against the key file.
    write(
        &dir.path().join("keygate.yaml"),
        "keys_file: keys.yaml\nroutes: [{name: a, path_prefix: /, upstream: 'http://127.0.0.1:1', public: true}]\n",
    );
    write(
        &dir.path().join("keys.yaml"),
        "keys:\n  - id: x\n    hash: sha256:00\n    service_account: sa\n    scopes: []\n",
    );
    let out = Command::new(bin())
        .args(["validate", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!(
            "{}:3:11: ",
            dir.path().join("keys.yaml").display()
        )),
        "{text}"
    );
}

#[tokio::test]
async fn serve_takes_config_from_env_and_rejects_a_bad_one() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let k = TestKey::new("k", "sa", &[]);
    write(&dir.path().join("keys.yaml"), &key_file(&[&k]));
    write(
        &dir.path().join("gw.yaml"),
        &format!(
            "listen: 127.0.0.1:{port}\nkeys_file: keys.yaml\nroutes:\n{}",
            route("api", "/api/", &up.url(), "    scopes: []\n")
        ),
    );
    let mut p = Proc(
        Command::new(bin())
            .arg("serve")
            .env("KEYGATE_CONFIG", dir.path().join("gw.yaml"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr).await;
    assert_eq!(
        get(addr, "/api/x", &[&format!("Authorization: {}", k.auth())])
            .await
            .status,
        200
    );
    assert!(p.term().success(), "SIGTERM must exit 0");

    write(
        &dir.path().join("bad.yaml"),
        "keys_file: keys.yaml\nroutes: 7\n",
    );
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(dir.path().join("bad.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.yaml:2:"));
}

#[tokio::test]
#[cfg_attr(
    not(feature = "peers"),
    ignore = "needs outside peers: cargo test --features peers"
)]
async fn demo_prints_working_curl_commands() {
    let port = free_port();
    let mut child = Command::new(bin())
        .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut p = Proc(child);
    let lines: Vec<String> = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .take_while(|l| !l.contains("Ctrl-C"))
            .collect()
    })
    .await
    .unwrap();
    let curls: Vec<&String> = lines.iter().filter(|l| l.starts_with("curl")).collect();
    assert_eq!(curls.len(), 3, "{lines:?}");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr).await;
    let mut statuses = Vec::new();
    for c in curls {
        let out = tokio::task::spawn_blocking({
            let c = c.replace("curl -i", "curl -s -o /dev/null -w %{http_code}");
            move || Command::new("sh").arg("-c").arg(c).output().unwrap()
        })
        .await
        .unwrap();
        statuses.push(String::from_utf8_lossy(&out.stdout).to_string());
    }
    assert_eq!(statuses, vec!["200", "401", "403"]);
    assert!(p.term().success());
}

#[test]
fn kubernetes_example_config_is_valid() {
    // The sidecar's ConfigMap is generated from this file by the kustomization.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/keygate.yaml"
    ))
    .unwrap();
    let config = keygate::config::Config::parse(
        std::path::Path::new("/etc/keygate/config/keygate.yaml"),
        &text,
    )
    .unwrap_or_else(|p| panic!("{p}\n---\n{text}"));
    assert_eq!(
        config.keys_file,
        std::path::PathBuf::from("/etc/keygate/keys/keys.yaml")
    );
    assert!(config.admin_listen.is_some());
}

/// The quick start's curl lines, run as written against the shipped example files (ports moved
/// to free ones), each giving the answer printed beside it.
#[tokio::test]
#[cfg_attr(
    not(feature = "peers"),
    ignore = "needs outside peers: cargo test --features peers"
)]
async fn readme_quick_start_answers_as_printed() {
    if !peer_available("curl", Command::new("curl").arg("--version")) {
        return;
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("## Quick start").unwrap();
    let end = start + readme[start..].find("\n## ").unwrap();
    let quick = &readme[start..end];
    let key = quick
        .lines()
        .find_map(|l| l.strip_prefix("KEY="))
        .expect("the quick start sets KEY")
        .trim()
        .to_string();
    let curls: Vec<&str> = quick.lines().filter(|l| l.starts_with("curl ")).collect();
    assert!(curls.len() >= 4, "{curls:?}");

    let dir = tempfile::tempdir().unwrap();
    let (gw_port, echo_port) = (free_port(), free_port());
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    let moved = |text: String| {
        text.replace("127.0.0.1:8080", &format!("127.0.0.1:{gw_port}"))
            .replace("127.0.0.1:9001", &format!("127.0.0.1:{echo_port}"))
    };
    for f in ["keygate.yaml", "keys.yaml"] {
        let text = std::fs::read_to_string(format!("{shipped}/{f}")).unwrap();
        write(&dir.path().join(f), &moved(text));
    }
    let _echo = Proc(
        Command::new(bin())
            .args(["echo", "--listen", &format!("127.0.0.1:{echo_port}")])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _gw = Proc(
        Command::new(bin())
            .args(["serve", "--config"])
            .arg(dir.path().join("keygate.yaml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(format!("127.0.0.1:{echo_port}").parse().unwrap()).await;
    wait_listening(format!("127.0.0.1:{gw_port}").parse().unwrap()).await;
    for line in curls {
        let (cmd, expect) = line.split_once("   # ").expect("each line says its answer");
        let cmd = moved(cmd.to_string());
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("KEY={key}; {cmd}"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        match expect.split_whitespace().next().unwrap() {
            code if code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()) => {
                assert_eq!(stdout.trim(), code, "{line}");
            }
            _ => {
                // The echo line: the upstream saw the key's id and no Authorization header.
                let v: serde_json::Value =
                    serde_json::from_str(&stdout).unwrap_or_else(|_| panic!("{line}: {stdout}"));
                assert_eq!(v["headers"]["x-api-key-id"], "example", "{stdout}");
                assert!(v["headers"].get("authorization").is_none(), "{stdout}");
            }
        }
    }
}
