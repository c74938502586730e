//! easemob-gateway: an authenticating reverse proxy in front of Easemob's IM REST API that serves exactly six
//! one-way deletion routes, holds the App Token itself, and validates every request before it costs anything.
//!
//! The data plane is a tower middleware stack, built in `stack.rs`; each layer lives in the module that owns its
//! concern, outermost first:
//! - `observe`   one log line and the metrics per answer, read off the final answer
//! - `rescue`    the one layer that turns failures (typed errors, from every layer below) into answers
//! - `head`      the request head's 64 KiB cap, measured on the parsed head
//! - `access`    who may call: source networks and optional per-caller keys
//! - `shed`      the in-flight limit: a fast 503 past `server.max_in_flight`
//! - `router`    each path to its handler: the Easemob stack, the SDK token placeholder, the jobs API (`jobs/api.rs`)
//! - `routes`    the route table and the one resolver of every path; `routes/layer.rs` validates
//!   (`routes/validate.rs`) into a typed `Call`
//! - `audit`     the audit trail: one JSON line per deletion sent to Easemob, written before the answer
//! - `token`     the App Token: background fetch and refresh, single flight; injection and the 401 replay;
//!   the SDK's placeholder
//! - `retry`     the one safe retry, under its budget
//! - `ratelimit` the quota: governor-paced lanes, per-user windows, Redis; a slot per call sent
//! - `upstream`  the hyper client towards Easemob, and the innermost service that forwards a call
//!
//! Around them:
//! - `exchange`  what the layers pass: the validated `Exchange`, shared by its attempts, and the `Answer` with the
//!   marks it carries up
//! - `apps`      the configured apps and their lanes (metric handles, `RateLimit-Policy`)
//! - `trace`     W3C trace context and the sampler; `trace/export.rs` exports a sampled request's spans over OTLP
//! - `redact`    the secrets held, scrubbed from every answer Easemob gives before anything shows it
//! - `error`     the gateway's own errors, and how one is answered in Easemob's envelope (the rescue layer's)
//! - `redis_conn` the connection to the shared Redis, one server or a Redis Cluster, and the app's key hash tag
//! - `config`    typed configuration (TOML + `EASEMOB_GW__…` env), read strictly; a file per section, checking itself
//! - `metrics`   the Prometheus registry and every metric family
//! - `server`    the gateway's life: start-up, serving, shutdown, as one short sequence
//! - `bootstrap` a checked config into what every stack shares (`Shared`), one way for start-up and for reloads
//! - `reload`    whole-config reload: on SIGHUP or a changed file, checked in full, then swapped in
//! - `listener`  the listeners, the data plane's worker threads, connection limits and the graceful drain
//! - `connection` one connection's stack as hyper's service: rebuilt after a reload, waited for when not ready
//! - `admin`     the admin endpoints: health, readiness, metrics
//! - `logging`   the tracing subscriber (text or JSON)
//! - `sim`       the Easemob simulator used by `demo`, the tests and the benchmarks
//! - `demo`      the gateway in front of the simulator, with ready-to-paste curl lines

#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod apps;
pub mod audit;
pub mod bootstrap;
pub mod client;
pub mod config;
pub mod connection;
pub mod demo;
pub mod error;
pub mod exchange;
pub mod head;
pub mod jobs;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod observe;
pub mod ratelimit;
pub mod redact;
pub mod redis_conn;
pub mod reload;
pub mod request_id;
pub mod rescue;
pub mod retry;
pub mod router;
pub mod routes;
pub mod server;
pub mod shed;
pub mod sim;
pub mod stack;
pub mod status;
#[cfg(test)]
mod testing;
pub mod token;
pub mod trace;
pub mod upstream;

/// Sent to Easemob on every call, so its logs can tell the gateway's traffic apart.
pub const USER_AGENT: &str = concat!("easemob-gateway/", env!("CARGO_PKG_VERSION"));
