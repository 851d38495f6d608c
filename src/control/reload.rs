//! Snapshots and hot reload: watch the config and key files, parse and validate off the
//! request path, swap the snapshot atomically. A bad file keeps the last good snapshot.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::config::{Config, Problem, Problems};
use crate::control::snapshot::Snapshot;
use crate::keys::KeyStore;
use crate::ops::metrics::{Metrics, ReloadStats, RouteStats};
use crate::wire::tls::CertResolver;

mod complaint;
mod settle;
mod thread;
mod watch;
use complaint::{Complaints, File};
use settle::{settle, settle_while, Look, Settled};
pub use thread::ReloadThread;
use watch::Watch;

/// Content hashes of the files a snapshot came from: an unchanged file swaps nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprints {
    config: [u8; 32],
    keys: [u8; 32],
    keys_path: PathBuf,
    tls: [u8; 32],
}

/// What reload needs besides the files.
pub struct Reloader {
    /// The snapshot the request path reads.
    pub current: Arc<ArcSwap<Snapshot>>,
    /// The config file.
    pub config_path: PathBuf,
    /// Outcome counters.
    pub stats: Arc<ReloadStats>,
    /// Registry for new routes' metric handles.
    pub metrics: Arc<Metrics>,
    /// The listener's certificate, when TLS is on.
    pub tls: Option<Arc<CertResolver>>,
}

/// Builds the per-config parts of a snapshot. Upstream clients are built by each worker
/// from the config (`proxy::forward::local`); validation already checked what they need.
fn config_parts(config: &Config, metrics: &Metrics) -> Result<Arc<Vec<RouteStats>>, Problems> {
    Ok(Arc::new(
        metrics.for_routes(config.routes.iter().map(|r| &*r.name)),
    ))
}

/// Hash of the TLS certificate and key files together.
fn tls_fingerprint(config: &Config) -> [u8; 32] {
    let Some(t) = &config.tls else { return [0; 32] };
    tls_hash(&(
        Look::take(&t.cert, "certificate"),
        Look::take(&t.key, "certificate key"),
    ))
}

fn tls_hash((cert, key): &(Look, Look)) -> [u8; 32] {
    let mut h = Sha256::new();
    for l in [cert, key] {
        if let Ok((bytes, _)) = &l.content {
            h.update(bytes);
        }
        h.update([0xff]);
    }
    h.finalize().into()
}

/// How often files are re-hashed even without a change notification.
pub const RECHECK_EVERY: Duration = Duration::from_secs(30);
/// Quiet time after an event before reading, so a burst of events reads once.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// How long a file may keep changing before the wait for it is logged.
const STILL_CHANGING: Duration = Duration::from_secs(10);

fn read(path: &Path, what: &str) -> Result<(String, [u8; 32]), Problems> {
    let (bytes, hash) = Look::take(path, what).content?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Problems(vec![Problem::whole(path, format!("{what} is not UTF-8"))]))?;
    Ok((text, hash))
}

/// Opens the key file for a line-by-line read, with the problems [`Look::take`] would give.
fn open_key_file(path: &Path) -> Result<std::fs::File, Problems> {
    let problem = |m: String| Problems(vec![Problem::whole(path, m)]);
    let file =
        std::fs::File::open(path).map_err(|e| problem(format!("cannot read key file: {e}")))?;
    match file.metadata() {
        Ok(m) if m.is_dir() => Err(problem("cannot read key file: it is a directory".into())),
        _ => Ok(file),
    }
}

/// Loads config and key file for the first time; any problem is fatal here.
pub fn load(config_path: &Path, metrics: &Metrics) -> Result<(Snapshot, Fingerprints), Problems> {
    let (text, config_hash) = read(config_path, "config")?;
    let config = Config::parse(config_path, &text)?;
    config.log_warnings();
    let file = open_key_file(&config.keys_file).map_err(|p| config.locate_key_file_problems(p))?;
    let (store, keys_hash) = KeyStore::parse_file(&config.keys_file, file, None)?;
    warn_if_exposed(&config.keys_file);
    let route_stats = config_parts(&config, metrics)?;
    let fp = Fingerprints {
        config: config_hash,
        keys: keys_hash,
        keys_path: config.keys_file.clone(),
        tls: tls_fingerprint(&config),
    };
    Ok((
        Snapshot::new(Arc::new(config), Arc::new(store), route_stats, None),
        fp,
    ))
}

/// One reload pass: re-reads whatever changed and swaps if it is valid. A file is taken only
/// once it has stayed identical for [`settle::QUIET`]; returns false when something was still
/// changing, and the caller runs another pass. Rejections are logged through `said`.
pub fn reload_once(
    r: &Reloader,
    fp: &mut Fingerprints,
    said: &mut Complaints,
    eager: bool,
) -> bool {
    let old = r.current.load_full();
    let mut settled = true;
    let mut changed = false;
    let (config, parts) = match reload_config(r, fp, &old.config, said) {
        Settled::Ready(new) => {
            changed = true;
            (new.0, new.1)
        }
        other => {
            settled &= !matches!(other, Settled::Changing);
            (old.config.clone(), old.route_stats.clone())
        }
    };
    let keys = match reload_keys(r, fp, &config, &old.keys, said, eager) {
        Settled::Ready(k) => {
            changed = true;
            k
        }
        other => {
            settled &= !matches!(other, Settled::Changing);
            old.keys.clone()
        }
    };
    settled &= reload_tls(r, fp, &config, said);
    if changed {
        r.current
            .store(Arc::new(Snapshot::new(config, keys, parts, Some(&old))));
        release(old);
        // Parsing a large key file leaves this thread's heap holding its scratch; return it.
        crate::ops::trim::collect_now();
    }
    settled
}

/// How long a reload waits for requests still on the old snapshot before leaving its freeing
/// to the last of them; they hold it only until their response head.
const RELEASE_WAIT: Duration = Duration::from_millis(250);

/// Drops the old snapshot here once requests let go of it: freeing 100,000 keys is a few ms a
/// worker's requests would wait out, and the pages go back from this thread's heap.
fn release(old: Arc<Snapshot>) {
    let started = std::time::Instant::now();
    while Arc::strong_count(&old) > 1 && started.elapsed() < RELEASE_WAIT {
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(old);
}

type ConfigParts = (Arc<Config>, Arc<Vec<RouteStats>>);

/// The config file, once settled and valid; `Unchanged` also covers a rejected file.
fn reload_config(
    r: &Reloader,
    fp: &mut Fingerprints,
    config: &Config,
    said: &mut Complaints,
) -> Settled<ConfigParts> {
    let (path, stats) = (r.config_path.as_path(), &r.stats);
    let look = match settle(
        || Look::take(path, "config"),
        |l| l.hash() == Some(fp.config),
        settle::QUIET,
    ) {
        Settled::Ready(look) => look,
        Settled::Unchanged => return Settled::Unchanged,
        Settled::Changing => return Settled::Changing,
    };
    let parsed = look
        .content
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|(bytes, _)| {
            let text = std::str::from_utf8(bytes)
                .map_err(|_| Problems(vec![Problem::whole(path, "config is not UTF-8")]))?;
            Config::parse(path, text).and_then(|c| config_parts(&c, &r.metrics).map(|p| (c, p)))
        });
    if !look.unmoved(path) {
        return Settled::Changing;
    }
    // A failed read remembers nothing, so the same file coming back is re-read.
    fp.config = look.hash().unwrap_or_default();
    match parsed {
        Ok((new, parts)) => {
            warn_restart_only(config, &new);
            new.log_warnings();
            said.accepted(File::Config, path);
            tracing::info!(file = %path.display(), routes = new.routes.len(), "config reloaded");
            stats.config_ok.fetch_add(1, Ordering::Relaxed);
            Settled::Ready((Arc::new(new), parts))
        }
        Err(problems) => {
            said.rejected(File::Config, rejected_lines(&problems));
            stats.config_err.fetch_add(1, Ordering::Relaxed);
            Settled::Unchanged
        }
    }
}

/// Settings read only at startup: a change is named so nobody waits for it to apply.
fn warn_restart_only(old: &Config, new: &Config) {
    if new.tls.is_some() != old.tls.is_some() {
        tracing::warn!("turning TLS on or off takes effect only after a restart");
    }
    if new.listen != old.listen {
        tracing::warn!(
            old = %old.listen, new = %new.listen,
            "listen address changed; the new address takes effect only after a restart"
        );
    }
    if new.limits.max_connections != old.limits.max_connections {
        tracing::warn!(
            setting = "limits.max_connections",
            old = old.limits.max_connections,
            new = new.limits.max_connections,
            "limits.max_connections changed; the new value takes effect only after a restart"
        );
    }
    if new.admin_listen != old.admin_listen {
        let show =
            |a: Option<std::net::SocketAddr>| a.map_or("none".to_string(), |a| a.to_string());
        tracing::warn!(
            setting = "admin_listen",
            old = %show(old.admin_listen),
            new = %show(new.admin_listen),
            "admin_listen changed; the new address takes effect only after a restart"
        );
    }
}

/// The key file named by `config`, once settled and valid.
fn reload_keys(
    r: &Reloader,
    fp: &mut Fingerprints,
    config: &Config,
    old: &Arc<KeyStore>,
    said: &mut Complaints,
    eager: bool,
) -> Settled<Arc<KeyStore>> {
    let (path, stats) = (config.keys_file.as_path(), &r.stats);
    let same_file = *path == fp.keys_path;
    let glance = || Look::glance(path, "key file");
    let applied = |l: &Look| same_file && l.hash() == Some(fp.keys);
    // The file is parsed line by line from disk, so its text is never held beside the old and
    // the new store; the parse must hash the same as the settled look.
    let parse = |l: &Look| {
        l.content.as_ref().map_err(Clone::clone).and_then(|_| {
            let file = open_key_file(path)?;
            KeyStore::parse_file(path, file, Some(old))
        })
    };
    // The first pass after a change parses during the quiet period, so a large file is seen
    // a parse sooner; while a file keeps changing, later passes parse only once it settled.
    let settled = if eager {
        settle_while(glance, applied, settle::QUIET, parse)
    } else {
        settle(glance, applied, settle::QUIET).map(|look| {
            let parsed = parse(&look);
            (look, parsed)
        })
    };
    let (look, parsed) = match settled {
        Settled::Ready(both) => both,
        Settled::Unchanged => return Settled::Unchanged,
        Settled::Changing => return Settled::Changing,
    };
    let read_settled = match &parsed {
        Ok((_, hash)) => look.hash() == Some(*hash),
        Err(_) => true,
    };
    if !read_settled || !look.unmoved(path) {
        return Settled::Changing;
    }
    let parsed = parsed.map(|(store, _)| store);
    fp.keys = look.hash().unwrap_or_default();
    match parsed {
        Ok(store) => {
            let keys = Arc::new(store);
            said.accepted(File::Keys, path);
            tracing::info!(file = %path.display(), keys = keys.len(), "key file reloaded");
            fp.keys_path = path.to_path_buf();
            stats.keys_ok.fetch_add(1, Ordering::Relaxed);
            Settled::Ready(keys)
        }
        Err(problems) => {
            said.rejected(File::Keys, rejected_lines(&problems));
            stats.keys_err.fetch_add(1, Ordering::Relaxed);
            Settled::Unchanged
        }
    }
}

/// The listener's certificate and key, once both files have settled; false while changing.
fn reload_tls(r: &Reloader, fp: &mut Fingerprints, config: &Config, said: &mut Complaints) -> bool {
    let (Some(resolver), Some(files)) = (&r.tls, &config.tls) else {
        return true;
    };
    let look = || {
        (
            Look::take(&files.cert, "certificate"),
            Look::take(&files.key, "certificate key"),
        )
    };
    let (cert, key) = match settle(look, |l| tls_hash(l) == fp.tls, settle::QUIET) {
        Settled::Ready(l) => l,
        Settled::Unchanged => return true,
        Settled::Changing => return false,
    };
    let loaded = crate::wire::tls::load_pair(&files.cert, &files.key);
    if !cert.unmoved(&files.cert) || !key.unmoved(&files.key) {
        return false;
    }
    fp.tls = tls_hash(&(cert, key));
    match loaded {
        Ok(pair) => {
            resolver.swap(pair);
            said.accepted(File::Tls, &files.cert);
            tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
            r.stats.tls_ok.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            // Two separate writes (cert, then key) may settle in a mismatched state: it is
            // refused, and the matching pair is taken once complete.
            said.rejected(
                File::Tls,
                vec![format!(
                    "{e} (rejected; the current certificate keeps serving)"
                )],
            );
            r.stats.tls_err.fetch_add(1, Ordering::Relaxed);
        }
    }
    true
}

/// Warns when users outside the file's owner and group can read or change the key file.
///
/// Hashes are not secrets, but they let anyone who reads them test guesses offline. Group
/// access is fine: a Kubernetes Secret mounted with `fsGroup` is group-readable by design, and
/// the operator cannot chmod it.
fn warn_if_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o006 != 0 {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "key file is readable or writable by others; `chmod o-rwx` it"
            );
        }
    }
}

fn rejected_lines(problems: &Problems) -> Vec<String> {
    problems
        .0
        .iter()
        .map(|p| format!("{p} (rejected; the last good version keeps serving)"))
        .collect()
}

/// Watches the folders of the config and key file (so renames and `..data` symlink swaps are
/// seen), SIGHUP, and a periodic re-check; runs until the task is dropped.
pub async fn run(reloader: Arc<Reloader>, mut fp: Fingerprints, thread: ReloadThread) {
    let current = reloader.current.clone();
    let config_path = reloader.config_path.clone();
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watch = Watch::start(config_path.clone(), tx);
    watch.follow(&current.load());

    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut recheck = tokio::time::interval(RECHECK_EVERY);
    recheck.tick().await;
    let mut said = Complaints::default();
    // A broken file is retried (a missing one may come back without an event the watcher
    // sees), at a backing-off pace so a long outage costs few reads and fewer log lines.
    let mut retry = complaint::RETRY_FIRST;
    loop {
        let failing = said.failing();
        tokio::select! {
            got = rx.recv() => {
                if got.is_none() { return }
                retry = complaint::RETRY_FIRST;
            }
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading");
                said.remind_next();
                retry = complaint::RETRY_FIRST;
            }
            _ = recheck.tick() => {}
            _ = tokio::time::sleep(retry), if failing => {
                retry = (retry * 2).min(complaint::RETRY_MAX);
            }
        }
        tokio::time::sleep(DEBOUNCE).await;
        // Pass after pass while a file keeps changing: each pass spends one quiet period, so
        // a long rewrite is taken as soon as it stops and dropping this task is never blocked.
        let started = tokio::time::Instant::now();
        let mut told = false;
        let mut eager = true;
        loop {
            while rx.try_recv().is_ok() {}
            let (r, mut f, mut s) = (reloader.clone(), fp.clone(), said.clone());
            let done = thread
                .run(move || {
                    let settled = reload_once(&r, &mut f, &mut s, eager);
                    (f, s, settled)
                })
                .await;
            watch.follow(&current.load());
            match done {
                Some((f, s, settled)) => {
                    fp = f;
                    said = s;
                    if settled {
                        break;
                    }
                }
                None => break,
            }
            eager = false;
            if !told && started.elapsed() >= STILL_CHANGING {
                told = true;
                tracing::warn!(
                    waited = ?started.elapsed(),
                    "a watched file keeps changing; it is applied once it stays unchanged for {:?}",
                    settle::QUIET
                );
            }
        }
        if !said.failing() {
            retry = complaint::RETRY_FIRST;
        }
    }
}
