//! `keys audit [ID]`, and who the audit log names as the actor of a change.

use super::{failure, usage, Failure, Output, Target};
use crate::keys::audit::{self, Entry};

/// The actor: `--actor`, else `$USER`, else `$LOGNAME`, else `unknown` (cron jobs and
/// containers often have no user name; the line is still written).
pub(super) fn actor(flag: Option<&str>) -> Result<String, Failure> {
    let from_env = || {
        ["USER", "LOGNAME"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
    };
    let actor = match flag {
        Some(a) => a.to_string(),
        None => from_env().unwrap_or_else(|| "unknown".to_string()),
    };
    if actor.is_empty() || actor.len() > 256 || actor.chars().any(char::is_control) {
        return Err(usage(
            "--actor: expected 1 to 256 characters without control characters",
        ));
    }
    Ok(actor)
}

/// Prints the audit log (or the lines about `id`): one line per entry, or the JSON lines.
pub(super) fn show(out: Output, t: &Target, id: Option<&str>) -> Result<(), Failure> {
    let Some(log) = &t.audit else {
        return Err(usage(
            "no audit log: set `audit_log` in the config, or pass --audit-log",
        ));
    };
    let (entries, bad) = audit::read(&log.path)
        .map_err(|e| failure(format!("audit log {}: {e}", log.path.display())))?;
    for line in bad {
        eprintln!(
            "keygate: warning: {}:{line}: not an audit entry; skipped",
            log.path.display()
        );
    }
    let about = |e: &Entry| id.is_none_or(|id| e.id == id || e.replaces.as_deref() == Some(id));
    for e in entries.iter().filter(|e| about(e)) {
        match out {
            Output::Json => println!("{}", serde_json::to_string(e).unwrap_or_default()),
            Output::Text | Output::K8sSecret => println!("{}", text_line(e)),
        }
    }
    Ok(())
}

/// One entry for people: time, action, key, account, scopes, then what else is set.
fn text_line(e: &Entry) -> String {
    let action = serde_json::to_value(e.action)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let mut line = format!(
        "{}  {action:<7} {}  {}  scopes={}",
        e.time,
        e.id,
        e.service_account,
        e.scopes.join(",")
    );
    for (name, value) in [
        ("replaces", &e.replaces),
        ("expires_at", &e.expires_at),
        ("revoked_at", &e.revoked_at),
    ] {
        if let Some(v) = value {
            line.push_str(&format!("  {name}={v}"));
        }
    }
    for (name, value) in &e.limits {
        line.push_str(&format!("  {name}={value}"));
    }
    line.push_str(&format!("  by {}", e.actor));
    if let Some(r) = &e.result {
        line.push_str(&format!("  result={r}"));
    }
    line
}
