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

const SIX_PROBLEMS: &str = "\
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
    scopes: [x.read]
";

#[test]
fn validate_lists_unknown_fields_beside_every_other_config_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.yaml");
    write(&cfg, SIX_PROBLEMS);
    write(&dir.path().join("keys.yaml"), "keys: []\n");
    let out = run("validate", &cfg);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    // Unknown top-level key, the route the `scope` typo leaves without scopes, bad upstream,
    // unknown route field, duplicate name, bad duration.
    assert_eq!(
        positions(&text, &cfg),
        ["2:1", "4:5", "6:15", "7:5", "8:11", "11:14"],
        "{text}"
    );
    assert_eq!(text.lines().count(), 6, "{text}");
    // The typo hints name the field that was meant.
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].contains("`listen`"), "{text}");
    assert!(lines[3].contains("`scopes`"), "{text}");
}

#[test]
fn serve_refuses_the_same_file_listing_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.yaml");
    write(&cfg, SIX_PROBLEMS);
    write(&dir.path().join("keys.yaml"), "keys: []\n");
    let out = run("serve", &cfg);
    assert_eq!(out.status.code(), Some(2));
    // A config that cannot be read gets JSON diagnostics, one problem per line's message.
    let text: String = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some(format!("{}\n", v["message"].as_str()?)))
        .collect();
    assert_eq!(
        positions(&text, &cfg),
        ["2:1", "4:5", "6:15", "7:5", "8:11", "11:14"],
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
    // keys_file (at the document), path_prefix and scopes (at the route), timeout, the
    // unknown field.
    assert_eq!(
        positions(&text, &cfg),
        ["1:1", "2:5", "2:5", "4:14", "5:5"],
        "{text}"
    );
}

#[test]
fn validate_lists_unknown_fields_beside_every_other_key_file_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.yaml");
    let keys = dir.path().join("keys.yaml");
    write(&cfg, "keys_file: keys.yaml\nroutes: [{name: a, path_prefix: /, upstream: 'http://127.0.0.1:1', public: true}]\n");
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

const LOOSE: &str = "\
keys_file: keys.yaml
routes:
  - name: typo
    path_prefix: /a/
    methods: [GET, GTE]
    upstream: http://127.0.0.1:1
    scopes: [x.read]
  - name: far
    path_prefix: /b/
    upstream: http://localhost:99999
    scopes: [x.read]
  - name: zero
    path_prefix: /c/
    upstream: http://localhost:0
    scopes: [x.read]
  - name: open
    path_prefix: /d/
    upstream: http://127.0.0.1:1
";

#[test]
fn unknown_methods_bad_ports_and_routes_without_scopes_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.yaml");
    write(&cfg, LOOSE);
    write(&dir.path().join("keys.yaml"), "keys: []\n");
    let out = run("validate", &cfg);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    // The method, both upstream values, and the route that is neither public nor scoped.
    assert_eq!(
        positions(&text, &cfg),
        ["5:20", "10:15", "14:15", "16:5"],
        "{text}"
    );
    assert!(text.lines().next().unwrap().contains("`GET`"), "{text}");
    assert!(
        text.lines().nth(3).unwrap().contains("scopes: []"),
        "{text}"
    );
}

#[test]
fn an_empty_route_table_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.yaml");
    write(&dir.path().join("keys.yaml"), "keys: []\n");
    for (text, at) in [
        ("keys_file: keys.yaml\nroutes: []\n", "2:9"),
        ("keys_file: keys.yaml\n", "1:1"),
    ] {
        write(&cfg, text);
        let out = run("validate", &cfg);
        assert_eq!(out.status.code(), Some(2), "{text}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(positions(&stdout, &cfg), [at], "{stdout}");
    }
}

#[test]
fn empty_scopes_pass_with_a_warning_at_the_list() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.yaml");
    write(
        &cfg,
        "keys_file: keys.yaml\nroutes:\n  - name: any\n    path_prefix: /\n    upstream: http://127.0.0.1:1\n    scopes: []\n",
    );
    write(&dir.path().join("keys.yaml"), "keys: []\n");
    let out = run("validate", &cfg);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    let warning = format!("{}:6:13: warning: ", cfg.display());
    assert!(text.lines().next().unwrap().starts_with(&warning), "{text}");
    assert_eq!(text.lines().count(), 2, "{text}");
}
