//! What the protocols say, as pure functions with no state: path normalization, header rules,
//! TLS material. Config validation and the request path both build on these.

pub mod client;
pub mod headers;
pub mod path;
pub mod tls;
