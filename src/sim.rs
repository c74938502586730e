//! The Easemob simulator: an in-memory, stateful stand-in for Easemob's token endpoint and the six deletion
//! routes, answering with Easemob's own bodies, plus a control API under `/_sim/` to inspect state, count calls
//! and inject faults. Used by `demo`, the tests and the benchmarks; `easemob-gateway sim` runs it alone.
//!
//! It enforces Easemob's rate limits as Easemob would (`limits.rs`: per AppKey and route 100 calls in any second,
//! per user 5 `delete_conversation` calls in any minute; `/_sim/limits` changes them), answering 429 `reach_limit`
//! without applying the call, so a test that drives traffic through it catches a gateway that lets too much
//! through. A call counts once it would be carried out: authenticated, on a known route and user, and valid.
//!
//! It parses requests on its own, not with the gateway's route table, so the two can disagree and tests notice.
//! This file is its model of Easemob (tokens, the six operations, faults, stats); `sim/transport.rs` serves it
//! over HTTP(S), `sim/control.rs` is the `/_sim/` API, `sim/state.rs` the users and conversations, `sim/limits.rs`
//! Easemob's limits, `sim/deletion.rs` the routes' own checks and what each deletion does.

mod control;
mod deletion;
pub mod limits;
pub mod state;
pub mod transport;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::Instant;

use deletion::Deletion;
use limits::Limits;
use state::{App, TokenCheck};

/// Marks an answer to be cut off mid-body (the `reset_count` fault), which the transport carries out.
#[derive(Clone, Copy)]
struct CutOff;

/// How many business requests `GET /_sim/requests` remembers.
const REQUEST_LOG_LEN: usize = 1000;

/// Faults to inject, replaced as a whole by `PUT /_sim/faults`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// The token endpoint answers this status (e.g. 503) instead of issuing tokens.
    pub token_status: Option<u16>,
    /// The token endpoint waits this long before answering.
    pub token_delay_ms: u64,
    /// The token endpoint refuses every fetch (401 `invalid_grant`) and repeats in its `error_description`
    /// everything it received: method, path, headers and body, and the body's fields as a form would carry them
    /// (URL-encoded), as a careless server's error page does.
    pub token_echo: bool,
    /// Business routes answer this status with Easemob's matching error body …
    pub status: Option<u16>,
    /// … for this many requests (absent: until the faults change).
    pub status_count: Option<u32>,
    /// Business routes wait this long before answering.
    pub delay_ms: u64,
    /// The answers `status` forces repeat in their `error_description` everything the request carried (as
    /// `token_echo` does), its `Authorization` header included.
    pub echo: bool,
    /// Business routes answer `service open exception`, as for an app without message roaming.
    pub roaming_disabled: bool,
    /// This many business answers are cut off after their first bytes (the connection is reset mid-answer),
    /// after the operation was applied.
    pub reset_count: u32,
    /// Connections accepted from now on are closed once idle this long, as a server closes keep-alive
    /// connections it no longer wants.
    pub idle_close_ms: Option<u64>,
    /// Headers added to every business answer (a front that adds its own, or one that imitates the gateway's).
    pub answer_headers: BTreeMap<String, String>,
    /// Token and business answers are padded with trailing spaces to this many bytes: the same JSON, longer.
    pub answer_bytes: Option<usize>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub token_requests: u64,
    pub tokens_issued: u64,
    /// Tokens issued while the app still held an unexpired one: refreshes done ahead of expiry.
    pub tokens_issued_before_expiry: u64,
    pub business_requests: u64,
    pub by_route: BTreeMap<&'static str, u64>,
    /// Business requests per Unix second of arrival: what a per-second quota is judged on.
    pub by_second: BTreeMap<u64, u64>,
    pub by_status: BTreeMap<u16, u64>,
    /// Calls refused with 429 for being over one of Easemob's limits: a gateway let too much through.
    pub over_limit: u64,
    pub over_limit_by_route: BTreeMap<&'static str, u64>,
    /// Connections accepted, open now (this request's own included), and closed by `idle_close_ms`.
    pub connections: u64,
    pub connections_open: u64,
    pub connections_closed_idle: u64,
}

/// A business request as the simulator received it, for tests to check what the gateway sent.
#[derive(Clone, Debug, Serialize)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// When it arrived, in microseconds since the Unix epoch: what Easemob's windows are counted on.
    pub arrived_us: u64,
}

struct World {
    apps: Vec<App>,
    faults: Faults,
    limits: Limits,
    stats: Stats,
    requests: VecDeque<Recorded>,
    /// Every business request ever received, by `METHOD path?query`: how many times (the log above keeps only
    /// the last [`REQUEST_LOG_LEN`]).
    received: HashMap<String, u32>,
}

/// The app `org`/`app` names, case-insensitively; a free function so that a caller can hold the app and the
/// world's other fields at once.
fn find_app<'w>(apps: &'w mut [App], org: &str, app: &str) -> Option<&'w mut App> {
    apps.iter_mut().find(|a| a.org.eq_ignore_ascii_case(org) && a.name.eq_ignore_ascii_case(app))
}

#[derive(Clone)]
pub struct Simulator {
    world: Arc<Mutex<World>>,
}

impl Simulator {
    /// A connection was accepted: how long it may stay idle, if the faults say.
    fn connection_accepted(&self) -> Option<Duration> {
        let mut world = self.world.lock().expect("world lock");
        world.stats.connections += 1;
        world.stats.connections_open += 1;
        world.faults.idle_close_ms.map(Duration::from_millis)
    }

    fn connection_closed(&self, idle: bool) {
        let stats = &mut self.world.lock().expect("world lock").stats;
        stats.connections_open -= 1;
        stats.connections_closed_idle += u64::from(idle);
    }

    /// The demo world: two apps (`demo`, `demo2`) with the demo credentials, each seeded by [`state::seed`].
    pub fn demo() -> Simulator {
        let now = now_ms();
        let apps = [state::DEMO_APP, state::DEMO_APP_2]
            .into_iter()
            .map(|name| {
                let mut app = App::new(state::DEMO_ORG, name, state::DEMO_CLIENT_ID, state::DEMO_CLIENT_SECRET);
                state::seed(&mut app, now);
                app
            })
            .collect();
        let world = World {
            apps,
            faults: Faults::default(),
            limits: Limits::default(),
            stats: Stats::default(),
            requests: VecDeque::new(),
            received: HashMap::new(),
        };
        Simulator { world: Arc::new(Mutex::new(world)) }
    }

    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        // A panic while holding the lock cannot leave the world half-updated in a way that matters for a test double.
        self.world.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let (parts, body) = request.into_parts();
        let Ok(body) = Limited::new(body, 1024 * 1024).collect().await.map(|c| c.to_bytes()) else {
            return error(StatusCode::BAD_REQUEST, "invalid_request_body", "Request body is invalid.", started);
        };
        let path = parts.uri.path().to_owned();
        if let Some(control) = path.strip_prefix("/_sim/") {
            return self.control(&parts.method, control, &body);
        }
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let answer = match segments.as_slice() {
            [org, app, "token"] if parts.method == Method::POST => self.token(&parts, org, app, &body, started).await,
            [org, app, rest @ ..] => self.business(&parts, org, app, rest, &body, started).await,
            _ => error(StatusCode::NOT_FOUND, "service_resource_not_found", "Service resource not found", started),
        };
        let answer_bytes = self.world().faults.answer_bytes;
        match answer_bytes {
            Some(length) => padded(answer, length).await,
            None => answer,
        }
    }

    async fn token(
        &self,
        parts: &http::request::Parts,
        org: &str,
        app: &str,
        body: &[u8],
        started: Instant,
    ) -> Response<Full<Bytes>> {
        let faults = {
            let mut world = self.world();
            world.stats.token_requests += 1;
            world.faults.clone()
        };
        if faults.token_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(faults.token_delay_ms)).await;
        }
        if let Some(status) = faults.token_status {
            return forced(status, None, started);
        }
        if faults.token_echo {
            let text = format!("invalid client credentials for request {}", echo(parts, body));
            return error(StatusCode::UNAUTHORIZED, "invalid_grant", &text, started);
        }
        let mut world = self.world();
        let Some(app) = find_app(&mut world.apps, org, app) else {
            let text = format!("Could not find application for {org}/{app} from URI: {org}/{app}/token");
            return error(StatusCode::NOT_FOUND, "organization_application_not_found", &text, started);
        };
        let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
            return error(StatusCode::BAD_REQUEST, "invalid_request_body", "Request body is invalid.", started);
        };
        let field = |name: &str| fields.get(name).and_then(Value::as_str).filter(|s| !s.is_empty());
        for name in ["grant_type", "client_id", "client_secret"] {
            if field(name).is_none() {
                let text = format!("{name} cannot be null or empty");
                return error(StatusCode::BAD_REQUEST, "illegal_argument", &text, started);
            }
        }
        if field("grant_type") != Some("client_credentials") {
            return error(StatusCode::BAD_REQUEST, "unsupported_grant_type", "unsupported grant type", started);
        }
        if field("client_id") != Some(app.client_id.as_str()) {
            return error(StatusCode::BAD_REQUEST, "invalid_grant", "client_id does not match", started);
        }
        if field("client_secret") != Some(app.client_secret.as_str()) {
            return error(StatusCode::BAD_REQUEST, "invalid_grant", "client_secret does not match", started);
        }
        let ttl = fields.get("ttl").and_then(Value::as_u64).unwrap_or(state::DEFAULT_TOKEN_TTL_SECS);
        let ahead_of_expiry = app.holds_valid_token();
        let token = app.issue_token(ttl);
        let answer = json!({ "access_token": token, "expires_in": ttl, "application": app.uuid });
        world.stats.tokens_issued += 1;
        world.stats.tokens_issued_before_expiry += u64::from(ahead_of_expiry);
        ok(answer)
    }

    async fn business(
        &self,
        parts: &http::request::Parts,
        org: &str,
        app_name: &str,
        rest: &[&str],
        body: &[u8],
        started: Instant,
    ) -> Response<Full<Bytes>> {
        let route = route_name(&parts.method, rest);
        let faults = {
            let mut world = self.world();
            world.stats.business_requests += 1;
            *world.stats.by_second.entry(now_ms() as u64 / 1000).or_default() += 1;
            *world.stats.by_route.entry(route.unwrap_or("unknown")).or_default() += 1;
            let target = match parts.uri.query() {
                Some(query) => format!("{} {}?{query}", parts.method, parts.uri.path()),
                None => format!("{} {}", parts.method, parts.uri.path()),
            };
            *world.received.entry(target).or_default() += 1;
            if world.requests.len() == REQUEST_LOG_LEN {
                world.requests.pop_front();
            }
            world.requests.push_back(Recorded {
                method: parts.method.to_string(),
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().map(str::to_owned),
                headers: parts
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                    .collect(),
                body: String::from_utf8_lossy(body).into_owned(),
                arrived_us: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64),
            });
            let faults = world.faults.clone();
            if faults.status.is_some() {
                match &mut world.faults.status_count {
                    Some(0) => {}
                    Some(n) => *n -= 1,
                    None => {}
                }
            }
            faults
        };
        if faults.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(faults.delay_ms)).await;
        }
        let echoed = faults.echo.then(|| echo(parts, body));
        let mut response = match (faults.status, faults.status_count) {
            (Some(status), None) => forced(status, echoed, started),
            (Some(status), Some(n)) if n > 0 => forced(status, echoed, started),
            _ => self.apply(parts, org, app_name, route, rest, body, faults.roaming_disabled, started),
        };
        for (name, value) in &faults.answer_headers {
            if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
                response.headers_mut().append(name, value);
            }
        }
        if faults.reset_count > 0 {
            let mut world = self.world();
            world.faults.reset_count = world.faults.reset_count.saturating_sub(1);
            response.extensions_mut().insert(CutOff);
        }
        *self.world().stats.by_status.entry(response.status().as_u16()).or_default() += 1;
        response
    }

    /// Authenticates, checks and applies one of the six operations, with Easemob's checks and answers; a valid
    /// call over a limit is refused, not applied.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        parts: &http::request::Parts,
        org: &str,
        app_name: &str,
        route: Option<&'static str>,
        rest: &[&str],
        body: &[u8],
        roaming_disabled: bool,
        started: Instant,
    ) -> Response<Full<Bytes>> {
        let mut world = self.world();
        let World { apps, limits, stats, .. } = &mut *world;
        let Some(app) = find_app(apps, org, app_name) else {
            let text = format!("Could not find application for {org}/{app_name}");
            return error(StatusCode::NOT_FOUND, "organization_application_not_found", &text, started);
        };
        if let Err(refused) = authenticate(app, parts) {
            return refused.answer(started);
        }
        let Some(route) = route else {
            return error(StatusCode::NOT_FOUND, "service_resource_not_found", "Service resource not found", started);
        };
        let owner = match rest {
            ["users", owner, "user_channel"] => *owner,
            ["rest", "message", "roaming", "user", owner, ..] => *owner,
            ["rest", "message", "roaming", _, "user", owner, ..] => *owner,
            _ => unreachable!("route_name matched"),
        };
        let owner = percent_encoding::percent_decode_str(owner).decode_utf8_lossy().into_owned();
        if !app.has_user(&owner) {
            return error(StatusCode::NOT_FOUND, "service_resource_not_found", "Service resource not found", started);
        }
        let query: HashMap<String, String> =
            form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes()).into_owned().collect();
        let deletion = if route == "delete_conversation" {
            Deletion::of_conversation(body)
        } else if roaming_disabled || !app.roaming_enabled {
            let text = "this appKey not open message roaming";
            return error(StatusCode::BAD_REQUEST, "service open exception", text, started);
        } else {
            Deletion::of_messages(route, &query)
        };
        let deletion = match deletion {
            Ok(deletion) => deletion,
            Err(refused) => return refused.answer(started),
        };
        // Checked last, so only a call that would be carried out takes a slot: what Easemob presumably counts,
        // and never more than a gateway that forwards only valid calls counts itself.
        if !app.meter.admit(limits, route, &owner, Instant::now()) {
            stats.over_limit += 1;
            *stats.over_limit_by_route.entry(route).or_default() += 1;
            return forced(StatusCode::TOO_MANY_REQUESTS.as_u16(), None, started);
        }
        deletion.carry_out(app, &owner, parts, started)
    }
}

/// A call Easemob refuses: its status, error type and description.
struct Refused(StatusCode, &'static str, &'static str);

impl Refused {
    fn answer(self, started: Instant) -> Response<Full<Bytes>> {
        let Refused(status, error_type, description) = self;
        error(status, error_type, description, started)
    }
}

/// Easemob's check of the bearer token: refused when missing, expired or unknown.
fn authenticate(app: &App, parts: &http::request::Parts) -> Result<(), Refused> {
    let bearer = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match bearer.and_then(|v| v.strip_prefix("Bearer ")).map(|t| app.check_token(t)) {
        Some(TokenCheck::Valid) => Ok(()),
        None | Some(TokenCheck::Expired) => {
            let text = "Unable to authenticate due to expired access token";
            Err(Refused(StatusCode::UNAUTHORIZED, "unauthorized", text))
        }
        Some(TokenCheck::Unknown) => {
            let text = "Unable to authenticate due to corrupt access token";
            Err(Refused(StatusCode::UNAUTHORIZED, "auth_bad_access_token", text))
        }
    }
}

/// The route a business request names, by Easemob's method and path shape (`None`: no such route).
fn route_name(method: &Method, rest: &[&str]) -> Option<&'static str> {
    let name = match rest {
        ["rest", "message", "roaming", "chat", "user", _] => "delete_chat_messages",
        ["rest", "message", "roaming", "group", "user", _] => "delete_group_messages",
        ["rest", "message", "roaming", "user", _, "delete", "all"] => "clear_user_messages",
        ["rest", "message", "roaming", "chat", "user", _, "time"] => "clear_chat_messages_before",
        ["rest", "message", "roaming", "group", "user", _, "time"] => "clear_group_messages_before",
        ["users", _, "user_channel"] => "delete_conversation",
        _ => return None,
    };
    let expected = if name == "clear_user_messages" { Method::POST } else { Method::DELETE };
    (*method == expected).then_some(name)
}

/// Everything a request carried, as one line: method, path, headers, the body as received, and its JSON fields
/// URL-encoded as a form body would carry them.
fn echo(parts: &http::request::Parts, body: &[u8]) -> String {
    let headers: Vec<String> =
        parts.headers.iter().map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes()))).collect();
    let form = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => {
            let mut form = form_urlencoded::Serializer::new(String::new());
            for (name, value) in &fields {
                form.append_pair(name, &value.as_str().map_or_else(|| value.to_string(), str::to_owned));
            }
            form.finish()
        }
        _ => String::new(),
    };
    format!(
        "{} {} headers {} body {} form {form}",
        parts.method,
        parts.uri,
        headers.join("; "),
        String::from_utf8_lossy(body)
    )
}

fn header_host(parts: &http::request::Parts) -> String {
    parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost").to_owned()
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn ok(body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json;charset=UTF-8")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}

/// `answer` with its body padded with trailing spaces to `length` bytes.
async fn padded(answer: Response<Full<Bytes>>, length: usize) -> Response<Full<Bytes>> {
    let (parts, body) = answer.into_parts();
    let mut body = body.collect().await.map(|c| c.to_bytes().to_vec()).unwrap_or_else(|e| match e {});
    body.resize(length.max(body.len()), b' ');
    Response::from_parts(parts, Full::new(Bytes::from(body)))
}

/// Easemob's error envelope.
fn error(status: StatusCode, error: &str, description: &str, started: Instant) -> Response<Full<Bytes>> {
    let exception = match status {
        StatusCode::UNAUTHORIZED => "EasemobSecurityException",
        StatusCode::NOT_FOUND => "EasemobResourceNotFoundException",
        StatusCode::TOO_MANY_REQUESTS => "EasemobRequestLimitException",
        s if s.is_server_error() => "EasemobServiceUnavailableException",
        _ => "IllegalArgumentException",
    };
    let body = json!({
        "error": error, "exception": exception, "timestamp": now_ms(),
        "duration": started.elapsed().as_millis() as u64, "error_description": description,
    });
    let mut response = ok(body);
    *response.status_mut() = status;
    response
}

/// An injected answer: Easemob's body for that status where it has one, repeating `echo` (the request) if given.
fn forced(status: u16, echo: Option<String>, started: Instant) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // A broken front switching a deletion's connection to another protocol: no final answer follows.
        return Response::builder()
            .status(status)
            .header(header::UPGRADE, "evil")
            .header(header::CONNECTION, "Upgrade")
            .body(Full::new(Bytes::new()))
            .expect("static response parts are valid");
    }
    let (error_type, description) = match status.as_u16() {
        401 => ("unauthorized", "Unable to authenticate due to expired access token"),
        429 => ("reach_limit", "This request has reached api limit"),
        503 => ("service_unavailable", "Service unavailable"),
        s if s >= 500 => ("internal_server_error", "Internal server error"),
        _ => ("Bad Request", "Bad Request"),
    };
    match echo {
        Some(echo) => error(status, error_type, &format!("{description} for request {echo}"), started),
        None => error(status, error_type, description, started),
    }
}
