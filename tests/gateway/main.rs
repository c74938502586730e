//! End-to-end tests: the real gateway and the real simulator as separate processes, real HTTP over loopback.

mod access;
mod cli;
mod cluster;
mod demo;
mod forwarding;
mod jobs;
mod lifecycle;
mod ops;
mod otlp;
mod quota;
mod receipts;
mod redis_cluster;
mod reload;
mod resilience;
mod routes;
mod seeds;
mod shared_quota;
mod sim_limits;
mod status;
mod support;
mod tls;
mod token;
mod upstream;
mod validation;
