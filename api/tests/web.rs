//! The browser pages and their static files: served by the binary, with the right content
//! types, and loading nothing from another host. (What they do is tested in a real browser by
//! `scripts/browser-test`.)
mod common;

use common::spawn_app;
use reqwest::StatusCode;

const PAGES: &[&str] = &["/", "/admin/"];

const STATIC_FILES: &[(&str, &str)] = &[
    ("/static/app.css", "text/css"),
    ("/static/common.js", "text/javascript"),
    ("/static/chat.js", "text/javascript"),
    ("/static/admin.js", "text/javascript"),
];

/// Every `src="..."`/`href="..."` value of a page.
fn references(html: &str) -> Vec<String> {
    let mut found = Vec::new();
    for attr in ["src=\"", "href=\""] {
        for (at, _) in html.match_indices(attr) {
            let rest = &html[at + attr.len()..];
            if let Some(end) = rest.find('"') {
                found.push(rest[..end].to_owned());
            }
        }
    }
    found
}

#[tokio::test]
async fn the_pages_and_static_files_are_served_with_their_content_types() {
    let app = spawn_app().await;
    for page in PAGES {
        let resp = app.client.get(app.url(page)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{page}");
        let headers = resp.headers().clone();
        assert_eq!(
            headers["content-type"], "text/html; charset=utf-8",
            "{page}"
        );
        assert!(
            headers["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("default-src 'none'"),
            "{page} has a content security policy"
        );
        assert!(headers.contains_key("cache-control"), "{page}");
        let html = resp.text().await.unwrap();
        assert!(html.starts_with("<!doctype html>"), "{page}");
        assert!(html.contains("name=\"viewport\""), "{page} sets a viewport");
    }
    for (path, content_type) in STATIC_FILES {
        let resp = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let header = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(header.starts_with(content_type), "{path}: {header}");
        let cache = resp.headers()["cache-control"].to_str().unwrap().to_owned();
        assert!(cache.contains("max-age="), "{path}: {cache}");
        assert!(!resp.text().await.unwrap().is_empty(), "{path}");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn every_file_a_page_references_is_served() {
    let app = spawn_app().await;
    for page in PAGES {
        let html = app
            .client
            .get(app.url(page))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let local: Vec<String> = references(&html)
            .into_iter()
            .filter(|r| r.starts_with('/'))
            .collect();
        assert!(
            local.iter().any(|r| r.starts_with("/static/")),
            "{page} loads its static files"
        );
        for reference in local {
            let resp = app.client.get(app.url(&reference)).send().await.unwrap();
            assert_eq!(
                resp.status(),
                StatusCode::OK,
                "{page} references {reference}"
            );
        }
    }
    app.cleanup().await;
}

#[tokio::test]
async fn no_page_or_static_file_references_another_host() {
    let app = spawn_app().await;
    let paths = PAGES
        .iter()
        .copied()
        .chain(STATIC_FILES.iter().map(|(path, _)| *path));
    for path in paths {
        let body = app
            .client
            .get(app.url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for scheme in ["http://", "https://"] {
            assert!(!body.contains(scheme), "{path} mentions {scheme}");
        }
        for reference in references(&body) {
            assert!(
                reference.starts_with('/') || reference.starts_with("data:"),
                "{path} references {reference}"
            );
        }
        assert!(!body.contains("@import"), "{path} imports a stylesheet");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn an_unknown_static_file_is_a_json_404() {
    let app = spawn_app().await;
    for path in [
        "/static/nope.js",
        "/static/index.html",
        "/static/..%2FCargo.toml",
    ] {
        let resp = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    app.cleanup().await;
}
