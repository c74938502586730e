//! The admin listener's endpoints: `/healthz`, `/readyz`, `/metrics`, `/openapi.yaml`, and the status page (`/`,
//! `/status.json`, `/status/jobs/…`). Never the data plane.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;

use tokio::sync::watch;

use crate::error::json_response;
use crate::exchange::Stamped;
use crate::jobs::Jobs;
use crate::stack::Shared;
use crate::status::{self, StatusBoard};

/// The data plane's contract, served on the admin listener (and kept true by tests/schemathesis).
const OPENAPI: &str = include_str!("../docs/openapi.yaml");
/// Probes and a scraper or two: few connections, and none kept waiting for a request for long, so that idle
/// connections piling up (a leaky client, a port scan) free their places before a probe's own timeout runs out.
pub const ADMIN_MAX_CONNECTIONS: usize = 32;
/// How long an admin connection may take to send a request's head, or stay idle between requests. A kubelet
/// probe times out after 1 s by default; a probe or a scraper sends its request at once.
pub const ADMIN_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// `/healthz`, `/readyz`, `/metrics`, `/openapi.yaml` and the status page: the admin listener, never the data
/// plane.
#[derive(Clone)]
pub struct AdminService {
    /// The config in force.
    pub live: watch::Receiver<Arc<Shared>>,
    /// Set once shutdown has begun: `/readyz` turns 503.
    pub draining: Arc<AtomicBool>,
    pub status: Arc<StatusBoard>,
}

impl AdminService {
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
        }
        match request.uri().path() {
            "/" => Response::builder()
                .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
                .body(Full::new(Bytes::from_static(status::PAGE.as_bytes())))
                .expect("static response parts are valid"),
            "/status.json" => {
                let live = Arc::clone(&self.live.borrow());
                let draining = self.draining.load(Ordering::SeqCst);
                let body = self.status.json(&live, is_ready(&live, draining), draining).await;
                json(StatusCode::OK, &body)
            }
            path if path.starts_with("/status/jobs/") => {
                let live = Arc::clone(&self.live.borrow());
                match status::job(&live, path).await {
                    Some(job) => json(StatusCode::OK, &job),
                    None => text(StatusCode::NOT_FOUND, "no such job (or jobs are off)\n"),
                }
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => self.readiness(),
            "/openapi.yaml" => Response::builder()
                .header(header::CONTENT_TYPE, "application/yaml")
                .body(Full::new(Bytes::from_static(OPENAPI.as_bytes())))
                .expect("static response parts are valid"),
            "/metrics" => {
                let live = Arc::clone(&self.live.borrow());
                // The store keeps its health as a flag; the gauge reads it when scraped.
                live.metrics.jobs_store_failing.set(i64::from(jobs_store(&live) == Some(false)));
                Response::builder()
                    .header(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)
                    .body(Full::new(Bytes::from(live.metrics.render())))
                    .expect("static response parts are valid")
            }
            _ => {
                text(StatusCode::NOT_FOUND, "not found: /, /status.json, /healthz, /readyz, /metrics, /openapi.yaml\n")
            }
        }
    }

    /// Ready when this replica can serve direct deletions: not draining, and every app holds a usable token. A
    /// failing jobs store shows in the body (and `jobs_store_failing`) but counts only with
    /// `jobs.ready_requires_store`. Per-app detail, no secrets.
    fn readiness(&self) -> Response<Full<Bytes>> {
        let draining = self.draining.load(Ordering::SeqCst);
        let live = Arc::clone(&self.live.borrow());
        let apps: serde_json::Map<String, serde_json::Value> = live
            .apps
            .iter()
            .map(|app| (app.key.to_string(), serde_json::to_value(app.token.status()).expect("status serializes")))
            .collect();
        let store = jobs_store(&live);
        let ready = is_ready(&live, draining);
        let mut body = serde_json::json!({ "ready": ready, "draining": draining, "apps": apps });
        if let Some(writes) = store {
            body["jobs_store"] = if writes { "ok" } else { "failing" }.into();
        }
        let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        json_response(status, body.to_string().into_bytes(), "local").map(Stamped::into_full)
    }
}

/// Not draining, every app holds a usable token, and the jobs store writes if readiness requires it.
fn is_ready(live: &Shared, draining: bool) -> bool {
    let store_counts = live.jobs.as_ref().is_some_and(|jobs| jobs.config().ready_requires_store);
    let store_blocks = store_counts && jobs_store(live) == Some(false);
    !draining && !store_blocks && live.apps.iter().all(|app| app.token.is_ready())
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}

/// Whether the jobs store writes, when jobs are on.
fn jobs_store(live: &Shared) -> Option<bool> {
    live.jobs.as_ref().map(Jobs::is_ready)
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response parts are valid")
}
