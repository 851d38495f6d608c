//! What validation has found so far: the problems and warnings of one file, and the value
//! checks every section shares.

use std::path::Path;
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use super::raw::SizeText;
use super::{parse_duration, parse_size, Problem};

/// What validation has found so far, and what every section needs to report it.
pub(super) struct Check<'a> {
    /// The config file, named in every problem.
    pub(super) path: &'a Path,
    /// The config's folder: relative paths are read against it.
    pub(super) base: &'a Path,
    pub(super) problems: Vec<Problem>,
    pub(super) warnings: Vec<Problem>,
}

impl Check<'_> {
    /// Records a problem at `loc`.
    pub(super) fn at(&mut self, loc: Location, message: impl Into<String>) {
        self.problems.push(Problem::at(self.path, loc, message));
    }

    /// A size field; zero is refused, since no limit of zero bytes is meant.
    pub(super) fn size_value(&mut self, s: &Spanned<SizeText>) -> Option<u64> {
        let r = match &s.value {
            SizeText::Bytes(n) => Ok(*n),
            SizeText::Text(t) => parse_size(t),
        };
        match r {
            Ok(0) => {
                self.at(s.referenced, "size must be greater than zero");
                None
            }
            Ok(n) => Some(n),
            Err(e) => {
                self.at(s.referenced, e);
                None
            }
        }
    }

    /// A duration field that must not be zero; `what` names it in the problem.
    pub(super) fn duration_value(&mut self, s: &Spanned<String>, what: &str) -> Option<Duration> {
        match parse_duration(&s.value) {
            Ok(d) if d.is_zero() => {
                self.at(s.referenced, format!("{what} must be greater than zero"));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.at(s.referenced, e);
                None
            }
        }
    }
}
