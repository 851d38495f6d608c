//! Reading files only once they have stopped changing: a file rewritten in place (truncated,
//! then written in pieces) must never be taken half-written.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::config::{Problem, Problems};

/// How long a file must stay identical before it is taken.
pub const QUIET: Duration = Duration::from_millis(300);

/// What stat says about a file; a rename, a write or a truncate changes at least one field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }
}

/// One look at a file: its stamp, bytes and hash, or why it could not be read.
#[derive(Debug)]
pub struct Look {
    stamp: Option<Stamp>,
    /// The bytes and their SHA-256, or the problem reading them.
    pub content: Result<(Vec<u8>, [u8; 32]), Problems>,
}

/// Two looks agree when stamp and hash (or the error) are the same; bytes are not compared
/// twice since the hash covers them.
impl PartialEq for Look {
    fn eq(&self, other: &Look) -> bool {
        self.stamp == other.stamp
            && match (&self.content, &other.content) {
                (Ok((_, a)), Ok((_, b))) => a == b,
                (Err(a), Err(b)) => a.to_string() == b.to_string(),
                _ => false,
            }
    }
}

impl Look {
    /// Reads `path` once; `what` names the file in problems.
    pub fn take(path: &Path, what: &str) -> Look {
        Look::read(path, what, true)
    }

    /// Stamp and hash alone, hashed a block at a time: for a file parsed straight from disk,
    /// whose bytes would otherwise sit beside the old and the new store at the peak.
    pub fn glance(path: &Path, what: &str) -> Look {
        Look::read(path, what, false)
    }

    fn read(path: &Path, what: &str, keep: bool) -> Look {
        let problem = |m: String| Problems(vec![Problem::whole(path, m)]);
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) => {
                return Look {
                    stamp: None,
                    content: Err(problem(format!("cannot read {what}: {e}"))),
                }
            }
        };
        let stamp = Some(Stamp::of(&meta));
        if meta.is_dir() {
            return Look {
                stamp,
                content: Err(problem(format!("cannot read {what}: it is a directory"))),
            };
        }
        let content = if keep {
            std::fs::read(path).map(|bytes| {
                let hash: [u8; 32] = Sha256::digest(&bytes).into();
                (bytes, hash)
            })
        } else {
            hash_file(path).map(|hash| (Vec::new(), hash))
        };
        let content = content.map_err(|e| problem(format!("cannot read {what}: {e}")));
        Look { stamp, content }
    }

    /// The content hash, when the file could be read.
    pub fn hash(&self) -> Option<[u8; 32]> {
        self.content.as_ref().ok().map(|(_, h)| *h)
    }

    /// Whether `path` still has this look's stamp: the last check before a swap.
    pub fn unmoved(&self, path: &Path) -> bool {
        std::fs::metadata(path).ok().map(|m| Stamp::of(&m)) == self.stamp
    }
}

/// A look that can let go of its bytes once only its stamp and hash are needed: a large key
/// file is then held once during the quiet period, not twice.
pub trait Shed {
    /// Drops the content bytes, keeping what equality compares.
    fn shed(&mut self);
}

impl Shed for Look {
    fn shed(&mut self) {
        if let Ok((bytes, _)) = &mut self.content {
            *bytes = Vec::new();
        }
    }
}

impl Shed for (Look, Look) {
    fn shed(&mut self) {
        self.0.shed();
        self.1.shed();
    }
}

fn hash_file(path: &Path) -> std::io::Result<[u8; 32]> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut block) {
            Ok(0) => return Ok(hasher.finalize().into()),
            Ok(n) => hasher.update(&block[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Outcome of one attempt to read something that must have stopped changing.
#[derive(Debug)]
pub enum Settled<T> {
    /// Same as what is already applied: nothing to do, no wait spent.
    Unchanged,
    /// Changed during the quiet period; look again.
    Changing,
    /// Identical across the quiet period.
    Ready(T),
}

/// Looks, returns at once if `applied` says the look is what already serves, else waits
/// `quiet` and looks again. One quiet period per call, so a caller can stop between calls.
pub fn settle<T: PartialEq + Shed>(
    look: impl Fn() -> T,
    applied: impl Fn(&T) -> bool,
    quiet: Duration,
) -> Settled<T> {
    settle_while(look, applied, quiet, |_| ()).map(|(t, ())| t)
}

impl<T> Settled<T> {
    /// The ready value mapped; the other outcomes as they are.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Settled<U> {
        match self {
            Settled::Unchanged => Settled::Unchanged,
            Settled::Changing => Settled::Changing,
            Settled::Ready(t) => Settled::Ready(f(t)),
        }
    }
}

/// [`settle`], with `work` done on the first look while the quiet period runs instead of after
/// it, so a slow parse does not add to the wait; the caller checks that the work saw the bytes
/// the second look hashed.
pub fn settle_while<T: PartialEq + Shed, W>(
    look: impl Fn() -> T,
    applied: impl Fn(&T) -> bool,
    quiet: Duration,
    work: impl FnOnce(&T) -> W,
) -> Settled<(T, W)> {
    let mut first = look();
    let started = std::time::Instant::now();
    if applied(&first) {
        return Settled::Unchanged;
    }
    first.shed();
    let done = work(&first);
    std::thread::sleep(quiet.saturating_sub(started.elapsed()));
    let second = look();
    if second == first {
        Settled::Ready((second, done))
    } else {
        Settled::Changing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_growing_during_the_quiet_period_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "a").unwrap();
        let writer = {
            let p = p.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                std::fs::write(&p, "ab").unwrap();
            })
        };
        let got = settle(
            || Look::take(&p, "f"),
            |_| false,
            Duration::from_millis(200),
        );
        writer.join().unwrap();
        assert!(matches!(got, Settled::Changing), "{got:?}");
        let got = settle(|| Look::take(&p, "f"), |_| false, Duration::from_millis(20));
        let Settled::Ready(look) = got else {
            panic!("{got:?}")
        };
        assert_eq!(look.content.as_ref().unwrap().0, b"ab");
        assert!(look.unmoved(&p));
        let known = look.hash();
        assert!(matches!(
            settle(|| Look::take(&p, "f"), |l| l.hash() == known, QUIET),
            Settled::Unchanged
        ));
    }

    #[test]
    fn work_done_in_the_quiet_period_is_kept_only_if_the_file_held_still() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "a").unwrap();
        let quiet = Duration::from_millis(200);
        let t = std::time::Instant::now();
        let got = settle_while(
            || Look::glance(&p, "f"),
            |_| false,
            quiet,
            |_| std::fs::read(&p).unwrap(),
        );
        let Settled::Ready((look, read)) = got else {
            panic!("{got:?}")
        };
        assert!(
            t.elapsed() >= quiet,
            "the quiet period is waited out in full"
        );
        assert_eq!(read, b"a");
        // A glance hashes the file without keeping its bytes.
        assert_eq!(look.content.as_ref().unwrap().0, b"");
        assert_eq!(look.hash(), Look::take(&p, "f").hash());
        let got = settle_while(
            || Look::glance(&p, "f"),
            |_| false,
            quiet,
            |_| std::fs::write(&p, "ab").unwrap(),
        );
        assert!(matches!(got, Settled::Changing), "{got:?}");
    }

    #[test]
    fn a_missing_file_settles_as_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gone");
        let got = settle(|| Look::take(&p, "f"), |_| false, Duration::from_millis(1));
        assert!(matches!(
            got,
            Settled::Ready(Look {
                content: Err(_),
                ..
            })
        ));
    }
}
