//! Pages of the list endpoints: `limit` (a default per list, at most [`MAX_LIMIT`]) and a
//! cursor: `after_id` where a list runs oldest first, `before_id` where it runs newest first.
//! A full page says where the next one starts in a `Link: <…>; rel="next"` header (RFC 8288);
//! the body stays the plain array older clients read.
use axum::Json;
use axum::http::header::LINK;
use axum::http::{HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::IntoParams;

use crate::error::{ApiResult, FieldErrors};
use crate::validate;

/// The largest page any list answers.
pub const MAX_LIMIT: i64 = 1000;

/// The page of a list of chats or users when none is asked for. Lists of messages answer
/// [`MAX_LIMIT`] by default, so that a client of the old API still reads a whole chat of up to
/// that many messages in one request.
pub const DEFAULT_LIMIT: i64 = 100;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Only items after this id (lists that run oldest first; 400 on the others).
    #[param(minimum = 0)]
    pub after_id: Option<i64>,
    /// Only items after this one in the list's order (lists that run newest first; 400 on the
    /// others).
    #[param(minimum = 0)]
    pub before_id: Option<i64>,
    /// At most this many (1–1000; each list has its default).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
}

impl PageQuery {
    /// The cursor of a list that runs in `order` and the page size asked for (or `default`);
    /// 400 (field errors) for a cursor below 0, the other order's cursor, or a limit outside
    /// 1–1000.
    pub fn read(&self, order: Order, default: i64) -> ApiResult<(Option<i64>, i64)> {
        let mut errors = FieldErrors::default();
        let (cursor, (other_name, other)) = match order {
            Order::OldestFirst => (self.after_id, ("before_id", self.before_id)),
            Order::NewestFirst => (self.before_id, ("after_id", self.after_id)),
        };
        if other.is_some() {
            errors.add(other_name, "This list does not page in that direction.");
        }
        if let Some(cursor) = cursor {
            validate::in_range(&mut errors, order.cursor_name(), cursor, 0, i64::MAX);
        }
        if let Some(limit) = self.limit {
            validate::in_range(&mut errors, "limit", limit, 1, MAX_LIMIT);
        }
        errors.check()?;
        Ok((cursor, self.limit.unwrap_or(default)))
    }
}

/// Which way a list runs, and so which cursor continues it.
#[derive(Debug, Clone, Copy)]
pub enum Order {
    OldestFirst,
    NewestFirst,
}

impl Order {
    fn cursor_name(self) -> &'static str {
        match self {
            Order::OldestFirst => "after_id",
            Order::NewestFirst => "before_id",
        }
    }
}

/// One page of a list, answered as a JSON array with a `Link` to the next page when full.
pub struct Page<T> {
    items: Vec<T>,
    next: Option<String>,
}

impl<T> Page<T> {
    /// `items` (at most `limit`, as read) of the list at `uri`; `id` is the cursor an item
    /// gives the next page.
    pub fn new(items: Vec<T>, limit: i64, uri: &Uri, order: Order, id: impl Fn(&T) -> i64) -> Self {
        let full = usize::try_from(limit).is_ok_and(|limit| items.len() >= limit);
        let next = match items.last() {
            Some(last) if full => Some(next_link(uri, order, id(last), limit)),
            _ => None,
        };
        Page { items, next }
    }

    /// The same page with its items in another order; the link to the next page stays where
    /// the list's order put it.
    pub fn sort_by(mut self, compare: impl FnMut(&T, &T) -> std::cmp::Ordering) -> Self {
        self.items.sort_by(compare);
        self
    }
}

impl<T: Serialize> IntoResponse for Page<T> {
    fn into_response(self) -> Response {
        let mut response = Json(self.items).into_response();
        if let Some(link) = self.next.and_then(|link| HeaderValue::from_str(&link).ok()) {
            response.headers_mut().insert(LINK, link);
        }
        response
    }
}

/// `<path?…&after_id=N&limit=L>; rel="next"`: the request's other parameters kept, its cursor
/// and limit replaced.
fn next_link(uri: &Uri, order: Order, cursor: i64, limit: i64) -> String {
    let cursor_name = order.cursor_name();
    let mut query: Vec<String> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            !matches!(name, "after_id" | "before_id" | "limit")
        })
        .map(str::to_owned)
        .collect();
    query.push(format!("{cursor_name}={cursor}"));
    query.push(format!("limit={limit}"));
    format!("<{}?{}>; rel=\"next\"", uri.path(), query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_link_keeps_other_parameters_and_replaces_the_cursor() {
        let uri: Uri = "/api/x/?q=a%20b&after_id=3&limit=2".parse().unwrap();
        assert_eq!(
            next_link(&uri, Order::OldestFirst, 9, 2),
            "</api/x/?q=a%20b&after_id=9&limit=2>; rel=\"next\""
        );
        let uri: Uri = "/api/chats/".parse().unwrap();
        assert_eq!(
            next_link(&uri, Order::NewestFirst, 5, 100),
            "</api/chats/?before_id=5&limit=100>; rel=\"next\""
        );
    }

    #[test]
    fn only_a_full_page_links_to_the_next() {
        let uri: Uri = "/api/x/".parse().unwrap();
        let page = Page::new(vec![1, 2], 2, &uri, Order::OldestFirst, |n| *n);
        assert!(page.next.is_some());
        let page = Page::new(vec![1], 2, &uri, Order::OldestFirst, |n| *n);
        assert!(page.next.is_none());
    }
}
