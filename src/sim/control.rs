//! The simulator's control API under `/_sim/`: stats, recorded requests, faults, limits, users' views, messages
//! and secret rotation.

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use serde::Deserialize;
use serde_json::{Value, json};

use super::limits::Limits;
use super::state::{App, Kind};
use super::{Faults, Simulator, World, find_app, now_ms, ok};

impl Simulator {
    pub(super) fn control(&self, method: &Method, path: &str, body: &[u8]) -> Response<Full<Bytes>> {
        self.control_endpoint(method, path, body).unwrap_or_else(|(status, text)| control_error(status, &text))
    }

    /// The control endpoints; `Err` is the control error to answer (no such app, a body that does not parse).
    fn control_endpoint(
        &self,
        method: &Method,
        path: &str,
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, ControlError> {
        let segments: Vec<&str> = path.split('/').collect();
        let mut world = self.world();
        let answer = match (method, segments.as_slice()) {
            (&Method::GET, ["stats"]) => ok(serde_json::to_value(&world.stats).expect("stats serialize")),
            (&Method::GET, ["requests"]) => ok(serde_json::to_value(&world.requests).expect("requests serialize")),
            (&Method::GET, ["received"]) => ok(serde_json::to_value(&world.received).expect("counts serialize")),
            (&Method::GET, ["faults"]) => ok(serde_json::to_value(&world.faults).expect("faults serialize")),
            (&Method::PUT, ["faults"]) => {
                world.faults = control_body::<Faults>(body)?;
                ok(serde_json::to_value(&world.faults).expect("faults serialize"))
            }
            (&Method::GET, ["limits"]) => ok(serde_json::to_value(&world.limits).expect("limits serialize")),
            (&Method::PUT, ["limits"]) => {
                let limits = control_body::<Limits>(body)?;
                limits.check().map_err(|text| (StatusCode::BAD_REQUEST, text))?;
                // The calls already admitted stay counted, as they would at Easemob when a pack is bought.
                world.limits = limits;
                ok(serde_json::to_value(&world.limits).expect("limits serialize"))
            }
            (&Method::POST, ["expire-tokens"]) => {
                world.apps.iter_mut().for_each(App::expire_tokens);
                ok(json!({ "expired": true }))
            }
            (&Method::GET, ["apps", org, app, "users", user]) => {
                let app = control_app(&mut world, org, app)?;
                let conversations: Vec<Value> = app
                    .view(user)
                    .into_iter()
                    .map(
                        |((kind, id), c)| json!({ "type": kind, "id": id, "listed": c.listed, "messages": c.messages }),
                    )
                    .collect();
                ok(json!({ "user": user, "conversations": conversations }))
            }
            (&Method::PUT, ["apps", org, app, "secret"]) => {
                #[derive(Deserialize)]
                struct Secret {
                    client_secret: String,
                }
                let app = control_app(&mut world, org, app)?;
                app.client_secret = control_body::<Secret>(body)?.client_secret;
                ok(json!({ "rotated": true }))
            }
            (&Method::POST, ["apps", org, app, "users"]) => {
                #[derive(Deserialize)]
                struct Users {
                    users: Vec<String>,
                }
                let app = control_app(&mut world, org, app)?;
                let users = control_body::<Users>(body)?.users;
                users.iter().for_each(|user| app.add_user(user));
                ok(json!({ "added": users.len() }))
            }
            (&Method::POST, ["apps", org, app, "messages"]) => {
                #[derive(Deserialize)]
                struct Send {
                    #[serde(rename = "type")]
                    kind: Kind,
                    from: String,
                    to: String,
                    id: String,
                    timestamp: Option<i64>,
                }
                let app = control_app(&mut world, org, app)?;
                let m = control_body::<Send>(body)?;
                app.add_user(&m.from);
                if m.kind == Kind::Chat {
                    app.add_user(&m.to);
                }
                app.send(m.kind, &m.from, &m.to, &m.id, m.timestamp.unwrap_or_else(now_ms));
                ok(json!({ "sent": m.id }))
            }
            _ => control_error(StatusCode::NOT_FOUND, "unknown control endpoint"),
        };
        Ok(answer)
    }
}

/// A control request's failure: its status and what to say.
type ControlError = (StatusCode, String);

/// The app a control path names, or the control error for an unknown one.
fn control_app<'w>(world: &'w mut World, org: &str, app: &str) -> Result<&'w mut App, ControlError> {
    find_app(&mut world.apps, org, app).ok_or_else(|| (StatusCode::NOT_FOUND, "no such app".to_owned()))
}

/// A control request's JSON body, or the control error saying why it does not parse.
fn control_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ControlError> {
    serde_json::from_slice(body).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "chat" => Ok(Kind::Chat),
            "groupchat" => Ok(Kind::Groupchat),
            other => Err(serde::de::Error::custom(format!("unknown type {other:?}"))),
        }
    }
}

fn control_error(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = ok(json!({ "error": text }));
    *response.status_mut() = status;
    response
}
