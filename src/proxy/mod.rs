//! The proxy: the listener accepts connections, the pipeline takes each request through its
//! stages (ingress checks, route, credential, authorize, policy, forward), `error` turns refusals
//! into responses and `observe` reports every response's end.

pub mod authorize;
pub(crate) mod conn;
pub mod credential;
pub(crate) mod error;
pub(crate) mod forward;
pub(crate) mod listener;
pub(crate) mod multiplex;
pub(crate) mod observe;
pub(crate) mod pipeline;
pub(crate) mod policy;
pub(crate) mod pool;
pub(crate) mod resend;
pub(crate) mod tunnel;
pub(crate) mod upstream;
