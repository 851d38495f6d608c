//! Policy: what a permitted key may still not do. Come from outside its `allowed_cidrs`, go
//! faster than its own or the route's `rate_limit`, or past its `quota`.

use std::net::IpAddr;

use crate::control::snapshot::RouteMeters;
use crate::keys::limit::{Quota, Rate, Wait};
use crate::proxy::authorize::Permit;

/// Which limit refused a request, as `RateLimit-Policy` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitOf {
    /// The key's `rate_limit`.
    Key,
    /// The route's `rate_limit`, counted for this key.
    Route,
}

impl LimitOf {
    /// The policy name in `RateLimit-Policy` and `RateLimit`.
    pub fn name(self) -> &'static str {
        match self {
            LimitOf::Key => "key",
            LimitOf::Route => "route",
        }
    }
}

/// A permitted key refused by its policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The client address is outside the key's `allowed_cidrs`.
    #[error("this API key may not be used from this client address")]
    ClientNotAllowed,
    /// Over a rate limit.
    #[error("rate limit of {rate} exceeded; retry in {}s", wait.retry_after)]
    RateLimited {
        /// The limit that refused.
        rate: Rate,
        /// Whose limit it is.
        of: LimitOf,
        /// When to come back.
        wait: Wait,
    },
    /// The quota of the current period is used up.
    #[error("quota of {quota} used up; it resets in {}s", wait.retry_after)]
    QuotaExceeded {
        /// The quota.
        quota: Quota,
        /// Until the period ends.
        wait: Wait,
    },
}

/// The clocks a policy check reads: monotonic nanoseconds for rates, unix seconds for quotas.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// For rate cells.
    pub mono_ns: u64,
    /// For quota periods.
    pub unix: i64,
}

impl Now {
    /// The clocks as they read now.
    pub fn read() -> Now {
        Now {
            mono_ns: crate::keys::limit::mono_ns(std::time::Instant::now()),
            unix: crate::proxy::authorize::now_secs(),
        }
    }
}

/// Checks the permit's key against its networks, rates and quota, spending budget if allowed.
/// A key without limits on a route without one costs two branches and reads no clock.
pub fn check(permit: &Permit<'_>, meters: &RouteMeters, client: IpAddr) -> Result<(), PolicyError> {
    match permit.key {
        Some(key) if key.limits.is_some() || permit.route.rate_limit.is_some() => {
            check_at(permit, meters, client, Now::read())
        }
        _ => Ok(()),
    }
}

/// [`check`] at a given time.
pub fn check_at(
    permit: &Permit<'_>,
    meters: &RouteMeters,
    client: IpAddr,
    now: Now,
) -> Result<(), PolicyError> {
    let Some(key) = permit.key else {
        return Ok(());
    };
    let route = permit.route;
    let route_rate = route
        .rate_limit
        .as_ref()
        .and_then(|r| Some((r, meters.cell(route.index, key.slot)?)));
    let limits = key.limits.as_deref();
    if limits.is_some_and(|l| !l.allows(client)) {
        return Err(PolicyError::ClientNotAllowed);
    }
    let usage = key.usage.as_deref();
    let key_rate = limits
        .and_then(|l| l.rate.as_ref())
        .zip(usage.map(|u| &u.rate));
    if let Some((rate, cell)) = route_rate {
        rate.spend(cell, now.mono_ns)
            .map_err(|wait| PolicyError::RateLimited {
                rate: *rate,
                of: LimitOf::Route,
                wait,
            })?;
    }
    let refund_route = || {
        if let Some((rate, cell)) = route_rate {
            rate.refund(cell);
        }
    };
    if let Some((rate, cell)) = key_rate {
        if let Err(wait) = rate.spend(cell, now.mono_ns) {
            refund_route();
            return Err(PolicyError::RateLimited {
                rate: *rate,
                of: LimitOf::Key,
                wait,
            });
        }
    }
    let quota = limits
        .and_then(|l| l.quota.as_ref())
        .zip(usage.map(|u| &u.quota));
    if let Some((quota, cell)) = quota {
        if let Err(wait) = quota.spend(cell, now.unix) {
            // A request the quota refuses spends no rate.
            refund_route();
            if let Some((rate, cell)) = key_rate {
                rate.refund(cell);
            }
            return Err(PolicyError::QuotaExceeded {
                quota: *quota,
                wait,
            });
        }
    }
    Ok(())
}
