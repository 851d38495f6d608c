//! Key sources: where a request's key is read from (the route's `key_sources`), and exactly
//! what carried it, so that forwarding strips what authorization read and nothing else.
//!
//! "Offering" a key means a present, non-empty value in a configured source: an
//! `Authorization` header under a configured scheme, a configured header, a configured query
//! parameter. Two offerings are refused, never picked between; so are two `Authorization`
//! headers, two of a configured header and two non-empty values of a configured parameter.

use std::borrow::Cow;

use http::header::{HeaderMap, HeaderName, AUTHORIZATION};

use crate::config::{KeySource, KeySources, Scheme};

/// What carried a credential, for stripping before the request goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier<'s> {
    /// The `Authorization` header.
    Authorization,
    /// A configured header.
    Header(&'s HeaderName),
    /// A configured query parameter, by name.
    Query(&'s str),
}

impl Carrier<'_> {
    /// Removes this carrier from an upstream request's headers (a query carrier is cut out of
    /// the query by [`Carrier::strip_query`] instead).
    pub fn strip(self, headers: &mut HeaderMap) {
        match self {
            Carrier::Authorization => {
                headers.remove(AUTHORIZATION);
            }
            Carrier::Header(name) => {
                headers.remove(name);
            }
            Carrier::Query(_) => {}
        }
    }

    /// The query without this carrier's parameter: every other parameter kept, byte for byte
    /// and in order; `None` when nothing is left (so the `?` goes too).
    pub fn strip_query(self, query: Option<&str>) -> Option<Cow<'_, str>> {
        let q = query?;
        let Carrier::Query(name) = self else {
            return Some(Cow::Borrowed(q));
        };
        if !q.split('&').any(|p| param_is(p, name)) {
            return Some(Cow::Borrowed(q));
        }
        let kept: Vec<&str> = q.split('&').filter(|p| !param_is(p, name)).collect();
        if kept.is_empty() {
            return None;
        }
        Some(Cow::Owned(kept.join("&")))
    }
}

/// A request offered its key ambiguously.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Two `Authorization` headers: which one counts would be a guess.
    #[error("more than one Authorization header")]
    Duplicate,
    /// A configured header sent twice, or a configured parameter with two values.
    #[error("the API key source is repeated")]
    Repeated,
    /// Keys offered through two sources at once.
    #[error("API keys were offered through more than one source")]
    TwoSources,
}

/// What the key sources found, and what carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found<'h, 's> {
    /// The credential as presented.
    pub credential: Credential<'h>,
    /// Where it came from; `None` when no configured source offered a key.
    pub carrier: Option<Carrier<'s>>,
}

/// Refuses two `Authorization` headers, whatever the route reads: checked before routing.
pub fn single_authorization(headers: &HeaderMap) -> Result<(), CredentialError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    if values.next().is_some() && values.next().is_some() {
        return Err(CredentialError::Duplicate);
    }
    Ok(())
}

/// Reads the request's credential from the route's sources; a second offering is refused,
/// never picked.
pub fn extract<'h, 's>(
    headers: &'h HeaderMap,
    query: Option<&'h str>,
    sources: &'s KeySources,
) -> Result<Found<'h, 's>, CredentialError> {
    // The same refusal as `single_authorization`, from the one lookup that finds the value.
    let mut authorizations = headers.get_all(AUTHORIZATION).iter();
    let authorization = authorizations.next().map(|v| v.as_bytes());
    if authorizations.next().is_some() {
        return Err(CredentialError::Duplicate);
    }
    let mut found: Option<Found<'h, 's>> = None;
    for source in &sources.list {
        let offered = match source {
            KeySource::Authorization(scheme) => authorization
                .and_then(|v| parse_scheme(v, *scheme))
                .map(|c| (c, Carrier::Authorization)),
            KeySource::Header(name) => {
                from_header(headers, name)?.map(|c| (c, Carrier::Header(name)))
            }
            KeySource::Query(name) => from_query(query, name)?.map(|c| (c, Carrier::Query(name))),
        };
        if let Some((credential, carrier)) = offered {
            if found.is_some() {
                return Err(CredentialError::TwoSources);
            }
            found = Some(Found {
                credential,
                carrier: Some(carrier),
            });
        }
    }
    if let Some(f) = found {
        return Ok(f);
    }
    // Nothing offered: say what the Authorization header held, when the route reads it, so
    // the refusal can name the scheme that came instead.
    let credential = match authorization {
        Some(v) if sources.reads_authorization() => parse_authorization(v),
        _ => Credential::Absent,
    };
    Ok(Found {
        credential,
        carrier: None,
    })
}

/// A configured header: absent or empty offers nothing; the key is its whole value.
fn from_header<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
) -> Result<Option<Credential<'h>>, CredentialError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(CredentialError::Repeated);
    }
    let v = first.as_bytes();
    Ok((!v.is_empty()).then(|| token(Cow::Borrowed(v))))
}

/// A configured query parameter: only a non-empty value offers a key.
fn from_query<'h>(
    query: Option<&'h str>,
    name: &str,
) -> Result<Option<Credential<'h>>, CredentialError> {
    let Some(q) = query else { return Ok(None) };
    let mut offered = q
        .split('&')
        .filter(|p| param_is(p, name))
        .filter_map(|p| p.split_once('=').map(|(_, v)| v))
        .filter(|v| !v.is_empty());
    let Some(value) = offered.next() else {
        return Ok(None);
    };
    if offered.next().is_some() {
        return Err(CredentialError::Repeated);
    }
    Ok(Some(token(percent_decode(value))))
}

/// Whether a `name=value` pair (or a bare `name`) is the parameter `name`, compared after
/// percent-decoding, so `api%5Fkey=...` is not a way past stripping.
fn param_is(pair: &str, name: &str) -> bool {
    let raw = pair.split_once('=').map_or(pair, |(n, _)| n);
    *percent_decode(raw) == *name.as_bytes()
}

/// Percent-decodes `%XX` (and `+` as a space, as forms do); a bad escape stays as written.
fn percent_decode(s: &str) -> Cow<'_, [u8]> {
    let b = s.as_bytes();
    if !b.iter().any(|&c| c == b'%' || c == b'+') {
        return Cow::Borrowed(b);
    }
    let hex = |c: u8| (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    Cow::Owned(out)
}

/// A key standing alone: one token of visible characters, else malformed.
fn token(v: Cow<'_, [u8]>) -> Credential<'_> {
    // Visible ASCII or any byte >= 0x80: everything above space but DEL. Folded without an
    // early exit so the compiler checks many bytes at once; every request's key passes here.
    let clean = v.iter().fold(true, |ok, &b| ok & (b > b' ') & (b != 0x7f));
    if !v.is_empty() && clean {
        Credential::ApiKey(v)
    } else {
        Credential::MalformedApiKey
    }
}

/// What a request's key sources carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential<'h> {
    /// Nothing offered.
    Absent,
    /// An `Authorization` scheme the route does not read (Basic...): its name, and whether
    /// anything followed it.
    OtherScheme {
        /// The scheme as sent; client text, never echoed unchecked.
        scheme: &'h [u8],
        /// A space and more came after the scheme.
        has_credential: bool,
    },
    /// A configured source holding something other than exactly one token.
    MalformedApiKey,
    /// The key, as sent (a query parameter's percent-decoded).
    ApiKey(Cow<'h, [u8]>),
}

/// Parses `Api-Key <token>`; the scheme name is case-insensitive.
pub fn parse_authorization(value: &[u8]) -> Credential<'_> {
    match parse_scheme(value, Scheme::ApiKey) {
        Some(c) => c,
        None => {
            let end = value
                .iter()
                .position(|&b| b == b' ' || b == b'\t')
                .unwrap_or(value.len());
            Credential::OtherScheme {
                scheme: &value[..end],
                has_credential: end < value.len(),
            }
        }
    }
}

/// Reads `<scheme> <token>` when the value is under `scheme` (case-insensitive); `None` when
/// it is another scheme.
fn parse_scheme(value: &[u8], scheme: Scheme) -> Option<Credential<'_>> {
    // The scheme ends at the first space or tab: `Api-Key<TAB>kg_...` is a malformed
    // credential (refused, and stripped on public routes), never "another scheme" that would
    // pass upstream with the key in it.
    let (name, rest, tab) = match value.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(i) => (&value[..i], &value[i + 1..], value[i] == b'\t'),
        None => (value, &[][..], false),
    };
    if !name.eq_ignore_ascii_case(scheme.name().as_bytes()) {
        return None;
    }
    if tab || rest.is_empty() {
        return Some(Credential::MalformedApiKey);
    }
    Some(token(Cow::Borrowed(rest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_visible_ascii_or_high_bytes_for_every_byte_value() {
        for b in 0..=u8::MAX {
            let v = [b'k', b'g', b, b'_'];
            let expected = b.is_ascii_graphic() || b >= 0x80;
            let got = matches!(token(Cow::Borrowed(&v)), Credential::ApiKey(_));
            assert_eq!(got, expected, "byte {b:#04x}");
        }
        assert_eq!(token(Cow::Borrowed(b"")), Credential::MalformedApiKey);
    }

    #[test]
    fn scheme_is_case_insensitive() {
        assert_eq!(
            parse_authorization(b"Api-Key abc"),
            Credential::ApiKey(Cow::Borrowed(b"abc"))
        );
        assert_eq!(
            parse_authorization(b"API-KEY abc"),
            Credential::ApiKey(Cow::Borrowed(b"abc"))
        );
        assert_eq!(
            parse_authorization(b"api-key abc"),
            Credential::ApiKey(Cow::Borrowed(b"abc"))
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
        assert_eq!(
            parse_authorization(b"Bearer x"),
            Credential::OtherScheme {
                scheme: b"Bearer",
                has_credential: true
            }
        );
        assert_eq!(
            parse_authorization(b"Api-Keyx y"),
            Credential::OtherScheme {
                scheme: b"Api-Keyx",
                has_credential: true
            }
        );
        assert_eq!(
            parse_authorization(b"kg_abc"),
            Credential::OtherScheme {
                scheme: b"kg_abc",
                has_credential: false
            }
        );
    }

    #[test]
    fn a_tab_after_api_key_is_malformed_not_another_scheme() {
        assert_eq!(
            parse_authorization(b"Api-Key\tkg_abc"),
            Credential::MalformedApiKey
        );
        assert_eq!(
            parse_authorization(b"api-key\t"),
            Credential::MalformedApiKey
        );
    }

    fn sources(list: Vec<KeySource>) -> KeySources {
        let text = "keys_file: k\nroutes: [{name: a, path_prefix: /, upstream: 'http://a:1', public: true}]\n";
        let cfg = crate::config::Config::parse(std::path::Path::new("c.yaml"), text).unwrap();
        let base = cfg.routes.iter().next().unwrap().key_sources.clone();
        KeySources {
            list,
            ..(*base).clone()
        }
    }

    fn all() -> KeySources {
        sources(vec![
            KeySource::Authorization(Scheme::ApiKey),
            KeySource::Authorization(Scheme::Bearer),
            KeySource::Header(HeaderName::from_static("x-api-key")),
            KeySource::Query("api_key".into()),
        ])
    }

    #[test]
    fn two_authorization_headers_are_refused() {
        let default = sources(vec![KeySource::Authorization(Scheme::ApiKey)]);
        let mut h = HeaderMap::new();
        h.append(AUTHORIZATION, "Api-Key a".parse().unwrap());
        assert_eq!(
            extract(&h, None, &default).unwrap().carrier,
            Some(Carrier::Authorization)
        );
        h.append(AUTHORIZATION, "Api-Key b".parse().unwrap());
        assert_eq!(extract(&h, None, &default), Err(CredentialError::Duplicate));
        let mut up = h.clone();
        Carrier::Authorization.strip(&mut up);
        assert!(up.get(AUTHORIZATION).is_none());
    }

    #[test]
    fn each_source_and_two_at_once() {
        let all = all();
        fn key<'s>(f: Found<'_, 's>) -> (Vec<u8>, Option<Carrier<'s>>) {
            match f.credential {
                Credential::ApiKey(k) => (k.into_owned(), f.carrier),
                other => panic!("{other:?}"),
            }
        }
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "bearer kg_b".parse().unwrap());
        assert_eq!(
            key(extract(&h, None, &all).unwrap()),
            (b"kg_b".to_vec(), Some(Carrier::Authorization))
        );
        assert_eq!(
            extract(&h, Some("api_key=kg_q"), &all),
            Err(CredentialError::TwoSources)
        );
        let x = HeaderName::from_static("x-api-key");
        let mut h = HeaderMap::new();
        h.insert(&x, "kg_h".parse().unwrap());
        assert_eq!(
            key(extract(&h, Some("a=1&api_key="), &all).unwrap()),
            (b"kg_h".to_vec(), Some(Carrier::Header(&x)))
        );
        assert_eq!(
            key(extract(&HeaderMap::new(), Some("a=1&api%5Fkey=kg%5Fq"), &all).unwrap()),
            (b"kg_q".to_vec(), Some(Carrier::Query("api_key")))
        );
        assert_eq!(
            extract(&HeaderMap::new(), Some("api_key=a&api_key=b"), &all),
            Err(CredentialError::Repeated)
        );
        // Basic belongs to the upstream: not an offering, so no conflict with the header.
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        h.insert(&x, "kg_h".parse().unwrap());
        assert_eq!(
            extract(&h, None, &all).unwrap().carrier,
            Some(Carrier::Header(&x))
        );
        // Unconfigured sources are not read at all.
        let only_header = sources(vec![KeySource::Header(x.clone())]);
        assert_eq!(
            extract(&HeaderMap::new(), Some("api_key=kg_q"), &only_header).unwrap(),
            Found {
                credential: Credential::Absent,
                carrier: None
            }
        );
    }

    #[test]
    fn the_query_loses_only_the_key_parameter() {
        let q = Carrier::Query("api_key");
        let cut = |s: &'static str| q.strip_query(Some(s)).map(|c| c.into_owned());
        assert_eq!(cut("a=1&api_key=k&b=%20&c").as_deref(), Some("a=1&b=%20&c"));
        assert_eq!(cut("api_key=k"), None);
        assert_eq!(cut("api_key=k&api%5Fkey=j"), None);
        assert_eq!(cut("z=2&a=1").as_deref(), Some("z=2&a=1"));
        assert_eq!(
            cut("api_keyx=1&x=api_key").as_deref(),
            Some("api_keyx=1&x=api_key")
        );
        assert_eq!(Carrier::Authorization.strip_query(None), None);
    }
}
