//! The Prometheus registry and every metric family. Labels are bounded: AppKey, route name, status code,
//! rejection reason. Never a user ID, a raw path or a token.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::routes::Route;

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
    pub audit: AuditMetrics,
    pub upstream_retries: IntCounterVec,
    pub open_connections: IntGauge,
    pub jobs: IntGaugeVec,
    pub job_operations: IntCounterVec,
    pub job_operations_pending: IntGauge,
    pub job_oldest_pending: IntGauge,
    pub job_duration: Histogram,
    pub jobs_store_failing: IntGauge,
    pub config_reloads: IntCounterVec,
    pub config_last_reload_successful: IntGauge,
    pub config_restart_required: IntGauge,
    pub spans_exported: IntCounter,
    pub spans_dropped: IntCounterVec,
    /// Every family's name, as exported.
    families: std::sync::Arc<[String]>,
}

/// The `state` label values of `jobs` (the jobs store's job states), exported at 0 from the start.
pub const JOB_STATES: [&str; 5] = ["queued", "running", "done", "failed", "cancelled"];
/// The `outcome` label values of `job_operations_total`.
pub const JOB_OUTCOMES: [&str; 3] = ["succeeded", "failed", "retried"];

/// A job's time from acceptance to completion: seconds to days.
const JOB_BUCKETS: &[f64] = &[1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4.0 * 3600.0, 86400.0, 4.0 * 86400.0];

/// Registers families under the gateway's prefix, and keeps their names.
struct Families {
    registry: Registry,
    names: Vec<String>,
}

impl Families {
    /// A registry holding `build_info`, which no one updates.
    fn new() -> Families {
        let registry = Registry::new_custom(Some(PREFIX.to_owned()), None).expect("valid prefix");
        let mut families = Families { registry, names: Vec::new() };
        let build_info = families.gauges("build_info", "Always 1; labelled with the version.", &["version"]);
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        families
    }

    fn register<M: prometheus::core::Collector + Clone + 'static>(&mut self, metric: M) -> M {
        self.names.extend(metric.desc().iter().map(|desc| format!("{PREFIX}_{}", desc.fq_name)));
        self.registry.register(Box::new(metric.clone())).expect("unique metric");
        metric
    }

    fn counter(&mut self, name: &str, help: &str) -> IntCounter {
        self.register(IntCounter::new(name, help).expect("valid counter"))
    }

    fn counters(&mut self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"))
    }

    fn gauge(&mut self, name: &str, help: &str) -> IntGauge {
        self.register(IntGauge::new(name, help).expect("valid gauge"))
    }

    fn gauges(&mut self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.register(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge"))
    }

    fn histogram(&mut self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.register(Histogram::with_opts(opts).expect("valid histogram"))
    }

    /// Latency histograms, in [`LATENCY_BUCKETS`].
    fn latencies(&mut self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
        self.register(HistogramVec::new(opts, labels).expect("valid histogram"))
    }
}

/// The audit trail's families: its writes and the anchors of its chain.
#[derive(Clone, Debug)]
pub struct AuditMetrics {
    pub write_errors: IntCounter,
    pub events: IntCounter,
    anchor_seq: IntGauge,
    anchor: IntGaugeVec,
}

impl AuditMetrics {
    fn new(f: &mut Families) -> AuditMetrics {
        AuditMetrics {
            write_errors: f.counter("audit_write_errors_total", "Audit events that could not be written."),
            events: f.counter("audit_events_total", "Audit events written."),
            anchor_seq: f.gauge(
                "audit_anchor_seq",
                "The audit chain's sequence number at its last anchor (every audit.anchor_interval).",
            ),
            anchor: f.gauges(
                "audit_anchor_info",
                "Always 1; labelled with the audit chain's head at its last anchor, as SEQ:HASH for `audit verify --anchor`.",
                &["replica", "head"],
            ),
        }
    }

    /// Exports the chain's head at an anchor (`seq`, and `head` as `SEQ:HASH`), in place of the last one: Prometheus
    /// keeps each.
    pub fn anchor(&self, replica: &str, seq: u64, head: &str) {
        self.anchor.reset();
        self.anchor.with_label_values(&[replica, head]).set(1);
        self.anchor_seq.set(seq as i64);
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut f = Families::new();
        let (app_route, app_route_code) = (&["app", "route"][..], &["app", "route", "code"][..]);
        Metrics {
            // Callers' requests and the gateway's own answers.
            requests: f.counters("requests_total", "Answers to callers, gateway-made ones included.", app_route_code),
            request_duration: f.latencies("request_duration_seconds", "Time from request to answer.", app_route),
            rejected: f.counters(
                "rejected_total",
                "Requests answered by the gateway itself, by reason.",
                &["app", "route", "reason"],
            ),
            in_flight: f.gauge("in_flight_requests", "Requests being handled now."),
            open_connections: f.gauge("open_connections", "Data-plane client connections open now."),
            // Calls to Easemob.
            upstream_requests: f.counters(
                "upstream_requests_total",
                "Calls to Easemob business routes, by answer status (or error kind).",
                app_route_code,
            ),
            upstream_duration: f.latencies("upstream_duration_seconds", "Duration of calls to Easemob.", app_route),
            upstream_retries: f.counters(
                "upstream_retries_total",
                "Calls retried once after a connect failure or Easemob's 502/503, within the retry budget.",
                app_route,
            ),
            upstream_throttled: f.counters(
                "upstream_throttled_total",
                "Easemob's own 429 answers: another consumer shares the AppKey.",
                app_route,
            ),
            // The quota.
            rate_limit_wait: f.latencies(
                "rate_limit_wait_seconds",
                "Time admitted requests waited for their quota slot.",
                app_route,
            ),
            rate_limit_rate: f.gauges(
                "rate_limit_rate",
                "Calls per second the gateway currently lets through (lowered after Easemob 429s).",
                app_route,
            ),
            rate_limit_backend_fallback: f.gauge(
                "rate_limit_backend_fallback",
                "1 while Redis is unavailable and this replica enforces its local share of the quota.",
            ),
            // The App Tokens.
            token_fetches: f.counters("token_fetches_total", "App Token fetches by result.", &["app", "result"]),
            token_expires_at: f.gauges(
                "token_expires_at_seconds",
                "Unix time the current token expires (0: never).",
                &["app"],
            ),
            token_replays: f.counters(
                "token_replays_total",
                "Requests replayed once with a fresh token after Easemob answered 401.",
                &["app"],
            ),
            // Deletion jobs.
            jobs: f.gauges("jobs", "Deletion jobs in the store, by state.", &["state"]),
            job_operations: f.counters(
                "job_operations_total",
                "Attempts at job operations by outcome: succeeded, failed (final), retried.",
                &["app", "route", "outcome"],
            ),
            job_operations_pending: f.gauge("job_operations_pending", "Job operations not yet finished: the queue."),
            job_oldest_pending: f.gauge(
                "job_oldest_pending_seconds",
                "Age of the job holding the oldest unfinished operation (0: none pending).",
            ),
            jobs_store_failing: f.gauge(
                "jobs_store_failing",
                "1 while the deletion jobs' store cannot be written (SQLite or Redis); read when scraped.",
            ),
            job_duration: f.histogram("job_duration_seconds", "Time from a job's acceptance to its end.", JOB_BUCKETS),
            // The gateway itself: config reloads, the audit trail, span export.
            config_reloads: f.counters(
                "config_reloads_total",
                "Config reloads by result: applied, rejected.",
                &["result"],
            ),
            config_last_reload_successful: f
                .gauge("config_last_reload_successful", "0 while the last reload was rejected, else 1."),
            config_restart_required: f.gauge(
                "config_restart_required",
                "1 while the config file changes settings that take effect only after a restart.",
            ),
            audit: AuditMetrics::new(&mut f),
            spans_exported: f.counter("spans_exported_total", "Spans the OTLP collector accepted."),
            spans_dropped: f.counters(
                "spans_dropped_total",
                "Spans not exported, by reason: queue_full (more than the export queue holds), export_failed.",
                &["reason"],
            ),
            registry: f.registry,
            families: f.names.into(),
        }
        .with_start_series()
    }

    /// With the series exported before their first event, so that a dashboard or an alert sees them from the start.
    fn with_start_series(self) -> Metrics {
        for state in JOB_STATES {
            self.jobs.with_label_values(&[state]);
        }
        for result in ["applied", "rejected"] {
            self.config_reloads.with_label_values(&[result]);
        }
        self.config_last_reload_successful.set(1);
        for reason in ["queue_full", "export_failed"] {
            self.spans_dropped.with_label_values(&[reason]);
        }
        self
    }

    /// Every metric family's name, as exported (with or without series yet).
    pub fn families(&self) -> &[String] {
        &self.families
    }

    /// The series every request of one (app, route) lane touches, looked up once: `with_label_values` hashes the
    /// labels and takes a lock on each call.
    pub fn lane(&self, app: &str, route: Route) -> LaneMetrics {
        let labels = [app, route.name()];
        // Exported at 0 from the start, so that a dashboard or an alert sees the series before the first event.
        for outcome in JOB_OUTCOMES {
            self.job_operations.with_label_values(&[app, route.name(), outcome]);
        }
        LaneMetrics {
            request_duration: self.request_duration.with_label_values(&labels),
            upstream_duration: self.upstream_duration.with_label_values(&labels),
            answered_ok: self.requests.with_label_values(&[app, route.name(), "200"]),
            answered_429: self.requests.with_label_values(&[app, route.name(), "429"]),
            rate_limited: self.rejected.with_label_values(&[app, route.name(), "rate_limited"]),
            upstream_ok: self.upstream_requests.with_label_values(&[app, route.name(), "200"]),
        }
    }

    /// The text exposition format, for `GET /metrics`.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        out
    }
}

/// One lane's per-request series (see [`Metrics::lane`]); other status codes go through the label lookup.
#[derive(Clone, Debug)]
pub struct LaneMetrics {
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    /// `requests_total{code="200"}`.
    pub answered_ok: IntCounter,
    /// `requests_total{code="429"}`: a flood's answers.
    pub answered_429: IntCounter,
    /// `rejected_total{reason="rate_limited"}`.
    pub rate_limited: IntCounter,
    /// `upstream_requests_total{code="200"}`.
    pub upstream_ok: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_operations_page_documents_every_metric_and_no_other() {
        let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).unwrap();
        let table = page.split("\n## Metrics\n").nth(1).expect("a `## Metrics` section").split("\n## ").next().unwrap();
        let documented: BTreeSet<&str> = table
            .lines()
            .filter_map(|row| row.strip_prefix("| `")?.split('`').next())
            .filter(|name| name.starts_with(PREFIX))
            .collect();
        let metrics = Metrics::new();
        let exported: BTreeSet<&str> = metrics.families().iter().map(String::as_str).collect();
        let undocumented: Vec<_> = exported.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&exported).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "not in docs/operations.md: {undocumented:?}; not exported: {unknown:?}"
        );
    }
}
