//! Which gateway bridges a device: one bridge per device, because Qubitro's broker
//! takes client id = device id, and two gateways logged in as one device knock each
//! other offline for ever.
//!
//! A gateway bridges a device whose `gateway_id` metadata is its own (every device it
//! creates), or one the operator adopted on it (`devices adopt`). A device a lookup
//! found made by another gateway keeps its readings buffered here: never forwarded,
//! dropped only by the buffer's usual bounds. Records written before the owner was
//! kept have none, and are this gateway's as before.

use super::Record;

impl Record {
    /// The device Qubitro issued (or a lookup found) is `owner`'s: its `gateway_id`
    /// metadata when not this gateway's (empty when not set), `None` when ours.
    pub fn owned_by(self, owner: Option<String>) -> Record {
        Record { owner, ..self }
    }

    /// The operator adopted the device on this gateway: from now on it bridges it,
    /// whoever made it.
    pub fn adopted(&self, now_ms: u64) -> Record {
        Record {
            adopted_ms: Some(now_ms),
            updated_ms: now_ms,
            ..self.clone()
        }
    }

    /// The gateway that bridges this device instead of this one (`Some("")`: one
    /// without `gateway_id` metadata, made by hand), until it is adopted here.
    pub fn owned_elsewhere(&self) -> Option<&str> {
        match (&self.owner, self.adopted_ms) {
            (Some(owner), None) => Some(owner),
            _ => None,
        }
    }

    /// Whether this gateway may forward the device's readings under its login.
    pub fn bridges_here(&self) -> bool {
        self.owned_elsewhere().is_none()
    }
}

/// The owner to record for a device whose `gateway_id` metadata is `listed`, as seen
/// by gateway `ours`: `None` when it is ours.
pub fn owner_of(listed: Option<&str>, ours: &str) -> Option<String> {
    match listed {
        Some(gw) if gw == ours => None,
        other => Some(other.unwrap_or_default().to_string()),
    }
}

/// How `devices show` and the log name the owner.
pub fn describe(owner: &str) -> String {
    if owner.is_empty() {
        "no gateway (its gateway_id metadata is not set)".into()
    } else {
        format!("gateway {owner}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Credentials, Token};
    use crate::onboarding::Origin;
    use crate::reply::Route;

    fn created(owner: Option<String>) -> Record {
        let creds = Credentials {
            device_id: "dev-1".into(),
            device_token: Token("tok$1".into()),
        };
        Record::pending(crate::announce::test_spec(), Route::default(), 1, 1)
            .created(creds, Origin::Adopted, 2)
            .unwrap()
            .owned_by(owner)
    }

    #[test]
    fn only_another_gateways_metadata_makes_a_device_owned_elsewhere() {
        assert_eq!(owner_of(Some("gw-a"), "gw-a"), None);
        assert_eq!(owner_of(Some("gw-b"), "gw-a").as_deref(), Some("gw-b"));
        assert_eq!(owner_of(None, "gw-a").as_deref(), Some(""), "made by hand");
    }

    #[test]
    fn a_device_owned_elsewhere_is_bridged_here_only_once_adopted() {
        let theirs = created(Some("gw-b".into()));
        assert_eq!(theirs.owned_elsewhere(), Some("gw-b"));
        assert!(!theirs.bridges_here());
        let adopted = theirs.adopted(9);
        assert!(adopted.bridges_here());
        assert_eq!((adopted.adopted_ms, adopted.updated_ms), (Some(9), 9));
        assert_eq!(
            adopted.owner.as_deref(),
            Some("gw-b"),
            "who made it is kept"
        );
        assert!(created(None).bridges_here());
    }

    #[test]
    fn the_owner_and_the_adoption_survive_the_stored_form() {
        for r in [
            created(Some("gw-b".into())),
            created(Some("gw-b".into())).adopted(3),
        ] {
            let back: Record = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
            assert_eq!(back, r);
        }
        let ours = serde_json::to_string(&created(None)).unwrap();
        assert!(
            !ours.contains("owner") && !ours.contains("adopted_ms"),
            "{ours}"
        );
    }
}
