//! Per-key limits as the key file writes them (`rate_limit: 100/s`, `burst`, `quota: 10000/day`,
//! `allowed_cidrs`), and the two counters that enforce them without a lock: a GCRA cell for the
//! rate and a packed period/count cell for the quota.
//!
//! Spent budgets live in [`Usage`], carried across reloads by key hash. Both counters are this
//! replica's atomics; a shared store would implement the same two calls, [`Rate::spend`] and
//! [`Quota::spend`], over the network.

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use ipnet::IpNet;
use time::OffsetDateTime;

/// The period a rate is counted over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateUnit {
    /// `/s`
    Second,
    /// `/min`
    Minute,
    /// `/h`
    Hour,
}

impl RateUnit {
    fn secs(self) -> u64 {
        match self {
            RateUnit::Second => 1,
            RateUnit::Minute => 60,
            RateUnit::Hour => 3600,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            RateUnit::Second => "s",
            RateUnit::Minute => "min",
            RateUnit::Hour => "h",
        }
    }
}

/// A rate limit: `count` requests per `unit`, with a burst of `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per period.
    pub count: u64,
    /// The period.
    pub unit: RateUnit,
    /// Requests allowed at once; one period's worth unless the key file says `burst`.
    pub burst: u64,
}

/// Why a rate or quota was refused, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Whole seconds until a request would be allowed, at least 1.
    pub retry_after: u64,
}

/// Splits `<n>/<unit>`; `n` must be a positive integer.
fn split_spec<'a>(text: &'a str, what: &str, units: &str) -> Result<(u64, &'a str), String> {
    let bad = || format!("invalid {what} {text:?}: expected a count per period like {units}");
    let (n, unit) = text.trim().split_once('/').ok_or_else(bad)?;
    let n: u64 = n.trim().parse().map_err(|_| bad())?;
    if n == 0 || n >= 1 << 40 {
        return Err(format!(
            "invalid {what} {text:?}: the count must be between 1 and 2^40"
        ));
    }
    Ok((n, unit.trim()))
}

impl Rate {
    /// Parses `100/s`, `6000/min` or `100000/h`; `burst` defaults to one period's worth.
    pub fn parse(text: &str, burst: Option<u64>) -> Result<Rate, String> {
        let examples = "100/s, 6000/min or 100000/h";
        let (count, unit) = split_spec(text, "rate_limit", examples)?;
        let unit = match unit {
            "s" | "sec" | "second" => RateUnit::Second,
            "min" | "minute" => RateUnit::Minute,
            "h" | "hour" => RateUnit::Hour,
            _ => {
                return Err(format!(
                    "invalid rate_limit {text:?}: the period must be s, min or h ({examples})"
                ))
            }
        };
        if burst == Some(0) {
            return Err("burst must be at least 1".into());
        }
        Ok(Rate {
            count,
            unit,
            burst: burst.unwrap_or(count),
        })
    }

    /// Seconds in one period, the `w` of `RateLimit-Policy`.
    pub fn window_secs(&self) -> u64 {
        self.unit.secs()
    }

    /// Nanoseconds between two requests at the sustained rate.
    fn interval_ns(&self) -> u64 {
        (self.unit.secs() * 1_000_000_000 / self.count).max(1)
    }

    /// Takes one request from `cell` (GCRA: the cell holds the theoretical arrival time).
    pub fn spend(&self, cell: &AtomicU64, now_ns: u64) -> Result<(), Wait> {
        let t = self.interval_ns();
        let tolerance = t.saturating_mul(self.burst);
        let mut tat = cell.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now_ns).saturating_add(t);
            if next - now_ns > tolerance {
                let wait_ns = next - now_ns - tolerance;
                return Err(Wait {
                    retry_after: wait_ns.div_ceil(1_000_000_000).max(1),
                });
            }
            match cell.compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }

    /// Re-expresses a cell spent under `old` in this rate's terms: the requests spent stay
    /// spent, so raising a limit frees budget at once and lowering it does not forgive any.
    pub fn rescale(&self, cell: &AtomicU64, old: &Rate, now_ns: u64) {
        if old.interval_ns() == self.interval_ns() {
            return;
        }
        let tat = cell.load(Ordering::Relaxed);
        if tat <= now_ns {
            return;
        }
        let spent = (tat - now_ns).div_ceil(old.interval_ns());
        let rescaled = now_ns.saturating_add(spent.saturating_mul(self.interval_ns()));
        let _ = cell.compare_exchange(tat, rescaled, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Gives back a request taken by [`Rate::spend`] when a later check refused it.
    pub fn refund(&self, cell: &AtomicU64) {
        let t = self.interval_ns();
        let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(t))
        });
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.unit.suffix())
    }
}

/// The calendar period a quota resets on (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaUnit {
    /// `/h`
    Hour,
    /// `/day`
    Day,
    /// `/month`
    Month,
}

/// A quota: `count` requests per calendar period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Requests per period.
    pub count: u64,
    /// The period.
    pub unit: QuotaUnit,
}

/// Bits of a quota cell that hold the count; the rest tag the period it counts.
const COUNT_BITS: u32 = 40;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

impl Quota {
    /// Parses `10000/day`, `500/h` or `100000/month`.
    pub fn parse(text: &str) -> Result<Quota, String> {
        let examples = "10000/day, 500/h or 100000/month";
        let (count, unit) = split_spec(text, "quota", examples)?;
        let unit = match unit {
            "h" | "hour" => QuotaUnit::Hour,
            "d" | "day" => QuotaUnit::Day,
            "month" => QuotaUnit::Month,
            _ => {
                return Err(format!(
                    "invalid quota {text:?}: the period must be h, day or month ({examples})"
                ))
            }
        };
        Ok(Quota { count, unit })
    }

    /// The period `now` falls in: its start and end, unix seconds.
    pub fn period(&self, now: i64) -> (i64, i64) {
        match self.unit {
            QuotaUnit::Hour => {
                let start = now - now.rem_euclid(3600);
                (start, start + 3600)
            }
            QuotaUnit::Day => {
                let start = now - now.rem_euclid(86_400);
                (start, start + 86_400)
            }
            QuotaUnit::Month => month_bounds(now),
        }
    }

    /// Distinguishes periods (and units) in a cell's upper bits.
    fn tag(&self, period_start: i64) -> u64 {
        let unit = match self.unit {
            QuotaUnit::Hour => 1u64,
            QuotaUnit::Day => 2,
            QuotaUnit::Month => 3,
        };
        let index = u64::try_from(period_start / 3600).unwrap_or(0) & ((1 << 22) - 1);
        (unit << 22 | index) << COUNT_BITS
    }

    /// Takes one request from `cell`; refused with the seconds until the period ends.
    pub fn spend(&self, cell: &AtomicU64, now: i64) -> Result<(), Wait> {
        let (start, end) = self.period(now);
        let tag = self.tag(start);
        let mut seen = cell.load(Ordering::Relaxed);
        loop {
            let used = if seen & !COUNT_MASK == tag {
                seen & COUNT_MASK
            } else {
                0
            };
            if used >= self.count {
                return Err(Wait {
                    retry_after: u64::try_from(end - now).unwrap_or(1).max(1),
                });
            }
            match cell.compare_exchange_weak(
                seen,
                tag | (used + 1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(v) => seen = v,
            }
        }
    }

    /// Requests counted in the period `now` falls in.
    pub fn used(&self, cell: &AtomicU64, now: i64) -> u64 {
        let v = cell.load(Ordering::Relaxed);
        if v & !COUNT_MASK == self.tag(self.period(now).0) {
            v & COUNT_MASK
        } else {
            0
        }
    }

    /// Sets the count of the period starting at `period_start`, as a restart restores it.
    pub fn restore(&self, cell: &AtomicU64, period_start: i64, used: u64) {
        cell.store(
            self.tag(period_start) | used.min(COUNT_MASK),
            Ordering::Relaxed,
        );
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.unit {
            QuotaUnit::Hour => "h",
            QuotaUnit::Day => "day",
            QuotaUnit::Month => "month",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// The UTC calendar month holding `now`: its first second and the next month's.
fn month_bounds(now: i64) -> (i64, i64) {
    let Ok(t) = OffsetDateTime::from_unix_timestamp(now) else {
        return (now, now + 1);
    };
    let first = |year: i32, month: time::Month| {
        time::Date::from_calendar_date(year, month, 1)
            .map(|d| d.midnight().assume_utc().unix_timestamp())
            .unwrap_or(now)
    };
    let (y, m) = (t.year(), t.month());
    let next_year = if m == time::Month::December { y + 1 } else { y };
    (first(y, m), first(next_year, m.next()))
}

/// A key's limits, as the key file gives them; absent when it sets none.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Limits {
    /// `rate_limit` with its `burst`.
    pub rate: Option<Rate>,
    /// `quota`.
    pub quota: Option<Quota>,
    /// `allowed_cidrs`; empty allows every client.
    pub allowed_cidrs: Vec<IpNet>,
}

impl Limits {
    /// True when the key sets no limit at all.
    pub fn is_empty(&self) -> bool {
        self.rate.is_none() && self.quota.is_none() && self.allowed_cidrs.is_empty()
    }

    /// True when `client` may use the key.
    pub fn allows(&self, client: IpAddr) -> bool {
        let client = crate::wire::client::canonical(client);
        self.allowed_cidrs.is_empty() || self.allowed_cidrs.iter().any(|n| n.contains(&client))
    }
}

/// Parses a CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a single address.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            format!("invalid CIDR {text:?}: expected a network like 10.0.0.0/8 or 2001:db8::/32")
        })
}

/// What a key has spent: its rate cell and its quota cell, kept across reloads by key hash.
#[derive(Debug, Default)]
pub struct Usage {
    /// GCRA theoretical arrival time, nanoseconds on [`mono_ns`]'s clock.
    pub rate: AtomicU64,
    /// Quota period tag and count.
    pub quota: AtomicU64,
}

/// Nanoseconds on a monotonic clock that starts near zero, for rate cells.
pub fn mono_ns(now: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| now - std::time::Duration::from_secs(3600));
    u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for text in ["100/s", "6000/min", "100000/h"] {
            assert_eq!(Rate::parse(text, None).unwrap().to_string(), text);
        }
        assert_eq!(Rate::parse("100/s", None).unwrap().burst, 100);
        assert_eq!(Rate::parse("100/s", Some(20)).unwrap().burst, 20);
        for bad in ["100", "0/s", "x/s", "100/day", "100/m", "-1/s"] {
            assert!(Rate::parse(bad, None).is_err(), "{bad}");
        }
        for text in ["10000/day", "5/h", "100000/month"] {
            assert_eq!(Quota::parse(text).unwrap().to_string(), text);
        }
        assert!(Quota::parse("10/s").is_err());
        assert!(parse_cidr("10.0.0.0/8").is_ok());
        assert!(parse_cidr("2001:db8::/32").is_ok());
        assert!(parse_cidr("127.0.0.1").is_ok());
        assert!(parse_cidr("10.0.0.0/33").is_err());
    }

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let rate = Rate::parse("10/s", Some(3)).unwrap();
        let cell = AtomicU64::new(0);
        let t0 = 10_000_000_000u64;
        for _ in 0..3 {
            assert!(rate.spend(&cell, t0).is_ok());
        }
        assert_eq!(rate.spend(&cell, t0), Err(Wait { retry_after: 1 }));
        // One interval (100 ms) later, exactly one more.
        assert!(rate.spend(&cell, t0 + 100_000_000).is_ok());
        assert!(rate.spend(&cell, t0 + 100_000_000).is_err());
        rate.refund(&cell);
        assert!(rate.spend(&cell, t0 + 100_000_000).is_ok());
    }

    #[test]
    fn a_changed_rate_keeps_what_was_spent() {
        let old = Rate::parse("5/min", None).unwrap();
        let new = Rate::parse("6/min", None).unwrap();
        let cell = AtomicU64::new(0);
        let t0 = 10_000_000_000u64;
        for _ in 0..5 {
            assert!(old.spend(&cell, t0).is_ok());
        }
        assert!(old.spend(&cell, t0).is_err());
        new.rescale(&cell, &old, t0);
        assert!(
            new.spend(&cell, t0).is_ok(),
            "one more under the higher limit"
        );
        assert!(
            new.spend(&cell, t0).is_err(),
            "and no more: the five stay spent"
        );
    }

    #[test]
    fn retry_after_counts_whole_seconds_to_the_next_slot() {
        let rate = Rate::parse("1/min", None).unwrap();
        let cell = AtomicU64::new(0);
        assert!(rate.spend(&cell, 5_000_000_000).is_ok());
        assert_eq!(
            rate.spend(&cell, 5_000_000_000).unwrap_err().retry_after,
            60
        );
        assert_eq!(
            rate.spend(&cell, 35_500_000_000).unwrap_err().retry_after,
            30
        );
    }

    #[test]
    fn quotas_reset_with_the_calendar() {
        let q = Quota::parse("2/day").unwrap();
        let cell = AtomicU64::new(0);
        let noon = 1_764_676_800; // 2025-12-02T12:00:00Z
        assert!(q.spend(&cell, noon).is_ok());
        assert!(q.spend(&cell, noon + 1).is_ok());
        assert_eq!(q.used(&cell, noon), 2);
        assert_eq!(q.spend(&cell, noon).unwrap_err().retry_after, 12 * 3600);
        assert!(q.spend(&cell, noon + 12 * 3600).is_ok(), "a new day");
        let m = Quota::parse("1/month").unwrap();
        let (start, end) = m.period(noon);
        assert_eq!(start, 1_764_547_200); // 2025-12-01
        assert_eq!(end, 1_767_225_600); // 2026-01-01
        m.restore(&cell, start, 1);
        assert!(m.spend(&cell, noon).is_err());
        assert!(m.spend(&cell, end).is_ok());
    }

    #[test]
    fn cidrs_match_mapped_v4_clients() {
        let limits = Limits {
            allowed_cidrs: vec![parse_cidr("10.0.0.0/8").unwrap()],
            ..Limits::default()
        };
        assert!(limits.allows("10.1.2.3".parse().unwrap()));
        assert!(limits.allows("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!limits.allows("127.0.0.1".parse().unwrap()));
        assert!(Limits::default().allows("127.0.0.1".parse().unwrap()));
    }
}
