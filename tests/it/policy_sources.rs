//! Key sources and CORS preflight over real sockets: each source, two at once, what reaches the
//! upstream (never the key; the rest of the query byte for byte), per-route overrides.

use crate::support::*;

const SCOPE: &str = "    scopes: [app.read]\n";

/// Routes: `/all/` reads every kind of source (top level), `/hdr/` overrides it with a header
/// only, `/pub/` is public, `/cors/` passes preflights, `/plain/` keeps the default preflight.
async fn setup(k: &TestKey) -> (Upstream, Gateway) {
    let up = Upstream::start().await;
    let top = "key_sources:\n  - authorization: api-key\n  - authorization: bearer\n  - header: X-Api-Key\n  - query: api_key\n";
    let routes = [
        route("all", "/all/", &up.url(), SCOPE),
        route(
            "hdr",
            "/hdr/",
            &up.url(),
            &format!("{SCOPE}    key_sources: [{{header: X-Key}}]\n"),
        ),
        route("pub", "/pub/", &up.url(), "    public: true\n"),
        route(
            "cors",
            "/cors/",
            &up.url(),
            &format!("{SCOPE}    preflight: pass\n"),
        ),
        route("plain", "/plain/", &up.url(), SCOPE),
    ]
    .concat();
    let gw = Gateway::start_with(top, &routes, &[k]).await;
    (up, gw)
}

fn key() -> TestKey {
    TestKey::new("k1", "sa-app", &["app.read"])
}

/// The secret appears nowhere in what the upstream saw: not in a header, not in the target.
fn assert_no_secret(seen: &Seen, secret: &str) {
    assert!(!seen.uri.contains(secret), "{}", seen.uri);
    for (name, v) in seen.headers.iter() {
        let leaked = v
            .as_bytes()
            .windows(secret.len())
            .any(|w| w == secret.as_bytes());
        assert!(!leaked, "the key reached the upstream in {name}");
    }
}

#[tokio::test]
async fn each_source_lets_the_key_in_and_is_stripped() {
    let k = key();
    let (up, gw) = setup(&k).await;
    let s = &k.secret;
    for (path, header) in [
        ("/all/x".to_string(), format!("Authorization: Api-Key {s}")),
        ("/all/x".to_string(), format!("Authorization: Bearer {s}")),
        ("/all/x".to_string(), format!("X-Api-Key: {s}")),
        (format!("/all/x?api_key={s}"), "X-Other: 1".to_string()),
    ] {
        let r = get(gw.addr, &path, &[&header]).await;
        assert_eq!(r.status, 200, "{header} {path}");
        let seen = up.last();
        assert_eq!(seen.headers.get("x-api-key-id").unwrap(), "k1");
        assert!(seen.headers.get("authorization").is_none());
        assert!(seen.headers.get("x-api-key").is_none());
        assert_no_secret(&seen, s);
    }
    gw.stop().await;
}

#[tokio::test]
async fn the_query_parameter_is_cut_out_and_the_rest_kept_in_order() {
    let k = key();
    let (up, gw) = setup(&k).await;
    let s = &k.secret;
    let r = get(
        gw.addr,
        &format!("/all/x?z=9&a=%20b&api_key={s}&a=2&flag&e="),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().uri, "/all/x?z=9&a=%20b&a=2&flag&e=");
    let r = get(gw.addr, &format!("/all/x?api_key={s}"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().uri, "/all/x");
    gw.stop().await;
}

#[tokio::test]
async fn two_sources_at_once_are_a_bad_request() {
    let k = key();
    let (up, gw) = setup(&k).await;
    let s = &k.secret;
    for (path, headers) in [
        (
            format!("/all/x?api_key={s}"),
            vec![format!("Authorization: Api-Key {s}")],
        ),
        (
            "/all/x".into(),
            vec![
                format!("Authorization: Bearer {s}"),
                format!("X-Api-Key: {s}"),
            ],
        ),
        (
            "/all/x".into(),
            vec![format!("X-Api-Key: {s}"), format!("X-Api-Key: {s}")],
        ),
        (format!("/all/x?api_key={s}&api_key=other"), vec![]),
        // Public routes too: which key was meant would be a guess.
        (
            format!("/pub/x?api_key={s}"),
            vec![format!("X-Api-Key: {s}")],
        ),
    ] {
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let r = get(gw.addr, &path, &headers).await;
        assert_eq!(r.status, 400, "{path} {headers:?}");
        assert_eq!(r.code(), "bad_request");
    }
    // An empty value offers nothing: the other source decides.
    let r = get(gw.addr, "/all/x?api_key=", &[&format!("X-Api-Key: {s}")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.count(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_route_override_reads_only_its_own_sources() {
    let k = key();
    let (up, gw) = setup(&k).await;
    let s = &k.secret;
    let r = get(gw.addr, "/hdr/x", &[&format!("X-Key: {s}")]).await;
    assert_eq!(r.status, 200);
    assert!(up.last().headers.get("x-key").is_none());
    // The top level's sources do not apply here; the refusal names the route's own.
    let r = get(gw.addr, "/hdr/x", &[&format!("Authorization: Api-Key {s}")]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.code(), "missing_api_key");
    assert!(r.json()["message"].as_str().unwrap().contains("x-key"));
    let r = get(gw.addr, &format!("/hdr/x?api_key={s}"), &[]).await;
    assert_eq!(r.status, 401);
    // The top level's list is named in a refusal on the routes that inherit it.
    let r = get(gw.addr, "/all/x", &[]).await;
    assert_eq!(r.code(), "missing_api_key");
    let message = r.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("Bearer") && message.contains("?api_key="),
        "{message}"
    );
    assert_eq!(
        r.headers.get("www-authenticate").unwrap(),
        "Api-Key realm=\"keygate\", Bearer realm=\"keygate\""
    );
    gw.stop().await;
}

#[tokio::test]
async fn public_routes_still_strip_a_key_from_any_configured_source() {
    let k = key();
    let (up, gw) = setup(&k).await;
    let s = &k.secret;
    let r = get(gw.addr, &format!("/pub/x?keep=1&api_key={s}"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().uri, "/pub/x?keep=1");
    let r = get(gw.addr, "/pub/x", &[&format!("X-Api-Key: {s}")]).await;
    assert_eq!(r.status, 200);
    assert_no_secret(&up.last(), s);
    // Another scheme's credential belongs to the upstream and passes.
    let r = get(gw.addr, "/pub/x", &["Authorization: Basic dXNlcjpwdw=="]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        up.last().headers.get("authorization").unwrap(),
        "Basic dXNlcjpwdw=="
    );
    gw.stop().await;
}

#[tokio::test]
async fn preflight_pass_lets_only_real_preflights_through_without_a_key() {
    let k = key();
    let (up, gw) = setup(&k).await;
    let preflight = [
        "Origin: https://app.example",
        "Access-Control-Request-Method: POST",
    ];
    let r = request(gw.addr, "OPTIONS", "/cors/x", &preflight, b"").await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert_eq!(seen.method, "OPTIONS");
    assert!(seen.headers.get("x-api-key-id").is_none());
    // A key on a preflight is still stripped.
    let with_key = format!("Authorization: Api-Key {}", k.secret);
    let r = request(
        gw.addr,
        "OPTIONS",
        "/cors/x",
        &[preflight[0], preflight[1], &with_key],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_no_secret(&up.last(), &k.secret);
    // A plain OPTIONS, or one with only Origin, still needs a key.
    for headers in [&[][..], &preflight[..1], &preflight[1..]] {
        let r = request(gw.addr, "OPTIONS", "/cors/x", headers, b"").await;
        assert_eq!(r.status, 401, "{headers:?}");
    }
    // Other methods with the preflight headers still need a key.
    let r = get(gw.addr, "/cors/x", &preflight).await;
    assert_eq!(r.status, 401);
    // The default (`preflight: auth`) wants a key from preflights too.
    let r = request(gw.addr, "OPTIONS", "/plain/x", &preflight, b"").await;
    assert_eq!(r.status, 401);
    let r = request(
        gw.addr,
        "OPTIONS",
        "/plain/x",
        &[preflight[0], preflight[1], &with_key],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(up.count(), 3);
    gw.stop().await;
}

#[tokio::test]
async fn the_default_source_ignores_headers_and_queries() {
    let up = Upstream::start().await;
    let k = key();
    let gw = Gateway::start(&route("a", "/a/", &up.url(), SCOPE), &[&k]).await;
    let r = get(gw.addr, &format!("/a/x?api_key={}", k.secret), &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.headers.get("www-authenticate").unwrap(),
        "Api-Key realm=\"keygate\""
    );
    let r = get(gw.addr, "/a/x", &[&format!("X-Api-Key: {}", k.secret)]).await;
    assert_eq!(r.status, 401);
    let r = get(gw.addr, "/a/x", &[&format!("Authorization: {}", k.auth())]).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.count(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn the_access_log_never_holds_the_query() {
    let up = Upstream::start().await;
    let k = key();
    let routes = route(
        "a",
        "/a/",
        &up.url(),
        &format!("{SCOPE}    key_sources: [{{query: api_key}}]\n"),
    );
    let secret = k.secret.clone();
    let lines = crate::observability::log_lines(&routes, &[&k], |addr| async move {
        assert_eq!(
            get(addr, &format!("/a/x?api_key={secret}&q=1"), &[])
                .await
                .status,
            200
        );
        assert_eq!(
            get(addr, "/a/../a/y?api_key=kg_wrong", &[]).await.status,
            401
        );
    })
    .await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        let text = line.to_string();
        assert!(
            !text.contains("api_key") && !text.contains(&k.secret),
            "{text}"
        );
    }
    assert_eq!(lines[0]["key_id"], "k1");
}

#[test]
fn bad_sources_and_preflight_values_fail_validate_with_positions() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("keys.yaml"), "keys: []\n");
    let cfg = dir.path().join("keygate.yaml");
    write(
        &cfg,
        "keys_file: keys.yaml\nkey_sources:\n  - cookie: session\n  - header: \"not a header\"\nroutes:\n  - name: a\n    path_prefix: /a/\n    upstream: http://127.0.0.1:1\n    scopes: []\n    preflight: maybe\n    key_sources: [{authorization: basic}]\n",
    );
    let out = std::process::Command::new(bin())
        .args(["validate", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let file = cfg.display().to_string();
    for at in [":3:5:", ":4:13:", ":10:16:", ":11:35:"] {
        assert!(text.contains(&format!("{file}{at}")), "{at}: {text}");
    }
    assert!(
        text.contains("unknown field `cookie` in key source"),
        "{text}"
    );
}
