//! Which filesystem events wake reload: the folders to watch and the events that matter.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::Snapshot;

/// The files whose changes reload a snapshot.
pub fn watched_files<'a>(config_path: &'a Path, snapshot: &'a Snapshot) -> Vec<&'a Path> {
    let c = &snapshot.config;
    let tls = c
        .tls
        .iter()
        .flat_map(|t| [t.cert.as_path(), t.key.as_path()]);
    [config_path, c.keys_file.as_path()]
        .into_iter()
        .chain(tls)
        .collect()
}

/// The folders holding them: watching a folder sees renames and symlink swaps.
pub fn watch_dirs(config_path: &Path, snapshot: &Snapshot) -> BTreeSet<PathBuf> {
    watched_files(config_path, snapshot)
        .into_iter()
        .map(|p| crate::config::folder_of(p).to_path_buf())
        .collect()
}

/// Names whose changes matter: the watched files themselves, and Kubernetes' `..data` and
/// timestamped `..2026_...` entries (the symlink swap shows up only as those). Opening or
/// reading is no change, and reload's own reads would otherwise wake it again and again.
pub fn relevant(event: &notify::Event, names: &BTreeSet<std::ffi::OsString>) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    if let EventKind::Access(a) = event.kind {
        if a != AccessKind::Close(AccessMode::Write) {
            return false;
        }
    }
    event.paths.iter().any(|p| {
        p.file_name()
            .is_some_and(|n| names.contains(n) || n.as_encoded_bytes().starts_with(b".."))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind};

    #[test]
    fn reads_do_not_wake_reload_but_writes_do() {
        let names: BTreeSet<std::ffi::OsString> = [std::ffi::OsString::from("keys.yaml")].into();
        let on = |kind| notify::Event::new(kind).add_path(PathBuf::from("/d/keys.yaml"));
        let open = EventKind::Access(AccessKind::Open(AccessMode::Any));
        let read_done = EventKind::Access(AccessKind::Close(AccessMode::Read));
        let written = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(!relevant(&on(open), &names));
        assert!(!relevant(&on(read_done), &names));
        assert!(relevant(&on(written), &names));
        assert!(relevant(&on(EventKind::Create(CreateKind::File)), &names));
        let other = notify::Event::new(EventKind::Create(CreateKind::File))
            .add_path(PathBuf::from("/d/state.json"));
        assert!(!relevant(&other, &names));
    }
}
