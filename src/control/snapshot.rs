//! The snapshot: the immutable routes, keys and settings one request runs on, start to end,
//! and the per-route, per-key rate cells that live beside them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::config::Config;
use crate::keys::limit::mono_ns;
use crate::keys::KeyStore;
use crate::ops::metrics::RouteStats;

/// Everything one request needs, immutable; requests keep the one they started with.
pub struct Snapshot {
    /// Routes and settings.
    pub config: Arc<Config>,
    /// Keys by hash.
    pub keys: Arc<KeyStore>,
    /// Metric handles, by route index.
    pub route_stats: Arc<Vec<RouteStats>>,
    /// Rate cells of routes that set `rate_limit`.
    pub meters: RouteMeters,
    /// Per-key request counters by key slot, registered on first use; empty unless
    /// `metrics.per_key` is on, so keys do not carry a slot each for a feature that is off.
    pub key_uses: Box<[OnceLock<metrics::Counter>]>,
}

impl Snapshot {
    /// A snapshot whose route rate cells carry over what `previous` had spent.
    pub fn new(
        config: Arc<Config>,
        keys: Arc<KeyStore>,
        route_stats: Arc<Vec<RouteStats>>,
        previous: Option<&Snapshot>,
    ) -> Snapshot {
        let meters = RouteMeters::build(&config, &keys, previous);
        let counted = if config.metrics_per_key {
            keys.len()
        } else {
            0
        };
        Snapshot {
            key_uses: (0..counted).map(|_| OnceLock::new()).collect(),
            config,
            keys,
            route_stats,
            meters,
        }
    }
}

/// One GCRA cell per key for each route with a `rate_limit`, indexed by route, then key slot.
#[derive(Default)]
pub struct RouteMeters {
    by_route: Vec<Option<Box<[AtomicU64]>>>,
}

impl RouteMeters {
    fn build(config: &Config, keys: &KeyStore, previous: Option<&Snapshot>) -> RouteMeters {
        let by_route = config
            .routes
            .iter()
            .map(|route| {
                route.rate_limit?;
                let cells: Box<[AtomicU64]> = (0..keys.len()).map(|_| AtomicU64::new(0)).collect();
                // Spent budget follows the route by name and the key by hash.
                let old = previous.and_then(|p| {
                    let at = p.config.routes.iter().position(|r| r.name == route.name)?;
                    let old_rate = p.config.routes.iter().nth(at)?.rate_limit?;
                    Some((p, old_rate, p.meters.by_route.get(at)?.as_ref()?))
                });
                let now = mono_ns(std::time::Instant::now());
                if let (Some((p, old_rate, old_cells)), Some(rate)) = (old, &route.rate_limit) {
                    for (digest, entry) in keys.by_digest() {
                        let was = p
                            .keys
                            .lookup(digest)
                            .and_then(|e| old_cells.get(e.slot as usize));
                        if let (Some(was), Some(cell)) = (was, cells.get(entry.slot as usize)) {
                            cell.store(was.load(Ordering::Relaxed), Ordering::Relaxed);
                            rate.rescale(cell, &old_rate, now);
                        }
                    }
                }
                Some(cells)
            })
            .collect();
        RouteMeters { by_route }
    }

    /// The cell of key `slot` on route `index`, when that route limits per key.
    pub fn cell(&self, index: usize, slot: u32) -> Option<&AtomicU64> {
        self.by_route.get(index)?.as_ref()?.get(slot as usize)
    }
}
