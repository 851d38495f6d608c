//! TLS: real handshakes with a test CA, curl over HTTP/1.1 and HTTP/2, certificate hot reload
//! that never serves a mismatched pair, and https upstreams verified with a route's CA file.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

use crate::support::certs::{Ca, Leaf};
use crate::support::*;

async fn tls_gateway(ca: &Ca, leaf: &Leaf, up: &Upstream, k: &TestKey) -> Gateway {
    tls_gateway_with(ca, leaf, up, k, "").await
}

/// `tls_gateway` with `top` (raw YAML lines) ahead of the rest of its config.
async fn tls_gateway_with(ca: &Ca, leaf: &Leaf, up: &Upstream, k: &TestKey, top: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tls")).unwrap();
    write(&dir.path().join("tls/cert.pem"), &leaf.cert_pem);
    write(&dir.path().join("tls/key.pem"), &leaf.key_pem);
    write(&dir.path().join("ca.pem"), &ca.pem);
    write(&dir.path().join("keys.yaml"), &key_file(&[k]));
    write(
        &dir.path().join("keygate.yaml"),
        &format!(
            "{top}keys_file: keys.yaml\ntls:\n  cert: tls/cert.pem\n  key: tls/key.pem\nroutes:\n{}",
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
        .unwrap_or_else(|e| panic!("curl: {e} (.ci/run installs it)"));
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
#[cfg_attr(
    not(feature = "peers"),
    ignore = "needs outside peers: cargo test --features peers"
)]
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
    let admin = free_loopback_addr();
    let top = format!("admin_listen: {admin}\n");
    let gw = tls_gateway_with(&ca, &first, &up, &k, &top).await;
    assert_eq!(presented(&gw, &ca).await, first.der);
    let second = ca.leaf();
    // Two separate writes: the certificate first, its key a moment later.
    write(&gw.path("tls/cert.pem"), &second.cert_pem);
    assert!(
        reload_counted(admin, "tls", "error", 0).await,
        "the lone certificate was never read"
    );
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
#[cfg_attr(
    not(feature = "peers"),
    ignore = "needs outside peers: cargo test --features peers"
)]
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

/// One GET of `/api/x` over TLS offering only `alpn`; the status and the HTTP version used.
async fn tls_get(gw: &Gateway, ca: &Ca, alpn: &[u8], auth: &str) -> (u16, http::Version) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
    let req = http::Request::get(format!("https://localhost:{}/api/x", gw.addr.port()))
        .header("authorization", auth)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let io = TokioIo::new(tls);
    let resp = if alpn == b"h2" {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let mut req = req;
        req.headers_mut()
            .insert("host", http::HeaderValue::from_static("localhost"));
        send.send_request(req).await.unwrap()
    };
    (resp.status().as_u16(), resp.version())
}

/// A ClientHello with `version` as its client_version and no `supported_versions`, the way a
/// TLS 1.1 client sends it; its suites, groups and signature schemes are ones TLS 1.2 accepts, so
/// only the version decides the answer.
fn client_hello(version: [u8; 2]) -> Vec<u8> {
    let ext = |kind: u16, data: &[u8]| {
        let mut e = kind.to_be_bytes().to_vec();
        e.extend_from_slice(&(data.len() as u16).to_be_bytes());
        e.extend_from_slice(data);
        e
    };
    let mut exts = ext(0x000a, &[0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]); // x25519, P-256
    exts.extend(ext(0x000b, &[0x01, 0x00])); // uncompressed points
    exts.extend(ext(
        0x000d,
        &[0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01],
    ));
    let mut body = version.to_vec();
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // no session id
                  // ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, ECDHE_RSA_WITH_AES_128_GCM_SHA256
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]);
    body.extend_from_slice(&[0x01, 0x00]); // null compression only
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend(exts);
    let mut hs = vec![0x01, 0x00];
    hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
    hs.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend(hs);
    record
}

/// The first TLS record type the gateway answers `hello` with (0x16 handshake, 0x15 alert).
async fn first_record(gw: &Gateway, hello: &[u8]) -> Option<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(hello).await.unwrap();
    let mut first = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut first)).await {
        Ok(Ok(_)) => Some(first[0]),
        _ => None,
    }
}

#[tokio::test]
async fn https_over_http1_and_http2() {
    let ca = Ca::new();
    let leaf = ca.leaf();
    let up = Upstream::start().await;
    let k = TestKey::new("k", "sa", &[]);
    let gw = tls_gateway(&ca, &leaf, &up, &k).await;
    let auth = k.auth();
    assert_eq!(
        tls_get(&gw, &ca, b"http/1.1", &auth).await,
        (200, http::Version::HTTP_11)
    );
    assert_eq!(
        tls_get(&gw, &ca, b"h2", &auth).await,
        (200, http::Version::HTTP_2)
    );
    assert_eq!(up.count(), 2);
    assert_eq!(up.last().headers.get("x-forwarded-proto").unwrap(), "https");
    // TLS 1.1 and below are refused with an alert; the same hello saying TLS 1.2 gets a
    // ServerHello, so the version alone made the difference.
    assert_eq!(
        first_record(&gw, &client_hello([0x03, 0x03])).await,
        Some(0x16)
    );
    assert_eq!(
        first_record(&gw, &client_hello([0x03, 0x02])).await,
        Some(0x15)
    );
    assert_eq!(
        first_record(&gw, &client_hello([0x03, 0x01])).await,
        Some(0x15)
    );
    gw.stop().await;
}

#[test]
fn rsa_pkcs1_sec1_and_pkcs8_keys_load_and_mismatches_are_refused() {
    use crate::support::certs::{
        pem, pkcs8_from_pkcs1, rsa_pkcs1_der, sec1_from_pkcs8, self_signed,
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rsa_p1 = rsa_pkcs1_der();
    let rsa_p8 = pkcs8_from_pkcs1(&rsa_p1);
    let ec_p8 = rcgen::KeyPair::generate().unwrap().serialize_der();
    let (rsa, ec) = (&rcgen::PKCS_RSA_SHA256, &rcgen::PKCS_ECDSA_P256_SHA256);
    // PKCS#1 "BEGIN RSA PRIVATE KEY", SEC1 "BEGIN EC PRIVATE KEY", PKCS#8 "BEGIN PRIVATE KEY".
    let cases = [
        (
            "rsa",
            pem("RSA PRIVATE KEY", &rsa_p1),
            self_signed(&rsa_p8, rsa),
        ),
        (
            "ec",
            pem("EC PRIVATE KEY", &sec1_from_pkcs8(&ec_p8)),
            self_signed(&ec_p8, ec),
        ),
        ("p8", pem("PRIVATE KEY", &ec_p8), self_signed(&ec_p8, ec)),
    ];
    for (k, key, cert) in &cases {
        write(&d.join(format!("{k}.key")), key);
        write(&d.join(format!("{k}.crt")), cert);
        keygate::wire::tls::load_pair(&d.join(format!("{k}.crt")), &d.join(format!("{k}.key")))
            .unwrap_or_else(|e| panic!("{k}: {e}"));
    }
    let Err(err) = keygate::wire::tls::load_pair(&d.join("rsa.crt"), &d.join("ec.key")) else {
        panic!("mismatched pair loaded");
    };
    assert!(err.contains("do not form a pair"), "{err}");
}
