//! The request-to-upstream-call function under libFuzzer: whatever the path, query and body, it never panics,
//! and whatever it accepts re-parses, as forwarded, to the same call.
//!
//! Input layout: byte 0 picks the route; the rest is split on 0xFF into the raw path, the raw query and the body.

#![no_main]

use easemob_gateway::routes::validate::Call;
use easemob_gateway::routes::{self, Endpoint, Route};
use libfuzzer_sys::fuzz_target;

const NOW_MS: i64 = 1_760_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let mut parts = rest.splitn(3, |b| *b == 0xFF);
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let query = parts.next().map(String::from_utf8_lossy);
    let body = parts.next().unwrap_or_default();

    // The route table on an arbitrary path.
    let _ = routes::resolve(&path);

    // Validation of an arbitrary owner segment, query and body for a chosen route.
    let route = Route::ALL[pick as usize % Route::ALL.len()];
    let owner = path.rsplit('/').next().unwrap_or_default();
    let Ok(call) = Call::parse(route, owner, query.as_deref(), body, NOW_MS) else { return };
    let forwarded = call.upstream_path_and_query();
    let (forwarded_path, forwarded_query) = match forwarded.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (forwarded.as_str(), None),
    };
    let resolved = routes::resolve(forwarded_path).expect("the forwarded path is a route");
    let Endpoint::Operation { route: again_route, owner: again_owner } = resolved.endpoint else {
        panic!("the forwarded path is not an operation")
    };
    assert_eq!(again_route, route);
    let body = call.upstream_body().unwrap_or_default();
    let again = Call::parse(route, again_owner, forwarded_query, &body, NOW_MS).expect("the forwarded call is valid");
    assert_eq!(again, call, "what is forwarded re-parses to the same call");
});
