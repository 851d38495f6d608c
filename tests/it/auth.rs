//! Every key outcome: missing, invalid, malformed, expired, revoked, scope, wildcards.

use crate::support::*;

const POSTBOX: &str = "    scopes: [yc.postbox.send]\n";

async fn setup(keys: &[&TestKey]) -> (Upstream, Gateway) {
    let up = Upstream::start().await;
    let routes = format!(
        "{}{}{}",
        route("postbox", "/postbox/", &up.url(), POSTBOX),
        route(
            "ydb",
            "/ydb/",
            &up.url(),
            "    scopes: [yc.ydb.tables.manage]\n"
        ),
        route("any", "/any/", &up.url(), "    scopes: []\n"),
    );
    let gw = Gateway::start(&routes, keys).await;
    (up, gw)
}

#[tokio::test]
async fn valid_key_passes_and_upstream_sees_identity_not_key() {
    let k = TestKey::new("k1", "sa-postbox", &["yc.postbox.send"]);
    let (up, gw) = setup(&[&k]).await;
    let r = request(
        gw.addr,
        "POST",
        "/postbox/send",
        &[&format!("Authorization: {}", k.auth())],
        b"hi",
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert!(seen.headers.get("authorization").is_none());
    assert_eq!(seen.headers.get("x-api-key-id").unwrap(), "k1");
    assert_eq!(seen.headers.get("x-service-account").unwrap(), "sa-postbox");
    for (_, v) in seen.headers.iter() {
        assert!(!v
            .as_bytes()
            .windows(k.secret.len())
            .any(|w| w == k.secret.as_bytes()));
    }
    gw.stop().await;
}

#[tokio::test]
async fn missing_key_is_401_with_www_authenticate() {
    let (up, gw) = setup(&[]).await;
    let r = get(gw.addr, "/postbox/x", &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.code(), "missing_api_key");
    assert_eq!(
        r.headers.get("www-authenticate").unwrap(),
        "Api-Key realm=\"keygate\""
    );
    assert_eq!(r.headers.get("content-type").unwrap(), "application/json");
    assert!(r.json()["message"].as_str().is_some());
    let r = get(gw.addr, "/postbox/x", &["Authorization: Bearer abc"]).await;
    assert_eq!(r.code(), "missing_api_key");
    assert_eq!(up.count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn another_scheme_is_named_in_the_401_but_never_the_credential() {
    let k = TestKey::new("k1", "sa", &["yc.postbox.send"]);
    let (up, gw) = setup(&[&k]).await;
    let message = |r: &Reply| r.json()["message"].as_str().unwrap().to_string();
    // A real key under the wrong scheme: the message says which scheme came and which one fits.
    let r = get(
        gw.addr,
        "/postbox/x",
        &[&format!("Authorization: Bearer {}", k.secret)],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.code(), "missing_api_key");
    let text = message(&r);
    assert!(text.contains("`Bearer`"), "{text}");
    assert!(text.contains("Api-Key"), "{text}");
    // Client text that is not a short token is not repeated; the credential never is.
    let long = "S".repeat(40);
    for (auth, hidden) in [
        (format!("Bearer {}", k.secret), k.secret.as_str()),
        (format!("{long} {}", k.secret), long.as_str()),
        (format!("Bear_er {}", k.secret), "Bear_er"),
        (k.secret.clone(), k.secret.as_str()),
    ] {
        let r = get(gw.addr, "/postbox/x", &[&format!("Authorization: {auth}")]).await;
        assert_eq!(r.code(), "missing_api_key", "{auth}");
        let body = String::from_utf8_lossy(&r.body);
        assert!(!body.contains(hidden), "{body}");
        assert!(!body.contains(&k.secret[3..20]), "{body}");
    }
    assert_eq!(up.count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn unknown_and_malformed_keys_are_invalid() {
    let k = TestKey::new("k1", "sa", &["yc.postbox.send"]);
    let (up, gw) = setup(&[&k]).await;
    let mut tampered = k.secret.clone().into_bytes();
    tampered[10] = if tampered[10] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for auth in [
        format!("Api-Key {}", keygate::keys::generate().unwrap()),
        format!("Api-Key {tampered}"),
        format!("Api-Key {}", &k.secret[..k.secret.len() - 1]),
        "Api-Key some-foreign-key".to_string(),
        format!("Api-Key {} extra", k.secret),
        "Api-Key".to_string(),
    ] {
        let r = get(gw.addr, "/postbox/x", &[&format!("Authorization: {auth}")]).await;
        assert_eq!(r.status, 401, "{auth}");
        assert_eq!(r.code(), "invalid_api_key", "{auth}");
        assert!(r.headers.get("www-authenticate").is_some());
        assert!(!String::from_utf8_lossy(&r.body).contains(&k.secret[3..20]));
    }
    assert_eq!(up.count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn scheme_name_is_case_insensitive() {
    let k = TestKey::new("k1", "sa", &["yc.postbox.send"]);
    let (_up, gw) = setup(&[&k]).await;
    for scheme in ["api-key", "API-KEY", "Api-Key", "aPi-KeY"] {
        let r = get(
            gw.addr,
            "/postbox/x",
            &[&format!("Authorization: {scheme} {}", k.secret)],
        )
        .await;
        assert_eq!(r.status, 200, "{scheme}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn two_authorization_headers_are_400() {
    let k = TestKey::new("k1", "sa", &["yc.postbox.send"]);
    let (up, gw) = setup(&[&k]).await;
    let a = format!("Authorization: {}", k.auth());
    let r = get(gw.addr, "/postbox/x", &[&a, &a]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.code(), "bad_request");
    let r = get(gw.addr, "/postbox/x", &[&a, "Authorization: Api-Key other"]).await;
    assert_eq!(r.status, 400);
    assert_eq!(up.count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn expired_key_and_expiry_checked_per_request() {
    let past = TestKey::new("old", "sa", &["yc.postbox.send"])
        .with("    expires_at: 2020-01-01T00:00:00Z\n");
    let soon_at = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let soon = TestKey::new("soon", "sa", &["yc.postbox.send"]).with(&format!(
        "    expires_at: {}\n",
        keygate::keys::format_time(soon_at)
    ));
    let (_up, gw) = setup(&[&past, &soon]).await;
    let r = get(
        gw.addr,
        "/postbox/x",
        &[&format!("Authorization: {}", past.auth())],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.code(), "expired_api_key");
    assert!(r.headers.get("www-authenticate").is_some());
    let auth = format!("Authorization: {}", soon.auth());
    let r = get(gw.addr, "/postbox/x", &[&auth]).await;
    assert_eq!(r.status, 200);
    // No reload happens: the clock alone must expire it.
    assert!(
        eventually(10, || async {
            get(gw.addr, "/postbox/x", &[&auth]).await.code() == "expired_api_key"
        })
        .await,
        "the key never expired"
    );
    gw.stop().await;
}

#[tokio::test]
async fn revoked_key() {
    let k = TestKey::new("k1", "sa", &["yc.postbox.send"])
        .with("    revoked_at: 2026-01-02T00:00:00Z\n    expires_at: 2020-01-01T00:00:00Z\n");
    let (up, gw) = setup(&[&k]).await;
    let r = get(
        gw.addr,
        "/postbox/x",
        &[&format!("Authorization: {}", k.auth())],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.code(), "revoked_api_key");
    assert_eq!(up.count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn insufficient_scope_names_the_missing_scope() {
    let k = TestKey::new("k1", "sa", &["yc.postbox.send"]);
    let (up, gw) = setup(&[&k]).await;
    let r = get(
        gw.addr,
        "/ydb/x",
        &[&format!("Authorization: {}", k.auth())],
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.code(), "insufficient_scope");
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("yc.ydb.tables.manage"));
    assert!(r.headers.get("www-authenticate").is_none());
    assert_eq!(up.count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn scope_wildcards() {
    let all = TestKey::new("all", "sa", &["*"]);
    let ydb = TestKey::new("ydb", "sa", &["yc.ydb.*"]);
    let near = TestKey::new("near", "sa", &["yc.ydbx.*", "yc.postbox"]);
    let (_up, gw) = setup(&[&all, &ydb, &near]).await;
    let call = |k: &TestKey, p: &'static str| {
        let a = format!("Authorization: {}", k.auth());
        async move { get(gw.addr, p, &[&a]).await.status }
    };
    assert_eq!(call(&all, "/postbox/x").await, 200);
    assert_eq!(call(&all, "/ydb/x").await, 200);
    assert_eq!(call(&ydb, "/ydb/x").await, 200);
    assert_eq!(call(&ydb, "/postbox/x").await, 403);
    assert_eq!(call(&near, "/ydb/x").await, 403);
    assert_eq!(call(&near, "/postbox/x").await, 403);
    // A route with `scopes: []` takes any valid key.
    assert_eq!(call(&near, "/any/x").await, 200);
    gw.stop().await;
}

#[tokio::test]
async fn foreign_keys_work_by_hash_alone() {
    let mut k = TestKey::new("imported", "sa", &["yc.postbox.send"]);
    k.secret = "sk-live-0123456789abcdef".into();
    let (_up, gw) = setup(&[&k]).await;
    let r = get(
        gw.addr,
        "/postbox/x",
        &[&format!("Authorization: {}", k.auth())],
    )
    .await;
    assert_eq!(r.status, 200);
    gw.stop().await;
}
