//! One device's answer read without HTTP: the envelope, the credentials in any
//! documented place, the error message a sensor or log line may see.

use serde_json::Value;

use crate::reply::{Credentials, Token};

/// Longest cloud message passed on to a sensor or a log line.
pub(super) const MAX_MESSAGE: usize = 200;

/// The human message of an error body, shortened; bodies are JSON in Qubitro's docs.
pub(super) fn message_of(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<Value>(body) {
        Ok(v) => v
            .get("message")
            .or_else(|| v.get("error"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    let text = if text.is_empty() {
        "no message".to_string()
    } else {
        text
    };
    text.chars().take(MAX_MESSAGE).collect()
}

/// `{success, action, status, message, data}` → data; a bare object stays as it is.
fn unwrap_envelope(v: &Value) -> &Value {
    match v.get("data") {
        Some(data) if v.get("success").is_some() || v.get("status").is_some() => data,
        _ => v,
    }
}

/// The `data` of a success answer (or the bare object), refusing an envelope that
/// says `success: false` and anything that is not an object.
pub(super) fn success_data(v: &Value) -> Result<&Value, String> {
    if v.get("success").is_some_and(|s| s != &Value::Bool(true)) {
        return Err("the envelope does not say success".into());
    }
    let data = unwrap_envelope(v);
    if data.is_object() {
        Ok(data)
    } else {
        Err("not a JSON object".into())
    }
}

/// Credentials under `device_credentials` (newer docs) or `metadata` (older docs).
pub(super) fn credentials_in(data: &Value) -> Option<Credentials> {
    for key in ["device_credentials", "metadata", "credentials"] {
        if let Some(c) = data.get(key) {
            let id = c.get("device_id").and_then(Value::as_str);
            let token = c.get("device_token").and_then(Value::as_str);
            if let (Some(id), Some(token)) = (id, token) {
                if !id.is_empty() && !token.is_empty() {
                    return Some(Credentials {
                        device_id: id.to_string(),
                        device_token: Token(token.to_string()),
                    });
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn credentials_are_found_in_every_documented_shape() {
        let wrapped_dc = serde_json::json!({"success":true,"status":201,"data":
            {"id":"d1","device_credentials":{"device_id":"d1","device_token":"t1"},"metadata":{"k":"v"}}});
        let wrapped_md = serde_json::json!({"success":true,"status":201,"data":
            {"id":"d2","metadata":{"device_id":"d2","device_token":"t2"}}});
        let bare = serde_json::json!({"id":"d3","device_credentials":{"device_id":"d3","device_token":"t3"}});
        for (v, id) in [(wrapped_dc, "d1"), (wrapped_md, "d2"), (bare, "d3")] {
            let c = credentials_in(unwrap_envelope(&v)).unwrap();
            assert_eq!(c.device_id, id);
        }
        let none = serde_json::json!({"id":"d4","metadata":{"k":"v"}});
        assert!(credentials_in(unwrap_envelope(&none)).is_none());
    }

    #[test]
    fn error_messages_are_short() {
        let long = format!(r#"{{"message":"{}"}}"#, "x".repeat(1000));
        assert_eq!(message_of(long.as_bytes()).len(), MAX_MESSAGE);
        assert_eq!(message_of(b"<html>"), "no message");
    }

    #[test]
    fn get_and_create_answers_that_cannot_be_read_are_errors() {
        assert!(success_data(&json!({"success": false, "status": 200, "data": {}})).is_err());
        assert!(success_data(&json!({"success": true, "status": 200, "data": []})).is_err());
        assert!(success_data(&json!([1])).is_err());
        assert!(success_data(&json!({"id": "d"})).is_ok());
    }
}
