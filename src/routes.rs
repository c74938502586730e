//! The route table and the one resolver of every path the data plane serves: the six Easemob operations (their
//! methods and path shapes), the SDK token endpoint and the jobs API. `routes/validate.rs` turns a matched request
//! into a typed [`Call`](validate::Call); `layers/validate.rs` is the stack's layer that does it for every request.

pub mod validate;

use std::ops::Range;

use http::{Method, Request};

/// One of the six operations, named as in config keys, metric labels and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    DeleteChatMessages,
    DeleteGroupMessages,
    ClearUserMessages,
    ClearChatMessagesBefore,
    ClearGroupMessagesBefore,
    DeleteConversation,
}

impl Route {
    pub const ALL: [Route; 6] = [
        Route::DeleteChatMessages,
        Route::DeleteGroupMessages,
        Route::ClearUserMessages,
        Route::ClearChatMessagesBefore,
        Route::ClearGroupMessagesBefore,
        Route::DeleteConversation,
    ];

    /// Position in [`Route::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The route a name (as in config keys and stored jobs) stands for.
    pub fn named(name: &str) -> Option<Route> {
        Route::ALL.into_iter().find(|route| route.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Route::DeleteChatMessages => "delete_chat_messages",
            Route::DeleteGroupMessages => "delete_group_messages",
            Route::ClearUserMessages => "clear_user_messages",
            Route::ClearChatMessagesBefore => "clear_chat_messages_before",
            Route::ClearGroupMessagesBefore => "clear_group_messages_before",
            Route::DeleteConversation => "delete_conversation",
        }
    }

    /// The path as Easemob documents it, placeholders and all (`http.route` in the gateway's spans): never an ID.
    pub fn template(self) -> &'static str {
        match self {
            Route::DeleteChatMessages => "/{org_name}/{app_name}/rest/message/roaming/chat/user/{userId}",
            Route::DeleteGroupMessages => "/{org_name}/{app_name}/rest/message/roaming/group/user/{userId}",
            Route::ClearUserMessages => "/{org_name}/{app_name}/rest/message/roaming/user/{userId}/delete/all",
            Route::ClearChatMessagesBefore => "/{org_name}/{app_name}/rest/message/roaming/chat/user/{userId}/time",
            Route::ClearGroupMessagesBefore => "/{org_name}/{app_name}/rest/message/roaming/group/user/{userId}/time",
            Route::DeleteConversation => "/{org_name}/{app_name}/users/{username}/user_channel",
        }
    }

    pub fn method(self) -> Method {
        match self {
            Route::ClearUserMessages => Method::POST,
            _ => Method::DELETE,
        }
    }

    /// Matches the path after `/{org}/{app}` (already split on `/`), returning the route and the raw owner segment.
    fn match_tail<'a>(segments: &[&'a str]) -> Option<(Route, &'a str)> {
        let route = match segments {
            ["rest", "message", "roaming", "chat", "user", owner] => (Route::DeleteChatMessages, *owner),
            ["rest", "message", "roaming", "group", "user", owner] => (Route::DeleteGroupMessages, *owner),
            ["rest", "message", "roaming", "user", owner, "delete", "all"] => (Route::ClearUserMessages, *owner),
            ["rest", "message", "roaming", "chat", "user", owner, "time"] => (Route::ClearChatMessagesBefore, *owner),
            ["rest", "message", "roaming", "group", "user", owner, "time"] => (Route::ClearGroupMessagesBefore, *owner),
            ["users", owner, "user_channel"] => (Route::DeleteConversation, *owner),
            _ => return None,
        };
        Some(route)
    }
}

/// What a request path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint<'a> {
    /// One of the six operations; `owner` is the raw (still percent-encoded) path segment.
    Operation { route: Route, owner: &'a str },
    /// `POST /{org}/{app}/token`, answered locally so that unmodified server SDKs work.
    Token,
    /// A path under `…/_gateway/`: the jobs API's (no Easemob path starts with `_`, so none can collide).
    Jobs(JobsPath<'a>),
}

/// A path of the jobs API, after `…/_gateway/jobs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobsPath<'a> {
    /// `…/jobs`: create or list.
    Collection,
    /// `…/jobs/{id}`: read one.
    Job(&'a str),
    /// `…/jobs/{id}/cancel`.
    Cancel(&'a str),
    /// `…/jobs/{id}/receipt`.
    Receipt(&'a str),
    /// Under `…/jobs/`, but no route of the jobs API.
    Unknown,
    /// Under `…/_gateway/`, but not the jobs API.
    Elsewhere,
}

/// A path resolved against the route table: `app` is the `/{org}/{app}` prefix when the caller gave one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved<'a> {
    pub app: Option<(&'a str, &'a str)>,
    pub endpoint: Endpoint<'a>,
}

/// Resolves a request path, with or without the `/{org}/{app}` prefix. `None` means no such route.
pub fn resolve(path: &str) -> Option<Resolved<'_>> {
    let rest = path.strip_prefix('/')?;
    // Past the longest operation's length only a jobs API path can resolve.
    let Some((split, count)) = segments(rest) else { return jobs(rest) };
    let segments = &split[..count];
    // The jobs API's first, so that no path under `_gateway/` is taken for an operation: looked for only behind
    // the one segment that starts it, which no Easemob path has.
    if (segments[0] == "_gateway" || segments.get(2) == Some(&"_gateway"))
        && let Some(jobs) = jobs(rest)
    {
        return Some(jobs);
    }
    if let [org, app, tail @ ..] = segments
        && let Some(endpoint) = endpoint(tail)
    {
        return Some(Resolved { app: Some((org, app)), endpoint });
    }
    endpoint(segments).map(|endpoint| Resolved { app: None, endpoint })
}

/// A request for one of the six operations, as the router hands it to validation: the path is resolved once.
pub struct Routed<B> {
    pub request: Request<B>,
    pub located: Located,
}

/// Where the resolver found an operation in a path: its route, and its owner and app segments as byte ranges of
/// the path, so that they travel with the request they were read from without being copied.
#[derive(Clone, Debug)]
pub struct Located {
    pub route: Route,
    owner: Range<usize>,
    app: Option<(Range<usize>, Range<usize>)>,
}

impl Located {
    /// The operation `route` on `owner`, for the app named `app`, all found in `path`.
    pub fn new(path: &str, route: Route, owner: &str, app: Option<(&str, &str)>) -> Located {
        let at = |part: &str| {
            let start = part.as_ptr() as usize - path.as_ptr() as usize;
            start..start + part.len()
        };
        Located { route, owner: at(owner), app: app.map(|(org, app)| (at(org), at(app))) }
    }

    /// The raw (still percent-encoded) owner segment of `path`, the path this was found in.
    pub fn owner<'a>(&self, path: &'a str) -> &'a str {
        &path[self.owner.clone()]
    }

    /// The `/{org}/{app}` prefix of `path`, the path this was found in, when the caller gave one.
    pub fn app<'a>(&self, path: &'a str) -> Option<(&'a str, &'a str)> {
        self.app.as_ref().map(|(org, app)| (&path[org.clone()], &path[app.clone()]))
    }
}

const MAX_SEGMENTS: usize = 9;

/// `rest` split at each '/', as `str::split` would: `None` past [`MAX_SEGMENTS`] (the longest route is
/// `/{org}/{app}` plus seven segments; a longer path matches nothing). A '/' byte is always a character boundary,
/// and for a handful of short segments this loop costs less than `str::split`'s searcher.
fn segments(rest: &str) -> Option<([&str; MAX_SEGMENTS], usize)> {
    let mut split = [""; MAX_SEGMENTS];
    let mut count = 0;
    let mut start = 0;
    for end in rest.bytes().enumerate().filter_map(|(i, b)| (b == b'/').then_some(i)).chain([rest.len()]) {
        *split.get_mut(count)? = &rest[start..end];
        count += 1;
        start = end + 1;
    }
    Some((split, count))
}

/// A path under `_gateway/` or `{org}/{app}/_gateway/` (`rest` is the path after its first '/').
fn jobs(rest: &str) -> Option<Resolved<'_>> {
    let (app, under) = match rest.strip_prefix("_gateway/") {
        Some(under) => (None, under),
        None => {
            let mut parts = rest.splitn(3, '/');
            let (org, app, tail) = (parts.next()?, parts.next()?, parts.next()?);
            (Some((org, app)), tail.strip_prefix("_gateway/")?)
        }
    };
    let path = match under.strip_prefix("jobs") {
        Some("") => JobsPath::Collection,
        Some(after) => match after.strip_prefix('/').map(|ids| ids.split('/').collect::<Vec<_>>()).as_deref() {
            Some([id]) => JobsPath::Job(id),
            Some([id, "cancel"]) => JobsPath::Cancel(id),
            Some([id, "receipt"]) => JobsPath::Receipt(id),
            Some(_) => JobsPath::Unknown,
            None => JobsPath::Elsewhere,
        },
        None => JobsPath::Elsewhere,
    };
    let app = if path == JobsPath::Elsewhere { None } else { app };
    Some(Resolved { app, endpoint: Endpoint::Jobs(path) })
}

fn endpoint<'a>(segments: &[&'a str]) -> Option<Endpoint<'a>> {
    if segments == ["token"] {
        return Some(Endpoint::Token);
    }
    Route::match_tail(segments).map(|(route, owner)| Endpoint::Operation { route, owner })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Matched<'a> = (Option<(&'a str, &'a str)>, Route, &'a str);

    fn op(path: &str) -> Option<Matched<'_>> {
        match resolve(path)? {
            Resolved { app, endpoint: Endpoint::Operation { route, owner } } => {
                let located = Located::new(path, route, owner, app);
                assert_eq!((located.owner(path), located.app(path)), (owner, app), "located where it was found");
                Some((app, route, owner))
            }
            Resolved { endpoint: Endpoint::Token | Endpoint::Jobs(_), .. } => None,
        }
    }

    proptest::proptest! {
        #[test]
        fn segments_are_what_str_split_gives(rest in "[a-z/é]{0,24}") {
            let expected: Vec<&str> = rest.split('/').collect();
            match segments(&rest) {
                Some((split, count)) => proptest::prop_assert_eq!(&split[..count], &expected[..]),
                None => proptest::prop_assert!(expected.len() > MAX_SEGMENTS),
            }
        }
    }

    #[test]
    fn every_route_resolves_with_and_without_prefix() {
        let cases = [
            ("/rest/message/roaming/chat/user/u1", Route::DeleteChatMessages),
            ("/rest/message/roaming/group/user/u1", Route::DeleteGroupMessages),
            ("/rest/message/roaming/user/u1/delete/all", Route::ClearUserMessages),
            ("/rest/message/roaming/chat/user/u1/time", Route::ClearChatMessagesBefore),
            ("/rest/message/roaming/group/user/u1/time", Route::ClearGroupMessagesBefore),
            ("/users/u1/user_channel", Route::DeleteConversation),
        ];
        for (tail, route) in cases {
            assert_eq!(op(tail), Some((None, route, "u1")), "{tail}");
            let full = format!("/org/app{tail}");
            assert_eq!(op(&full), Some((Some(("org", "app")), route, "u1")), "{full}");
            let template = route.template().replace("{org_name}/{app_name}", "org/app");
            let template = template.replace("{userId}", "u1").replace("{username}", "u1");
            assert_eq!(template, full, "the template is the route's own path");
        }
        assert_eq!(Route::ALL.len(), 6);
        assert!(Route::ALL.iter().enumerate().all(|(i, route)| route.index() == i));
    }

    #[test]
    fn other_paths_do_not_resolve() {
        for path in [
            "",
            "/",
            "/org/app",
            "/org/app/users/u1",
            "/org/app/users/u1/user_channel/",
            "/org/app/rest/message/roaming/chat/user/u1/extra",
            "/org/app/messages/users/u1",
            "org/app/users/u1/user_channel",
            "/org/app/chatgroups",
        ] {
            assert!(resolve(path).is_none(), "{path}");
        }
    }

    #[test]
    fn empty_and_encoded_owner_segments_resolve_for_validation_to_reject() {
        assert_eq!(op("/o/a/users//user_channel"), Some((Some(("o", "a")), Route::DeleteConversation, "")));
        assert_eq!(op("/o/a/users/..%2Fx/user_channel").map(|r| r.2), Some("..%2Fx"));
    }

    #[test]
    fn jobs_api_paths_resolve_before_any_other() {
        let jobs = |path| match resolve(path) {
            Some(Resolved { app, endpoint: Endpoint::Jobs(path) }) => Some((app, path)),
            _ => None,
        };
        let app = Some(("o", "a"));
        assert_eq!(jobs("/_gateway/jobs"), Some((None, JobsPath::Collection)));
        assert_eq!(jobs("/o/a/_gateway/jobs/x"), Some((app, JobsPath::Job("x"))));
        assert_eq!(jobs("/o/a/_gateway/jobs/x/cancel"), Some((app, JobsPath::Cancel("x"))));
        assert_eq!(jobs("/o/a/_gateway/jobs/x/receipt"), Some((app, JobsPath::Receipt("x"))));
        assert_eq!(jobs("/o/a/_gateway/jobs/x/y"), Some((app, JobsPath::Unknown)));
        assert_eq!(jobs("/o/a/_gateway/jobs/1/2/3/4/5/6/7/8"), Some((app, JobsPath::Unknown)), "however long");
        assert_eq!(jobs("/o/a/_gateway/jobsx"), Some((None, JobsPath::Elsewhere)));
        assert_eq!(jobs("/_gateway/x"), Some((None, JobsPath::Elsewhere)));
        let easemob_shaped = "/_gateway/jobs/users/u/user_channel";
        assert_eq!(jobs(easemob_shaped), Some((None, JobsPath::Unknown)), "no Easemob path starts with _");
        for path in ["/o/a/rest/message/roaming/user/u/delete/all", "/o/_gateway/jobs", "/", "/o/a/_gatewayx"] {
            assert_eq!(jobs(path), None, "{path}");
        }
    }

    #[test]
    fn token_endpoint_resolves() {
        assert_eq!(resolve("/o/a/token"), Some(Resolved { app: Some(("o", "a")), endpoint: Endpoint::Token }));
        assert_eq!(resolve("/token"), Some(Resolved { app: None, endpoint: Endpoint::Token }));
    }
}
