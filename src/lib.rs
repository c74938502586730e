//! easemob-gateway: an authenticating reverse proxy in front of Easemob's IM REST API that serves exactly six
//! one-way deletion routes, holds the App Token itself, and validates every request before it costs anything.
//!
//! Two tiers, and no module of the first uses one of the second:
//!
//! The core, the domain without HTTP answers or layers:
//! - `routes`    the six routes, the one resolver of every path the data plane serves, and validation
//!   (`routes/validate.rs`) of a request into a typed `Call`
//! - `ratelimit` the quota's arithmetic: governor-paced lanes, per-user windows, Redis; decisions as numbers
//! - `token`     the App Token: background fetch and refresh, single flight, invalidation after a 401
//! - `upstream`  the hyper client towards Easemob: a per-thread pool of HTTP/1 connections, answers redacted
//! - `apps`      the configured apps and their lanes (metric handles, `RateLimit-Policy`)
//! - `config`    typed configuration (TOML + `EASEMOB_GW__…` env), read strictly; a file per section, checking itself
//! - `metrics`, `trace` (W3C trace context, the sampler, OTLP export), `redact`, `redis_conn` (one server or a
//!   Redis Cluster, and an app's key hash tag), `request_id`
//!
//! Above it, the data plane as a tower middleware stack, built in `stack.rs`, outermost first:
//! - `observe`   one log line and the metrics per answer, read off the final answer
//! - `rescue`    the one layer that turns failures (typed errors, from every layer below) into answers
//! - `head`      the request head's 64 KiB cap, measured on the parsed head
//! - `access`    who may call: source networks and optional per-caller keys
//! - `shed`      the in-flight limit: a fast 503 past `server.max_in_flight`
//! - `router`    each path to its handler: the Easemob stack, the SDK token placeholder, the jobs API (`jobs/api.rs`)
//! - `layers`    the Easemob stack's layers over the core: `validate` (a typed `Call`), `token` (injection, the 401
//!   replay), `quota` (a slot per call sent), `forward` (the innermost service), and the SDK's token `placeholder`
//! - `audit`     the audit trail: one JSON line per deletion sent to Easemob, written before the answer, each the
//!   next link of a hash chain that `audit verify` checks
//! - `receipt`   a job's receipt as a document (JSON or CSV with its SHA-256), written and read back
//! - `retry`     the one safe retry, under its budget
//! - `exchange`  what the layers pass: the validated `Exchange`, shared by its attempts, and the `Answer` with the
//!   marks it carries up
//! - `error`     the gateway's own errors, and how one is answered in Easemob's envelope (the rescue layer's)
//! - `jobs`      deletion jobs: intake, the queue on SQLite or Redis, the scheduler
//!
//! And the process around them:
//! - `server`    the gateway's life: start-up, serving, shutdown, as one short sequence
//! - `bootstrap` a checked config into what every stack shares (`Shared`), one way for start-up and for reloads
//! - `reload`    whole-config reload: on SIGHUP or a changed file, checked in full, then swapped in
//! - `listener`  the listeners, the data plane's worker threads, connection limits and the graceful drain
//! - `connection` one connection's stack as hyper's service: rebuilt after a reload, waited for when not ready
//! - `admin`     the admin endpoints: health, readiness, metrics, and the `status` page
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
pub mod layers;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod observe;
pub mod ratelimit;
pub mod receipt;
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
