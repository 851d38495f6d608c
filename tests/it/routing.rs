//! Route choice: longest prefix, ties, whole segments, host and method, strip_prefix.

use crate::support::*;

fn routed(r: &Reply) -> String {
    r.json()["uri"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn longest_prefix_then_declaration_order() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let c = Upstream::start().await;
    let routes = format!(
        "{}{}{}{}",
        route("root", "/", &a.url(), "    public: true\n"),
        route("api", "/api/", &b.url(), "    public: true\n"),
        route("api-v1", "/api/v1", &c.url(), "    public: true\n"),
        route("api-dup", "/api/", &c.url(), "    public: true\n"),
    );
    let gw = Gateway::start(&routes, &[]).await;
    let root_before = a.count();
    assert_eq!(get(gw.addr, "/api/v1/x", &[]).await.status, 200);
    assert_eq!(c.count(), 1);
    assert_eq!(get(gw.addr, "/api/v2", &[]).await.status, 200);
    assert_eq!(b.count(), 1, "tie goes to the first declared");
    assert_eq!(get(gw.addr, "/api/v1x", &[]).await.status, 200);
    assert_eq!(b.count(), 2, "prefixes match whole segments");
    assert_eq!(get(gw.addr, "/elsewhere", &[]).await.status, 200);
    assert_eq!(a.count(), root_before + 1);
    gw.stop().await;
}

#[tokio::test]
async fn segments_hosts_methods_and_no_route() {
    let up = Upstream::start().await;
    let other = Upstream::start().await;
    let routes = format!(
        "{}{}{}{}",
        route("health", "/health", &up.url(), "    public: true\n"),
        route(
            "exact",
            "/h/",
            &up.url(),
            "    public: true\n    host: api.example.com\n"
        ),
        route(
            "wild",
            "/w/",
            &other.url(),
            "    public: true\n    host: \"*.example.com\"\n"
        ),
        route(
            "post",
            "/p/",
            &up.url(),
            "    public: true\n    methods: [POST, put]\n"
        ),
    );
    let gw = Gateway::start(&routes, &[]).await;
    assert_eq!(get(gw.addr, "/health", &[]).await.status, 200);
    assert_eq!(get(gw.addr, "/health/x", &[]).await.status, 200);
    let r = get(gw.addr, "/healthz", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "no_route");

    let host = |h: &'static str, p: &'static str| async move {
        raw(
            gw.addr,
            format!("GET {p} HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .status
    };
    assert_eq!(host("api.example.com", "/h/x").await, 200);
    assert_eq!(host("API.Example.com:8080", "/h/x").await, 200);
    assert_eq!(host("other.example.com", "/h/x").await, 404);
    assert_eq!(host("a.example.com", "/w/x").await, 200);
    assert_eq!(host("a.b.example.com", "/w/x").await, 200);
    assert_eq!(host("example.com", "/w/x").await, 404);
    assert_eq!(host("evil-example.com", "/w/x").await, 404);

    assert_eq!(request(gw.addr, "POST", "/p/x", &[], b"").await.status, 200);
    assert_eq!(request(gw.addr, "PUT", "/p/x", &[], b"").await.status, 200);
    assert_eq!(get(gw.addr, "/p/x", &[]).await.code(), "no_route");
    gw.stop().await;
}

#[tokio::test]
async fn strip_prefix_and_upstream_base_path() {
    let up = Upstream::start().await;
    let routes = format!(
        "{}{}",
        route(
            "strip",
            "/svc/",
            &up.url(),
            "    public: true\n    strip_prefix: true\n"
        ),
        route(
            "base",
            "/b/",
            &format!("{}/base", up.url()),
            "    public: true\n    strip_prefix: true\n"
        ),
    );
    let gw = Gateway::start(&routes, &[]).await;
    assert_eq!(
        routed(&get(gw.addr, "/svc/a/b?q=1&r=%20", &[]).await),
        "/a/b?q=1&r=%20"
    );
    assert_eq!(routed(&get(gw.addr, "/b/x", &[]).await), "/base/x");
    gw.stop().await;
}
