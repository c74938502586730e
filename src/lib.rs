//! easemob-gateway: an authenticating reverse proxy in front of Easemob's IM REST API that serves exactly six
//! one-way deletion routes, holds the App Token itself, and validates every request before it costs anything.
//!
//! - `access`   who may call: source networks and optional per-caller keys
//! - `audit`    the audit trail: one JSON line per deletion sent to Easemob, written before the answer
//! - `config`   typed configuration (TOML + `EASEMOB_GW__…` env), parsed once, checked as a whole
//! - `routes`   the six routes and their path shapes; `routes/validate.rs` turns a request into a typed `Call`
//! - `proxy`    the request path: resolve, validate, token, forward, replay once on 401, pass the answer back
//! - `ratelimit` the quota: governor lanes per AppKey and route, waiting in arrival order, adaptive on 429
//! - `token`    the App Token: background fetch and refresh, single flight, invalidation on 401
//! - `upstream` the hyper client towards Easemob: TLS roots, pool, timeouts
//! - `error`    the gateway's own errors and the one place that turns them into Easemob-shaped answers
//! - `metrics`  the Prometheus registry and every metric family
//! - `server`   listeners, the middleware stack, admin endpoints, graceful shutdown
//! - `logging`  the tracing subscriber (text or JSON)
//! - `sim`      the Easemob simulator used by `demo`, the tests and the benchmarks
//! - `demo`     the gateway in front of the simulator, with ready-to-paste curl lines

#![forbid(unsafe_code)]

pub mod access;
pub mod audit;
pub mod config;
pub mod demo;
pub mod error;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod sim;
pub mod token;
pub mod upstream;

/// Sent to Easemob on every call, so its logs can tell the gateway's traffic apart.
pub const USER_AGENT: &str = concat!("easemob-gateway/", env!("CARGO_PKG_VERSION"));
