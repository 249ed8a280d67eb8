//! The running fake: the handle tests hold ([`FakeQubitro`]) and the hyper server behind it,
//! which can be stopped (dropping open connections) and restarted on the same port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::devices::{DeviceHook, FakeDevice, NewDevice, RecordedRequest};
use crate::faults::Fault;
use crate::lock;
use crate::options::{Endpoint, FakeOptions};
use crate::routes::router;
use crate::shapes::ListShape;
use crate::store::{Registry, Shared};

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
            creates_held: watch::channel(false).0,
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
        self.inner.shared.lock().newest_first()
    }

    /// Plants a device as if created through the API (fresh id and token).
    pub fn insert_device(&self, d: NewDevice) -> FakeDevice {
        let device = self.inner.shared.lock().insert(d);
        self.inner.shared.created(&device);
        device
    }

    /// Removes a device as if someone deleted it in Qubitro's portal; returns it, if it existed.
    pub fn remove_device(&self, id: &str) -> Option<FakeDevice> {
        self.inner.shared.lock().remove(id).map(|s| s.device)
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

    /// Changes the layout of list answers from now on (see [`FakeOptions::list_shape`](crate::FakeOptions::list_shape)).
    pub fn set_list_shape(&self, shape: ListShape) {
        self.inner.shared.lock().list.shape = shape;
    }

    /// Changes list pagination from now on (see [`FakeOptions::list_page_size`](crate::FakeOptions::list_page_size)).
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

    /// Gives the API key the Delete permission (`true`) or takes it away: without it every
    /// delete answers 403 and removes nothing.
    pub fn set_delete_permission(&self, allowed: bool) {
        self.inner.shared.lock().delete_permission = allowed;
    }

    /// Holds every create from now on: each is recorded and counted (so
    /// [`wait_for_requests`](Self::wait_for_requests) sees it) but neither carried out nor
    /// answered until [`release_creates`](Self::release_creates). Two gateways can so be made
    /// to create one sensor's device at the same instant.
    pub fn hold_creates(&self) {
        self.inner.shared.set_creates_held(true);
    }

    /// Lets the held creates (and every later one) through.
    pub fn release_creates(&self) {
        self.inner.shared.set_creates_held(false);
    }

    /// Resolves once `count(ep) >= n`.
    pub async fn wait_for_requests(&self, ep: Endpoint, n: usize) {
        let mut counts = self.inner.shared.counts.subscribe();
        // The sender lives in `Shared`, which `self` keeps alive, so this cannot fail.
        let _ = counts.wait_for(|c| c[ep.index()] >= n).await;
    }

    /// Forgets devices, records, counters and queued faults, restores the configured delay,
    /// list switches and Delete permission, and releases held creates.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use crate::{Endpoint, FakeOptions, Fault, NewDevice};
    use serde_json::json;

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

    async fn delete(fake: &FakeQubitro, id: &str) -> reqwest::Response {
        client()
            .delete(format!("{}/{id}", devices_url(fake)))
            .bearer_auth(fake.api_key())
            .send()
            .await
            .expect("delete request reaches the fake")
    }

    #[tokio::test]
    async fn a_key_without_the_delete_permission_gets_403_and_the_device_stays() {
        let fake = start(FakeOptions {
            delete_permission: false,
            ..FakeOptions::default()
        })
        .await;
        let d = plant(&fake, "kept", "s-kept");
        let refused = delete(&fake, &d.id).await;
        assert_eq!(refused.status(), 403);
        let body = json_of(refused).await;
        assert_eq!(body["success"], false);
        assert!(
            body["message"]
                .as_str()
                .expect("a message")
                .contains("Delete permission"),
            "{body}"
        );
        assert_eq!(fake.devices(), vec![d.clone()], "nothing was deleted");

        fake.set_delete_permission(true);
        assert_eq!(delete(&fake, &d.id).await.status(), 200);
        assert!(fake.devices().is_empty());
        assert_eq!(delete(&fake, &d.id).await.status(), 404, "gone now");
        fake.set_delete_permission(false);
        fake.reset();
        let again = plant(&fake, "again", "s-again");
        assert_eq!(
            delete(&fake, &again.id).await.status(),
            403,
            "reset restores the configured permission"
        );
    }

    #[tokio::test]
    async fn every_device_has_a_creation_time_and_answers_show_it_when_asked() {
        let fake = start(FakeOptions::default()).await;
        let created = json_of(create(&fake, sensor("s", json!({}))).await).await;
        assert!(
            created["data"].get("created_at").is_none(),
            "off by default"
        );
        let planted = plant(&fake, "p", "s-p");
        for d in fake.devices() {
            assert!(
                d.created_at.ends_with('Z') && d.created_at.len() == 27,
                "{}",
                d.created_at
            );
        }
        fake.set_created_at_field(true);
        let got = json_of(
            client()
                .get(format!("{}/{}", devices_url(&fake), planted.id))
                .bearer_auth(fake.api_key())
                .send()
                .await
                .expect("get"),
        )
        .await;
        assert_eq!(got["data"]["created_at"], planted.created_at.as_str());
    }

    #[tokio::test]
    async fn held_creates_are_counted_but_neither_done_nor_answered_until_released() {
        let fake = start(FakeOptions::default()).await;
        fake.hold_creates();
        let creates: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|name| {
                let fake = fake.clone();
                tokio::spawn(async move { create(&fake, sensor(name, json!({}))).await.status() })
            })
            .collect();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            fake.wait_for_requests(Endpoint::Create, 2),
        )
        .await
        .expect("both creates arrive while held");
        assert!(fake.devices().is_empty(), "a held create does nothing yet");
        assert!(
            fake.requests().iter().all(|r| r.status == 0),
            "a held create is not answered yet"
        );
        fake.release_creates();
        for c in creates {
            assert_eq!(c.await.expect("create task"), 201);
        }
        assert_eq!(fake.devices().len(), 2);
        assert_eq!(
            create(&fake, sensor("c", json!({}))).await.status(),
            201,
            "later creates go straight through"
        );
    }
}
