//! The services a phase starts: mosquitto, the fake Qubitro clouds (0 ms and 100 ms), onboardd with
//! its config, the echo client; and the MQTT options every bench client uses.

use anyhow::{anyhow, bail, Context, Result};
use harness::{Mosquitto, Proc};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::Outgoing;
use serde::Deserialize;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::procs::{spawn, wait_line};
use crate::sizes::{API_KEY, MAX_IN_FLIGHT, PROJECT};

/// mosquitto on a free port: Nagle off (the harness sets it), generous queues and
/// in-flight windows.
pub(crate) fn start_mosquitto() -> Mosquitto {
    Mosquitto::builder()
        .die_with_parent()
        .conf(
            "max_queued_messages 1000000\n\
             max_queued_bytes 0\n\
             max_inflight_messages 1000\n",
        )
        .start()
}

pub(crate) struct Fake {
    pub(crate) proc: Proc,
    pub(crate) url: String,
}

#[derive(Deserialize, Default, Clone, Copy, Debug)]
pub(crate) struct FakeStats {
    pub(crate) create: u64,
    pub(crate) list: u64,
    pub(crate) get: u64,
}

impl FakeStats {
    pub(crate) fn requests(&self) -> u64 {
        self.create + self.list + self.get
    }
}

impl Fake {
    pub(crate) fn start(bins: &Path, delay_ms: u64) -> Result<Fake> {
        let proc = spawn(
            "fake-qubitro",
            Command::new(bins.join("fake-qubitro"))
                .args(["--listen", "127.0.0.1:0", "--api-key", API_KEY])
                .args(["--project-id", PROJECT, "--quiet"])
                .args(["--delay-ms", &delay_ms.to_string()])
                .env_remove("RUST_LOG"),
        )?;
        let (_, line) = wait_line(&proc, "listening on", Duration::from_secs(20))?;
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .ok_or_else(|| anyhow!("no URL in {line:?}"))?
            .to_string();
        Ok(Fake { proc, url })
    }

    pub(crate) async fn stats(&self, http: &reqwest::Client) -> Result<FakeStats> {
        let r = http
            .get(format!("{}/_fake/stats", self.url))
            .send()
            .await?
            .error_for_status()?;
        Ok(r.json().await?)
    }

    pub(crate) async fn reset(&self, http: &reqwest::Client) -> Result<()> {
        http.post(format!("{}/_fake/reset", self.url))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }
}

/// One onboardd process and what its start looked like.
pub(crate) struct Daemon {
    pub(crate) proc: Proc,
    pub(crate) ready_ms: u64,
    /// From spawn to both the "subscribed to announces" and the "ready" lines.
    pub(crate) wall_ms: f64,
}

pub(crate) struct DaemonSpec<'a> {
    pub(crate) bins: &'a Path,
    pub(crate) state: PathBuf,
    pub(crate) broker_port: u16,
    pub(crate) cloud_url: &'a str,
    pub(crate) policy: &'a str,
    pub(crate) client_id: &'a str,
    /// More config (TOML), overlaid table by table on the bench's own.
    pub(crate) extra: String,
}

pub(crate) fn field_u64(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The load generator's announces carry no claim proof: `require_claim = false`,
/// so the figures measure onboarding without the cost of checking a proof.
pub(crate) fn start_onboardd(s: &DaemonSpec) -> Result<Daemon> {
    std::fs::create_dir_all(&s.state)?;
    let config = s.state.join("onboardd.toml");
    std::fs::write(
        &config,
        format!(
            r#"gateway_id = "bench-gw"
[log]
level = "info"
stats_interval_s = 0
[mqtt]
host = "127.0.0.1"
port = {port}
client_id = "{client}"
[qubitro]
base_url = "{url}"
project_id = "{PROJECT}"
api_key = "{API_KEY}"
max_in_flight = {inflight}
lookup_before_create = "{policy}"
[store]
path = "{state}/db"
[security]
require_claim = false
new_sensor_cooldown_s = 0
max_new_devices_per_hour = 1000000000
[control]
socket = "{state}/onboardd.sock"
"#,
            port = s.broker_port,
            client = s.client_id,
            url = s.cloud_url,
            inflight = MAX_IN_FLIGHT as u32,
            policy = s.policy,
            state = s.state.display(),
        ),
    )?;
    if !s.extra.is_empty() {
        let merged = harness::merge_toml(&std::fs::read_to_string(&config)?, &s.extra);
        std::fs::write(&config, merged)?;
    }
    // Owner-only, or onboardd warns about a readable secret.
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600))?;
    let proc = spawn(
        "onboardd",
        Command::new(s.bins.join("onboardd"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET"),
    )?;
    // Both lines, whichever comes last: the subscription can be granted before the
    // ready line is logged when the start is slow.
    let (subscribed, _) = wait_line(&proc, "subscribed to announces", Duration::from_secs(30))?;
    let (logged, ready) = wait_line(&proc, "onboardd ready", Duration::from_secs(30))?;
    Ok(Daemon {
        wall_ms: subscribed
            .max(logged)
            .duration_since(proc.spawned)
            .as_secs_f64()
            * 1000.0,
        ready_ms: field_u64(&ready, "ready_ms")
            .ok_or_else(|| anyhow!("no ready_ms in {ready:?}"))?,
        proc,
    })
}

pub(crate) fn start_echo(port: u16) -> Result<Proc> {
    let me = std::env::current_exe().context("own executable")?;
    let p = spawn(
        "echo client",
        Command::new(me).args(["--echo-port", &port.to_string()]),
    )?;
    wait_line(&p, "echo subscribed", Duration::from_secs(20))?;
    Ok(p)
}

pub(crate) fn mqtt_options(client_id: String, port: u16) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_start(true);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(5);
    opts.set_network_options(net);
    opts
}

/// Ends onboardd's persistent session, so the broker stops queueing announces for a
/// daemon that is gone (they would load the broker in the next phases).
pub(crate) async fn forget_session(port: u16, client_id: &str) -> Result<()> {
    let (client, mut el) = AsyncClient::new(mqtt_options(client_id.to_string(), port), 16);
    tokio::time::timeout(Duration::from_secs(5), async {
        for _ in 0..100 {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => client.try_disconnect()?,
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => {}
                Err(e) => bail!("connecting as {client_id}: {e}"),
            }
        }
        bail!("no disconnect after 100 events")
    })
    .await
    .context("forgetting a session")?
}
