//! `keygate keys ...` end to end over the real binary and a running gateway.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::cli::{free_port, wait_listening, Proc};
use crate::support::*;

fn keys(config: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("keys")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

pub(crate) fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn setup(up: &Upstream, extra: &str) -> (tempfile::TempDir, std::path::PathBuf, u16) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    write(&dir.path().join("keys.yaml"), "keys: []\n");
    std::fs::set_permissions(
        dir.path().join("keys.yaml"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &format!(
            "listen: 127.0.0.1:{port}\nkeys_file: keys.yaml\n{extra}routes:\n{}",
            route("api", "/api/", &up.url(), "    scopes: [yc.postbox.send]\n")
        ),
    );
    let cfg = dir.path().join("keygate.yaml");
    (dir, cfg, port)
}

fn list(cfg: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&keys(cfg, &["list", "--output", "json"]))).unwrap()
}

#[tokio::test]
async fn lifecycle_through_a_running_gateway() {
    let up = Upstream::start().await;
    let (dir, cfg, port) = setup(&up, "");
    let mut gw = Proc(
        Command::new(bin())
            .args(["serve", "--config"])
            .arg(&cfg)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr).await;

    let out = keys(
        &cfg,
        &[
            "create",
            "--service-account",
            "sa-mailer",
            "--scope",
            "yc.postbox.send",
            "--description",
            "nightly mailer",
        ],
    );
    let key = ok(&out).trim().to_string();
    assert!(key.starts_with("kg_") && key.len() == 41, "{key}");
    assert!(String::from_utf8_lossy(&out.stderr)
        .to_lowercase()
        .contains("cannot be shown again"));
    let file = std::fs::read_to_string(dir.path().join("keys.yaml")).unwrap();
    assert!(
        !file.contains(&key) && !file.contains(&key[3..]),
        "the secret reached the key file"
    );
    let mode = std::fs::metadata(dir.path().join("keys.yaml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640, "a rewrite must keep the file's mode");

    let auth = format!("Authorization: Api-Key {key}");
    let call = |a: String| async move { get(addr, "/api/x", &[&a]).await };
    assert!(eventually(2, || async { call(auth.clone()).await.status == 200 }).await);

    let listed = list(&cfg);
    let id = listed[0]["id"].as_str().unwrap().to_string();
    assert_eq!(listed[0]["status"], "active");
    assert_eq!(listed[0]["service_account"], "sa-mailer");
    assert!(
        !listed.to_string().contains("sha256"),
        "list must not show hashes"
    );

    // Rotate with grace: both work, the old one then expires.
    let out = keys(&cfg, &["rotate", &id, "--grace", "2s", "--output", "json"]);
    let rotated: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    let new_key = rotated["key"].as_str().unwrap().to_string();
    let new_id = rotated["id"].as_str().unwrap().to_string();
    assert_ne!(new_id, id);
    assert_eq!(rotated["service_account"], "sa-mailer");
    assert_eq!(rotated["scopes"], serde_json::json!(["yc.postbox.send"]));
    let new_auth = format!("Authorization: Api-Key {new_key}");
    assert!(eventually(2, || async { call(new_auth.clone()).await.status == 200 }).await);
    assert_eq!(
        call(auth.clone()).await.status,
        200,
        "old key must work during the grace period"
    );
    assert!(
        eventually(5, || async {
            call(auth.clone()).await.code() == "expired_api_key"
        })
        .await,
        "old key did not expire after the grace period"
    );

    // Revoke: 401 revoked_api_key within 2 s.
    ok(&keys(&cfg, &["revoke", &new_id]));
    assert!(
        eventually(2, || async {
            call(new_auth.clone()).await.code() == "revoked_api_key"
        })
        .await
    );

    // Shutdown flushes last-used state; list shows it.
    assert!(gw.term().success());
    let listed = list(&cfg);
    let new = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == new_id.as_str())
        .unwrap();
    assert!(
        new["last_used"]
            .as_str()
            .is_some_and(|t| t.starts_with("20")),
        "{new}"
    );
    assert_eq!(new["status"], "revoked");
    let text = ok(&keys(&cfg, &["list"]));
    assert!(
        text.contains(&new_id) && text.contains("revoked") && text.contains("expired"),
        "{text}"
    );
    assert!(!text.contains(&key) && !text.contains(&new_key));
}

#[test]
fn twenty_parallel_creates_leave_twenty_entries() {
    let dir = tempfile::tempdir().unwrap();
    let kf = dir.path().join("keys.yaml");
    let children: Vec<_> = (0..20)
        .map(|_| {
            Command::new(bin())
                .args([
                    "keys",
                    "create",
                    "--service-account",
                    "sa",
                    "--scope",
                    "a.b",
                    "--keys-file",
                ])
                .arg(&kf)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut secrets = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        secrets.push(ok(&out).trim().to_string());
    }
    let records = keygate::keys::load_key_file(&kf).unwrap();
    assert_eq!(records.len(), 20);
    let mode = std::fs::metadata(&kf).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "a new key file must be private");
    for s in &secrets {
        assert!(records
            .iter()
            .any(|r| r.hash == keygate::keys::digest(s.as_bytes())));
    }
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.ends_with(".tmp")),
        "temp files left behind: {names:?}"
    );
}

#[test]
fn hash_and_import() {
    let dir = tempfile::tempdir().unwrap();
    let kf = dir.path().join("keys.yaml");
    let mut child = Command::new(bin())
        .args(["keys", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"external-secret-1\n")
        .unwrap();
    let line = ok(&child.wait_with_output().unwrap()).trim().to_string();
    assert_eq!(line, keygate::keys::hash_line(b"external-secret-1"));
    let out = Command::new(bin())
        .args([
            "keys",
            "import",
            "--hash",
            &line,
            "--service-account",
            "sa-ext",
            "--scope",
            "a.b",
            "--keys-file",
        ])
        .arg(&kf)
        .output()
        .unwrap();
    ok(&out);
    let records = keygate::keys::load_key_file(&kf).unwrap();
    assert_eq!(records[0].hash, keygate::keys::digest(b"external-secret-1"));
    assert_eq!(records[0].service_account, "sa-ext");
}

#[test]
fn bad_inputs_give_one_line_and_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("keys.yaml"), "keys: []\n");
    write(
        &dir.path().join("keygate.yaml"),
        "keys_file: keys.yaml\nknown_scopes: [yc.postbox.send, yc.ydb.tables.manage]\nroutes: [{name: a, path_prefix: /, upstream: 'http://127.0.0.1:1', public: true}]\n",
    );
    let cfg = dir.path().join("keygate.yaml");
    let cases: Vec<(Vec<&str>, Option<&str>)> = vec![
        (vec!["revoke", "nope"], Some("nope")),
        (vec!["rotate", "nope"], Some("nope")),
        (
            vec![
                "create",
                "--service-account",
                "sa",
                "--scope",
                "yc.postbox.send",
                "--expires-in",
                "soon",
            ],
            Some("soon"),
        ),
        (
            vec![
                "create",
                "--service-account",
                "sa",
                "--scope",
                "yc.postbox.sned",
            ],
            Some("yc.postbox.send"),
        ),
    ];
    for (args, mention) in cases {
        let out = keys(&cfg, &args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        if let Some(m) = mention {
            assert!(err.contains(m), "{args:?}: {err}");
        }
    }
    assert_eq!(keys(&cfg, &["revoke", "nope"]).status.code(), Some(1));

    // Unwritable folder: clear error, file untouched.
    let ro = tempfile::tempdir().unwrap();
    write(&ro.path().join("keys.yaml"), "keys: []\n");
    std::fs::set_permissions(ro.path(), std::fs::Permissions::from_mode(0o500)).unwrap();
    let out = Command::new(bin())
        .args([
            "keys",
            "create",
            "--service-account",
            "sa",
            "--scope",
            "a.b",
            "--keys-file",
        ])
        .arg(ro.path().join("keys.yaml"))
        .output()
        .unwrap();
    std::fs::set_permissions(ro.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    // Root ignores folder permissions; only check when the write really was refused.
    if !out.status.success() {
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim().lines().count(),
            1
        );
        assert_eq!(
            std::fs::read_to_string(ro.path().join("keys.yaml")).unwrap(),
            "keys: []\n"
        );
    }
    let _ = Duration::from_secs(0);
}

pub(crate) fn keys_at(keys_file: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("keys")
        .args(args)
        .arg("--keys-file")
        .arg(keys_file)
        .output()
        .unwrap()
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

const CREATE: [&str; 5] = ["create", "--service-account", "sa", "--scope", "a.b"];

#[test]
fn rewrite_keeps_owner_group_and_mode() {
    if !is_root() {
        eprintln!("skipped: needs root to hand the file to another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kf = dir.path().join("keys.yaml");
    write(&kf, "keys: []\n");
    std::os::unix::fs::chown(&kf, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o640)).unwrap();
    let created: serde_json::Value = serde_json::from_str(&ok(&keys_at(
        &kf,
        &[&CREATE[..], &["--output", "json"]].concat(),
    )))
    .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    let check = |step: &str| {
        let m = std::fs::metadata(&kf).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            (65534, 65534, 0o640),
            "after {step}"
        );
    };
    check("create");
    ok(&keys_at(&kf, &["revoke", &id]));
    check("revoke");
    let records = keygate::keys::load_key_file(&kf).unwrap();
    assert!(records[0].revoked_at.is_some());
}

#[test]
fn symlinked_key_file_is_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let (real, conf) = (dir.path().join("real"), dir.path().join("conf"));
    std::fs::create_dir(&real).unwrap();
    std::fs::create_dir(&conf).unwrap();
    write(&real.join("keys.yaml"), "keys: []\n");
    std::os::unix::fs::symlink("../real/keys.yaml", conf.join("keys.yaml")).unwrap();
    for _ in 0..2 {
        ok(&keys_at(&conf.join("keys.yaml"), &CREATE));
    }
    let link = std::fs::symlink_metadata(conf.join("keys.yaml")).unwrap();
    assert!(link.file_type().is_symlink(), "the symlink was replaced");
    assert_eq!(
        keygate::keys::load_key_file(&real.join("keys.yaml"))
            .unwrap()
            .len(),
        2
    );
    assert!(
        real.join("keys.yaml.lock").exists(),
        "lock not beside the target"
    );
    let names = |d: &Path| -> Vec<String> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names(&conf), vec!["keys.yaml".to_string()]);
    assert!(!names(&real).iter().any(|n| n.ends_with(".tmp")));
}

#[test]
#[cfg_attr(
    not(feature = "peers"),
    ignore = "needs outside peers: cargo test --features peers"
)]
fn rewrite_that_would_lock_the_owner_out_fails() {
    let setpriv = Path::new("/usr/bin/setpriv");
    // .ci/run runs the peers tier as root, where util-linux's setpriv is present.
    assert!(
        is_root() && setpriv.exists(),
        "needs root and setpriv to run the CLI as another user"
    );
    // uid 1234 owns the file; nobody may read and write it only through group 1234, so its
    // rewrite cannot be handed back to uid 1234, who could then no longer read it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let kf = dir.path().join("keys.yaml");
    write(&kf, "keys: []\n");
    std::os::unix::fs::chown(&kf, Some(1234), Some(1234)).unwrap();
    std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o660)).unwrap();
    let out = Command::new(setpriv)
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--groups=1234",
            "--",
            bin(),
            "keys",
        ])
        .args(CREATE)
        .arg("--keys-file")
        .arg(&kf)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
    let m = std::fs::metadata(&kf).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (1234, 1234, 0o660));
    assert_eq!(std::fs::read_to_string(&kf).unwrap(), "keys: []\n");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
}

/// A key file entry written by hand, with times relative to now.
fn entry_at(
    id: &str,
    created: time::Duration,
    expires: Option<time::Duration>,
    extra: &str,
) -> String {
    let now = time::OffsetDateTime::now_utc();
    let at = |d: time::Duration| keygate::keys::format_time(now + d);
    let expires = expires.map_or(String::new(), |d| format!("    expires_at: {}\n", at(d)));
    format!(
        "  - id: {id}\n    hash: {}\n    service_account: sa-{id}\n    scopes: [a.b, c.d]\n    created_at: {}\n{expires}{extra}",
        keygate::keys::hash_line(keygate::keys::generate().unwrap().as_bytes()),
        at(created),
    )
}

fn record<'a>(rows: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap()
}

fn seconds_from_now(rfc3339: &serde_json::Value) -> i64 {
    let t = keygate::keys::parse_time(rfc3339.as_str().unwrap()).unwrap();
    (t - time::OffsetDateTime::now_utc()).whole_seconds()
}

#[test]
fn rotating_a_revoked_key_needs_reissue_and_leaves_the_entry_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.yaml");
    let day = time::Duration::days(1);
    let revoked = "    revoked_at: 2026-01-02T00:00:00Z\n";
    write(
        &file,
        &format!(
            "keys:\n{}",
            entry_at("leaked", -day, Some(day * 30), revoked)
        ),
    );
    let before = std::fs::read_to_string(&file).unwrap();

    let out = keys_at(&file, &["rotate", "leaked"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keys rotate leaked --reissue"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), before);

    let out = keys_at(
        &file,
        &[
            "rotate",
            "leaked",
            "--reissue",
            "--grace",
            "1h",
            "--output",
            "json",
        ],
    );
    let fresh: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(fresh["scopes"], serde_json::json!(["a.b", "c.d"]));
    assert_eq!(fresh["replaces"], "leaked");
    let rows: serde_json::Value =
        serde_json::from_str(&ok(&keys_at(&file, &["list", "--output", "json"]))).unwrap();
    let old = record(&rows, "leaked");
    assert_eq!(old["status"], "revoked");
    assert_eq!(old["revoked_at"], "2026-01-02T00:00:00Z");
    // The entry keeps its own expiry (31 days of lifetime, 30 left), not the grace period.
    assert!(seconds_from_now(&old["expires_at"]) > 29 * 86_400);
    let new = record(&rows, fresh["id"].as_str().unwrap());
    assert_eq!(new["status"], "active");
    // The lifetime (31 days) is counted from now.
    let left = seconds_from_now(&new["expires_at"]);
    assert!((31 * 86_400 - 120..=31 * 86_400).contains(&left), "{left}");
}

#[test]
fn rotation_counts_the_old_lifetime_from_now_and_refuses_expired_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.yaml");
    let (day, minute) = (time::Duration::days(1), time::Duration::minutes(1));
    write(
        &file,
        &format!(
            "keys:\n{}{}",
            entry_at("dying", -day * 90 + minute, Some(minute), ""),
            entry_at("dead", -day * 90, Some(-minute), "")
        ),
    );
    let out = keys_at(
        &file,
        &["rotate", "dying", "--grace", "10m", "--output", "json"],
    );
    let fresh: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    let left = seconds_from_now(&fresh["expires_at"]);
    assert!((90 * 86_400 - 120..=90 * 86_400).contains(&left), "{left}");

    let before = std::fs::read_to_string(&file).unwrap();
    let out = keys_at(&file, &["rotate", "dead"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--expires-in"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), before);

    let out = keys_at(
        &file,
        &["rotate", "dead", "--no-expiry", "--expires-in", "1d"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), before);

    let out = keys_at(
        &file,
        &["rotate", "dead", "--expires-in", "30d", "--output", "json"],
    );
    let fresh: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    let left = seconds_from_now(&fresh["expires_at"]);
    assert!((30 * 86_400 - 120..=30 * 86_400).contains(&left), "{left}");
    let id = fresh["id"].as_str().unwrap().to_string();
    let out = keys_at(&file, &["rotate", &id, "--no-expiry", "--output", "json"]);
    let fresh: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert!(fresh["expires_at"].is_null(), "{fresh}");
}
