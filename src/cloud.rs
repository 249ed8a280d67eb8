//! The Qubitro REST client: create a device, find a sensor's device, fetch credentials.
//!
//! Every answer is sorted into the error class that decides what happens next
//! ([`CloudError`]), and every response shape Qubitro's docs show is accepted
//! (wrapped or bare; credentials under `device_credentials` or `metadata`).
//! The API key is only ever put in the Authorization header; no error text carries it.
//!
//! Reading fails closed: an answer that cannot be fully understood is `Retryable`,
//! never "not found" or "rejected", because the engine creates a device when the
//! lookup finds none, and every wrong "none" is a duplicate that costs money.
//! The parsing is pure (`ListReader`, `parse_retry_after`) and unit-tested here.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

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
    /// devices match, the oldest is adopted (see [`choose_oldest`]).
    pub async fn find_by_sensor(&self, sensor_id: &str) -> Result<Option<String>, CloudError> {
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
        reader.finish(sensor_id).map_err(unreadable)
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

    /// DELETE …/devices/{id}.
    pub async fn delete(&self, device_id: &str) -> Result<(), CloudError> {
        let req = self
            .http
            .delete(format!("{}/{}", self.devices_url, device_id));
        let (status, headers, body) = self.send(req, false).await?;
        classify(status, &headers, &body, false, self.retry_max)
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

/// The `data` of a success answer (or the bare object), refusing an envelope that
/// says `success: false` and anything that is not an object.
fn success_data(v: &Value) -> Result<&Value, String> {
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

/// More pages than this and the lookup gives up (Retryable): a filtered list of one
/// sensor's devices has one page, so a hundred means the filter was ignored.
const MAX_PAGES: u64 = 100;

/// One page of the device list, read.
#[derive(Debug, Clone, PartialEq)]
struct ListPage {
    items: Vec<ListItem>,
    paging: Paging,
}

/// What a page says about the pages after it.
#[derive(Debug, Clone, PartialEq)]
enum Paging {
    /// No pagination field: this is the whole list.
    Single,
    /// `page` of `total_pages` (1-based).
    Pages { page: u64, total_pages: u64 },
    /// `next`/`next_page`, or `has_more` with a `page`: the number of the next page,
    /// `None` when the answer says there is none.
    Next(Option<u64>),
}

impl Paging {
    /// The page to request after page `requested`, or `None` when the list is complete.
    fn next_page(&self, requested: u64) -> Result<Option<u64>, String> {
        let next = match *self {
            Paging::Single | Paging::Next(None) => return Ok(None),
            Paging::Pages { page, total_pages } => {
                if page != requested {
                    return Err(format!("asked for page {requested}, got page {page}"));
                }
                if total_pages > MAX_PAGES {
                    return Err(format!(
                        "{total_pages} pages (at most {MAX_PAGES} are read)"
                    ));
                }
                if page >= total_pages {
                    return Ok(None);
                }
                page + 1
            }
            Paging::Next(Some(n)) => {
                if n <= requested {
                    return Err(format!("the page after {requested} is said to be {n}"));
                }
                n
            }
        };
        if next > MAX_PAGES {
            return Err(format!("more than {MAX_PAGES} pages"));
        }
        Ok(Some(next))
    }
}

/// Reads the pages of one lookup in order: the pure half of `find_by_sensor`.
#[derive(Debug, Default)]
struct ListReader {
    items: Vec<ListItem>,
    /// The page the next answer is for (0 before the first).
    requested: u64,
    total_pages: Option<u64>,
}

impl ListReader {
    /// Takes the answer for the page asked for; returns the next page to ask for.
    fn read(&mut self, answer: &Value) -> Result<Option<u64>, String> {
        self.requested = self.requested.max(1);
        let page = parse_list_page(answer, self.requested)?;
        match (page.paging.clone(), self.total_pages) {
            (Paging::Pages { total_pages, .. }, None) => self.total_pages = Some(total_pages),
            (Paging::Pages { total_pages, .. }, Some(t)) if t == total_pages => {}
            (_, None) => {}
            _ => return Err("the pagination changed while the list was read".into()),
        }
        self.items.extend(page.items);
        let next = page.paging.next_page(self.requested)?;
        if let Some(n) = next {
            self.requested = n;
        }
        Ok(next)
    }

    fn finish(self, sensor_id: &str) -> Result<Option<String>, String> {
        match_sensor(&self.items, sensor_id)
    }
}

/// A list item: a device id, its metadata, its creation time if given.
#[derive(Debug, Clone, PartialEq)]
struct ListItem {
    id: String,
    /// `created_at`/`createdAt` as (unix seconds, nanoseconds); `None` when absent
    /// or not RFC 3339.
    created: Option<(i64, u32)>,
    metadata: serde_json::Map<String, Value>,
}

/// Reads one page of `GET …/devices`. Accepted: the array bare; in the envelope
/// `{"success", "status", "data": [..]}`; under `devices` or `items`, at top level
/// or inside `data`. Pagination fields are read next to the list or at top level.
/// Anything else is an error naming what could not be read: never "no devices".
fn parse_list_page(v: &Value, requested: u64) -> Result<ListPage, String> {
    let (list, holders) = list_in(v)?;
    let items = list.iter().map(parse_item).collect::<Result<Vec<_>, _>>()?;
    let paging = paging_in(&holders, requested)?;
    Ok(ListPage { items, paging })
}

/// The list array and the objects that may carry its pagination fields.
fn list_in(v: &Value) -> Result<(&Vec<Value>, Vec<&Value>), String> {
    let obj = match v {
        Value::Array(list) => return Ok((list, vec![])),
        Value::Object(o) => o,
        _ => return Err("the answer is neither a list nor an object".into()),
    };
    let enveloped = obj.contains_key("success") || obj.contains_key("status");
    if enveloped && v.get("success").is_some_and(|s| s != &Value::Bool(true)) {
        return Err("the envelope does not say success".into());
    }
    match obj.get("data") {
        Some(Value::Array(list)) if enveloped => return Ok((list, vec![v])),
        Some(data @ Value::Object(_)) if enveloped => {
            return Ok((named_list(data)?, vec![data, v]));
        }
        Some(_) if enveloped => return Err("unrecognised data in the envelope".into()),
        _ => {}
    }
    Ok((named_list(v)?, vec![v]))
}

/// The array under exactly one of `devices` / `items`.
fn named_list(v: &Value) -> Result<&Vec<Value>, String> {
    match (v.get("devices"), v.get("items")) {
        (Some(Value::Array(list)), None) | (None, Some(Value::Array(list))) => Ok(list),
        (None, None) => Err("unrecognised list shape".into()),
        (Some(_), Some(_)) => Err("both devices and items in one answer".into()),
        _ => Err("devices/items is not a list".into()),
    }
}

fn parse_item(item: &Value) -> Result<ListItem, String> {
    let Value::Object(o) = item else {
        return Err("list item is not an object".into());
    };
    let Some(Value::Object(metadata)) = o.get("metadata") else {
        return Err("list item without metadata".into());
    };
    let id = ["id", "device_id"]
        .iter()
        .find_map(|k| o.get(*k).and_then(Value::as_str).filter(|s| !s.is_empty()))
        .ok_or("list item without a device id")?;
    let created = ["created_at", "createdAt"]
        .iter()
        .find_map(|k| o.get(*k).and_then(Value::as_str))
        .and_then(parse_rfc3339);
    Ok(ListItem {
        id: id.to_string(),
        created,
        metadata: metadata.clone(),
    })
}

fn paging_in(holders: &[&Value], requested: u64) -> Result<Paging, String> {
    const KEYS: [&str; 4] = ["total_pages", "next_page", "next", "has_more"];
    let Some(h) = holders
        .iter()
        .find(|h| KEYS.iter().any(|k| h.get(*k).is_some()))
    else {
        return Ok(Paging::Single);
    };
    let number = |key: &str| -> Result<Option<u64>, String> {
        match h.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or(format!("{key} is not a page number")),
            Some(Value::String(s)) if s.parse::<u64>().is_ok() => Ok(s.parse().ok()),
            Some(_) => Err(format!("{key} is not a page number")),
        }
    };
    let page = number("page")?;
    if let Some(total_pages) = number("total_pages")? {
        return Ok(Paging::Pages {
            page: page.unwrap_or(requested),
            total_pages,
        });
    }
    let has_more = match h.get("has_more") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err("has_more is not true or false".into()),
    };
    if let Some(p) = page.filter(|p| *p != requested) {
        return Err(format!("asked for page {requested}, got page {p}"));
    }
    let next = match number("next_page")? {
        Some(n) => Some(n),
        None => next_link(h.get("next"))?,
    };
    match (next, has_more) {
        (Some(n), Some(false)) => Err(format!("has_more is false but the next page is {n}")),
        (Some(n), _) => Ok(Paging::Next(Some(n))),
        (None, Some(true)) => match page {
            Some(p) => Ok(Paging::Next(Some(p.saturating_add(1)))),
            None => Err("has_more without a page number".into()),
        },
        (None, _) => Ok(Paging::Next(None)),
    }
}

/// `next` as a page number, or a link whose query holds `page=N`; null/false/"" is
/// the end. A cursor we cannot turn into a page number is an error.
fn next_link(next: Option<&Value>) -> Result<Option<u64>, String> {
    match next {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or("next is not a page number".into()),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => {
            if let Ok(n) = s.parse::<u64>() {
                return Ok(Some(n));
            }
            s.split_once('?')
                .into_iter()
                .flat_map(|(_, q)| q.split('&'))
                .find_map(|kv| kv.strip_prefix("page="))
                .and_then(|n| n.parse::<u64>().ok())
                .map(Some)
                .ok_or("a next link without a page number".into())
        }
        Some(_) => Err("next is not a page number or link".into()),
    }
}

/// The sensor's device among all listed items.
///
/// An item is the sensor's when `metadata.sensor_id` equals the sensor id; an item
/// with another `sensor_id` belongs to another sensor (a server that ignored the
/// filter must not make us adopt it). When none matches but an item without a
/// `sensor_id` of its own holds the id under another key (`sensorId`, …), we cannot
/// tell whose it is: an error, not "not found".
fn match_sensor(items: &[ListItem], sensor_id: &str) -> Result<Option<String>, String> {
    let mut matches: Vec<&ListItem> = items
        .iter()
        .filter(|i| i.metadata.get("sensor_id").and_then(Value::as_str) == Some(sensor_id))
        .collect();
    // The same device on two pages (the list moved while it was read) counts once.
    matches.sort_by(|a, b| a.id.cmp(&b.id));
    matches.dedup_by(|a, b| a.id == b.id);
    if matches.is_empty() {
        let elsewhere = items
            .iter()
            .filter(|i| !i.metadata.get("sensor_id").is_some_and(Value::is_string))
            .flat_map(|i| i.metadata.iter())
            .find(|(_, v)| holds(v, sensor_id));
        if let Some((key, _)) = elsewhere {
            let key: String = key.chars().take(40).collect();
            return Err(format!(
                "a device holds this sensor id under metadata key {key:?}, not sensor_id"
            ));
        }
        return Ok(None);
    }
    let chosen = choose_oldest(&matches);
    if matches.len() > 1 {
        tracing::warn!(
            sensor_id,
            count = matches.len(),
            chosen = %chosen,
            "several Qubitro devices carry this sensor id; adopting the oldest"
        );
    }
    Ok(Some(chosen.to_string()))
}

fn holds(v: &Value, sensor_id: &str) -> bool {
    match v {
        Value::String(s) => s == sensor_id,
        Value::Number(n) => n.to_string() == sensor_id,
        _ => false,
    }
}

/// Which of several devices of one sensor is adopted: the oldest, decided the same
/// way on every gateway and at every restart. By `created_at` (RFC 3339; `createdAt`
/// too) when every candidate has one, the earliest winning and equal times going to
/// the smallest id; otherwise the smallest device id in byte order. The list order
/// is not used: Qubitro sorts by `last_seen`, which changes.
fn choose_oldest<'a>(matches: &[&'a ListItem]) -> &'a str {
    let oldest = if matches.iter().all(|m| m.created.is_some()) {
        matches
            .iter()
            .min_by(|a, b| (a.created, a.id.as_bytes()).cmp(&(b.created, b.id.as_bytes())))
    } else {
        matches
            .iter()
            .min_by(|a, b| a.id.as_bytes().cmp(b.id.as_bytes()))
    };
    oldest.map_or("", |m| m.id.as_str())
}

/// RFC 3339 (`2024-05-01T12:00:00.5+02:00`) → (unix seconds, nanoseconds).
fn parse_rfc3339(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.iter().all(u8::is_ascii_digit) {
            std::str::from_utf8(part).ok()?.parse().ok()
        } else {
            None
        }
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo)
        || d < 1
        || d > month_days[(mo - 1) as usize]
        || h > 23
        || mi > 59
        || sec > 60
    {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0u32;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        for k in 0..9 {
            let digit = if start + k < i {
                u32::from(b[start + k] - b'0')
            } else {
                0
            };
            nanos = nanos * 10 + digit;
        }
    }
    let offset = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), rest @ ..] if rest.len() == 5 && rest[2] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    // Howard Hinnant's days_from_civil.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + sec - offset, nanos))
}

/// `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP-date (IMF-fixdate,
/// and the obsolete RFC 850 and asctime forms). Clamped to `max`; a date in the
/// past is zero; a number too large for u64 counts as "very long", so no value can
/// overflow anything downstream. `None` when the header is unreadable.
pub fn parse_retry_after(value: &str, now: SystemTime, max: Duration) -> Option<Duration> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|c| c.is_ascii_digit()) {
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(max))
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
    use std::time::UNIX_EPOCH;

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

    use serde_json::json;

    fn dev(id: &str, sensor: &str) -> Value {
        json!({"id": id, "name": "n", "metadata": {"sensor_id": sensor, "gw": "g"}})
    }

    /// The whole lookup over pages served by `serve(page)`, as `find_by_sensor` runs it.
    fn lookup(sensor: &str, serve: impl Fn(u64) -> Value) -> Result<Option<String>, String> {
        let mut reader = ListReader::default();
        let mut page = Some(1);
        while let Some(n) = page {
            page = reader.read(&serve(n))?;
        }
        reader.finish(sensor)
    }

    fn one(sensor: &str, answer: Value) -> Result<Option<String>, String> {
        lookup(sensor, |_| answer.clone())
    }

    #[test]
    fn the_lookup_finds_the_device_in_every_accepted_list_shape() {
        let items = json!([dev("other", "s2"), dev("mine", "s1")]);
        let shapes = [
            items.clone(),
            json!({"success": true, "status": 200, "message": "ok", "data": items}),
            json!({"devices": items}),
            json!({"items": items}),
            json!({"success": true, "status": 200, "data": {"devices": items}}),
            json!({"success": true, "status": 200, "data": {"items": items}}),
        ];
        for shape in shapes {
            assert_eq!(one("s1", shape.clone()), Ok(Some("mine".into())), "{shape}");
        }
    }

    #[test]
    fn an_understood_list_without_the_sensor_is_not_found() {
        assert_eq!(one("s1", json!([])), Ok(None));
        assert_eq!(
            one("s1", json!({"success": true, "status": 200, "data": []})),
            Ok(None)
        );
        assert_eq!(one("s1", json!({"items": [dev("x", "s2")]})), Ok(None));
    }

    #[test]
    fn an_unrecognised_list_shape_is_an_error_not_not_found() {
        for answer in [
            json!({"success": true, "status": 200, "data": {"rows_v3": [dev("d", "s1")]}}),
            json!({"result": [dev("d", "s1")]}),
            json!("devices"),
            json!(42),
            json!({"data": [dev("d", "s1")]}),
            json!({"success": false, "status": 200, "data": []}),
            json!({"success": true, "status": 200, "data": "none"}),
            json!({"devices": {"d": dev("d", "s1")}}),
            json!({"devices": [], "items": []}),
        ] {
            assert!(one("s1", answer.clone()).is_err(), "{answer}");
        }
    }

    #[test]
    fn a_list_item_without_metadata_is_an_error() {
        let e = one("s1", json!([dev("a", "s2"), {"id": "b", "name": "s1"}])).unwrap_err();
        assert!(e.contains("without metadata"), "{e}");
        assert!(one("s1", json!([{"id": "b", "metadata": "s1"}])).is_err());
        assert!(one("s1", json!(["b"])).is_err());
    }

    #[test]
    fn a_list_item_without_a_device_id_is_an_error() {
        assert!(one("s1", json!([{"metadata": {"sensor_id": "s1"}}])).is_err());
        assert!(one("s1", json!([{"id": "", "metadata": {"sensor_id": "s1"}}])).is_err());
        assert_eq!(
            one(
                "s1",
                json!([{"device_id": "d", "metadata": {"sensor_id": "s1"}}])
            ),
            Ok(Some("d".into()))
        );
    }

    #[test]
    fn the_sensor_id_under_another_key_is_an_error_not_not_found() {
        let answer = json!([{"id": "d", "metadata": {"sensorId": "s1"}}]);
        let e = one("s1", answer).unwrap_err();
        assert!(e.contains("sensorId"), "{e}");
        assert!(one("123", json!([{"id": "d", "metadata": {"sensor_id": 123}}])).is_err());
        // Another sensor's device that mentions ours elsewhere is still not ours.
        let theirs = json!([{"id": "d", "metadata": {"sensor_id": "s2", "parent": "s1"}}]);
        assert_eq!(one("s1", theirs), Ok(None));
    }

    #[test]
    fn a_server_that_ignored_the_filter_does_not_make_us_adopt_another_sensors_device() {
        let all = json!({"success": true, "status": 200,
            "data": [dev("a", "s2"), dev("b", "s3"), dev("c", "s4")]});
        assert_eq!(one("s1", all), Ok(None));
    }

    fn wrapped_page(items: Vec<Value>, page: u64, total_pages: u64) -> Value {
        json!({"success": true, "action": "list devices", "status": 200, "message": "ok",
               "data": items, "page": page, "limit": 2, "total": 5, "total_pages": total_pages})
    }

    #[test]
    fn pagination_is_followed_to_a_match_on_page_three() {
        let served = std::cell::RefCell::new(Vec::new());
        let found = lookup("s1", |n| {
            served.borrow_mut().push(n);
            match n {
                1 => wrapped_page(vec![dev("a", "s2"), dev("b", "s3")], 1, 3),
                2 => wrapped_page(vec![dev("c", "s4"), dev("d", "s5")], 2, 3),
                _ => wrapped_page(vec![dev("e", "s1")], 3, 3),
            }
        });
        assert_eq!(found, Ok(Some("e".into())));
        assert_eq!(*served.borrow(), vec![1, 2, 3]);
        // Bare form.
        let found = lookup("s1", |n| {
            let items = if n == 3 {
                vec![dev("e", "s1")]
            } else {
                vec![dev("x", "s9")]
            };
            json!({"items": items, "page": n, "limit": 1, "total": 3, "total_pages": 3})
        });
        assert_eq!(found, Ok(Some("e".into())));
    }

    #[test]
    fn next_page_and_has_more_are_followed() {
        let by_next_page = lookup("s1", |n| match n {
            1 => json!({"items": [dev("a", "s2")], "next_page": 2}),
            _ => json!({"items": [dev("b", "s1")], "next_page": null}),
        });
        assert_eq!(by_next_page, Ok(Some("b".into())));
        let by_link = lookup("s1", |n| match n {
            1 => {
                json!({"items": [dev("a", "s2")], "next": "/v2/projects/p/devices?metadata=x&page=2"})
            }
            _ => json!({"items": [dev("b", "s1")], "next": null}),
        });
        assert_eq!(by_link, Ok(Some("b".into())));
        let by_has_more = lookup("s1", |n| match n {
            1 => json!({"items": [dev("a", "s2")], "page": 1, "has_more": true}),
            _ => json!({"items": [dev("b", "s1")], "page": 2, "has_more": false}),
        });
        assert_eq!(by_has_more, Ok(Some("b".into())));
    }

    #[test]
    fn pagination_that_cannot_be_followed_is_an_error() {
        for first in [
            json!({"items": [], "has_more": true}),
            json!({"items": [], "next": "opaque-cursor-abc"}),
            json!({"items": [], "next": {"cursor": "x"}}),
            json!({"items": [], "page": 1, "total_pages": "many"}),
            json!({"items": [], "page": 1, "total_pages": 101}),
            json!({"items": [], "next_page": 1}),
            json!({"items": [], "page": 1, "has_more": "yes"}),
        ] {
            assert!(one("s1", first.clone()).is_err(), "{first}");
        }
        // A server that always says "one more" stops at the bound.
        let endless = lookup("s1", |n| json!({"items": [], "next_page": n + 1}));
        assert!(endless.is_err());
        // A page that is not the one asked for.
        let stuck = lookup("s1", |_| wrapped_page(vec![], 1, 3));
        assert!(stuck.is_err());
        // The list grew while it was read: items may have moved between pages.
        let moving = lookup("s1", |n| wrapped_page(vec![], n, 2 + n));
        assert!(moving.is_err());
    }

    #[test]
    fn several_matches_adopt_the_earliest_created() {
        let answer = json!([
            {"id": "b", "created_at": "2024-05-01T10:00:00Z", "metadata": {"sensor_id": "s1"}},
            {"id": "c", "createdAt": "2024-05-01T11:30:00+02:00", "metadata": {"sensor_id": "s1"}},
            {"id": "a", "created_at": "2024-05-01T10:00:00.5Z", "metadata": {"sensor_id": "s1"}},
        ]);
        // c is 09:30Z: the earliest, although its id is the largest.
        assert_eq!(one("s1", answer), Ok(Some("c".into())));
        let tie = json!([
            {"id": "z", "created_at": "2024-05-01T10:00:00Z", "metadata": {"sensor_id": "s1"}},
            {"id": "y", "created_at": "2024-05-01T12:00:00+02:00", "metadata": {"sensor_id": "s1"}},
        ]);
        assert_eq!(one("s1", tie), Ok(Some("y".into())));
    }

    #[test]
    fn several_matches_without_created_at_adopt_the_smallest_id_whatever_the_order() {
        let mut items = vec![
            json!({"id": "b", "created_at": "2020-01-01T00:00:00Z", "metadata": {"sensor_id": "s1"}}),
            json!({"id": "c", "metadata": {"sensor_id": "s1"}}),
            json!({"id": "a", "created_at": "not a date", "metadata": {"sensor_id": "s1"}}),
        ];
        for _ in 0..3 {
            items.rotate_left(1);
            assert_eq!(one("s1", Value::Array(items.clone())), Ok(Some("a".into())));
        }
    }

    #[test]
    fn rfc3339_times_are_compared_as_instants() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some((0, 0)));
        assert_eq!(
            parse_rfc3339("2000-03-01T00:00:00.25Z"),
            Some((951_868_800, 250_000_000))
        );
        assert_eq!(
            parse_rfc3339("0001-01-01T00:00:00Z"),
            Some((-62_135_596_800, 0))
        );
        for bad in [
            "2024-02-30T00:00:00Z",
            "2024-05-01",
            "2024-05-01T10:00:00",
            "x",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn get_and_create_answers_that_cannot_be_read_are_errors() {
        assert!(success_data(&json!({"success": false, "status": 200, "data": {}})).is_err());
        assert!(success_data(&json!({"success": true, "status": 200, "data": []})).is_err());
        assert!(success_data(&json!([1])).is_err());
        assert!(success_data(&json!({"id": "d"})).is_ok());
    }

    const MAX: Duration = Duration::from_secs(60);

    #[test]
    fn retry_after_seconds_are_read_and_clamped() {
        let now = SystemTime::now();
        assert_eq!(
            parse_retry_after("7", now, MAX),
            Some(Duration::from_secs(7))
        );
        assert_eq!(parse_retry_after(" 0 ", now, MAX), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("3600", now, MAX), Some(MAX));
        for bad in ["", "-1", "1.5", "soon", "7s"] {
            assert_eq!(parse_retry_after(bad, now, MAX), None, "{bad:?}");
        }
    }

    #[test]
    fn a_huge_retry_after_is_clamped_without_overflow() {
        let now = SystemTime::now();
        for huge in [
            "18446744073709551615",
            "18446744073709551616",
            &"9".repeat(400),
        ] {
            let d = parse_retry_after(huge, now, MAX).unwrap();
            assert_eq!(d, MAX);
            // What the engine does with it must not overflow either.
            let _ = d.saturating_mul(2).saturating_add(d);
        }
        let unclamped = parse_retry_after("18446744073709551615", now, Duration::MAX).unwrap();
        assert_eq!(unclamped, Duration::from_secs(u64::MAX));
    }

    #[test]
    fn retry_after_http_dates_are_read_in_every_form() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let later = Some(Duration::from_secs(23));
        for form in [
            "Sun, 06 Nov 1994 08:50:00 GMT",
            "Sunday, 06-Nov-94 08:50:00 GMT",
            "Sun Nov  6 08:50:00 1994",
        ] {
            assert_eq!(parse_retry_after(form, now, MAX), later, "{form}");
        }
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now, MAX),
            Some(Duration::ZERO),
            "a date in the past is now"
        );
        assert_eq!(
            parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT", now, MAX),
            Some(MAX)
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 25:00:00 GMT", now, MAX),
            None
        );
    }

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
