//! The reference sensor: what firmware does to onboard itself through onboardd, in one
//! file (README "Security" → "The sensor side"). It uses only rumqttc, hmac, sha2 and
//! RustCrypto's aes-gcm — none of onboardd's code — so it is also a second
//! implementation of the protocol.
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
//!    `onboard/announce/{sensor_id}` (QoS 1, not retained) with
//!    `proof = hex(HMAC-SHA256(sensor_key, "onboardd-announce-v1"))`, and again every
//!    5 s until an answer comes (the gateway may not be up yet).
//! 3. `pending`: waits, the `ok` follows by itself. `error`: prints it, exits 1.
//! 4. `ok`: opens `device_token_sealed` = hex(nonce ‖ ciphertext ‖ tag) with AES-256-GCM,
//!    key `HMAC-SHA256(sensor_key, "onboardd-reply-v1")`, additional data
//!    `sensor_id/device_id`, and prints the device id and token it would use to log in
//!    to Qubitro's broker. A reply whose seal does not open is not trusted.
//!
//! Every option can come from the environment (BROKER_HOST, BROKER_PORT, SENSOR_ID,
//! SENSOR_KEY, CLAIM_KEY, REPLY_TIMEOUT), as in docker-compose.yml.

use std::process::ExitCode;
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use clap::Parser;
use hmac::{Hmac, Mac};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use sha2::Sha256;

#[derive(Parser)]
#[command(about = "onboardd's reference sensor: announce with a proof, unseal the token")]
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
    /// Seconds to wait for the ok reply
    #[arg(long, env = "REPLY_TIMEOUT", default_value_t = 60)]
    timeout: u64,
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// Opens `device_token_sealed`; `None` when it does not open (then trust nothing).
fn unseal(sensor_key: &[u8; 32], sensor_id: &str, device_id: &str, sealed: &str) -> Option<String> {
    let bytes = hex::decode(sealed).ok()?;
    if bytes.len() < 12 + 16 {
        return None;
    }
    let (nonce, ciphertext_and_tag) = bytes.split_at(12);
    let reply_key = hmac_sha256(sensor_key, b"onboardd-reply-v1");
    let aad = format!("{sensor_id}/{device_id}");
    let plain = Aes256Gcm::new_from_slice(&reply_key)
        .expect("a 32-byte key")
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext_and_tag,
                aad: aad.as_bytes(),
            },
        )
        .ok()?;
    String::from_utf8(plain).ok()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let id = args.sensor_id.as_str();
    let key: [u8; 32] = match (&args.sensor_key, &args.claim_key) {
        (Some(hex_key), _) => match hex::decode(hex_key.trim())
            .ok()
            .and_then(|k| k.try_into().ok())
        {
            Some(k) => k,
            None => {
                eprintln!("sensor {id}: --sensor-key must be 64 hex characters");
                return ExitCode::from(2);
            }
        },
        (None, Some(claim_key)) => hmac_sha256(claim_key.as_bytes(), id.as_bytes()),
        (None, None) => unreachable!("clap requires one of them"),
    };
    let Ok(Value::Object(mut announce)) = serde_json::from_str::<Value>(&args.fields) else {
        eprintln!("sensor {id}: --fields must be a JSON object");
        return ExitCode::from(2);
    };
    announce.insert(
        "proof".into(),
        json!(hex::encode(hmac_sha256(&key, b"onboardd-announce-v1"))),
    );
    let announce = Value::Object(announce).to_string();

    let mut opts = MqttOptions::new(format!("sensor-{id}"), &args.host, args.port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 16);
    let reply_topic = format!("onboard/reply/{id}");
    let announce_topic = format!("onboard/announce/{id}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let mut subscribed = false;
    let mut again = tokio::time::interval(Duration::from_secs(5));
    loop {
        let event = tokio::select! {
            e = events.poll() => e,
            _ = again.tick(), if subscribed => {
                eprintln!("sensor {id}: announce on {announce_topic}");
                let _ = client.try_publish(&announce_topic, QoS::AtLeastOnce, false, announce.clone());
                continue;
            }
            _ = tokio::time::sleep_until(deadline) => {
                eprintln!("sensor {id}: no ok reply within {} s", args.timeout);
                return ExitCode::FAILURE;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let _ = client.try_subscribe(&reply_topic, QoS::AtLeastOnce);
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                // The first tick fires at once: announce now, then every 5 s.
                subscribed = true;
                again.reset_immediately();
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == reply_topic => {
                let Ok(reply) = serde_json::from_slice::<Value>(&p.payload) else {
                    continue;
                };
                match reply["status"].as_str() {
                    Some("pending") => {
                        eprintln!("sensor {id}: pending; the ok follows by itself");
                        // No need to announce again: onboardd answers when it can.
                        subscribed = false;
                    }
                    Some("ok") => {
                        let device_id = reply["device_id"].as_str().unwrap_or_default();
                        let token = match (
                            reply["device_token_sealed"].as_str(),
                            reply["device_token"].as_str(),
                        ) {
                            (Some(sealed), _) => match unseal(&key, id, device_id, sealed) {
                                Some(t) => t,
                                None => {
                                    eprintln!("sensor {id}: the sealed token does not open with this sensor key; not trusted");
                                    return ExitCode::FAILURE;
                                }
                            },
                            (None, Some(clear)) => {
                                eprintln!("sensor {id}: warning: the token came in clear (the gateway runs with \
                                     security.require_claim = false)");
                                clear.to_string()
                            }
                            (None, None) => {
                                eprintln!("sensor {id}: an ok reply without a token: {reply}");
                                return ExitCode::FAILURE;
                            }
                        };
                        println!("sensor {id}: onboarded");
                        println!("device_id: {device_id}");
                        println!("device_token: {token}");
                        if let Some(b) = reply.get("broker") {
                            println!(
                                "broker: {}:{}",
                                b["host"].as_str().unwrap_or("?"),
                                b["port"]
                            );
                        }
                        let _ = client.disconnect().await;
                        return ExitCode::SUCCESS;
                    }
                    _ => {
                        eprintln!("sensor {id}: refused: {reply}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("sensor {id}: broker not reachable yet ({e})");
                subscribed = false;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
