//! The daemon's HTTP listener: `/healthz` for Docker's HEALTHCHECK and load
//! balancers, `/metrics` for Prometheus ([`exposition`]), and the gateway page for
//! a browser ([`page`]: `/` and `/sensor/<id>`). Loopback by default; beyond it only
//! with HTTP Basic ([`auth`]), POSTs included; HTTPS only when `http.cert_file` and
//! `http.key_file` are set. Every resource a client can make it hold is bounded:
//! connections, header bytes and count, body bytes (a small form only, [`wire`]),
//! time per connection; a connection serves one request.

mod auth;
mod exposition;
mod page;
mod wire;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;
use crate::engine::Engine;
use crate::mqtt::Mqtt;
use crate::open_broker::Verdict;
use wire::{Head, Parsed, Response};

pub use page::Gateway;

/// Connections served at once; more are closed unanswered (a scraper and a health
/// check need a handful).
const MAX_CONNECTIONS: usize = 32;
/// A whole connection, from accept to the end of the response: a client slow to
/// send its request is dropped.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long /healthz waits for the store's flusher before calling it stuck (within
/// the connection's time).
const STORE_CHECK: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("http.listen: cannot listen on {addr} (set a free address, or \"\" to turn it off): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// `http.cert_file` or `http.key_file` unusable: no listener rather than plain
    /// HTTP where HTTPS was configured.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// What the handlers read.
struct State {
    engine: Arc<Engine>,
    mqtt: Mqtt,
    /// Whether the broker lets anyone in (its latest probe).
    open_broker: Arc<Verdict>,
    /// None on loopback without `password_file`: no authentication.
    password: Option<String>,
    failures: Mutex<auth::Failures>,
    page: page::Page,
}

/// Binds `[http] listen` (None when off) and serves it until `stop`.
pub async fn serve(
    cfg: &HttpConfig,
    engine: Arc<Engine>,
    mqtt: Mqtt,
    gateway: Gateway,
    open_broker: Arc<Verdict>,
    stop: CancellationToken,
) -> Result<Option<JoinHandle<()>>, HttpError> {
    let Some(addr) = cfg.listen_addr() else {
        return Ok(None);
    };
    let tls = match cfg.tls() {
        true => Some(TlsAcceptor::from(Arc::new(crate::tls::server_config(
            Path::new(&cfg.cert_file),
            Path::new(&cfg.key_file),
            cfg.key.expose(),
        )?))),
        false => None,
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(
        listen = %bound,
        authenticated = !cfg.password.is_empty(),
        https = tls.is_some(),
        "http listening on {bound}: the gateway page /, /healthz, /metrics{}",
        if tls.is_some() { " (HTTPS only)" } else { "" }
    );
    let state = Arc::new(State {
        engine,
        mqtt,
        open_broker,
        password: Some(cfg.password.expose().to_string()).filter(|p| !p.is_empty()),
        failures: Mutex::default(),
        page: page::Page::new(gateway),
    });
    Ok(Some(tokio::spawn(accept(listener, state, tls, stop))))
}

async fn accept(
    listener: TcpListener,
    state: Arc<State>,
    tls: Option<TlsAcceptor>,
    stop: CancellationToken,
) {
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
        let tls = tls.clone();
        tokio::spawn(async move {
            // The handshake counts against the connection's time: a client that
            // stalls it is dropped like one slow to send its request.
            let served = async {
                match tls {
                    Some(acceptor) => {
                        let stream = acceptor.accept(stream).await?;
                        connection(stream, peer.ip(), &state).await
                    }
                    None => connection(stream, peer.ip(), &state).await,
                }
            };
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, served).await;
            drop(slot);
        });
    }
}

/// One request, one response, then the connection closes.
async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    client: IpAddr,
    state: &State,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; wire::MAX_HEAD_BYTES];
    let mut len = 0;
    let (response, head_only) = loop {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        match wire::parse(&buf[..len]) {
            Parsed::Partial => continue,
            Parsed::Refuse(r) => break (r, false),
            Parsed::Complete(head) => {
                let form = match read_form(&mut stream, &mut buf, len, &head).await? {
                    Ok(form) => form,
                    Err(refused) => break (refused, false),
                };
                break (
                    handle(state, client, &head, &form).await,
                    head.method == "HEAD",
                );
            }
        }
    };
    stream.write_all(&response.encode(head_only)).await?;
    stream.shutdown().await
}

/// The request's form body, read to its Content-Length (bounded by [`wire::body_len`]).
async fn read_form<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    mut len: usize,
    head: &Head,
) -> std::io::Result<Result<Vec<(String, String)>, Response>> {
    let want = match wire::body_len(head) {
        Ok(0) => return Ok(Ok(Vec::new())),
        Ok(n) => n,
        Err(refused) => return Ok(Err(refused)),
    };
    let end = head.head_len + want;
    buf.resize(end.max(len), 0);
    while len < end {
        let n = stream.read(&mut buf[len..end]).await?;
        if n == 0 {
            return Ok(Err(Response::text(
                400,
                "body shorter than its Content-Length\n",
            )));
        }
        len += n;
    }
    Ok(wire::parse_form(&buf[head.head_len..end]))
}

async fn handle(state: &State, client: IpAddr, req: &Head, form: &[(String, String)]) -> Response {
    if let Some(password) = &state.password {
        if let Some(refused) = authenticate(state, password, client, req) {
            return refused;
        }
    }
    let (engine, mqtt) = (&*state.engine, &state.mqtt);
    if let Some(r) = page::handle(&state.page, engine, mqtt, &req.method, &req.path, form).await {
        return r;
    }
    if req.method != "GET" && req.method != "HEAD" {
        return Response::text(405, "GET only\n").with("Allow", "GET, HEAD".into());
    }
    // Only the page's forms take a body.
    if req.content_length > 0 {
        return Response::text(413, "no body expected\n");
    }
    match req.path.as_str() {
        "/healthz" => healthz(state).await,
        "/metrics" => Response::new(
            200,
            exposition::CONTENT_TYPE,
            exposition::render(&sample(state)),
        ),
        _ => Response::text(404, "/, /healthz or /metrics\n"),
    }
}

/// The refusal to send, or None when the request carries the password.
fn authenticate(state: &State, password: &str, client: IpAddr, req: &Head) -> Option<Response> {
    let now = Instant::now();
    let mut failures = state.failures.lock().unwrap_or_else(|e| e.into_inner());
    if failures.blocked(client, now) {
        let r = Response::text(429, "too many failed attempts\n");
        return Some(r.with("Retry-After", auth::WINDOW.as_secs().to_string()));
    }
    if auth::basic_matches(req.authorization.as_deref(), password) {
        return None;
    }
    let attempts = failures.record(client, now);
    // Only the address and the count: what was sent may be a mistyped password.
    tracing::warn!(
        client = %client,
        attempts,
        "http: refused a request from {client} without the right password ({attempts} in the last minute)"
    );
    let r = Response::text(401, "password required\n");
    Some(r.with("WWW-Authenticate", "Basic realm=\"onboardd\"".into()))
}

async fn healthz(state: &State) -> Response {
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
        None => {
            let cloud = serde_json::to_string(&state.engine.cloud_status()).unwrap_or_default();
            format!(r#"{{"status":"ok","broker":"connected","store":"writable","cloud":{cloud}}}"#)
        }
        Some(reason) => format!(r#"{{"status":"unavailable","reason":"{reason}"}}"#),
    };
    let status = if reason.is_none() { 200 } else { 503 };
    Response::new(status, "application/json", body)
}

fn sample(state: &State) -> exposition::Sample {
    let engine = &state.engine;
    let store = engine.store();
    exposition::Sample {
        counters: crate::metrics::snapshot(engine.pending_now()),
        announces: crate::metrics::announce_results(),
        announce_reply: crate::metrics::announce_reply_times(),
        replies_delivered: crate::metrics::replies_delivered(),
        cloud: crate::metrics::cloud_requests(),
        onboarding_now: engine.pending_now(),
        sensors: store.sensors_by_state(),
        bridge: engine.bridge().map(|b| (b.stats(), b.uplinks_paused())),
        mqtt_connected: state.mqtt.is_connected(),
        cloud_ok: engine.cloud_status() == "ok",
        open_broker: state.open_broker.open(),
        store_bytes: store.size_on_disk().ok(),
        bytes_written: crate::metrics::bytes_written(),
        version: env!("CARGO_PKG_VERSION"),
    }
}
