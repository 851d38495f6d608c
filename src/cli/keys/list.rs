//! `keys list` (and the JSON rows `import` prints): the key file's records with their status
//! and last-used time, as an aligned table or as JSON.

use time::OffsetDateTime;

use crate::keys::last_used as state;
use crate::keys::{self, KeyRecord};

/// The status `list` shows.
pub fn status(rec: &KeyRecord, now: OffsetDateTime) -> &'static str {
    if rec.revoked_at.is_some() {
        "revoked"
    } else if rec.expires_at.is_some_and(|t| t <= now) {
        "expired"
    } else {
        "active"
    }
}

fn last_used_text(st: &state::State, id: &str) -> Option<String> {
    state::last_used_secs(st, id)
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
        .map(keys::format_time)
}

/// `used / quota` and the period's end, for a key with a quota.
fn quota_text(
    st: &state::State,
    rec: &KeyRecord,
    now: OffsetDateTime,
) -> Option<(u64, String, String)> {
    let q = rec.limits.quota.as_ref()?;
    let now = now.unix_timestamp();
    let used = state::quota_used(st, &rec.id, q, now);
    let end = OffsetDateTime::from_unix_timestamp(q.period(now).1).ok()?;
    Some((used, q.to_string(), keys::format_time(end)))
}

pub(super) fn list_json(records: &[KeyRecord], st: &state::State, now: OffsetDateTime) -> String {
    let rows: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            let quota = quota_text(st, r, now);
            serde_json::json!({
                "id": r.id,
                "service_account": r.service_account,
                "scopes": r.scopes,
                "description": r.description,
                "created_at": r.created_at.map(keys::format_time),
                "expires_at": r.expires_at.map(keys::format_time),
                "revoked_at": r.revoked_at.map(keys::format_time),
                "last_used": last_used_text(st, &r.id),
                "status": status(r, now),
                "rate_limit": r.limits.rate.map(|l| l.to_string()),
                "burst": r.limits.rate.map(|l| l.burst),
                "quota": quota.as_ref().map(|q| &q.1),
                "quota_used": quota.as_ref().map(|q| q.0),
                "quota_period_end": quota.as_ref().map(|q| &q.2),
                "allowed_cidrs": r.limits.allowed_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".into())
}

pub(super) fn list_text(records: &[KeyRecord], st: &state::State, now: OffsetDateTime) -> String {
    let header = [
        "ID",
        "SERVICE ACCOUNT",
        "SCOPES",
        "CREATED",
        "EXPIRES",
        "LAST USED",
        "STATUS",
        "RATE LIMIT",
        "USED / QUOTA",
        "QUOTA RESETS",
    ];
    let mut rows: Vec<[String; 10]> = vec![header.map(String::from)];
    for r in records {
        let quota = quota_text(st, r, now);
        rows.push([
            r.id.clone(),
            r.service_account.clone(),
            r.scopes.join(","),
            r.created_at
                .map(keys::format_time)
                .unwrap_or_else(|| "-".into()),
            r.expires_at
                .map(keys::format_time)
                .unwrap_or_else(|| "never".into()),
            last_used_text(st, &r.id).unwrap_or_else(|| "never".into()),
            status(r, now).to_string(),
            r.limits.rate.map_or_else(|| "-".into(), |l| l.to_string()),
            quota
                .as_ref()
                .map_or_else(|| "-".into(), |(used, q, _)| format!("{used} / {q}")),
            quota.map_or_else(|| "-".into(), |q| q.2),
        ]);
    }
    let mut widths = [0usize; 10];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
