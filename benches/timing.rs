//! Statistical timing check: rejecting an unknown key must not take measurably longer (or
//! shorter) when the key is close to a valid one. Lookup is by SHA-256 in a hash map, so the
//! raw key is never compared byte by byte; this benchmark shows it with Welch's t-test.
//!
//! Run: `cargo bench --bench timing`. Prints the means and t statistics and exits non-zero
//! when a difference is statistically significant (|t| > 5) and larger than 3% of the mean.

use std::hint::black_box;
use std::time::Instant;

use keygate::config::Config;
use keygate::keys::{self, KeyRecord, KeyStore};
use keygate::proxy::authorize::authorize;
use keygate::proxy::credential::{Carrier, Credential, Found};

const BATCH: usize = 200;
const BATCHES: usize = 3000;

fn record(secret: &str, i: usize) -> KeyRecord {
    KeyRecord {
        id: format!("k{i}"),
        hash: keys::digest(secret.as_bytes()),
        service_account: "sa".into(),
        scopes: vec!["s.a".into()],
        description: None,
        created_at: None,
        expires_at: None,
        revoked_at: None,
        limits: Default::default(),
    }
}

/// A kg_ key that differs from `key` only in its last body character, checksum recomputed.
fn near_miss(key: &str) -> String {
    let mut body = key.as_bytes()[..keys::KEY_LEN - 6].to_vec();
    let last = body.len() - 1;
    body[last] = if body[last] == b'a' { b'b' } else { b'a' };
    let check = keys::checksum(&body);
    body.extend_from_slice(&check);
    String::from_utf8(body).unwrap()
}

fn stats(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var)
}

fn welch(a: &[f64], b: &[f64]) -> f64 {
    let (ma, va) = stats(a);
    let (mb, vb) = stats(b);
    (ma - mb) / (va / a.len() as f64 + vb / b.len() as f64).sqrt()
}

fn main() {
    let cfg = Config::parse(
        std::path::Path::new("bench.yaml"),
        "keys_file: k.yaml\nroutes:\n  - name: api\n    path_prefix: /api/\n    upstream: http://127.0.0.1:1\n    scopes: [s.a]\n",
    )
    .unwrap();
    let route = cfg.routes.iter().next().unwrap();
    let valid: Vec<String> = (0..10_000).map(|_| keys::generate().unwrap()).collect();
    // Keys issued elsewhere (imported by hash): no kg_ prefix, no checksum.
    let imported: Vec<String> = (0..BATCH)
        .map(|i| format!("sk-live-{:0>32}", i * 104_729))
        .collect();
    let records: Vec<KeyRecord> = valid
        .iter()
        .chain(&imported)
        .enumerate()
        .map(|(i, k)| record(k, i))
        .collect();
    let store = KeyStore::build(&records, None);

    let near: Vec<String> = valid.iter().take(BATCH).map(|k| near_miss(k)).collect();
    let far: Vec<String> = (0..BATCH).map(|_| keys::generate().unwrap()).collect();
    let near_imported: Vec<String> = imported
        .iter()
        .map(|k| format!("{}x", &k[..k.len() - 1]))
        .collect();
    let far_imported: Vec<String> = (0..BATCH)
        .map(|i| format!("sk-test-{:0>32}", i * 7919 + 3))
        .collect();
    for k in near
        .iter()
        .chain(&far)
        .chain(&near_imported)
        .chain(&far_imported)
    {
        assert!(authorize(route, &store, &found(k.as_bytes()), false, 0).is_err());
    }

    // Pairs that must be indistinguishable: a near miss and a random key of the same format.
    // (kg_ keys and foreign keys differ by design: only kg_ keys carry a checksum to verify.)
    let classes: [(&str, &Vec<String>); 4] = [
        ("kg near", &near),
        ("kg random", &far),
        ("imp near", &near_imported),
        ("imp random", &far_imported),
    ];
    let mut samples: Vec<Vec<f64>> = (0..4).map(|_| Vec::with_capacity(BATCHES)).collect();
    for round in 0..BATCHES {
        // Interleave classes (rotating the order) so drift on a noisy machine hits all alike.
        for j in 0..4 {
            let c = (round + j) % 4;
            let keys = classes[c].1;
            let t = Instant::now();
            for k in keys.iter() {
                black_box(
                    authorize(route, &store, &found(black_box(k.as_bytes())), false, 0).is_err(),
                );
            }
            samples[c].push(t.elapsed().as_nanos() as f64 / BATCH as f64);
        }
    }
    let mut failed = false;
    for (c, (name, _)) in classes.iter().enumerate() {
        let (m, v) = stats(&samples[c]);
        println!("{name:>10}: mean {m:8.1} ns/reject, sd {:6.1}", v.sqrt());
    }
    for (a, b) in [(0, 1), (2, 3)] {
        let t = welch(&samples[a], &samples[b]);
        let (ma, _) = stats(&samples[a]);
        let (mb, _) = stats(&samples[b]);
        let rel = (ma - mb).abs() / ma.min(mb);
        let significant = t.abs() > 5.0 && rel > 0.03;
        failed |= significant;
        println!(
            "{:>10} vs {:<10}: t = {t:+6.2}, difference {:.2}% -> {}",
            classes[a].0,
            classes[b].0,
            rel * 100.0,
            if significant {
                "DEPENDS ON INPUT"
            } else {
                "indistinguishable"
            }
        );
    }
    if failed {
        std::process::exit(1);
    }
}

/// A key presented as `Authorization: Api-Key <key>`.
fn found(key: &[u8]) -> Found<'_, 'static> {
    Found {
        credential: Credential::ApiKey(std::borrow::Cow::Borrowed(key)),
        carrier: Some(Carrier::Authorization),
    }
}
