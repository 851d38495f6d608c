//! Operator signals: key counts by status for alerting, build info and process metrics.

use std::net::SocketAddr;

use crate::support::*;

async fn scrape(admin: SocketAddr) -> String {
    String::from_utf8(get(admin, "/metrics", &[]).await.body).unwrap()
}

/// The value of the sample whose name and labels are exactly `series`.
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn expiring_in(secs: i64) -> String {
    let t = time::OffsetDateTime::now_utc() + time::Duration::seconds(secs);
    format!("    expires_at: {}\n", keygate::keys::format_time(t))
}

#[tokio::test]
async fn key_counts_by_status_follow_the_clock() {
    let day = 86_400;
    let forever = TestKey::new("forever", "sa", &[]);
    let soon = TestKey::new("soon", "sa", &[]).with(&expiring_in(3 * day));
    let later = TestKey::new("later", "sa", &[]).with(&expiring_in(30 * day));
    let any_second = TestKey::new("any-second", "sa", &[]).with(&expiring_in(3));
    let gone = TestKey::new("gone", "sa", &[]).with(&expiring_in(-60));
    let revoked = TestKey::new("revoked", "sa", &[])
        .with(&expiring_in(day))
        .with("    revoked_at: 2026-01-02T00:00:00Z\n");
    let up = Upstream::start().await;
    let port = crate::cli::free_port();
    let admin: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let gw = Gateway::start_with(
        &format!("admin_listen: 127.0.0.1:{port}\n"),
        &route("api", "/api/", &up.url(), "    scopes: []\n"),
        &[&forever, &soon, &later, &any_second, &gone, &revoked],
    )
    .await;
    crate::cli::wait_listening(admin).await;

    let m = scrape(admin).await;
    // Loading may take longer than the 3 s key's life on a busy machine: count it either way.
    let early = value(&m, r#"keygate_keys{status="expired"}"#) == Some(1.0);
    if early {
        assert_eq!(
            value(&m, r#"keygate_keys{status="active"}"#),
            Some(4.0),
            "{m}"
        );
        assert_eq!(
            value(&m, r#"keygate_keys_expiring{within="7d"}"#),
            Some(2.0),
            "{m}"
        );
    }
    assert_eq!(
        value(&m, r#"keygate_keys{status="revoked"}"#),
        Some(1.0),
        "{m}"
    );
    let version = format!(
        r#"keygate_build_info{{version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&m, &version), Some(1.0), "{m}");

    // The 3 s key expires with no reload: the counts are taken at scrape time.
    assert!(
        eventually(10, || async {
            value(&scrape(admin).await, r#"keygate_keys{status="expired"}"#) == Some(2.0)
        })
        .await,
        "an expired key was not counted as expired"
    );
    let m = scrape(admin).await;
    assert_eq!(
        value(&m, r#"keygate_keys{status="active"}"#),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        value(&m, r#"keygate_keys_expiring{within="7d"}"#),
        Some(1.0),
        "{m}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn process_metrics_are_exposed() {
    if !std::path::Path::new("/proc/self/stat").exists() {
        return;
    }
    let up = Upstream::start().await;
    let port = crate::cli::free_port();
    let admin: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let gw = Gateway::start_with(
        &format!("admin_listen: 127.0.0.1:{port}\n"),
        &route("api", "/api/", &up.url(), "    scopes: []\n"),
        &[],
    )
    .await;
    crate::cli::wait_listening(admin).await;
    let m = scrape(admin).await;
    assert!(
        m.contains("# TYPE process_cpu_seconds_total counter\n"),
        "{m}"
    );
    assert!(
        value(&m, "process_cpu_seconds_total").is_some_and(|v| v >= 0.0),
        "{m}"
    );
    assert!(
        value(&m, "process_resident_memory_bytes").is_some_and(|v| v > 0.0),
        "{m}"
    );
    // Our own listeners and sockets are open.
    assert!(
        value(&m, "process_open_fds").is_some_and(|v| v >= 3.0),
        "{m}"
    );
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    let started = value(&m, "process_start_time_seconds").unwrap();
    assert!(started > now - 86_400.0 && started <= now + 1.0, "{m}");
    gw.stop().await;
}
