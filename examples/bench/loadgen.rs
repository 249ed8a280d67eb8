//! The load generator: simulated sensors on several MQTT connections, open and closed loops, each
//! reply timed and checked.

use anyhow::{bail, Context, Result};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

use onboardd::proof::v2::{AnnounceNonce, ExchangeKeys};
use onboardd::proof::SensorKey;

use crate::services::mqtt_options;
use crate::sizes::REPLY_FILTER;

/// State shared by the load generator's senders and event loops.
pub(crate) struct Shared {
    pub(crate) base: Instant,
    /// Per sensor: send time in ns since `base`, plus one; 0 when nothing is owed.
    pub(crate) slots: Vec<AtomicU64>,
    /// Announces in flight in the closed-loop phases.
    pub(crate) window: Semaphore,
    pub(crate) windowed: AtomicBool,
    pub(crate) replies: AtomicU64,
    /// Replies nobody waited for (republished ok replies after a kill -9, …).
    pub(crate) extras: AtomicU64,
    pub(crate) not_ok: AtomicU64,
    pub(crate) not_ok_samples: Mutex<Vec<String>>,
    /// A sensor announced again before its previous reply came (open loop only).
    pub(crate) overlaps: AtomicU64,
    pub(crate) latencies_us: Mutex<Vec<u32>>,
    pub(crate) first_send_ns: AtomicU64,
    pub(crate) last_reply_ns: AtomicU64,
    pub(crate) conn_errors: AtomicU64,
    pub(crate) subscribed: AtomicU64,
    pub(crate) stop: AtomicBool,
    /// Announce with `"bridge": true` (the bridge phases).
    pub(crate) bridged: AtomicBool,
    /// Announces carry a claim proof (the proofs-on phase); `None`: no proof.
    pub(crate) proofs: std::sync::RwLock<Option<Arc<Proofs>>>,
    /// Replies in protocol v2's envelope (`{"body": …, "mac": …}`).
    pub(crate) v2_replies: AtomicU64,
}

/// What the flashed sensors hold: per sensor, its protocol v2 exchange keys.
pub(crate) struct Proofs {
    pub(crate) keys: Vec<Option<ExchangeKeys>>,
}

impl Proofs {
    /// The keys of sensors `ids` under `claim_key` (the firmware's derivation).
    pub(crate) fn flash(claim_key: &str, ids: &[usize], slots: usize) -> Proofs {
        let claim = onboardd::config::Secret::new(claim_key);
        let mut keys: Vec<Option<ExchangeKeys>> = (0..slots).map(|_| None).collect();
        for &i in ids {
            let key = SensorKey::derive(&claim, &format!("s{i}"));
            keys[i] = Some(ExchangeKeys::derive(&key));
        }
        Proofs { keys }
    }

    /// `fields` (a JSON object's text) as sensor `idx` sends it: the object with a
    /// fresh `nonce` as the body of a proved envelope.
    fn announce(&self, idx: usize, fields: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys.get(idx)?.as_ref()?;
        let mut obj: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(fields).ok()?;
        obj.insert("nonce".into(), AnnounceNonce::generate().as_str().into());
        let body = serde_json::Value::Object(obj).to_string();
        Some(keys.announce(&body))
    }
}

/// Whether a reply says ok: v1's `{"status":"ok", …}`, or a v2 envelope whose body does.
fn reply_is_ok(payload: &[u8], v2_replies: &AtomicU64) -> bool {
    if payload.starts_with(br#"{"status":"ok""#) {
        return true;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return false;
    };
    let Some(body) = v["body"].as_str() else {
        return false;
    };
    if v.get("mac").is_some() {
        v2_replies.fetch_add(1, Ordering::Relaxed);
    }
    serde_json::from_str::<serde_json::Value>(body).is_ok_and(|b| b["status"] == "ok")
}

impl Shared {
    pub(crate) fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    pub(crate) fn on_reply(&self, topic: &[u8], payload: &[u8]) {
        let now = self.now_ns();
        let idx = std::str::from_utf8(topic)
            .ok()
            .and_then(|t| t.strip_prefix("onboard/reply/s"))
            .and_then(|n| n.parse::<usize>().ok());
        let Some(slot) = idx.and_then(|i| self.slots.get(i)) else {
            self.extras.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let sent = slot.swap(0, Ordering::AcqRel);
        if sent == 0 {
            self.extras.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let us = (now.saturating_sub(sent - 1) / 1000).min(u32::MAX as u64) as u32;
        self.latencies_us.lock().expect("latency lock").push(us);
        if !reply_is_ok(payload, &self.v2_replies) {
            self.not_ok.fetch_add(1, Ordering::Relaxed);
            let mut s = self.not_ok_samples.lock().expect("sample lock");
            if s.len() < 5 {
                s.push(String::from_utf8_lossy(payload).chars().take(300).collect());
            }
        }
        self.last_reply_ns.fetch_max(now, Ordering::Relaxed);
        self.replies.fetch_add(1, Ordering::Release);
        if self.windowed.load(Ordering::Relaxed) {
            self.window.add_permits(1);
        }
    }
}

#[derive(Clone)]
pub(crate) struct LoadGen {
    pub(crate) shared: Arc<Shared>,
    pub(crate) clients: Arc<Vec<AsyncClient>>,
    /// Permits of `Shared::window` when no closed-loop phase runs.
    pub(crate) window: usize,
}

/// One phase's outcome.
pub(crate) struct PhaseResult {
    pub(crate) n: usize,
    pub(crate) wall_s: f64,
    pub(crate) latencies_us: Vec<u32>,
}

impl PhaseResult {
    pub(crate) fn rate(&self) -> f64 {
        self.n as f64 / self.wall_s.max(1e-9)
    }

    pub(crate) fn pct_ms(&self, p: f64) -> f64 {
        let v = &self.latencies_us;
        if v.is_empty() {
            return f64::NAN;
        }
        let i = ((v.len() as f64 * p / 100.0).ceil() as usize).clamp(1, v.len()) - 1;
        v[i] as f64 / 1000.0
    }
}

pub(crate) fn announce_payload(idx: usize) -> Vec<u8> {
    format!(
        concat!(
            r#"{{"name":"Bench sensor {idx}","brand":"Acme","model":"T1000","tags":["bench"],"#,
            r#""metadata":{{"floor":"2"}},"request_id":"r{idx}"}}"#
        ),
        idx = idx
    )
    .into_bytes()
}

/// A sensor that cannot reach Qubitro itself: the gateway forwards its readings.
pub(crate) fn bridged_announce_payload(idx: usize) -> Vec<u8> {
    format!(
        r#"{{"bridge":true,"name":"Bridged sensor {idx}","brand":"Acme","model":"T1000","request_id":"r{idx}"}}"#
    )
    .into_bytes()
}

impl LoadGen {
    pub(crate) async fn connect(
        port: u16,
        connections: usize,
        window: usize,
        sensors: usize,
    ) -> Result<LoadGen> {
        let shared = Arc::new(Shared {
            base: Instant::now(),
            slots: (0..sensors).map(|_| AtomicU64::new(0)).collect(),
            window: Semaphore::new(window),
            windowed: AtomicBool::new(false),
            replies: AtomicU64::new(0),
            extras: AtomicU64::new(0),
            not_ok: AtomicU64::new(0),
            not_ok_samples: Mutex::new(Vec::new()),
            overlaps: AtomicU64::new(0),
            latencies_us: Mutex::new(Vec::new()),
            first_send_ns: AtomicU64::new(u64::MAX),
            last_reply_ns: AtomicU64::new(0),
            conn_errors: AtomicU64::new(0),
            subscribed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            bridged: AtomicBool::new(false),
            proofs: std::sync::RwLock::new(None),
            v2_replies: AtomicU64::new(0),
        });
        let mut clients = Vec::new();
        for c in 0..connections {
            let opts = mqtt_options(format!("bench-load-{}-{c}", std::process::id()), port);
            let (client, mut el) = AsyncClient::new(opts, 20_000);
            let sub = client.clone();
            let sh = shared.clone();
            // Lives until the bench stops (`stop`) or the runtime ends with the process.
            tokio::spawn(async move {
                while !sh.stop.load(Ordering::Relaxed) {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            sh.on_reply(&p.topic, &p.payload)
                        }
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            if c == 0 {
                                let rm = ack.properties.as_ref().and_then(|p| p.receive_max);
                                eprintln!(
                                    "bench: broker's receive maximum for our publishes: {rm:?}"
                                );
                            }
                            if let Err(e) = sub.try_subscribe(REPLY_FILTER, QoS::AtLeastOnce) {
                                eprintln!("bench: cannot subscribe: {e}");
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            sh.subscribed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if sh.conn_errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("bench: load connection {c}: {e}");
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
            clients.push(client);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.subscribed.load(Ordering::Relaxed) < connections as u64 {
            if Instant::now() > deadline {
                bail!("the load generator's connections did not subscribe in 10 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(LoadGen {
            shared,
            clients: Arc::new(clients),
            window,
        })
    }

    pub(crate) fn reset(&self, windowed: bool) {
        let s = &self.shared;
        s.windowed.store(windowed, Ordering::Relaxed);
        s.replies.store(0, Ordering::Relaxed);
        s.extras.store(0, Ordering::Relaxed);
        s.not_ok.store(0, Ordering::Relaxed);
        s.overlaps.store(0, Ordering::Relaxed);
        s.latencies_us.lock().expect("latency lock").clear();
        s.not_ok_samples.lock().expect("sample lock").clear();
        s.first_send_ns.store(u64::MAX, Ordering::Relaxed);
        s.last_reply_ns.store(0, Ordering::Relaxed);
        s.v2_replies.store(0, Ordering::Relaxed);
    }

    pub(crate) async fn send(&self, conn: usize, idx: usize) -> Result<()> {
        let topic = format!("onboard/announce/s{idx}");
        let s = &self.shared;
        let mut payload = if s.bridged.load(Ordering::Relaxed) {
            bridged_announce_payload(idx)
        } else {
            announce_payload(idx)
        };
        let proofs = s.proofs.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(p) = proofs {
            payload = p
                .announce(idx, &payload)
                .with_context(|| format!("no key flashed for sensor s{idx}"))?;
        }
        let now = s.now_ns();
        s.first_send_ns.fetch_min(now, Ordering::Relaxed);
        if s.slots[idx].swap(now + 1, Ordering::AcqRel) != 0 {
            s.overlaps.fetch_add(1, Ordering::Relaxed);
        }
        self.clients[conn]
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .context("queue an announce")
    }

    /// Closed loop: every entry of `ids` is one announce, at most `window` unanswered
    /// (when sensors repeat, at most half the distinct ones, so that a sensor's next
    /// announce does not overtake its previous one).
    pub(crate) async fn closed(
        &self,
        what: &str,
        ids: Arc<Vec<usize>>,
        deadline: Duration,
    ) -> Result<PhaseResult> {
        self.closed_in_window(what, ids, deadline, self.window)
            .await
    }

    /// [`LoadGen::closed`] with at most `cap` (≤ the generator's window) unanswered.
    pub(crate) async fn closed_in_window(
        &self,
        what: &str,
        ids: Arc<Vec<usize>>,
        deadline: Duration,
        cap: usize,
    ) -> Result<PhaseResult> {
        let cap = cap.clamp(1, self.window);
        self.reset(true);
        let mut seen = vec![false; self.shared.slots.len()];
        let distinct = ids
            .iter()
            .filter(|&&i| !std::mem::replace(&mut seen[i], true))
            .count();
        let window = if distinct < ids.len() {
            cap.min((distinct / 2).max(1))
        } else {
            cap
        };
        let held = self.shared.window.forget_permits(self.window - window);
        let k = self.clients.len();
        let mut tasks = Vec::new();
        for c in 0..k {
            let me = self.clone();
            let ids = ids.clone();
            tasks.push(tokio::spawn(async move {
                for j in (c..ids.len()).step_by(k) {
                    me.shared.window.acquire().await?.forget();
                    // Bounded wait in the rare case this sensor is still owed a reply.
                    for _ in 0..10_000 {
                        if me.shared.slots[ids[j]].load(Ordering::Acquire) == 0 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    me.send(c, ids[j]).await?;
                }
                anyhow::Ok(())
            }));
        }
        let r = self.finish(what, ids.len(), tasks, deadline).await;
        self.shared.window.add_permits(held);
        r
    }

    /// Open loop: announces at a fixed offered `rate`, whatever the answers do.
    pub(crate) async fn open(
        &self,
        what: &str,
        ids: Arc<Vec<usize>>,
        rate: f64,
        deadline: Duration,
    ) -> Result<PhaseResult> {
        self.reset(false);
        let k = self.clients.len();
        let t0 = tokio::time::Instant::now() + Duration::from_millis(20);
        let mut tasks = Vec::new();
        for c in 0..k {
            let me = self.clone();
            let ids = ids.clone();
            tasks.push(tokio::spawn(async move {
                for j in (c..ids.len()).step_by(k) {
                    tokio::time::sleep_until(t0 + Duration::from_secs_f64(j as f64 / rate)).await;
                    me.send(c, ids[j]).await?;
                }
                anyhow::Ok(())
            }));
        }
        self.finish(what, ids.len(), tasks, deadline).await
    }

    pub(crate) async fn finish(
        &self,
        what: &str,
        n: usize,
        tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
        deadline: Duration,
    ) -> Result<PhaseResult> {
        let s = &self.shared;
        let until = Instant::now() + deadline;
        while (s.replies.load(Ordering::Acquire) as usize) < n && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        join_senders(what, tasks).await?;
        let got = s.replies.load(Ordering::Acquire) as usize;
        if got < n {
            bail!(
                "{what}: only {got} of {n} replies within {deadline:?} ({} connection errors)",
                s.conn_errors.load(Ordering::Relaxed)
            );
        }
        let not_ok = s.not_ok.load(Ordering::Relaxed);
        if not_ok > 0 {
            let samples = s.not_ok_samples.lock().expect("sample lock").join("\n  ");
            bail!("{what}: {not_ok} of {n} replies were not ok, e.g.:\n  {samples}");
        }
        let extras = s.extras.load(Ordering::Relaxed);
        let overlaps = s.overlaps.load(Ordering::Relaxed);
        if extras > 0 || overlaps > 0 {
            eprintln!(
                "bench: {what}: {extras} unexpected replies, {overlaps} overlapping announces"
            );
        }
        let first = s.first_send_ns.load(Ordering::Relaxed);
        let last = s.last_reply_ns.load(Ordering::Relaxed);
        let mut latencies_us = std::mem::take(&mut *s.latencies_us.lock().expect("latency lock"));
        latencies_us.sort_unstable();
        let r = PhaseResult {
            n,
            wall_s: last.saturating_sub(first) as f64 / 1e9,
            latencies_us,
        };
        eprintln!(
            "bench: {what}: {n} in {:.2} s = {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
            r.wall_s,
            r.rate(),
            r.pct_ms(50.0),
            r.pct_ms(99.0)
        );
        Ok(r)
    }

    pub(crate) fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for c in self.clients.iter() {
            let _ = c.try_disconnect();
        }
    }
}

/// Collects the sending tasks once the wait is over: those still running are aborted
/// (the phase ended by its deadline), and a sending error (the last found) is the phase's.
pub(crate) async fn join_senders(
    what: &str,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
) -> Result<()> {
    let mut send_error = None;
    for t in tasks {
        if !t.is_finished() {
            t.abort();
            continue;
        }
        if let Ok(Err(e)) = t.await {
            send_error = Some(e);
        }
    }
    if let Some(e) = send_error {
        return Err(e.context(format!("{what}: sending")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLAIM: &str = "62656e63682d636c61696d2d6b65792d62656e63682d636c61696d2d6b657921";

    fn keys_of(sensor: &str) -> ExchangeKeys {
        let key = SensorKey::derive(&onboardd::config::Secret::new(CLAIM), sensor);
        ExchangeKeys::derive(&key)
    }

    #[test]
    fn a_generated_v2_announce_passes_the_daemons_check_and_keeps_its_fields() {
        let p = Proofs::flash(CLAIM, &[7], 8);
        let payload = p.announce(7, &announce_payload(7)).expect("flashed");
        let v = keys_of("s7")
            .verify_announce(&payload)
            .expect("a v2 announce the daemon accepts");
        assert_eq!(v.object["request_id"], "r7");
    }

    #[test]
    fn a_v2_ok_reply_counts_as_ok_and_a_v2_error_does_not() {
        let keys = keys_of("s1");
        let nonce = AnnounceNonce::generate();
        let ok = keys
            .authenticated_reply(&serde_json::json!({"status": "ok"}), &nonce)
            .expect("an object");
        let err = keys
            .authenticated_reply(&serde_json::json!({"status": "error"}), &nonce)
            .expect("an object");
        let seen = AtomicU64::new(0);
        assert!(reply_is_ok(&ok, &seen));
        assert!(!reply_is_ok(&err, &seen));
        assert_eq!(seen.load(Ordering::Relaxed), 2);
    }
}
