//! Who may call the data plane: source networks (`server.allow_from`) and, optionally, per-caller keys
//! (`[[callers]]`, stored as SHA-256 digests) whose name goes into the audit trail.

use std::future::{Ready, ready};
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{HeaderName, Request};
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tower::{Layer, Service};
use tracing::debug;

use crate::config::Config;
use crate::error::{Failure, GatewayError};
use crate::exchange::Answer;

const X_GATEWAY_KEY: HeaderName = HeaderName::from_static("x-gateway-key");
const X_CALLER: HeaderName = HeaderName::from_static("x-caller");

#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// The source address is outside `server.allow_from`.
    Network,
    /// Keys are configured and the request presented none, or an unknown one.
    Key,
}

pub struct Access {
    allow_from: Vec<IpNet>,
    callers: Vec<(Arc<str>, [u8; 32])>,
}

impl Access {
    pub fn new(config: &Config) -> Access {
        let callers = config
            .callers
            .iter()
            .filter_map(|c| {
                let digest: [u8; 32] = hex::decode(&c.key_sha256).ok()?.try_into().ok()?;
                Some((c.name.as_str().into(), digest))
            })
            .collect();
        Access { allow_from: config.server.allow_from.clone(), callers }
    }

    /// Admits or denies a request; when keys are configured, returns the caller's configured name.
    pub fn check(&self, peer: IpAddr, key: Option<&[u8]>) -> Result<Option<&Arc<str>>, Denied> {
        if !self.allow_from.is_empty() {
            // IPv4 callers on a dual-stack socket arrive as ::ffff:a.b.c.d.
            let peer = peer.to_canonical();
            if !self.allow_from.iter().any(|net| net.contains(&peer)) {
                return Err(Denied::Network);
            }
        }
        if self.callers.is_empty() {
            return Ok(None);
        }
        let digest: [u8; 32] = Sha256::digest(key.ok_or(Denied::Key)?).into();
        // Constant time, and every entry compared: timing says nothing about which digest came close.
        let mut found = None;
        for (name, expected) in &self.callers {
            if bool::from(expected.ct_eq(&digest)) {
                found = Some(name);
            }
        }
        found.map(Some).ok_or(Denied::Key)
    }
}

/// The calling service, on an admitted request that names one: a caller key's name (authoritative), or without
/// keys the caller's own `X-Caller`; recorded in the audit trail.
#[derive(Clone, Debug, Default)]
pub struct Caller(pub Option<Arc<str>>);

/// Refuses callers from outside `server.allow_from` or without a known key, before anything costs work.
#[derive(Clone)]
pub struct AccessLayer {
    access: Arc<Access>,
    peer: IpAddr,
}

impl AccessLayer {
    /// For one connection, from `peer`.
    pub fn new(access: Arc<Access>, peer: IpAddr) -> AccessLayer {
        AccessLayer { access, peer }
    }
}

impl<S> Layer<S> for AccessLayer {
    type Service = AccessControl<S>;

    fn layer(&self, inner: S) -> AccessControl<S> {
        AccessControl { inner, access: Arc::clone(&self.access), peer: self.peer }
    }
}

#[derive(Clone)]
pub struct AccessControl<S> {
    inner: S,
    access: Arc<Access>,
    peer: IpAddr,
}

impl<S, B> Service<Request<B>> for AccessControl<S>
where
    S: Service<Request<B>, Response = Answer, Error = Failure>,
{
    type Response = Answer;
    type Error = Failure;
    type Future = Either<Ready<Result<Answer, Failure>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let caller = match self.access.check(self.peer, one_key(request.headers())) {
            Ok(Some(name)) => Some(Arc::clone(name)),
            Ok(None) => request.headers().get(X_CALLER).and_then(|v| v.to_str().ok()).map(Arc::from),
            Err(denied) => {
                debug!(peer = ?self.peer, ?denied, "caller refused");
                let refusal = match denied {
                    Denied::Network => GatewayError::Forbidden,
                    Denied::Key => GatewayError::Unauthenticated,
                };
                return Either::Left(ready(Err(refusal.into())));
            }
        };
        // Most callers name nobody: no extension (and no allocation) for them.
        if caller.is_some() {
            request.extensions_mut().insert(Caller(caller));
        }
        Either::Right(self.inner.call(request))
    }
}

/// The `X-Gateway-Key` presented, if exactly one was: with two, which one counts would be a guess, so a request
/// carrying several presents none.
fn one_key(headers: &http::HeaderMap) -> Option<&[u8]> {
    let mut keys = headers.get_all(X_GATEWAY_KEY).iter();
    match (keys.next(), keys.next()) {
        (Some(key), None) => Some(key.as_bytes()),
        _ => None,
    }
}

/// The hex SHA-256 of a key, as `[[callers]] key_sha256` wants it.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.trim().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rescue::RescueLayer;

    fn access(allow: &[&str], keys: &[(&str, &str)]) -> Access {
        Access {
            allow_from: allow.iter().map(|n| n.parse().unwrap()).collect(),
            callers: keys
                .iter()
                .map(|(name, key)| (Arc::from(*name), hex::decode(hash_key(key)).unwrap().try_into().unwrap()))
                .collect(),
        }
    }

    #[test]
    fn networks_are_checked_when_configured() {
        let a = access(&["10.0.0.0/8"], &[]);
        assert_eq!(a.check("10.1.2.3".parse().unwrap(), None), Ok(None));
        assert_eq!(a.check("::ffff:10.1.2.3".parse().unwrap(), None), Ok(None));
        assert_eq!(a.check("127.0.0.1".parse().unwrap(), None), Err(Denied::Network));
        assert_eq!(a.check("::1".parse().unwrap(), None), Err(Denied::Network));
        assert_eq!(access(&[], &[]).check("192.0.2.1".parse().unwrap(), None), Ok(None));
    }

    #[test]
    fn keys_identify_callers() {
        let a = access(&[], &[("billing", "k-billing"), ("orders", "k-orders")]);
        let local = "127.0.0.1".parse().unwrap();
        assert_eq!(a.check(local, Some(b"k-orders")), Ok(Some(&Arc::from("orders"))));
        assert_eq!(a.check(local, Some(b"k-other")), Err(Denied::Key));
        assert_eq!(a.check(local, None), Err(Denied::Key));
    }

    /// The access layer around a service that answers with the caller it was handed, in a header.
    async fn through(access: Access, peer: &str, headers: &[(&str, &str)]) -> Answer {
        let inner = tower::service_fn(|request: Request<()>| async move {
            let Caller(caller) = request.extensions().get::<Caller>().cloned().unwrap_or_default();
            let mut answer = Answer::default();
            if let Some(caller) = caller {
                answer.headers_mut().insert("caller", caller.parse().unwrap());
            }
            Ok::<_, Failure>(answer)
        });
        let mut request = Request::new(());
        for (name, value) in headers {
            request.headers_mut().insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        let layer = AccessLayer::new(Arc::new(access), peer.parse().unwrap());
        tower::ServiceExt::oneshot(RescueLayer.layer(layer.layer(inner)), request).await.unwrap()
    }

    #[tokio::test]
    async fn the_layer_refuses_before_the_inner_service_and_names_the_caller_after() {
        use crate::exchange::ErrorKind;
        use crate::exchange::Marks;
        let forbidden = through(access(&["10.0.0.0/8"], &[]), "192.0.2.1", &[]).await;
        assert_eq!((forbidden.status().as_u16(), forbidden.rejection()), (403, Some(ErrorKind::Forbidden)));
        let keys = || access(&[], &[("billing", "k-billing")]);
        let unknown = through(keys(), "127.0.0.1", &[("x-gateway-key", "nope")]).await;
        assert_eq!((unknown.status().as_u16(), unknown.rejection()), (401, Some(ErrorKind::Unauthenticated)));
        let known = through(keys(), "127.0.0.1", &[("x-gateway-key", "k-billing"), ("x-caller", "spoof")]).await;
        assert_eq!(known.headers()["caller"], "billing", "a key's name is authoritative");
        for presented in [["k-billing", "nope"], ["nope", "k-billing"], ["k-billing", "k-billing"]] {
            let mut request = Request::new(());
            for key in presented {
                request.headers_mut().append(X_GATEWAY_KEY, key.parse().unwrap());
            }
            let layer = AccessLayer::new(Arc::new(keys()), "127.0.0.1".parse().unwrap());
            let answer = tower::ServiceExt::oneshot(
                RescueLayer.layer(
                    layer.layer(tower::service_fn(|_: Request<()>| async { Ok::<_, Failure>(Answer::default()) })),
                ),
                request,
            )
            .await
            .unwrap();
            assert_eq!(answer.status(), 401, "two keys are ambiguous, whichever order: {presented:?}");
        }
        let open = through(access(&[], &[]), "127.0.0.1", &[("x-caller", "orders")]).await;
        assert_eq!(open.headers()["caller"], "orders", "without keys, the caller's own X-Caller");
    }
}
