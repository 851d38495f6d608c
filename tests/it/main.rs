//! Black-box tests over real sockets: a real gateway, real upstreams, real clients.

mod support;

mod auth;
mod cli;
mod deploy;
mod edge;
mod faults;
mod forwarding;
mod hostile;
mod keys_audit;
mod keys_cli;
mod multiplex;
mod observability;
mod ops;
mod paths;
mod policy;
mod policy_sources;
mod pooling;
mod production;
mod protocols;
mod reload;
mod routing;
mod tls;
mod validate;
