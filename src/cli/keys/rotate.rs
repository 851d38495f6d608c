//! `keys rotate`: a new key with the old one's account and scopes and, unless asked
//! otherwise, its lifetime counted from now; the old key ends after a grace period.

use clap::Args;
use time::OffsetDateTime;

use super::{
    expiry, failure, new_id, print_issued, usage, Failure, LimitArgs, Output, Target, Terms,
};
use crate::keys::audit::{Action, Entry};
use crate::keys::file as keyfile;
use crate::keys::{self, KeyRecord};

/// `keys rotate` options.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Key id.
    pub id: String,
    /// How long the old key keeps working, e.g. 24h.
    #[arg(long)]
    pub grace: Option<String>,
    /// Issue a replacement for a revoked key (after a leak); the revoked entry stays as is.
    #[arg(long)]
    pub reissue: bool,
    /// Lifetime of the new key, e.g. 90d (default: the old key's lifetime, from now).
    #[arg(long, conflicts_with_all = ["expires_at", "no_expiry"])]
    pub expires_in: Option<String>,
    /// Expiry of the new key as RFC 3339.
    #[arg(long, conflicts_with = "no_expiry")]
    pub expires_at: Option<String>,
    /// The new key never expires.
    #[arg(long)]
    pub no_expiry: bool,
    /// With `--output k8s-secret`: the Secret's name.
    #[arg(long)]
    pub secret_name: Option<String>,
    /// Limits for the new key; those not given are carried over from the old key.
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Issues a key with the old one's account and scopes, then ends the old one (a revoked one
/// is left exactly as it is).
pub(super) fn run(
    out: Output,
    t: &Target,
    now: OffsetDateTime,
    RotateArgs {
        id,
        grace,
        reissue,
        expires_in,
        expires_at,
        no_expiry,
        secret_name: _,
        limits,
    }: &RotateArgs,
    secret_name: Option<&str>,
) -> Result<(), Failure> {
    let grace = match grace {
        Some(g) => {
            let d = crate::config::parse_duration(g).map_err(|e| usage(format!("--grace: {e}")))?;
            Some(time::Duration::try_from(d).map_err(|_| usage("--grace: too long"))?)
        }
        None => None,
    };
    let asked = if *no_expiry {
        Some(None)
    } else if expires_in.is_some() || expires_at.is_some() {
        Some(expiry(now, expires_in.as_deref(), expires_at.as_deref())?)
    } else {
        None
    };
    let key = keys::generate().map_err(|e| failure(format!("OS random source failed: {e}")))?;
    let (rec, text) = keyfile::update_audited(&t.keys_file, t.audit.as_ref(), |records| {
        let old = records
            .iter_mut()
            .find(|r| &r.id == id)
            .ok_or_else(|| format!("no key with id {id:?}"))?;
        let revoked = old.revoked_at.is_some();
        if revoked && !reissue {
            return Err(format!(
                "key {id} is revoked; use `keys rotate {id} --reissue` to issue a replacement"
            ));
        }
        let expires_at = match asked {
            Some(e) => e,
            None => inherited_expiry(old, now)?,
        };
        let terms = Terms {
            service_account: &old.service_account,
            scopes: &old.scopes,
            description: old.description.as_deref(),
            expires_at,
            limits: limits.apply(&old.limits).map_err(|f| f.message)?,
        };
        let fresh = terms.record(String::new(), keys::digest(key.as_bytes()), now);
        // A revoked entry is the record of a leak: it is never rewritten.
        if !revoked {
            retire(old, grace, now)?;
        }
        let fresh = KeyRecord {
            id: new_id(records).map_err(|f| f.message)?,
            ..fresh
        };
        records.push(fresh.clone());
        let entry = Entry {
            replaces: Some(id.clone()),
            ..t.entry(Action::Rotate, &fresh, now)
        };
        Ok(((fresh, keyfile::render(records)), entry))
    })?
    .map_err(failure)?;
    let secret = secret_name.map(|n| (n, text.as_str()));
    print_issued(out, &rec, &key, Some(id), secret);
    Ok(())
}

/// The expiry a rotated key gets when none is asked for: the old key's lifetime, counted from
/// now, so a key rotated shortly before it expires does not die with it.
fn inherited_expiry(
    old: &KeyRecord,
    now: OffsetDateTime,
) -> Result<Option<OffsetDateTime>, String> {
    let Some(expires_at) = old.expires_at else {
        return Ok(None);
    };
    if expires_at <= now {
        return Err(format!(
            "key {} expired at {}; give the new key --expires-in, --expires-at or --no-expiry",
            old.id,
            keys::format_time(expires_at)
        ));
    }
    let Some(created_at) = old.created_at.filter(|c| *c < expires_at) else {
        return Err(format!(
            "key {} has no creation time to take its lifetime from; give the new key \
             --expires-in, --expires-at or --no-expiry",
            old.id
        ));
    };
    now.checked_add(expires_at - created_at)
        .map(Some)
        .ok_or_else(|| "the old key's lifetime is too long to count from now".to_string())
}

/// Ends the old key: after the grace period (never later than it would have), or now.
fn retire(
    old: &mut KeyRecord,
    grace: Option<time::Duration>,
    now: OffsetDateTime,
) -> Result<(), String> {
    match grace {
        Some(g) => {
            let until = now.checked_add(g).ok_or("--grace: too long")?;
            old.expires_at = Some(old.expires_at.map_or(until, |e| e.min(until)));
        }
        None => {
            old.revoked_at.get_or_insert(now);
        }
    }
    Ok(())
}
