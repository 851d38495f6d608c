//! `keys revoke`: ends a key now; the entry stays, as the record of it.

use time::OffsetDateTime;

use super::{failure, Failure, Output, Target};
use crate::keys::audit::Action;
use crate::keys::{self, file as keyfile};

/// `keys revoke`: sets `revoked_at` once; a second revoke keeps the first time.
pub(super) fn revoke(
    out: Output,
    t: &Target,
    id: &str,
    now: OffsetDateTime,
) -> Result<(), Failure> {
    let rec = keyfile::update_audited(&t.keys_file, t.audit.as_ref(), |records| {
        let rec = records
            .iter_mut()
            .find(|r| r.id == id)
            .ok_or_else(|| format!("no key with id {id:?}"))?;
        rec.revoked_at.get_or_insert(now);
        let entry = t.entry(Action::Revoke, rec, now);
        Ok((rec.clone(), entry))
    })?
    .map_err(failure)?;
    let at = rec.revoked_at.map(keys::format_time).unwrap_or_default();
    match out {
        Output::Text | Output::K8sSecret => println!("revoked {} at {at}", rec.id),
        Output::Json => println!(
            "{}",
            serde_json::json!({"id": rec.id, "status": "revoked", "revoked_at": at})
        ),
    }
    Ok(())
}
