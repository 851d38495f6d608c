//! `key_sources:` (top level, and per route to override it): where a request's key may be
//! read from, checked into [`KeySources`] with the route's challenge and refusal text prebuilt.

use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use serde_saphyr::{Location, Spanned};

use super::check::Check;
use super::raw::RawSource;

/// One place a key may be read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `Authorization: <scheme> <key>`.
    Authorization(Scheme),
    /// A named header holding the key alone.
    Header(HeaderName),
    /// A query parameter, by its (decoded) name.
    Query(Box<str>),
}

/// An `Authorization` scheme a key may come under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `Api-Key <key>`, keygate's own.
    ApiKey,
    /// `Bearer <key>` (RFC 6750), for clients that only know bearer tokens.
    Bearer,
}

impl Scheme {
    /// The scheme name as it is matched (case-insensitively) and named in challenges.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::ApiKey => "Api-Key",
            Scheme::Bearer => "Bearer",
        }
    }
}

/// A route's checked key sources, with what its refusals say prebuilt once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySources {
    /// The sources, in the order written.
    pub list: Vec<KeySource>,
    /// `WWW-Authenticate` for this route's 401s: one challenge per accepted scheme.
    pub challenge: HeaderValue,
    /// What a "missing key" refusal says is accepted, e.g. "`Authorization: Api-Key <key>`".
    pub accepts: Arc<str>,
}

impl KeySources {
    /// The default, `[{authorization: api-key}]`, whose challenge is `realm`'s.
    pub(super) fn default_for(realm: &HeaderValue) -> KeySources {
        KeySources::new(vec![KeySource::Authorization(Scheme::ApiKey)], realm)
    }

    fn new(list: Vec<KeySource>, realm_challenge: &HeaderValue) -> KeySources {
        let accepts = list
            .iter()
            .map(|s| match s {
                KeySource::Authorization(scheme) => {
                    format!("`Authorization: {} <key>`", scheme.name())
                }
                KeySource::Header(name) => format!("`{name}: <key>`"),
                KeySource::Query(name) => format!("`?{name}=<key>`"),
            })
            .collect::<Vec<_>>();
        let accepts = match accepts.as_slice() {
            [one] => one.clone(),
            [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
            [] => String::new(),
        };
        KeySources {
            challenge: challenge(&list, realm_challenge),
            list,
            accepts: accepts.into(),
        }
    }

    /// True when some source reads the `Authorization` header.
    pub fn reads_authorization(&self) -> bool {
        self.list
            .iter()
            .any(|s| matches!(s, KeySource::Authorization(_)))
    }
}

/// One challenge per accepted scheme, each with the realm. A route that reads keys only from a
/// header or the query still answers with the `Api-Key` challenge: a 401 must carry one, and
/// no registered scheme names a custom header.
fn challenge(list: &[KeySource], realm_challenge: &HeaderValue) -> HeaderValue {
    // `realm_challenge` is `Api-Key realm="..."`; its parameters are reused for each scheme.
    let params = realm_challenge
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .map_or("realm=\"keygate\"", |(_, p)| p);
    let schemes: Vec<String> = list
        .iter()
        .filter_map(|s| match s {
            KeySource::Authorization(scheme) => Some(format!("{} {params}", scheme.name())),
            KeySource::Header(_) | KeySource::Query(_) => None,
        })
        .collect();
    if schemes.is_empty() {
        return realm_challenge.clone();
    }
    HeaderValue::from_str(&schemes.join(", ")).unwrap_or_else(|_| realm_challenge.clone())
}

/// Checks a `key_sources:` list; `inherited` is what an absent list means.
pub(super) fn key_sources(
    c: &mut Check<'_>,
    raw: Option<&Spanned<Vec<Spanned<RawSource>>>>,
    inherited: &Arc<KeySources>,
    realm: &HeaderValue,
    reserved: &[&HeaderName],
) -> Arc<KeySources> {
    let Some(raw) = raw else {
        return inherited.clone();
    };
    if raw.value.is_empty() {
        c.at(
            raw.referenced,
            "key_sources is empty: no key could ever be read; omit it for the default",
        );
        return inherited.clone();
    }
    let mut list: Vec<KeySource> = Vec::with_capacity(raw.value.len());
    for entry in &raw.value {
        let Some(source) = source(c, entry.referenced, &entry.value, reserved) else {
            continue;
        };
        if list.contains(&source) {
            c.at(entry.referenced, "this key source is listed twice");
            continue;
        }
        list.push(source);
    }
    if list.is_empty() {
        return inherited.clone();
    }
    Arc::new(KeySources::new(list, realm))
}

/// One entry: exactly one of `authorization`, `header`, `query`.
fn source(
    c: &mut Check<'_>,
    at: Location,
    raw: &RawSource,
    reserved: &[&HeaderName],
) -> Option<KeySource> {
    let given = [&raw.authorization, &raw.header, &raw.query]
        .iter()
        .filter(|f| f.is_some())
        .count();
    if given != 1 {
        c.at(
            at,
            "a key source is one of `authorization: api-key`, `authorization: bearer`, \
             `header: NAME` or `query: NAME`",
        );
        return None;
    }
    if let Some(a) = &raw.authorization {
        return match a.value.to_ascii_lowercase().as_str() {
            "api-key" => Some(KeySource::Authorization(Scheme::ApiKey)),
            "bearer" => Some(KeySource::Authorization(Scheme::Bearer)),
            _ => {
                c.at(
                    a.referenced,
                    format!(
                        "unknown authorization scheme {:?}: expected api-key or bearer",
                        a.value
                    ),
                );
                None
            }
        };
    }
    if let Some(h) = &raw.header {
        return header(c, h, reserved);
    }
    let q = raw.query.as_ref()?;
    let ok = !q.value.is_empty()
        && q.value
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'&' | b'=' | b'#' | b'%' | b'+'));
    if !ok {
        c.at(
            q.referenced,
            format!(
                "invalid query parameter name {:?}: expected visible ASCII without & = # % +",
                q.value
            ),
        );
        return None;
    }
    Some(KeySource::Query(q.value.as_str().into()))
}

fn header(c: &mut Check<'_>, h: &Spanned<String>, reserved: &[&HeaderName]) -> Option<KeySource> {
    let Ok(name) = HeaderName::from_bytes(h.value.as_bytes()) else {
        c.at(h.referenced, format!("invalid header name {:?}", h.value));
        return None;
    };
    if name == http::header::AUTHORIZATION {
        c.at(
            h.referenced,
            "the Authorization header is read with `authorization: api-key` or `authorization: bearer`",
        );
        return None;
    }
    if crate::wire::headers::is_reserved(&name) || reserved.contains(&&name) {
        c.at(
            h.referenced,
            format!("header {name} is one the gateway manages; it cannot carry keys"),
        );
        return None;
    }
    Some(KeySource::Header(name))
}
