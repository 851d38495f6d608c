//! Key sources: where a request's key is read from, and exactly what carried it, so that
//! forwarding strips what authorization read and nothing else.
//!
//! Today one source, `Authorization: Api-Key <key>`; further sources (Bearer, a named header, a
//! query parameter) are added here and nowhere else.

use http::header::{HeaderMap, AUTHORIZATION};

/// What carried a credential, for stripping before the request goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// The `Authorization` header.
    Authorization,
}

impl Carrier {
    /// Removes this carrier from an upstream request's headers.
    pub fn strip(self, headers: &mut HeaderMap) {
        match self {
            Carrier::Authorization => {
                headers.remove(AUTHORIZATION);
            }
        }
    }
}

/// A request offered its key ambiguously.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Two `Authorization` headers: which one counts would be a guess.
    #[error("more than one Authorization header")]
    Duplicate,
}

/// What the key sources found, and what carried it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found<'h> {
    /// The credential as presented.
    pub credential: Credential<'h>,
    /// Where it came from; `None` when nothing was presented.
    pub carrier: Option<Carrier>,
}

/// Reads the request's credential from its sources; duplicates are refused, never picked.
pub fn extract(headers: &HeaderMap) -> Result<Found<'_>, CredentialError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(Found {
            credential: Credential::Absent,
            carrier: None,
        });
    };
    if values.next().is_some() {
        return Err(CredentialError::Duplicate);
    }
    Ok(Found {
        credential: parse_authorization(value.as_bytes()),
        carrier: Some(Carrier::Authorization),
    })
}

/// What the `Authorization` header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'h> {
    /// No header.
    Absent,
    /// Some other scheme (Basic, Bearer...): its name, and whether anything followed it.
    OtherScheme {
        /// The scheme as sent; client text, never echoed unchecked.
        scheme: &'h [u8],
        /// A space and more came after the scheme.
        has_credential: bool,
    },
    /// `Api-Key` with something other than exactly one token.
    MalformedApiKey,
    /// `Api-Key <token>`.
    ApiKey(&'h [u8]),
}

/// Parses `Api-Key <token>`; the scheme name is case-insensitive.
pub fn parse_authorization(value: &[u8]) -> Credential<'_> {
    const SCHEME: &[u8] = b"api-key";
    // The scheme ends at the first space or tab: `Api-Key<TAB>kg_...` is a malformed Api-Key
    // credential (refused, and stripped on public routes), never "another scheme" that would
    // pass upstream with the key in it.
    let (scheme, rest, tab) = match value.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(i) => (&value[..i], &value[i + 1..], value[i] == b'\t'),
        None => (value, &[][..], false),
    };
    if scheme.eq_ignore_ascii_case(SCHEME) && tab {
        return Credential::MalformedApiKey;
    }
    if !scheme.eq_ignore_ascii_case(SCHEME) {
        return Credential::OtherScheme {
            scheme,
            has_credential: scheme.len() < value.len(),
        };
    }
    let one_token = !rest.is_empty() && rest.iter().all(|&b| b.is_ascii_graphic() || b >= 0x80);
    if one_token {
        Credential::ApiKey(rest)
    } else {
        Credential::MalformedApiKey
    }
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

    #[test]
    fn two_authorization_headers_are_refused() {
        let mut h = HeaderMap::new();
        h.append(AUTHORIZATION, "Api-Key a".parse().unwrap());
        assert_eq!(extract(&h).unwrap().carrier, Some(Carrier::Authorization));
        h.append(AUTHORIZATION, "Api-Key b".parse().unwrap());
        assert_eq!(extract(&h), Err(CredentialError::Duplicate));
        let mut up = h.clone();
        Carrier::Authorization.strip(&mut up);
        assert!(up.get(AUTHORIZATION).is_none());
    }
}
