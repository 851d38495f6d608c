//! Scopes: the names routes require and keys hold ([`check_scope`]), and the [`Grant`]s
//! (`*`, `prefix.*`, exact) a key's scopes become.

/// A scope a key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Grant {
    /// `*`: every scope.
    All,
    /// `yc.ydb.*`: stored as `yc.ydb.`.
    Prefix(String),
    /// One exact scope.
    Exact(String),
}

impl Grant {
    /// Reads a scope as written in the key file.
    pub(crate) fn parse(scope: &str) -> Grant {
        if scope == "*" {
            Grant::All
        } else if let Some(p) = scope.strip_suffix('*') {
            Grant::Prefix(p.to_string())
        } else {
            Grant::Exact(scope.to_string())
        }
    }

    /// True when this grant satisfies `required`.
    pub(crate) fn covers(&self, required: &str) -> bool {
        match self {
            Grant::All => true,
            Grant::Prefix(p) => required.starts_with(p.as_str()),
            Grant::Exact(s) => s == required,
        }
    }
}

/// Scope names: dot-separated words, optionally ending in `.*`, or `*` alone.
pub(crate) fn check_scope(scope: &str) -> Result<(), String> {
    let body = scope.strip_suffix(".*").unwrap_or(scope);
    let ok = scope == "*"
        || (!body.is_empty()
            && body.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            }));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid scope {scope:?}: expected dot-separated words like yc.postbox.send"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants() {
        assert!(Grant::parse("*").covers("yc.x"));
        assert!(Grant::parse("yc.ydb.*").covers("yc.ydb.tables.manage"));
        assert!(!Grant::parse("yc.ydb.*").covers("yc.ydbx.a"));
        assert!(!Grant::parse("yc.ydb.*").covers("yc.ydb"));
        assert!(Grant::parse("yc.a").covers("yc.a"));
        assert!(!Grant::parse("yc.a").covers("yc.ab"));
    }
}
