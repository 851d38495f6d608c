//! Access log: one line per request on stdout, written by a dedicated thread so the request
//! path never blocks on I/O. Never holds a key, a hash or an Authorization value.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;

use http::{HeaderValue, Method};

use crate::config::LogFormat;
use crate::ops::metrics::AuthOutcome;
use spell::{push_ip, push_json_str, push_ms, push_padded, push_socket_addr, push_u64};

mod head;
mod spell;

pub use head::HeadText;

/// Entries buffered before new ones are dropped (and counted).
const QUEUE: usize = 16 * 1024;
/// How often the writer thread drains the queue.
const FLUSH_EVERY: Duration = Duration::from_millis(20);

/// Sends finished lines to the writer thread.
///
/// The queue is a linked list of small blocks allocated as entries arrive, bounded by a
/// count: a preallocated ring of [`QUEUE`] entries would keep megabytes resident at idle.
///
/// Entries travel boxed: the list allocates its blocks zeroed, 31 slots at a time, and a
/// slot holding a whole entry made each block about 9 KB to clear and every send and receive
/// a 300-byte copy (about 900 instructions a request, against one small allocation).
#[derive(Clone)]
pub struct AccessLog {
    tx: Sender<(Box<Entry>, LogFormat)>,
    queued: Arc<AtomicUsize>,
}

/// How `client` is written: a peer with its port, or the address a trusted proxy named.
enum ClientText {
    Peer(SocketAddr),
    Ip(std::net::IpAddr),
}

impl std::fmt::Display for ClientText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientText::Peer(a) => a.fmt(f),
            ClientText::Ip(ip) => ip.fmt(f),
        }
    }
}

/// Everything one access log line says.
pub struct Entry {
    /// When the request arrived.
    pub time: SystemTime,
    /// Request id, raw path, `Host` and `User-Agent`.
    pub head: HeadText,
    /// Client address.
    pub client: SocketAddr,
    /// The client behind a trusted proxy, logged as `client` in the peer's place.
    pub forwarded_client: Option<std::net::IpAddr>,
    /// Method.
    pub method: Method,
    /// The normalized path routing used, when it differs from the raw one.
    pub normalized: Option<Box<str>>,
    /// The route's upstream, when the request was forwarded.
    pub upstream: Option<http::uri::Authority>,
    /// From sending upstream to the upstream's response head.
    pub upstream_time: Option<Duration>,
    /// Why the upstream exchange failed (`refused`, `reset`, `timeout`, `tls`, ...).
    pub error: Option<&'static str>,
    /// gRPC status: ours, the upstream's trailer, or 1 (CANCELLED) for a client that left.
    pub grpc_status: Option<u16>,
    /// Route name, if one matched.
    pub route: Option<std::sync::Arc<str>>,
    /// Status sent.
    pub status: u16,
    /// From arrival to the end of the response body.
    pub duration: Duration,
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

fn text_of(v: &Option<HeaderValue>) -> Option<&str> {
    v.as_ref().and_then(|v| v.to_str().ok())
}

fn json_num(out: &mut Vec<u8>, n: Option<u16>) {
    match n {
        Some(n) => push_u64(out, u64::from(n)),
        None => out.extend_from_slice(b"null"),
    }
}

fn json_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Formats timestamps, reusing the date and time of day while the second stays the same.
#[derive(Default)]
pub struct Clock {
    second: i64,
    prefix: String,
}

impl Clock {
    /// Appends `t` as RFC 3339 UTC with microseconds.
    pub fn write(&mut self, out: &mut Vec<u8>, t: SystemTime) {
        let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let secs = i64::try_from(d.as_secs()).unwrap_or(0);
        if secs != self.second || self.prefix.is_empty() {
            self.second = secs;
            self.prefix = time::OffsetDateTime::from_unix_timestamp(secs)
                .ok()
                .and_then(|t| {
                    t.format(time::macros::format_description!(
                        "[year]-[month]-[day]T[hour]:[minute]:[second]"
                    ))
                    .ok()
                })
                .unwrap_or_default();
        }
        out.extend_from_slice(self.prefix.as_bytes());
        out.push(b'.');
        push_padded(out, u64::from(d.subsec_micros()), 6);
        out.push(b'Z');
    }
}

impl Entry {
    /// The path routing used: normalized, never with the query.
    fn path(&self) -> &str {
        self.normalized.as_deref().unwrap_or(self.head.path())
    }

    /// Appends the line (no trailing newline) to `out`.
    pub fn format_into(&self, format: LogFormat, clock: &mut Clock, out: &mut Vec<u8>) {
        let request_id = self.head.request_id();
        match format {
            LogFormat::Json => self.json_into(clock, out, request_id),
            LogFormat::Text => self.text_into(clock, out, request_id),
        }
    }

    /// The resolved client when a trusted proxy named it, else the peer with its port.
    fn client_text(&self) -> ClientText {
        match self.forwarded_client {
            Some(ip) => ClientText::Ip(ip),
            None => ClientText::Peer(self.client),
        }
    }

    fn json_into(&self, clock: &mut Clock, out: &mut Vec<u8>, request_id: &str) {
        out.extend_from_slice(b"{\"time\":\"");
        clock.write(out, self.time);
        out.extend_from_slice(b"\",\"request_id\":");
        push_json_str(out, request_id);
        out.extend_from_slice(b",\"client\":\"");
        match self.forwarded_client {
            Some(ip) => push_ip(out, ip),
            None => push_socket_addr(out, self.client),
        }
        out.extend_from_slice(b"\",");
        if self.forwarded_client.is_some() {
            out.extend_from_slice(b"\"peer\":\"");
            push_socket_addr(out, self.client);
            out.extend_from_slice(b"\",");
        }
        out.extend_from_slice(b"\"method\":");
        push_json_str(out, self.method.as_str());
        out.extend_from_slice(b",\"path\":");
        push_json_str(out, self.path());
        // Method "-" marks a head hyper refused: there is no raw path to show.
        if self.normalized.is_some() && self.method.as_str() != "-" {
            out.extend_from_slice(b",\"raw_path\":");
            push_json_str(out, self.head.path());
        }
        out.extend_from_slice(b",\"host\":");
        json_opt(out, self.head.host());
        out.extend_from_slice(b",\"user_agent\":");
        json_opt(out, self.head.user_agent());
        out.extend_from_slice(b",\"route\":");
        json_opt(out, self.route.as_deref());
        out.extend_from_slice(b",\"status\":");
        push_u64(out, u64::from(self.status));
        out.extend_from_slice(b",\"duration_ms\":");
        push_ms(out, self.duration);
        out.extend_from_slice(b",\"bytes\":");
        push_u64(out, self.bytes);
        out.extend_from_slice(b",\"key_id\":");
        json_opt(out, text_of(&self.key_id));
        out.extend_from_slice(b",\"service_account\":");
        json_opt(out, text_of(&self.service_account));
        out.extend_from_slice(b",\"auth\":\"");
        out.extend_from_slice(self.auth.as_str().as_bytes());
        out.extend_from_slice(b"\",\"upstream_status\":");
        json_num(out, self.upstream_status);
        out.extend_from_slice(b",\"upstream\":");
        json_opt(out, self.upstream.as_ref().map(|a| a.as_str()));
        out.extend_from_slice(b",\"upstream_ms\":");
        match self.upstream_time {
            Some(t) => push_ms(out, t),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"error\":");
        json_opt(out, self.error);
        out.extend_from_slice(b",\"grpc_status\":");
        json_num(out, self.grpc_status);
        out.push(b'}');
    }

    fn text_into(&self, clock: &mut Clock, out: &mut Vec<u8>, request_id: &str) {
        clock.write(out, self.time);
        let _ = write!(
            out,
            " {} {} \"{} {}\" {} {} ",
            request_id,
            self.client_text(),
            self.method,
            self.path().escape_debug(),
            self.status,
            self.bytes,
        );
        push_ms(out, self.duration);
        let _ = write!(
            out,
            "ms route={} key={} sa={} auth={} upstream=",
            self.route.as_deref().unwrap_or("-"),
            text_of(&self.key_id).unwrap_or("-"),
            text_of(&self.service_account).unwrap_or("-"),
            self.auth.as_str(),
        );
        match self.upstream_status {
            Some(s) => {
                let _ = write!(out, "{s}");
            }
            None => out.push(b'-'),
        }
        if self.normalized.is_some() {
            let _ = write!(out, " raw_path={}", self.head.path().escape_debug());
        }
        let _ = write!(
            out,
            " host={} ua=\"{}\" upstream_addr={} upstream_ms=",
            self.head.host().unwrap_or("-").escape_debug(),
            self.head.user_agent().unwrap_or("-").escape_debug(),
            self.upstream.as_ref().map_or("-", |a| a.as_str()),
        );
        match self.upstream_time {
            Some(t) => push_ms(out, t),
            None => out.push(b'-'),
        }
        let _ = write!(out, " error={}", self.error.unwrap_or("-"));
        if let Some(g) = self.grpc_status {
            let _ = write!(out, " grpc_status={g}");
        }
    }

    /// Formats the line (no trailing newline); the writer thread reuses a buffer instead.
    #[cfg(test)]
    pub fn format(&self, format: LogFormat) -> String {
        let mut out = Vec::with_capacity(320);
        self.format_into(format, &mut Clock::default(), &mut out);
        String::from_utf8(out).unwrap()
    }
}

impl AccessLog {
    /// Starts the writer thread; it exits when every sender is gone.
    pub fn start() -> (AccessLog, std::thread::JoinHandle<()>) {
        let (tx, rx) = channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let count = queued.clone();
        let writer = std::thread::Builder::new()
            .name("keygate-access-log".into())
            .spawn(move || write_lines(rx, &count))
            .unwrap_or_else(|_| std::thread::spawn(|| {}));
        (AccessLog { tx, queued }, writer)
    }

    /// Queues an entry; formatting happens on the writer thread. False when the queue is
    /// full and the entry was dropped.
    pub fn send(&self, entry: Box<Entry>, format: LogFormat) -> bool {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= QUEUE {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        // A writer that is gone (shutdown) drops the entry, as a full queue would not.
        let _ = self.tx.send((entry, format));
        true
    }
}

fn write_lines(rx: Receiver<(Box<Entry>, LogFormat)>, queued: &AtomicUsize) {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let mut clock = Clock::default();
    let mut line = Vec::with_capacity(512);
    loop {
        // Drain in batches and sleep between them: a writer blocked in recv() would have to be
        // woken (a futex call) for every request under load.
        let mut wrote = false;
        loop {
            match rx.try_recv() {
                Ok((entry, format)) => {
                    queued.fetch_sub(1, Ordering::Relaxed);
                    line.clear();
                    entry.format_into(format, &mut clock, &mut line);
                    line.push(b'\n');
                    let _ = out.write_all(&line);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            time: std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_764_450_000_123_456),
            head: HeadText::new(
                &HeaderValue::from_static("id-\"1\\"),
                "/a%22b/c",
                Some("api.example.com"),
                None,
            ),
            client: "127.0.0.1:5000".parse().unwrap(),
            forwarded_client: None,
            method: Method::GET,
            route: Some("api\u{1}".into()),
            status: 200,
            duration: Duration::from_nanos(1_234_400),
            bytes: 42,
            key_id: Some(HeaderValue::from_static("k1")),
            service_account: None,
            auth: AuthOutcome::Allowed,
            upstream_status: None,
            normalized: None,
            upstream: None,
            upstream_time: None,
            error: Some("refused"),
            grpc_status: None,
        }
    }

    #[test]
    fn normalized_path_is_logged_with_the_raw_one_beside_it() {
        let mut e = entry();
        e.normalized = Some("/postbox/x".into());
        e.head = HeadText::new(
            &HeaderValue::from_static("id-\"1\\"),
            "/health/../postbox/x",
            Some("api.example.com"),
            None,
        );
        e.upstream = Some(http::uri::Authority::from_static("127.0.0.1:9001"));
        e.upstream_time = Some(Duration::from_micros(1500));
        e.grpc_status = Some(14);
        let v: serde_json::Value = serde_json::from_str(&e.format(LogFormat::Json)).unwrap();
        assert_eq!(v["path"], "/postbox/x");
        assert_eq!(v["raw_path"], "/health/../postbox/x");
        assert_eq!(v["host"], "api.example.com");
        assert_eq!(v["upstream"], "127.0.0.1:9001");
        assert_eq!(v["upstream_ms"], 1.5);
        assert_eq!(v["error"], "refused");
        assert_eq!(v["grpc_status"], 14);
        assert!(v["user_agent"].is_null());
        let v: serde_json::Value = serde_json::from_str(&entry().format(LogFormat::Json)).unwrap();
        assert!(v.get("raw_path").is_none());
    }

    #[test]
    fn json_lines_parse_and_escape() {
        let line = entry().format(LogFormat::Json);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "2025-11-29T21:00:00.123456Z");
        assert_eq!(v["request_id"], "id-\"1\\");
        assert_eq!(v["path"], "/a%22b/c");
        assert_eq!(v["route"], "api\u{1}");
        assert_eq!(v["duration_ms"], 1.234);
        assert_eq!(v["key_id"], "k1");
        assert!(v["service_account"].is_null() && v["upstream_status"].is_null());
        assert!(!line.contains("secret"));
    }

    #[test]
    fn text_lines_have_every_field() {
        let line = entry().format(LogFormat::Text);
        assert!(line.starts_with("2025-11-29T21:00:00.123456Z "), "{line}");
        assert!(
            line.contains("\"GET /a%22b/c\" 200 42 1.234ms route=api"),
            "{line}"
        );
        assert!(line.contains("auth=allowed upstream=-"), "{line}");
        assert!(
            line.ends_with(
                " host=api.example.com ua=\"-\" upstream_addr=- upstream_ms=- error=refused"
            ),
            "{line}"
        );
    }
}
