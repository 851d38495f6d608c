//! The snapshot: the immutable routes, keys and settings one request runs on, start to end.

use std::sync::Arc;

use crate::config::Config;
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
}
