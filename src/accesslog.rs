//! Access log: one line per request on stdout, written by a dedicated thread so the request
//! path never blocks on I/O. Never holds a key, a hash or an Authorization value.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::Duration;
use std::time::SystemTime;

use http::{HeaderValue, Method, Uri};
use serde::Serialize;

use crate::config::LogFormat;
use crate::metrics::AuthOutcome;

/// Entries buffered before new ones are dropped (and counted).
const QUEUE: usize = 16 * 1024;
/// How often the writer thread drains the queue.
const FLUSH_EVERY: Duration = Duration::from_millis(20);

/// Sends finished lines to the writer thread.
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<(Entry, LogFormat)>,
}

/// Everything one access log line says.
pub struct Entry {
    /// When the request arrived.
    pub time: SystemTime,
    /// Request id (kept or generated).
    pub request_id: HeaderValue,
    /// Client address.
    pub client: SocketAddr,
    /// Method.
    pub method: Method,
    /// Target as received; only its path is logged (queries can carry secrets).
    pub uri: Uri,
    /// Route name, if one matched.
    pub route: Option<std::sync::Arc<str>>,
    /// Status sent.
    pub status: u16,
    /// Seconds from arrival to the end of the response body.
    pub duration: f64,
    /// Response body bytes sent.
    pub bytes: u64,
    /// Key id, when a key was accepted.
    pub key_id: Option<HeaderValue>,
    /// Service account, when a key was accepted.
    pub service_account: Option<HeaderValue>,
    /// Auth outcome.
    pub auth: AuthOutcome,
    /// Upstream's status, when it answered.
    pub upstream_status: Option<u16>,
}

#[derive(Serialize)]
struct JsonLine<'a> {
    time: String,
    request_id: &'a str,
    client: String,
    method: &'a str,
    path: &'a str,
    route: Option<&'a str>,
    status: u16,
    duration_ms: f64,
    bytes: u64,
    key_id: Option<&'a str>,
    service_account: Option<&'a str>,
    auth: &'static str,
    upstream_status: Option<u16>,
}

fn text_of(v: &Option<HeaderValue>) -> Option<&str> {
    v.as_ref().and_then(|v| v.to_str().ok())
}

impl Entry {
    /// Formats the line (no trailing newline).
    pub fn format(&self, format: LogFormat) -> String {
        let time = time::OffsetDateTime::from(self.time)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let ms = (self.duration * 1_000_000.0).round() / 1000.0;
        let line = JsonLine {
            time,
            request_id: self.request_id.to_str().unwrap_or("-"),
            client: self.client.to_string(),
            method: self.method.as_str(),
            path: self.uri.path(),
            route: self.route.as_deref(),
            status: self.status,
            duration_ms: ms,
            bytes: self.bytes,
            key_id: text_of(&self.key_id),
            service_account: text_of(&self.service_account),
            auth: self.auth.as_str(),
            upstream_status: self.upstream_status,
        };
        match format {
            LogFormat::Json => serde_json::to_string(&line).unwrap_or_default(),
            LogFormat::Text => format!(
                "{} {} {} \"{} {}\" {} {} {:.3}ms route={} key={} sa={} auth={} upstream={}",
                line.time,
                line.request_id,
                line.client,
                line.method,
                line.path.escape_debug(),
                line.status,
                line.bytes,
                line.duration_ms,
                line.route.unwrap_or("-"),
                line.key_id.unwrap_or("-"),
                line.service_account.unwrap_or("-"),
                line.auth,
                line.upstream_status
                    .map_or("-".to_string(), |s| s.to_string()),
            ),
        }
    }
}

impl AccessLog {
    /// Starts the writer thread; it exits when every sender is gone.
    pub fn start() -> (AccessLog, std::thread::JoinHandle<()>) {
        let (tx, rx) = sync_channel(QUEUE);
        let writer = std::thread::Builder::new()
            .name("keygate-access-log".into())
            .spawn(move || write_lines(rx))
            .unwrap_or_else(|_| std::thread::spawn(|| {}));
        (AccessLog { tx }, writer)
    }

    /// Queues an entry; formatting happens on the writer thread. False when the queue is
    /// full and the entry was dropped.
    pub fn send(&self, entry: Entry, format: LogFormat) -> bool {
        !matches!(
            self.tx.try_send((entry, format)),
            Err(TrySendError::Full(_))
        )
    }
}

fn write_lines(rx: Receiver<(Entry, LogFormat)>) {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    loop {
        // Drain in batches and sleep between them: a writer blocked in recv() would have to be
        // woken (a futex call) for every request under load.
        let mut wrote = false;
        loop {
            match rx.try_recv() {
                Ok((entry, format)) => {
                    let _ = writeln!(out, "{}", entry.format(format));
                    wrote = true;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        if wrote {
            let _ = out.flush();
        }
        std::thread::sleep(FLUSH_EVERY);
    }
}
