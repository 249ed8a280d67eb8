//! A fake Qubitro REST API, faithful to the documented endpoints, for tests and firmware work.
//!
//! It speaks real HTTP/1.1 on a real socket so the daemon's client is exercised end to end, and it
//! can misbehave on demand ([`Fault`]) to reproduce what a flaky cloud does to onboarding.
//! Where the documentation disagrees with itself (response envelope, where create puts the
//! credentials, 200 vs 201) the choice is an option, so every documented form can be tested.
//!
//! Requests are routed by an axum [`Router`]; the server runs it on hyper directly rather than
//! through `axum::serve`: `stop()` must drop connections that are still open (a hung request,
//! an idle keep-alive) so clients see a dead cloud, and `axum::serve` keeps every connection
//! alive until it finishes on its own.
//!
//! The list endpoint (onboardd's lookup, `GET …/devices?metadata=sensor_id:ID`) can be made to
//! answer in the other shapes a real API might use ([`ListShape`]), paginated
//! ([`FakeOptions::list_page_size`]), unfiltered, oldest first, or with `created_at` fields, so a
//! client's lookup can be tested against each of them.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Query, Request, State as Ext};
use axum::http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};
use axum::routing::{any, get, post};
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// Project id used when a test does not care which one.
pub const DEFAULT_PROJECT_ID: &str = "5f2c1a9e-8b3d-4e7a-9c61-2d4b8e0f7a13";
/// API key used when a test does not care which one (real keys start with `QB_`).
pub const DEFAULT_API_KEY: &str = "QB_test_key";

const NAME_MAX: usize = 100;
const DESCRIPTION_MAX: usize = 500;
const TOKEN_LEN: usize = 40;
// Far above any legitimate create body; only there so a runaway client cannot eat the memory.
const BODY_LIMIT: usize = 1 << 20;
const AVATAR: &str = "https://static.qubitro.com/portal/device/avatar/default.png";
const NEVER_SEEN: &str = "0001-01-01T00:00:00Z";
/// The metadata key onboardd files a sensor's id under, and the one
/// [`ListShape::SensorIdUnderOtherKey`] shows instead.
const SENSOR_ID_KEY: &str = "sensor_id";
const OTHER_SENSOR_ID_KEY: &str = "sensorId";

/// Response shape: the older docs and the Node SDK wrap everything, the newest docs do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Envelope {
    /// `{"success":…,"action":…,"status":…,"message":…,"data":…}`; errors without `data`.
    #[default]
    Wrapped,
    /// The object itself; errors are `{"message":…}`.
    Bare,
}

/// Where the create response carries the new device's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CredentialsAt {
    /// `data.device_credentials.{device_id,device_token}`; `data.metadata` is the user's own.
    #[default]
    DeviceCredentials,
    /// `data.metadata` is the user's metadata plus `device_id` and `device_token`.
    Metadata,
    /// No credentials at all, only the new device's `id`: the client must GET the device
    /// (the read-after-write path).
    Absent,
}

/// How the list endpoint lays out its answer. Only [`ListShape::Standard`] is what the
/// documentation shows; the others are what an API change, or a client reading the wrong
/// field, would look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListShape {
    /// Wrapped: `{"success":true,"action":…,"status":200,"message":…,"data":[items]}`;
    /// bare: `[items]`.
    #[default]
    Standard,
    /// The array under `"devices"`: wrapped `data: {"devices":[…]}`, bare `{"devices":[…]}`.
    DevicesKey,
    /// The array under `"items"`: wrapped `data: {"items":[…]}`, bare `{"items":[…]}`.
    ItemsKey,
    /// A layout no client knows: wrapped `data: {"rows_v3":[…]}`, bare
    /// `{"result":{"rows_v3":[…]}}`.
    Unrecognised,
    /// The standard layout, but items have no `metadata` key.
    NoMetadata,
    /// The standard layout, but each item's metadata carries the sensor id under `"sensorId"`
    /// instead of `"sensor_id"`. The filter still finds the device: `sensor_id:ID` and
    /// `sensorId:ID` both match a device whose sensor id is ID.
    SensorIdUnderOtherKey,
}

/// The list switches, changeable at run time; [`FakeQubitro::reset`] restores the options'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ListOptions {
    shape: ListShape,
    page_size: Option<usize>,
    ignores_filter: bool,
    newest_first: bool,
    created_at_field: bool,
}

impl ListOptions {
    fn of(opts: &FakeOptions) -> Self {
        ListOptions {
            shape: opts.list_shape,
            page_size: opts.list_page_size,
            ignores_filter: opts.list_ignores_filter,
            newest_first: opts.list_newest_first,
            created_at_field: opts.created_at_field,
        }
    }
}

/// The four documented device calls; faults and counters are kept per endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    Create,
    List,
    Get,
    Delete,
}

impl Endpoint {
    const ALL: [Endpoint; 4] = [
        Endpoint::Create,
        Endpoint::List,
        Endpoint::Get,
        Endpoint::Delete,
    ];

    fn index(self) -> usize {
        self as usize
    }

    fn as_str(self) -> &'static str {
        match self {
            Endpoint::Create => "create",
            Endpoint::List => "list",
            Endpoint::Get => "get",
            Endpoint::Delete => "delete",
        }
    }
}

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

/// Configuration of a [`FakeQubitro`].
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// Port 0 picks a free port; read it back with [`FakeQubitro::addr`].
    pub bind: SocketAddr,
    pub api_key: String,
    /// The only project that exists; any other id is 404.
    pub project_id: String,
    pub envelope: Envelope,
    pub credentials_at: CredentialsAt,
    /// Status of a successful create: 201, or 200 as some docs say.
    pub create_status: u16,
    /// Added to every answer (initial value; see [`FakeQubitro::set_delay`]).
    pub delay: Duration,
    /// Serve HTTPS with this certificate instead of plain HTTP (the TLS path of the
    /// daemon's cloud client is tested against it).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Serve the unauthenticated `/_fake/*` control endpoints (for the standalone binary;
    /// in-process tests have the Rust API instead, and the real cloud has no such paths).
    pub control_endpoints: bool,
    /// Layout of list answers (initial value; see [`FakeQubitro::set_list_shape`]).
    pub list_shape: ListShape,
    /// Paginate list answers with this many items per page, selected by the query parameter
    /// `page` (1-based, default 1). Wrapped answers add `"page"`, `"limit"`, `"total"` and
    /// `"total_pages"` next to `"data"`; bare ones become
    /// `{"items":[…],"page":N,"limit":L,"total":T,"total_pages":P}`. A page past the end is
    /// an empty array with the same fields. `None`: one answer with every match.
    pub list_page_size: Option<usize>,
    /// The list ignores `?metadata=` and answers every device (an API that dropped the filter).
    pub list_ignores_filter: bool,
    /// Order of list items: newest first, as Qubitro documents, or oldest first.
    pub list_newest_first: bool,
    /// Add a `"created_at"` RFC 3339 field to list items and GET answers (the real docs show
    /// none, so off by default).
    pub created_at_field: bool,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_key: DEFAULT_API_KEY.to_owned(),
            project_id: DEFAULT_PROJECT_ID.to_owned(),
            envelope: Envelope::default(),
            credentials_at: CredentialsAt::default(),
            create_status: 201,
            delay: Duration::ZERO,
            control_endpoints: false,
            tls: None,
            list_shape: ListShape::Standard,
            list_page_size: None,
            list_ignores_filter: false,
            list_newest_first: true,
            created_at_field: false,
        }
    }
}

/// A device as the fake stores it, credentials included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FakeDevice {
    pub id: String,
    pub token: String,
    pub name: String,
    pub description: String,
    pub source: String,
    pub brand: String,
    pub model: String,
    pub tags: Vec<String>,
    pub metadata: BTreeMap<String, String>,
}

/// A device to plant before a test, as if another gateway (or a human) had made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDevice {
    pub name: String,
    pub description: String,
    pub source: String,
    pub brand: String,
    pub model: String,
    pub tags: Vec<String>,
    pub metadata: BTreeMap<String, String>,
}

impl NewDevice {
    /// A device with this name and the API's defaults for everything else.
    pub fn named(name: impl Into<String>) -> Self {
        NewDevice {
            name: name.into(),
            ..NewDevice::default()
        }
    }
}

impl Default for NewDevice {
    fn default() -> Self {
        NewDevice {
            name: String::new(),
            description: String::new(),
            source: "mqtt".to_owned(),
            brand: "Custom".to_owned(),
            model: "Custom".to_owned(),
            tags: Vec::new(),
            metadata: BTreeMap::new(),
        }
    }
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// When the request head arrived (before any fault or delay).
    pub at: Instant,
    /// Status answered; 0 while unanswered, and forever for a [`Fault::Hang`].
    pub status: u16,
    /// `None` for paths and methods that are not one of the four device calls.
    pub endpoint: Option<Endpoint>,
}

/// A running (or stopped) fake. Clones share the server and its state.
#[derive(Clone)]
pub struct FakeQubitro {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Mutex<Option<Running>>,
}

struct Running {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The serving task only holds `Shared`, so without this it would outlive every handle.
        if let Some(running) = lock(&self.server).take() {
            running.cancel.cancel();
        }
    }
}

impl FakeQubitro {
    /// Binds `opts.bind` and starts serving on the current tokio runtime.
    pub async fn start(opts: FakeOptions) -> std::io::Result<FakeQubitro> {
        let listener = TcpListener::bind(opts.bind).await?;
        let addr = listener.local_addr()?;
        let (counts, _) = watch::channel([0usize; 4]);
        let shared = Arc::new(Shared {
            state: Mutex::new(Registry::new(&opts)),
            counts,
            hooks: Mutex::new(Vec::new()),
            opts,
        });
        let running = spawn_server(listener, shared.clone());
        Ok(FakeQubitro {
            inner: Arc::new(Inner {
                shared,
                addr,
                server: Mutex::new(Some(running)),
            }),
        })
    }

    /// `http://IP:PORT` (or `https://` with TLS), what the daemon's base_url should be.
    pub fn base_url(&self) -> String {
        let scheme = if self.inner.shared.opts.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.inner.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn project_id(&self) -> String {
        self.inner.shared.opts.project_id.clone()
    }

    pub fn api_key(&self) -> String {
        self.inner.shared.opts.api_key.clone()
    }

    /// Closes the listener and drops every open connection (in-flight requests included), so
    /// clients get "connection refused" until [`restart`](Self::restart). State is kept.
    pub async fn stop(&self) {
        let running = lock(&self.inner.server).take();
        if let Some(running) = running {
            running.cancel.cancel();
            // Waiting makes the guarantee hold when stop() returns: the port is closed and
            // every connection socket has been dropped.
            let _ = running.task.await;
        }
    }

    /// Serves again on the same port with the same devices, records and faults.
    pub async fn restart(&self) -> std::io::Result<()> {
        self.stop().await;
        // tokio sets SO_REUSEADDR, so the connections we just closed (TIME_WAIT) do not block this.
        let listener = TcpListener::bind(self.inner.addr).await?;
        let running = spawn_server(listener, self.inner.shared.clone());
        *lock(&self.inner.server) = Some(running);
        Ok(())
    }

    /// All devices, newest first, credentials included.
    pub fn devices(&self) -> Vec<FakeDevice> {
        let state = self.inner.shared.lock();
        state
            .devices
            .values()
            .rev()
            .map(|s| s.device.clone())
            .collect()
    }

    /// Plants a device as if created through the API (fresh id and token).
    pub fn insert_device(&self, d: NewDevice) -> FakeDevice {
        let device = self.inner.shared.lock().insert(d);
        self.inner.shared.created(&device);
        device
    }

    /// Calls `hook` with every device created from now on (through the API or
    /// [`insert_device`](Self::insert_device)), before the create is answered: a test
    /// hands each device a login on a stand-in for Qubitro's MQTT broker this way
    /// (harness `qubitro_broker`). The hook runs outside the fake's lock.
    pub fn on_device_created(&self, hook: DeviceHook) {
        lock(&self.inner.shared.hooks).push(hook);
    }

    /// Every request so far, in arrival order (faulted and unroutable ones included).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner.shared.lock().requests.clone()
    }

    /// Calls that arrived at this endpoint, whatever was answered.
    pub fn count(&self, ep: Endpoint) -> usize {
        self.inner.shared.counts.borrow()[ep.index()]
    }

    /// Queues faults for the next calls to `ep`, one consumed per call, before normal handling
    /// (so a faulted call is not authenticated or validated).
    pub fn push_faults(&self, ep: Endpoint, faults: Vec<Fault>) {
        self.inner.shared.lock().faults[ep.index()].extend(faults);
    }

    /// Changes the delay added to every answer from now on.
    pub fn set_delay(&self, d: Duration) {
        self.inner.shared.lock().delay = d;
    }

    /// Changes the layout of list answers from now on (see [`FakeOptions::list_shape`]).
    pub fn set_list_shape(&self, shape: ListShape) {
        self.inner.shared.lock().list.shape = shape;
    }

    /// Changes list pagination from now on (see [`FakeOptions::list_page_size`]).
    pub fn set_list_page_size(&self, page_size: Option<usize>) {
        self.inner.shared.lock().list.page_size = page_size;
    }

    /// Makes the list ignore its `?metadata=` filter, or honour it again.
    pub fn set_list_ignores_filter(&self, ignores: bool) {
        self.inner.shared.lock().list.ignores_filter = ignores;
    }

    /// Orders list items newest first (`true`, the default) or oldest first.
    pub fn set_list_newest_first(&self, newest_first: bool) {
        self.inner.shared.lock().list.newest_first = newest_first;
    }

    /// Adds (or stops adding) `"created_at"` to list items and GET answers.
    pub fn set_created_at_field(&self, on: bool) {
        self.inner.shared.lock().list.created_at_field = on;
    }

    /// Resolves once `count(ep) >= n`.
    pub async fn wait_for_requests(&self, ep: Endpoint, n: usize) {
        let mut counts = self.inner.shared.counts.subscribe();
        // The sender lives in `Shared`, which `self` keeps alive, so this cannot fail.
        let _ = counts.wait_for(|c| c[ep.index()] >= n).await;
    }

    /// Forgets devices, records, counters and queued faults, and restores the configured delay
    /// and list switches.
    pub fn reset(&self) {
        self.inner.shared.reset();
    }
}

fn spawn_server(listener: TcpListener, shared: Arc<Shared>) -> Running {
    let cancel = CancellationToken::new();
    let task = tokio::spawn(serve(listener, shared, cancel.clone()));
    Running { cancel, task }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    // Connections live in a JoinSet so stopping can abort them all, which drops their sockets.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(serve_connection(stream, shared.clone()));
                }
                Err(e) => {
                    // Typically EMFILE under a benchmark; pausing beats spinning on the error.
                    tracing::warn!(target: "fake_qubitro", "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    drop(listener);
    conns.shutdown().await;
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    // Small JSON answers: do not let Nagle hold them back behind the client's delayed ACK.
    let _ = stream.set_nodelay(true);
    match shared.opts.tls.clone() {
        None => serve_http(stream, shared).await,
        Some(cfg) => match tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await {
            Ok(tls) => serve_http(tls, shared).await,
            Err(e) => tracing::debug!(target: "fake_qubitro", "TLS handshake failed: {e}"),
        },
    }
}

async fn serve_http<S>(stream: S, shared: Arc<Shared>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router(shared));
    let conn = hyper::server::conn::http1::Builder::new()
        // A fake needs no slowloris protection, and the timeout would require a timer.
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!(target: "fake_qubitro", "connection ended: {e}");
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not turn every later call into a second panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Shared {
    opts: FakeOptions,
    state: Mutex<Registry>,
    // Arrival counters, in a watch channel so wait_for_requests needs no polling.
    counts: watch::Sender<[usize; 4]>,
    /// See [`FakeQubitro::on_device_created`].
    hooks: Mutex<Vec<DeviceHook>>,
}

/// Called with each device the fake creates (see [`FakeQubitro::on_device_created`]).
pub type DeviceHook = Arc<dyn Fn(&FakeDevice) + Send + Sync>;

struct StoredDevice {
    device: FakeDevice,
    created_at: String,
}

struct Registry {
    list: ListOptions,
    // Keyed by creation sequence, so listing newest first is a reverse walk, not a sort.
    devices: BTreeMap<u64, StoredDevice>,
    by_id: HashMap<String, u64>,
    // (metadata key, value) -> sequences of the devices carrying it, so that a filtered list
    // (onboardd's lookup before create) does not scan every device: with 100 000 devices in
    // the benchmark a scan per lookup made the fake, not onboardd, the bottleneck.
    by_meta: HashMap<(String, String), BTreeSet<u64>>,
    next_seq: u64,
    requests: Vec<RecordedRequest>,
    // Bumped by reset() so a request in flight across a reset does not mark someone else's record.
    epoch: u64,
    faults: [VecDeque<Fault>; 4],
    delay: Duration,
}

impl Registry {
    fn new(opts: &FakeOptions) -> Self {
        Registry {
            list: ListOptions::of(opts),
            devices: BTreeMap::new(),
            by_id: HashMap::new(),
            by_meta: HashMap::new(),
            next_seq: 0,
            requests: Vec::new(),
            epoch: 0,
            faults: Default::default(),
            delay: opts.delay,
        }
    }

    fn insert(&mut self, d: NewDevice) -> FakeDevice {
        let device = FakeDevice {
            id: uuid::Uuid::new_v4().to_string(),
            token: device_token(),
            name: d.name,
            description: d.description,
            source: d.source,
            brand: d.brand,
            model: d.model,
            tags: d.tags,
            metadata: d.metadata,
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_id.insert(device.id.clone(), seq);
        for (k, v) in &device.metadata {
            self.by_meta
                .entry((k.clone(), v.clone()))
                .or_default()
                .insert(seq);
        }
        self.devices.insert(
            seq,
            StoredDevice {
                device: device.clone(),
                created_at: rfc3339_now(),
            },
        );
        device
    }

    fn get(&self, id: &str) -> Option<&StoredDevice> {
        self.by_id.get(id).and_then(|seq| self.devices.get(seq))
    }

    fn remove(&mut self, id: &str) -> Option<StoredDevice> {
        let seq = self.by_id.remove(id)?;
        let stored = self.devices.remove(&seq)?;
        for (k, v) in &stored.device.metadata {
            let key = (k.clone(), v.clone());
            if let Some(seqs) = self.by_meta.get_mut(&key) {
                seqs.remove(&seq);
                if seqs.is_empty() {
                    self.by_meta.remove(&key);
                }
            }
        }
        Some(stored)
    }

    /// Devices carrying every pair of `filter`, in creation order or its reverse; only those
    /// carrying the filter's first pair are visited.
    fn matching(&self, filter: &[(String, String)], newest_first: bool) -> Vec<&StoredDevice> {
        let candidates: Vec<&StoredDevice> = match filter.first() {
            Some(pair) => self
                .by_meta
                .get(pair)
                .into_iter()
                .flatten()
                .filter_map(|seq| self.devices.get(seq))
                .collect(),
            None => self.devices.values().collect(),
        };
        let matches = |s: &&StoredDevice| {
            filter
                .iter()
                .all(|(k, v)| s.device.metadata.get(k).is_some_and(|have| have == v))
        };
        let mut found: Vec<&StoredDevice> = candidates.into_iter().filter(matches).collect();
        if newest_first {
            found.reverse();
        }
        found
    }
}

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

type Shd = Ext<Arc<Shared>>;

/// The documented device API, plus `/_fake/*` when the options ask for it. Every API request
/// (unroutable ones included) goes through [`Shared::handle`], which records it and applies
/// faults; the control paths are not recorded.
fn router(shared: Arc<Shared>) -> Router {
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
        router = router
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
            .route("/_fake/{*rest}", any(control_unknown));
    }
    router.fallback(not_found).with_state(shared)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        lock(&self.state)
    }

    /// Tells every hook of a new device (outside the registry lock).
    fn created(&self, device: &FakeDevice) {
        let hooks: Vec<DeviceHook> = lock(&self.hooks).clone();
        for hook in hooks {
            hook(device);
        }
    }

    fn reset(&self) {
        let mut state = self.lock();
        let epoch = state.epoch + 1;
        *state = Registry::new(&self.opts);
        state.epoch = epoch;
        drop(state);
        self.counts.send_replace([0; 4]);
    }

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
                .then(|| state.get(&device.id).map(|s| s.created_at.clone()))
                .flatten();
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

    fn list(&self, uri: &Uri) -> Response<Body> {
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
                .map(|s| (s.device.clone(), s.created_at.clone()))
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

    fn get(&self, id: &str) -> Response<Body> {
        let found = {
            let state = self.lock();
            let with_created_at = state.list.created_at_field;
            state.get(id).map(|s| {
                (
                    s.device.clone(),
                    with_created_at.then(|| s.created_at.clone()),
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
        if self.lock().remove(id).is_none() {
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

    fn success(
        &self,
        status: StatusCode,
        action: &str,
        message: &str,
        data: Value,
    ) -> Response<Body> {
        match self.opts.envelope {
            Envelope::Wrapped => json_response(
                status,
                &json!({"success": true, "action": action, "status": status.as_u16(),
                        "message": message, "data": data}),
            ),
            Envelope::Bare => json_response(status, &data),
        }
    }

    fn error(&self, status: StatusCode, message: impl Into<String>) -> Response<Body> {
        let message = message.into();
        match self.opts.envelope {
            Envelope::Wrapped => json_response(
                status,
                &json!({"success": false, "status": status.as_u16(), "message": message}),
            ),
            Envelope::Bare => json_response(status, &json!({"message": message})),
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

    fn control_devices(&self) -> Response<Body> {
        let devices: Vec<FakeDevice> = {
            let state = self.lock();
            state
                .devices
                .values()
                .rev()
                .map(|s| s.device.clone())
                .collect()
        };
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

    /// `POST /_fake/options`: the list switches, each optional; answers the ones now in force.
    async fn control_options(&self, req: Request) -> Response<Body> {
        let req: OptionsRequest = match control_body(req).await {
            Ok(req) => req,
            Err(response) => return response,
        };
        let now = {
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
            *list
        };
        json_response(
            StatusCode::OK,
            &json!({"list_shape": now.shape, "list_page_size": now.page_size.unwrap_or(0),
                    "list_ignores_filter": now.ignores_filter,
                    "list_newest_first": now.newest_first,
                    "created_at_field": now.created_at_field}),
        )
    }
}

async fn control_unknown() -> Response<Body> {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"message": "unknown control endpoint; try GET /_fake/devices, GET /_fake/stats, POST /_fake/faults, POST /_fake/options, POST /_fake/reset"}),
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
}

/// Body of `POST /_fake/faults`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    endpoint: Endpoint,
    faults: Vec<FaultSpec>,
}

/// One fault as JSON: `{"status":500,"retry_after":2,"body":"…"}`, `{"delay_ms":3000}`,
/// `{"created_then_status":500}`, `{"created_then_hang":true}`, `{"not_found":true}` or
/// `{"hang":true}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultSpec {
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

fn log_request(method: &Method, uri: &Uri, status: StatusCode, at: Instant) {
    // The path and query carry ids and metadata only; the API key and tokens are never logged.
    tracing::info!(
        target: "fake_qubitro",
        "{method} {uri} -> {} ({} ms)",
        status.as_u16(),
        at.elapsed().as_millis()
    );
}

fn status_or(code: u16, fallback: StatusCode) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(fallback)
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("a serde_json::Value always serializes");
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[derive(Clone, Copy)]
enum Creds {
    None,
    DeviceCredentials,
    Metadata,
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

fn device_json(d: &FakeDevice, created_at: Option<&str>, creds: Creds) -> Value {
    let mut metadata: Map<String, Value> = d
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    if let Creds::Metadata = creds {
        metadata.insert("device_id".to_owned(), Value::String(d.id.clone()));
        metadata.insert("device_token".to_owned(), Value::String(d.token.clone()));
    }
    let mut obj = json!({
        "id": d.id,
        "name": d.name,
        "description": d.description,
        "source": d.source,
        "brand": d.brand,
        "model": d.model,
        "tags": d.tags,
        "metadata": metadata,
        "avatar": AVATAR,
        "last_seen": NEVER_SEEN,
    });
    if let Value::Object(o) = &mut obj {
        if let Some(created_at) = created_at {
            o.insert("created_at".to_owned(), json!(created_at));
        }
        if let Creds::DeviceCredentials = creds {
            o.insert(
                "device_credentials".to_owned(),
                json!({"device_id": d.id, "device_token": d.token}),
            );
        }
    }
    obj
}

/// Checks a create body the way the API documents it; the error names the offending field.
fn validate_create(body: &[u8]) -> Result<NewDevice, String> {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
        return Err("request body must be a JSON object".to_owned());
    };
    // null counts as absent, as most JSON APIs treat it.
    let field = |name: &str| obj.get(name).filter(|v| !v.is_null());
    let string = |name: &str| -> Result<Option<String>, String> {
        match field(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("{name} must be a string")),
        }
    };

    let name = string("name")?.ok_or("name is required")?;
    if name.trim().is_empty() {
        return Err("name must not be empty".to_owned());
    }
    if name.chars().count() > NAME_MAX {
        return Err(format!("name must be at most {NAME_MAX} characters"));
    }
    let description = string("description")?.ok_or("description is required")?;
    if description.chars().count() > DESCRIPTION_MAX {
        return Err(format!(
            "description must be at most {DESCRIPTION_MAX} characters"
        ));
    }
    let source = string("source")?.unwrap_or_else(|| "mqtt".to_owned());
    if source != "mqtt" && source != "http" {
        return Err("source must be one of \"mqtt\", \"http\"".to_owned());
    }
    let tags = match field("tags") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, t)| match t {
                Value::String(s) if is_tag(s) => Ok(s.clone()),
                Value::String(_) => Err(format!(
                    "tags[{i}] must be letters, digits and underscores only"
                )),
                _ => Err(format!("tags[{i}] must be a string")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("tags must be an array of strings".to_owned()),
    };
    let brand = string("brand")?.unwrap_or_else(|| "Custom".to_owned());
    let model = string("model")?.unwrap_or_else(|| "Custom".to_owned());
    let metadata = match field("metadata") {
        None => BTreeMap::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(format!("metadata.{k} must be a string")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("metadata must be an object".to_owned()),
    };
    Ok(NewDevice {
        name,
        description,
        source,
        brand,
        model,
        tags,
        metadata,
    })
}

fn is_tag(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The query of a list call.
struct ListQuery {
    /// `?metadata=key:value,key2:value2` → pairs that must all match; no parameter, no filter.
    filter: Vec<(String, String)>,
    /// `?page=N`, 1-based; only looked at when the list is paginated.
    page: usize,
}

impl ListQuery {
    fn parse(uri: &Uri) -> Result<ListQuery, String> {
        let mut query = ListQuery {
            filter: Vec::new(),
            page: 1,
        };
        if uri.query().is_none() {
            return Ok(query);
        }
        let Query(params) = Query::<HashMap<String, String>>::try_from_uri(uri)
            .map_err(|e| format!("invalid query string: {e}"))?;
        if let Some(page) = params.get("page") {
            query.page = page
                .parse()
                .ok()
                .filter(|&p: &usize| p >= 1)
                .ok_or("page must be a positive integer")?;
        }
        if let Some(spec) = params.get("metadata").filter(|s| !s.is_empty()) {
            query.filter = spec
                .split(',')
                .map(|pair| {
                    pair.split_once(':')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| {
                            "metadata filter must be key:value pairs separated by commas".to_owned()
                        })
                })
                .collect::<Result<_, _>>()?;
        }
        Ok(query)
    }
}

/// 40 characters, letters and digits with one `$`, because real tokens can contain `$` and a
/// client that pastes them into a shell or URL unescaped should fail in tests, not in the field.
fn device_token() -> String {
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let dollar = fastrand::usize(..TOKEN_LEN);
    (0..TOKEN_LEN)
        .map(|i| {
            if i == dollar {
                '$'
            } else {
                char::from(ALNUM[fastrand::usize(..ALNUM.len())])
            }
        })
        .collect()
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SSZ` (no date crate needed for one format).
/// Microseconds: devices made in the same second still have distinct, ordered times.
fn rfc3339_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let (secs, micros) = (now.as_secs(), now.subsec_micros());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> reqwest::Client {
        // reqwest 0.13 wants a rustls provider even for plain http; Err means already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Fresh clients per check where connection reuse could hide what is being tested.
        reqwest::Client::builder()
            .build()
            .expect("plain-http client builds without a TLS provider")
    }

    fn devices_url(fake: &FakeQubitro) -> String {
        format!(
            "{}/v2/projects/{}/devices",
            fake.base_url(),
            fake.project_id()
        )
    }

    async fn create(fake: &FakeQubitro, body: Value) -> reqwest::Response {
        client()
            .post(devices_url(fake))
            .bearer_auth(fake.api_key())
            .json(&body)
            .send()
            .await
            .expect("create request reaches the fake")
    }

    async fn json_of(r: reqwest::Response) -> Value {
        r.json().await.expect("fake answers JSON")
    }

    fn sensor(name: &str, metadata: Value) -> Value {
        json!({"name": name, "description": "temp sensor", "source": "mqtt",
               "tags": ["gw_1"], "metadata": metadata})
    }

    async fn start(opts: FakeOptions) -> FakeQubitro {
        FakeQubitro::start(opts)
            .await
            .expect("fake starts on a free port")
    }

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
    async fn issued_ids_are_uuid_v4_and_tokens_are_40_chars_with_a_dollar() {
        let fake = start(FakeOptions::default()).await;
        let created = json_of(create(&fake, sensor("s", json!({}))).await).await;
        let id = created["data"]["id"].as_str().expect("id");
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        let token = &fake.devices()[0].token;
        assert_eq!(token.len(), TOKEN_LEN);
        assert_eq!(token.matches('$').count(), 1);
        assert!(token.chars().all(|c| c == '$' || c.is_ascii_alphanumeric()));
        assert_eq!(created["data"]["brand"], "Custom");
        assert_eq!(created["data"]["model"], "Custom");
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
    async fn credentials_in_metadata_are_merged_with_user_metadata() {
        let fake = start(FakeOptions {
            credentials_at: CredentialsAt::Metadata,
            create_status: 200,
            ..FakeOptions::default()
        })
        .await;
        let r = create(&fake, sensor("s", json!({"gw": "a"}))).await;
        assert_eq!(r.status(), 200);
        let data = json_of(r).await["data"].clone();
        let stored = &fake.devices()[0];
        assert_eq!(
            data["metadata"],
            json!({"gw": "a", "device_id": stored.id, "device_token": stored.token})
        );
        assert!(data.get("device_credentials").is_none());
        assert_eq!(
            stored.metadata.len(),
            1,
            "credentials are not stored as user metadata"
        );
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
    async fn invalid_create_bodies_are_400_naming_the_field() {
        let fake = start(FakeOptions::default()).await;
        let ok_name = "n".repeat(NAME_MAX);
        assert_eq!(
            create(&fake, sensor(&ok_name, json!({}))).await.status(),
            201
        );

        let cases = [
            (sensor(&"n".repeat(NAME_MAX + 1), json!({})), "name"),
            (
                json!({"name": "s", "description": "", "tags": ["has space"]}),
                "tags[0]",
            ),
            (json!({"name": "s"}), "description"),
            (
                json!({"name": "s", "description": "", "source": "lora"}),
                "source",
            ),
            (
                json!({"name": "s", "description": "", "metadata": {"n": 1}}),
                "metadata.n",
            ),
            (json!(["not", "an", "object"]), "JSON object"),
        ];
        for (body, field) in cases {
            let r = create(&fake, body.clone()).await;
            assert_eq!(r.status(), 400, "{body}");
            let message = json_of(r).await["message"]
                .as_str()
                .expect("message")
                .to_owned();
            assert!(message.contains(field), "{message:?} should name {field}");
        }
        assert_eq!(fake.devices().len(), 1);
    }

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
    async fn stop_refuses_connections_and_restart_serves_the_same_state() {
        let fake = start(FakeOptions::default()).await;
        let http = client();
        let created = http
            .post(devices_url(&fake))
            .bearer_auth(fake.api_key())
            .json(&sensor("kept", json!({})))
            .send()
            .await
            .expect("create");
        assert_eq!(created.status(), 201);

        fake.stop().await;
        let err = client()
            .get(devices_url(&fake))
            .bearer_auth(fake.api_key())
            .send()
            .await
            .expect_err("nothing listens after stop");
        assert!(err.is_connect(), "{err:?}");

        fake.restart().await.expect("same port is free again");
        // The old client's pooled connection was dropped by stop(); it must reconnect cleanly.
        let list = json_of(
            http.get(devices_url(&fake))
                .bearer_auth(fake.api_key())
                .send()
                .await
                .expect("list after restart"),
        )
        .await;
        assert_eq!(list["data"][0]["name"], "kept");
    }

    #[tokio::test]
    async fn stop_drops_a_hung_request() {
        let fake = start(FakeOptions::default()).await;
        fake.push_faults(Endpoint::Get, vec![Fault::Hang]);
        let url = format!("{}/{}", devices_url(&fake), uuid::Uuid::new_v4());
        let key = fake.api_key();
        let pending = tokio::spawn(async move { client().get(url).bearer_auth(key).send().await });
        tokio::time::timeout(
            Duration::from_secs(10),
            fake.wait_for_requests(Endpoint::Get, 1),
        )
        .await
        .expect("the hung request arrives");
        fake.stop().await;
        let result = pending.await.expect("request task does not panic");
        assert!(
            result.is_err(),
            "the hung request fails once the fake stops"
        );
        assert_eq!(
            fake.requests()[0].status,
            0,
            "a hung request was never answered"
        );
    }

    #[tokio::test]
    async fn wait_for_requests_resolves_once_the_count_is_reached() {
        let fake = start(FakeOptions::default()).await;
        let waiter = {
            let fake = fake.clone();
            tokio::spawn(async move { fake.wait_for_requests(Endpoint::Create, 3).await })
        };
        for i in 0..3 {
            create(&fake, sensor(&format!("s{i}"), json!({}))).await;
        }
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("waiter resolves after the third create")
            .expect("waiter does not panic");
        // Already satisfied: resolves at once.
        fake.wait_for_requests(Endpoint::Create, 3).await;
    }

    #[tokio::test]
    async fn inserted_device_is_listed_and_reset_forgets_everything() {
        let fake = start(FakeOptions::default()).await;
        let mut planted = NewDevice::named("other-gw");
        planted.metadata.insert("gw".to_owned(), "b".to_owned());
        let d = fake.insert_device(planted);
        let list = json_of(
            client()
                .get(format!("{}?metadata=gw:b", devices_url(&fake)))
                .bearer_auth(fake.api_key())
                .send()
                .await
                .expect("list"),
        )
        .await;
        assert_eq!(list["data"][0]["id"], d.id.as_str());
        fake.reset();
        assert!(fake.devices().is_empty());
        assert!(fake.requests().is_empty());
        assert_eq!(fake.count(Endpoint::List), 0);
    }

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

    async fn list_json(fake: &FakeQubitro, query: &str) -> Value {
        let r = client()
            .get(format!("{}{query}", devices_url(fake)))
            .bearer_auth(fake.api_key())
            .send()
            .await
            .expect("list");
        assert_eq!(r.status(), 200);
        json_of(r).await
    }

    fn names(items: &Value) -> Vec<&str> {
        items
            .as_array()
            .expect("an array of items")
            .iter()
            .map(|d| d["name"].as_str().expect("name"))
            .collect()
    }

    fn plant(fake: &FakeQubitro, name: &str, sensor_id: &str) -> FakeDevice {
        let mut d = NewDevice::named(name);
        d.metadata
            .insert(SENSOR_ID_KEY.to_owned(), sensor_id.to_owned());
        fake.insert_device(d)
    }

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

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 27, "{t}");
        assert_eq!(&t[19..20], ".", "microseconds: {t}");
        assert!(t.ends_with('Z') && &t[10..11] == "T", "{t}");
        assert!(t.as_str() > "2024-01-01", "{t}");
    }
}
