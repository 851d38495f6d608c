//! Prometheus metrics. Handles are registered once per route and label set and then only
//! incremented, so the request path touches atomics, never the registry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::keys::KeyStore;

mod process;

/// Counters of reload outcomes, by file; reload counts, `/metrics` reads.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Config reloads swapped in.
    pub config_ok: AtomicU64,
    /// Config reloads rejected.
    pub config_err: AtomicU64,
    /// Key file reloads swapped in.
    pub keys_ok: AtomicU64,
    /// Key file reloads rejected.
    pub keys_err: AtomicU64,
    /// Certificate reloads swapped in.
    pub tls_ok: AtomicU64,
    /// Certificate reloads rejected.
    pub tls_err: AtomicU64,
}

/// How far ahead `keygate_keys_expiring` looks, and its `within` label.
const EXPIRING_WITHIN: (i64, &str) = (7 * 86_400, "7d");

static META: Metadata<'static> = Metadata::new("keygate", Level::INFO, Some("keygate"));

/// How the key check ended, as a metric label and access-log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum AuthOutcome {
    /// A valid key with the scopes.
    Allowed = 0,
    /// Public route, no key checked.
    Public,
    /// No key.
    Missing,
    /// Bad or unknown key.
    Invalid,
    /// Expired key.
    Expired,
    /// Revoked key.
    Revoked,
    /// Key lacks a scope.
    Forbidden,
    /// Refused before auth (bad request, no route).
    NotChecked,
    /// A valid key over its own or the route's rate limit.
    RateLimited,
    /// A valid key whose quota is used up.
    QuotaExceeded,
    /// A valid key used from outside its `allowed_cidrs`.
    ClientNotAllowed,
}

const OUTCOMES: usize = 11;

impl AuthOutcome {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthOutcome::Allowed => "allowed",
            AuthOutcome::Public => "public",
            AuthOutcome::Missing => "missing",
            AuthOutcome::Invalid => "invalid",
            AuthOutcome::Expired => "expired",
            AuthOutcome::Revoked => "revoked",
            AuthOutcome::Forbidden => "forbidden",
            AuthOutcome::NotChecked => "not_checked",
            AuthOutcome::RateLimited => "rate_limited",
            AuthOutcome::QuotaExceeded => "quota_exceeded",
            AuthOutcome::ClientNotAllowed => "client_not_allowed",
        }
    }
}

/// Per-route metric handles.
pub struct RouteStats {
    route: String,
    requests: [[OnceLock<Counter>; OUTCOMES]; 5],
    /// Request duration, observed when the response body ends.
    pub duration: Histogram,
    /// Upstream refused or failed.
    pub upstream_unavailable: Counter,
    /// Upstream too slow.
    pub upstream_timeout: Counter,
    /// gRPC requests by final `grpc-status` (0..=16), registered on first use.
    grpc: [OnceLock<Counter>; 17],
}

/// The gateway's metric registry.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Open downstream connections.
    pub active_connections: Gauge,
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    keys_loaded: Gauge,
    /// Keys by status: active, expired, revoked.
    keys_by_status: [Gauge; 3],
    keys_expiring: Gauge,
    reloads: [Counter; 6],
    /// Requests refused before a route was chosen.
    pub unrouted: RouteStats,
}

/// Help text for every counter and gauge, as `/metrics` shows it.
const COUNTERS: &[(&str, &str)] = &[
    (
        "keygate_requests_total",
        "Requests by route, status class and auth outcome.",
    ),
    (
        "keygate_grpc_requests_total",
        "gRPC requests by route and final grpc-status.",
    ),
    (
        "keygate_upstream_errors_total",
        "Upstream failures by route and kind.",
    ),
    (
        "keygate_reloads_total",
        "Config and key file reloads by file and result.",
    ),
    (
        "keygate_access_log_dropped_total",
        "Access log lines dropped because stdout fell behind.",
    ),
    (
        "keygate_key_requests_total",
        "Allowed requests per key id (metrics.per_key).",
    ),
];
const GAUGES: &[(&str, &str)] = &[
    ("keygate_active_connections", "Open downstream connections."),
    (
        "keygate_worker_connections",
        "Open downstream connections by the worker thread serving them.",
    ),
    ("keygate_keys_loaded", "Keys in the current snapshot."),
    (
        "keygate_keys",
        "Keys in the current snapshot by status, as of the scrape.",
    ),
    (
        "keygate_keys_expiring",
        "Active keys that expire within the labelled time.",
    ),
    (
        "keygate_build_info",
        "Always 1; the version label names the running build.",
    ),
];

fn describe(recorder: &PrometheusRecorder) {
    for (name, help) in COUNTERS {
        recorder.describe_counter((*name).into(), None, (*help).into());
    }
    for (name, help) in GAUGES {
        recorder.describe_gauge((*name).into(), None, (*help).into());
    }
    recorder.describe_histogram(
        "keygate_request_duration_seconds".into(),
        Some(metrics::Unit::Seconds),
        "Request duration by route, until the response body ends.".into(),
    );
}

const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    /// A fresh registry.
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        describe(&recorder);
        let gauge = |name: &'static str, label: &'static str, value: &'static str| {
            recorder.register_gauge(
                &Key::from_parts(name, vec![Label::new(label, value)]),
                &META,
            )
        };
        let keys_by_status =
            ["active", "expired", "revoked"].map(|s| gauge("keygate_keys", "status", s));
        let keys_expiring = gauge("keygate_keys_expiring", "within", EXPIRING_WITHIN.1);
        gauge("keygate_build_info", "version", env!("CARGO_PKG_VERSION")).set(1.0);
        let reload = |file: &'static str, result: &'static str| {
            recorder.register_counter(
                &Key::from_parts(
                    "keygate_reloads_total",
                    vec![Label::new("file", file), Label::new("result", result)],
                ),
                &META,
            )
        };
        let reloads = [
            reload("config", "ok"),
            reload("config", "error"),
            reload("keys", "ok"),
            reload("keys", "error"),
            reload("tls", "ok"),
            reload("tls", "error"),
        ];
        let active_connections =
            recorder.register_gauge(&Key::from_name("keygate_active_connections"), &META);
        let keys_loaded = recorder.register_gauge(&Key::from_name("keygate_keys_loaded"), &META);
        let access_log_dropped =
            recorder.register_counter(&Key::from_name("keygate_access_log_dropped_total"), &META);
        let mut m = Metrics {
            unrouted: RouteStats::placeholder(),
            recorder,
            handle,
            active_connections,
            access_log_dropped,
            keys_loaded,
            keys_by_status,
            keys_expiring,
            reloads,
        };
        m.unrouted = m.route_stats("");
        m
    }

    /// The open-connection gauge of worker thread `worker`.
    pub fn worker_connections(&self, worker: usize) -> Gauge {
        self.recorder.register_gauge(
            &Key::from_parts(
                "keygate_worker_connections",
                vec![Label::new("worker", worker.to_string())],
            ),
            &META,
        )
    }

    fn route_stats(&self, route: &str) -> RouteStats {
        let label = || vec![Label::new("route", route.to_string())];
        let upstream = |kind: &'static str| {
            self.recorder.register_counter(
                &Key::from_parts(
                    "keygate_upstream_errors_total",
                    vec![
                        Label::new("route", route.to_string()),
                        Label::new("kind", kind),
                    ],
                ),
                &META,
            )
        };
        RouteStats {
            route: route.to_string(),
            requests: Default::default(),
            duration: self.recorder.register_histogram(
                &Key::from_parts("keygate_request_duration_seconds", label()),
                &META,
            ),
            upstream_unavailable: upstream("unavailable"),
            upstream_timeout: upstream("timeout"),
            grpc: Default::default(),
        }
    }

    /// Handles for every route, by route name in route index order.
    pub fn for_routes<'a>(&self, names: impl Iterator<Item = &'a str>) -> Vec<RouteStats> {
        names.map(|name| self.route_stats(name)).collect()
    }

    /// Counts one finished request head.
    pub fn count_request(&self, stats: &RouteStats, status: u16, outcome: AuthOutcome) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        stats.requests[class][outcome as usize]
            .get_or_init(|| {
                self.recorder.register_counter(
                    &Key::from_parts(
                        "keygate_requests_total",
                        vec![
                            Label::new("route", stats.route.clone()),
                            Label::new("status_class", format!("{}xx", class + 1)),
                            Label::new("auth", outcome.as_str()),
                        ],
                    ),
                    &META,
                )
            })
            .increment(1);
    }

    /// Counts one finished gRPC request by its `grpc-status`, so an SLO sees gRPC failures
    /// that travel as HTTP 200.
    pub fn count_grpc(&self, stats: &RouteStats, grpc_status: u16) {
        let Some(slot) = stats.grpc.get(usize::from(grpc_status)) else {
            return;
        };
        slot.get_or_init(|| {
            self.recorder.register_counter(
                &Key::from_parts(
                    "keygate_grpc_requests_total",
                    vec![
                        Label::new("route", stats.route.clone()),
                        Label::new("grpc_status", grpc_status.to_string()),
                    ],
                ),
                &META,
            )
        })
        .increment(1);
    }

    /// Counter for one key id (only used with `metrics.per_key: true`).
    pub fn key_counter(&self, key_id: &str) -> Counter {
        self.recorder.register_counter(
            &Key::from_parts(
                "keygate_key_requests_total",
                vec![Label::new("key_id", key_id.to_string())],
            ),
            &META,
        )
    }

    /// Prometheus text exposition of everything.
    pub fn render(&self, keys: &KeyStore, reloads: &ReloadStats) -> String {
        self.keys_loaded.set(keys.len() as f64);
        self.count_keys(keys, time::OffsetDateTime::now_utc().unix_timestamp());
        let values = [
            &reloads.config_ok,
            &reloads.config_err,
            &reloads.keys_ok,
            &reloads.keys_err,
            &reloads.tls_ok,
            &reloads.tls_err,
        ];
        for (counter, value) in self.reloads.iter().zip(values) {
            counter.absolute(value.load(Ordering::Relaxed));
        }
        let mut out = self.handle.render();
        if !out.is_empty() && !out.ends_with("\n\n") {
            out.push('\n');
        }
        process::render(&process::sample(), &mut out);
        out
    }

    /// Sets the key gauges; expiry moves with the clock, so this runs at every scrape.
    fn count_keys(&self, keys: &KeyStore, now: i64) {
        let (mut counts, mut expiring) = ([0u64; 3], 0u64);
        for k in keys.entries() {
            let status = if k.revoked {
                2
            } else if k.expires_at().is_some_and(|t| now >= t) {
                1
            } else {
                if k.expires_at().is_some_and(|t| t - now <= EXPIRING_WITHIN.0) {
                    expiring += 1;
                }
                0
            };
            counts[status] += 1;
        }
        for (g, n) in self.keys_by_status.iter().zip(counts) {
            g.set(n as f64);
        }
        self.keys_expiring.set(expiring as f64);
    }

    /// Folds recorded histogram samples; call every few seconds.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl RouteStats {
    fn placeholder() -> RouteStats {
        RouteStats {
            route: String::new(),
            requests: Default::default(),
            duration: Histogram::noop(),
            upstream_unavailable: Counter::noop(),
            upstream_timeout: Counter::noop(),
            grpc: Default::default(),
        }
    }
}
