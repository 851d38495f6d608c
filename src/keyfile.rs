//! Writing key files safely: render records as YAML, write atomically (temp file in the same
//! folder, fsync, rename, mode 0600), and serialize writers with an advisory lock.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::Problems;
use crate::keys::{self, KeyRecord};

/// Why a key file could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The current file is invalid; nothing was written.
    #[error("{0}")]
    Invalid(Problems),
    /// Reading, locking or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically with mode 0600: readers see the old or the new file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".keygate-")
        .suffix(".tmp")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // The rename is durable only once the folder is synced.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Plain YAML scalars are written bare; anything a YAML reader might reinterpret is quoted.
fn scalar(s: &str) -> String {
    let plain = s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n"
        );
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
    }
}

/// Renders records in the key file format.
pub fn render(records: &[KeyRecord]) -> String {
    let mut out = String::with_capacity(64 + records.len() * 256);
    out.push_str("# keygate key file: hashes only, written by `keygate keys`.\n");
    if records.is_empty() {
        out.push_str("keys: []\n");
        return out;
    }
    out.push_str("keys:\n");
    for r in records {
        out.push_str(&format!("  - id: {}\n", scalar(&r.id)));
        out.push_str(&format!("    hash: sha256:{}\n", hex::encode(r.hash)));
        out.push_str(&format!(
            "    service_account: {}\n",
            scalar(&r.service_account)
        ));
        let scopes: Vec<String> = r.scopes.iter().map(|s| scalar(s)).collect();
        out.push_str(&format!("    scopes: [{}]\n", scopes.join(", ")));
        if let Some(d) = &r.description {
            out.push_str(&format!(
                "    description: {}\n",
                serde_json::to_string(d).unwrap_or_default()
            ));
        }
        for (name, t) in [
            ("created_at", r.created_at),
            ("expires_at", r.expires_at),
            ("revoked_at", r.revoked_at),
        ] {
            if let Some(t) = t {
                out.push_str(&format!("    {name}: {}\n", keys::format_time(t)));
            }
        }
    }
    out
}

/// Reads the key file; a missing file is an empty key list.
pub fn read(path: &Path) -> Result<Vec<KeyRecord>, KeyFileError> {
    match std::fs::read_to_string(path) {
        Ok(text) => keys::parse_key_file(path, &text).map_err(KeyFileError::Invalid),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Runs `edit` on the current records under an exclusive lock and writes the result.
///
/// The lock is on a sidecar `.lock` file because the key file itself is replaced by rename.
pub fn update<T>(
    path: &Path,
    edit: impl FnOnce(&mut Vec<KeyRecord>) -> Result<T, String>,
) -> Result<Result<T, String>, KeyFileError> {
    let mut lock_name = path.file_name().unwrap_or_default().to_os_string();
    lock_name.push(".lock");
    let lock_path = path.with_file_name(lock_name);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    let mut records = read(path)?;
    let outcome = edit(&mut records);
    if outcome.is_ok() {
        write_atomic(path, render(&records).as_bytes()).map_err(io_err(path))?;
    }
    drop(lock);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{digest, parse_key_file, parse_time};

    #[test]
    fn render_round_trips() {
        let rec = KeyRecord {
            id: "k1".into(),
            hash: digest(b"secret"),
            service_account: "sa:odd#name".into(),
            scopes: vec!["*".into(), "yc.ydb.*".into(), "true".into()],
            description: Some("nightly \"mailer\"\nline two".into()),
            created_at: Some(parse_time("2026-11-29T12:00:00Z").unwrap()),
            expires_at: Some(parse_time("2027-11-29T00:00:00+03:00").unwrap()),
            revoked_at: None,
        };
        let text = render(std::slice::from_ref(&rec));
        let back = parse_key_file(Path::new("k"), &text).unwrap();
        assert_eq!(back, vec![rec]);
        assert_eq!(
            parse_key_file(Path::new("k"), &render(&[])).unwrap(),
            vec![]
        );
    }
}
