//! The authorization matrix of `api_guards::authorization_matrix_every_route_every_role`, as
//! data: every route with the exact status for anonymous, owner, another user and staff.
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Anonymous,
    Owner,
    Other,
    Staff,
}

/// The order the roles are tried in: the owner last, so its DELETE or logout changes nothing
/// the others see.
pub const ROLES: [Role; 4] = [Role::Anonymous, Role::Other, Role::Staff, Role::Owner];

/// One row: method, path (`{chat}`, `{ai}`, `{msg}` filled from fresh fixtures), body, and
/// the exact status for anonymous, owner, other user, staff.
pub struct Row {
    pub method: &'static str,
    pub path: &'static str,
    pub body: Option<fn() -> Value>,
    pub expect: [u16; 4],
}

impl Row {
    /// The status `role` must get.
    pub fn expected(&self, role: Role) -> u16 {
        let column = match role {
            Role::Anonymous => 0,
            Role::Owner => 1,
            Role::Other => 2,
            Role::Staff => 3,
        };
        self.expect[column]
    }
}

const fn row(method: &'static str, path: &'static str, expect: [u16; 4]) -> Row {
    Row {
        method,
        path,
        body: None,
        expect,
    }
}

const fn row_with(
    method: &'static str,
    path: &'static str,
    body: fn() -> Value,
    expect: [u16; 4],
) -> Row {
    Row {
        method,
        path,
        body: Some(body),
        expect,
    }
}

//                                        anonymous owner other staff
pub const MATRIX: &[Row] = &[
    row("POST", "/api/logout/", [401, 200, 200, 200]),
    row("GET", "/api/me/", [401, 200, 200, 200]),
    row("GET", "/api/users/", [401, 200, 200, 200]),
    row("GET", "/api/chats/", [401, 200, 200, 200]),
    row_with(
        "POST",
        "/api/chats/",
        || json!({"name": "n"}),
        [401, 201, 201, 201],
    ),
    row("GET", "/api/chats/{chat}/", [401, 200, 404, 404]),
    row("DELETE", "/api/chats/{chat}/", [401, 204, 404, 404]),
    row_with(
        "POST",
        "/api/chats/{chat}/send_message/",
        || json!({"content": "hi"}),
        [401, 201, 404, 404],
    ),
    row("GET", "/api/chats/{chat}/messages/", [401, 200, 404, 404]),
    row("GET", "/api/ai/chats/", [401, 200, 200, 200]),
    row_with(
        "POST",
        "/api/ai/chats/",
        || json!({"title": "t"}),
        [401, 201, 201, 201],
    ),
    row("GET", "/api/ai/chats/{ai}/", [401, 200, 404, 404]),
    row_with(
        "PATCH",
        "/api/ai/chats/{ai}/",
        || json!({"title": "t2"}),
        [401, 200, 404, 404],
    ),
    row_with(
        "PUT",
        "/api/ai/chats/{ai}/",
        || json!({"title": "t3"}),
        [401, 200, 404, 404],
    ),
    row("DELETE", "/api/ai/chats/{ai}/", [401, 204, 404, 404]),
    row_with(
        "POST",
        "/api/ai/chats/{ai}/send_message/",
        || json!({"content": "hi"}),
        [401, 202, 404, 404],
    ),
    row("GET", "/api/ai/chats/{ai}/messages/", [401, 200, 404, 404]),
    row(
        "GET",
        "/api/ai/chats/{ai}/related_chat_context/",
        [401, 200, 404, 404],
    ),
    row("GET", "/api/ai/messages/", [401, 200, 200, 200]),
    row("GET", "/api/ai/messages/{msg}/", [401, 200, 404, 404]),
    row("GET", "/api/ai/usage/", [401, 200, 200, 200]),
    row("GET", "/api/ai/models/", [401, 200, 200, 200]),
    row("GET", "/api/ai/quota/", [401, 200, 200, 200]),
    row("GET", "/api/admin/users/", [401, 403, 403, 200]),
    row("GET", "/api/admin/users/{user}/", [401, 403, 403, 200]),
    row_with(
        "PUT",
        "/api/admin/users/{user}/budget/",
        || json!({"daily_tokens": null}),
        [401, 403, 403, 200],
    ),
    row("GET", "/api/admin/ai-chats/", [401, 403, 403, 200]),
    row("GET", "/api/admin/messages/", [401, 403, 403, 200]),
    row("GET", "/api/admin/usage/", [401, 403, 403, 200]),
    row("GET", "/api/admin/dead-jobs/", [401, 403, 403, 200]),
    row_with(
        "POST",
        "/api/admin/dead-jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV/redrive/",
        || json!({}),
        [401, 403, 403, 404],
    ),
    // Public: the same for everyone.
    row("GET", "/healthz", [200, 200, 200, 200]),
    row("GET", "/readyz", [200, 200, 200, 200]),
    row("GET", "/metrics", [401, 403, 403, 200]),
    row("GET", "/api/schema/", [200, 200, 200, 200]),
    row("GET", "/api/docs/", [200, 200, 200, 200]),
    row("GET", "/api/redoc/", [200, 200, 200, 200]),
    // The web pages: public shells, every call they make is checked above.
    row("GET", "/", [200, 200, 200, 200]),
    row("GET", "/admin/", [200, 200, 200, 200]),
    row("GET", "/static/admin.js", [200, 200, 200, 200]),
    row("GET", "/static/nothing-here.js", [404, 404, 404, 404]),
];
