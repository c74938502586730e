//! Only the six routes pass: other paths, wrong methods and unknown apps are answered locally and never forwarded.

use http::Method;

use crate::support::*;

#[tokio::test]
async fn unknown_paths_are_404_in_the_envelope_and_never_forwarded() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    for (method, tail) in [
        (Method::GET, "/users/alice"),
        (Method::DELETE, "/users/alice"),
        (Method::POST, "/users"),
        (Method::GET, "/chatgroups"),
        (Method::POST, "/messages/users"),
        (Method::DELETE, "/users/alice/user_channel/extra"),
        (Method::DELETE, "/rest/message/roaming/chat/user/alice/"),
        (Method::GET, ""),
    ] {
        let a = send(method.clone(), &gw.url(tail), &[], "").await;
        a.assert_error(404, "service_resource_not_found");
        assert_eq!(a.header("x-easemob-gateway"), Some("rejected"), "{method} {tail}");
    }
    assert_eq!(send(Method::GET, &format!("{}/", gw.data), &[], "").await.status, 404);
    assert_eq!(send(Method::GET, &format!("{}/metrics", gw.data), &[], "").await.status, 404, "metrics only on admin");
    assert_eq!(sim.business_requests().await, 0);
}

#[tokio::test]
async fn known_paths_with_the_wrong_method_are_405_with_allow() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    for (method, tail, allow) in [
        (Method::GET, "/rest/message/roaming/chat/user/alice?userId=bob&msgIdList=1", "DELETE"),
        (Method::POST, "/rest/message/roaming/group/user/alice", "DELETE"),
        (Method::DELETE, "/rest/message/roaming/user/alice/delete/all", "POST"),
        (Method::POST, "/rest/message/roaming/chat/user/alice/time", "DELETE"),
        (Method::PUT, "/rest/message/roaming/group/user/alice/time", "DELETE"),
        (Method::POST, "/users/alice/user_channel", "DELETE"),
        (Method::GET, "/token", "POST"),
    ] {
        let a = send(method, &gw.url(tail), &[], "").await;
        a.assert_error(405, "method_not_allowed");
        assert_eq!(a.header("allow"), Some(allow), "{tail}");
    }
    assert_eq!(sim.business_requests().await, 0);
}

#[tokio::test]
async fn an_unconfigured_app_is_organization_application_not_found() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let a = send(
        Method::POST,
        &format!("{}/otherorg/otherapp/rest/message/roaming/user/alice/delete/all", gw.data),
        &[],
        "",
    )
    .await;
    a.assert_error(404, "organization_application_not_found");
    assert!(a.gateway_made());
    // demo2 exists at the simulator but is not configured here.
    let a =
        send(Method::POST, &format!("{}/{ORG}/{APP2}/rest/message/roaming/user/alice/delete/all", gw.data), &[], "")
            .await;
    a.assert_error(404, "organization_application_not_found");
    assert_eq!(sim.business_requests().await, 0);
}

#[tokio::test]
async fn sdk_token_requests_get_a_placeholder_never_the_real_token() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let body = format!(r#"{{"grant_type":"client_credentials","client_id":"{CLIENT_ID}","client_secret":"whatever"}}"#);
    let a = send(Method::POST, &gw.url("/token"), &[("content-type", "application/json")], &body).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-easemob-gateway"), Some("local"));
    let v = a.json();
    let placeholder = v["access_token"].as_str().unwrap().to_owned();
    assert!(v["expires_in"].as_u64().unwrap() > 0);
    let real = sim.requests().await;
    assert!(real.is_empty());
    assert_eq!(sim.token_requests().await, 1, "answered locally, not fetched");

    // The SDK then calls with the placeholder: it is replaced by the real token.
    let auth = format!("Bearer {placeholder}");
    let a = send(Method::POST, &gw.url("/rest/message/roaming/user/dave/delete/all"), &[("authorization", &auth)], "")
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let forwarded = serde_json::to_string(&sim.requests().await[0]["headers"]).unwrap();
    assert!(!forwarded.contains(&placeholder));
}
