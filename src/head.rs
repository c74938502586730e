//! The request head's size cap: a request line and headers over `MAX_HEAD_BYTES` are refused with 431, in
//! Easemob's envelope, however the bytes arrived.
//!
//! hyper bounds its read buffer (`max_buf_size`), not the head: a head that arrives in one large read is parsed
//! whole even past that bound, while the same head in small pieces is refused, with a bare 431. So the data plane
//! gives hyper's buffer twice the cap, as a bound on memory only, and this layer measures the parsed head itself.

use std::future::{Ready, ready};
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::Request;
use tower::{Layer, Service};

use crate::error::{Failure, GatewayError};
use crate::exchange::Answer;

/// The request line and headers of one request: far above what the six routes need, far below a memory risk.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// hyper's read buffer: a head still incomplete past this is cut off by hyper itself (a bare 431), so that a
/// connection's memory stays bounded; anything shorter reaches [`HeadLimit`], which answers in the envelope.
pub const READ_BUFFER_BYTES: usize = 2 * MAX_HEAD_BYTES;

/// The head's size as sent, from its parsed parts: the request line, each header line (`name: value` and its CRLF)
/// and the blank line. Optional whitespace around a header's value, which the parser drops, is not counted.
pub fn head_len<B>(request: &Request<B>) -> usize {
    let uri = request.uri();
    let target = uri.path_and_query().map_or(1, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len() + uri.scheme_str().map_or(0, |s| s.len() + 3));
    // `METHOD target HTTP/1.1\r\n`
    let line = request.method().as_str().len() + 1 + target + 1 + "HTTP/1.1".len() + 2;
    let headers: usize = request.headers().iter().map(|(name, value)| name.as_str().len() + 2 + value.len() + 2).sum();
    line + headers + 2
}

/// Outermost: measures the head as it arrived, before any layer adds to it (the request id layer may add its
/// header), and marks a head over the cap. Only the mark costs anything (an extension), and only on a refusal.
#[derive(Clone, Copy, Default)]
pub struct MeasureHeadLayer;

/// The mark of a head over the cap, refused by [`HeadLimit`] once the answer can be observed.
#[derive(Clone, Copy)]
struct OverCap;

impl<S> Layer<S> for MeasureHeadLayer {
    type Service = MeasureHead<S>;

    fn layer(&self, inner: S) -> MeasureHead<S> {
        MeasureHead { inner }
    }
}

#[derive(Clone)]
pub struct MeasureHead<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for MeasureHead<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if head_len(&request) > MAX_HEAD_BYTES {
            request.extensions_mut().insert(OverCap);
        }
        self.inner.call(request)
    }
}

/// Below the observe layer: refuses a head [`MeasureHead`] marked, so that the refusal carries a request id and is
/// logged and counted like any other.
#[derive(Clone, Copy, Default)]
pub struct HeadLimitLayer;

impl<S> Layer<S> for HeadLimitLayer {
    type Service = HeadLimit<S>;

    fn layer(&self, inner: S) -> HeadLimit<S> {
        HeadLimit { inner }
    }
}

#[derive(Clone)]
pub struct HeadLimit<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for HeadLimit<S>
where
    S: Service<Request<B>, Response = Answer, Error = Failure>,
{
    type Response = Answer;
    type Error = Failure;
    type Future = Either<Ready<Result<Answer, Failure>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if request.extensions().get::<OverCap>().is_some() {
            let refusal = GatewayError::HeadTooLarge { limit: MAX_HEAD_BYTES };
            return Either::Left(ready(Err(refusal.into())));
        }
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_is_measured_as_it_was_sent() {
        let request = Request::delete("/org/app/users/alice/user_channel").header("host", "x").body(()).unwrap();
        let sent = "DELETE /org/app/users/alice/user_channel HTTP/1.1\r\nhost: x\r\n\r\n";
        assert_eq!(head_len(&request), sent.len());
        let absolute = Request::get("http://example.com:8080/a?b=c").body(()).unwrap();
        assert_eq!(head_len(&absolute), "GET http://example.com:8080/a?b=c HTTP/1.1\r\n\r\n".len());
    }
}
