//! A JSON body extractor whose rejections are our [`ApiError`]: malformed JSON is 400, JSON of
//! the wrong shape is 422 naming the field (`steering[0].layer: invalid type ...`), a body over
//! the size limit is 413. The content type is not required to be `application/json`, so a
//! plain `curl -d` works.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

/// `Json<T>` with our errors.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(body_error)?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Maps a failure to read the body (usually: over the size limit).
pub fn body_error(e: axum::extract::rejection::BytesRejection) -> ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large("the request body is larger than server.max_body_bytes")
    } else {
        ApiError::malformed(format!("could not read the request body: {e}"))
    }
}

/// Parses JSON, naming the path of a field of the wrong shape.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::malformed(
            "the request body is empty; send a JSON object",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        use serde_json::error::Category;
        match inner.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::malformed(format!("the request body is not valid JSON: {inner}"))
            }
            Category::Data => {
                let field = if path == "." {
                    "body".to_string()
                } else {
                    path
                };
                ApiError::invalid(&field, "invalid_field", strip_position(&inner.to_string()))
            }
        }
    })
}

/// serde_json appends " at line 1 column 57", which means little once the field is named.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// A raw body (vector files) with our errors for bodies over the size limit.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Ok(RawBody(
            Bytes::from_request(req, state).await.map_err(body_error)?,
        ))
    }
}
