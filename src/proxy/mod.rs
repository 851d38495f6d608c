//! The proxy: the listener accepts connections, the pipeline takes each request through its
//! stages (ingress checks, route, credential, authorize, forward), `error` turns refusals
//! into responses and `observe` reports every response's end.

pub mod authorize;
pub mod conn;
pub mod credential;
pub mod error;
pub mod forward;
pub mod listener;
pub mod observe;
pub mod pipeline;
pub mod tunnel;
pub mod upstream;
