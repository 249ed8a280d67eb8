//! The device list read without HTTP: every accepted list shape, pagination
//! followed page by page, and which of the sensor's devices is adopted.

use serde_json::Value;

use super::dates::parse_rfc3339;

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
pub(super) struct ListReader {
    items: Vec<ListItem>,
    /// The page the next answer is for (0 before the first).
    requested: u64,
    total_pages: Option<u64>,
}

impl ListReader {
    /// Takes the answer for the page asked for; returns the next page to ask for.
    pub(super) fn read(&mut self, answer: &Value) -> Result<Option<u64>, String> {
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

    #[cfg(test)]
    pub(super) fn finish(self, sensor_id: &str) -> Result<Option<String>, String> {
        match_sensor(&self.items, sensor_id)
    }

    /// The sensor's device and the gateway its metadata names as its owner.
    pub(super) fn finish_found(self, sensor_id: &str) -> Result<Option<Found>, String> {
        let Some(id) = match_sensor(&self.items, sensor_id)? else {
            return Ok(None);
        };
        let gateway_id = self
            .items
            .iter()
            .find(|i| i.id == id)
            .and_then(|i| i.metadata.get("gateway_id"))
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Some(Found { id, gateway_id }))
    }
}

/// A sensor's device as the list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub id: String,
    /// Its `gateway_id` metadata: the gateway that bridges it (`None`: not set, a
    /// device made by hand).
    pub gateway_id: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;
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
    fn the_lookup_names_the_gateway_the_chosen_device_belongs_to() {
        let answer = json!([
            {"id": "b", "metadata": {"sensor_id": "s1", "gateway_id": "gw-b"}},
            {"id": "a", "metadata": {"sensor_id": "s1", "gateway_id": "gw-a"}},
            {"id": "c", "metadata": {"sensor_id": "s2", "gateway_id": "gw-c"}},
        ]);
        let found = |sensor: &str, answer: &Value| {
            let mut reader = ListReader::default();
            reader.read(answer).unwrap();
            reader.finish_found(sensor).unwrap()
        };
        let a = found("s1", &answer).unwrap();
        assert_eq!(
            (a.id.as_str(), a.gateway_id.as_deref()),
            ("a", Some("gw-a"))
        );
        let by_hand = json!([{"id": "d", "metadata": {"sensor_id": "s1"}}]);
        assert_eq!(found("s1", &by_hand).unwrap().gateway_id, None);
        assert_eq!(found("s3", &answer), None);
    }
}
