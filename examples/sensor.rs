//! The reference sensor: what firmware does to onboard itself through onboardd with
//! protocol v2, in one file (README "Security" → "The sensor side, for firmware authors").
//! Its crypto is onboardd's own v2 primitives (`onboardd::proof::v2`), used exactly as
//! firmware would use mbedTLS.
//!
//! ```sh
//! cargo run --example sensor -- --host 127.0.0.1 --port 1883 --sensor-id temp-01 \
//!     --sensor-key "$(onboardd claim --config /etc/onboardd/onboardd.toml temp-01)"
//! ```
//!
//! 1. Holds its **sensor key** (32 bytes, flashed at manufacture; `--sensor-key`, the
//!    64 hex characters `onboardd claim SENSOR_ID` prints). `--claim-key` derives it
//!    here instead, for demos only: a real sensor never holds the fleet's claim key.
//! 2. Subscribes to `onboard/reply/{sensor_id}` (QoS 1), then announces on
//!    `onboard/announce/{sensor_id}` (QoS 1, not retained): `{"body": B, "proof": P}`,
//!    `B` the announce fields plus a fresh random `nonce`. It announces again, with a new
//!    nonce each time, after `--interval` seconds doubling up to `--max-interval`, until
//!    an authenticated `ok` arrives (the gateway may not be up yet, or busy).
//! 3. Acts only on a reply whose `mac` verifies under its key and whose body carries the
//!    nonce of its latest announce. Anything else is noise, logged and ignored: anyone
//!    on an open broker may publish on the reply topic, so a forged `error` must not
//!    stop it, a forged `pending` must not silence it, a replayed old `ok` or one with
//!    another broker must not redirect it, and a clear `device_token` is never taken
//!    (it holds a key, so a genuine gateway always seals).
//! 4. Authenticated `pending`: the next announce waits `retry_after_s`. Authenticated
//!    `error`: with `retry_after_s` (rate limited) it announces again after that,
//!    without it the announce can never succeed as sent: prints it, exits 1.
//! 5. Authenticated `ok`: opens `device_token_sealed` (AES-256-GCM under the seal key,
//!    additional data `sensor_id/device_id/nonce`) and prints the device id, the token
//!    and the broker named in that same authenticated body: the only broker it would
//!    log in to. A bridged `ok` prints the data topic instead (no token exists).
//!
//! Every option can come from the environment (BROKER_HOST, BROKER_PORT, SENSOR_ID,
//! SENSOR_KEY, CLAIM_KEY, REPLY_TIMEOUT, ANNOUNCE_INTERVAL, ANNOUNCE_MAX_INTERVAL), as in
//! docker-compose.yml. Exit codes: 0 onboarded, 1 refused or no `ok` in time, 2 usage.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use onboardd::config::Secret;
use onboardd::proof::v2::{AnnounceNonce, ExchangeKeys};
use onboardd::proof::SensorKey;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Map, Value};
use tokio::time::Instant;

/// The longest wait a reply may ask for: a gateway's `retry_after_s` is not trusted to
/// park the sensor for days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

#[derive(Parser)]
#[command(
    about = "onboardd's reference sensor (protocol v2): announce with a proof, trust only authenticated replies"
)]
struct Args {
    #[arg(long, env = "BROKER_HOST", default_value = "127.0.0.1")]
    host: String,
    #[arg(long, env = "BROKER_PORT", default_value_t = 1883)]
    port: u16,
    #[arg(long, env = "SENSOR_ID")]
    sensor_id: String,
    /// This sensor's key, 64 hex characters (`onboardd claim SENSOR_ID`)
    #[arg(long, env = "SENSOR_KEY", required_unless_present = "claim_key")]
    sensor_key: Option<String>,
    /// Demos only: the fleet claim key, to derive the sensor key here
    #[arg(long, env = "CLAIM_KEY", conflicts_with = "sensor_key")]
    claim_key: Option<String>,
    /// Extra announce fields, as a JSON object (name, brand, model, tags, metadata…)
    #[arg(long, default_value = "{}")]
    fields: String,
    /// Seconds to wait for an authenticated ok reply
    #[arg(long, env = "REPLY_TIMEOUT", default_value_t = 60)]
    timeout: u64,
    /// Seconds before the first re-announce (each later one waits twice as long)
    #[arg(long, env = "ANNOUNCE_INTERVAL", default_value_t = 5.0)]
    interval: f64,
    /// The longest wait between two announces, in seconds
    #[arg(long, env = "ANNOUNCE_MAX_INTERVAL", default_value_t = 60.0)]
    max_interval: f64,
}

/// How the sensor reaches Qubitro once onboarded. No `Debug`: it holds the token.
enum Onboarded {
    /// It logs in to `host:port` itself, with the device id and the opened token.
    Direct {
        device_id: String,
        token: String,
        host: String,
        port: u16,
    },
    /// The gateway forwards its readings, published on `data_topic`.
    Bridged {
        device_id: String,
        data_topic: String,
    },
}

/// What one message on the reply topic means to the sensor.
enum Verdict {
    /// Not an authenticated answer to the latest announce, or unusable: ignored.
    Noise(String),
    Onboarded(Onboarded),
    /// Announce again after the wait the gateway names, if any (authenticated `pending`,
    /// or a rate limit).
    AskAgainIn(Option<Duration>, String),
    /// An authenticated error without a retry time: the announce can never succeed as sent.
    Refused(String),
}

/// The gateway's judgement of `payload`, trusted only when it is authenticated (MAC under
/// this sensor's key) and answers the announce with `current`.
fn judge(keys: &ExchangeKeys, sensor_id: &str, current: &AnnounceNonce, payload: &[u8]) -> Verdict {
    let body = match keys.verify_reply(payload, current) {
        Ok(body) => body,
        Err(why) => return Verdict::Noise(why.to_string()),
    };
    let text = |name: &str| body.get(name).and_then(Value::as_str).map(str::to_owned);
    let retry_after = body
        .get("retry_after_s")
        .and_then(Value::as_u64)
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
    match text("status").as_deref() {
        Some("ok") => judge_ok(keys, sensor_id, current, &body),
        Some("pending") => Verdict::AskAgainIn(retry_after, "pending".into()),
        Some("error") => {
            let code = text("code").unwrap_or_default();
            let message = text("message").unwrap_or_default();
            match retry_after {
                Some(wait) => Verdict::AskAgainIn(Some(wait), format!("error {code}: {message}")),
                None => Verdict::Refused(format!("error {code}: {message}")),
            }
        }
        other => Verdict::Noise(format!(
            "an authenticated reply with an unknown status {other:?}"
        )),
    }
}

fn judge_ok(
    keys: &ExchangeKeys,
    sensor_id: &str,
    current: &AnnounceNonce,
    body: &Map<String, Value>,
) -> Verdict {
    let Some(device_id) = body.get("device_id").and_then(Value::as_str) else {
        return Verdict::Noise("an ok without a device_id".into());
    };
    if body.get("bridged").and_then(Value::as_bool) == Some(true) {
        return match body.get("data_topic").and_then(Value::as_str) {
            Some(topic) => Verdict::Onboarded(Onboarded::Bridged {
                device_id: device_id.to_owned(),
                data_topic: topic.to_owned(),
            }),
            None => Verdict::Noise("a bridged ok without a data_topic".into()),
        };
    }
    let Some(sealed) = body.get("device_token_sealed").and_then(Value::as_str) else {
        // A clear token is for sensors without a key; one that holds a key takes none.
        return Verdict::Noise(
            "an ok without device_token_sealed (a clear token is never taken)".into(),
        );
    };
    let Ok(token) = keys.open_token(sensor_id, device_id, current, sealed) else {
        return Verdict::Noise(
            "the sealed token does not open for this sensor, device id and nonce".into(),
        );
    };
    let broker = body.get("broker");
    let host = broker.and_then(|b| b.get("host")).and_then(Value::as_str);
    let port = broker
        .and_then(|b| b.get("port"))
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok());
    match (host, port) {
        (Some(host), Some(port)) if !host.is_empty() => Verdict::Onboarded(Onboarded::Direct {
            device_id: device_id.to_owned(),
            token,
            host: host.to_owned(),
            port,
        }),
        _ => Verdict::Noise("an ok without a usable broker host and port".into()),
    }
}

/// One announce: a fresh nonce in the body, and the payload proving it.
fn announce(keys: &ExchangeKeys, fields: &Map<String, Value>) -> (AnnounceNonce, Vec<u8>) {
    let nonce = AnnounceNonce::generate();
    let mut body = fields.clone();
    body.insert("nonce".into(), Value::String(nonce.as_str().to_owned()));
    let payload = keys.announce(&Value::Object(body).to_string());
    (nonce, payload)
}

/// The status and code words of a payload that is not trusted, for the log: never its
/// content, which may carry a token somebody wants the sensor to use.
fn untrusted_words(payload: &[u8]) -> String {
    let reply = serde_json::from_slice::<Value>(payload).unwrap_or_default();
    let word = |name: &str| match reply.get(name) {
        Some(Value::String(s)) if s.len() <= 24 && s.bytes().all(|b| b.is_ascii_graphic()) => {
            s.clone()
        }
        _ => "-".into(),
    };
    format!("status {}, code {}", word("status"), word("code"))
}

/// `base` give or take a fifth, so a fleet rebooting together does not announce in step.
fn jittered(base: Duration) -> Duration {
    base.mul_f64(0.8 + 0.4 * fastrand::f64())
}

fn seconds(s: f64, what: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|_| format!("{what} must be a number of seconds ≥ 0"))
}

fn sensor_key(args: &Args) -> Option<SensorKey> {
    match (&args.sensor_key, &args.claim_key) {
        (Some(hex_key), _) => SensorKey::from_hex(hex_key),
        (None, Some(claim_key)) => Some(SensorKey::derive(
            &Secret::new(claim_key.as_str()),
            &args.sensor_id,
        )),
        (None, None) => None,
    }
}

fn print_onboarded(id: &str, how: &Onboarded) {
    match how {
        Onboarded::Direct {
            device_id,
            token,
            host,
            port,
        } => {
            println!("sensor {id}: onboarded");
            println!("device_id: {device_id}");
            println!("device_token: {token}");
            println!("broker: {host}:{port}");
        }
        Onboarded::Bridged {
            device_id,
            data_topic,
        } => {
            println!("sensor {id}: onboarded, bridged (the gateway forwards its readings)");
            println!("device_id: {device_id}");
            println!("data_topic: {data_topic}");
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let id = args.sensor_id.as_str();
    let Some(key) = sensor_key(&args) else {
        eprintln!("sensor {id}: --sensor-key must be 64 hex characters");
        return ExitCode::from(2);
    };
    let keys = ExchangeKeys::derive(&key);
    let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&args.fields) else {
        eprintln!("sensor {id}: --fields must be a JSON object");
        return ExitCode::from(2);
    };
    let (first_wait, max_wait) = match (
        seconds(args.interval, "--interval"),
        seconds(args.max_interval, "--max-interval"),
    ) {
        (Ok(a), Ok(b)) => (a, b.max(a)),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("sensor {id}: {e}");
            return ExitCode::from(2);
        }
    };

    let mut opts = MqttOptions::new(format!("sensor-{id}"), &args.host, args.port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 16);
    let reply_topic = format!("onboard/reply/{id}");
    let announce_topic = format!("onboard/announce/{id}");
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    // Never announced: until the first announce, no reply can match it.
    let mut current = AnnounceNonce::generate();
    let mut wait = first_wait;
    // When to announce next; None until the reply subscription stands.
    let mut next_announce: Option<Instant> = None;
    let mut unauthorized_seen = false;
    loop {
        let event = tokio::select! {
            e = events.poll() => e,
            _ = tokio::time::sleep_until(next_announce.unwrap_or(deadline)), if next_announce.is_some() => {
                let (nonce, payload) = announce(&keys, &fields);
                current = nonce;
                eprintln!("sensor {id}: announce on {announce_topic} (nonce {})", current.as_str());
                let _ = client.try_publish(&announce_topic, QoS::AtLeastOnce, false, payload);
                next_announce = Some(Instant::now() + jittered(wait));
                wait = (wait * 2).min(max_wait);
                continue;
            }
            _ = tokio::time::sleep_until(deadline) => {
                eprintln!("sensor {id}: no authenticated ok reply within {} s", args.timeout);
                if unauthorized_seen {
                    eprintln!("sensor {id}: replies without a mac said unauthorized: if the gateway sent them, it could \
                        not authenticate the announces (a wrong sensor key or sensor id, or a gateway without protocol v2)");
                }
                return ExitCode::FAILURE;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // A clean session forgets the subscription: subscribe on every connect.
                let _ = client.try_subscribe(&reply_topic, QoS::AtLeastOnce);
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => next_announce = Some(Instant::now()),
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == reply_topic => {
                match judge(&keys, id, &current, &p.payload) {
                    Verdict::Noise(why) => {
                        let words = untrusted_words(&p.payload);
                        // Not trusted either, but worth a hint if no ok ever comes.
                        unauthorized_seen |= words.ends_with("code unauthorized");
                        eprintln!("sensor {id}: ignored a reply ({words}): {why}");
                    }
                    Verdict::AskAgainIn(after, what) => {
                        // At least a second: a gateway saying 0 must not make it spin.
                        let after = after.unwrap_or(wait).max(Duration::from_secs(1));
                        eprintln!(
                            "sensor {id}: {what}; announcing again in {} s",
                            after.as_secs()
                        );
                        next_announce = Some(Instant::now() + after);
                    }
                    Verdict::Refused(what) => {
                        eprintln!("sensor {id}: refused: {what}");
                        return ExitCode::FAILURE;
                    }
                    Verdict::Onboarded(how) => {
                        print_onboarded(id, &how);
                        let _ = client.disconnect().await;
                        return ExitCode::SUCCESS;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("sensor {id}: broker not reachable yet ({e})");
                next_announce = None;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
