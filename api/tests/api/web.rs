//! The browser pages and their static files: served by the binary, with the right content
//! types, and loading nothing from another host. (What they do is tested in a real browser by
//! `scripts/browser-test`.)
use crate::common;

use common::spawn_app;
use reqwest::StatusCode;

const PAGES: &[&str] = &["/", "/admin/"];

const STATIC_FILES: &[(&str, &str)] = &[
    ("/static/app.css", "text/css"),
    ("/static/common.js", "text/javascript"),
    ("/static/chat.js", "text/javascript"),
    ("/static/chat-list.js", "text/javascript"),
    ("/static/chat-options.js", "text/javascript"),
    ("/static/state.js", "text/javascript"),
    ("/static/messages.js", "text/javascript"),
    ("/static/stream.js", "text/javascript"),
    ("/static/stop-retry.js", "text/javascript"),
    ("/static/socket.js", "text/javascript"),
    ("/static/tree.js", "text/javascript"),
    ("/static/versions.js", "text/javascript"),
    ("/static/markdown.js", "text/javascript"),
    ("/static/admin.js", "text/javascript"),
];

/// The vendored libraries (`api/assets/vendor/`): path, the file committed, the name its README
/// table gives it, and how the file's own header names its version. Published files, unchanged:
/// their comments and XML namespace strings mention other hosts, so they are left out of
/// `no_page_or_static_file_references_another_host` (the browser tests check that no page
/// requests anything from another host).
const VENDORED: &[(&str, &str, &str, &str)] = &[
    (
        "/static/marked.umd.js",
        include_str!("../../assets/vendor/marked/marked.umd.js"),
        "marked",
        "marked v",
    ),
    (
        "/static/purify.min.js",
        include_str!("../../assets/vendor/dompurify/purify.min.js"),
        "DOMPurify",
        "DOMPurify ",
    ),
];
const VENDOR_README: &str = include_str!("../../assets/vendor/README.md");

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
        let resp = app.fetch_ok(page).await;
        assert_eq!(
            resp.header("content-type"),
            "text/html; charset=utf-8",
            "{page}"
        );
        assert!(
            resp.header("content-security-policy")
                .contains("default-src 'none'"),
            "{page} has a content security policy"
        );
        assert!(resp.headers.contains_key("cache-control"), "{page}");
        let html = &resp.text;
        assert!(html.starts_with("<!doctype html>"), "{page}");
        assert!(html.contains("name=\"viewport\""), "{page} sets a viewport");
    }
    let vendored = VENDORED.iter().map(|(path, ..)| (*path, "text/javascript"));
    for (path, content_type) in STATIC_FILES.iter().copied().chain(vendored) {
        let resp = app.fetch_ok(path).await;
        let header = resp.header("content-type");
        assert!(header.starts_with(content_type), "{path}: {header}");
        let cache = resp.header("cache-control");
        assert!(cache.contains("max-age="), "{path}: {cache}");
        assert!(!resp.text.is_empty(), "{path}");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn every_file_a_page_references_is_served() {
    let app = spawn_app().await;
    for page in PAGES {
        let html = app.fetch_ok(page).await.text;
        let local: Vec<String> = references(&html)
            .into_iter()
            .filter(|r| r.starts_with('/'))
            .collect();
        assert!(
            local.iter().any(|r| r.starts_with("/static/")),
            "{page} loads its static files"
        );
        for reference in local {
            let resp = app.fetch(&reference).await;
            assert_eq!(resp.status, StatusCode::OK, "{page} references {reference}");
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
        let body = app.fetch_ok(path).await.text;
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
async fn the_vendored_libraries_are_served_unchanged_in_the_versions_their_readme_names() {
    let app = spawn_app().await;
    for (path, committed, name, header) in VENDORED {
        let body = app.fetch_ok(path).await.text;
        assert!(body == *committed, "{path} is the committed file");
        // The README's table row: `| name | version | ...`.
        let row = format!("| {name} | ");
        let version = VENDOR_README
            .lines()
            .find_map(|line| line.strip_prefix(row.as_str()))
            .and_then(|rest| rest.split(" |").next())
            .unwrap_or_else(|| panic!("the vendor README has a row for {name}"));
        let head: String = body.chars().take(400).collect();
        assert!(
            head.contains(&format!("{header}{version}")),
            "{path} is {name} {version}, as the README says: {head}"
        );
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
        app.fetch(path).await.error(path, StatusCode::NOT_FOUND);
    }
    app.cleanup().await;
}
