//! The SDK drop-in: unmodified Easemob server SDKs ask for a token first (`POST /{org}/{app}/token`); they get a
//! placeholder, never the real one, which the gateway alone holds.

use http::StatusCode;

use crate::apps::App;
use crate::error::json_response;
use crate::exchange::Answer;

/// What the SDK drop-in hands out instead of a token: worthless upstream, and dropped if a caller sends it back.
pub const PLACEHOLDER_TOKEN: &str = "EASEMOB-GATEWAY-PLACEHOLDER-NOT-A-TOKEN";
/// SDKs cache the drop-in token for part of this; a week keeps them from asking often.
const PLACEHOLDER_TTL_SECS: u64 = 7 * 24 * 3600;

/// The answer to `app`'s token request.
pub fn answer(app: &App) -> Answer {
    let application = app.token.application().unwrap_or_else(|| app.app.clone());
    let body = serde_json::json!({
        "access_token": PLACEHOLDER_TOKEN,
        "expires_in": PLACEHOLDER_TTL_SECS,
        "application": application,
    });
    json_response(StatusCode::OK, body.to_string().into_bytes(), "local")
}
