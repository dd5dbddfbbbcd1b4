//! API keys: `Authorization: Bearer <key>` checked against the configured set.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::errors::ApiError;

/// The configured keys; an empty set lets every request through.
#[derive(Clone, Debug)]
pub struct ApiKeys(Arc<Vec<Vec<u8>>>);

impl ApiKeys {
    pub fn new(keys: &[String]) -> Self {
        Self(Arc::new(keys.iter().map(|k| k.as_bytes().to_vec()).collect()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an `Authorization` header value carries one of the keys.
    pub fn accepts(&self, header: Option<&[u8]>) -> bool {
        if self.is_empty() {
            return true;
        }
        let Some(key) = header.and_then(bearer) else {
            return false;
        };
        // Compare against every key in full so timing does not reveal which one nearly matched.
        self.0.iter().fold(false, |found, k| found | constant_time_eq(k, key))
    }
}

fn bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| rest.trim_ascii())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware refusing requests without a valid key with 401.
pub async fn require_key(State(keys): State<ApiKeys>, req: Request, next: Next) -> Response {
    let header = req.headers().get(axum::http::header::AUTHORIZATION).map(|v| v.as_bytes());
    if keys.accepts(header) {
        next.run(req).await
    } else {
        let missing = header.is_none();
        ApiError::Unauthorized { missing }.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys() {
        let keys = ApiKeys::new(&["k1".into(), "secret".into()]);
        assert!(keys.accepts(Some(b"Bearer secret")));
        assert!(keys.accepts(Some(b"bearer k1 ")));
        assert!(!keys.accepts(Some(b"Bearer secre")));
        assert!(!keys.accepts(Some(b"Basic secret")));
        assert!(!keys.accepts(Some(b"Bearer")));
        assert!(!keys.accepts(None));
        assert!(ApiKeys::new(&[]).accepts(None));
    }
}
