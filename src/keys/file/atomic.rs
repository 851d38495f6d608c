//! Atomic replacement of a file: temp file in the real file's folder, fsync, rename, folder
//! fsync; owner, group and mode kept (0600 for new files); a symlink is written through.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{fchown, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::folder_of;

/// A rewrite that would lock the file's previous owner out of it.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to replace the file: it belongs to uid {owner} (mode {mode:o}), this user (uid {writer}) \
     cannot hand the new file to that owner, and it could no longer read it; run this as uid {owner} or as root"
)]
struct LockoutError {
    /// Owner of the existing file.
    owner: u32,
    /// The user whose new file it would be.
    writer: u32,
    /// Permission bits of the existing file.
    mode: u32,
}

/// Follows symlinks to the file that really gets replaced, so the link itself survives and the
/// temp file lands in the target's folder (a rename cannot cross file systems). A dangling
/// link resolves to where its target would be.
pub(super) fn resolve(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    // The kernel's own limit on link chains; a loop ends in an error on open anyway.
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(&p) {
                Ok(target) => p = folder_of(&p).join(target),
                Err(_) => break,
            },
            _ => break,
        }
    }
    p
}

/// Whether the previous owner can still read a file that ends up owned by `new_uid` with
/// `mode`. Group membership is not known without NSS, so the group bits do not count.
fn owner_can_read(prev_uid: u32, new_uid: u32, mode: u32) -> bool {
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
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let target = resolve(path);
    let dir = folder_of(&target);
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

#[cfg(test)]
mod tests {
    use super::*;

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
