//! The daemon's HTTP listener: `/healthz` for Docker's HEALTHCHECK and load
//! balancers, `/metrics` for Prometheus ([`exposition`]). Loopback by default;
//! beyond it only with HTTP Basic ([`auth`]). Every resource a client can make it
//! hold is bounded: connections, header bytes and count, time per connection; no
//! request body is read, and a connection serves one request.

mod auth;
mod exposition;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;
use crate::engine::Engine;
use crate::mqtt::Mqtt;

/// Connections served at once; more are closed unanswered (a scraper and a health
/// check need a handful).
const MAX_CONNECTIONS: usize = 32;
/// Bytes of request line and headers (hyper's smallest read buffer).
const MAX_HEADER_BYTES: usize = 8192;
const MAX_HEADERS: usize = 32;
/// From accept to the end of the request's headers: a slow client is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole connection, response included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// How long /healthz waits for the store's flusher before calling it stuck.
const STORE_CHECK: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("http.listen: cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the handlers read.
struct State {
    engine: Arc<Engine>,
    mqtt: Mqtt,
    /// None on loopback without `password_file`: no authentication.
    password: Option<String>,
    failures: Mutex<auth::Failures>,
}

/// Binds `[http] listen` (None when off) and serves it until `stop`.
pub async fn serve(
    cfg: &HttpConfig,
    engine: Arc<Engine>,
    mqtt: Mqtt,
    stop: CancellationToken,
) -> Result<Option<JoinHandle<()>>, HttpError> {
    let Some(addr) = cfg.listen_addr() else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(
        listen = %bound,
        authenticated = !cfg.password.is_empty(),
        "http listening on {bound}: /healthz, /metrics"
    );
    let state = Arc::new(State {
        engine,
        mqtt,
        password: Some(cfg.password.expose().to_string()).filter(|p| !p.is_empty()),
        failures: Mutex::default(),
    });
    Ok(Some(tokio::spawn(accept(listener, state, stop))))
}

async fn accept(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, mostly: wait instead of spinning.
                    tracing::warn!(error = %e, "http: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(client = %peer, "http: too many connections, closing one");
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, peer.ip(), req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .max_headers(MAX_HEADERS)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(slot);
        });
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn handle(state: &State, client: IpAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(password) = &state.password {
        if let Some(refused) = authenticate(state, password, client, &req) {
            return refused;
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    // Nothing here takes a body; not reading one keeps memory bounded.
    if req.body().size_hint().lower() > 0 {
        return reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            "text/plain",
            "no body expected\n",
        );
    }
    match req.uri().path() {
        "/healthz" => healthz(state).await,
        "/metrics" => reply(
            StatusCode::OK,
            exposition::CONTENT_TYPE,
            exposition::render(&sample(state)),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "/healthz or /metrics\n",
        ),
    }
}

/// The refusal to send, or None when the request carries the password.
fn authenticate(
    state: &State,
    password: &str,
    client: IpAddr,
    req: &Request<Incoming>,
) -> Option<Response<Full<Bytes>>> {
    let now = Instant::now();
    let mut failures = state.failures.lock().unwrap_or_else(|e| e.into_inner());
    if failures.blocked(client, now) {
        let mut r = reply(
            StatusCode::TOO_MANY_REQUESTS,
            "text/plain",
            "too many failed attempts\n",
        );
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(auth::WINDOW.as_secs()));
        return Some(r);
    }
    let header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if auth::basic_matches(header, password) {
        return None;
    }
    let attempts = failures.record(client, now);
    // Only the address and the count: what was sent may be a mistyped password.
    tracing::warn!(
        client = %client,
        attempts,
        "http: refused a request from {client} without the right password ({attempts} in the last minute)"
    );
    let mut r = reply(
        StatusCode::UNAUTHORIZED,
        "text/plain",
        "password required\n",
    );
    r.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"onboardd\""),
    );
    Some(r)
}

async fn healthz(state: &State) -> Response<Full<Bytes>> {
    let store_ok = tokio::time::timeout(STORE_CHECK, state.engine.store().flush_all())
        .await
        .is_ok_and(|r| r.is_ok());
    let reason = if !state.mqtt.is_connected() {
        Some("broker session down")
    } else if !store_ok {
        Some("store not writable")
    } else {
        None
    };
    let body = match reason {
        None => serde_json::json!({
            "status": "ok",
            "broker": "connected",
            "store": "writable",
            "cloud": state.engine.cloud_status(),
        }),
        Some(reason) => serde_json::json!({ "status": "unavailable", "reason": reason }),
    };
    let status = if reason.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    reply(status, "application/json", body.to_string())
}

fn sample(state: &State) -> exposition::Sample {
    exposition::Sample {
        counters: crate::metrics::snapshot(state.engine.pending_now()),
        replies_delivered: crate::metrics::replies_delivered(),
        cloud: crate::metrics::cloud_requests(),
        onboarding_now: state.engine.pending_now(),
        bridge: state.engine.bridge().map(|b| b.stats()),
        mqtt_connected: state.mqtt.is_connected(),
        cloud_ok: state.engine.cloud_status() == "ok",
        version: env!("CARGO_PKG_VERSION"),
    }
}
