//! Operations: metrics, the access log and the admin listener. The request path tells them
//! about requests through plain values (an `accesslog::Entry`, counters); they know nothing of
//! the proxy's services.

pub mod accesslog;
pub mod admin;
pub mod metrics;
pub mod trim;
