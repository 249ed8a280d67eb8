//! The Qubitro REST client: create a device, find a sensor's device, fetch credentials.
//!
//! Every answer is sorted into the error class that decides what happens next
//! ([`CloudError`]), and every response shape Qubitro's docs show is accepted
//! (wrapped or bare; credentials under `device_credentials` or `metadata`).
//! The API key is only ever put in the Authorization header; no error text carries it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::announce::DeviceSpec;
use crate::config::{QubitroConfig, Secret};
use crate::reply::{Credentials, Token};

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

/// The Qubitro client. One per process: reqwest pools connections.
#[derive(Clone)]
pub struct Cloud {
    http: reqwest::Client,
    devices_url: String,
    api_key: Secret,
    in_flight: Arc<Semaphore>,
}

#[derive(Serialize)]
struct CreateBody<'a> {
    name: &'a str,
    description: &'a str,
    source: &'static str,
    tags: &'a [String],
    brand: &'a str,
    model: &'a str,
    metadata: &'a std::collections::BTreeMap<String, String>,
}

/// Longest cloud message passed on to a sensor or a log line.
const MAX_MESSAGE: usize = 200;

impl Cloud {
    pub fn new(cfg: &QubitroConfig) -> anyhow::Result<Cloud> {
        // Always our own rustls config (ring + webpki roots): reqwest's default would
        // need the system's CA store even for an http:// fake, and fail without it.
        let builder = reqwest::Client::builder()
            .tls_backend_preconfigured(crate::tls::api_tls(&cfg.ca_file)?)
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .timeout(Duration::from_millis(cfg.request_timeout_ms))
            .pool_max_idle_per_host(cfg.max_in_flight)
            .tcp_nodelay(true)
            .user_agent(concat!("onboardd/", env!("CARGO_PKG_VERSION")));
        let http = builder.build()?;
        Ok(Cloud {
            http,
            devices_url: format!("{}/v2/projects/{}/devices", cfg.base_url, cfg.project_id),
            api_key: cfg.api_key.clone(),
            in_flight: Arc::new(Semaphore::new(cfg.max_in_flight)),
        })
    }

    /// POST …/devices. Credentials come from the create response when it holds them,
    /// else from a GET of the new device.
    pub async fn create(&self, spec: &DeviceSpec) -> Result<Credentials, CloudError> {
        let body = CreateBody {
            name: &spec.name,
            description: &spec.description,
            source: "mqtt",
            tags: &spec.tags,
            brand: &spec.brand,
            model: &spec.model,
            metadata: &spec.metadata,
        };
        let req = self.http.post(&self.devices_url).json(&body);
        let (status, headers, body) = self.send(req, true).await?;
        classify(status, &headers, &body, true)?;
        let value = parse_json(&body, true)?;
        let data = unwrap_envelope(&value);
        if let Some(creds) = credentials_in(data) {
            return Ok(creds);
        }
        match data.get("id").and_then(Value::as_str) {
            Some(id) => self.get(id).await,
            None => Err(CloudError::Retryable {
                reason: "create answered success without a device id".into(),
                retry_after: None,
                maybe_created: true,
            }),
        }
    }

    /// GET …/devices?metadata=sensor_id:ID → the id of the sensor's device, if any.
    /// When several exist (made before onboardd, or by hand), the oldest is adopted.
    pub async fn find_by_sensor(&self, sensor_id: &str) -> Result<Option<String>, CloudError> {
        // sensor ids are [A-Za-z0-9._:-] only, so only ':' needs escaping.
        let url = format!(
            "{}?metadata=sensor_id%3A{}",
            self.devices_url,
            sensor_id.replace(':', "%3A")
        );
        let req = self.http.get(url);
        let (status, headers, body) = self.send(req, false).await?;
        classify(status, &headers, &body, false)?;
        let value = parse_json(&body, false)?;
        let items = match unwrap_envelope(&value) {
            Value::Array(items) => items.clone(),
            other => other
                .get("devices")
                .or_else(|| other.get("items"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        };
        // The filter is checked again here: a server that ignored it must not make us
        // adopt another sensor's device.
        let matching: Vec<&Value> = items
            .iter()
            .filter(|d| {
                d.get("metadata")
                    .and_then(|m| m.get("sensor_id"))
                    .and_then(Value::as_str)
                    == Some(sensor_id)
            })
            .collect();
        if matching.len() > 1 {
            tracing::warn!(
                sensor_id,
                count = matching.len(),
                "several Qubitro devices carry this sensor id; adopting the oldest"
            );
        }
        Ok(matching
            .last()
            .and_then(|d| d.get("id").or_else(|| d.get("device_id")))
            .and_then(Value::as_str)
            .map(str::to_string))
    }

    /// GET …/devices/{id}: the one call that returns a device's credentials.
    pub async fn get(&self, device_id: &str) -> Result<Credentials, CloudError> {
        let req = self.http.get(format!("{}/{}", self.devices_url, device_id));
        let (status, headers, body) = self.send(req, false).await?;
        classify(status, &headers, &body, false)?;
        let value = parse_json(&body, false)?;
        credentials_in(unwrap_envelope(&value)).ok_or_else(|| CloudError::Retryable {
            reason: "device answer without credentials".into(),
            retry_after: None,
            maybe_created: false,
        })
    }

    /// DELETE …/devices/{id}.
    pub async fn delete(&self, device_id: &str) -> Result<(), CloudError> {
        let req = self
            .http
            .delete(format!("{}/{}", self.devices_url, device_id));
        let (status, headers, body) = self.send(req, false).await?;
        classify(status, &headers, &body, false)
    }

    /// Sends one request under the in-flight limit and reads the whole body.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        is_create: bool,
    ) -> Result<(StatusCode, HeaderMap, Bytes), CloudError> {
        let _permit = self
            .in_flight
            .acquire()
            .await
            .expect("the in-flight semaphore is never closed");
        let started = Instant::now();
        let result = req.bearer_auth(self.api_key.expose()).send().await;
        let resp = match result {
            Ok(r) => r,
            Err(e) => return Err(transport_error(&e, is_create)),
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| transport_error(&e, is_create))?;
        crate::metrics::cloud_latency(started.elapsed());
        Ok((status, headers, body))
    }
}

fn transport_error(e: &reqwest::Error, is_create: bool) -> CloudError {
    // A connect error means the request never left; anything later may have created it.
    use crate::tls::CertProblem;
    let problem = crate::tls::cert_problem(e);
    let reason = if problem == Some(CertProblem::NotValidYet) {
        "TLS certificate not valid yet: the clock is probably not synced (no RTC until NTP runs)"
            .to_string()
    } else if problem.is_some() {
        "the API's TLS certificate is not trusted (a proxy? see qubitro.ca_file)".to_string()
    } else if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "connection failed".to_string()
    };
    CloudError::Retryable {
        reason,
        retry_after: None,
        maybe_created: is_create && !e.is_connect(),
    }
}

fn classify(
    status: StatusCode,
    headers: &HeaderMap,
    body: &Bytes,
    is_create: bool,
) -> Result<(), CloudError> {
    let code = status.as_u16();
    if status.is_success() {
        return Ok(());
    }
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    match code {
        408 | 429 | 500..=599 => Err(CloudError::Retryable {
            reason: format!("HTTP {code}"),
            retry_after,
            maybe_created: is_create && code != 429,
        }),
        401 | 403 => Err(CloudError::Operator { status: code }),
        404 if !is_create => Err(CloudError::Rejected {
            status: code,
            message: message_of(body),
        }),
        404 => Err(CloudError::Operator { status: code }),
        _ => Err(CloudError::Rejected {
            status: code,
            message: message_of(body),
        }),
    }
}

/// The human message of an error body, shortened; bodies are JSON in Qubitro's docs.
fn message_of(body: &[u8]) -> String {
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

fn parse_json(body: &Bytes, is_create: bool) -> Result<Value, CloudError> {
    serde_json::from_slice(body).map_err(|_| CloudError::Retryable {
        reason: "unreadable success answer".into(),
        retry_after: None,
        maybe_created: is_create,
    })
}

/// `{success, action, status, message, data}` → data; a bare object stays as it is.
fn unwrap_envelope(v: &Value) -> &Value {
    match v.get("data") {
        Some(data) if v.get("success").is_some() || v.get("status").is_some() => data,
        _ => v,
    }
}

/// Credentials under `device_credentials` (newer docs) or `metadata` (older docs).
fn credentials_in(data: &Value) -> Option<Credentials> {
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
}
