//! How every answer is written: JSON in the configured envelope, success or error.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State as Ext;
use axum::http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};

use crate::options::Envelope;
use crate::store::Shared;

// Far above any legitimate create body; only there so a runaway client cannot eat the memory.
pub(crate) const BODY_LIMIT: usize = 1 << 20;

pub(crate) type Shd = Ext<Arc<Shared>>;

impl Shared {
    pub(crate) fn success(
        &self,
        status: StatusCode,
        action: &str,
        message: &str,
        data: Value,
    ) -> Response<Body> {
        match self.opts.envelope {
            Envelope::Wrapped => json_response(
                status,
                &json!({"success": true, "action": action, "status": status.as_u16(),
                        "message": message, "data": data}),
            ),
            Envelope::Bare => json_response(status, &data),
        }
    }

    pub(crate) fn error(&self, status: StatusCode, message: impl Into<String>) -> Response<Body> {
        let message = message.into();
        match self.opts.envelope {
            Envelope::Wrapped => json_response(
                status,
                &json!({"success": false, "status": status.as_u16(), "message": message}),
            ),
            Envelope::Bare => json_response(status, &json!({"message": message})),
        }
    }
}

pub(crate) fn status_or(code: u16, fallback: StatusCode) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(fallback)
}

pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("a serde_json::Value always serializes");
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
