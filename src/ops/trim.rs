//! Handing freed memory back to the OS once a worker goes quiet.
//!
//! A burst of connections leaves each worker's allocator heap holding pages it no longer
//! uses (connection buffers, access-log entries); mimalloc returns them only while the heap
//! is busy. After a quiet second the worker asks the allocator to collect, once per burst,
//! so a sidecar's RSS falls back after load instead of staying at its peak. The library
//! forbids `unsafe`: the binary, which owns the global allocator, installs the collect call.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::Duration;

/// How often a worker checks whether it went quiet.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(1);

static COLLECT: OnceLock<fn()> = OnceLock::new();

/// Installs the call that returns the current thread's freed allocator pages to the OS.
pub fn install(collect: fn()) {
    let _ = COLLECT.set(collect);
}

/// Returns the current thread's freed pages now (after a reload dropped a whole key store).
pub(crate) fn collect_now() {
    if let Some(collect) = COLLECT.get() {
        collect();
    }
}

/// What one worker's quiet check remembers of its activity count between ticks.
#[derive(Debug, Default)]
pub(crate) struct Quiet {
    /// The activity count at the last check.
    seen: u64,
    /// The activity count when memory was last collected.
    collected: u64,
}

impl Quiet {
    /// Whether to collect now, given the activity count: something happened since the last
    /// collect, and nothing since the previous check (a whole quiet interval).
    pub(crate) fn check(&mut self, activity: u64) -> bool {
        let quiet = activity == self.seen;
        self.seen = activity;
        if quiet && activity != self.collected {
            self.collected = activity;
            return true;
        }
        false
    }
}

thread_local! {
    static ACTIVITY: Cell<u64> = const { Cell::new(0) };
}

/// Notes a request or a connection end on this worker; a thread-local add, no shared line.
pub(crate) fn note_activity() {
    let _ = ACTIVITY.try_with(|a| a.set(a.get().wrapping_add(1)));
}

/// Runs on each worker: collects once per burst of activity, a quiet interval after it ends.
pub(crate) async fn on_quiet() {
    if COLLECT.get().is_none() {
        return;
    }
    let mut quiet = Quiet::default();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if quiet.check(ACTIVITY.with(Cell::get)) {
            collect_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Quiet;

    #[test]
    fn collects_once_after_a_quiet_interval() {
        let mut q = Quiet::default();
        // Nothing has happened yet: nothing to give back.
        assert!(!q.check(0));
        // Busy: activity moved since the previous check.
        assert!(!q.check(5));
        assert!(!q.check(9));
        // Quiet for one interval after the burst: collect once.
        assert!(q.check(9));
        assert!(!q.check(9));
        assert!(!q.check(9));
        // A new burst, then quiet again: collect again.
        assert!(!q.check(10));
        assert!(q.check(10));
    }

    #[test]
    fn continuous_activity_never_collects() {
        let mut q = Quiet::default();
        for n in 1..100 {
            assert!(!q.check(n));
        }
    }
}
