//! `--rate-limit`, `--burst`, `--quota` and `--allow-cidr`, shared by `create`, `import` and
//! `rotate`: flags given replace the matching limit, the others stay as they were.

use clap::Args;

use super::{usage, Failure};
use crate::keys::limit::{parse_cidr, Limits, Quota, Rate};

/// Limit flags.
#[derive(Debug, Args, Default)]
pub struct LimitArgs {
    /// Requests per period, e.g. 100/s, 6000/min, 100000/h.
    #[arg(long)]
    pub rate_limit: Option<String>,
    /// Requests allowed at once (default: one period's worth).
    #[arg(long)]
    pub burst: Option<u64>,
    /// Requests per calendar period (UTC), e.g. 10000/day, 500/h, 100000/month.
    #[arg(long)]
    pub quota: Option<String>,
    /// A client network the key may be used from (repeat for more).
    #[arg(long = "allow-cidr")]
    pub allow_cidrs: Vec<String>,
}

impl LimitArgs {
    /// `base` with the flags applied; a `--burst` alone re-bursts the existing rate.
    pub(super) fn apply(&self, base: &Limits) -> Result<Limits, Failure> {
        let mut out = base.clone();
        match (&self.rate_limit, self.burst) {
            (Some(text), burst) => {
                out.rate = Some(
                    Rate::parse(text, burst).map_err(|e| usage(format!("--rate-limit: {e}")))?,
                );
            }
            (None, Some(burst)) => {
                let rate = base.rate.ok_or_else(|| {
                    usage("--burst needs --rate-limit (the key has no rate limit)")
                })?;
                out.rate = Some(
                    Rate::parse(&rate.to_string(), Some(burst))
                        .map_err(|e| usage(format!("--burst: {e}")))?,
                );
            }
            (None, None) => {}
        }
        if let Some(text) = &self.quota {
            out.quota = Some(Quota::parse(text).map_err(|e| usage(format!("--quota: {e}")))?);
        }
        if !self.allow_cidrs.is_empty() {
            out.allowed_cidrs = self
                .allow_cidrs
                .iter()
                .map(|c| parse_cidr(c).map_err(|e| usage(format!("--allow-cidr: {e}"))))
                .collect::<Result<_, _>>()?;
        }
        Ok(out)
    }
}
