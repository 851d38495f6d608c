//! Writing key files safely: render records as YAML, write atomically (temp file in the real
//! file's folder, fsync, rename; owner, group and mode kept, 0600 for new files), and serialize
//! writers with an advisory lock.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{fchown, MetadataExt, OpenOptionsExt, PermissionsExt};
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

/// A rewrite that would lock the file's previous owner out of it.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to replace the file: it belongs to uid {owner} (mode {mode:o}), this user (uid {writer}) \
     cannot hand the new file to that owner, and it could no longer read it; run this as uid {owner} or as root"
)]
pub struct LockoutError {
    /// Owner of the existing file.
    pub owner: u32,
    /// The user whose new file it would be.
    pub writer: u32,
    /// Permission bits of the existing file.
    pub mode: u32,
}

/// Follows symlinks to the file that really gets replaced, so the link itself survives and the
/// temp file lands in the target's folder (a rename cannot cross file systems). A dangling
/// link resolves to where its target would be.
pub fn resolve(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    // The kernel's own limit on link chains; a loop ends in an error on open anyway.
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(&p) {
                Ok(target) => p = folder(&p).join(target),
                Err(_) => break,
            },
            _ => break,
        }
    }
    p
}

fn folder(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Whether the previous owner can still read a file that ends up owned by `new_uid` with
/// `mode`. Group membership is not known without NSS, so the group bits do not count.
pub fn owner_can_read(prev_uid: u32, new_uid: u32, mode: u32) -> bool {
    prev_uid == 0 || (new_uid == prev_uid && mode & 0o400 != 0) || mode & 0o004 != 0
}

/// Gives the temp file the existing file's owner, group and mode, or refuses when the
/// previous owner would lose read access to the result.
fn inherit(tmp: &File, old: &std::fs::Metadata) -> std::io::Result<()> {
    let mode = old.mode() & 0o7777;
    let owned = match fchown(tmp, Some(old.uid()), Some(old.gid())) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            // Not root: keep at least the group when this user belongs to it.
            let _ = fchown(tmp, None, Some(old.gid()));
            false
        }
        Err(e) => return Err(e),
    };
    if !owned {
        let writer = tmp.metadata()?.uid();
        if !owner_can_read(old.uid(), writer, mode) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                LockoutError {
                    owner: old.uid(),
                    writer,
                    mode,
                },
            ));
        }
        tracing::warn!(
            owner = old.uid(),
            new_owner = writer,
            "the replaced file now belongs to this user"
        );
    }
    // After the chown, which clears set-id bits.
    tmp.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// Writes `bytes` to `path` atomically: readers see the old or the new file. The new file keeps
/// the old one's owner, group and mode (new files get 0600); a symlink is written through.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let target = resolve(path);
    let dir = folder(&target);
    let old = match std::fs::metadata(&target) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".keygate-")
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    if let Some(old) = &old {
        inherit(tmp.as_file(), old)?;
    }
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(&target).map_err(|e| e.error)?;
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
    // Beside the real file, so writers through a symlink and through its target share one lock.
    let target = resolve(path);
    let mut lock_name = target.file_name().unwrap_or_default().to_os_string();
    lock_name.push(".lock");
    let lock_path = target.with_file_name(lock_name);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    // A lock file created by root must not shut the key file's owner out of later edits.
    if let (Ok(k), Ok(l)) = (std::fs::metadata(&target), lock.metadata()) {
        if (k.uid(), k.gid()) != (l.uid(), l.gid()) {
            let _ = fchown(&lock, Some(k.uid()), Some(k.gid()));
        }
    }
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

    #[test]
    fn previous_owner_must_keep_read_access() {
        // Root reads anything; the owner needs the owner bit; others' bit covers everyone.
        assert!(owner_can_read(0, 1000, 0o600));
        assert!(owner_can_read(1000, 1000, 0o600));
        assert!(!owner_can_read(1000, 1000, 0o200));
        assert!(!owner_can_read(1000, 2000, 0o640));
        assert!(owner_can_read(1000, 2000, 0o644));
    }

    #[test]
    fn resolve_follows_relative_and_dangling_links() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("real")).unwrap();
        std::os::unix::fs::symlink("real/keys.yaml", d.join("keys.yaml")).unwrap();
        std::os::unix::fs::symlink("keys.yaml", d.join("alias.yaml")).unwrap();
        assert_eq!(resolve(&d.join("alias.yaml")), d.join("real/keys.yaml"));
        assert_eq!(resolve(&d.join("plain.yaml")), d.join("plain.yaml"));
    }
}
