//! The answers onboardd publishes to a sensor, and where they go.
//!
//! A reply is the only place a device token is ever written out. A reply to an
//! authenticated (protocol v2) announce goes out as `{"body": R, "mac": M}` bound to
//! that announce's nonce, its token sealed for the sensor and that exchange (see
//! `proof::v2`); a reply to anything else goes out in v1 form, without a MAC, and
//! carries a token (in clear) only when proofs are off and the announce had none.

use serde::{Deserialize, Serialize};

pub use crate::device::{Credentials, Token};
use crate::proof::v2::AnnounceNonce;

/// Where and how to answer one announce.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// MQTT 5 Response Topic, already checked to lie in the sensor's own reply namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    /// MQTT 5 Correlation Data, echoed as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_data: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The announce proved its sensor: no ok reply on this route ever carries the
    /// token in clear, and a record made from it is the authenticated sensor's for
    /// good (a plain announce of it is refused). Records made by v1 proofs read as
    /// `true` without a nonce: they get no ok reply until the sensor announces in v2.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proven: bool,
    /// The nonce of the protocol v2 announce this route answers: every reply on it
    /// carries it inside its MAC, and an ok's token is sealed for it. Stored with
    /// the record, so an answer owed after a restart or a reconnect still binds to
    /// the announce it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<AnnounceNonce>,
}

impl Route {
    /// The topic to publish on: the checked Response Topic, else the default reply topic.
    pub fn topic(&self, reply_pattern: &str, sensor_id: &str) -> String {
        self.response_topic
            .clone()
            .unwrap_or_else(|| reply_topic(reply_pattern, sensor_id))
    }
}

pub fn reply_topic(reply_pattern: &str, sensor_id: &str) -> String {
    reply_pattern.replace("{sensor_id}", sensor_id)
}

/// A Response Topic is honoured only inside the sensor's own reply namespace, so an
/// announce can never make onboardd publish a token where another client listens.
pub fn allowed_response_topic(reply_pattern: &str, sensor_id: &str, requested: &str) -> bool {
    let own = reply_topic(reply_pattern, sensor_id);
    if requested.contains(['+', '#', '\0']) {
        return false;
    }
    requested == own
        || requested
            .strip_prefix(own.as_str())
            .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
}

/// Why an announce got an error reply: the stable word sensors read in `"code"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyCode {
    /// The payload is over `announce.max_payload_bytes` (never parsed).
    PayloadTooLarge,
    InvalidJson,
    NotAnObject,
    /// A field, an MQTT 5 property or a reserved id the gateway cannot take.
    InvalidField,
    /// Not an authenticated protocol v2 announce (or a plain one of a sensor that
    /// was onboarded authenticated).
    Unauthorized,
    /// The gateway's rules (deny or allow lists) refuse the sensor.
    Denied,
    /// A flood limit or cool-down: ask again after `retry_after_s`.
    RateLimited,
    /// Qubitro refused the device as announced.
    RejectedByCloud,
}

impl ReplyCode {
    /// Every code, so counts per code are a fixed set (/metrics).
    pub const ALL: [ReplyCode; 8] = [
        ReplyCode::PayloadTooLarge,
        ReplyCode::InvalidJson,
        ReplyCode::NotAnObject,
        ReplyCode::InvalidField,
        ReplyCode::Unauthorized,
        ReplyCode::Denied,
        ReplyCode::RateLimited,
        ReplyCode::RejectedByCloud,
    ];

    /// The word on the wire (and in logs).
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyCode::PayloadTooLarge => "payload_too_large",
            ReplyCode::InvalidJson => "invalid_json",
            ReplyCode::NotAnObject => "not_an_object",
            ReplyCode::InvalidField => "invalid_field",
            ReplyCode::Unauthorized => "unauthorized",
            ReplyCode::Denied => "denied",
            ReplyCode::RateLimited => "rate_limited",
            ReplyCode::RejectedByCloud => "rejected_by_cloud",
        }
    }
}

impl std::fmt::Display for ReplyCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Broker {
    pub host: String,
    pub port: u16,
}

/// How an ok reply carries the device token: one of the two fields, never both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TokenField {
    /// `"device_token"`: only to a plain announce (no proof), with
    /// `security.require_claim = false`.
    #[serde(rename = "device_token")]
    Clear(Token),
    /// `"device_token_sealed"`: hex(gcm_nonce ‖ ciphertext ‖ tag), see `proof::v2`.
    #[serde(rename = "device_token_sealed")]
    Sealed(String),
}

/// What an `ok` reply gives the sensor besides its device id.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum OkHow {
    /// The sensor connects to Qubitro itself: its token and where to connect.
    Direct {
        #[serde(flatten)]
        token: TokenField,
        broker: Broker,
    },
    /// The gateway forwards the sensor's readings (`"bridged": true`): no token at
    /// all, only where to publish them on the local broker.
    Bridged { bridged: bool, data_topic: String },
}

/// The JSON body of a reply.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Reply {
    Ok {
        sensor_id: String,
        device_id: String,
        #[serde(flatten)]
        how: OkHow,
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    },
    Pending {
        sensor_id: String,
        retry_after_s: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    },
    Error {
        sensor_id: String,
        code: ReplyCode,
        message: String,
        /// With `rate_limited`: when asking again can succeed.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_s: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    },
}

impl Reply {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a reply is plain data and always serializes")
    }

    pub fn error(
        sensor_id: &str,
        code: ReplyCode,
        message: impl Into<String>,
        request_id: Option<String>,
    ) -> Reply {
        Reply::Error {
            sensor_id: sensor_id.to_string(),
            code,
            message: message.into(),
            retry_after_s: None,
            request_id,
        }
    }

    /// The same reply, saying when asking again can succeed (whole seconds, at least
    /// 1, so a sensor never retries at once). Only error replies carry it.
    pub fn retry_after(mut self, wait: std::time::Duration) -> Reply {
        if let Reply::Error { retry_after_s, .. } = &mut self {
            *retry_after_s = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
        }
        self
    }

    pub fn pending(sensor_id: &str, retry_after_s: u64, request_id: Option<String>) -> Reply {
        Reply::Pending {
            sensor_id: sensor_id.to_string(),
            retry_after_s,
            request_id,
        }
    }

    /// The status word, for logs.
    pub fn status(&self) -> &'static str {
        match self {
            Reply::Ok { .. } => "ok",
            Reply::Pending { .. } => "pending",
            Reply::Error { .. } => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_reply_has_the_documented_shape() {
        let r = Reply::Ok {
            sensor_id: "s".into(),
            device_id: "d".into(),
            how: OkHow::Direct {
                token: TokenField::Clear(Token("t$".into())),
                broker: Broker {
                    host: "broker.qubitro.com".into(),
                    port: 8883,
                },
            },
            request_id: Some("r".into()),
        };
        let v: serde_json::Value = serde_json::from_slice(&r.to_bytes()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"status":"ok","sensor_id":"s","device_id":"d","device_token":"t$",
                "request_id":"r","broker":{"host":"broker.qubitro.com","port":8883}})
        );
        assert!(!format!("{r:?}").contains("t$"));
    }

    #[test]
    fn a_sealed_ok_reply_has_no_clear_token() {
        let r = Reply::Ok {
            sensor_id: "s".into(),
            device_id: "d".into(),
            how: OkHow::Direct {
                token: TokenField::Sealed("00ff".into()),
                broker: Broker {
                    host: "h".into(),
                    port: 1,
                },
            },
            request_id: None,
        };
        let v: serde_json::Value = serde_json::from_slice(&r.to_bytes()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"status":"ok","sensor_id":"s","device_id":"d",
                "device_token_sealed":"00ff","broker":{"host":"h","port":1}})
        );
    }

    #[test]
    fn a_route_stored_before_proofs_reads_as_unproven_and_its_nonce_round_trips() {
        let old: Route = serde_json::from_str(r#"{"request_id":"r"}"#).unwrap();
        assert!(!old.proven);
        assert_eq!(old.nonce, None);
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"request_id":"r"}"#
        );
        let v2 = Route {
            proven: true,
            nonce: AnnounceNonce::parse("00112233445566778899aabbccddeeff"),
            ..old
        };
        let text = serde_json::to_string(&v2).unwrap();
        assert!(
            text.contains(r#""nonce":"00112233445566778899aabbccddeeff""#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Route>(&text).unwrap(), v2);
        let bad = r#"{"proven":true,"nonce":"not a nonce"}"#;
        assert!(serde_json::from_str::<Route>(bad).is_err());
    }

    #[test]
    fn a_bridged_ok_reply_carries_no_token_and_says_where_to_publish() {
        let r = Reply::Ok {
            sensor_id: "s".into(),
            device_id: "d".into(),
            how: OkHow::Bridged {
                bridged: true,
                data_topic: "onboard/data/s".into(),
            },
            request_id: None,
        };
        let v: serde_json::Value = serde_json::from_slice(&r.to_bytes()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"status":"ok","sensor_id":"s","device_id":"d","bridged":true,
                "data_topic":"onboard/data/s"})
        );
    }

    #[test]
    fn every_reply_code_goes_out_as_its_documented_word() {
        use ReplyCode::*;
        for code in [
            PayloadTooLarge,
            InvalidJson,
            NotAnObject,
            InvalidField,
            Unauthorized,
            Denied,
            RateLimited,
            RejectedByCloud,
        ] {
            let r = Reply::error("s", code, "m", None);
            let v: serde_json::Value = serde_json::from_slice(&r.to_bytes()).unwrap();
            assert_eq!(v["code"], code.as_str());
            assert_eq!(code.to_string(), code.as_str());
        }
        assert_eq!(RejectedByCloud.as_str(), "rejected_by_cloud");
        assert_eq!(PayloadTooLarge.as_str(), "payload_too_large");
    }

    #[test]
    fn request_id_is_omitted_when_absent() {
        let r = Reply::Pending {
            sensor_id: "s".into(),
            retry_after_s: 3,
            request_id: None,
        };
        let v: serde_json::Value = serde_json::from_slice(&r.to_bytes()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"status":"pending","sensor_id":"s","retry_after_s":3})
        );
    }

    #[test]
    fn response_topic_must_stay_in_own_namespace() {
        let p = "onboard/reply/{sensor_id}";
        assert!(allowed_response_topic(p, "a", "onboard/reply/a"));
        assert!(allowed_response_topic(p, "a", "onboard/reply/a/x1"));
        assert!(!allowed_response_topic(p, "a", "onboard/reply/ab"));
        assert!(!allowed_response_topic(p, "a", "onboard/reply/b"));
        assert!(!allowed_response_topic(p, "a", "onboard/reply/a/"));
        assert!(!allowed_response_topic(p, "a", "onboard/reply/a/#"));
        assert!(!allowed_response_topic(p, "a", "evil/topic"));
    }
}
