//! Microbenchmarks of the request path's own work, piece by piece: reading the credential and
//! its checksum, the key lookup at 1,000 and 100,000 keys, the scope check, route matching at
//! 10, 100 and 1,000 routes, and path normalization. Sockets, hyper and the upstream are
//! measured by `benches/compare.sh`; these show what keygate adds and how it scales.
//!
//! Run: `cargo bench --bench hot_path` (divan prints a table; filter with a name).

use std::hint::black_box;
use std::path::Path;

use divan::Bencher;
use keygate::config::Config;
use keygate::keys::{self, KeyRecord, KeyStore};
use keygate::proxy::credential::{parse_authorization, Credential};
use keygate::wire::path::normalize;

fn main() {
    divan::main();
}

fn record(i: usize, scopes: &[&str]) -> KeyRecord {
    KeyRecord {
        id: format!("k{i}"),
        hash: keys::digest(format!("bench-key-{i}").as_bytes()),
        service_account: format!("sa-{}", i % 200),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        description: None,
        created_at: None,
        expires_at: None,
        revoked_at: None,
        limits: Default::default(),
    }
}

/// `Api-Key <kg_ key>` as a client sends it: scheme parse, then format and checksum check.
#[divan::bench]
fn credential_parse_and_checksum(b: Bencher) {
    let header = format!("Api-Key {}", keys::generate().unwrap_or_default());
    b.bench_local(|| {
        let ok = match parse_authorization(black_box(header.as_bytes())) {
            Credential::ApiKey(k) => keys::well_formed(&k),
            _ => false,
        };
        black_box(ok)
    });
}

/// SHA-256 of a presented key: the digest the lookup probes with.
#[divan::bench]
fn digest(b: Bencher) {
    let key = keys::generate().unwrap_or_default();
    b.bench_local(|| keys::digest(black_box(key.as_bytes())));
}

/// One probe of the key store; the probes walk 1,024 different keys so a large store is
/// not measured from one warm cache line.
#[divan::bench(args = [1_000, 100_000])]
fn lookup(b: Bencher, n: usize) {
    let records: Vec<KeyRecord> = (0..n).map(|i| record(i, &["bench.call"])).collect();
    let store = KeyStore::build(&records, None);
    let probes: Vec<keys::Digest32> = (0..1024).map(|i| records[(i * 7919) % n].hash).collect();
    let mut i = 0;
    b.bench_local(|| {
        i = (i + 1) % probes.len();
        black_box(store.lookup(black_box(&probes[i])).is_some())
    });
}

/// A route needing two scopes, checked against a key holding an exact scope and a prefix.
#[divan::bench]
fn scope_check(b: Bencher) {
    let records = [record(0, &["other.read", "bench.*", "bench.call"])];
    let store = KeyStore::build(&records, None);
    let Some(key) = store.lookup(&records[0].hash) else {
        return;
    };
    let required = vec!["bench.call".to_string(), "bench.write".to_string()];
    b.bench_local(|| black_box(key.missing_scope(black_box(&required))));
}

/// A config with `n` path-prefix routes; the request matches the last one tried.
fn config_with_routes(n: usize) -> Option<Config> {
    let mut text = String::from("keys_file: k.yaml\nroutes:\n");
    for i in 0..n {
        text.push_str(&format!(
            "  - name: r{i}\n    path_prefix: /svc{i}/v1/\n    upstream: http://127.0.0.1:9\n    scopes: [bench.call]\n"
        ));
    }
    Config::parse(Path::new("bench.yaml"), &text).ok()
}

#[divan::bench(args = [10, 100, 1_000])]
fn route_match(b: Bencher, n: usize) {
    let Some(config) = config_with_routes(n) else {
        return;
    };
    let path = format!("/svc{}/v1/items/42", n - 1);
    let method = http::Method::GET;
    b.bench_local(|| {
        black_box(
            config
                .routes
                .find(black_box(None), &method, black_box(&path))
                .is_some(),
        )
    });
}

/// An ordinary path (nothing to change) and one with dot segments and escapes to resolve.
#[divan::bench(args = ["/api/v1/users/123/orders", "/api/./v1/%7Eusers//123/../124/orders"])]
fn path_normalize(b: Bencher, path: &str) {
    b.bench_local(|| black_box(normalize(black_box(path)).is_ok()));
}
