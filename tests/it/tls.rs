//! TLS: real handshakes with a test CA, curl over HTTP/1.1 and HTTP/2, certificate hot reload
//! that never serves a mismatched pair, and https upstreams verified with a route's CA file.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

use crate::support::certs::{Ca, Leaf};
use crate::support::*;

async fn tls_gateway(ca: &Ca, leaf: &Leaf, up: &Upstream, k: &TestKey) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tls")).unwrap();
    write(&dir.path().join("tls/cert.pem"), &leaf.cert_pem);
    write(&dir.path().join("tls/key.pem"), &leaf.key_pem);
    write(&dir.path().join("ca.pem"), &ca.pem);
    write(&dir.path().join("keys.yaml"), &key_file(&[k]));
    write(
        &dir.path().join("keygate.yaml"),
        &format!(
            "keys_file: keys.yaml\ntls:\n  cert: tls/cert.pem\n  key: tls/key.pem\nroutes:\n{}",
            route("api", "/api/", &up.url(), "    scopes: []\n")
        ),
    );
    Gateway::start_in_tls(dir).await
}

fn curl(args: &[&str]) -> (String, bool) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        out.status.success(),
    )
}

/// The certificate the gateway presents right now.
async fn presented(gw: &Gateway, ca: &Ca) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls::pki_types::CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap();
    roots.add(der).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let tls = conn
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

use rustls::pki_types::pem::PemObject;

#[tokio::test]
async fn https_over_http1_and_http2_with_curl() {
    let ca = Ca::new();
    let leaf = ca.leaf();
    let up = Upstream::start().await;
    let k = TestKey::new("k", "sa", &[]);
    let gw = tls_gateway(&ca, &leaf, &up, &k).await;
    let url = format!("https://localhost:{}/api/x", gw.addr.port());
    let resolve = format!("localhost:{}:127.0.0.1", gw.addr.port());
    let cafile = gw.path("ca.pem").display().to_string();
    let auth = format!("Authorization: {}", k.auth());
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let (out, ok) = tokio::task::spawn_blocking({
            let args: Vec<String> = vec![
                flag.into(),
                "--cacert".into(),
                cafile.clone(),
                "--resolve".into(),
                resolve.clone(),
                "-H".into(),
                auth.clone(),
                "-o".into(),
                "/dev/null".into(),
                "-w".into(),
                "%{http_code} %{http_version}".into(),
                url.clone(),
            ];
            move || curl(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap();
        assert!(ok, "curl {flag} failed");
        assert_eq!(out, format!("200 {version}"));
    }
    assert_eq!(up.last().headers.get("x-forwarded-proto").unwrap(), "https");
    // TLS 1.1 and below are refused.
    let (_, ok) = tokio::task::spawn_blocking({
        let (c, r, u) = (cafile.clone(), resolve.clone(), url.clone());
        move || {
            curl(&[
                "--tlsv1.0",
                "--tls-max",
                "1.1",
                "--cacert",
                &c,
                "--resolve",
                &r,
                &u,
            ])
        }
    })
    .await
    .unwrap();
    assert!(!ok, "a TLS 1.1 handshake succeeded");
    gw.stop().await;
}

#[tokio::test]
async fn certificate_reload_never_swaps_in_a_mismatched_pair() {
    let ca = Ca::new();
    let first = ca.leaf();
    let up = Upstream::start().await;
    let k = TestKey::new("k", "sa", &[]);
    let gw = tls_gateway(&ca, &first, &up, &k).await;
    assert_eq!(presented(&gw, &ca).await, first.der);
    let second = ca.leaf();
    // Two separate writes: the certificate first, its key a moment later.
    write(&gw.path("tls/cert.pem"), &second.cert_pem);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        presented(&gw, &ca).await,
        first.der,
        "a certificate without its key was swapped in"
    );
    write(&gw.path("tls/key.pem"), &second.key_pem);
    assert!(
        eventually(3, || async { presented(&gw, &ca).await == second.der }).await,
        "the new pair was not picked up"
    );
    gw.stop().await;
}

#[tokio::test]
async fn https_upstream_verified_with_route_ca_file() {
    let ca = Ca::new();
    let leaf = ca.leaf();
    let up = Upstream::start_tls(&leaf).await;
    let k = TestKey::new("k", "sa", &[]);
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("ca.pem"), &ca.pem);
    write(&dir.path().join("keys.yaml"), &key_file(&[&k]));
    let port = up.addr.port();
    write(
        &dir.path().join("keygate.yaml"),
        &format!(
            "keys_file: keys.yaml\nroutes:\n{}{}",
            route(
                "good",
                "/good/",
                &format!("https://127.0.0.1:{port}"),
                "    ca_file: ca.pem\n    tls_server_name: localhost\n    scopes: []\n"
            ),
            route(
                "untrusted",
                "/bad/",
                &format!("https://127.0.0.1:{port}"),
                "    tls_server_name: localhost\n    scopes: []\n"
            ),
        ),
    );
    let gw = Gateway::start_in(dir).await;
    let a = format!("Authorization: {}", k.auth());
    let r = get(gw.addr, "/good/x", &[&a]).await;
    assert_eq!(r.status, 200);
    assert!(up.last().uri.ends_with("/good/x"), "{}", up.last().uri);
    // Web roots do not trust the test CA.
    let r = get(gw.addr, "/bad/x", &[&a]).await;
    assert_eq!(r.status, 502);
    gw.stop().await;
}

#[test]
fn pkcs8_rsa_and_sec1_keys_load_and_mismatches_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sh = |cmd: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // PKCS#1 "BEGIN RSA PRIVATE KEY", SEC1 "BEGIN EC PRIVATE KEY", PKCS#8 "BEGIN PRIVATE KEY".
    sh("openssl genrsa -traditional -out rsa.key 2048 2>/dev/null");
    sh("openssl ecparam -name prime256v1 -genkey -noout -out ec.key");
    sh("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out p8.key");
    for k in ["rsa", "ec", "p8"] {
        sh(&format!(
            "openssl req -x509 -new -key {k}.key -subj /CN=localhost -days 2 -out {k}.crt"
        ));
        let first = std::fs::read_to_string(d.join(format!("{k}.key"))).unwrap();
        assert!(first.contains(match k {
            "rsa" => "BEGIN RSA PRIVATE KEY",
            "ec" => "BEGIN EC PRIVATE KEY",
            _ => "BEGIN PRIVATE KEY",
        }));
        keygate::wire::tls::load_pair(&d.join(format!("{k}.crt")), &d.join(format!("{k}.key")))
            .unwrap_or_else(|e| panic!("{k}: {e}"));
    }
    let Err(err) = keygate::wire::tls::load_pair(&d.join("rsa.crt"), &d.join("ec.key")) else {
        panic!("mismatched pair loaded");
    };
    assert!(err.contains("do not form a pair"), "{err}");
}
