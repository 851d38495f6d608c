//! Which filesystem events wake reload: the folders to watch and the events that matter.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::Snapshot;

/// The files whose changes reload a snapshot.
fn watched_files<'a>(config_path: &'a Path, snapshot: &'a Snapshot) -> Vec<&'a Path> {
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
fn watch_dirs(config_path: &Path, snapshot: &Snapshot) -> BTreeSet<PathBuf> {
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

/// The folder watch: which folders are watched and which names in them matter, kept in step
/// with the snapshot (a reload may move the key file or certificates).
pub struct Watch {
    watcher: Option<notify::RecommendedWatcher>,
    names: Arc<ArcSwap<BTreeSet<std::ffi::OsString>>>,
    watched: BTreeSet<PathBuf>,
    config_path: PathBuf,
}

impl Watch {
    /// Starts watching; each relevant event leaves one pending reload in `tx`.
    pub fn start(config_path: PathBuf, tx: mpsc::Sender<()>) -> Watch {
        // Other files in the same folders (logs, state, editor swap files) must not cause
        // re-reads.
        let names: Arc<ArcSwap<BTreeSet<std::ffi::OsString>>> = Arc::default();
        let watcher_names = names.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(event) = res {
                if relevant(&event, &watcher_names.load()) {
                    // A full channel already holds a pending reload.
                    let _ = tx.try_send(());
                }
            }
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "file watching unavailable; relying on SIGHUP and periodic re-check");
                None
            }
        };
        Watch {
            watcher,
            names,
            watched: BTreeSet::new(),
            config_path,
        }
    }

    /// Watches the folders and names `snapshot`'s files live in, and stops watching others.
    pub fn follow(&mut self, snapshot: &Snapshot) {
        let Some(w) = self.watcher.as_mut() else {
            return;
        };
        self.names.store(Arc::new(
            watched_files(&self.config_path, snapshot)
                .into_iter()
                .filter_map(|p| p.file_name().map(ToOwned::to_owned))
                .collect(),
        ));
        let want = watch_dirs(&self.config_path, snapshot);
        for dir in self.watched.difference(&want) {
            let _ = w.unwatch(dir);
        }
        for dir in want.difference(&self.watched) {
            if let Err(e) = w.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch folder");
            }
        }
        self.watched = want;
    }
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
