//! `[trace]`: span export over OTLP.

use http::Uri;
use serde::{Deserialize, Serialize};

/// Span export over OTLP: off unless `otlp_endpoint` is set.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceConfig {
    /// Where spans are sent: OTLP over HTTP with protobuf bodies, the whole URL (a collector's is usually
    /// `http://127.0.0.1:4318/v1/traces`). Absent: no spans are recorded or sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` the spans are exported under.
    pub service_name: String,
    /// The share of the traces the gateway starts (the caller sent no valid `traceparent`) whose spans are
    /// exported, from 0 to 1. A caller's trace follows the caller's own decision, its W3C `sampled` flag.
    pub sample_ratio: f64,
}

impl Default for TraceConfig {
    fn default() -> Self {
        // All of them, as OpenTelemetry's default sampler does: the gateway's own traffic is bounded by the quota,
        // and the export queue bounds the rest (refusal floods), counting what it drops.
        TraceConfig { otlp_endpoint: None, service_name: "easemob-gateway".to_owned(), sample_ratio: 1.0 }
    }
}

impl TraceConfig {
    /// What is wrong with these settings, one line each.
    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(endpoint) = &self.otlp_endpoint {
            match endpoint.parse::<Uri>() {
                Ok(uri) if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() => problems
                    .push(format!("trace.otlp_endpoint {endpoint:?} must be an http:// or https:// URL with a host")),
                // It is printed by check-config; a collector's credentials belong in OTEL_EXPORTER_OTLP_HEADERS.
                Ok(uri) if uri.authority().is_some_and(|a| a.as_str().contains('@')) || uri.query().is_some() => {
                    problems.push(
                        "trace.otlp_endpoint must hold no credentials or query: set headers (an API key) in \
                         OTEL_EXPORTER_OTLP_HEADERS"
                            .to_owned(),
                    )
                }
                Ok(_) => {}
                Err(e) => problems.push(format!("trace.otlp_endpoint {endpoint:?} is not a URL: {e}")),
            }
        }
        if self.service_name.trim().is_empty() {
            problems.push("trace.service_name is empty".to_owned());
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            problems.push(format!("trace.sample_ratio {} must be from 0 to 1", self.sample_ratio));
        }
        problems
    }
}
