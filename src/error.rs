//! One error type for the whole HTTP surface, with its status code and the JSON envelope
//! `{"error": {"message", "type", "code"}}` (OpenAI's shape), also sent as an SSE `error`
//! event when a stream fails midway. Internal details are logged, not sent.

use crate::steering::spec::SpecError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// Machine-readable reason, e.g. `unknown_vector`.
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// Overrides the `type` derived from the status (OpenAI reports a missing model as an
    /// `invalid_request_error`).
    pub kind_override: Option<&'static str>,
    /// Seconds a client should wait (429/503).
    pub retry_after: Option<u64>,
}

/// The JSON error envelope.
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// What went wrong, naming the field where one is at fault.
    #[schema(
        example = "`steering[0].layer`: layer 40 is out of range: the model has 30 layers (0-29)"
    )]
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `permission_error`, `not_found_error`,
    /// `conflict_error`, `rate_limit_error`, `overloaded_error` or `server_error`.
    #[serde(rename = "type")]
    #[schema(example = "invalid_request_error")]
    pub kind: String,
    /// The request field at fault, if one is (OpenAI's `param`).
    #[schema(example = "steering[0].layer")]
    pub param: Option<String>,
    /// Machine-readable reason.
    #[schema(example = "invalid_layer")]
    pub code: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            param: None,
            kind_override: None,
            retry_after: None,
        }
    }

    /// 400: the request could not be read at all.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_request", message)
    }

    /// 422: well-formed but not acceptable; `field` is named in the message and in `param`.
    pub fn invalid(field: &str, code: &'static str, message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            code,
            format!("`{field}`: {message}"),
        )
        .with_param(field)
    }

    /// The error of a prompt read for the request field `field`: its `prompt` is `field`, its
    /// `messages[..]` is `field.messages[..]`.
    pub fn for_field(mut self, field: &str) -> Self {
        if let Some(old) = self.param.take() {
            let new = match old.as_str() {
                "prompt" => field.to_string(),
                other => format!("{field}.{other}"),
            };
            if let Some(rest) = self.message.strip_prefix(&format!("`{old}`")) {
                self.message = format!("`{new}`{rest}");
            }
            self.param = Some(new);
        }
        self
    }

    /// Names the request field (or header) at fault.
    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", message)
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }

    /// 500: logs the detail and tells the client only that it failed.
    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!("{context} failed; see the server log"),
        )
    }

    pub fn kind(&self) -> &'static str {
        if let Some(k) = self.kind_override {
            return k;
        }
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::CONFLICT | StatusCode::PRECONDITION_FAILED => "conflict_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind().to_string(),
                param: self.param.clone(),
                code: self.code.to_string(),
            },
        }
    }

    /// The envelope as a JSON string (for SSE `error` events).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.body()).unwrap_or_else(|_| "{\"error\":{}}".into())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        ApiError::invalid(&e.field, e.code, e.message)
    }
}

impl From<crate::engine::SubmitError> for ApiError {
    fn from(e: crate::engine::SubmitError) -> Self {
        match e {
            crate::engine::SubmitError::QueueFull => ApiError::overloaded(
                "the server is at capacity: the request queue is full; retry shortly",
            ),
            crate::engine::SubmitError::Stopped => {
                ApiError::unavailable("the engine is shutting down")
            }
        }
    }
}
