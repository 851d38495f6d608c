//! The audit log (`audit_log:`): one JSON line per key change, appended under an exclusive
//! lock and fsynced before the key file is replaced, so a change is never made unrecorded.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{fchown, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{format_time, KeyRecord};
use crate::config::folder_of;

/// Where audit lines go, and who they name as the actor.
#[derive(Debug, Clone)]
pub struct AuditLog {
    /// The append-only JSON-lines file.
    pub path: PathBuf,
    /// Who ran the command (`--actor`, else `$USER`).
    pub actor: String,
}

/// A key change, as the audit log names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// `keys create`.
    Create,
    /// `keys revoke`.
    Revoke,
    /// `keys rotate` (the line names the new key; `replaces` the old one).
    Rotate,
    /// `keys import`.
    Import,
}

/// One line of the audit log. Hashes and secrets are never in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// When the command ran, RFC 3339 UTC.
    pub time: String,
    /// What it did.
    pub action: Action,
    /// The key's id (the new key's, for a rotation).
    pub id: String,
    /// The key's service account.
    pub service_account: String,
    /// The key's scopes.
    pub scopes: Vec<String>,
    /// The key's limits, as [`limits`] writes them.
    pub limits: serde_json::Map<String, serde_json::Value>,
    /// The key's expiry, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// When the key was revoked, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// The key a rotation replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
    /// Who ran the command.
    pub actor: String,
    /// `failed` on the line that follows one whose key file write then failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

impl Entry {
    /// The line for `action` on `rec`: every field of the record that the log keeps is read
    /// here and nowhere else.
    pub fn of(action: Action, rec: &KeyRecord, actor: &str, now: OffsetDateTime) -> Entry {
        Entry {
            time: format_time(now),
            action,
            id: rec.id.clone(),
            service_account: rec.service_account.clone(),
            scopes: rec.scopes.clone(),
            limits: limits(rec),
            expires_at: rec.expires_at.map(format_time),
            revoked_at: rec.revoked_at.map(format_time),
            replaces: None,
            actor: actor.to_string(),
            result: None,
        }
    }
}

/// A key's limits as the audit log records them, spelled as in the key file (`rate_limit`,
/// `burst`, `quota`, `allowed_cidrs`); a limit the key does not set is left out.
fn limits(rec: &KeyRecord) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::Value;
    let l = &rec.limits;
    let mut out = serde_json::Map::new();
    if let Some(rate) = &l.rate {
        out.insert("rate_limit".into(), Value::String(rate.to_string()));
        out.insert("burst".into(), Value::from(rate.burst));
    }
    if let Some(q) = &l.quota {
        out.insert("quota".into(), Value::String(q.to_string()));
    }
    if !l.allowed_cidrs.is_empty() {
        let cidrs = l.allowed_cidrs.iter().map(|n| Value::String(n.to_string()));
        out.insert("allowed_cidrs".into(), Value::Array(cidrs.collect()));
    }
    out
}

impl AuditLog {
    /// Appends `entry` as one line: exclusive lock, one write, fsync (and the folder's, when
    /// the file is new). An error here must stop the key change it records.
    pub fn append(&self, entry: &Entry, owner_of: &Path) -> std::io::Result<()> {
        let mut line = serde_json::to_string(entry).map_err(std::io::Error::other)?;
        line.push('\n');
        let existed = self.path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        if !existed {
            same_owner(&file, owner_of);
        }
        file.lock()?;
        // A line torn by a crash mid-write must not swallow the next one.
        let len = file.metadata()?.len();
        let mut last = [0u8; 1];
        if len > 0 && file.read_exact_at(&mut last, len - 1).is_ok() && last[0] != b'\n' {
            line.insert(0, '\n');
        }
        file.write_all(line.as_bytes())?;
        file.sync_data()?;
        if !existed {
            File::open(folder_of(&self.path))?.sync_all()?;
        }
        Ok(())
    }
}

/// A new audit log created by root gets the key file's owner, so its owner can keep writing.
fn same_owner(file: &File, key_file: &Path) {
    if let (Ok(k), Ok(a)) = (std::fs::metadata(key_file), file.metadata()) {
        if (k.uid(), k.gid()) != (a.uid(), a.gid()) {
            let _ = fchown(file, Some(k.uid()), Some(k.gid()));
        }
    }
}

/// Reads the audit log: entries in order, and the 1-based numbers of lines that are not
/// entries. A missing file has no entries.
pub fn read(path: &Path) -> std::io::Result<(Vec<Entry>, Vec<usize>)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(e),
    };
    let mut entries = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Entry>(line) {
            Ok(e) => entries.push(e),
            Err(_) => bad.push(i + 1),
        }
    }
    Ok((entries, bad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest;

    #[test]
    fn lines_round_trip_and_a_torn_line_does_not_eat_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog {
            path: dir.path().join("audit.jsonl"),
            actor: "alice".into(),
        };
        let rec = KeyRecord {
            id: "k1".into(),
            hash: digest(b"secret"),
            service_account: "sa".into(),
            scopes: vec!["a.b".into()],
            description: None,
            created_at: None,
            expires_at: None,
            revoked_at: None,
            limits: crate::keys::limit::Limits::default(),
        };
        let e = Entry::of(Action::Create, &rec, &log.actor, OffsetDateTime::UNIX_EPOCH);
        log.append(&e, &dir.path().join("keys.yaml")).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log.path)
            .unwrap()
            .write_all(b"{\"torn")
            .unwrap();
        log.append(&e, &dir.path().join("keys.yaml")).unwrap();
        let (entries, bad) = read(&log.path).unwrap();
        assert_eq!(entries, vec![e.clone(), e]);
        assert_eq!(bad, vec![2]);
        let text = std::fs::read_to_string(&log.path).unwrap();
        assert!(!text.contains(&hex::encode(rec.hash)), "{text}");
    }
}
