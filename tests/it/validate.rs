//! `keygate validate` and `serve` list every problem of a file in one run, unknown fields
//! included, each as `file:line:column: message`.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::*;

fn run(cmd: &str, config: &Path) -> Output {
    Command::new(bin())
        .args([cmd, "--config"])
        .arg(config)
        .output()
        .unwrap()
}

/// The `line:column` of each output line that is a problem in `file`.
fn positions(text: &str, file: &Path) -> Vec<String> {
    let prefix = format!("{}:", file.display());
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let mut parts = rest.splitn(3, ':');
            let (line, col) = (parts.next()?, parts.next()?);
            parts
                .next()?
                .starts_with(' ')
                .then(|| format!("{line}:{col}"))
        })
        .collect()
}

const FIVE_PROBLEMS: &str = "\
keys_file: keys.yaml
listen_addr: 127.0.0.1:8080
routes:
  - name: a
    path_prefix: /a/
    upstream: ftp://x
    scope: [x.read]
  - name: a
    path_prefix: /b/
    upstream: http://127.0.0.1:1
    timeout: soon
";

#[test]
fn validate_lists_unknown_fields_beside_every_other_config_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.yaml");
    write(&cfg, FIVE_PROBLEMS);
    write(&dir.path().join("keys.yaml"), "keys: []\n");
    let out = run("validate", &cfg);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    // Unknown top-level key, bad upstream, unknown route field, duplicate name, bad duration.
    assert_eq!(
        positions(&text, &cfg),
        ["2:1", "6:15", "7:5", "8:11", "11:14"],
        "{text}"
    );
    assert_eq!(text.lines().count(), 5, "{text}");
    // The typo hints name the field that was meant.
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].contains("`listen`"), "{text}");
    assert!(lines[2].contains("`scopes`"), "{text}");
}

#[test]
fn serve_refuses_the_same_file_listing_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.yaml");
    write(&cfg, FIVE_PROBLEMS);
    write(&dir.path().join("keys.yaml"), "keys: []\n");
    let out = run("serve", &cfg);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        positions(&text, &cfg),
        ["2:1", "6:15", "7:5", "8:11", "11:14"],
        "{text}"
    );
}

#[test]
fn missing_required_fields_are_listed_with_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.yaml");
    write(
        &cfg,
        "routes:\n  - name: a\n    upstream: http://127.0.0.1:1\n    timeout: soon\n    websockets: false\n",
    );
    let out = run("validate", &cfg);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    // keys_file (at the document), path_prefix (at the route), timeout, the unknown field.
    assert_eq!(
        positions(&text, &cfg),
        ["1:1", "2:5", "4:14", "5:5"],
        "{text}"
    );
}

#[test]
fn validate_lists_unknown_fields_beside_every_other_key_file_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.yaml");
    let keys = dir.path().join("keys.yaml");
    write(&cfg, "keys_file: keys.yaml\nroutes: []\n");
    let good = TestKey::new("good", "sa", &["x.read"]);
    let text = format!(
        "keys:\n{}  - id: typo\n    hash: sha256:00\n    service_account: sa\n    scopes: [x.read]\n    revoke_at: 2026-01-01T00:00:00Z\n  - id: late\n    service_account: sa\n    scopes: [x.read]\n    expires_at: tomorrow\n",
        good.entry()
    );
    write(&keys, &text);
    let out = run("validate", &cfg);
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The good entry takes lines 2-6: bad hash, unknown `revoke_at`, missing hash, bad time.
    assert_eq!(
        positions(&stdout, &keys),
        ["8:11", "11:5", "12:5", "15:17"],
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 4, "{stdout}");
    assert!(
        stdout.lines().nth(1).unwrap().contains("`revoked_at`"),
        "{stdout}"
    );
}

#[test]
fn a_yaml_syntax_error_is_the_one_problem_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.yaml");
    write(&cfg, "keys_file: keys.yaml\nbogus: 1\nroutes: [\n");
    let out = run("validate", &cfg);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(positions(&text, &cfg).len(), 1, "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
}
