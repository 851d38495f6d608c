//! The audit log and `--output k8s-secret`, over the real binary: a line per change with its
//! actor, `keys audit ID`, a failed audit write stopping the change, a manifest without the key.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::*;

/// A config with `audit_log: audit.jsonl` (unless `audit` says otherwise) and an empty key file.
fn setup(audit: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("keys.yaml"), "keys: []\n");
    write(
        &dir.path().join("keygate.yaml"),
        &format!(
            "keys_file: keys.yaml\n{audit}routes:\n{}",
            route(
                "api",
                "/api/",
                "http://127.0.0.1:1",
                "    scopes: [app.read]\n"
            )
        ),
    );
    let cfg = dir.path().join("keygate.yaml");
    (dir, cfg)
}

fn keys(cfg: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("keys")
        .args(args)
        .arg("--config")
        .arg(cfg)
        .env("USER", "env-user")
        .output()
        .unwrap()
}

use crate::keys_cli::ok;

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect()
}

fn create(cfg: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "create",
        "--service-account",
        "sa-app",
        "--scope",
        "app.read",
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&ok(&keys(cfg, &args))).unwrap()
}

#[test]
fn every_change_appends_one_line_with_its_actor() {
    let (dir, cfg) = setup("audit_log: audit.jsonl\n");
    let log = dir.path().join("audit.jsonl");
    let made = create(
        &cfg,
        &[
            "--actor",
            "alice",
            "--expires-in",
            "30d",
            "--rate-limit",
            "100/s",
            "--quota",
            "1000/day",
            "--allow-cidr",
            "10.0.0.0/8",
        ],
    );
    let id = made["id"].as_str().unwrap().to_string();
    let rotated: serde_json::Value = serde_json::from_str(&ok(&keys(
        &cfg,
        &["rotate", &id, "--grace", "1h", "--output", "json"],
    )))
    .unwrap();
    let new_id = rotated["id"].as_str().unwrap().to_string();
    ok(&keys(&cfg, &["revoke", &new_id, "--actor", "bob"]));
    let hash = "sha256:".to_string() + &"ab".repeat(32);
    ok(&keys(
        &cfg,
        &[
            "import",
            "--hash",
            &hash,
            "--service-account",
            "sa-other",
            "--scope",
            "app.read",
            "--id",
            "imported",
        ],
    ));
    let lines = audit_lines(&log);
    let actions: Vec<&str> = lines
        .iter()
        .map(|l| l["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["create", "rotate", "revoke", "import"]);
    let actors: Vec<&str> = lines.iter().map(|l| l["actor"].as_str().unwrap()).collect();
    assert_eq!(actors, ["alice", "env-user", "bob", "env-user"]);
    assert_eq!(lines[0]["id"], id.as_str());
    assert_eq!(lines[0]["service_account"], "sa-app");
    assert_eq!(lines[0]["scopes"], serde_json::json!(["app.read"]));
    assert_eq!(
        lines[0]["limits"],
        serde_json::json!({"rate_limit": "100/s", "burst": 100, "quota": "1000/day", "allowed_cidrs": ["10.0.0.0/8"]})
    );
    // Rotation carries the limits over, and its line says so.
    assert_eq!(lines[1]["limits"], lines[0]["limits"]);
    assert!(lines[0]["expires_at"].is_string());
    assert_eq!(lines[1]["id"], new_id.as_str());
    assert_eq!(lines[1]["replaces"], id.as_str());
    assert!(lines[2]["revoked_at"].is_string());
    assert_eq!(lines[3]["id"], "imported");
    for l in &lines {
        let t = l["time"].as_str().unwrap();
        assert!(
            t.ends_with('Z') && keygate::keys::parse_time(t).is_ok(),
            "{t}"
        );
    }
    // Neither secrets nor hashes are in the log.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(made["key"].as_str().unwrap()));
    assert!(!text.contains(rotated["key"].as_str().unwrap()));
    assert!(!text.contains("sha256:"), "{text}");
    // A refused change writes nothing.
    assert!(!keys(&cfg, &["revoke", "no-such-key"]).status.success());
    assert_eq!(audit_lines(&log).len(), 4);
}

#[test]
fn keys_audit_prints_all_or_one_key_s_lines() {
    let (_dir, cfg) = setup("audit_log: audit.jsonl\n");
    let a = create(&cfg, &[]);
    let b = create(&cfg, &[]);
    let (a, b) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    ok(&keys(&cfg, &["revoke", a]));
    let all = ok(&keys(&cfg, &["audit"]));
    assert_eq!(all.lines().count(), 3, "{all}");
    let only_a = ok(&keys(&cfg, &["audit", a]));
    assert_eq!(only_a.lines().count(), 2, "{only_a}");
    assert!(
        only_a.lines().all(|l| l.contains(a) && !l.contains(b)),
        "{only_a}"
    );
    assert!(
        only_a.contains("revoke") && only_a.contains("env-user"),
        "{only_a}"
    );
    let json = ok(&keys(&cfg, &["audit", b, "--output", "json"]));
    let rows: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["action"], "create");
    // Rotation lines are found by the old key's id too.
    ok(&keys(&cfg, &["rotate", b]));
    assert_eq!(ok(&keys(&cfg, &["audit", b])).lines().count(), 2);
}

#[test]
fn a_failed_audit_write_stops_the_change() {
    let (dir, cfg) = setup("audit_log: no-such-dir/audit.jsonl\n");
    let out = keys(
        &cfg,
        &["create", "--service-account", "sa", "--scope", "app.read"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "no key may be shown for a change not made"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("audit log"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("keys.yaml")).unwrap(),
        "keys: []\n"
    );
}

#[test]
fn without_a_config_only_audit_log_flag_audits() {
    let dir = tempfile::tempdir().unwrap();
    let kf = dir.path().join("keys.yaml");
    write(&kf, "keys: []\n");
    let run = |extra: &[&str]| {
        Command::new(bin())
            .args([
                "keys",
                "create",
                "--service-account",
                "sa",
                "--scope",
                "a.b",
            ])
            .arg("--keys-file")
            .arg(&kf)
            .args(extra)
            .output()
            .unwrap()
    };
    ok(&run(&[]));
    assert!(!dir.path().join("audit.jsonl").exists());
    let log = dir.path().join("audit.jsonl");
    ok(&run(&[
        "--audit-log",
        log.to_str().unwrap(),
        "--actor",
        "ci",
    ]));
    let lines = audit_lines(&log);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["actor"], "ci");
    // `keys audit` with no log to read is a usage error.
    let out = Command::new(bin())
        .args(["keys", "audit", "--keys-file"])
        .arg(&kf)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn k8s_secret_holds_the_updated_key_file_with_hashes_only() {
    let (dir, cfg) = setup("");
    let first = create(&cfg, &[]);
    let out = keys(
        &cfg,
        &[
            "create",
            "--service-account",
            "sa-app",
            "--scope",
            "app.read",
            "--output",
            "k8s-secret",
            "--secret-name",
            "postbox-keys",
        ],
    );
    let manifest = ok(&out);
    let doc: serde_json::Value = serde_saphyr::from_str(&manifest).unwrap();
    assert_eq!(doc["apiVersion"], "v1");
    assert_eq!(doc["kind"], "Secret");
    assert_eq!(doc["metadata"]["name"], "postbox-keys");
    // The data key is the file the deploy/kubernetes kustomization builds its Secret from.
    let key_file = doc["stringData"]["keys.yaml"].as_str().unwrap();
    assert_eq!(
        key_file,
        std::fs::read_to_string(dir.path().join("keys.yaml")).unwrap()
    );
    let records = keygate::keys::parse_key_file(Path::new("keys.yaml"), key_file).unwrap();
    assert_eq!(records.len(), 2);
    // The new key is shown once on stderr, and appears nowhere in the manifest.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let key = stderr.lines().next().unwrap();
    assert!(key.starts_with("kg_"), "{stderr}");
    assert!(!manifest.contains(key));
    assert!(manifest.contains(&keygate::keys::hash_line(key.as_bytes())));
    assert!(!manifest.contains(first["key"].as_str().unwrap()));
    // Rotation prints the same kind of manifest.
    let id = first["id"].as_str().unwrap();
    let out = keys(
        &cfg,
        &[
            "rotate",
            id,
            "--output",
            "k8s-secret",
            "--secret-name",
            "postbox-keys",
        ],
    );
    let doc: serde_json::Value = serde_saphyr::from_str(&ok(&out)).unwrap();
    assert_eq!(doc["kind"], "Secret");
    // Misuse is a usage error.
    for args in [
        &[
            "create",
            "--service-account",
            "s",
            "--scope",
            "a.b",
            "--output",
            "k8s-secret",
        ][..],
        &["list", "--output", "k8s-secret"][..],
        &[
            "create",
            "--service-account",
            "s",
            "--scope",
            "a.b",
            "--secret-name",
            "x",
        ][..],
        &[
            "create",
            "--service-account",
            "s",
            "--scope",
            "a.b",
            "--output",
            "k8s-secret",
            "--secret-name",
            "Bad_Name",
        ][..],
    ] {
        assert_eq!(keys(&cfg, args).status.code(), Some(2), "{args:?}");
    }
}
