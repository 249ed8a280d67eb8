//! The list call (onboardd's lookup): the matching devices, one page of them, laid out in the
//! shape the switches choose.

use axum::body::Body;
use axum::http::{Response, StatusCode, Uri};
use serde_json::{json, Value};

use crate::answer::json_response;
use crate::devices::{device_json, Creds, FakeDevice};
use crate::options::Envelope;
use crate::shapes::{ListOptions, ListQuery, ListShape, OTHER_SENSOR_ID_KEY, SENSOR_ID_KEY};
use crate::store::Shared;

impl Shared {
    pub(crate) fn list(&self, uri: &Uri) -> Response<Body> {
        let query = match ListQuery::parse(uri) {
            Ok(query) => query,
            Err(message) => return self.error(StatusCode::BAD_REQUEST, message),
        };
        let (opts, matching) = {
            let state = self.lock();
            let opts = state.list;
            let filter: Vec<(String, String)> = if opts.ignores_filter {
                Vec::new()
            } else if opts.shape == ListShape::SensorIdUnderOtherKey {
                // Stored as sensor_id, shown as sensorId: a filter on either name finds it.
                query
                    .filter
                    .into_iter()
                    .map(|(k, v)| match k.as_str() {
                        OTHER_SENSOR_ID_KEY => (SENSOR_ID_KEY.to_owned(), v),
                        _ => (k, v),
                    })
                    .collect()
            } else {
                query.filter
            };
            let matching: Vec<(FakeDevice, String)> = state
                .matching(&filter, opts.newest_first)
                .into_iter()
                .map(|s| (s.device.clone(), s.device.created_at.clone()))
                .collect();
            (opts, matching)
        };
        let total = matching.len();
        let (selected, page): (&[(FakeDevice, String)], _) = match opts.page_size {
            None => (&matching, None),
            Some(limit) => {
                let limit = limit.max(1);
                let start = (query.page - 1).saturating_mul(limit).min(total);
                let end = start.saturating_add(limit).min(total);
                let page = json!({"page": query.page, "limit": limit, "total": total,
                                  "total_pages": total.div_ceil(limit)});
                (&matching[start..end], Some(page))
            }
        };
        let items = selected
            .iter()
            .map(|(d, created_at)| list_item(d, created_at, &opts))
            .collect();
        self.list_answer(Value::Array(items), page, opts.shape)
    }

    /// Lays out a list answer: `items` placed as `shape` says, page fields at the top level.
    fn list_answer(&self, items: Value, page: Option<Value>, shape: ListShape) -> Response<Body> {
        let wrapped = self.opts.envelope == Envelope::Wrapped;
        let body = match shape {
            ListShape::DevicesKey => json!({ "devices": items }),
            ListShape::ItemsKey => json!({ "items": items }),
            ListShape::Unrecognised if wrapped => json!({ "rows_v3": items }),
            ListShape::Unrecognised => json!({"result": { "rows_v3": items }}),
            ListShape::Standard | ListShape::NoMetadata | ListShape::SensorIdUnderOtherKey => {
                if !wrapped && page.is_some() {
                    json!({ "items": items })
                } else {
                    items
                }
            }
        };
        let mut answer = if wrapped {
            json!({"success": true, "action": "list devices", "status": 200,
                   "message": "Devices listed successfully.", "data": body})
        } else {
            body
        };
        if let (Some(Value::Object(page)), Value::Object(answer)) = (page, &mut answer) {
            answer.extend(page);
        }
        json_response(StatusCode::OK, &answer)
    }
}

/// A list item: no credentials, laid out as the list switches say.
fn list_item(d: &FakeDevice, created_at: &str, opts: &ListOptions) -> Value {
    let created_at = opts.created_at_field.then_some(created_at);
    let mut item = device_json(d, created_at, Creds::None);
    if let Value::Object(o) = &mut item {
        match opts.shape {
            ListShape::NoMetadata => {
                o.remove("metadata");
            }
            ListShape::SensorIdUnderOtherKey => {
                if let Some(Value::Object(m)) = o.get_mut("metadata") {
                    if let Some(id) = m.remove(SENSOR_ID_KEY) {
                        m.insert(OTHER_SENSOR_ID_KEY.to_owned(), id);
                    }
                }
            }
            ListShape::Standard
            | ListShape::DevicesKey
            | ListShape::ItemsKey
            | ListShape::Unrecognised => {}
        }
    }
    item
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use crate::{Envelope, FakeOptions, ListShape};
    use serde_json::json;

    #[tokio::test]
    async fn each_list_shape_puts_the_array_where_it_says() {
        for envelope in [Envelope::Wrapped, Envelope::Bare] {
            let fake = start(FakeOptions {
                envelope,
                ..FakeOptions::default()
            })
            .await;
            plant(&fake, "a", "s-a");
            let wrapped = envelope == Envelope::Wrapped;
            let cases = [
                (ListShape::Standard, if wrapped { "/data" } else { "" }),
                (
                    ListShape::DevicesKey,
                    if wrapped { "/data/devices" } else { "/devices" },
                ),
                (
                    ListShape::ItemsKey,
                    if wrapped { "/data/items" } else { "/items" },
                ),
                (
                    ListShape::Unrecognised,
                    if wrapped {
                        "/data/rows_v3"
                    } else {
                        "/result/rows_v3"
                    },
                ),
            ];
            for (shape, pointer) in cases {
                fake.set_list_shape(shape);
                let list = list_json(&fake, "?metadata=sensor_id:s-a").await;
                let items = list.pointer(pointer).unwrap_or(&Value::Null);
                assert_eq!(names(items), ["a"], "{envelope:?} {shape:?}: {list}");
                if wrapped {
                    assert_eq!(list["success"], true);
                    assert_eq!(list["status"], 200);
                    assert_eq!(list["action"], "list devices");
                }
            }
        }
    }

    #[tokio::test]
    async fn list_items_can_lack_metadata_or_carry_the_sensor_id_as_sensor_id_camel_case() {
        let fake = start(FakeOptions {
            list_shape: ListShape::NoMetadata,
            ..FakeOptions::default()
        })
        .await;
        plant(&fake, "a", "s-a");
        plant(&fake, "b", "s-b");
        let list = list_json(&fake, "?metadata=sensor_id:s-a").await;
        assert_eq!(names(&list["data"]), ["a"], "the filter still applies");
        assert!(list["data"][0].get("metadata").is_none(), "{list}");

        fake.set_list_shape(ListShape::SensorIdUnderOtherKey);
        for filter in ["sensor_id:s-a", "sensorId:s-a"] {
            let list = list_json(&fake, &format!("?metadata={filter}")).await;
            assert_eq!(names(&list["data"]), ["a"], "{filter}");
            assert_eq!(list["data"][0]["metadata"], json!({"sensorId": "s-a"}));
        }
        // GET answers are not list items: they keep the stored key.
        let id = fake.devices()[1].id.clone();
        let got: Value = json_of(
            client()
                .get(format!("{}/{id}", devices_url(&fake)))
                .bearer_auth(fake.api_key())
                .send()
                .await
                .expect("get"),
        )
        .await;
        assert_eq!(got["data"]["metadata"], json!({"sensor_id": "s-a"}));
    }

    #[tokio::test]
    async fn paginated_lists_answer_one_page_with_its_counts() {
        let fake = start(FakeOptions {
            list_page_size: Some(2),
            ..FakeOptions::default()
        })
        .await;
        for name in ["d1", "d2", "d3"] {
            plant(&fake, name, "same");
        }
        let first = list_json(&fake, "?metadata=sensor_id:same").await;
        assert_eq!(names(&first["data"]), ["d3", "d2"]);
        assert_eq!(
            (
                &first["page"],
                &first["limit"],
                &first["total"],
                &first["total_pages"]
            ),
            (&json!(1), &json!(2), &json!(3), &json!(2))
        );
        assert_eq!(first["message"], "Devices listed successfully.");
        let second = list_json(&fake, "?metadata=sensor_id:same&page=2").await;
        assert_eq!(names(&second["data"]), ["d1"]);
        assert_eq!(second["page"], 2);
        let past = list_json(&fake, "?page=9").await;
        assert_eq!(names(&past["data"]), Vec::<&str>::new());
        assert_eq!((&past["page"], &past["total"]), (&json!(9), &json!(3)));

        let bad = client()
            .get(format!("{}?page=0", devices_url(&fake)))
            .bearer_auth(fake.api_key())
            .send()
            .await
            .expect("list");
        assert_eq!(bad.status(), 400);
    }

    #[tokio::test]
    async fn bare_paginated_lists_put_the_page_under_items() {
        let fake = start(FakeOptions {
            envelope: Envelope::Bare,
            list_page_size: Some(1),
            ..FakeOptions::default()
        })
        .await;
        plant(&fake, "d1", "x");
        plant(&fake, "d2", "x");
        let list = list_json(&fake, "?page=2").await;
        assert_eq!(
            list,
            json!({"items": list["items"].clone(), "page": 2, "limit": 1, "total": 2,
                   "total_pages": 2})
        );
        assert_eq!(names(&list["items"]), ["d1"]);
        fake.set_list_page_size(None);
        assert_eq!(names(&list_json(&fake, "").await), ["d2", "d1"]);
    }

    #[tokio::test]
    async fn the_list_can_ignore_its_filter_list_oldest_first_and_show_created_at() {
        let fake = start(FakeOptions::default()).await;
        plant(&fake, "old", "s-old");
        plant(&fake, "new", "s-new");
        let list = list_json(&fake, "?metadata=sensor_id:s-old").await;
        assert_eq!(names(&list["data"]), ["old"]);
        assert!(
            list["data"][0].get("created_at").is_none(),
            "off by default"
        );

        fake.set_list_ignores_filter(true);
        let list = list_json(&fake, "?metadata=sensor_id:s-old").await;
        assert_eq!(names(&list["data"]), ["new", "old"]);

        fake.set_list_newest_first(false);
        fake.set_created_at_field(true);
        let list = list_json(&fake, "").await;
        assert_eq!(names(&list["data"]), ["old", "new"]);
        let created_at = list["data"][0]["created_at"].as_str().expect("created_at");
        assert!(
            created_at.ends_with('Z') && created_at.len() == 27,
            "{created_at}"
        );
        let id = fake.devices()[0].id.clone();
        let got: Value = json_of(
            client()
                .get(format!("{}/{id}", devices_url(&fake)))
                .bearer_auth(fake.api_key())
                .send()
                .await
                .expect("get"),
        )
        .await;
        assert!(got["data"]["created_at"].is_string(), "{got}");

        fake.reset();
        plant(&fake, "a", "s");
        plant(&fake, "b", "s");
        let list = list_json(&fake, "?metadata=sensor_id:nothing").await;
        assert_eq!(
            names(&list["data"]),
            Vec::<&str>::new(),
            "reset restores the filter"
        );
        let list = list_json(&fake, "").await;
        assert_eq!(names(&list["data"]), ["b", "a"], "and newest first");
        assert!(list["data"][0].get("created_at").is_none());
    }
}
