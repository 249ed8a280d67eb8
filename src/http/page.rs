//! The gateway page: server-rendered HTML for a browser, readable on a phone and
//! working without JavaScript. `/` shows the gateway, its sensors (searchable, in
//! pages of [`index::PAGE`] read straight from the store's sorted records) and the
//! sensors waiting; `/sensor/<id>` one sensor, its recent events ([`crate::events`])
//! and a forget button. Forgetting takes two POSTs (the button, then a
//! confirmation), each with a token against cross-site requests ([`csrf`]), and goes
//! through the same forget as `onboardd devices forget`.
//!
//! No device token or claim key is ever rendered: records are shown through the
//! CLI's own row, built without the token, and the claim key only by fingerprint.

mod csrf;
mod html;
mod index;
mod sensor;

use std::sync::Arc;
use std::time::Instant;

use super::wire::{self, Response};
use crate::engine::Engine;
use crate::mqtt::Mqtt;
use crate::open_broker::Verdict;

/// What the page says of the gateway besides what the engine knows.
pub struct Gateway {
    pub gateway_id: String,
    /// `host:port` of the MQTT broker.
    pub broker: String,
    /// When the daemon started: its uptime.
    pub started: Instant,
    /// [`crate::claim_key::fingerprint`] of the claim key, never the key.
    pub claim_fingerprint: String,
    /// Whether the broker lets anyone in, as last probed.
    pub open: Arc<Verdict>,
}

/// The page's own state: the gateway's description and the token secret.
pub struct Page {
    gateway: Gateway,
    csrf: csrf::Csrf,
}

impl Page {
    pub fn new(gateway: Gateway) -> Page {
        Page {
            gateway,
            csrf: csrf::Csrf::new(),
        }
    }
}

/// What a handler reads.
struct Ctx<'a> {
    engine: &'a Engine,
    mqtt: &'a Mqtt,
    page: &'a Page,
    now_ms: u64,
}

const HTML: &str = "text/html; charset=utf-8";
/// No scripts, no framing (a framed forget button could be clicked by a user who
/// thinks they click something else), forms only back to the gateway itself.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'";

/// The answer to a request for the page, or None when `target` is not the page's.
pub async fn handle(
    page: &Page,
    engine: &Engine,
    mqtt: &Mqtt,
    method: &str,
    target: &str,
    form: &[(String, String)],
) -> Option<Response> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let sensor_path = path.strip_prefix("/sensor/");
    if path != "/" && sensor_path.is_none() {
        return None;
    }
    let ctx = Ctx {
        engine,
        mqtt,
        page,
        now_ms: crate::clock::system_ms(),
    };
    let response = match (method, sensor_path) {
        ("GET" | "HEAD", None) => blocking(|| index(&ctx, query)),
        ("GET" | "HEAD", Some(rest)) if !rest.contains('/') => match wire::decode(rest) {
            Some(id) => blocking(|| sensor::render(&ctx, &id)),
            None => not_found("not a sensor id"),
        },
        ("POST", Some(rest)) => match rest.strip_suffix("/forget").and_then(wire::decode) {
            Some(id) => forget(&ctx, &id, form).await,
            None => Response::text(405, "POST only to /sensor/<id>/forget\n")
                .with("Allow", "GET, HEAD".into()),
        },
        (_, Some(rest)) if rest.ends_with("/forget") => {
            Response::text(405, "POST only\n").with("Allow", "POST".into())
        }
        _ => Response::text(405, "GET only\n").with("Allow", "GET, HEAD".into()),
    };
    Some(response.with("Content-Security-Policy", CSP.into()))
}

/// Runs `f`, which reads the store synchronously (a search reads up to thousands of
/// records), without holding up the other tasks queued on this worker thread.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn index(ctx: &Ctx, query: &str) -> Response {
    let Ok(fields) = wire::parse_form(query.as_bytes()) else {
        return Response::text(400, "bad query string\n");
    };
    let q = index::Query::from_fields(&fields);
    match index::render(ctx, &q) {
        Ok(body) => Response::new(200, HTML, body),
        Err(e) => error_page(500, "The store cannot be read", &e.to_string()),
    }
}

fn not_found(why: &str) -> Response {
    error_page(404, "Not found", why)
}

fn error_page(status: u16, title: &str, detail: &str) -> Response {
    let body = format!(
        "<h1>{}</h1><p>{}</p><p><a href=\"/\">Back to the gateway</a></p>",
        html::escape(title),
        html::escape(detail)
    );
    Response::new(status, HTML, html::layout(title, false, &body))
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The forget button's POST: without `confirm=yes` a confirmation page, with it
/// the forget itself, then back to `/`. A missing or wrong token is refused.
async fn forget(ctx: &Ctx<'_>, sensor: &str, form: &[(String, String)]) -> Response {
    let token = field(form, "token").unwrap_or_default();
    if !ctx.page.csrf.verify(sensor, token, ctx.now_ms / 1000) {
        tracing::warn!(
            sensor_id = sensor,
            "http: a forget of {sensor} without a valid form token refused"
        );
        return error_page(
            403,
            "Refused",
            "This form is out of date or did not come from this gateway's page: open the sensor's page again.",
        );
    }
    if field(form, "confirm") != Some("yes") {
        return sensor::confirm(ctx, sensor, token);
    }
    let delete_with = (field(form, "delete_remote") == Some("yes")).then(|| ctx.engine.cloud());
    let store = ctx.engine.store();
    match crate::control::forget::forget(store, Some(ctx.engine), delete_with, sensor).await {
        Ok(done) => {
            if let Some(done) = &done {
                let said = crate::control::forget::describe(sensor, &done.remote);
                tracing::info!(
                    sensor_id = sensor,
                    "forgotten from the gateway page: {said}"
                );
            }
            Response::new(303, HTML, String::new()).with("Location", "/".into())
        }
        Err(e) => error_page(
            502,
            "Nothing was forgotten",
            &crate::logging::chain(&e).to_string(),
        ),
    }
}
