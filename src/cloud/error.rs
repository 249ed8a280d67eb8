//! How a cloud call failed, named for what the caller must do next; a device delete,
//! whose answers the operator reads, has its own.

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

/// What a device delete did when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// Qubitro deleted the device now.
    Now,
    /// Qubitro answered 404: the device was already gone (deleted in the portal, or by
    /// an earlier attempt whose answer was lost), which is what the caller wanted.
    AlreadyGone,
}

/// Why Qubitro did not delete a device, with its answer (status and message, never
/// the API key), for an operator to read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeleteError {
    /// 403: the key is valid but may not delete.
    #[error(
        "Qubitro refused to delete device {device_id} (HTTP 403: {message}): the API key may lack the Delete \
         permission (grant it to the key in Qubitro's portal)"
    )]
    Forbidden { device_id: String, message: String },
    /// 401: the key itself is refused.
    #[error("Qubitro refused the API key when deleting device {device_id} (HTTP 401: {message}): check qubitro.api_key")]
    Unauthorized { device_id: String, message: String },
    /// Another 4xx: asking again the same way cannot help.
    #[error("Qubitro refused to delete device {device_id} (HTTP {status}: {message})")]
    Refused {
        device_id: String,
        status: u16,
        message: String,
    },
    /// No answer, 408, 429 or 5xx: the device may or may not be gone; try again.
    #[error("deleting Qubitro device {device_id} did not complete ({reason}); try again")]
    Unavailable { device_id: String, reason: String },
}
