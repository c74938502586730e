//! The request path: resolve the route, validate, take the app's token, forward to Easemob, replay once on 401,
//! and pass Easemob's answer back unchanged but for hop-by-hop headers. One log line and one set of metrics per
//! request, gateway-made answers included.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tracing::{debug, info};

use tokio::sync::Semaphore;
use tower::retry::budget::{Budget, TpsBudget};

use crate::access::{Access, Denied};
use crate::audit::{Audit, Event};
use crate::config::ServerConfig;
use crate::error::{GatewayError, json_response, unix_millis};
use crate::metrics::{LaneMetrics, Metrics, NONE};
use crate::ratelimit::{Admitted, QuotaSet, RATELIMIT_POLICY};
use crate::routes::{self, Call, Endpoint, Route};
use crate::token::TokenSource;
use crate::upstream::{Upstream, UpstreamError};

/// A retry needs at least this much of the request's deadline left to be worth sending.
const MIN_RETRY_TIME: Duration = Duration::from_millis(100);

/// Easemob's `delete_conversation` body is three fields; anything this large is not one.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What the SDK drop-in hands out instead of a token: worthless upstream, and dropped if a caller sends it back.
pub const PLACEHOLDER_TOKEN: &str = "EASEMOB-GATEWAY-PLACEHOLDER-NOT-A-TOKEN";
/// SDKs cache the drop-in token for part of this; a week keeps them from asking often.
const PLACEHOLDER_TTL_SECS: u64 = 7 * 24 * 3600;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_GATEWAY_KEY: HeaderName = HeaderName::from_static("x-gateway-key");
const X_CALLER: HeaderName = HeaderName::from_static("x-caller");

/// One configured app: its AppKey and its token.
pub struct App {
    /// Position in the config, which is also its index in the quota set.
    pub index: usize,
    pub org: String,
    pub app: String,
    pub key: String,
    pub token: Arc<TokenSource>,
}

/// The request path. Cheap to clone: everything but the upstream pool is shared, so each data-plane worker holds
/// its own copy with its own pool (`with_own_pool`) while quota, tokens, metrics and limits stay process-wide.
#[derive(Clone)]
pub struct Proxy {
    apps: Arc<[App]>,
    upstream: Upstream,
    quota: Arc<QuotaSet>,
    metrics: Metrics,
    body_read_timeout: Duration,
    audit: Option<Arc<Audit>>,
    /// Retries may add at most a fifth to the calls Easemob sees (plus a trickle), so an outage is not doubled.
    retry_budget: Arc<TpsBudget>,
    /// Requests being handled: past `server.max_in_flight`, new ones are shed at once.
    in_flight: Arc<Semaphore>,
    access: Arc<Access>,
    /// Per-request series of each (app, route) lane, indexed like the quota's lanes.
    lane_metrics: Arc<[LaneMetrics]>,
}

/// What one request came to, for its log line and metrics.
struct Outcome<'a> {
    app: &'a str,
    route: &'static str,
    upstream_status: Option<u16>,
    /// Set once the request named a configured app and a route: its quota lane.
    lane: Option<(usize, Route)>,
}

impl Outcome<'_> {
    /// Before the request has named an app or a route.
    const UNKNOWN: Outcome<'static> = Outcome { app: NONE, route: NONE, upstream_status: None, lane: None };
}

impl Proxy {
    pub fn new(
        apps: Vec<App>,
        upstream: Upstream,
        quota: Arc<QuotaSet>,
        metrics: Metrics,
        limits: &ServerConfig,
        access: Access,
        audit: Option<Arc<Audit>>,
    ) -> Proxy {
        let lane_metrics = apps.iter().flat_map(|app| Route::ALL.map(|route| metrics.lane(&app.key, route))).collect();
        Proxy {
            lane_metrics,
            apps: apps.into(),
            upstream,
            quota,
            metrics,
            body_read_timeout: limits.body_read_timeout,
            audit,
            retry_budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 1, 0.2)),
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
            access: Arc::new(access),
        }
    }

    /// This proxy with an upstream connection pool of its own, for one data-plane worker.
    pub fn with_own_pool(&self) -> Proxy {
        Proxy { upstream: self.upstream.with_own_pool(), ..self.clone() }
    }

    pub fn apps(&self) -> &[App] {
        &self.apps
    }

    async fn handle<B>(self: Arc<Self>, request: Request<B>, peer: IpAddr) -> Response<Full<Bytes>>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        // Shed at once rather than queue without bound: a fast 503 lets callers back off while we recover.
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return self.refuse_at_the_door(GatewayError::Overloaded, started);
        };
        let _in_flight = InFlight::enter(&self.metrics);
        let identity = match self.access.check(peer, request.headers().get(X_GATEWAY_KEY).map(|v| v.as_bytes())) {
            Ok(identity) => identity,
            Err(denied) => {
                debug!(peer = ?peer, ?denied, "caller refused");
                return self.refuse_at_the_door(
                    match denied {
                        Denied::Network => GatewayError::Forbidden,
                        Denied::Key => GatewayError::Unauthenticated,
                    },
                    started,
                );
            }
        };
        let meta = Meta {
            request_id: request.headers().get(X_REQUEST_ID).cloned(),
            // A key's name is authoritative; without keys, the caller's own X-Caller is recorded.
            caller: identity
                .map(str::to_owned)
                .or_else(|| request.headers().get(X_CALLER).and_then(|v| v.to_str().ok()).map(str::to_owned)),
        };
        let mut outcome = Outcome::UNKNOWN;
        let (mut response, reason) = match self.serve(request, &meta, &mut outcome).await {
            Ok(response) => (response, None),
            Err(e) => {
                self.count_rejection(&outcome, &e);
                let reason = e.kind();
                (e.into_response(started), Some(reason))
            }
        };
        // Every answer of a limited route states its policy, even one the quota never had to decide on.
        if let Some((app, route)) = outcome.lane {
            let headers = response.headers_mut();
            if !headers.contains_key(RATELIMIT_POLICY) {
                headers.insert(RATELIMIT_POLICY, self.quota.policy(app, route));
            }
        }
        let elapsed = started.elapsed();
        let status = response.status();
        self.count_answer(&outcome, status);
        match outcome.lane.map(|(app, route)| self.lane_metrics(app, route)) {
            Some(lane) => lane.request_duration.observe(elapsed.as_secs_f64()),
            None => self
                .metrics
                .request_duration
                .with_label_values(&[outcome.app, outcome.route])
                .observe(elapsed.as_secs_f64()),
        }
        info!(
            request_id = meta.request_id(),
            app = outcome.app,
            route = outcome.route,
            status = status.as_u16(),
            upstream_status = outcome.upstream_status,
            reason,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
        response
    }

    fn lane_metrics(&self, app: usize, route: Route) -> &LaneMetrics {
        &self.lane_metrics[app * Route::ALL.len() + route.index()]
    }

    /// `rejected_total` for an answer the gateway made itself. Here and in `count_answer`, a lane's common series
    /// are resolved once (see `Metrics::lane`); anything else is looked up by label.
    fn count_rejection(&self, outcome: &Outcome, e: &GatewayError) {
        match (outcome.lane, e) {
            (Some((app, route)), GatewayError::RateLimited { .. }) => self.lane_metrics(app, route).rate_limited.inc(),
            _ => self.metrics.rejected.with_label_values(&[outcome.app, outcome.route, e.kind()]).inc(),
        }
    }

    /// `requests_total` for every answer.
    fn count_answer(&self, outcome: &Outcome, status: StatusCode) {
        let lane = outcome.lane.map(|(app, route)| self.lane_metrics(app, route));
        let counted = lane.and_then(|lane| match status {
            StatusCode::OK => Some(&lane.answered_ok),
            StatusCode::TOO_MANY_REQUESTS => Some(&lane.answered_429),
            _ => None,
        });
        match counted {
            Some(counter) => counter.inc(),
            None => self.metrics.requests.with_label_values(&[outcome.app, outcome.route, status.as_str()]).inc(),
        }
    }

    /// An answer given before the request is even read (caller refused, overload): counted and logged like any other.
    fn refuse_at_the_door(&self, e: GatewayError, started: Instant) -> Response<Full<Bytes>> {
        self.count_rejection(&Outcome::UNKNOWN, &e);
        let reason = e.kind();
        let response = e.into_response(started);
        self.count_answer(&Outcome::UNKNOWN, response.status());
        info!(app = NONE, route = NONE, status = response.status().as_u16(), reason, "request");
        response
    }

    async fn serve<'a, B>(
        &'a self,
        request: Request<B>,
        meta: &Meta,
        outcome: &mut Outcome<'a>,
    ) -> Result<Response<Full<Bytes>>, GatewayError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = request.into_parts();
        let resolved =
            routes::resolve(parts.uri.path()).ok_or(GatewayError::UnknownRoute { hint: "no route has this path" })?;
        let (route, raw_owner) = match resolved.endpoint {
            Endpoint::Operation { route, owner } => (route, owner),
            Endpoint::Token => {
                if parts.method != Method::POST {
                    return Err(GatewayError::MethodNotAllowed { allow: Method::POST });
                }
                let app = self.app(resolved.app)?;
                outcome.app = &app.key;
                return Ok(placeholder_token(app));
            }
        };
        outcome.route = route.name();
        if parts.method != route.method() {
            return Err(GatewayError::MethodNotAllowed { allow: route.method() });
        }
        let app = self.app(resolved.app)?;
        outcome.app = &app.key;
        outcome.lane = Some((app.index, route));
        let body = match route {
            Route::DeleteConversation => read_body(body, self.body_read_timeout).await?,
            // The five roaming routes take no body: whatever was sent is ignored, never forwarded.
            _ => Bytes::new(),
        };
        let call = Call::parse(route, raw_owner, parts.uri.query(), &body, unix_millis() as i64)?;
        self.forward(app, &call, meta, outcome).await
    }

    /// The app named by the path prefix, or the only app when the prefix is left out.
    fn app(&self, named: Option<(&str, &str)>) -> Result<&App, GatewayError> {
        match named {
            Some((org, app)) => self
                .apps
                .iter()
                .find(|a| a.org.eq_ignore_ascii_case(org) && a.app.eq_ignore_ascii_case(app))
                .ok_or(GatewayError::UnknownApp),
            None => match &*self.apps {
                [only] => Ok(only),
                _ => Err(GatewayError::UnknownRoute {
                    hint: "several apps are configured: prefix the path with /{org_name}/{app_name}",
                }),
            },
        }
    }

    async fn forward<'a>(
        &'a self,
        app: &'a App,
        call: &Call,
        meta: &Meta,
        outcome: &mut Outcome<'a>,
    ) -> Result<Response<Full<Bytes>>, GatewayError> {
        let route = call.route();
        // Built once admitted: a refused request costs no URL.
        let mut uri = None;
        let body = call.upstream_body();
        // One deadline for the request's exchanges with Easemob, retry included, from the first send: a retry never
        // stretches the caller's wait, and waiting for the token or the quota does not eat into Easemob's time.
        let mut deadline = None;
        self.retry_budget.deposit();
        let (mut replayed, mut retried) = (false, false);
        // What the last attempt left: a connect failure keeps its quota slot (nothing reached Easemob); an answer
        // is what the caller gets if a replay or retry cannot be admitted.
        let mut admitted: Option<Admitted> = None;
        let mut previous: Option<Response<Bytes>> = None;
        loop {
            let token = app.token.get().await.map_err(|e| GatewayError::NoToken { retry_after: e.retry_after })?;
            // After the token: a request that cannot be sent must not cost quota. Replays pay too: Easemob counts them.
            let slot = match admitted.take() {
                Some(slot) => slot,
                None => match self.quota.acquire(app.index, call).await {
                    Ok(slot) => slot,
                    Err(_) if previous.is_some() => {
                        let response = previous.take().expect("checked");
                        self.audit(app, call, meta, Some(response.status().as_u16())).await;
                        return Ok(pass_through(response));
                    }
                    Err(r) => return Err(GatewayError::RateLimited { retry_after: r.retry_after, headers: r.headers }),
                },
            };
            let uri = match &uri {
                Some(uri) => Uri::clone(uri),
                None => {
                    let built = self
                        .upstream
                        .uri(&app.org, &app.app, |url| call.write_upstream_path_and_query(url))
                        .map_err(|_| GatewayError::Internal)?;
                    uri.insert(built).clone()
                }
            };
            let mut request = self.upstream.request(route.method(), uri, body.clone().unwrap_or_default());
            let headers = request.headers_mut();
            headers.insert(header::AUTHORIZATION, token.authorization().clone());
            if let Some(id) = &meta.request_id {
                headers.insert(X_REQUEST_ID, id.clone());
            }
            let sent = Instant::now();
            let deadline = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.upstream.timeout());
            let result = self.upstream.send_until(request, deadline).await;
            let lane = self.lane_metrics(app.index, route);
            lane.upstream_duration.observe(sent.elapsed().as_secs_f64());
            let status = result.as_ref().map(|response| response.status());
            let code = match &status {
                Ok(StatusCode::OK) => None,
                Ok(status) => Some(status.as_str()),
                Err(UpstreamError::Connect(_)) => Some("connect_error"),
                Err(UpstreamError::Timeout(_)) => Some("timeout"),
                Err(UpstreamError::Failed(_)) => Some("failed"),
            };
            match code {
                None => lane.upstream_ok.inc(),
                Some(code) => self.metrics.upstream_requests.with_label_values(&[&app.key, route.name(), code]).inc(),
            }
            // Retry once where it is safe: nothing was sent (connect failed), or Easemob's front said 502/503
            // (not processed). Never on a timeout or a cut-off answer (it may have been carried out), never on 4xx.
            let safe_to_retry = match &result {
                Err(UpstreamError::Connect(_)) => true,
                Ok(response) => matches!(response.status(), StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE),
                Err(_) => false,
            };
            let time_left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if safe_to_retry && !retried && time_left >= MIN_RETRY_TIME && self.retry_budget.withdraw() {
                retried = true;
                self.metrics.upstream_retries.with_label_values(&[&app.key, route.name()]).inc();
                match result {
                    Err(_) => admitted = Some(slot),
                    Ok(response) => previous = Some(response),
                }
                continue;
            }
            let response = match result {
                Ok(response) => response,
                Err(e) => {
                    tracing::warn!(app = %app.key, route = route.name(), error = %e, "easemob call failed");
                    return Err(match e {
                        // Nothing was sent: no deletion to record.
                        UpstreamError::Connect(_) => GatewayError::UpstreamUnreachable,
                        // The request may have been carried out: recorded with an unknown outcome.
                        UpstreamError::Timeout(_) => {
                            self.audit(app, call, meta, None).await;
                            GatewayError::UpstreamTimeout
                        }
                        UpstreamError::Failed(_) => {
                            self.audit(app, call, meta, None).await;
                            GatewayError::UpstreamFailed
                        }
                    });
                }
            };
            outcome.upstream_status = Some(response.status().as_u16());
            // The token died early (Easemob warns it can): replace it once and replay; a second 401 passes on.
            if response.status() == StatusCode::UNAUTHORIZED && !replayed && app.token.invalidate(token.generation()) {
                self.metrics.token_replays.with_label_values(&[&app.key]).inc();
                replayed = true;
                previous = Some(response);
                continue;
            }
            if response.status() != StatusCode::UNAUTHORIZED {
                token.mark_proven();
            }
            if response.status() == StatusCode::TOO_MANY_REQUESTS {
                self.quota.upstream_throttled(app.index, route, retry_after(response.headers()));
            }
            self.audit(app, call, meta, Some(response.status().as_u16())).await;
            let mut response = pass_through(response);
            slot.headers.insert_into(response.headers_mut());
            return Ok(response);
        }
    }

    /// Writes the audit event of a deletion sent to Easemob, before the caller's answer.
    async fn audit(&self, app: &App, call: &Call, meta: &Meta, upstream_status: Option<u16>) {
        if let Some(audit) = &self.audit {
            let caller = audit.caller(meta.caller.as_deref());
            audit.record(Event::new(call, &app.key, meta.request_id(), caller, upstream_status)).await;
        }
    }
}

/// What the request says about itself, kept for logs, forwarding and the audit trail.
struct Meta {
    request_id: Option<HeaderValue>,
    /// `X-Caller`: the calling service's name for itself, recorded in the audit trail.
    caller: Option<String>,
}

impl Meta {
    fn request_id(&self) -> &str {
        self.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

/// `Retry-After` in seconds (Easemob does not document one, but honour it if it comes).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(300)))
}

/// 1 to `max_len` characters of `A-Z a-z 0-9 - _ . :`: safe to log, forward and record as a label taken from a
/// caller's header (a request id, a caller's name).
pub fn is_plain_label(value: &str, max_len: usize) -> bool {
    (1..=max_len).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Easemob's answer as the caller's: status, headers (minus hop-by-hop ones) and body unchanged.
fn pass_through(response: Response<Bytes>) -> Response<Full<Bytes>> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Full::new(body))
}

/// RFC 9110 §7.6.1: `Connection` and the headers it names, plus the classic hop-by-hop set.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually there are none (and the headers `Connection` names only count if it is there): look before removing.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Reads a `delete_conversation` body: refused early when its declared length is too large, and bounded in time
/// so a client that stops sending cannot hold the request open.
async fn read_body<B>(body: B, timeout: Duration) -> Result<Bytes, GatewayError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > MAX_BODY_BYTES as u64 {
        return Err(GatewayError::BodyTooLarge { limit: MAX_BODY_BYTES });
    }
    match tokio::time::timeout(timeout, Limited::new(body, MAX_BODY_BYTES).collect()).await {
        Err(_) => Err(GatewayError::BodyTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(GatewayError::BodyTooLarge { limit: MAX_BODY_BYTES })
        }
        Ok(Err(_)) => Err(GatewayError::BodyUnreadable),
    }
}

/// The SDK drop-in: unmodified Easemob server SDKs ask for a token first; they get a placeholder, never the real one.
fn placeholder_token(app: &App) -> Response<Full<Bytes>> {
    let application = app.token.application().unwrap_or_else(|| app.app.clone());
    let body = serde_json::json!({
        "access_token": PLACEHOLDER_TOKEN,
        "expires_in": PLACEHOLDER_TTL_SECS,
        "application": application,
    });
    json_response(StatusCode::OK, body.to_string().into_bytes(), "local")
}

/// Counts a request in `in_flight_requests` for exactly as long as it lives, even if its future is dropped.
struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn enter(metrics: &Metrics) -> InFlight {
        metrics.in_flight.inc();
        InFlight(metrics.in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The proxy as a `tower::Service` for one client connection: the innermost service of the data-plane stack.
#[derive(Clone)]
pub struct ProxyService {
    proxy: Arc<Proxy>,
    peer: IpAddr,
}

impl ProxyService {
    pub fn new(proxy: Arc<Proxy>, peer: IpAddr) -> Self {
        ProxyService { proxy, peer }
    }
}

impl<B> tower::Service<Request<B>> for ProxyService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let proxy = Arc::clone(&self.proxy);
        let peer = self.peer;
        Box::pin(async move { Ok(proxy.handle(request, peer).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("close, x-trace-hop"));
        headers.insert("x-trace-hop", HeaderValue::from_static("1"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");

        let mut end_to_end = HeaderMap::new();
        end_to_end.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        end_to_end.insert("x-trace-hop", HeaderValue::from_static("1"));
        let before = end_to_end.clone();
        strip_hop_by_hop(&mut end_to_end);
        assert_eq!(end_to_end, before, "without Connection, other headers pass");
    }
}
