//! `/sensor/<id>`: one sensor's record (never its token), its uplink, its recent
//! events, and the forget button; and the confirmation page the button leads to.

use std::fmt::Write as _;

use super::html::{ago, date, escape, layout};
use super::index::uplink_state;
use super::wire::{encode, Response};
use super::{error_page, Ctx, HTML};
use crate::control::DeviceRow;
use crate::onboarding::Provenance;

pub fn render(ctx: &Ctx, sensor: &str) -> Response {
    let store = ctx.engine.store();
    let rec = match store.get(sensor) {
        Ok(rec) => rec,
        Err(e) => return error_page(500, "The store cannot be read", &e.to_string()),
    };
    let mut body = format!(
        "<p><a href=\"/\">\u{2190} All sensors</a></p><h1>{}</h1>",
        escape(sensor)
    );
    let status = match &rec {
        None => {
            body.push_str(
                "<p>This gateway does not know this sensor (never announced, or forgotten).</p>",
            );
            404
        }
        Some(rec) => {
            let r = DeviceRow::from_record(sensor, rec, false);
            let mut dl = String::from("<dl id=\"record\">");
            let mut item = |k: &str, v: &str| {
                let _ = write!(dl, "<dt>{k}</dt><dd>{}</dd>", escape(v));
            };
            item("Name", &r.name);
            item("State", &r.state);
            item("Device", r.device_id.as_deref().unwrap_or("(none yet)"));
            item("Brand / model", &format!("{} / {}", r.brand, r.model));
            item(
                "Origin",
                match rec.provenance {
                    Provenance::Firmware => "firmware (announced)",
                    Provenance::Discovered => "discovered",
                },
            );
            if let Some(o) = &r.origin {
                item("Device made", o);
            }
            if let Some(owner) = &r.owned_by {
                item(
                    "Bridged by",
                    &format!("another gateway ({owner}) until adopted here"),
                );
            }
            item("Bridged", if r.bridged { "yes" } else { "no" });
            item("First seen", &date(r.first_seen_ms));
            item("Updated", &date(r.updated_ms));
            if let Some(ms) = store.last_seen(sensor).ok().flatten() {
                item(
                    "Last seen",
                    &format!("{} ({})", ago(ctx.now_ms, ms), date(ms)),
                );
            }
            if rec.state.is_unfinished() {
                item("Failed attempts", &r.attempts.to_string());
            }
            if let Some(e) = &r.last_error {
                item("Last error", e);
            }
            if let Some(s) = ctx.engine.bridge().and_then(|b| b.device_status(sensor)) {
                item("Uplink", &uplink_state(&s.state));
                item("Readings buffered", &s.buffered.to_string());
            }
            dl.push_str("</dl>");
            body.push_str(&dl);
            let token = ctx.page.csrf.token(sensor, ctx.now_ms / 1000);
            let _ = write!(
                body,
                "<form method=\"post\" action=\"/sensor/{}/forget\"><input type=\"hidden\" name=\"token\" value=\"{token}\">\
                 <button type=\"submit\" id=\"forget\" class=\"danger\">Forget\u{2026}</button></form>",
                encode(sensor)
            );
            200
        }
    };
    events(ctx, sensor, &mut body);
    Response::new(
        status,
        HTML,
        layout(&format!("{sensor} · onboardd"), true, &body),
    )
}

fn events(ctx: &Ctx, sensor: &str, out: &mut String) {
    let events = crate::events::Events::global().recent(sensor);
    out.push_str("<h2>Recent events</h2>");
    if events.is_empty() {
        out.push_str("<p>None since the daemon started.</p>");
        return;
    }
    out.push_str("<div class=\"scroll\"><table id=\"events\"><thead><tr><th>When</th><th>Level</th><th>What</th></tr></thead><tbody>");
    for e in events {
        let level = e.level.as_str();
        let _ = write!(
            out,
            "<tr class=\"{level}\"><td title=\"{}\">{}</td><td>{level}</td><td class=\"wrap\">{}</td></tr>",
            date(e.at_ms),
            ago(ctx.now_ms, e.at_ms),
            escape(&e.text)
        );
    }
    out.push_str("</tbody></table></div>");
}

/// The second step of a forget: what it does, and the form that does it.
pub fn confirm(ctx: &Ctx, sensor: &str, token: &str) -> Response {
    let device = match ctx.engine.store().get(sensor) {
        Ok(Some(rec)) => rec.credentials().map(|c| c.device_id.clone()),
        Ok(None) => {
            return error_page(
                404,
                "Not found",
                &format!("{sensor} is not known to this gateway"),
            )
        }
        Err(e) => return error_page(500, "The store cannot be read", &e.to_string()),
    };
    let cloud = match &device {
        Some(id) => format!(
            "Its Qubitro device <code>{}</code> is kept unless you tick the box below (Qubitro bills it every \
             hour while it exists; deleting it deletes its data too).",
            escape(id)
        ),
        None => "It has no Qubitro device yet.".to_string(),
    };
    let delete = if device.is_some() {
        "<p><label><input type=\"checkbox\" name=\"delete_remote\" value=\"yes\"> Also delete its Qubitro device</label></p>"
    } else {
        ""
    };
    let body = format!(
        "<h1>Forget {}?</h1><p>The gateway drops its record: {cloud} If the sensor announces again it is onboarded anew.</p>\
         <form method=\"post\" action=\"/sensor/{}/forget\"><input type=\"hidden\" name=\"token\" value=\"{}\">\
         <input type=\"hidden\" name=\"confirm\" value=\"yes\">{delete}\
         <button type=\"submit\" id=\"confirm\" class=\"danger\">Forget {}</button> <a href=\"/sensor/{}\">Cancel</a></form>",
        escape(sensor),
        encode(sensor),
        escape(token),
        escape(sensor),
        encode(sensor),
    );
    Response::new(
        200,
        HTML,
        layout(&format!("Forget {sensor}?"), false, &body),
    )
}
