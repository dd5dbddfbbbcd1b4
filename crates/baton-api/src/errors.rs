//! OpenAI error objects (`{"error": {"message", "type", "param", "code"}}`) with their statuses.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Everything a request can fail with, each mapped to the status OpenAI's API would send.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON or a parameter outside its domain; `param` names the field.
    #[error("{message}")]
    Invalid { message: String, param: Option<String> },
    #[error(
        "This model's maximum context length is {context_length} tokens. However, you requested \
         {} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). Please reduce \
         the prompt or the completion length.", prompt_tokens + max_tokens
    )]
    ContextLength { prompt_tokens: usize, max_tokens: usize, context_length: usize },
    #[error("{}", if *missing { "Missing API key: send it as `Authorization: Bearer <key>`." } else { "Incorrect API key provided." })]
    Unauthorized { missing: bool },
    #[error("The model `{0}` does not exist; this server serves `{1}`.")]
    ModelNotFound(String, String),
    #[error("No route for {0}.")]
    RouteNotFound(String),
    #[error("Method {0} is not allowed here.")]
    MethodNotAllowed(String),
    #[error("The request body exceeds the limit of {0} bytes.")]
    PayloadTooLarge(usize),
    #[error("The server is at capacity; retry after {retry_after} s.")]
    QueueFull { retry_after: u64 },
    #[error("The model is not ready: {reason}; retry after {retry_after} s.")]
    NotReady { reason: String, retry_after: u64 },
    #[error("Generation failed: {0}")]
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

/// The `error` member of an OpenAI error response (also sent as an SSE event mid-stream).
#[derive(Serialize)]
pub struct ErrorObject<'a> {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid { message: message.into(), param: Some(param.into()) }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } | ApiError::ContextLength { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotFound(..) | ApiError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotReady { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn object(&self) -> ErrorObject<'_> {
        let (kind, param, code) = match self {
            ApiError::Invalid { param, .. } => ("invalid_request_error", param.as_deref(), None),
            ApiError::ContextLength { .. } => {
                ("invalid_request_error", Some("messages"), Some("context_length_exceeded"))
            }
            ApiError::Unauthorized { .. } => ("invalid_request_error", None, Some("invalid_api_key")),
            ApiError::ModelNotFound(..) => ("invalid_request_error", Some("model"), Some("model_not_found")),
            ApiError::RouteNotFound(_) => ("invalid_request_error", None, Some("unknown_url")),
            ApiError::MethodNotAllowed(_) => ("invalid_request_error", None, Some("method_not_allowed")),
            ApiError::PayloadTooLarge(_) => ("invalid_request_error", None, Some("request_too_large")),
            ApiError::QueueFull { .. } => ("rate_limit_error", None, Some("rate_limit_exceeded")),
            ApiError::NotReady { .. } => ("service_unavailable", None, Some("not_ready")),
            ApiError::Internal(_) => ("server_error", None, None),
        };
        ErrorObject { message: self.to_string(), kind, param, code }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::QueueFull { retry_after } | ApiError::NotReady { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&ErrorBody { error: self.object() }).unwrap_or_default();
        let mut resp = (self.status(), [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if let Some(s) = self.retry_after() {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_length_message_has_the_numbers() {
        let e = ApiError::ContextLength { prompt_tokens: 10, max_tokens: 5, context_length: 12 };
        let m = e.to_string();
        assert!(m.contains("12 tokens") && m.contains("15 tokens") && m.contains("10 in the prompt"), "{m}");
        assert_eq!(e.object().code, Some("context_length_exceeded"));
    }
}
