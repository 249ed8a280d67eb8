//! How a cloud call failed, named for what the caller must do next.

use std::time::Duration;

/// How a cloud call failed, which decides what onboardd does next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudError {
    /// Try again later: timeouts, connection errors, 408, 429, 5xx, unreadable 2xx.
    #[error("Qubitro unavailable: {reason}")]
    Retryable {
        reason: String,
        retry_after: Option<Duration>,
        /// The device may exist although we got no credentials (timeout after sending,
        /// 5xx, unreadable success): look it up before creating again.
        maybe_created: bool,
    },
    /// The request itself is wrong (400 and other 4xx): retrying cannot help.
    #[error("Qubitro rejected the request ({status}): {message}")]
    Rejected { status: u16, message: String },
    /// 401/403, or 404 for the project: the API key or project id is wrong or revoked.
    #[error("Qubitro refused the API key or project ({status}): check qubitro.api_key and qubitro.project_id")]
    Operator { status: u16 },
}
