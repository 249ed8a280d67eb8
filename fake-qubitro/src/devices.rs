//! Devices as the API knows them: the stored device and the one to plant, how a create body is
//! checked, how a device is shown in an answer, and the ids, tokens and times it is given.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Map, Value};
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::OffsetDateTime;

use crate::options::Endpoint;

pub(crate) const NAME_MAX: usize = 100;
const DESCRIPTION_MAX: usize = 500;
pub(crate) const TOKEN_LEN: usize = 40;
const AVATAR: &str = "https://static.qubitro.com/portal/device/avatar/default.png";
pub(crate) const NEVER_SEEN: &str = "0001-01-01T00:00:00Z";

/// A device as the fake stores it, credentials included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FakeDevice {
    pub id: String,
    pub token: String,
    pub name: String,
    pub description: String,
    pub source: String,
    pub brand: String,
    pub model: String,
    pub tags: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    /// When the fake created it (RFC 3339, UTC): what decides which of several devices of one
    /// sensor is the oldest. Answers carry it only with `created_at_field` on.
    pub created_at: String,
}

/// A device to plant before a test, as if another gateway (or a human) had made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDevice {
    pub name: String,
    pub description: String,
    pub source: String,
    pub brand: String,
    pub model: String,
    pub tags: Vec<String>,
    pub metadata: BTreeMap<String, String>,
}

impl NewDevice {
    /// A device with this name and the API's defaults for everything else.
    pub fn named(name: impl Into<String>) -> Self {
        NewDevice {
            name: name.into(),
            ..NewDevice::default()
        }
    }
}

impl Default for NewDevice {
    fn default() -> Self {
        NewDevice {
            name: String::new(),
            description: String::new(),
            source: "mqtt".to_owned(),
            brand: "Custom".to_owned(),
            model: "Custom".to_owned(),
            tags: Vec::new(),
            metadata: BTreeMap::new(),
        }
    }
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// When the request head arrived (before any fault or delay).
    pub at: Instant,
    /// Status answered; 0 while unanswered, and forever for a [`Fault::Hang`](crate::Fault::Hang).
    pub status: u16,
    /// `None` for paths and methods that are not one of the four device calls.
    pub endpoint: Option<Endpoint>,
}

/// Called with each device the fake creates (see [`FakeQubitro::on_device_created`](crate::FakeQubitro::on_device_created)).
pub type DeviceHook = Arc<dyn Fn(&FakeDevice) + Send + Sync>;

#[derive(Clone, Copy)]
pub(crate) enum Creds {
    None,
    DeviceCredentials,
    Metadata,
}

pub(crate) fn device_json(d: &FakeDevice, created_at: Option<&str>, creds: Creds) -> Value {
    let mut metadata: Map<String, Value> = d
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    if let Creds::Metadata = creds {
        metadata.insert("device_id".to_owned(), Value::String(d.id.clone()));
        metadata.insert("device_token".to_owned(), Value::String(d.token.clone()));
    }
    let mut obj = json!({
        "id": d.id,
        "name": d.name,
        "description": d.description,
        "source": d.source,
        "brand": d.brand,
        "model": d.model,
        "tags": d.tags,
        "metadata": metadata,
        "avatar": AVATAR,
        "last_seen": NEVER_SEEN,
    });
    if let Value::Object(o) = &mut obj {
        if let Some(created_at) = created_at {
            o.insert("created_at".to_owned(), json!(created_at));
        }
        if let Creds::DeviceCredentials = creds {
            o.insert(
                "device_credentials".to_owned(),
                json!({"device_id": d.id, "device_token": d.token}),
            );
        }
    }
    obj
}

/// Checks a create body the way the API documents it; the error names the offending field.
pub(crate) fn validate_create(body: &[u8]) -> Result<NewDevice, String> {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
        return Err("request body must be a JSON object".to_owned());
    };
    // null counts as absent, as most JSON APIs treat it.
    let field = |name: &str| obj.get(name).filter(|v| !v.is_null());
    let string = |name: &str| -> Result<Option<String>, String> {
        match field(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("{name} must be a string")),
        }
    };

    let name = string("name")?.ok_or("name is required")?;
    if name.trim().is_empty() {
        return Err("name must not be empty".to_owned());
    }
    if name.chars().count() > NAME_MAX {
        return Err(format!("name must be at most {NAME_MAX} characters"));
    }
    let description = string("description")?.ok_or("description is required")?;
    if description.chars().count() > DESCRIPTION_MAX {
        return Err(format!(
            "description must be at most {DESCRIPTION_MAX} characters"
        ));
    }
    let source = string("source")?.unwrap_or_else(|| "mqtt".to_owned());
    if source != "mqtt" && source != "http" {
        return Err("source must be one of \"mqtt\", \"http\"".to_owned());
    }
    let tags = match field("tags") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, t)| match t {
                Value::String(s) if is_tag(s) => Ok(s.clone()),
                Value::String(_) => Err(format!(
                    "tags[{i}] must be letters, digits and underscores only"
                )),
                _ => Err(format!("tags[{i}] must be a string")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("tags must be an array of strings".to_owned()),
    };
    let brand = string("brand")?.unwrap_or_else(|| "Custom".to_owned());
    let model = string("model")?.unwrap_or_else(|| "Custom".to_owned());
    let metadata = match field("metadata") {
        None => BTreeMap::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(format!("metadata.{k} must be a string")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("metadata must be an object".to_owned()),
    };
    Ok(NewDevice {
        name,
        description,
        source,
        brand,
        model,
        tags,
        metadata,
    })
}

fn is_tag(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// 40 characters, letters and digits with one `$`, because real tokens can contain `$` and a
/// client that pastes them into a shell or URL unescaped should fail in tests, not in the field.
pub(crate) fn device_token() -> String {
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let dollar = fastrand::usize(..TOKEN_LEN);
    (0..TOKEN_LEN)
        .map(|i| {
            if i == dollar {
                '$'
            } else {
                char::from(ALNUM[fastrand::usize(..ALNUM.len())])
            }
        })
        .collect()
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SS.ffffffZ`. Microseconds: devices made in the
/// same second still have distinct, ordered times.
pub(crate) fn rfc3339_now() -> String {
    // Fixed width, so the strings also sort as the instants do.
    const FORMAT: &[BorrowedFormatItem<'_>] =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
    OffsetDateTime::now_utc()
        .format(FORMAT)
        .expect("a UTC time between years 0 and 9999 always formats")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use crate::{CredentialsAt, FakeOptions};
    use serde_json::json;

    #[tokio::test]
    async fn issued_ids_are_uuid_v4_and_tokens_are_40_chars_with_a_dollar() {
        let fake = start(FakeOptions::default()).await;
        let created = json_of(create(&fake, sensor("s", json!({}))).await).await;
        let id = created["data"]["id"].as_str().expect("id");
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        let token = &fake.devices()[0].token;
        assert_eq!(token.len(), TOKEN_LEN);
        assert_eq!(token.matches('$').count(), 1);
        assert!(token.chars().all(|c| c == '$' || c.is_ascii_alphanumeric()));
        assert_eq!(created["data"]["brand"], "Custom");
        assert_eq!(created["data"]["model"], "Custom");
    }

    #[tokio::test]
    async fn credentials_in_metadata_are_merged_with_user_metadata() {
        let fake = start(FakeOptions {
            credentials_at: CredentialsAt::Metadata,
            create_status: 200,
            ..FakeOptions::default()
        })
        .await;
        let r = create(&fake, sensor("s", json!({"gw": "a"}))).await;
        assert_eq!(r.status(), 200);
        let data = json_of(r).await["data"].clone();
        let stored = &fake.devices()[0];
        assert_eq!(
            data["metadata"],
            json!({"gw": "a", "device_id": stored.id, "device_token": stored.token})
        );
        assert!(data.get("device_credentials").is_none());
        assert_eq!(
            stored.metadata.len(),
            1,
            "credentials are not stored as user metadata"
        );
    }

    #[tokio::test]
    async fn invalid_create_bodies_are_400_naming_the_field() {
        let fake = start(FakeOptions::default()).await;
        let ok_name = "n".repeat(NAME_MAX);
        assert_eq!(
            create(&fake, sensor(&ok_name, json!({}))).await.status(),
            201
        );

        let cases = [
            (sensor(&"n".repeat(NAME_MAX + 1), json!({})), "name"),
            (
                json!({"name": "s", "description": "", "tags": ["has space"]}),
                "tags[0]",
            ),
            (json!({"name": "s"}), "description"),
            (
                json!({"name": "s", "description": "", "source": "lora"}),
                "source",
            ),
            (
                json!({"name": "s", "description": "", "metadata": {"n": 1}}),
                "metadata.n",
            ),
            (json!(["not", "an", "object"]), "JSON object"),
        ];
        for (body, field) in cases {
            let r = create(&fake, body.clone()).await;
            assert_eq!(r.status(), 400, "{body}");
            let message = json_of(r).await["message"]
                .as_str()
                .expect("message")
                .to_owned();
            assert!(message.contains(field), "{message:?} should name {field}");
        }
        assert_eq!(fake.devices().len(), 1);
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 27, "{t}");
        assert_eq!(&t[19..20], ".", "microseconds: {t}");
        assert!(t.ends_with('Z') && &t[10..11] == "T", "{t}");
        assert!(t.as_str() > "2024-01-01", "{t}");
    }
}
