//! The OpenAPI document, the offline documentation pages, the probes and the migrations.
use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use aichat_fake_llm::FakeConfig;
use aichat_testkit::eventually;
use common::{
    Replied, Stack, drop_database, fresh_database, scrape, spawn_app, spawn_app_with_flags,
};
use reqwest::{Method, StatusCode};

/// The routes of the contract's tables (`docs/API.md`): rows `| METHOD | `/path` | ...`.
fn contract_routes() -> BTreeSet<(String, String)> {
    let contract = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/API.md"))
        .expect("docs/API.md");
    contract
        .lines()
        .filter_map(|line| {
            let mut cells = line.split('|').map(str::trim).skip(1);
            let method = cells.next()?;
            let path = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
            ["GET", "POST", "PUT", "PATCH", "DELETE"]
                .contains(&method)
                .then(|| (method.to_lowercase(), path.to_owned()))
        })
        .collect()
}

#[tokio::test]
async fn the_contract_and_the_openapi_document_list_the_same_routes() {
    let app = spawn_app().await;
    let (status, schema) = app.call(Method::GET, "/api/schema/", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(schema["openapi"].as_str().unwrap().starts_with('3'));
    let mut documented = BTreeSet::new();
    for (path, item) in schema["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            assert!(operation["responses"].is_object(), "{method} {path}");
            documented.insert((method.clone(), path.clone()));
        }
    }
    let contract = contract_routes();
    assert!(
        contract.len() > 30,
        "the contract's tables were read: {contract:?}"
    );
    let only_in_contract: Vec<_> = contract.difference(&documented).collect();
    let only_in_schema: Vec<_> = documented.difference(&contract).collect();
    assert!(
        only_in_contract.is_empty() && only_in_schema.is_empty(),
        "only in docs/API.md: {only_in_contract:?}; only in the OpenAPI document: {only_in_schema:?}"
    );
    assert!(schema["components"]["securitySchemes"]["bearer"].is_object());
    app.cleanup().await;
}

#[tokio::test]
async fn swagger_ui_and_redoc_are_served_by_the_binary_itself() {
    let app = spawn_app().await;
    for page in ["/api/docs/", "/api/redoc/"] {
        let html = app.fetch_ok(page).await.text;
        assert!(
            html.contains("<html") || html.contains("<!DOCTYPE"),
            "{page}"
        );
        // No script or stylesheet from another host: the pages work offline.
        for attr in ["src=\"http", "href=\"http", "src='http", "href='http"] {
            assert!(!html.contains(attr), "{page} loads {attr}");
        }
    }
    for asset in [
        "/api/docs/swagger-ui-bundle.js",
        "/api/docs/swagger-ui.css",
        "/api/redoc/redoc.standalone.js",
    ] {
        let bundle = app.fetch_ok(asset).await.text;
        assert!(bundle.len() > 10_000, "{asset} is the real bundle");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn probes_report_liveness_and_readiness() {
    let app = spawn_app().await;
    app.fetch_ok("/healthz").await;
    let (status, ready) = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        ready,
        serde_json::json!({"status": "ready", "database": "ok", "redis": "ok"})
    );
    app.cleanup().await;
}

#[tokio::test]
async fn migrations_run_twice_on_the_same_database() {
    let (url, name) = fresh_database().await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    aichat_shared::db::migrate(&pool).await.expect("first run");
    aichat_shared::db::migrate(&pool)
        .await
        .expect("second run is a no-op");
    pool.close().await;
    drop_database(&name).await;
}

/// The first scrape of an API process that has answered nothing lists every metric with its
/// `# HELP` and `# TYPE`, gauges and counters at 0 (checked on the binary: in this test
/// process other apps share one recorder and would fill it).
#[tokio::test]
async fn an_idle_api_lists_every_metric_at_zero_on_its_first_scrape() {
    const SCRAPER: &str = "scraper-token-0123456789";
    let api = common::spawn_api_binary(&["--metrics-token", SCRAPER]).await;
    let text = scrape(&api.base, SCRAPER).await;
    api.cleanup().await;
    let described = [
        ("http_requests_total", "counter"),
        ("http_request_duration_seconds", "histogram"),
        ("websockets_open", "gauge"),
        ("pubsub_subscribed_chats", "gauge"),
        ("queue_jobs", "gauge"),
        ("send_batch_size", "summary"),
        ("aichat_db_conflict_retries_total", "counter"),
    ];
    let at_zero = [
        "websockets_open 0",
        "queue_jobs{state=\"waiting\"} 0",
        "queue_jobs{state=\"in_flight\"} 0",
        "queue_jobs{state=\"dead\"} 0",
        "aichat_db_conflict_retries_total{path=\"send_batch\"} 0",
    ];
    let missing = aichat_testkit::client::missing_metrics(&text, &described, &at_zero);
    assert!(missing.is_empty(), "no {missing:?} in:\n{text}");
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status_and_show_the_queue() {
    const SCRAPER: &str = "scraper-token-0123456789";
    let app = spawn_app_with_flags(&["--metrics-token", SCRAPER]).await;
    let (alice, chat) = app.user_with_ai_chat("alice").await;
    app.send_ok(&alice, chat, "x").await;
    app.get("/api/ai/chats/999999/", &alice.token).await;
    // Only the scraper's token and staff sessions read the metrics.
    let status = |token: &str| {
        let request = app.request(Method::GET, "/metrics").bearer_auth(token);
        async move { request.reply().await.status }
    };
    let anonymous = app.fetch("/metrics").await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        status("wrong-token-0123456789").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(status(&alice.token).await, StatusCode::FORBIDDEN);
    let root = app.staff("root").await;
    // A session this instance looked up before the promotion is cached for SESSION_CACHE_SECS.
    eventually(
        Duration::from_secs(10),
        "staff reads the metrics",
        || async { (status(&root.token).await == StatusCode::OK).then_some(()) },
    )
    .await;
    let text = app.metrics(SCRAPER).await;
    let has = |needle: &str| {
        text.lines()
            .any(|l| l.contains("http_requests_total") && l.contains(needle))
    };
    assert!(
        has(r#"route="/api/ai/chats/{id}/send_message/""#) && has(r#"status="202""#),
        "{text}"
    );
    assert!(has(r#"status="404""#), "{text}");
    assert!(
        text.contains("http_request_duration_seconds_bucket"),
        "{text}"
    );
    // This test's own queue holds its one job (metrics of other tests' apps share the process).
    assert!(
        text.lines()
            .any(|l| l.starts_with("queue_jobs{state=\"waiting\"}")),
        "{text}"
    );
    app.cleanup().await;
}

/// The README's curl walkthrough, pasted as one block into bash against a fresh database with
/// a worker and the fake model: it must end without an error and print the reply.
#[tokio::test]
async fn the_readme_walkthrough_works_pasted() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let section = readme
        .split("### curl\n")
        .nth(1)
        .expect("a curl section in the README");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a sh block in the curl section");
    let app = Stack::start(FakeConfig::default(), &[], &[]).await;
    let script = block.replacen("B=http://127.0.0.1:8000", &format!("B={}", app.base), 1);
    assert_ne!(script, block, "the block sets B to the default address");
    let output = tokio::process::Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", &script])
        .output()
        .await
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some("Echo: Summarise our discussion"),
        "{stdout}"
    );
    let reply_tokens: i64 = lines.get(1).and_then(|t| t.parse().ok()).expect("tokens");
    assert!(reply_tokens > 0, "{stdout}");
    let usage: serde_json::Value = serde_json::from_str(lines.get(2).copied().unwrap_or_default())
        .unwrap_or_else(|_| panic!("usage JSON: {stdout}"));
    assert_eq!(usage["total"]["total_tokens"], reply_tokens, "{stdout}");
    assert!(
        lines.get(3).is_some_and(|l| l.contains("Logged out")),
        "{stdout}"
    );
    app.cleanup().await;
}
