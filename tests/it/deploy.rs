//! deploy/: the manifests parse and hang together, the sidecar's config validates, a Secret
//! update reaches a running gateway, and a group-readable Secret mount draws no warning.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::cli::{free_port, Proc};
use crate::support::*;

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(rel)
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()))
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
}

/// The objects `kubectl apply -k deploy/kubernetes` would create from its resource files.
fn resources() -> Vec<Value> {
    let k = &docs(&deploy("kubernetes/kustomization.yaml"))[0];
    k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| docs(&deploy(&format!("kubernetes/{}", r.as_str().unwrap()))))
        .collect()
}

fn find<'a>(objs: &'a [Value], kind: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/kubernetes"))
}

#[test]
fn every_yaml_under_deploy_parses() {
    let mut files = Vec::new();
    yaml_files(&deploy(""), &mut files);
    assert!(files.len() >= 7, "{files:?}");
    for f in &files {
        let d = docs(f);
        assert!(!d.is_empty(), "{} is empty", f.display());
        assert!(d.iter().all(Value::is_object), "{}", f.display());
    }
}

#[test]
fn kustomization_names_files_that_exist() {
    let k = &docs(&deploy("kubernetes/kustomization.yaml"))[0];
    let mut named: Vec<&str> = k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for generator in ["configMapGenerator", "secretGenerator"] {
        for g in k[generator].as_array().unwrap() {
            named.extend(
                g["files"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap()),
            );
        }
    }
    for f in &named {
        assert!(deploy(&format!("kubernetes/{f}")).is_file(), "missing {f}");
    }
    // Hash suffixes would turn every key rotation into a rollout instead of a hot reload.
    assert_eq!(k["generatorOptions"]["disableNameSuffixHash"], true);
}

#[test]
fn sidecar_manifest_keeps_the_app_behind_keygate() {
    let objs = resources();
    let pod = &find(&objs, "Deployment")["spec"]["template"]["spec"];
    let ctx = &pod["securityContext"];
    assert_eq!(ctx["runAsNonRoot"], true);
    assert_eq!(ctx["runAsUser"], 10001);
    assert_eq!(
        ctx["fsGroup"], 10001,
        "uid 10001 cannot read the Secret without it"
    );
    let containers = pod["containers"].as_array().unwrap();
    let kg = containers.iter().find(|c| c["name"] == "keygate").unwrap();
    let app = containers.iter().find(|c| c["name"] != "keygate").unwrap();
    assert!(
        app["ports"].is_null(),
        "the app must publish no port of its own"
    );
    assert!(
        app["args"].to_string().contains("127.0.0.1"),
        "app must bind loopback"
    );
    for c in containers {
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{}", c["name"]);
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{}", c["name"]);
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert!(
            c["resources"]["limits"]["memory"].is_string(),
            "{}",
            c["name"]
        );
    }
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(kg[probe]["httpGet"]["port"], "admin", "{probe}");
    }
    let mounts = kg["volumeMounts"].as_array().unwrap();
    assert!(
        mounts.iter().all(|m| m["subPath"].is_null()),
        "subPath mounts never see Secret or ConfigMap updates"
    );
    let vol = |name: &str| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()
            .clone()
    };
    // kubectl reads YAML 1.1, where 0440 is octal (288); a YAML 1.2 reader keeps the digits.
    let v = &vol("keys")["secret"]["defaultMode"];
    let mode = match v.as_u64() {
        Some(288) => 0o440,
        _ => {
            let digits = v.as_f64().map_or(v.to_string(), |f| format!("{f:.0}"));
            u32::from_str_radix(&digits, 8).unwrap_or_else(|_| panic!("defaultMode {v}"))
        }
    };
    assert_eq!(
        mode, 0o440,
        "group-readable for fsGroup, nothing for others"
    );
    assert!(vol("state")["emptyDir"].is_object());

    let port_of = |name: &str| {
        kg["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["containerPort"]
            .clone()
    };
    let http = port_of("http");
    assert_eq!(
        find(&objs, "Service")["spec"]["ports"][0]["targetPort"],
        "http"
    );
    let ingress = find(&objs, "NetworkPolicy")["spec"]["ingress"]
        .as_array()
        .unwrap();
    let admitted: Vec<&Value> = ingress
        .iter()
        .flat_map(|r| r["ports"].as_array().unwrap())
        .map(|p| &p["port"])
        .collect();
    assert_eq!(admitted, vec![&http], "only keygate's port is admitted");

    let cfg = std::fs::read_to_string(deploy("kubernetes/keygate.yaml")).unwrap();
    assert!(cfg.contains(&format!("listen: 0.0.0.0:{http}")), "{cfg}");
    assert!(cfg.contains("shutdown_delay: 5s"));
}

/// The sidecar's config with its pod paths moved into `dir` and its upstream at `upstream`.
fn sidecar_config(keys: &Path, state: &Path, upstream: &str) -> String {
    let text = std::fs::read_to_string(deploy("kubernetes/keygate.yaml")).unwrap();
    let mut out = text;
    for (from, to) in [
        ("admin_listen: 0.0.0.0:9090", String::new()),
        ("/etc/keygate/keys/keys.yaml", keys.display().to_string()),
        ("/var/lib/keygate", state.display().to_string()),
        ("http://127.0.0.1:9001", upstream.to_string()),
    ] {
        assert!(
            out.contains(from),
            "the sidecar config no longer says {from}"
        );
        out = out.replace(from, &to);
    }
    out
}

#[test]
fn sidecar_config_validates_with_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.yaml");
    let keys = deploy("kubernetes/keys.yaml");
    write(
        &cfg,
        &sidecar_config(&keys, dir.path(), "http://127.0.0.1:9001"),
    );
    let out = Command::new(bin())
        .args(["validate", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compose_config_validates_with_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.yaml");
    let text = std::fs::read_to_string(deploy("compose/etc/keygate.yaml")).unwrap();
    let keys = deploy("compose/etc/keys.yaml");
    assert!(text.contains("/etc/keygate/keys.yaml"));
    write(
        &cfg,
        &text
            .replace("/etc/keygate/keys.yaml", &keys.display().to_string())
            .replace("/var/lib/keygate", &dir.path().display().to_string()),
    );
    let out = Command::new(bin())
        .args(["validate", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let compose = &docs(&deploy("compose/compose.yaml"))[0];
    let volumes = compose["services"]["keygate"]["volumes"].to_string();
    assert!(volumes.contains(":/etc/keygate:ro"), "{volumes}");
}

/// Writes `files` into `dir` as the kubelet does a Secret or ConfigMap volume: a fresh
/// `..<stamp>` folder, then an atomic rename of a new `..data` symlink over the old one.
fn kubelet_publish(dir: &Path, stamp: &str, files: &[(&str, &str)]) {
    let data = format!("..{stamp}");
    std::fs::create_dir(dir.join(&data)).unwrap();
    for (name, text) in files {
        let p = dir.join(&data).join(name);
        write(&p, text);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o440)).unwrap();
    }
    symlink(&data, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{name}"), link).unwrap();
        }
    }
}

#[tokio::test]
async fn secret_update_reaches_the_sidecar_without_restart() {
    let up = Upstream::start().await;
    let old = TestKey::new("old", "sa", &["yc.postbox.send"]);
    let new = TestKey::new("new", "sa", &["yc.postbox.send"]);
    let root = tempfile::tempdir().unwrap();
    let keys_dir = root.path().join("keys");
    std::fs::create_dir(&keys_dir).unwrap();
    kubelet_publish(&keys_dir, "1", &[("keys.yaml", &key_file(&[&old]))]);
    let cfg = sidecar_config(&keys_dir.join("keys.yaml"), root.path(), &up.url());
    kubelet_publish(root.path(), "c1", &[("keygate.yaml", &cfg)]);
    let gw = Gateway::start_in(root).await;

    let status = |k: &TestKey| {
        let auth = format!("Authorization: {}", k.auth());
        async move { get(gw.addr, "/postbox/send", &[&auth]).await.status }
    };
    assert_eq!(status(&old).await, 200);
    assert_eq!(status(&new).await, 401);

    // Step 1 of a rotation: the new key joins the Secret; the old one still works.
    kubelet_publish(&keys_dir, "2", &[("keys.yaml", &key_file(&[&old, &new]))]);
    assert!(
        eventually(5, || async { status(&new).await == 200 }).await,
        "new key not admitted after the Secret update"
    );
    assert_eq!(status(&old).await, 200);

    // Step 3: the old key leaves the Secret and is refused by the same process.
    kubelet_publish(&keys_dir, "3", &[("keys.yaml", &key_file(&[&new]))]);
    assert!(
        eventually(5, || async { status(&old).await == 401 }).await,
        "removed key still admitted"
    );
    assert_eq!(status(&new).await, 200);
    assert_eq!(get(gw.addr, "/health", &[]).await.status, 200);
    gw.stop().await;
}

/// Runs the binary until its admin port answers (the key file is loaded by then), stops it,
/// and returns what it wrote to stderr.
async fn stderr_of_a_started_gateway(dir: &Path) -> String {
    for _ in 0..5 {
        let (port, admin) = (free_port(), free_port());
        write(
            &dir.join("keygate.yaml"),
            &format!(
                "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nkeys_file: keys/keys.yaml\nroutes:\n{}",
                route("h", "/", "http://127.0.0.1:9", "    public: true\n")
            ),
        );
        let child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(dir.join("keygate.yaml"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut p = Proc(child);
        let addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
        let up = eventually(20, || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
        let alive = p.0.try_wait().unwrap().is_none();
        let mut p = tokio::task::spawn_blocking(move || {
            p.term();
            p
        })
        .await
        .unwrap();
        if up && alive {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut p.0.stderr.take().unwrap(), &mut err).unwrap();
            return err;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gateway did not start in 5 attempts");
}

#[tokio::test]
async fn only_a_world_readable_key_file_is_warned_about() {
    for (mode, warned) in [(0o440, false), (0o640, false), (0o444, true), (0o602, true)] {
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join("keys");
        std::fs::create_dir(&keys_dir).unwrap();
        kubelet_publish(&keys_dir, "1", &[("keys.yaml", &key_file(&[]))]);
        let real = keys_dir.join("..1/keys.yaml");
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = stderr_of_a_started_gateway(dir.path()).await;
        let file = keys_dir.join("keys.yaml").display().to_string();
        let warnings = err
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["level"] == "WARN" && l.to_string().contains(&file))
            .count();
        assert_eq!(warnings > 0, warned, "mode {mode:o}: {err}");
    }
}
