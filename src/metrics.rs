//! The Prometheus registry and every metric family. Labels are bounded: AppKey, route name, status code,
//! rejection reason. Never a user ID, a raw path or a token.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

const PREFIX: &str = "easemob_gateway";

/// Latency buckets from loopback-fast refusals to Easemob's slow answers near the default 10 s timeout.
const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Label value for requests that named no configured app or no route.
pub const NONE: &str = "none";

#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub rejected: IntCounterVec,
    pub token_fetches: IntCounterVec,
    pub token_expires_at: IntGaugeVec,
    pub token_replays: IntCounterVec,
    pub in_flight: IntGauge,
    pub rate_limit_wait: HistogramVec,
    pub rate_limit_rate: IntGaugeVec,
    pub upstream_throttled: IntCounterVec,
    pub rate_limit_backend_fallback: IntGauge,
    pub audit_write_errors: prometheus::IntCounter,
    pub upstream_retries: IntCounterVec,
    pub open_connections: IntGauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some(PREFIX.to_owned()), None).expect("valid prefix");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            let h = HistogramVec::new(opts, labels).expect("valid histogram");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let metrics = Metrics {
            requests: counter(
                "requests_total",
                "Answers to callers, gateway-made ones included.",
                &["app", "route", "code"],
            ),
            request_duration: histogram("request_duration_seconds", "Time from request to answer.", &["app", "route"]),
            upstream_requests: counter(
                "upstream_requests_total",
                "Calls to Easemob business routes, by answer status (or error kind).",
                &["app", "route", "code"],
            ),
            upstream_duration: histogram(
                "upstream_duration_seconds",
                "Duration of calls to Easemob.",
                &["app", "route"],
            ),
            rejected: counter(
                "rejected_total",
                "Requests answered by the gateway itself, by reason.",
                &["app", "route", "reason"],
            ),
            token_fetches: counter("token_fetches_total", "App Token fetches by result.", &["app", "result"]),
            token_expires_at: {
                let g = IntGaugeVec::new(
                    Opts::new("token_expires_at_seconds", "Unix time the current token expires (0: never)."),
                    &["app"],
                )
                .expect("valid gauge");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            token_replays: counter(
                "token_replays_total",
                "Requests replayed once with a fresh token after Easemob answered 401.",
                &["app"],
            ),
            in_flight: {
                let g = IntGauge::new("in_flight_requests", "Requests being handled now.").expect("valid gauge");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            rate_limit_wait: histogram(
                "rate_limit_wait_seconds",
                "Time admitted requests waited for their quota slot.",
                &["app", "route"],
            ),
            rate_limit_rate: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "rate_limit_rate",
                        "Calls per second the gateway currently lets through (lowered after Easemob 429s).",
                    ),
                    &["app", "route"],
                )
                .expect("valid gauge");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            upstream_throttled: counter(
                "upstream_throttled_total",
                "Easemob's own 429 answers: another consumer shares the AppKey.",
                &["app", "route"],
            ),
            rate_limit_backend_fallback: {
                let g = IntGauge::new(
                    "rate_limit_backend_fallback",
                    "1 while Redis is unavailable and this replica enforces its local share of the quota.",
                )
                .expect("valid gauge");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            audit_write_errors: {
                let c =
                    prometheus::IntCounter::new("audit_write_errors_total", "Audit events that could not be written.")
                        .expect("valid counter");
                registry.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            upstream_retries: counter(
                "upstream_retries_total",
                "Calls retried once after a connect failure or Easemob's 502/503, within the retry budget.",
                &["app", "route"],
            ),
            open_connections: {
                let g =
                    IntGauge::new("open_connections", "Data-plane client connections open now.").expect("valid gauge");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            registry,
        };
        let build = IntGaugeVec::new(Opts::new("build_info", "Always 1; labelled with the version."), &["version"])
            .expect("valid gauge");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        metrics.registry.register(Box::new(build)).expect("unique metric");
        metrics
    }

    /// The text exposition format, for `GET /metrics`.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
