//! The config file as serde reads it: every field optional and spanned, so validation can
//! report each problem at its place; plus the [`Shape`]s that unknown keys are checked against.

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::fields::Shape;

#[derive(Deserialize)]
// Required fields are `Option` too: a missing one becomes a problem beside the others
// instead of a serde error that ends the parse.
pub(super) struct RawConfig {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) keys_file: Option<Spanned<String>>,
    pub(super) state_file: Option<Spanned<String>>,
    pub(super) realm: Option<Spanned<String>>,
    pub(super) identity_headers: Option<RawIdentity>,
    pub(super) known_scopes: Option<Vec<Spanned<String>>>,
    pub(super) routes: Option<Spanned<Vec<Spanned<RawRoute>>>>,
    pub(super) tls: Option<Spanned<RawTls>>,
    pub(super) admin_listen: Option<Spanned<String>>,
    pub(super) log_format: Option<Spanned<String>>,
    pub(super) limits: Option<RawLimits>,
    pub(super) shutdown_grace: Option<Spanned<String>>,
    pub(super) shutdown_delay: Option<Spanned<String>>,
    pub(super) metrics: Option<RawMetrics>,
    pub(super) trusted_proxies: Option<Vec<Spanned<String>>>,
    pub(super) key_sources: Option<Spanned<Vec<Spanned<RawSource>>>>,
    pub(super) audit_log: Option<Spanned<String>>,
}

/// One `key_sources:` entry; exactly one field is meant to be set.
#[derive(Deserialize)]
pub(super) struct RawSource {
    pub(super) authorization: Option<Spanned<String>>,
    pub(super) header: Option<Spanned<String>>,
    pub(super) query: Option<Spanned<String>>,
}

#[derive(Deserialize)]
pub(super) struct RawTls {
    pub(super) cert: Spanned<String>,
    pub(super) key: Spanned<String>,
}

#[derive(Deserialize)]
pub(super) struct RawLimits {
    pub(super) max_header_bytes: Option<Spanned<SizeText>>,
    pub(super) header_read_timeout: Option<Spanned<String>>,
    pub(super) idle_timeout: Option<Spanned<String>>,
    pub(super) upstream_connect_timeout: Option<Spanned<String>>,
    pub(super) upstream_ping_interval: Option<Spanned<String>>,
    pub(super) max_connections: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
pub(super) struct RawMetrics {
    #[serde(default)]
    pub(super) per_key: bool,
}

/// A size written as a byte count or as text like `10MiB`.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum SizeText {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize)]
pub(super) struct RawIdentity {
    pub(super) key_id: Option<Spanned<String>>,
    pub(super) service_account: Option<Spanned<String>>,
}

#[derive(Deserialize)]
pub(super) struct RawRoute {
    pub(super) name: Option<Spanned<String>>,
    pub(super) path_prefix: Option<Spanned<String>>,
    pub(super) host: Option<Spanned<String>>,
    pub(super) methods: Option<Vec<Spanned<String>>>,
    pub(super) upstream: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) strip_prefix: bool,
    // Absent and `[]` differ: only `[]` admits any valid key.
    pub(super) scopes: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) public: Option<Spanned<bool>>,
    pub(super) max_body: Option<Spanned<SizeText>>,
    pub(super) ca_file: Option<Spanned<String>>,
    pub(super) tls_server_name: Option<Spanned<String>>,
    pub(super) websocket: Option<Spanned<bool>>,
    pub(super) key_sources: Option<Spanned<Vec<Spanned<RawSource>>>>,
    pub(super) preflight: Option<Spanned<String>>,
    pub(super) rate_limit: Option<Spanned<String>>,
}

// Unknown keys are found by walking these, not by serde, so that each one is reported with
// the file's other problems; `shapes_match_the_raw_structs` keeps them in step.
const TLS_SHAPE: Shape = Shape::Map("tls", &[("cert", Shape::Leaf), ("key", Shape::Leaf)]);
const LIMITS_SHAPE: Shape = Shape::Map(
    "limits",
    &[
        ("max_header_bytes", Shape::Leaf),
        ("header_read_timeout", Shape::Leaf),
        ("idle_timeout", Shape::Leaf),
        ("upstream_connect_timeout", Shape::Leaf),
        ("upstream_ping_interval", Shape::Leaf),
        ("max_connections", Shape::Leaf),
    ],
);
const METRICS_SHAPE: Shape = Shape::Map("metrics", &[("per_key", Shape::Leaf)]);
const IDENTITY_SHAPE: Shape = Shape::Map(
    "identity_headers",
    &[("key_id", Shape::Leaf), ("service_account", Shape::Leaf)],
);
const SOURCE_SHAPE: Shape = Shape::Map(
    "key source",
    &[
        ("authorization", Shape::Leaf),
        ("header", Shape::Leaf),
        ("query", Shape::Leaf),
    ],
);
const ROUTE_SHAPE: Shape = Shape::Map(
    "route",
    &[
        ("name", Shape::Leaf),
        ("path_prefix", Shape::Leaf),
        ("host", Shape::Leaf),
        ("methods", Shape::Leaf),
        ("upstream", Shape::Leaf),
        ("strip_prefix", Shape::Leaf),
        ("scopes", Shape::Leaf),
        ("timeout", Shape::Leaf),
        ("public", Shape::Leaf),
        ("max_body", Shape::Leaf),
        ("ca_file", Shape::Leaf),
        ("tls_server_name", Shape::Leaf),
        ("websocket", Shape::Leaf),
        ("key_sources", Shape::List(&SOURCE_SHAPE)),
        ("preflight", Shape::Leaf),
        ("rate_limit", Shape::Leaf),
    ],
);
pub(super) const CONFIG_SHAPE: Shape = Shape::Map(
    "the config",
    &[
        ("listen", Shape::Leaf),
        ("keys_file", Shape::Leaf),
        ("state_file", Shape::Leaf),
        ("realm", Shape::Leaf),
        ("identity_headers", IDENTITY_SHAPE),
        ("known_scopes", Shape::Leaf),
        ("routes", Shape::List(&ROUTE_SHAPE)),
        ("tls", TLS_SHAPE),
        ("admin_listen", Shape::Leaf),
        ("log_format", Shape::Leaf),
        ("limits", LIMITS_SHAPE),
        ("shutdown_grace", Shape::Leaf),
        ("shutdown_delay", Shape::Leaf),
        ("metrics", METRICS_SHAPE),
        ("key_sources", Shape::List(&SOURCE_SHAPE)),
        ("audit_log", Shape::Leaf),
        ("trusted_proxies", Shape::Leaf),
    ],
);

#[cfg(test)]
mod tests {
    use super::*;

    /// The field list serde derived for `T`, read by a deserializer that only records it.
    fn serde_fields<T: Deserialize<'static>>() -> Vec<&'static str> {
        struct Capture(Vec<&'static str>);
        impl<'de> serde::Deserializer<'de> for &mut Capture {
            type Error = serde::de::value::Error;
            fn deserialize_any<V: serde::de::Visitor<'de>>(
                self,
                _: V,
            ) -> Result<V::Value, Self::Error> {
                Err(serde::de::Error::custom("not a struct"))
            }
            fn deserialize_struct<V: serde::de::Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                self.0 = fields.to_vec();
                Err(serde::de::Error::custom("captured"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
                enum identifier ignored_any
            }
        }
        let mut c = Capture(Vec::new());
        let _ = T::deserialize(&mut c);
        let mut f = c.0;
        f.sort_unstable();
        f
    }

    fn shape_fields(shape: &Shape) -> Vec<&'static str> {
        let Shape::Map(_, fields) = shape else {
            panic!("not a map shape")
        };
        let mut f: Vec<&'static str> = fields.iter().map(|(n, _)| *n).collect();
        f.sort_unstable();
        f
    }

    #[test]
    fn shapes_match_the_raw_structs() {
        assert_eq!(shape_fields(&CONFIG_SHAPE), serde_fields::<RawConfig>());
        assert_eq!(shape_fields(&ROUTE_SHAPE), serde_fields::<RawRoute>());
        assert_eq!(shape_fields(&TLS_SHAPE), serde_fields::<RawTls>());
        assert_eq!(shape_fields(&LIMITS_SHAPE), serde_fields::<RawLimits>());
        assert_eq!(shape_fields(&METRICS_SHAPE), serde_fields::<RawMetrics>());
        assert_eq!(shape_fields(&IDENTITY_SHAPE), serde_fields::<RawIdentity>());
        assert_eq!(shape_fields(&SOURCE_SHAPE), serde_fields::<RawSource>());
    }
}
