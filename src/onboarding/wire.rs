//! The on-disk form. Records written by earlier versions (`"phase"` with a
//! `delivered` flag and a string origin) are read as the same states, so an
//! upgrade on a gateway loses no sensor.

use super::*;

#[derive(Serialize, Deserialize)]
pub(super) struct Wire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<State>,
    /// Before 0.2: the state, as `{"phase": "created", "delivered": bool, …}`.
    #[serde(default, skip_serializing)]
    phase: Option<LegacyPhase>,
    /// Before 0.2: "created" or "adopted".
    #[serde(default, skip_serializing)]
    origin: Option<Origin>,
    spec: DeviceSpec,
    #[serde(default)]
    route: Route,
    #[serde(default)]
    generation: u64,
    attempts: u32,
    next_attempt_ms: u64,
    first_seen_ms: u64,
    updated_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    bridged: bool,
    /// Absent in records written before it was stored: derived once on read.
    #[serde(default)]
    provenance: Option<Provenance>,
    /// Before 0.3 a mark in discovery's own tree said it (still honoured there).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    retired: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    adopted_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
enum LegacyPhase {
    Pending,
    Creating,
    Created {
        device_id: String,
        device_token: Token,
        delivered: bool,
    },
}

impl TryFrom<Wire> for Record {
    type Error = String;

    fn try_from(w: Wire) -> Result<Record, String> {
        let state = match (w.state, w.phase) {
            (Some(s), _) => s,
            (None, Some(LegacyPhase::Pending)) => State::Pending,
            (None, Some(LegacyPhase::Creating)) => State::Creating,
            (
                None,
                Some(LegacyPhase::Created {
                    device_id,
                    device_token,
                    delivered,
                }),
            ) => {
                let credentials = Credentials {
                    device_id,
                    device_token,
                };
                let origin = w.origin.unwrap_or(Origin::Created);
                if delivered {
                    State::Delivered {
                        credentials,
                        origin,
                    }
                } else {
                    State::Created {
                        credentials,
                        origin,
                    }
                }
            }
            (None, None) => return Err("record without a state".into()),
        };
        if let Some(c) = match &state {
            State::Created { credentials, .. } | State::Delivered { credentials, .. } => {
                Some(credentials)
            }
            _ => None,
        } {
            if c.device_id.is_empty() || c.device_token.0.is_empty() {
                return Err("credentials with an empty device id or token".into());
            }
        }
        let provenance = w.provenance.unwrap_or_else(|| Provenance::derive(&w.spec));
        Ok(Record {
            provenance,
            retired: w.retired,
            owner: w.owner,
            adopted_ms: w.adopted_ms,
            state,
            spec: w.spec,
            route: w.route,
            generation: w.generation,
            attempts: w.attempts,
            next_attempt_ms: w.next_attempt_ms,
            first_seen_ms: w.first_seen_ms,
            updated_ms: w.updated_ms,
            last_error: w.last_error,
            bridged: w.bridged,
        })
    }
}

impl From<Record> for Wire {
    fn from(r: Record) -> Wire {
        Wire {
            state: Some(r.state),
            phase: None,
            origin: None,
            spec: r.spec,
            route: r.route,
            generation: r.generation,
            attempts: r.attempts,
            next_attempt_ms: r.next_attempt_ms,
            first_seen_ms: r.first_seen_ms,
            updated_ms: r.updated_ms,
            last_error: r.last_error,
            bridged: r.bridged,
            provenance: Some(r.provenance),
            retired: r.retired,
            owner: r.owner,
            adopted_ms: r.adopted_ms,
        }
    }
}
