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
    pub audit_write_errors: IntCounter,
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

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some(PREFIX.to_owned()), None).expect("valid prefix");
        let families = std::cell::RefCell::new(Vec::new());
        let register = |metric: Box<dyn prometheus::core::Collector>| {
            families.borrow_mut().extend(metric.desc().iter().map(|desc| format!("{PREFIX}_{}", desc.fq_name)));
            registry.register(metric).expect("unique metric")
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid counter");
            register(Box::new(c.clone()));
            c
        };
        let counters = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            register(Box::new(c.clone()));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid gauge");
            register(Box::new(g.clone()));
            g
        };
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
            register(Box::new(g.clone()));
            g
        };
        let histograms = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            let h = HistogramVec::new(opts, labels).expect("valid histogram");
            register(Box::new(h.clone()));
            h
        };
        let (app_route, app_route_code) = (&["app", "route"][..], &["app", "route", "code"][..]);
        gauges("build_info", "Always 1; labelled with the version.", &["version"])
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Metrics {
            requests: counters("requests_total", "Answers to callers, gateway-made ones included.", app_route_code),
            request_duration: histograms("request_duration_seconds", "Time from request to answer.", app_route),
            upstream_requests: counters(
                "upstream_requests_total",
                "Calls to Easemob business routes, by answer status (or error kind).",
                app_route_code,
            ),
            upstream_duration: histograms("upstream_duration_seconds", "Duration of calls to Easemob.", app_route),
            upstream_retries: counters(
                "upstream_retries_total",
                "Calls retried once after a connect failure or Easemob's 502/503, within the retry budget.",
                app_route,
            ),
            upstream_throttled: counters(
                "upstream_throttled_total",
                "Easemob's own 429 answers: another consumer shares the AppKey.",
                app_route,
            ),
            rejected: counters(
                "rejected_total",
                "Requests answered by the gateway itself, by reason.",
                &["app", "route", "reason"],
            ),
            rate_limit_wait: histograms(
                "rate_limit_wait_seconds",
                "Time admitted requests waited for their quota slot.",
                app_route,
            ),
            rate_limit_rate: gauges(
                "rate_limit_rate",
                "Calls per second the gateway currently lets through (lowered after Easemob 429s).",
                app_route,
            ),
            rate_limit_backend_fallback: gauge(
                "rate_limit_backend_fallback",
                "1 while Redis is unavailable and this replica enforces its local share of the quota.",
            ),
            token_fetches: counters("token_fetches_total", "App Token fetches by result.", &["app", "result"]),
            token_expires_at: gauges(
                "token_expires_at_seconds",
                "Unix time the current token expires (0: never).",
                &["app"],
            ),
            token_replays: counters(
                "token_replays_total",
                "Requests replayed once with a fresh token after Easemob answered 401.",
                &["app"],
            ),
            audit_write_errors: counter("audit_write_errors_total", "Audit events that could not be written."),
            in_flight: gauge("in_flight_requests", "Requests being handled now."),
            open_connections: gauge("open_connections", "Data-plane client connections open now."),
            jobs: {
                let g = gauges("jobs", "Deletion jobs in the store, by state.", &["state"]);
                for state in JOB_STATES {
                    g.with_label_values(&[state]);
                }
                g
            },
            job_operations: counters(
                "job_operations_total",
                "Attempts at job operations by outcome: succeeded, failed (final), retried.",
                &["app", "route", "outcome"],
            ),
            job_operations_pending: gauge("job_operations_pending", "Job operations not yet finished: the queue."),
            job_oldest_pending: gauge(
                "job_oldest_pending_seconds",
                "Age of the job holding the oldest unfinished operation (0: none pending).",
            ),
            jobs_store_failing: gauge(
                "jobs_store_failing",
                "1 while the deletion jobs' store cannot be written (SQLite or Redis); read when scraped.",
            ),
            job_duration: {
                let opts = HistogramOpts::new("job_duration_seconds", "Time from a job's acceptance to its end.")
                    .buckets(JOB_BUCKETS.to_vec());
                let h = Histogram::with_opts(opts).expect("valid histogram");
                register(Box::new(h.clone()));
                h
            },
            config_reloads: {
                let c = counters("config_reloads_total", "Config reloads by result: applied, rejected.", &["result"]);
                c.with_label_values(&["applied"]);
                c.with_label_values(&["rejected"]);
                c
            },
            config_last_reload_successful: {
                let g = gauge("config_last_reload_successful", "0 while the last reload was rejected, else 1.");
                g.set(1);
                g
            },
            config_restart_required: gauge(
                "config_restart_required",
                "1 while the config file changes settings that take effect only after a restart.",
            ),
            spans_exported: counter("spans_exported_total", "Spans the OTLP collector accepted."),
            spans_dropped: {
                let c = counters(
                    "spans_dropped_total",
                    "Spans not exported, by reason: queue_full (more than the export queue holds), export_failed.",
                    &["reason"],
                );
                for reason in ["queue_full", "export_failed"] {
                    c.with_label_values(&[reason]);
                }
                c
            },
            registry,
            families: families.take().into(),
        }
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
