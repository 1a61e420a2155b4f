//! Optional API keys. When any key is configured, every request but the liveness/readiness
//! probes (and the playground's static page) must carry `Authorization: Bearer <key>` (401
//! otherwise); writing or deleting vectors or SAEs and running extractions need an admin key
//! (403 with an ordinary one). Keys are compared in constant time and never logged.

use super::AppState;
use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Paths anyone may reach.
fn is_public(method: &Method, path: &str) -> bool {
    matches!(path, "/health" | "/ready")
        || (method == Method::GET && (path == "/" || path.starts_with("/playground")))
}

/// Requests that change what the server stores or run long jobs.
pub fn needs_admin(method: &Method, path: &str) -> bool {
    let writes = matches!(
        *method,
        Method::PUT | Method::DELETE | Method::POST | Method::PATCH
    );
    (writes && path.starts_with("/vectors"))
        || (writes && path.starts_with("/saes") && !path.contains("/features/"))
}

/// Constant-time comparison (no early exit on the first differing byte).
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= (*a.get(i).unwrap_or(&0) ^ *b.get(i).unwrap_or(&0)) as usize;
    }
    diff == 0
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 9110 §11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn unauthorized(code: &'static str, message: &str) -> Response {
    let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, code, message).into_response();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// The middleware.
pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let auth = &state.config.auth;
    if !auth.enabled() || is_public(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    let key = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let Some(key) = key else {
        return unauthorized(
            "missing_api_key",
            "this server needs an API key: send `Authorization: Bearer <key>`",
        );
    };
    let admin = auth
        .admin_keys
        .iter()
        .fold(false, |found, k| found | same(k, key));
    let user = admin
        || auth
            .api_keys
            .iter()
            .fold(false, |found, k| found | same(k, key));
    if !user {
        return unauthorized("invalid_api_key", "the API key is not valid");
    }
    if needs_admin(req.method(), req.uri().path()) && !admin {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_key_required",
            "writing vectors or SAEs and running extractions need an admin key",
        )
        .into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for v in ["Bearer k1", "bearer k1", "BEARER  k1 ", "bEaReR k1"] {
            assert_eq!(bearer_token(v), Some("k1"), "{v}");
        }
        for v in ["Basic k1", "Bearer", "Bearer ", "Bearerk1", "k1"] {
            assert_eq!(bearer_token(v), None, "{v}");
        }
    }

    #[test]
    fn classifies_paths() {
        assert!(needs_admin(&Method::PUT, "/vectors/x"));
        assert!(needs_admin(&Method::DELETE, "/vectors/x"));
        assert!(needs_admin(&Method::POST, "/vectors/extract"));
        assert!(!needs_admin(&Method::GET, "/vectors/x"));
        assert!(!needs_admin(&Method::POST, "/generate"));
        assert!(needs_admin(&Method::PUT, "/saes/x"));
        assert!(needs_admin(&Method::DELETE, "/saes/x"));
        assert!(!needs_admin(&Method::POST, "/saes/x/features/3/top"));
        assert!(is_public(&Method::GET, "/health"));
        assert!(!is_public(&Method::GET, "/info"));
        assert!(same("abcdefgh", "abcdefgh"));
        assert!(!same("abcdefgh", "abcdefgx"));
        assert!(!same("abcdefgh", "abcdefghi"));
    }
}
