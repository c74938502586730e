//! `Prefer: respond-async` (RFC 7240): a validated call the caller does not want to wait for is stored as a job of
//! one and answered `202 Accepted` with the job's `Location`. Below validation, so an invalid call gets its usual
//! 400 and nothing is stored; above the audit, the token and the quota, which the job's run goes through instead.
//! Without the preference, or without a jobs store, calls pass through unchanged.

use std::net::IpAddr;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{HeaderValue, StatusCode};
use tower::{Layer, Service};
use tracing::warn;

use super::Jobs;
use super::api::located;
use super::records::Created;
use crate::error::GatewayError;
use crate::exchange::{Answer, Exchange, Waiting};

const PREFERENCE_APPLIED: http::HeaderName = http::HeaderName::from_static("preference-applied");

#[derive(Clone)]
pub struct DeferLayer {
    jobs: Option<Jobs>,
    /// The connection's client, for the receipts of the jobs it makes.
    peer: Option<IpAddr>,
}

impl DeferLayer {
    pub fn new(jobs: Option<Jobs>, peer: Option<IpAddr>) -> DeferLayer {
        DeferLayer { jobs, peer }
    }
}

impl<S> Layer<S> for DeferLayer {
    type Service = Defer<S>;

    fn layer(&self, inner: S) -> Defer<S> {
        Defer { inner, jobs: self.jobs.clone(), peer: self.peer }
    }
}

#[derive(Clone)]
pub struct Defer<S> {
    inner: S,
    jobs: Option<Jobs>,
    peer: Option<IpAddr>,
}

impl<S> Service<Exchange> for Defer<S>
where
    S: Service<Exchange, Response = Answer, Error = GatewayError>,
{
    type Response = Answer;
    type Error = GatewayError;
    type Future = Either<S::Future, Waiting<GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, exchange: Exchange) -> Self::Future {
        match &self.jobs {
            Some(jobs) if exchange.respond_async => Either::Right(Box::pin(accept(jobs.clone(), exchange, self.peer))),
            _ => Either::Left(self.inner.call(exchange)),
        }
    }
}

/// Stores the call as a job of one, durably, before answering.
async fn accept(jobs: Jobs, exchange: Exchange, peer: Option<IpAddr>) -> Result<Answer, GatewayError> {
    let app = &exchange.app;
    let operation = super::operation(app, &exchange.call);
    let created = jobs.submit_one(app, exchange.caller.as_deref(), peer, operation).await;
    let job = match created {
        Ok(Created::New(job) | Created::Existing { job, .. }) => job,
        Err(e) => {
            warn!(app = %app.key, error = %e, "a call sent with Prefer: respond-async could not be stored");
            return Err(GatewayError::JobsUnavailable);
        }
    };
    // The job is stored: it is accepted even if its estimate cannot be read just now.
    let view = jobs.describe(app, &job).await.unwrap_or_else(|_| super::view(app, &job));
    let mut answer = located(StatusCode::ACCEPTED, app, &job.id, &view);
    answer.headers_mut().insert(PREFERENCE_APPLIED, HeaderValue::from_static("respond-async"));
    Ok(answer)
}
