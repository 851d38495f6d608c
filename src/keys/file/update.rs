//! Changing the key file: an exclusive lock on a sidecar `.lock` file serializes writers;
//! the change's audit line is written before the file is replaced (`atomic.rs`).

use std::fs::OpenOptions;
use std::os::unix::fs::{fchown, MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::{atomic, io_err, read, render, write_atomic, KeyFileError};
use crate::keys::audit::{AuditLog, Entry};
use crate::keys::KeyRecord;

/// Runs `edit` on the current records under an exclusive lock and writes the result. The
/// change's audit line (when a log is kept) is appended and fsynced first: a failed audit
/// write leaves the key file as it was. Should the replacement then fail, a second line with
/// `result: failed` says the change was not made.
pub(crate) fn update_audited<T>(
    path: &Path,
    audit: Option<&AuditLog>,
    edit: impl FnOnce(&mut Vec<KeyRecord>) -> Result<(T, Entry), String>,
) -> Result<Result<T, String>, KeyFileError> {
    let lock = lock(path)?;
    let mut records = read(path)?;
    let (value, entry) = match edit(&mut records) {
        Ok(done) => done,
        Err(e) => return Ok(Err(e)),
    };
    if let Some(log) = audit {
        log.append(&entry, path)
            .map_err(|source| KeyFileError::Audit {
                path: log.path.clone(),
                source,
            })?;
    }
    if let Err(e) = write_atomic(path, render(&records).as_bytes()) {
        if let Some(log) = audit {
            let failed = Entry {
                result: Some("failed".into()),
                ..entry
            };
            let _ = log.append(&failed, path);
        }
        return Err(io_err(path)(e));
    }
    drop(lock);
    Ok(Ok(value))
}

/// Takes the exclusive writer lock for the key file at `path`.
///
/// The lock is on a sidecar `.lock` file because the key file itself is replaced by rename.
fn lock(path: &Path) -> Result<std::fs::File, KeyFileError> {
    // Beside the real file, so writers through a symlink and through its target share one lock.
    let target = atomic::resolve(path);
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
    Ok(lock)
}
