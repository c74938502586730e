//! The data plane as one tower middleware stack, built in one place, outermost first. Above the rescue layer a
//! service never fails; below it every one fails with a typed error (`error.rs`), which only the rescue layer
//! turns into an answer.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::sync::Semaphore;
use tower::retry::RetryLayer;
use tower::{BoxError, Service, ServiceBuilder};
use tower_http::body::UnsyncBoxBody;
use tower_http::catch_panic::CatchPanicLayer;

use crate::access::{Access, AccessLayer};
use crate::apps::Apps;
use crate::audit::{Audit, AuditLayer};
use crate::error::GatewayError;
use crate::exchange::{Answer, Exchange};
use crate::head::{HeadLimitLayer, MeasureHeadLayer};
use crate::jobs::Jobs;
use crate::jobs::api::JobsApi;
use crate::jobs::defer::DeferLayer;
use crate::layers::forward::Forward;
use crate::layers::quota::QuotaLayer;
use crate::layers::token::TokenLayer;
use crate::layers::validate::ValidateLayer;
use crate::metrics::Metrics;
use crate::observe::ObserveLayer;
use crate::ratelimit::QuotaSet;
use crate::request_id::RequestIdLayer;
use crate::rescue::RescueLayer;
use crate::retry::SafeRetry;
use crate::router::RouterLayer;
use crate::shed::ShedLayer;
use crate::trace::export::Export;

/// What every connection's stack shares, process-wide: put together by `bootstrap.rs`, at start-up and again by each
/// reload.
#[derive(Clone)]
pub struct Shared {
    pub apps: Apps,
    pub access: Arc<Access>,
    /// Requests being handled, across all workers: `server.max_in_flight`.
    pub in_flight: Arc<Semaphore>,
    pub quota: Arc<QuotaSet>,
    pub audit: Option<Arc<Audit>>,
    /// The retry policy, whose budget every connection shares.
    pub retry: SafeRetry,
    pub metrics: Metrics,
    pub body_read_timeout: Duration,
    /// Deletion jobs, when `jobs.store` is set.
    pub jobs: Option<Jobs>,
    /// Span export, when `trace.otlp_endpoint` is set.
    pub export: Option<Export>,
}

/// The data plane for one connection from `peer`, forwarding through `worker` (its worker's pool).
pub fn data_plane(
    shared: &Shared,
    worker: &Forward,
    peer: IpAddr,
) -> impl Service<
    Request<Incoming>,
    Response = Response<UnsyncBoxBody<Bytes, BoxError>>,
    Error = Infallible,
    Future: Send + 'static,
>
+ Clone
+ Send
+ 'static
+ use<> {
    ServiceBuilder::new()
        // The head measured as it arrived, before a layer adds to it; refused below observe.
        .layer(MeasureHeadLayer)
        // A request id before anything can answer, so every answer, refusals included, carries one.
        .layer(RequestIdLayer)
        // A panic becomes an enveloped 500, not a dropped connection: the one answer to a failure made outside the
        // rescue layer, since a panic unwinds past it.
        .layer(CatchPanicLayer::custom(|_| GatewayError::Internal.into_response(Instant::now())))
        // Observe the final answer once, whichever layer made it: one log line and the metrics (a panic below is
        // recorded as the 500 the guard above answers it with). Inside the guard, so answers reach it with their
        // stamp beside the body, before the guard boxes the body.
        .layer(ObserveLayer::new(shared.metrics.clone()))
        // Every failure below becomes Easemob's error envelope here, labelled with what the request named: right
        // under observe, which so sees refusals as answers like any other.
        .layer(RescueLayer)
        // A head over the cap (as measured above) is refused before anything reads it further.
        .layer(HeadLimitLayer)
        // Who may call, before anything costs work.
        .layer(AccessLayer::new(Arc::clone(&shared.access), peer))
        // Shed load before reading a body or waiting for quota: a fast 503 beyond server.max_in_flight.
        .layer(ShedLayer::new(Arc::clone(&shared.in_flight)))
        // The path resolved once, under the same access rules and load shedding for every handler: the six
        // operations go down this stack; the SDK token endpoint and the jobs API (`…/_gateway/jobs`) are answered
        // beside it; any other path is refused.
        .layer(RouterLayer::new(
            shared.apps.clone(),
            JobsApi::new(shared.apps.clone(), shared.jobs.clone(), shared.body_read_timeout, Some(peer)),
        ))
        // Validate once: from here down a request is a typed Call; nothing below sees the raw path, query or body.
        // A sampled request's spans start here, where its route is known (they are finished by the observe layer).
        .layer(
            ValidateLayer::new(shared.apps.clone(), shared.body_read_timeout)
                .respond_async(shared.jobs.is_some())
                .export(shared.export.clone()),
        )
        // A valid call sent with `Prefer: respond-async` is stored as a job here, and runs through `job_plane`.
        .layer(DeferLayer::new(shared.jobs.clone(), Some(peer)))
        // The token outside the quota: a call that cannot get a token costs no slot. Its 401 replay goes through
        // the retry and the quota below, as a call of its own.
        .layer(TokenLayer::new(&shared.metrics, shared.apps.iter()))
        // One safe retry under its budget and the request's deadline; it pays for its own slot below, unless the
        // attempt it repeats failed to connect and hands back the slot it never used.
        .layer(RetryLayer::new(shared.retry.clone()))
        // Every call that leaves for Easemob takes a slot, as Easemob counts them.
        .layer(QuotaLayer::new(Arc::clone(&shared.quota)))
        // The audit event of every attempt that leaves for Easemob, first, retry or replay, with its own outcome:
        // right above the forwarding, where each is seen, and after the quota, which sends nothing it refuses.
        .layer(AuditLayer::new(shared.audit.clone()))
        .service(worker.clone())
}

/// What a job's operation goes through: the data plane below validation, but for the retry (the scheduler retries
/// with backoff itself). It arrives holding the quota slot the scheduler took for it, and its failures go back to
/// the scheduler as they are, to decide on.
pub fn job_plane(
    shared: &Shared,
    forward: &Forward,
) -> impl Service<Exchange, Response = Answer, Error = GatewayError, Future: Send + 'static> + Clone + Send + 'static + use<>
{
    ServiceBuilder::new()
        .layer(TokenLayer::new(&shared.metrics, shared.apps.iter()))
        .layer(QuotaLayer::new(Arc::clone(&shared.quota)))
        .layer(AuditLayer::new(shared.audit.clone()))
        .service(forward.clone())
}
