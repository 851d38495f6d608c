//! Key policy over real sockets: rate limits (key and route), quotas that survive a restart,
//! client networks, and `trusted_proxies` deciding what `X-Forwarded-*` counts.

use std::net::SocketAddr;

use crate::support::*;

const SCOPE: &str = "    scopes: [p.read]\n";

async fn one_route(top: &str, route_extra: &str, keys: &[&TestKey]) -> (Upstream, Gateway) {
    let up = Upstream::start().await;
    let routes = format!(
        "{}{}",
        route("p", "/p/", &up.url(), &format!("{SCOPE}{route_extra}")),
        route("open", "/open/", &up.url(), "    public: true\n"),
    );
    let gw = Gateway::start_with(top, &routes, keys).await;
    (up, gw)
}

async fn call(addr: SocketAddr, k: &TestKey, extra: &[&str]) -> Reply {
    let auth = format!("Authorization: {}", k.auth());
    let mut headers = vec![auth.as_str()];
    headers.extend_from_slice(extra);
    get(addr, "/p/x", &headers).await
}

fn header(r: &Reply, name: &str) -> String {
    r.headers
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no {name} header in {:?}", r.headers))
}

#[tokio::test]
async fn over_the_key_rate_is_429_with_retry_and_ratelimit_headers() {
    let k = TestKey::new("k1", "sa", &["p.read"]).with("    rate_limit: 2/min\n");
    let (up, gw) = one_route("", "", &[&k]).await;
    assert_eq!(call(gw.addr, &k, &[]).await.status, 200);
    assert_eq!(call(gw.addr, &k, &[]).await.status, 200);
    let r = call(gw.addr, &k, &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.code(), "rate_limited");
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(header(&r, "ratelimit-policy"), "\"key\";q=2;w=60");
    assert_eq!(header(&r, "ratelimit"), format!("\"key\";r=0;t={retry}"));
    assert_eq!(
        up.count(),
        2,
        "a limited request never reaches the upstream"
    );
    gw.stop().await;
}

#[tokio::test]
async fn burst_sets_how_many_go_at_once() {
    let k = TestKey::new("k1", "sa", &["p.read"]).with("    rate_limit: 1/h\n    burst: 3\n");
    let (_up, gw) = one_route("", "", &[&k]).await;
    for _ in 0..3 {
        assert_eq!(call(gw.addr, &k, &[]).await.status, 200);
    }
    let r = call(gw.addr, &k, &[]).await;
    assert_eq!(r.code(), "rate_limited");
    assert!(header(&r, "retry-after").parse::<u64>().unwrap() > 3000);
    gw.stop().await;
}

#[tokio::test]
async fn a_route_limit_counts_per_key_and_the_stricter_wins() {
    let a = TestKey::new("a", "sa", &["p.read"]).with("    rate_limit: 100/s\n");
    let b = TestKey::new("b", "sa", &["p.read"]);
    let (_up, gw) = one_route("", "    rate_limit: 1/min\n", &[&a, &b]).await;
    assert_eq!(call(gw.addr, &a, &[]).await.status, 200);
    let r = call(gw.addr, &a, &[]).await;
    assert_eq!(r.code(), "rate_limited");
    assert_eq!(header(&r, "ratelimit-policy"), "\"route\";q=1;w=60");
    // Another key has its own count on the route.
    assert_eq!(call(gw.addr, &b, &[]).await.status, 200);
    assert_eq!(call(gw.addr, &b, &[]).await.code(), "rate_limited");
    gw.stop().await;
}

#[tokio::test]
async fn grpc_clients_get_resource_exhausted() {
    let k = TestKey::new("k1", "sa", &["p.read"]).with("    rate_limit: 1/min\n");
    let (_up, gw) = one_route("", "", &[&k]).await;
    let grpc = ["Content-Type: application/grpc"];
    assert_eq!(call(gw.addr, &k, &grpc).await.status, 200);
    let r = call(gw.addr, &k, &grpc).await;
    assert_eq!(header(&r, "grpc-status"), "8");
    assert!(r.headers.contains_key("retry-after"));
    gw.stop().await;
}

#[tokio::test]
async fn a_reloaded_limit_applies_and_keeps_what_was_spent() {
    let k = TestKey::new("k1", "sa", &["p.read"]).with("    rate_limit: 5/min\n");
    let (_up, gw) = one_route("", "", &[&k]).await;
    for _ in 0..5 {
        assert_eq!(call(gw.addr, &k, &[]).await.status, 200);
    }
    assert_eq!(call(gw.addr, &k, &[]).await.status, 429);
    let raised = TestKey {
        extra: "    rate_limit: 6/min\n".into(),
        ..k.clone()
    };
    write(&gw.path("keys.yaml"), &key_file(&[&raised]));
    // Refused requests spend nothing, so polling does not change what is left.
    let addr = gw.addr;
    assert!(
        eventually(20, || async { call(addr, &k, &[]).await.status == 200 }).await,
        "the raised limit was never applied"
    );
    // 6/min with 5 already spent: exactly one more, not a fresh budget of six.
    assert_eq!(call(gw.addr, &k, &[]).await.status, 429);
    gw.stop().await;
}

#[tokio::test]
async fn a_spent_quota_is_429_until_the_period_ends_and_survives_a_restart() {
    let k = TestKey::new("k1", "sa", &["p.read"]).with("    quota: 3/day\n");
    let (_up, gw) = one_route("", "", &[&k]).await;
    assert_eq!(call(gw.addr, &k, &[]).await.status, 200);
    assert_eq!(call(gw.addr, &k, &[]).await.status, 200);
    let dir = gw.stop_keeping_files().await;
    let state = std::fs::read_to_string(dir.path().join("keys-state.json")).unwrap();
    assert!(state.contains("\"used\": 2"), "{state}");
    let gw = Gateway::start_in(dir).await;
    assert_eq!(call(gw.addr, &k, &[]).await.status, 200);
    let r = call(gw.addr, &k, &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.code(), "quota_exceeded");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let to_midnight = 86_400 - now % 86_400;
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!(retry.abs_diff(to_midnight) <= 5, "{retry} vs {to_midnight}");
    assert!(header(&r, "ratelimit-policy").starts_with("\"quota\";q=3;w=86400"));
    gw.stop().await;
}

#[tokio::test]
async fn allowed_cidrs_refuse_other_clients_with_403() {
    let outside = TestKey::new("far", "sa", &["p.read"]).with("    allowed_cidrs: [10.0.0.0/8]\n");
    let inside = TestKey::new("near", "sa", &["p.read"])
        .with("    allowed_cidrs: [10.0.0.0/8, 127.0.0.0/8]\n");
    let (up, gw) = one_route("", "", &[&outside, &inside]).await;
    let r = call(gw.addr, &outside, &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.code(), "client_not_allowed");
    // Without trusted proxies, a forwarded address is not believed.
    let r = call(gw.addr, &outside, &["X-Forwarded-For: 10.1.2.3"]).await;
    assert_eq!(r.code(), "client_not_allowed");
    assert_eq!(up.count(), 0);
    assert_eq!(call(gw.addr, &inside, &[]).await.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn trusted_proxies_decide_whose_forwarded_headers_count() {
    let k = TestKey::new("k1", "sa", &["p.read"]).with("    allowed_cidrs: [198.51.100.0/24]\n");
    let forwarded = [
        "X-Forwarded-For: 203.0.113.1, 198.51.100.7",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: api.example.com",
    ];
    let (up, gw) = one_route("trusted_proxies: [127.0.0.1/32]\n", "", &[&k]).await;
    let r = call(gw.addr, &k, &forwarded).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let seen = up.last();
    assert_eq!(
        seen.headers.get("x-forwarded-for").unwrap(),
        "203.0.113.1, 198.51.100.7, 127.0.0.1"
    );
    assert_eq!(seen.headers.get("x-forwarded-proto").unwrap(), "https");
    assert_eq!(
        seen.headers.get("x-forwarded-host").unwrap(),
        "api.example.com"
    );
    gw.stop().await;

    // The same request from a peer that is not trusted: its claims of scheme and host are
    // replaced, and its X-Forwarded-For is only a record the peer is appended to.
    let (up, gw) = one_route("trusted_proxies: [10.0.0.0/8]\n", "", &[&k]).await;
    assert_eq!(
        call(gw.addr, &k, &forwarded).await.code(),
        "client_not_allowed"
    );
    let r = get(gw.addr, "/open/x", &forwarded).await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert_eq!(
        seen.headers.get("x-forwarded-for").unwrap(),
        "203.0.113.1, 198.51.100.7, 127.0.0.1"
    );
    assert_eq!(seen.headers.get("x-forwarded-proto").unwrap(), "http");
    assert_eq!(seen.headers.get("x-forwarded-host").unwrap(), "test.local");
    gw.stop().await;
}

#[tokio::test]
async fn bad_limits_are_reported_with_their_place() {
    let k = TestKey::new("k1", "sa", &["p.read"])
        .with("    rate_limit: 5/fortnight\n    quota: lots\n    allowed_cidrs: [10.0.0.0/99]\n");
    let text = key_file(&[&k]);
    let err = keygate::keys::parse_key_file(std::path::Path::new("keys.yaml"), &text).unwrap_err();
    let lines: Vec<u64> = err.0.iter().map(|p| p.line).collect();
    assert_eq!(lines, vec![7, 8, 9], "{err}");
    let cfg = "keys_file: k.yaml\ntrusted_proxies: [nope]\nroutes:\n  - name: o\n    path_prefix: /\n    upstream: http://127.0.0.1:1\n    public: true\n    rate_limit: 1/s\n";
    let err = keygate::config::Config::parse(std::path::Path::new("c.yaml"), cfg).unwrap_err();
    let lines: Vec<u64> = err.0.iter().map(|p| p.line).collect();
    assert_eq!(lines, vec![2, 8], "{err}");
}

fn keys_cmd(keys_file: &std::path::Path, args: &[&str]) -> String {
    crate::keys_cli::ok(&crate::keys_cli::keys_at(keys_file, args))
}

#[test]
fn create_and_rotate_write_limits_and_list_shows_quota_use() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.yaml");
    write(&file, "keys: []\n");
    let made = keys_cmd(
        &file,
        &[
            "create",
            "--service-account",
            "sa",
            "--scope",
            "p.read",
            "--rate-limit",
            "100/s",
            "--burst",
            "20",
            "--quota",
            "10000/day",
            "--allow-cidr",
            "10.0.0.0/8",
            "--allow-cidr",
            "2001:db8::/32",
            "--output",
            "json",
        ],
    );
    let id = serde_json::from_str::<serde_json::Value>(&made).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let text = std::fs::read_to_string(&file).unwrap();
    for line in [
        "rate_limit: 100/s",
        "burst: 20",
        "quota: 10000/day",
        "allowed_cidrs: [10.0.0.0/8, 2001:db8::/32]",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    // Rotation carries every limit; a flag given replaces just that one.
    let rotated = keys_cmd(
        &file,
        &["rotate", &id, "--quota", "50/h", "--output", "json"],
    );
    let new_id = serde_json::from_str::<serde_json::Value>(&rotated).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let rows: serde_json::Value =
        serde_json::from_str(&keys_cmd(&file, &["list", "--output", "json"])).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == new_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(row["rate_limit"], "100/s");
    assert_eq!(row["burst"], 20);
    assert_eq!(row["quota"], "50/h");
    assert_eq!(row["allowed_cidrs"][1], "2001:db8::/32");
    // Quota use as the gateway persisted it, shown against the quota with the period's end.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let hour = |t: i64| {
        time::OffsetDateTime::from_unix_timestamp(t - t.rem_euclid(3600))
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let state = serde_json::json!({
        "last_used": {},
        "usage": {new_id.clone(): {"period_start": hour(now), "used": 7}},
    });
    write(&dir.path().join("keys-state.json"), &state.to_string());
    let rows: serde_json::Value =
        serde_json::from_str(&keys_cmd(&file, &["list", "--output", "json"])).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == new_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(row["quota_used"], 7);
    assert_eq!(row["quota_period_end"], hour(now + 3600).as_str());
    let table = keys_cmd(&file, &["list"]);
    assert!(table.contains("7 / 50/h"), "{table}");
}

#[tokio::test]
async fn refusals_are_counted_by_reason() {
    let admin = free_loopback_addr();
    let k = TestKey::new("k1", "sa", &["p.read"])
        .with("    rate_limit: 1/min\n    allowed_cidrs: [127.0.0.0/8]\n");
    let far = TestKey::new("far", "sa", &["p.read"]).with("    allowed_cidrs: [10.0.0.0/8]\n");
    let q = TestKey::new("q", "sa", &["p.read"]).with("    quota: 1/h\n");
    let (_up, gw) = one_route(&format!("admin_listen: {admin}\n"), "", &[&k, &far, &q]).await;
    for key in [&k, &k, &far, &q, &q] {
        call(gw.addr, key, &[]).await;
    }
    let m = String::from_utf8(get(admin, "/metrics", &[]).await.body).unwrap();
    for reason in ["rate_limited", "quota_exceeded", "client_not_allowed"] {
        let line = m
            .lines()
            .find(|l| {
                l.starts_with("keygate_requests_total") && l.contains(&format!("auth=\"{reason}\""))
            })
            .unwrap_or_else(|| panic!("no {reason} count in\n{m}"));
        assert!(line.ends_with(" 1"), "{line}");
    }
    gw.stop().await;
}
