//! Authorization: extract the key, look it up by hash, check revocation, expiry and scopes.
//! Yields a [`Permit`], the only thing `forward` accepts.

use http::header::{HeaderMap, AUTHORIZATION};

use crate::keys::{self, KeyEntry, KeyStore};
use crate::routes::Route;

/// Unix seconds now, the clock expiry is judged by.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Why a request was not let through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Api-Key` credential on a protected route.
    #[error("this route needs an API key: send `Authorization: Api-Key <key>`")]
    Missing,
    /// Malformed, bad checksum, or unknown.
    #[error("the API key is not valid")]
    Invalid,
    /// Past its `expires_at`.
    #[error("the API key has expired")]
    Expired,
    /// Revoked by an operator.
    #[error("the API key has been revoked")]
    Revoked,
    /// The key lacks a scope the route requires.
    #[error("the API key lacks the scope {0}")]
    InsufficientScope(String),
}

/// What the `Authorization` header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'h> {
    /// No header.
    Absent,
    /// Some other scheme (Basic, Bearer...).
    OtherScheme,
    /// `Api-Key` with something other than exactly one token.
    MalformedApiKey,
    /// `Api-Key <token>`.
    ApiKey(&'h [u8]),
}

/// Reads the single `Authorization` header; the caller has already refused duplicates.
pub fn credential(headers: &HeaderMap) -> Credential<'_> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Credential::Absent;
    };
    parse_authorization(value.as_bytes())
}

/// Parses `Api-Key <token>`; the scheme name is case-insensitive.
pub fn parse_authorization(value: &[u8]) -> Credential<'_> {
    const SCHEME: &[u8] = b"api-key";
    let (scheme, rest) = match value.iter().position(|&b| b == b' ') {
        Some(i) => (&value[..i], &value[i + 1..]),
        None => (value, &[][..]),
    };
    if !scheme.eq_ignore_ascii_case(SCHEME) {
        return Credential::OtherScheme;
    }
    let one_token = !rest.is_empty() && rest.iter().all(|&b| b.is_ascii_graphic() || b >= 0x80);
    if one_token {
        Credential::ApiKey(rest)
    } else {
        Credential::MalformedApiKey
    }
}

/// Permission to forward one request to one route, as the key it was granted to.
#[derive(Debug, Clone, Copy)]
pub struct Permit<'a> {
    /// The route being served.
    pub route: &'a Route,
    /// The key that was checked; `None` on public routes.
    pub key: Option<&'a KeyEntry>,
}

/// Checks a request's credential against the route; `now` is unix seconds.
pub fn authorize<'a>(
    route: &'a Route,
    keys: &'a KeyStore,
    credential: Credential<'_>,
    now: i64,
) -> Result<Permit<'a>, AuthError> {
    if route.public {
        return Ok(Permit { route, key: None });
    }
    let token = match credential {
        Credential::Absent | Credential::OtherScheme => return Err(AuthError::Missing),
        Credential::MalformedApiKey => return Err(AuthError::Invalid),
        Credential::ApiKey(t) => t,
    };
    // A kg_ key carries a checksum: typos and truncations are refused without a lookup.
    if token.starts_with(keys::KEY_PREFIX.as_bytes()) && !keys::well_formed(token) {
        return Err(AuthError::Invalid);
    }
    let key = keys
        .lookup(&keys::digest(token))
        .ok_or(AuthError::Invalid)?;
    if key.revoked {
        return Err(AuthError::Revoked);
    }
    if key.expires_at.is_some_and(|t| now >= t) {
        return Err(AuthError::Expired);
    }
    if let Some(scope) = key.missing_scope(&route.scopes) {
        return Err(AuthError::InsufficientScope(scope.to_string()));
    }
    key.touch(now);
    Ok(Permit {
        route,
        key: Some(key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_is_case_insensitive() {
        assert_eq!(
            parse_authorization(b"Api-Key abc"),
            Credential::ApiKey(b"abc")
        );
        assert_eq!(
            parse_authorization(b"API-KEY abc"),
            Credential::ApiKey(b"abc")
        );
        assert_eq!(
            parse_authorization(b"api-key abc"),
            Credential::ApiKey(b"abc")
        );
    }

    #[test]
    fn exactly_one_token() {
        assert_eq!(parse_authorization(b"Api-Key"), Credential::MalformedApiKey);
        assert_eq!(
            parse_authorization(b"Api-Key "),
            Credential::MalformedApiKey
        );
        assert_eq!(
            parse_authorization(b"Api-Key a b"),
            Credential::MalformedApiKey
        );
        assert_eq!(
            parse_authorization(b"Api-Key  a"),
            Credential::MalformedApiKey
        );
        assert_eq!(
            parse_authorization(b"Api-Key a\tb"),
            Credential::MalformedApiKey
        );
    }

    #[test]
    fn other_schemes() {
        assert_eq!(parse_authorization(b"Bearer x"), Credential::OtherScheme);
        assert_eq!(parse_authorization(b"Api-Keyx y"), Credential::OtherScheme);
    }
}
