//! Path tricks never reach a protected route without its key; unsafe paths are 400.

use crate::support::*;

async fn setup() -> (Upstream, Upstream, Gateway, TestKey) {
    let public = Upstream::start().await;
    let private = Upstream::start().await;
    let k = TestKey::new("k", "sa", &["yc.postbox.send"]);
    let routes = format!(
        "{}{}",
        route("health", "/health", &public.url(), "    public: true\n"),
        route(
            "postbox",
            "/postbox/",
            &private.url(),
            "    scopes: [yc.postbox.send]\n"
        ),
    );
    let gw = Gateway::start(&routes, &[&k]).await;
    (public, private, gw, k)
}

#[tokio::test]
async fn traversal_into_protected_routes_needs_the_key() {
    let (public, private, gw, k) = setup().await;
    for p in [
        "/health/../postbox/x",
        "/health/%2e%2e/postbox/x",
        "/health/%2E%2E/postbox/x",
        "/health/.%2e/postbox/x",
        "/health/./../postbox/x",
        "//postbox//x",
        "/%70ostbox/x",
        "/health/x/../../postbox/x",
    ] {
        let r = get(gw.addr, p, &[]).await;
        assert_eq!(r.status, 401, "{p} got {}", r.status);
    }
    assert_eq!(public.count() + private.count(), 0);
    let r = get(
        gw.addr,
        "/health/../postbox/x",
        &[&format!("Authorization: {}", k.auth())],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        private.last().uri,
        "/postbox/x",
        "the upstream gets the normalized path"
    );
    let r = get(gw.addr, "/health//./a/%7Euser", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(public.last().uri, "/health/a/~user");
    gw.stop().await;
}

#[tokio::test]
async fn unsafe_paths_are_400() {
    let (public, private, gw, _k) = setup().await;
    for p in [
        "/health/%2F../postbox/x",
        "/health%2fx",
        "/health/%5C..",
        "/health/..%5Cpostbox",
        "/health\\..\\postbox",
        "/health/%00",
        "/health/..;/postbox/x",
        "/health/.;x/y",
        "/..",
        "/health/../../etc/passwd",
        "/%2e%2e/x",
        "/health/%zz",
        "/health/%c0%ae%c0%ae/postbox",
    ] {
        let r = get(gw.addr, p, &[]).await;
        assert_eq!(r.status, 400, "{p} got {}", r.status);
        assert_eq!(r.code(), "bad_request", "{p}");
    }
    assert_eq!(public.count() + private.count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn absolute_form_routes_by_its_authority() {
    let (public, _private, gw, _k) = setup().await;
    let r = raw(
        gw.addr,
        b"GET http://api.example.com/health HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        public.last().headers.get("host").unwrap(),
        "api.example.com"
    );
    let r = raw(
        gw.addr,
        b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 400);
    let r = raw(
        gw.addr,
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 400);
    // Userinfo in the target or in Host is refused: it would reach the upstream and the log.
    let before = public.count();
    for req in [
        &b"GET http://user:pw@api.example.com/health HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"[..],
        b"GET /health HTTP/1.1\r\nHost: user:pw@api.example.com\r\nConnection: close\r\n\r\n",
    ] {
        let r = raw(gw.addr, req).await;
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(req));
        assert_eq!(r.code(), "bad_request");
    }
    assert_eq!(public.count(), before, "nothing forwarded");
    gw.stop().await;
}
