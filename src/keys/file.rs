//! The key file: parse and check it (`parse.rs`, every problem with its position), render
//! records back, and change it safely (an advisory lock serializes writers; `atomic.rs`
//! replaces the file).

use std::path::{Path, PathBuf};

use super::limit::Limits;
use super::{format_time, KeyRecord};
use crate::config::{Problem, Problems};

mod atomic;
mod parse;
mod update;

pub(crate) use atomic::write_atomic;
pub use parse::{parse_key_file, parse_key_file_each, RecordSink};
pub(crate) use update::update_audited;

/// Reads and parses a key file.
pub fn load_key_file(path: &Path) -> Result<Vec<KeyRecord>, Problems> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Problems(vec![Problem::whole(
            path,
            format!("cannot read key file: {e}"),
        )])
    })?;
    parse_key_file(path, &text)
}

/// Why a key file could not be changed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyFileError {
    /// The current file is invalid; nothing was written.
    #[error("{0}")]
    Invalid(Problems),
    /// The audit line could not be written; the key file was left as it was.
    #[error("audit log {path}: {source}; the key file was not changed")]
    Audit {
        /// The audit log.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
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
pub(crate) fn render(records: &[KeyRecord]) -> String {
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
        render_limits(&mut out, &r.limits);
        for (name, t) in [
            ("created_at", r.created_at),
            ("expires_at", r.expires_at),
            ("revoked_at", r.revoked_at),
        ] {
            if let Some(t) = t {
                out.push_str(&format!("    {name}: {}\n", format_time(t)));
            }
        }
    }
    out
}

fn render_limits(out: &mut String, l: &Limits) {
    if let Some(rate) = &l.rate {
        out.push_str(&format!("    rate_limit: {rate}\n"));
        if rate.burst != rate.count {
            out.push_str(&format!("    burst: {}\n", rate.burst));
        }
    }
    if let Some(q) = &l.quota {
        out.push_str(&format!("    quota: {q}\n"));
    }
    if !l.allowed_cidrs.is_empty() {
        let cidrs: Vec<String> = l.allowed_cidrs.iter().map(ToString::to_string).collect();
        out.push_str(&format!("    allowed_cidrs: [{}]\n", cidrs.join(", ")));
    }
}

/// Reads the key file; a missing file is an empty key list.
pub(crate) fn read(path: &Path) -> Result<Vec<KeyRecord>, KeyFileError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_key_file(path, &text).map_err(KeyFileError::Invalid),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::limit::{parse_cidr, Quota, Rate};
    use crate::keys::{digest, parse_time};

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
            limits: Limits {
                rate: Some(Rate::parse("6000/min", Some(20)).unwrap()),
                quota: Some(Quota::parse("10000/month").unwrap()),
                allowed_cidrs: vec![
                    parse_cidr("10.0.0.0/8").unwrap(),
                    parse_cidr("2001:db8::/32").unwrap(),
                ],
            },
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
