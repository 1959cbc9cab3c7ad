//! Every route, merged in one place, with the OpenAPI document built from them.
use axum::Router;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::error::ApiError;
use crate::state::AppState;
use crate::trailing_slash::SlashedRoutes;

mod accounts;
mod admin;
mod admin_users;
mod ai_chats;
mod ai_messages;
mod chats;
pub(crate) mod export;
mod message_stream;
mod models;
mod ops;
mod quota;
mod schemas;
mod web;
mod ws;

/// The operations come from the routers merged in `api()`; an operation that needs no session
/// says so with `security(())`, every other one inherits the document's `security`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "aichat",
        description = "Private conversations with an LLM, optionally grounded in a user-to-user chat.",
        // The workspace's `license` (Cargo.toml); the api crate does not inherit it, so
        // `CARGO_PKG_LICENSE` is empty here.
        license(name = "MIT", identifier = "MIT"),
    ),
    servers((url = "/", description = "The server this document was read from")),
    components(schemas(schemas::ErrorBody, schemas::FieldErrorsBody, schemas::BadRequestBody)),
    modifiers(&SecurityAddon),
    security(("bearer" = []), ("cookie" = []))
)]
struct ApiDoc;

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new("sessionid"))),
        );
    }
}

/// The OpenAPI document and the router it describes.
pub fn api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(accounts::router())
        .merge(chats::router())
        .merge(ai_chats::router())
        .merge(ai_messages::router())
        .merge(export::router())
        .merge(message_stream::router())
        .merge(models::router())
        .merge(quota::router())
        .merge(ops::router())
        .merge(admin::router())
        .merge(admin_users::router())
        .merge(ws::router())
        .split_for_parts();
    // Once every operation is in: `ApiDoc`'s own modifiers run before the routers are merged.
    utoipa::Modify::modify(&schemas::MiddlewareResponses, &mut openapi);
    utoipa::Modify::modify(&schemas::LimitHeaders, &mut openapi);
    (router, openapi)
}

/// The whole application router (state still to be supplied).
pub fn router() -> Router<AppState> {
    let (api, openapi) = api();
    // Shared, not copied: axum clones a handler for every request it serves.
    let slashed = std::sync::Arc::new(SlashedRoutes::new(
        openapi.paths.paths.keys().map(String::as_str).chain([
            "/api/docs/",
            "/api/redoc/",
            "/admin/",
        ]),
    ));
    api.merge(SwaggerUi::new("/api/docs").url("/api/schema/", openapi))
        .route("/api/redoc/", get(redoc))
        .route("/api/redoc/redoc.standalone.js", get(redoc_js))
        .merge(web::router())
        .fallback(move |method: Method, uri: Uri| {
            let response = slashed.answer(&method, &uri);
            async move { response }
        })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
}

async fn redoc() -> Html<&'static str> {
    Html(include_str!("../../assets/redoc.html"))
}

async fn redoc_js() -> impl IntoResponse {
    (
        StatusCode::OK,
        [
            ("content-type", "application/javascript; charset=utf-8"),
            ("cache-control", "public, max-age=86400"),
        ],
        include_str!("../../assets/redoc.standalone.js"),
    )
}
