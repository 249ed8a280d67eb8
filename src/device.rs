//! What Qubitro issues for a sensor: the domain types every layer shares.
//!
//! [`Token`] keeps a device token out of every `Debug` rendering, so that no log
//! line, error or panic message can carry it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A Qubitro device token. Serialized in full (store, reply), never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Token(pub String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// What Qubitro issued for one sensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub device_id: String,
    pub device_token: Token,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_token() {
        let c = Credentials {
            device_id: "d".into(),
            device_token: Token("s3cr3t$".into()),
        };
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }
}
