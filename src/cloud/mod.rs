//! The Qubitro REST client and the pure readers of its answers.
//!
//! Every answer is sorted into the error class that decides what happens next
//! ([`CloudError`]), and every response shape Qubitro's docs show is accepted
//! (wrapped or bare; credentials under `device_credentials` or `metadata`).
//! The API key is only ever put in the Authorization header; no error text carries it.
//!
//! Reading fails closed: an answer that cannot be fully understood is `Retryable`,
//! never "not found" or "rejected", because the engine creates a device when the
//! lookup finds none, and every wrong "none" is a duplicate that costs money.
//!
//! - `client`: [`Cloud`], the HTTP calls, and how a status or transport failure is classed.
//! - `answer`: the envelope, credentials and error message of one device's answer (pure).
//! - `list`: `ListReader`, the device list and its pagination, and which match is adopted (pure).
//! - `dates`: RFC 3339 creation times and `Retry-After` (pure).

mod answer;
mod client;
mod dates;
mod error;
mod list;

pub use client::Cloud;
pub use dates::parse_retry_after;
pub use error::{CloudError, DeleteError, Deleted};
pub use list::Found;
