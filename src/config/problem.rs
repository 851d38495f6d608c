//! Where a config or key file is wrong: [`Problem`] (file:line:column and a message),
//! [`Problems`] (every one found in a load) and [`Warning`] (allowed but probably not meant).

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem found in a config or key file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line, 0 when the problem has no position (unreadable file).
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// What is wrong, for a human.
    pub message: String,
}

impl Problem {
    /// A problem at a YAML location.
    pub(crate) fn at(file: &Path, loc: serde_saphyr::Location, message: impl Into<String>) -> Self {
        Problem {
            file: file.to_path_buf(),
            line: loc.line(),
            column: loc.column(),
            message: message.into(),
        }
    }

    /// A problem with the file as a whole.
    pub(crate) fn whole(file: &Path, message: impl Into<String>) -> Self {
        Problem {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            message: message.into(),
        }
    }

    /// A YAML syntax or shape error, with the location the parser gave.
    pub(crate) fn from_yaml(file: &Path, err: &serde_saphyr::Error) -> Self {
        let err = err.without_snippet();
        let text = err.to_string();
        // The parser appends " at line L, column C"; the location is printed in front instead.
        let message = match text.rfind(" at line ") {
            Some(i) => text[..i].to_string(),
            None => text,
        };
        match err.location() {
            Some(loc) => Problem::at(file, loc, message),
            None => Problem::whole(file, message),
        }
    }
}

/// A [`Problem`] shown as a warning: `file:line:column: warning: message`.
pub(crate) struct Warning<'a>(pub(crate) &'a Problem);

impl fmt::Display for Warning<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.0;
        if p.line > 0 {
            write!(f, "{}:{}:{}: ", p.file.display(), p.line, p.column)?;
        } else {
            write!(f, "{}: ", p.file.display())?;
        }
        write!(f, "warning: {}", p.message)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        } else {
            write!(f, "{}: {}", self.file.display(), self.message)
        }
    }
}

/// All problems found in one load; never empty.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Problems in file order; the ones without a position go last.
    pub(crate) fn sorted(mut problems: Vec<Problem>) -> Problems {
        problems.sort_by_key(|p| (p.line == 0, p.line, p.column));
        Problems(problems)
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}
