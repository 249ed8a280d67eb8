//! The HTTP half of the Qubitro client: requests under the in-flight limit, and
//! each status or transport failure classed as a [`CloudError`].

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Semaphore;

use super::answer::{credentials_in, message_of, success_data};
use super::dates::parse_retry_after;
use super::error::{CloudError, DeleteError, Deleted};
use super::list::{Found, ListReader};
use crate::announce::DeviceSpec;
use crate::config::{QubitroConfig, Secret};
use crate::metrics::{self, CloudOutcome};
use crate::reply::Credentials;

/// The Qubitro client. One per process: reqwest pools connections.
#[derive(Clone)]
pub struct Cloud {
    http: reqwest::Client,
    devices_url: String,
    api_key: Secret,
    in_flight: Arc<Semaphore>,
    /// `qubitro.retry_max_ms`: no Retry-After, however large, makes us wait longer.
    retry_max: Duration,
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
            retry_max: Duration::from_millis(cfg.retry_max_ms),
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
        classify(status, &headers, &body, true, self.retry_max)?;
        let value = parse_json(&body, true)?;
        // From here on the server said it created something: every failure must
        // say `maybe_created`, or the engine would create a second device.
        let data = success_data(&value).map_err(|reason| CloudError::Retryable {
            reason: format!("create answer unreadable: {reason}"),
            retry_after: None,
            maybe_created: true,
        })?;
        let id = data
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty());
        if let Some(creds) = credentials_in(data) {
            if id.is_some_and(|id| id != creds.device_id) {
                return Err(CloudError::Retryable {
                    reason: "create answer carries credentials of another device id".into(),
                    retry_after: None,
                    maybe_created: true,
                });
            }
            return Ok(creds);
        }
        match id {
            // The device exists now, whatever the GET says: a 404 there is
            // read-after-write lag, not a rejection of the sensor.
            Some(id) => self.get(id).await.map_err(|e| match e {
                CloudError::Operator { status } => CloudError::Operator { status },
                CloudError::Retryable {
                    reason,
                    retry_after,
                    ..
                } => CloudError::Retryable {
                    reason: format!("device created, reading it back failed: {reason}"),
                    retry_after,
                    maybe_created: true,
                },
                CloudError::Rejected { status, .. } => CloudError::Retryable {
                    reason: format!("device created, reading it back answered HTTP {status}"),
                    retry_after: None,
                    maybe_created: true,
                },
            }),
            None => Err(CloudError::Retryable {
                reason: "create answered success without a device id".into(),
                retry_after: None,
                maybe_created: true,
            }),
        }
    }

    /// GET …/devices?metadata=sensor_id:ID (every page) → the id of the sensor's
    /// device, if any.
    ///
    /// Fails closed: `Ok(None)` only when every page was understood and no item is
    /// the sensor's; anything unreadable is `Retryable`, because "not found" leads
    /// to a create, and a wrong "not found" to a duplicate device. When several
    /// devices match, the oldest is adopted (see `list::choose_oldest`).
    pub async fn find_by_sensor(&self, sensor_id: &str) -> Result<Option<String>, CloudError> {
        Ok(self.find_device(sensor_id).await?.map(|f| f.id))
    }

    /// [`Self::find_by_sensor`], with the gateway the device's metadata names.
    pub async fn find_device(&self, sensor_id: &str) -> Result<Option<Found>, CloudError> {
        // sensor ids are [A-Za-z0-9._:-] only, so only ':' needs escaping.
        let base = format!(
            "{}?metadata=sensor_id%3A{}",
            self.devices_url,
            sensor_id.replace(':', "%3A")
        );
        let unreadable = |reason: String| CloudError::Retryable {
            reason: format!("device list unreadable: {reason}"),
            retry_after: None,
            maybe_created: false,
        };
        let mut reader = ListReader::default();
        let mut page = Some(1u64);
        while let Some(n) = page {
            let url = if n == 1 {
                base.clone()
            } else {
                format!("{base}&page={n}")
            };
            let (status, headers, body) = self.send(self.http.get(url), false).await?;
            classify(status, &headers, &body, false, self.retry_max)?;
            let value = parse_json(&body, false)?;
            page = reader.read(&value).map_err(unreadable)?;
        }
        reader.finish_found(sensor_id).map_err(unreadable)
    }

    /// GET …/devices/{id}: the one call that returns a device's credentials.
    pub async fn get(&self, device_id: &str) -> Result<Credentials, CloudError> {
        let req = self.http.get(format!("{}/{}", self.devices_url, device_id));
        let (status, headers, body) = self.send(req, false).await?;
        classify(status, &headers, &body, false, self.retry_max)?;
        let value = parse_json(&body, false)?;
        let unreadable = |reason: &str| CloudError::Retryable {
            reason: format!("device answer unreadable: {reason}"),
            retry_after: None,
            maybe_created: false,
        };
        let data = success_data(&value).map_err(|r| unreadable(&r))?;
        let creds = credentials_in(data).ok_or_else(|| unreadable("no credentials"))?;
        // Never hand a sensor another device's token.
        if creds.device_id != device_id {
            return Err(unreadable("credentials of another device id"));
        }
        Ok(creds)
    }

    /// DELETE …/devices/{id}. A 404 is [`Deleted::AlreadyGone`]: the device the
    /// caller wants gone is gone.
    pub async fn delete(&self, device_id: &str) -> Result<Deleted, DeleteError> {
        let req = self
            .http
            .delete(format!("{}/{}", self.devices_url, device_id));
        let device_id = device_id.to_string();
        let (status, _, body) = match self.send(req, false).await {
            Ok(answer) => answer,
            Err(e) => {
                return Err(DeleteError::Unavailable {
                    device_id,
                    reason: e.to_string(),
                })
            }
        };
        // Shown to the operator: never echo the key, should an answer quote it.
        let message = || {
            let m = message_of(&body);
            match self.api_key.expose() {
                "" => m,
                key => m.replace(key, "<redacted>"),
            }
        };
        match status.as_u16() {
            _ if status.is_success() => Ok(Deleted::Now),
            404 => Ok(Deleted::AlreadyGone),
            401 => Err(DeleteError::Unauthorized {
                device_id,
                message: message(),
            }),
            403 => Err(DeleteError::Forbidden {
                device_id,
                message: message(),
            }),
            status @ (400..=499) if status != 408 && status != 429 => Err(DeleteError::Refused {
                device_id,
                status,
                message: message(),
            }),
            status => Err(DeleteError::Unavailable {
                device_id,
                reason: format!("HTTP {status}: {}", message()),
            }),
        }
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
        let transport = |e: &reqwest::Error| {
            metrics::cloud_request(CloudOutcome::Transport, started.elapsed());
            transport_error(e, is_create)
        };
        let resp = match result {
            Ok(r) => r,
            Err(e) => return Err(transport(&e)),
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(|e| transport(&e))?;
        metrics::cloud_request(CloudOutcome::of_status(status.as_u16()), started.elapsed());
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
    retry_max: Duration,
) -> Result<(), CloudError> {
    let code = status.as_u16();
    if status.is_success() {
        return Ok(());
    }
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| parse_retry_after(s, SystemTime::now(), retry_max));
    match code {
        // 1xx/3xx reaching us here (reqwest follows the usual redirects) are not
        // an answer about the sensor: try again rather than reject it.
        100..=199 | 300..=399 | 408 | 429 | 500..=599 => Err(CloudError::Retryable {
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

fn parse_json(body: &Bytes, is_create: bool) -> Result<Value, CloudError> {
    serde_json::from_slice(body).map_err(|_| CloudError::Retryable {
        reason: "unreadable success answer".into(),
        retry_after: None,
        maybe_created: is_create,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(60);

    #[test]
    fn classify_clamps_retry_after() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "18446744073709551615".parse().unwrap());
        let e = classify(StatusCode::TOO_MANY_REQUESTS, &h, &Bytes::new(), true, MAX).unwrap_err();
        assert_eq!(
            e,
            CloudError::Retryable {
                reason: "HTTP 429".into(),
                retry_after: Some(MAX),
                maybe_created: false
            }
        );
    }
}
