//! Fault injection: the misbehaviours a test queues per endpoint (a status, a delay, a lost
//! answer, a hang, read-after-write lag) and their JSON form for `/_fake/faults`. The request
//! handler applies them (`routes`).

use std::time::Duration;

use serde::Deserialize;

use crate::options::Endpoint;

/// One injected misbehaviour, consumed by the next call to its endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status without doing anything. `retry_after` (seconds) becomes a
    /// `Retry-After` header; `body` replaces the usual JSON error verbatim.
    Status {
        status: u16,
        retry_after: Option<u64>,
        body: Option<String>,
    },
    /// Do the work and answer normally, but only after this delay (client timeouts). The work
    /// happens first, so a client that gives up has still created its device, as with a real
    /// server that is slow to answer.
    Delay(Duration),
    /// Do the work for real, then answer this error status instead: the "response lost" case.
    CreatedThenStatus(u16),
    /// Do the work for real, then never answer: the connection stays open until the client
    /// gives up or `stop()`. A create that timed out on the client but exists in the cloud.
    CreatedThenHang,
    /// Answer exactly what a missing device answers (404, "Device not found") without doing
    /// anything: a GET right after a create that the API does not see yet (read-after-write
    /// lag). Queue N of them for the next N GETs.
    NotFound,
    /// Never answer; the connection stays open until `stop()`.
    Hang,
}

/// Body of `POST /_fake/faults`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FaultRequest {
    pub(crate) endpoint: Endpoint,
    pub(crate) faults: Vec<FaultSpec>,
}

/// One fault as JSON: `{"status":500,"retry_after":2,"body":"…"}`, `{"delay_ms":3000}`,
/// `{"created_then_status":500}`, `{"created_then_hang":true}`, `{"not_found":true}` or
/// `{"hang":true}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FaultSpec {
    status: Option<u16>,
    retry_after: Option<u64>,
    body: Option<String>,
    delay_ms: Option<u64>,
    created_then_status: Option<u16>,
    #[serde(default)]
    created_then_hang: bool,
    #[serde(default)]
    not_found: bool,
    #[serde(default)]
    hang: bool,
}

impl TryFrom<FaultSpec> for Fault {
    type Error = String;

    fn try_from(s: FaultSpec) -> Result<Self, String> {
        let kinds = usize::from(s.status.is_some())
            + usize::from(s.delay_ms.is_some())
            + usize::from(s.created_then_status.is_some())
            + usize::from(s.created_then_hang)
            + usize::from(s.not_found)
            + usize::from(s.hang);
        if kinds != 1 {
            return Err(
                "each fault needs exactly one of status, delay_ms, created_then_status, \
                 created_then_hang, not_found, hang"
                    .to_owned(),
            );
        }
        if s.status.is_none() && (s.retry_after.is_some() || s.body.is_some()) {
            return Err("retry_after and body only go with status".to_owned());
        }
        Ok(match (s.status, s.delay_ms, s.created_then_status) {
            (Some(status), _, _) => Fault::Status {
                status,
                retry_after: s.retry_after,
                body: s.body,
            },
            (_, Some(ms), _) => Fault::Delay(Duration::from_millis(ms)),
            (_, _, Some(status)) => Fault::CreatedThenStatus(status),
            _ if s.created_then_hang => Fault::CreatedThenHang,
            _ if s.not_found => Fault::NotFound,
            _ => Fault::Hang,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use crate::FakeOptions;
    use serde_json::json;

    #[tokio::test]
    async fn status_fault_answers_with_retry_after_then_next_call_is_normal() {
        let fake = start(FakeOptions::default()).await;
        fake.push_faults(
            Endpoint::Create,
            vec![Fault::Status {
                status: 429,
                retry_after: Some(2),
                body: None,
            }],
        );
        let r = create(&fake, sensor("s", json!({}))).await;
        assert_eq!(r.status(), 429);
        assert_eq!(
            r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
            Some("2")
        );
        assert!(fake.devices().is_empty());
        assert_eq!(create(&fake, sensor("s", json!({}))).await.status(), 201);
        let statuses: Vec<u16> = fake.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [429, 201]);
    }

    #[tokio::test]
    async fn created_then_status_creates_the_device_but_answers_the_error() {
        let fake = start(FakeOptions::default()).await;
        fake.push_faults(Endpoint::Create, vec![Fault::CreatedThenStatus(502)]);
        let r = create(&fake, sensor("lost", json!({"gw": "a"}))).await;
        assert_eq!(r.status(), 502);
        let devices = fake.devices();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].name, "lost");
    }

    #[tokio::test]
    async fn delay_fault_makes_a_client_time_out_but_the_device_is_created() {
        let fake = start(FakeOptions::default()).await;
        fake.push_faults(
            Endpoint::Create,
            vec![Fault::Delay(Duration::from_secs(30))],
        );
        let err = client()
            .post(devices_url(&fake))
            .bearer_auth(fake.api_key())
            .json(&sensor("slow", json!({})))
            .timeout(Duration::from_millis(200))
            .send()
            .await
            .expect_err("the client gives up first");
        assert!(err.is_timeout(), "{err:?}");
        assert_eq!(fake.devices().len(), 1);
    }

    #[tokio::test]
    async fn created_then_hang_creates_the_device_and_never_answers() {
        let fake = start(FakeOptions::default()).await;
        fake.push_faults(Endpoint::Create, vec![Fault::CreatedThenHang]);
        let err = client()
            .post(devices_url(&fake))
            .bearer_auth(fake.api_key())
            .json(&sensor("hung", json!({})))
            .timeout(Duration::from_millis(300))
            .send()
            .await
            .expect_err("no answer ever comes");
        assert!(err.is_timeout(), "{err:?}");
        assert_eq!(fake.devices().len(), 1);
        assert_eq!(fake.requests()[0].status, 0, "never answered");
    }

    #[tokio::test]
    async fn not_found_faults_hide_a_new_device_from_the_next_gets() {
        let fake = start(FakeOptions::default()).await;
        let created = json_of(create(&fake, sensor("lagging", json!({}))).await).await;
        let id = created["data"]["id"].as_str().expect("id").to_owned();
        fake.push_faults(Endpoint::Get, vec![Fault::NotFound; 2]);
        let url = format!("{}/{id}", devices_url(&fake));
        let mut statuses = Vec::new();
        let mut bodies = Vec::new();
        for _ in 0..3 {
            let r = client()
                .get(&url)
                .bearer_auth(fake.api_key())
                .send()
                .await
                .expect("get");
            statuses.push(r.status().as_u16());
            bodies.push(json_of(r).await);
        }
        assert_eq!(statuses, [404, 404, 200]);
        let missing = client()
            .get(format!("{}/{}", devices_url(&fake), uuid::Uuid::new_v4()))
            .bearer_auth(fake.api_key())
            .send()
            .await
            .expect("get a missing device");
        assert_eq!(
            bodies[0],
            json_of(missing).await,
            "indistinguishable from a missing device"
        );
    }
}
