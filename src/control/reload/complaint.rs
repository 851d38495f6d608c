//! What a rejected file has already told the operator: one ERROR per distinct problem, a
//! reminder at most once a minute while it lasts, one INFO when it clears.

use std::time::{Duration, Instant};

/// How often a problem that has not changed is logged again.
pub const REMIND_EVERY: Duration = Duration::from_secs(60);
/// First retry after a failed attempt; doubles up to [`RETRY_MAX`].
pub const RETRY_FIRST: Duration = Duration::from_millis(50);
/// Longest wait between retries while a file stays broken.
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// A watched file, as complaints are kept apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum File {
    /// The config file.
    Config = 0,
    /// The key file.
    Keys,
    /// The TLS certificate and key.
    Tls,
}

impl File {
    fn what(self) -> &'static str {
        match self {
            File::Config => "config",
            File::Keys => "key file",
            File::Tls => "TLS certificate",
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Complaint {
    /// The problem lines last logged.
    lines: Vec<String>,
    /// When they were logged.
    at: Option<Instant>,
}

/// The last problems logged per file.
#[derive(Debug, Default, Clone)]
pub struct Complaints([Option<Complaint>; 3]);

impl Complaints {
    /// Logs a rejection unless the same lines were logged less than a minute ago.
    pub fn rejected(&mut self, file: File, lines: Vec<String>) {
        let now = Instant::now();
        let slot = &mut self.0[file as usize];
        let due = match slot {
            Some(c) if c.lines == lines => {
                c.at.is_none_or(|t| now.duration_since(t) >= REMIND_EVERY)
            }
            _ => true,
        };
        if due {
            for l in &lines {
                tracing::error!("{l}");
            }
            *slot = Some(Complaint {
                lines,
                at: Some(now),
            });
        } else {
            tracing::debug!(file = file.what(), "still rejected; problem unchanged");
        }
    }

    /// Clears a file's complaint; says so once when there was one.
    pub fn accepted(&mut self, file: File, path: &std::path::Path) {
        if self.0[file as usize].take().is_some() {
            tracing::info!(file = %path.display(), "{} is valid again", file.what());
        }
    }

    /// Whether any file is currently rejected, so retries keep running.
    pub fn failing(&self) -> bool {
        self.0.iter().any(Option::is_some)
    }

    /// Makes the next rejection log again, as when an operator asks for a reload.
    pub fn remind_next(&mut self) {
        for c in self.0.iter_mut().flatten() {
            c.at = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_problem_is_kept_until_it_changes_or_clears() {
        let mut c = Complaints::default();
        assert!(!c.failing());
        c.rejected(File::Keys, vec!["a".into()]);
        let first = c.0[1].clone().unwrap().at;
        c.rejected(File::Keys, vec!["a".into()]);
        assert_eq!(c.0[1].clone().unwrap().at, first);
        c.rejected(File::Keys, vec!["b".into()]);
        assert_eq!(c.0[1].clone().unwrap().lines, vec!["b".to_string()]);
        assert!(c.failing());
        c.accepted(File::Keys, std::path::Path::new("k"));
        assert!(!c.failing());
    }
}
