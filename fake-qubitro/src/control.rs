//! The unauthenticated `/_fake/*` endpoints of the standalone binary: list devices, count calls,
//! queue faults, change the list switches, reset. In-process tests use the Rust API instead.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State as Ext};
use axum::http::{Response, StatusCode};
use axum::routing::{any, get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::answer::{json_response, Shd, BODY_LIMIT};
use crate::faults::{Fault, FaultRequest};
use crate::options::Endpoint;
use crate::shapes::ListShape;
use crate::store::Shared;

/// Adds the `/_fake/*` paths; they are not recorded and need no API key.
pub(crate) fn control_routes(router: Router<Arc<Shared>>) -> Router<Arc<Shared>> {
    router
        .route(
            "/_fake/devices",
            get(|Ext(s): Shd| async move { s.control_devices() }).fallback(control_unknown),
        )
        .route(
            "/_fake/stats",
            get(|Ext(s): Shd| async move { s.control_stats() }).fallback(control_unknown),
        )
        .route(
            "/_fake/faults",
            post(|Ext(s): Shd, req: Request| async move { s.control_faults(req).await })
                .fallback(control_unknown),
        )
        .route(
            "/_fake/options",
            post(|Ext(s): Shd, req: Request| async move { s.control_options(req).await })
                .fallback(control_unknown),
        )
        .route(
            "/_fake/reset",
            post(|Ext(s): Shd| async move {
                s.reset();
                json_response(StatusCode::OK, &json!({"reset": true}))
            })
            .fallback(control_unknown),
        )
        .route("/_fake/{*rest}", any(control_unknown))
}

impl Shared {
    fn control_devices(&self) -> Response<Body> {
        let devices = self.lock().newest_first();
        json_response(StatusCode::OK, &json!(devices))
    }

    fn control_stats(&self) -> Response<Body> {
        let counts = *self.counts.borrow();
        let (devices, requests) = {
            let state = self.lock();
            (state.devices.len(), state.requests.len())
        };
        let mut stats = Map::new();
        for ep in Endpoint::ALL {
            stats.insert(ep.as_str().to_owned(), json!(counts[ep.index()]));
        }
        stats.insert("devices".to_owned(), json!(devices));
        stats.insert("requests".to_owned(), json!(requests));
        json_response(StatusCode::OK, &Value::Object(stats))
    }

    async fn control_faults(&self, req: Request) -> Response<Body> {
        let req: FaultRequest = match control_body(req).await {
            Ok(req) => req,
            Err(response) => return response,
        };
        let faults = match req
            .faults
            .into_iter()
            .map(Fault::try_from)
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(faults) => faults,
            Err(e) => return control_error(e),
        };
        let queued = {
            let mut state = self.lock();
            let queue = &mut state.faults[req.endpoint.index()];
            queue.extend(faults);
            queue.len()
        };
        json_response(
            StatusCode::OK,
            &json!({"endpoint": req.endpoint, "queued": queued}),
        )
    }

    /// `POST /_fake/options`: the list switches, the Delete permission and the hold on creates,
    /// each optional; answers the ones now in force.
    async fn control_options(&self, req: Request) -> Response<Body> {
        let req: OptionsRequest = match control_body(req).await {
            Ok(req) => req,
            Err(response) => return response,
        };
        let (now, delete_permission) = {
            let mut state = self.lock();
            let list = &mut state.list;
            if let Some(shape) = req.list_shape {
                list.shape = shape;
            }
            if let Some(size) = req.list_page_size {
                // 0 turns pagination off: JSON has no way to send "None" inside an Option.
                list.page_size = (size > 0).then_some(size);
            }
            if let Some(on) = req.list_ignores_filter {
                list.ignores_filter = on;
            }
            if let Some(on) = req.list_newest_first {
                list.newest_first = on;
            }
            if let Some(on) = req.created_at_field {
                list.created_at_field = on;
            }
            let list = *list;
            if let Some(allowed) = req.delete_permission {
                state.delete_permission = allowed;
            }
            (list, state.delete_permission)
        };
        if let Some(held) = req.hold_creates {
            self.set_creates_held(held);
        }
        let hold_creates = *self.creates_held.borrow();
        json_response(
            StatusCode::OK,
            &json!({"list_shape": now.shape, "list_page_size": now.page_size.unwrap_or(0),
                    "list_ignores_filter": now.ignores_filter,
                    "list_newest_first": now.newest_first,
                    "created_at_field": now.created_at_field,
                    "delete_permission": delete_permission, "hold_creates": hold_creates}),
        )
    }
}

async fn control_unknown() -> Response<Body> {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"message": "unknown control endpoint; try GET /_fake/devices, GET /_fake/stats, \
            POST /_fake/faults, POST /_fake/options, POST /_fake/reset"}),
    )
}

/// Reads and parses a control request body, or the 400 answer to give instead.
async fn control_body<T: serde::de::DeserializeOwned>(req: Request) -> Result<T, Response<Body>> {
    let body = axum::body::to_bytes(req.into_body(), BODY_LIMIT)
        .await
        .map_err(|_| control_error("request body too large"))?;
    serde_json::from_slice(&body).map_err(|e| control_error(format!("invalid request: {e}")))
}

fn control_error(message: impl Into<String>) -> Response<Body> {
    json_response(StatusCode::BAD_REQUEST, &json!({"message": message.into()}))
}

/// Body of `POST /_fake/options`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OptionsRequest {
    list_shape: Option<ListShape>,
    list_page_size: Option<usize>,
    list_ignores_filter: Option<bool>,
    list_newest_first: Option<bool>,
    created_at_field: Option<bool>,
    delete_permission: Option<bool>,
    hold_creates: Option<bool>,
}

#[cfg(test)]
mod tests {
    use crate::test_util::*;
    use crate::{Endpoint, FakeOptions};
    use serde_json::json;

    #[tokio::test]
    async fn control_endpoints_queue_faults_and_report_stats() {
        let fake = start(FakeOptions {
            control_endpoints: true,
            ..FakeOptions::default()
        })
        .await;
        let http = client();
        let queued = http
            .post(format!("{}/_fake/faults", fake.base_url()))
            .json(&json!({"endpoint": "create", "faults": [
                {"status": 503, "retry_after": 1}, {"created_then_status": 500}]}))
            .send()
            .await
            .expect("queue faults");
        assert_eq!(json_of(queued).await["queued"], 2);
        assert_eq!(create(&fake, sensor("a", json!({}))).await.status(), 503);
        assert_eq!(create(&fake, sensor("b", json!({}))).await.status(), 500);

        let devices = json_of(
            http.get(format!("{}/_fake/devices", fake.base_url()))
                .send()
                .await
                .expect("devices"),
        )
        .await;
        assert_eq!(devices[0]["name"], "b");
        assert!(devices[0]["token"].is_string());
        let stats = json_of(
            http.get(format!("{}/_fake/stats", fake.base_url()))
                .send()
                .await
                .expect("stats"),
        )
        .await;
        assert_eq!(stats["create"], 2);
        assert_eq!(stats["devices"], 1);

        let bad = http
            .post(format!("{}/_fake/faults", fake.base_url()))
            .json(&json!({"endpoint": "create", "faults": [{"status": 500, "hang": true}]}))
            .send()
            .await
            .expect("bad fault");
        assert_eq!(bad.status(), 400);
        let reset = http
            .post(format!("{}/_fake/reset", fake.base_url()))
            .send()
            .await
            .expect("reset");
        assert_eq!(reset.status(), 200);
        assert!(fake.devices().is_empty());
    }

    #[tokio::test]
    async fn the_options_control_endpoint_changes_the_list_switches() {
        let fake = start(FakeOptions {
            control_endpoints: true,
            ..FakeOptions::default()
        })
        .await;
        plant(&fake, "a", "s-a");
        let set = client()
            .post(format!("{}/_fake/options", fake.base_url()))
            .json(&json!({"list_shape": "devices_key", "list_page_size": 5}))
            .send()
            .await
            .expect("options");
        assert_eq!(set.status(), 200);
        let now = json_of(set).await;
        assert_eq!(now["list_shape"], "devices_key");
        assert_eq!(now["list_newest_first"], true);
        let list = list_json(&fake, "").await;
        assert_eq!(names(&list["data"]["devices"]), ["a"]);
        assert_eq!(list["limit"], 5);
        let faults = client()
            .post(format!("{}/_fake/faults", fake.base_url()))
            .json(&json!({"endpoint": "get", "faults": [{"not_found": true}, {"created_then_hang": true}]}))
            .send()
            .await
            .expect("faults");
        assert_eq!(json_of(faults).await["queued"], 2);
        let switches = client()
            .post(format!("{}/_fake/options", fake.base_url()))
            .json(&json!({"delete_permission": false, "hold_creates": true}))
            .send()
            .await
            .expect("switches");
        let now = json_of(switches).await;
        assert_eq!(now["delete_permission"], false);
        assert_eq!(now["hold_creates"], true);
        let released = client()
            .post(format!("{}/_fake/options", fake.base_url()))
            .json(&json!({"hold_creates": false}))
            .send()
            .await
            .expect("release");
        let now = json_of(released).await;
        assert_eq!(
            (
                now["delete_permission"].clone(),
                now["hold_creates"].clone()
            ),
            (json!(false), json!(false))
        );
        let unknown = client()
            .get(format!("{}/_fake/nothing", fake.base_url()))
            .send()
            .await
            .expect("unknown");
        assert_eq!(unknown.status(), 404);
        assert!(
            fake.requests()
                .iter()
                .all(|r| r.endpoint == Some(Endpoint::List)),
            "control calls are not recorded"
        );
    }
}
