//! keygate: an API gateway that lets through only requests carrying a valid, unexpired,
//! unrevoked API key with the right scope.
//!
//! ```text
//!  client ─► proxy::listener ─► proxy::pipeline ─────────────────────────────────────► upstream
//!            workers, accept,   ingress ─► route ─► credential ─► authorize ─► policy ─► forward
//!            conn lifecycle     (wire::path, (config  (KeySource: what (Permit:  (cidrs,  (upstream
//!            (proxy::conn)       headers,     routes)  to strip)        key+strip) rates,  clients)
//!                                client)                                          quota)
//!                                      │ refusals: proxy::error (JSON or gRPC status)
//!  client ◄── response ◄── proxy::observe (end of body: ops::accesslog, ops::metrics) ◄──┘
//!
//!  control::reload: config + key file + cert ─settle, validate─► control::snapshot ─ArcSwap─►
//!  cli: serve (wires it all), keys (the key lifecycle), demo and echo, validate
//! ```
//!
//! Layers, each using only those below it: `cli` ─► `proxy` ─► `control` ─► `ops` ─►
//! `config` / `keys` ─► `wire`. The request path loads one snapshot per request without a lock;
//! reload builds a new one off the path and swaps it in.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cli;
pub mod config;
pub(crate) mod control;
pub mod keys;
pub(crate) mod ops;
pub mod proxy;
pub mod wire;

pub use cli::serve::{serve, shutdown_signal, ServeError};
pub use ops::trim;
