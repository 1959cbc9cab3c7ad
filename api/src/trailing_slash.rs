//! Paths written without their trailing slash (`/api/chats` for `/api/chats/`): a GET or HEAD
//! is redirected (308, query kept) to the slashed path, any other method gets a JSON 404 that
//! names it. Only paths whose slashed form is a route are answered so; the rest are plain 404s.
use axum::http::header::LOCATION;
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The route templates (`/api/chats/{id}/`) that end with a slash.
#[derive(Debug, Default)]
pub struct SlashedRoutes(Vec<Vec<String>>);

impl SlashedRoutes {
    pub fn new<'a>(templates: impl IntoIterator<Item = &'a str>) -> Self {
        SlashedRoutes(
            templates
                .into_iter()
                .filter(|template| template.ends_with('/') && template.len() > 1)
                .map(|template| template.split('/').map(str::to_owned).collect())
                .collect(),
        )
    }

    /// Whether `path` (ending with a slash) is one of the routes; `{param}` segments match
    /// any non-empty segment.
    fn contains(&self, path: &str) -> bool {
        let segments: Vec<&str> = path.split('/').collect();
        self.0.iter().any(|template| {
            template.len() == segments.len()
                && template.iter().zip(&segments).all(|(expected, given)| {
                    if expected.starts_with('{') && expected.ends_with('}') {
                        !given.is_empty()
                    } else {
                        expected == given
                    }
                })
        })
    }

    /// The fallback's answer for a request no route matched.
    pub fn answer(&self, method: &Method, uri: &Uri) -> Response {
        let path = uri.path();
        if path.ends_with('/') {
            return ApiError::NotFound.into_response();
        }
        let slashed = format!("{path}/");
        if !self.contains(&slashed) {
            return ApiError::NotFound.into_response();
        }
        if method != Method::GET && method != Method::HEAD {
            return ApiError::MissingTrailingSlash(slashed).into_response();
        }
        let location = match uri.query() {
            Some(query) => format!("{slashed}?{query}"),
            None => slashed,
        };
        match HeaderValue::from_str(&location) {
            Ok(value) => (StatusCode::PERMANENT_REDIRECT, [(LOCATION, value)]).into_response(),
            Err(_) => ApiError::NotFound.into_response(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_routes_that_exist_with_a_slash_are_matched() {
        let routes = SlashedRoutes::new(["/api/chats/", "/api/chats/{id}/messages/", "/healthz"]);
        assert!(routes.contains("/api/chats/"));
        assert!(routes.contains("/api/chats/7/messages/"));
        assert!(!routes.contains("/api/chats//messages/"));
        assert!(!routes.contains("/api/chat/"));
        assert!(!routes.contains("/healthz/"));
    }
}
