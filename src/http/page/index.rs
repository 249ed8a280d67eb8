//! `/`: the gateway, its sensors (a page of [`PAGE`] at a time, searched by id or
//! name) and the sensors waiting (onboarding unfinished, or refused).
//!
//! A page of the listing reads the store's records from just after the last id of
//! the page before (`?after=`), in the records tree's own order: it costs its own
//! records, not the fleet. A search reads on until it has a page of matches or has
//! read [`SEARCH_BUDGET`] records; then its next link goes on from where it stopped.

use std::fmt::Write as _;

use super::html::{ago, escape, layout, span};
use super::wire::encode;
use super::Ctx;
use crate::control::DeviceRow;
use crate::onboarding::{Provenance, Record};
use crate::store::{Store, StoreError};

/// Sensors per page.
pub const PAGE: usize = 100;
/// Records a search reads at most per request: one matching little would otherwise
/// read the whole fleet in one request (100 000 records take seconds on a Pi, and hold
/// a worker thread all along).
pub const SEARCH_BUDGET: usize = 5000;
/// Waiting sensors shown at most, of each kind.
const WAITING: usize = 100;

/// What `?q=` and `?after=` ask for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Query {
    /// Part of a sensor id or name, any case; empty: all.
    pub q: String,
    /// The last sensor id of the page before.
    pub after: Option<String>,
}

impl Query {
    pub fn from_fields(fields: &[(String, String)]) -> Query {
        let get = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.trim())
        };
        Query {
            q: get("q").unwrap_or_default().to_string(),
            after: get("after").filter(|a| !a.is_empty()).map(str::to_string),
        }
    }
}

/// Whether a sensor matches a lowercased search: its id or name contains it.
fn matches(q_lower: &str, id: &str, rec: &Record) -> bool {
    q_lower.is_empty()
        || id.to_lowercase().contains(q_lower)
        || rec.spec.name.to_lowercase().contains(q_lower)
}

/// A page of sensors.
#[derive(Debug)]
pub struct Listing {
    pub rows: Vec<(String, Record)>,
    /// Where the next page starts, when there is more to read.
    pub next: Option<String>,
    /// The page is short because the search used up its budget, not the fleet.
    pub cut_short: bool,
}

/// One page of at most `max` sensors for `query`, reading at most `budget` records.
pub fn list(
    store: &Store,
    query: &Query,
    max: usize,
    budget: usize,
) -> Result<Listing, StoreError> {
    let q = query.q.to_lowercase();
    let mut rows: Vec<(String, Record)> = Vec::with_capacity(max.min(PAGE));
    let mut last_read: Option<String> = None;
    for (read, item) in store.scan_after(query.after.as_deref()).enumerate() {
        let (id, rec) = item?;
        if read == budget.max(1) {
            // More records follow: the next page goes on after the last one read.
            let cut_short = rows.len() < max;
            return Ok(Listing {
                rows,
                next: last_read,
                cut_short,
            });
        }
        let wanted = matches(&q, &id, &rec);
        if wanted && rows.len() == max {
            let next = rows.last().map(|(id, _)| id.clone());
            return Ok(Listing {
                rows,
                next,
                cut_short: false,
            });
        }
        if wanted {
            rows.push((id.clone(), rec));
        }
        last_read = Some(id);
    }
    Ok(Listing {
        rows,
        next: None,
        cut_short: false,
    })
}

pub fn render(ctx: &Ctx, query: &Query) -> Result<String, StoreError> {
    let gw = &ctx.page.gateway;
    let mut body = format!("<h1>onboardd on {}</h1>", escape(&gw.gateway_id));
    gateway(ctx, &mut body);
    sensors(ctx, query, &mut body)?;
    waiting(ctx, &mut body)?;
    Ok(layout(
        &format!("onboardd · {}", gw.gateway_id),
        true,
        &body,
    ))
}

fn gateway(ctx: &Ctx, out: &mut String) {
    let gw = &ctx.page.gateway;
    if gw.open.open() == Some(true) {
        out.push_str(
            "<p class=\"warn\"><b>Open broker:</b> the MQTT broker lets clients in without a password. Anyone on \
             the network can take over onboardd's session, write bridged sensors' readings and publish discovery \
             configs: close it with the password file and ACL of README's Raspberry Pi section.</p>",
        );
    }
    let broker = match (ctx.mqtt.is_connected(), ctx.mqtt.down_reason()) {
        (true, _) => "<span class=\"ok\">connected</span>".to_string(),
        (false, Some(why)) => format!(
            "<span class=\"bad\">disconnected: {}</span> (reconnecting)",
            escape(&why)
        ),
        (false, None) => "<span class=\"bad\">not connected yet</span>".to_string(),
    };
    let cloud = ctx.engine.cloud_status();
    let cloud = if cloud == "ok" {
        "<span class=\"ok\">ok</span>".to_string()
    } else {
        format!("<span class=\"bad\">{}</span>", escape(&cloud))
    };
    let _ = write!(
        out,
        "<dl><dt>Gateway</dt><dd>{}</dd><dt>Version</dt><dd>{}</dd><dt>Up</dt><dd>{}</dd>\
         <dt>MQTT broker</dt><dd>{} {broker}</dd><dt>Qubitro</dt><dd>{cloud}</dd>\
         <dt>Claim key</dt><dd><code>{}</code> (fingerprint)</dd><dt>Onboarding now</dt><dd>{}</dd>",
        escape(&gw.gateway_id),
        env!("CARGO_PKG_VERSION"),
        span(gw.started.elapsed().as_secs()),
        escape(&gw.broker),
        escape(&gw.claim_fingerprint),
        ctx.engine.pending_now(),
    );
    if let Some(b) = ctx.engine.bridge().map(|b| b.stats()) {
        let _ = write!(
            out,
            "<dt>Bridge</dt><dd>{} devices, {} readings forwarded, {} buffered, {} dropped</dd>",
            b.bridged_devices, b.forwarded, b.buffered, b.dropped
        );
    }
    out.push_str("</dl>");
}

fn sensors(ctx: &Ctx, query: &Query, out: &mut String) -> Result<(), StoreError> {
    let store = ctx.engine.store();
    let Listing {
        rows,
        next,
        cut_short,
    } = list(store, query, PAGE, SEARCH_BUDGET)?;
    let _ = write!(
        out,
        "<h2>Sensors</h2><form method=\"get\" action=\"/\"><input type=\"search\" name=\"q\" value=\"{}\" \
         placeholder=\"sensor id or name\" aria-label=\"search\"> <button type=\"submit\">Search</button></form>",
        escape(&query.q)
    );
    if cut_short {
        let _ = write!(
            out,
            "<p>Searched {SEARCH_BUDGET} more sensors, up to {}: {} found. The next link searches on.</p>",
            escape(next.as_deref().unwrap_or_default()),
            rows.len()
        );
    } else if rows.is_empty() {
        out.push_str(if query.q.is_empty() {
            "<p>No sensors.</p>"
        } else {
            "<p>No sensor matches.</p>"
        });
    } else {
        out.push_str(
            "<div class=\"scroll\"><table id=\"sensors\"><thead><tr><th>Sensor</th><th>Name</th><th>State</th>\
             <th>Device</th><th>Origin</th><th>Bridged</th><th>Uplink</th><th>Buffered</th><th>Last seen</th></tr>\
             </thead><tbody>",
        );
        for (id, rec) in &rows {
            row(ctx, store, id, rec, out);
        }
        out.push_str("</tbody></table></div>");
    }
    let q = if query.q.is_empty() {
        String::new()
    } else {
        format!("&amp;q={}", encode(&query.q))
    };
    out.push_str("<p>");
    if query.after.is_some() {
        let first = if query.q.is_empty() {
            "/".to_string()
        } else {
            format!("/?q={}", encode(&query.q))
        };
        let _ = write!(out, "<a href=\"{first}\">First page</a> ");
    }
    if let Some(last) = next {
        let _ = write!(
            out,
            "<a id=\"next\" href=\"/?after={}{q}\">{}</a>",
            encode(&last),
            if cut_short {
                "Search on".to_string()
            } else {
                format!("Next {PAGE}")
            }
        );
    }
    out.push_str("</p>");
    Ok(())
}

fn row(ctx: &Ctx, store: &Store, id: &str, rec: &Record, out: &mut String) {
    let r = DeviceRow::from_record(id, rec, false);
    let origin = match rec.provenance {
        Provenance::Firmware => "firmware",
        Provenance::Discovered => "discovered",
    };
    let status = ctx.engine.bridge().and_then(|b| b.device_status(id));
    let uplink = status
        .as_ref()
        .map(|s| uplink_state(&s.state))
        .unwrap_or_default();
    let buffered = status.map(|s| s.buffered.to_string()).unwrap_or_default();
    let seen = match store.last_seen(id).ok().flatten() {
        Some(ms) => ago(ctx.now_ms, ms),
        None => String::new(),
    };
    let _ = write!(
        out,
        "<tr><td><a href=\"/sensor/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{origin}</td><td>{}</td>\
         <td>{}</td><td>{buffered}</td><td>{seen}</td></tr>",
        encode(id),
        escape(id),
        escape(&r.name),
        r.state,
        escape(r.device_id.as_deref().unwrap_or("")),
        if r.bridged { "yes" } else { "no" },
        escape(&uplink),
    );
}

/// An uplink's state in a few words.
pub fn uplink_state(state: &crate::bridge::DeviceState) -> String {
    use crate::bridge::DeviceState;
    match state {
        DeviceState::Idle => "idle".into(),
        DeviceState::Waiting => "waiting for a slot".into(),
        DeviceState::Connecting { attempt } => format!("connecting (attempt {})", attempt + 1),
        DeviceState::Connected => "connected".into(),
        DeviceState::Paused {
            reason,
            next_retry_in_s,
        } => {
            format!("paused: {reason} (retry in {})", span(*next_retry_in_s))
        }
    }
}

/// When a wall-clock time (ms) comes: "now" once it passed.
fn due(now_ms: u64, at_ms: u64) -> String {
    if at_ms <= now_ms {
        "now".into()
    } else {
        format!("in {}", span((at_ms - now_ms).div_ceil(1000)))
    }
}

fn waiting(ctx: &Ctx, out: &mut String) -> Result<(), StoreError> {
    let unfinished = ctx.engine.store().unfinished_first(WAITING)?;
    let refused = crate::events::Events::global().refused(WAITING);
    out.push_str("<h2>Waiting</h2>");
    if unfinished.is_empty() && refused.is_empty() {
        out.push_str("<p>No sensor is waiting.</p>");
        return Ok(());
    }
    out.push_str(
        "<div class=\"scroll\"><table id=\"waiting\"><thead><tr><th>Sensor</th><th>Why</th><th>Reason</th>\
         <th>Next try</th></tr></thead><tbody>",
    );
    for (id, rec) in &unfinished {
        let reason = rec.last_error.as_deref().unwrap_or("");
        let _ = write!(
            out,
            "<tr><td><a href=\"/sensor/{}\">{}</a></td><td>{} ({} failed attempts)</td><td class=\"wrap\">{}</td>\
             <td>{}</td></tr>",
            encode(id),
            escape(id),
            rec.state.name(),
            rec.attempts,
            escape(reason),
            due(ctx.now_ms, rec.next_attempt_ms),
        );
    }
    for (id, r) in &refused {
        let next = match r.retry_after_s {
            Some(s) => due(ctx.now_ms, r.at_ms.saturating_add(s.saturating_mul(1000))),
            None => "when it announces again".into(),
        };
        let _ = write!(
            out,
            "<tr><td><a href=\"/sensor/{}\">{}</a></td><td>{} {}</td><td class=\"wrap\">{}</td><td>{}</td></tr>",
            encode(id),
            escape(id),
            escape(&r.code),
            ago(ctx.now_ms, r.at_ms),
            escape(&r.detail),
            escape(&next),
        );
    }
    out.push_str("</tbody></table></div>");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> Record {
        Record::pending(
            crate::announce::test_spec(),
            crate::reply::Route::default(),
            1,
            1,
        )
    }

    #[tokio::test]
    async fn a_listing_goes_page_by_page_from_the_cursor_and_searches_ids_and_names() {
        let (store, _dir) = crate::engine::records::tests::store();
        for i in 0..5 {
            let mut rec = pending();
            rec.spec.name = format!("Kitchen {i}");
            store.insert_new(&format!("s{i}"), &rec).unwrap();
        }
        let mut rec = pending();
        rec.spec.name = "Greenhouse".into();
        store.insert_new("temp-gh", &rec).unwrap();
        let page = |q: &str, after: Option<&str>, max: usize, budget: usize| {
            let query = Query {
                q: q.into(),
                after: after.map(str::to_string),
            };
            let l = list(&store, &query, max, budget).unwrap();
            let ids: Vec<String> = l.rows.iter().map(|(id, _)| id.clone()).collect();
            (ids, l.next, l.cut_short)
        };
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let next = |id: &str| Some(id.to_string());
        assert_eq!(
            page("", None, 2, 100),
            (s(&["s0", "s1"]), next("s1"), false)
        );
        assert_eq!(
            page("", Some("s1"), 2, 100),
            (s(&["s2", "s3"]), next("s3"), false)
        );
        assert_eq!(
            page("", Some("s3"), 2, 100),
            (s(&["s4", "temp-gh"]), None, false)
        );
        assert_eq!(
            page("GREEN", None, 10, 100),
            (s(&["temp-gh"]), None, false),
            "by name, any case"
        );
        assert_eq!(
            page("gh", None, 10, 100),
            (s(&["temp-gh"]), None, false),
            "by a part of the id"
        );
        assert_eq!(
            page("kitchen", Some("s2"), 10, 100),
            (s(&["s3", "s4"]), None, false)
        );
        assert_eq!(
            page("gh", None, 10, 3),
            (s(&[]), next("s2"), true),
            "a search stops at its budget and says where"
        );
        assert_eq!(
            page("gh", Some("s2"), 10, 3),
            (s(&["temp-gh"]), None, false)
        );
        assert_eq!(page("", None, 2, 2), (s(&["s0", "s1"]), next("s1"), false));
    }

    #[test]
    fn the_query_string_gives_the_search_and_the_cursor() {
        let f = |s: &str| crate::http::wire::parse_form(s.as_bytes()).unwrap();
        assert_eq!(
            Query::from_fields(&f("q=+temp+&after=s%2F1")),
            Query {
                q: "temp".into(),
                after: Some("s/1".into())
            }
        );
        assert_eq!(Query::from_fields(&f("after=")), Query::default());
    }
}
