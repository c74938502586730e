//! The jobs API, on the data plane under the same access rules and load shedding (the router sends it every path
//! under `…/_gateway/`), at `/{org}/{app}/_gateway/jobs` (or `/_gateway/jobs` when one app is configured): no
//! Easemob path starts with `_`, so none can collide.
//!
//! - `POST …/jobs` `{"operations": [{"method", "path", "body"}…]}` creates a job, all or nothing (`Idempotency-Key`
//!   makes a retried create return the first job);
//! - `GET …/jobs?state=&before=&limit=` lists the app's jobs, newest first;
//! - `GET …/jobs/{id}?from=&limit=&operations=` reads one, with a page of its operations;
//! - `POST …/jobs/{id}/cancel` cancels what has not been sent;
//! - `GET …/jobs/{id}/receipt?format=json|csv` its receipt (`jobs/receipt.rs`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryFutureExt;
use http::{HeaderValue, Method, Request, StatusCode, header};
use tower::BoxError;
use tracing::warn;

use super::Jobs;
use super::intake::{self, Intake, Limits};
use super::records::{Created, JobState, OpState, StoreError};
use crate::access::Caller;
use crate::apps::{App, Apps};
use crate::config::is_plain_label;
use crate::error::{Failure, GatewayError, json_response};
use crate::exchange::{Answer, Labels, Waiting};
use crate::layers::validate::{find, refuse_declared_over};
use crate::receipt::Format;
use crate::routes::JobsPath;

const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

/// The jobs API: the router's handler for every path under `…/_gateway/`.
#[derive(Clone)]
pub struct JobsApi {
    apps: Apps,
    jobs: Option<Jobs>,
    body_read_timeout: Duration,
    /// The connection's client, for the receipts of the jobs it makes.
    peer: Option<IpAddr>,
}

/// What a jobs API request asks for, once its path is resolved and its app found.
pub struct Target {
    jobs: Jobs,
    app: Arc<App>,
    path: JobsRoute,
}

/// A jobs API path, owned: it outlives the request line it was read from.
enum JobsRoute {
    Collection,
    Job(String),
    Cancel(String),
    Receipt(String),
    Unknown,
}

impl JobsApi {
    pub fn new(apps: Apps, jobs: Option<Jobs>, body_read_timeout: Duration, peer: Option<IpAddr>) -> JobsApi {
        JobsApi { apps, jobs, body_read_timeout, peer }
    }

    /// What a request for `path`, naming the app `named`, asks for.
    pub fn target(&self, named: Option<(&str, &str)>, path: JobsPath<'_>) -> Result<Target, GatewayError> {
        // With jobs off, their paths say so (and how to turn them on) rather than being unknown routes.
        let jobs = self.jobs.clone().ok_or(GatewayError::JobsDisabled)?;
        let path = match path {
            JobsPath::Collection => JobsRoute::Collection,
            JobsPath::Job(id) => JobsRoute::Job(id.to_owned()),
            JobsPath::Cancel(id) => JobsRoute::Cancel(id.to_owned()),
            JobsPath::Receipt(id) => JobsRoute::Receipt(id.to_owned()),
            JobsPath::Unknown => JobsRoute::Unknown,
            JobsPath::Elsewhere => {
                return Err(GatewayError::UnknownRoute {
                    hint: "the jobs API is at /{org_name}/{app_name}/_gateway/jobs",
                });
            }
        };
        Ok(Target { jobs, app: Arc::clone(find(&self.apps, named)?), path })
    }

    /// The answer to a jobs API request, labelled with its app (refusals included), so that its log line and
    /// metrics count under that app.
    pub fn call<B>(&self, target: Target, request: Request<B>) -> Waiting<Failure>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let api = self.clone();
        Box::pin(async move {
            let labels = Labels { app: Some(Arc::clone(&target.app)), ..Labels::default() };
            Failure::labelled(api.serve(&target, request).await, labels)
        })
    }

    async fn serve<B>(&self, target: &Target, request: Request<B>) -> Result<Answer, GatewayError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let Target { jobs, app, path } = target;
        let query = Query::parse(request.uri().query())?;
        match (request.method(), path) {
            (&Method::POST, JobsRoute::Collection) => self.create(jobs, app, request).await,
            (&Method::GET, JobsRoute::Collection) => list(jobs, app, &query).await,
            (&Method::GET, JobsRoute::Job(id)) => show(jobs, app, id, &query).await,
            (&Method::POST, JobsRoute::Cancel(id)) => cancel(jobs, app, id).await,
            (&Method::GET, JobsRoute::Receipt(id)) => receipt(jobs, app, id, &query).await,
            (_, JobsRoute::Collection | JobsRoute::Cancel(_)) => {
                Err(GatewayError::MethodNotAllowed { allow: Method::POST })
            }
            (_, JobsRoute::Job(_) | JobsRoute::Receipt(_)) => {
                Err(GatewayError::MethodNotAllowed { allow: Method::GET })
            }
            (_, JobsRoute::Unknown) => Err(GatewayError::UnknownRoute { hint: "no jobs API route has this path" }),
        }
    }

    async fn create<B>(&self, jobs: &Jobs, app: &Arc<App>, request: Request<B>) -> Result<Answer, GatewayError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = request.into_parts();
        let idempotency_key = match parts.headers.get(IDEMPOTENCY_KEY).map(HeaderValue::to_str) {
            None => None,
            Some(Ok(key)) if is_plain_label(key, 128) => Some(key.to_owned()),
            Some(_) => {
                return Err(invalid(
                    "illegal_argument",
                    "Idempotency-Key must be 1-128 characters of A-Z a-z 0-9 - _ . :",
                ));
            }
        };
        let config = jobs.config();
        // Refused at once, without waiting for a turn.
        refuse_declared_over(&body, config.max_body_bytes())?;
        // Until the operations are stored: what job requests hold together is bounded.
        let _turn = jobs.intake_turn().await;
        let limits = Limits {
            max_operations: config.max_operations,
            max_body_bytes: config.max_body_bytes(),
            body_read_timeout: self.body_read_timeout,
        };
        let now_ms = jobs.clock().now_ms();
        let staging = jobs.staging(app, self.peer);
        let stage = |from, batch| staging.stage(from, batch).map_err(unavailable(app));
        let Intake { sha256, .. } =
            intake::read(jobs.parser(), body, &limits, Arc::clone(app), now_ms, idempotency_key.is_some(), stage)
                .await?;
        let Caller(caller) = parts.extensions.get::<Caller>().cloned().unwrap_or_default();
        let created = staging
            .submit(app, caller.as_deref(), idempotency_key.as_deref(), sha256)
            .await
            .map_err(unavailable(app))?;
        let (status, job) = match created {
            Created::New(job) => (StatusCode::ACCEPTED, job),
            Created::Existing { job, same_request: true } => (StatusCode::OK, job),
            Created::Existing { same_request: false, .. } => return Err(GatewayError::IdempotencyConflict),
        };
        Ok(located(status, app, &job.id, &jobs.describe(app, &job).await.map_err(unavailable(app))?))
    }
}

async fn show(jobs: &Jobs, app: &App, id: &str, query: &Query) -> Result<Answer, GatewayError> {
    let job =
        jobs.store().job(app.key.as_str(), id).await.map_err(unavailable(app))?.ok_or(GatewayError::JobNotFound)?;
    let limit = query.limit(100, 1000)?;
    let from = query.number("from")?.unwrap_or(0);
    let only = match query.get("operations") {
        None => None,
        Some(state) => Some(OpState::parse(state).ok_or_else(|| {
            invalid("illegal_argument", "operations must be one of pending, succeeded, failed, cancelled")
        })?),
    };
    let page = jobs.store().operations(&job, from, limit + 1, only).await.map_err(unavailable(app))?;
    let mut view = jobs.describe(app, &job).await.map_err(unavailable(app))?;
    let more = page.len() > limit as usize;
    let page = &page[..page.len().min(limit as usize)];
    let fields = view.as_object_mut().expect("a job view is an object");
    if more && let Some(last) = page.last() {
        let filter = only.map(|s| format!("&operations={}", s.as_str())).unwrap_or_default();
        let next = format!("{}?from={}&limit={limit}{filter}", super::location(app, id), last.index + 1);
        fields.insert("next".to_owned(), next.into());
    }
    fields.insert("operations".to_owned(), serde_json::to_value(page).expect("operations serialize"));
    Ok(json(StatusCode::OK, &view))
}

async fn list(jobs: &Jobs, app: &App, query: &Query) -> Result<Answer, GatewayError> {
    let limit = query.limit(50, 500)?;
    let state = match query.get("state") {
        None => None,
        Some(state) => Some(JobState::parse(state).ok_or_else(|| {
            invalid("illegal_argument", "state must be one of queued, running, done, failed, cancelled")
        })?),
    };
    let before = query.number("before")?;
    let page = jobs.store().list(app.key.as_str(), state, before, limit + 1).await.map_err(unavailable(app))?;
    let more = page.len() > limit as usize;
    let page = &page[..page.len().min(limit as usize)];
    let views: Vec<serde_json::Value> = page.iter().map(|job| super::view(app, job)).collect();
    let mut body = serde_json::json!({ "jobs": views });
    if more && let Some(last) = page.last() {
        let filter = state.map(|s| format!("&state={}", s.as_str())).unwrap_or_default();
        body["next"] = format!("{}?before={}&limit={limit}{filter}", super::collection(app), last.seq).into();
    }
    Ok(json(StatusCode::OK, &body))
}

async fn cancel(jobs: &Jobs, app: &App, id: &str) -> Result<Answer, GatewayError> {
    let job = jobs.cancel(app, id).await.map_err(unavailable(app))?.ok_or(GatewayError::JobNotFound)?;
    Ok(json(StatusCode::OK, &jobs.describe(app, &job).await.map_err(unavailable(app))?))
}

async fn receipt(jobs: &Jobs, app: &App, id: &str, query: &Query) -> Result<Answer, GatewayError> {
    let format = match query.get("format") {
        None | Some("json") => Format::Json,
        Some("csv") => Format::Csv,
        Some(_) => return Err(invalid("illegal_argument", "format must be json or csv")),
    };
    let job =
        jobs.store().job(app.key.as_str(), id).await.map_err(unavailable(app))?.ok_or(GatewayError::JobNotFound)?;
    let body = super::receipt::write(jobs, &job, format).await.map_err(unavailable(app))?;
    let mut answer = json_response(StatusCode::OK, body, "local");
    if format == Format::Csv {
        answer.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv;charset=UTF-8"));
    }
    Ok(answer)
}

/// The list and read parameters; anything else is refused by name.
struct Query(Vec<(String, String)>);

impl Query {
    const KNOWN: [&str; 6] = ["from", "limit", "operations", "state", "before", "format"];

    fn parse(query: Option<&str>) -> Result<Query, GatewayError> {
        let pairs: Vec<(String, String)> =
            form_urlencoded::parse(query.unwrap_or("").as_bytes()).into_owned().collect();
        if let Some((unknown, _)) = pairs.iter().find(|(k, _)| !Query::KNOWN.contains(&k.as_str())) {
            let known = Query::KNOWN.join(", ");
            return Err(invalid("illegal_argument", &format!("unknown query parameter {unknown:?}; known: {known}")));
        }
        Ok(Query(pairs))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn number(&self, key: &str) -> Result<Option<i64>, GatewayError> {
        self.get(key)
            .map(|v| {
                v.parse::<i64>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| invalid("illegal_argument", &format!("{key} must be a whole number")))
            })
            .transpose()
    }

    fn limit(&self, default: u32, max: u32) -> Result<u32, GatewayError> {
        match self.number("limit")? {
            None => Ok(default),
            Some(n) if (1..=i64::from(max)).contains(&n) => Ok(n as u32),
            Some(_) => Err(invalid("illegal_argument", &format!("limit must be from 1 to {max}"))),
        }
    }
}

fn invalid(error: &'static str, description: &str) -> GatewayError {
    GatewayError::InvalidJob { error, description: description.to_owned() }
}

/// A store failure is logged with its cause and answered 503: nothing is accepted that cannot be kept.
fn unavailable(app: &App) -> impl Fn(StoreError) -> GatewayError + '_ {
    move |e| {
        warn!(app = %app.key, error = %e, "jobs store failed");
        GatewayError::JobsUnavailable
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Answer {
    json_response(status, value.to_string().into_bytes(), "local")
}

/// A job's answer: its view, with `Location` saying where to read it again.
pub fn located(status: StatusCode, app: &App, id: &str, view: &serde_json::Value) -> Answer {
    let mut answer = json(status, view);
    let location = HeaderValue::try_from(super::location(app, id)).expect("a job location is a header value");
    answer.headers_mut().insert(header::LOCATION, location);
    answer
}
