//! The steering playground: one page (Compare, Sweep, Heatmap, Patching, Logit lens, Vectors) whose HTML, script and
//! style are built into the binary, so it works with no network. It is a plain client of the
//! public API (it calls nothing the API does not document) and is served at `/` and
//! `/playground`. A strict Content-Security-Policy keeps it to this server's own origin.

use super::AppState;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("../../assets/playground/index.html");
const APP_JS: &str = include_str!("../../assets/playground/app.js");
const LOCALISE_JS: &str = include_str!("../../assets/playground/localise.js");
const STYLE_CSS: &str = include_str!("../../assets/playground/style.css");

/// Nothing but this origin: no CDN, no external fonts, no inline script.
const CSP: &str =
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Small and built in: revalidate, so a new binary's page is never stale.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn localise() -> Response {
    asset("text/javascript; charset=utf-8", LOCALISE_JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// `GET /`, `GET /playground` and the page's assets (no API key needed: the page asks for
/// one when the API answers 401).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/playground", get(index))
        .route("/playground/app.js", get(script))
        .route("/playground/localise.js", get(localise))
        .route("/playground/style.css", get(style))
}
