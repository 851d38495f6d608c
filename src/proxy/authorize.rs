//! Authorization: look the credential's key up by hash, check revocation, expiry and scopes.
//! Yields a [`Permit`], the only thing `forward` accepts; it carries what to strip.

use crate::config::routes::Route;
use crate::config::{KeySource, Scheme};
use crate::keys::{self, KeyEntry, KeyStore};
use crate::proxy::credential::{Carrier, Credential, Found};

pub use crate::keys::now_secs;

/// Why a request was not let through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No key in the route's sources on a protected route; says what came instead.
    #[error("{0}")]
    Missing(MissingKey),
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

/// A protected route got no key: what it accepts, and what came instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this route accepts {accepts}; {presented}")]
pub struct MissingKey {
    /// The route's sources, as its `KeySources::accepts` words them.
    pub accepts: std::sync::Arc<str>,
    /// What the request sent instead.
    pub presented: Presented,
}

/// What a request sent instead of a key, as far as a refusal may repeat it.
///
/// The scheme name is the client's text: it is named back only when it is a short token, and
/// the credential after it never is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presented {
    /// No `Authorization` header (on a route that reads only `Authorization: Api-Key`).
    Nothing,
    /// Nothing in any of the route's sources.
    NoKey,
    /// Another scheme, by its name (`Bearer`, `Basic`).
    Scheme(Box<str>),
    /// A value with no space in it: a bare credential, perhaps a key without `Api-Key `.
    NoScheme,
    /// A scheme name too long or with characters other than letters, digits and `-`.
    Unrecognized,
}

/// The source a route reads when the config names none.
const DEFAULT_SOURCE: KeySource = KeySource::Authorization(Scheme::ApiKey);

/// Longest scheme name repeated in a refusal; real ones (`Negotiate`) are far shorter.
const MAX_ECHOED_SCHEME: usize = 32;

impl Presented {
    /// Classifies the scheme part of an `Authorization` value that is not `Api-Key`.
    fn of(scheme: &[u8], has_credential: bool) -> Presented {
        if !has_credential {
            return Presented::NoScheme;
        }
        let token = !scheme.is_empty()
            && scheme.len() <= MAX_ECHOED_SCHEME
            && scheme
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-');
        match std::str::from_utf8(scheme) {
            Ok(name) if token => Presented::Scheme(name.into()),
            _ => Presented::Unrecognized,
        }
    }
}

impl std::fmt::Display for Presented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Presented::Nothing => f.write_str("no `Authorization` header was sent"),
            Presented::NoKey => f.write_str("no key was sent"),
            Presented::Scheme(name) => write!(f, "got the `{name}` scheme"),
            Presented::NoScheme => {
                f.write_str("got a value with no scheme; put `Api-Key ` before the key")
            }
            Presented::Unrecognized => f.write_str("got an unrecognized scheme"),
        }
    }
}

/// Permission to forward one request to one route, as the key it was granted to.
#[derive(Debug, Clone, Copy)]
pub struct Permit<'a> {
    /// The route being served.
    pub route: &'a Route,
    /// The key that was checked; `None` on public routes.
    pub key: Option<&'a KeyEntry>,
    /// The checked key's hash, so an upgraded connection can follow the key's fate.
    pub digest: Option<keys::Digest32>,
    /// What carried a key, removed before forwarding: what authorization read, and no more.
    pub strip: Option<Carrier<'a>>,
}

/// Checks a request's credential against the route; `now` is unix seconds. `preflight` is
/// true for a CORS preflight on a route with `preflight: pass`, which needs no key.
pub fn authorize<'a>(
    route: &'a Route,
    keys: &'a KeyStore,
    found: &Found<'_, 'a>,
    preflight: bool,
    now: i64,
) -> Result<Permit<'a>, AuthError> {
    if route.public || preflight {
        // A key sent where none is checked is still never forwarded: the carrier is set only
        // when a configured source offered one. Another scheme's credential belongs to the
        // upstream and passes.
        return Ok(Permit {
            route,
            key: None,
            digest: None,
            strip: found.carrier,
        });
    }
    let missing = |presented| {
        AuthError::Missing(MissingKey {
            accepts: route.key_sources.accepts.clone(),
            presented,
        })
    };
    let token: &[u8] = match &found.credential {
        Credential::Absent if route.key_sources.list == [DEFAULT_SOURCE] => {
            return Err(missing(Presented::Nothing))
        }
        Credential::Absent => return Err(missing(Presented::NoKey)),
        Credential::OtherScheme {
            scheme,
            has_credential,
        } => return Err(missing(Presented::of(scheme, *has_credential))),
        Credential::MalformedApiKey => return Err(AuthError::Invalid),
        Credential::ApiKey(t) => t,
    };
    // A kg_ key carries a checksum: typos and truncations are refused without a lookup.
    if token.starts_with(keys::KEY_PREFIX.as_bytes()) && !keys::well_formed(token) {
        return Err(AuthError::Invalid);
    }
    let digest = keys::digest(token);
    let key = keys.lookup(&digest).ok_or(AuthError::Invalid)?;
    if key.revoked {
        return Err(AuthError::Revoked);
    }
    if key.expires_at().is_some_and(|t| now >= t) {
        return Err(AuthError::Expired);
    }
    if let Some(scope) = key.missing_scope(&route.scopes) {
        return Err(AuthError::InsufficientScope(scope.to_string()));
    }
    key.touch(now);
    Ok(Permit {
        route,
        key: Some(key),
        digest: Some(digest),
        strip: found.carrier,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::credential::parse_authorization;

    #[test]
    fn only_short_token_schemes_are_named_back() {
        let named = |v: &'static [u8]| match parse_authorization(v) {
            Credential::OtherScheme {
                scheme,
                has_credential,
            } => Presented::of(scheme, has_credential),
            other => panic!("{other:?}"),
        };
        assert_eq!(named(b"Bearer kg_x"), Presented::Scheme("Bearer".into()));
        assert_eq!(
            named(b"X-Custom-1 a"),
            Presented::Scheme("X-Custom-1".into())
        );
        assert_eq!(named(b"Bea<rer> x"), Presented::Unrecognized);
        assert_eq!(named(b"Bearer_ x"), Presented::Unrecognized);
        assert_eq!(named(b" x"), Presented::Unrecognized);
        assert_eq!(named(&[b'A'; 33]), Presented::NoScheme);
        let long = b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA x";
        assert_eq!(named(long), Presented::Unrecognized);
        assert_eq!(named(b"kg_secretsecret"), Presented::NoScheme);
        let refusal = AuthError::Missing(MissingKey {
            accepts: "`Authorization: Api-Key <key>`".into(),
            presented: named(b"kg_secretsecret"),
        });
        assert!(!refusal.to_string().contains("secret"));
    }
}
