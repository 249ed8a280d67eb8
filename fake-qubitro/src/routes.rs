//! Routes and handlers of the documented device API: every call is recorded, meets its queued
//! fault, is authenticated, and is answered in the configured envelope.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State as Ext};
use axum::http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};
use axum::routing::{get, post};
use axum::Router;

use serde_json::json;

use crate::answer::{json_response, status_or, Shd, BODY_LIMIT};
use crate::control::control_routes;
use crate::devices::{device_json, validate_create, Creds, RecordedRequest};
use crate::faults::Fault;
use crate::options::{CredentialsAt, Endpoint, Envelope};
use crate::store::Shared;

/// Identifies the record to complete once the answer is known.
struct Ticket {
    epoch: u64,
    index: usize,
}

/// What the router matched, handed to [`Shared::handle`].
enum Target {
    Api {
        endpoint: Endpoint,
        project: String,
        device: Option<String>,
    },
    MethodNotAllowed,
    NotFound,
}

impl Target {
    /// A device call, unless a path segment is empty (`/v2/projects//devices`), which the
    /// router matches but the API does not.
    fn api(endpoint: Endpoint, project: String, device: Option<String>) -> Target {
        if project.is_empty() || device.as_deref() == Some("") {
            return Target::NotFound;
        }
        Target::Api {
            endpoint,
            project,
            device,
        }
    }

    fn endpoint(&self) -> Option<Endpoint> {
        match self {
            Target::Api { endpoint, .. } => Some(*endpoint),
            Target::MethodNotAllowed | Target::NotFound => None,
        }
    }
}

/// The documented device API, plus `/_fake/*` when the options ask for it. Every API request
/// (unroutable ones included) goes through [`Shared::handle`], which records it and applies
/// faults; the control paths are not recorded.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let api = |endpoint: Endpoint| {
        move |Ext(s): Shd, Path(project): Path<String>, req: Request| async move {
            s.handle(Target::api(endpoint, project, None), req).await
        }
    };
    let one = |endpoint: Endpoint| {
        move |Ext(s): Shd, Path((project, device)): Path<(String, String)>, req: Request| async move {
            s.handle(Target::api(endpoint, project, Some(device)), req)
                .await
        }
    };
    let method_not_allowed =
        |Ext(s): Shd, req: Request| async move { s.handle(Target::MethodNotAllowed, req).await };
    let not_found =
        |Ext(s): Shd, req: Request| async move { s.handle(Target::NotFound, req).await };

    let mut router = Router::new()
        .route(
            "/v2/projects/{project}/devices",
            post(api(Endpoint::Create))
                .get(api(Endpoint::List))
                .fallback(method_not_allowed),
        )
        .route(
            "/v2/projects/{project}/devices/{device}",
            get(one(Endpoint::Get))
                .delete(one(Endpoint::Delete))
                .fallback(method_not_allowed),
        );
    if shared.opts.control_endpoints {
        router = control_routes(router);
    }
    router.fallback(not_found).with_state(shared)
}

impl Shared {
    async fn handle(&self, target: Target, req: Request) -> Response<Body> {
        let at = Instant::now();
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();
        let endpoint = target.endpoint();

        let (ticket, fault, delay) = {
            let mut state = self.lock();
            let index = state.requests.len();
            state.requests.push(RecordedRequest {
                method: parts.method.as_str().to_owned(),
                path: path.to_owned(),
                query: parts.uri.query().map(str::to_owned),
                at,
                status: 0,
                endpoint,
            });
            let fault = endpoint.and_then(|ep| state.faults[ep.index()].pop_front());
            let ticket = Ticket {
                epoch: state.epoch,
                index,
            };
            (ticket, fault, state.delay)
        };
        if let Some(ep) = endpoint {
            self.counts.send_modify(|c| c[ep.index()] += 1);
        }

        // Read the whole body even when it will be ignored: answering before the client has
        // finished sending makes hyper close the connection, which is not what a real server does.
        let body = axum::body::to_bytes(body, BODY_LIMIT).await;
        if endpoint == Some(Endpoint::Create) {
            // Counted above but not yet answered: a test sees every held create arrive.
            self.creates_released().await;
        }

        let mut extra_delay = Duration::ZERO;
        let response = match (fault, body) {
            (Some(Fault::Hang), _) => std::future::pending::<Response<Body>>().await,
            (
                Some(Fault::Status {
                    status,
                    retry_after,
                    body,
                }),
                _,
            ) => self.fault_response(status, retry_after, body),
            (Some(Fault::NotFound), _) => self.not_found(endpoint),
            (_, Err(_)) => self.error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
            (Some(Fault::CreatedThenStatus(status)), Ok(body)) => {
                // The work is done; only the answer is lost.
                let _ = self.api(&target, &parts.headers, &parts.uri, &body);
                self.fault_response(status, None, None)
            }
            (Some(Fault::CreatedThenHang), Ok(body)) => {
                let _ = self.api(&target, &parts.headers, &parts.uri, &body);
                std::future::pending::<Response<Body>>().await
            }
            (Some(Fault::Delay(d)), Ok(body)) => {
                extra_delay = d;
                self.api(&target, &parts.headers, &parts.uri, &body)
            }
            (None, Ok(body)) => self.api(&target, &parts.headers, &parts.uri, &body),
        };
        let delay = delay.saturating_add(extra_delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }

        {
            let mut state = self.lock();
            if state.epoch == ticket.epoch {
                if let Some(r) = state.requests.get_mut(ticket.index) {
                    r.status = response.status().as_u16();
                }
            }
        }
        log_request(&parts.method, &parts.uri, response.status(), at);
        response
    }

    fn api(&self, target: &Target, headers: &HeaderMap, uri: &Uri, body: &[u8]) -> Response<Body> {
        let (endpoint, project, device) = match target {
            Target::Api {
                endpoint,
                project,
                device,
            } => (*endpoint, project, device.as_deref()),
            Target::MethodNotAllowed => {
                return self.error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed")
            }
            Target::NotFound => return self.error(StatusCode::NOT_FOUND, "Not found"),
        };
        if !self.authorized(headers) {
            return self.error(
                StatusCode::UNAUTHORIZED,
                "Unauthorized: invalid or missing API key",
            );
        }
        if *project != self.opts.project_id {
            return self.error(StatusCode::NOT_FOUND, "Project not found");
        }
        match (endpoint, device) {
            (Endpoint::Create, _) => self.create(body),
            (Endpoint::List, _) => self.list(uri),
            (Endpoint::Get, Some(id)) => self.get(id),
            (Endpoint::Delete, Some(id)) => self.delete(id),
            // The router only yields Get/Delete with a device id.
            (Endpoint::Get | Endpoint::Delete, None) => {
                self.error(StatusCode::NOT_FOUND, "Not found")
            }
        }
    }

    /// The answer for something that does not exist, worded as the endpoint words it.
    fn not_found(&self, endpoint: Option<Endpoint>) -> Response<Body> {
        match endpoint {
            Some(Endpoint::Get | Endpoint::Delete) => {
                self.error(StatusCode::NOT_FOUND, "Device not found")
            }
            Some(Endpoint::Create | Endpoint::List) => {
                self.error(StatusCode::NOT_FOUND, "Project not found")
            }
            None => self.error(StatusCode::NOT_FOUND, "Not found"),
        }
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        match value.split_once(' ') {
            Some((scheme, key)) => {
                scheme.eq_ignore_ascii_case("bearer") && key.trim() == self.opts.api_key
            }
            None => false,
        }
    }

    fn create(&self, body: &[u8]) -> Response<Body> {
        let new = match validate_create(body) {
            Ok(new) => new,
            Err(message) => return self.error(StatusCode::BAD_REQUEST, message),
        };
        let (device, created_at) = {
            let mut state = self.lock();
            let device = state.insert(new);
            let created_at = state
                .list
                .created_at_field
                .then(|| device.created_at.clone());
            (device, created_at)
        };
        self.created(&device);
        let creds = match self.opts.credentials_at {
            CredentialsAt::DeviceCredentials => Creds::DeviceCredentials,
            CredentialsAt::Metadata => Creds::Metadata,
            CredentialsAt::Absent => Creds::None,
        };
        let status = status_or(self.opts.create_status, StatusCode::CREATED);
        self.success(
            status,
            "create device",
            "Device created successfully.",
            device_json(&device, created_at.as_deref(), creds),
        )
    }

    fn get(&self, id: &str) -> Response<Body> {
        let found = {
            let state = self.lock();
            let with_created_at = state.list.created_at_field;
            state.get(id).map(|s| {
                (
                    s.device.clone(),
                    with_created_at.then(|| s.device.created_at.clone()),
                )
            })
        };
        match found {
            Some((device, created_at)) => self.success(
                StatusCode::OK,
                "get device",
                "Device retrieved successfully.",
                device_json(&device, created_at.as_deref(), Creds::DeviceCredentials),
            ),
            None => self.error(StatusCode::NOT_FOUND, "Device not found"),
        }
    }

    fn delete(&self, id: &str) -> Response<Body> {
        let mut state = self.lock();
        if !state.delete_permission {
            return self.error(
                StatusCode::FORBIDDEN,
                "Forbidden: this API key does not have the Delete permission",
            );
        }
        if state.remove(id).is_none() {
            return self.error(StatusCode::NOT_FOUND, "Device not found");
        }
        match self.opts.envelope {
            Envelope::Wrapped => json_response(
                StatusCode::OK,
                &json!({"success": true, "action": "delete device", "status": 200,
                        "message": "Device deleted successfully.", "data": null}),
            ),
            Envelope::Bare => json_response(
                StatusCode::OK,
                &json!({"message": "Device deleted successfully."}),
            ),
        }
    }

    fn fault_response(
        &self,
        status: u16,
        retry_after: Option<u64>,
        body: Option<String>,
    ) -> Response<Body> {
        let status = status_or(status, StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = match body {
            Some(body) => {
                // A caller may inject HTML or garbage on purpose; only claim JSON when it is.
                let is_json = serde_json::from_str::<serde::de::IgnoredAny>(&body).is_ok();
                let mut r = Response::new(Body::from(body));
                *r.status_mut() = status;
                let ct = if is_json {
                    "application/json"
                } else {
                    "text/plain; charset=utf-8"
                };
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
                r
            }
            None => self.error(
                status,
                status.canonical_reason().unwrap_or("Injected fault"),
            ),
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

fn log_request(method: &Method, uri: &Uri, status: StatusCode, at: Instant) {
    // The path and query carry ids and metadata only; the API key and tokens are never logged.
    tracing::info!(
        target: "fake_qubitro",
        "{method} {uri} -> {} ({} ms)",
        status.as_u16(),
        at.elapsed().as_millis()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::NEVER_SEEN;
    use crate::test_util::*;
    use crate::{Envelope, FakeOptions};
    use serde_json::json;

    #[tokio::test]
    async fn create_get_list_with_filter_and_delete_round_trip() {
        let fake = start(FakeOptions::default()).await;
        let http = client();

        let r = create(&fake, sensor("s1", json!({"gw": "a", "hw": "x"}))).await;
        assert_eq!(r.status(), 201);
        let created = json_of(r).await;
        assert_eq!(created["success"], true);
        assert_eq!(created["status"], 201);
        let id = created["data"]["id"].as_str().expect("id").to_owned();
        let token = created["data"]["device_credentials"]["device_token"]
            .as_str()
            .expect("token")
            .to_owned();
        assert_eq!(
            created["data"]["device_credentials"]["device_id"],
            id.as_str()
        );
        create(&fake, sensor("s2", json!({"gw": "b", "hw": "x"}))).await;

        let got = json_of(
            http.get(format!("{}/{id}", devices_url(&fake)))
                .bearer_auth(fake.api_key())
                .send()
                .await
                .expect("get"),
        )
        .await;
        assert_eq!(got["data"]["name"], "s1");
        assert_eq!(
            got["data"]["device_credentials"]["device_token"],
            token.as_str()
        );
        assert_eq!(got["data"]["metadata"], json!({"gw": "a", "hw": "x"}));
        assert_eq!(got["data"]["last_seen"], NEVER_SEEN);

        let all = json_of(
            http.get(devices_url(&fake))
                .bearer_auth(fake.api_key())
                .send()
                .await
                .expect("list"),
        )
        .await;
        let names: Vec<&str> = all["data"]
            .as_array()
            .expect("list data is an array")
            .iter()
            .map(|d| d["name"].as_str().expect("name"))
            .collect();
        assert_eq!(names, ["s2", "s1"], "newest first");
        assert!(
            !all.to_string().contains(&token) && all["data"][0].get("device_credentials").is_none(),
            "list items carry no credentials"
        );

        let filtered = json_of(
            http.get(format!("{}?metadata=hw%3Ax%2Cgw%3Aa", devices_url(&fake)))
                .bearer_auth(fake.api_key())
                .send()
                .await
                .expect("filtered list"),
        )
        .await;
        assert_eq!(filtered["data"].as_array().map(Vec::len), Some(1));
        assert_eq!(filtered["data"][0]["id"], id.as_str());

        let deleted = http
            .delete(format!("{}/{id}", devices_url(&fake)))
            .bearer_auth(fake.api_key())
            .send()
            .await
            .expect("delete");
        assert_eq!(deleted.status(), 200);
        let again = http
            .get(format!("{}/{id}", devices_url(&fake)))
            .bearer_auth(fake.api_key())
            .send()
            .await
            .expect("get after delete");
        assert_eq!(again.status(), 404);
        assert_eq!(fake.devices().len(), 1);
        assert_eq!(fake.count(Endpoint::Create), 2);
        assert_eq!(fake.count(Endpoint::List), 2);
        assert_eq!(fake.count(Endpoint::Get), 2);
        assert_eq!(fake.count(Endpoint::Delete), 1);
        let list_query = fake
            .requests()
            .into_iter()
            .filter(|r| r.endpoint == Some(Endpoint::List))
            .filter_map(|r| r.query)
            .next();
        assert_eq!(list_query.as_deref(), Some("metadata=hw%3Ax%2Cgw%3Aa"));
    }

    #[tokio::test]
    async fn bare_envelope_answers_the_device_object_and_bare_errors() {
        let fake = start(FakeOptions {
            envelope: Envelope::Bare,
            ..FakeOptions::default()
        })
        .await;
        let created = json_of(create(&fake, sensor("s", json!({"k": "v"}))).await).await;
        assert!(created.get("success").is_none());
        assert_eq!(created["name"], "s");
        assert_eq!(created["metadata"], json!({"k": "v"}));
        assert!(created["device_credentials"]["device_token"].is_string());

        let bad = create(&fake, json!({"description": ""})).await;
        assert_eq!(bad.status(), 400);
        assert_eq!(json_of(bad).await, json!({"message": "name is required"}));
    }

    #[tokio::test]
    async fn missing_or_wrong_api_key_is_401_and_creates_nothing() {
        let fake = start(FakeOptions::default()).await;
        let none = client()
            .post(devices_url(&fake))
            .json(&sensor("s", json!({})))
            .send()
            .await
            .expect("request");
        assert_eq!(none.status(), 401);
        let wrong = client()
            .post(devices_url(&fake))
            .bearer_auth("QB_other")
            .json(&sensor("s", json!({})))
            .send()
            .await
            .expect("request");
        assert_eq!(wrong.status(), 401);
        assert_eq!(json_of(wrong).await["success"], false);
        assert!(fake.devices().is_empty());
        assert_eq!(fake.count(Endpoint::Create), 2);
    }

    #[tokio::test]
    async fn unknown_project_and_unknown_device_are_404() {
        let fake = start(FakeOptions::default()).await;
        let other = client()
            .get(format!(
                "{}/v2/projects/{}/devices",
                fake.base_url(),
                uuid::Uuid::new_v4()
            ))
            .bearer_auth(fake.api_key())
            .send()
            .await
            .expect("request");
        assert_eq!(other.status(), 404);
        let missing = client()
            .delete(format!("{}/{}", devices_url(&fake), uuid::Uuid::new_v4()))
            .bearer_auth(fake.api_key())
            .send()
            .await
            .expect("request");
        assert_eq!(missing.status(), 404);
    }

    #[tokio::test]
    async fn unroutable_paths_and_methods_are_recorded_and_answered_in_the_envelope() {
        let fake = start(FakeOptions::default()).await;
        let put = client()
            .put(devices_url(&fake))
            .bearer_auth(fake.api_key())
            .send()
            .await
            .expect("put");
        assert_eq!(put.status(), 405);
        assert_eq!(json_of(put).await["success"], false);
        let nowhere = client()
            .get(format!("{}/v2/projects//devices", fake.base_url()))
            .send()
            .await
            .expect("get");
        assert_eq!(nowhere.status(), 404);
        let recorded: Vec<(u16, Option<Endpoint>)> = fake
            .requests()
            .iter()
            .map(|r| (r.status, r.endpoint))
            .collect();
        assert_eq!(recorded, [(405, None), (404, None)]);
    }
}
