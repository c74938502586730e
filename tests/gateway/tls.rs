//! HTTPS towards Easemob: the certificate is verified, and `upstream.ca_file` adds a private root.

use std::time::Duration;

use http::Method;

use crate::support::*;

#[tokio::test]
async fn https_upstream_is_verified_against_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let sim = Sim::start_with(&["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]).await;
    assert!(sim.url.starts_with("https://127.0.0.1:"));

    // With the private root: tokens are fetched and calls go through over TLS.
    let options = GatewayOptions { extra: format!("ca_file = \"{}\"\n", cert.display()), ..Default::default() };
    let trusting = Gateway::start(&sim, options).await;
    trusting.wait_ready().await;
    let a = send(Method::POST, &trusting.url("/rest/message/roaming/user/dave/delete/all"), &[], "").await;
    assert_eq!(a.status, 200, "{}", a.text());

    // Without it, the self-signed certificate is refused: no token, and a definite 503.
    let refusing = Gateway::start(&sim, GatewayOptions::default()).await;
    eventually(Duration::from_secs(20), "a failed fetch", || async {
        refusing.readyz().await.text().contains("failing")
    })
    .await;
    let a = send(Method::POST, &refusing.url("/rest/message/roaming/user/dave/delete/all"), &[], "").await;
    a.assert_error(503, "service_unavailable");
    assert!(refusing.log().contains("certificate"), "the log says why: {}", refusing.log());
}
