//! The configuration's types as read from TOML: each section, its keys, and the
//! defaults every key takes from the built-in `config/onboardd.toml`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::secrets::Secret;

/// When onboardd asks Qubitro whether a sensor already has a device before creating one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
/// Whether a `Pending` sensor (no create sent yet) is looked up before its first
/// create. A `Creating` one (a create may have been sent) is always looked up first,
/// whatever the policy: that is what keeps a crash or a timeout from duplicating it.
pub enum LookupPolicy {
    /// Before every first create too: a lost database or a second gateway adopts.
    Always,
    /// Only after an attempt that may have created a device (timeout, 5xx, crash).
    AfterFailure,
    /// As `AfterFailure` (kept for configs that say it): a lost database or a second
    /// gateway can duplicate devices.
    Never,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names this gateway in device metadata, descriptions and topics.
    #[serde(default)]
    pub gateway_id: String,
    pub log: LogConfig,
    pub mqtt: MqttConfig,
    pub announce: AnnounceConfig,
    pub qubitro: QubitroConfig,
    pub store: StoreConfig,
    pub security: SecurityConfig,
    pub control: ControlConfig,
    pub http: HttpConfig,
    pub bridge: BridgeConfig,
    pub discovery: DiscoveryConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// tracing filter (`info`, `debug`, `onboardd=trace`); RUST_LOG wins when set.
    pub level: String,
    /// Seconds between counter lines in the log and on the stats topic (0: off).
    pub stats_interval_s: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Stable across restarts so the broker keeps our persistent session.
    #[serde(default)]
    pub client_id: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: Secret,
    #[serde(default)]
    pub password_file: String,
    pub announce_topic: String,
    pub reply_topic: String,
    pub status_topic: String,
    pub stats_topic: String,
    pub keep_alive_s: u64,
    pub connect_timeout_s: u64,
    /// How long the broker keeps our session (and queues announces) while we are away.
    pub session_expiry_s: u32,
    /// Unacknowledged announces the broker may send us at once (MQTT 5 Receive Maximum).
    pub receive_maximum: u16,
    /// Largest packet we accept; the broker drops bigger ones for us (MQTT 5).
    pub max_packet_bytes: u32,
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
    #[serde(default)]
    pub ca_file: String,
    #[serde(default)]
    pub cert_file: String,
    #[serde(default)]
    pub key_file: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnnounceConfig {
    pub max_payload_bytes: usize,
    /// Announces queued for the dispatcher; more wait at the broker.
    pub queue_capacity: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QubitroConfig {
    pub base_url: String,
    #[serde(default)]
    pub project_id: String,
    #[serde(default)]
    pub api_key: Secret,
    #[serde(default)]
    pub api_key_file: String,
    pub broker_host: String,
    pub broker_port: u16,
    /// TLS to `broker_host` (the bridge's uplink); off only for a loopback host.
    pub broker_tls: bool,
    /// Extra CA certificates (PEM) trusted for the API besides the built-in web roots:
    /// a TLS-inspecting proxy, a private deployment, a test.
    #[serde(default)]
    pub ca_file: String,
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
    /// Requests to Qubitro in flight at once, across all sensors.
    pub max_in_flight: usize,
    pub lookup_before_create: LookupPolicy,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// Pause after a 401/403 (bad or revoked API key) before trying again.
    pub auth_failure_backoff_s: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub path: String,
    /// sled's page cache; its 1 GiB default is far too much for a Pi.
    pub cache_capacity_bytes: u64,
    /// Seconds between writes of the sensors' last-seen times (one batch each time,
    /// never one write per reading).
    #[serde(default = "default_last_seen_flush_s")]
    pub last_seen_flush_s: u64,
}

fn default_last_seen_flush_s() -> u64 {
    600
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// Announces without a valid proof get `unauthorized` (the default). Off: they
    /// are served with the token in clear, and a warning at every start says so.
    pub require_claim: bool,
    #[serde(default)]
    pub claim_key: Secret,
    #[serde(default)]
    pub claim_key_file: String,
    /// Sensor-id patterns (`*`, `?`) that may onboard; empty: all.
    #[serde(default)]
    pub allow_sensor_ids: Vec<String>,
    /// Sensor-id patterns that may not; deny wins over allow.
    #[serde(default)]
    pub deny_sensor_ids: Vec<String>,
    #[serde(default)]
    pub allow_brands: Vec<String>,
    #[serde(default)]
    pub allow_models: Vec<String>,
    /// A new sensor that announced this recently gets `rate_limited`.
    pub new_sensor_cooldown_s: u64,
    /// Cap on new devices per hour across all sensors.
    pub max_new_devices_per_hour: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Unix socket for `onboardd devices …` while the daemon runs ("" disables it).
    pub socket: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `IP:port` of /healthz and /metrics ("" turns the listener off); beyond
    /// loopback only with a password.
    pub listen: String,
    /// File holding the HTTP Basic password every request then needs.
    #[serde(default)]
    pub password_file: String,
    /// Read from `password_file` at start; never from the config text itself.
    #[serde(skip)]
    pub password: Secret,
    /// PEM certificate chain: with `key_file`, the listener speaks HTTPS only.
    #[serde(default)]
    pub cert_file: String,
    /// PEM private key of `cert_file`, read like the other secret files.
    #[serde(default)]
    pub key_file: String,
    /// Read from `key_file` at start.
    #[serde(skip)]
    pub key: Secret,
}

/// What a command needs from the config besides the keys every command shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// `run`: talks to the broker and to Qubitro, so every secret must be there.
    Cloud,
    /// `check-config` and `devices …`: read the store or the control socket only.
    /// The API key and the MQTT password are not required and their `*_file`s are
    /// not read: under the packaged unit only the service gets them
    /// (`LoadCredential=`), so `sudo onboardd devices list` must work without them.
    /// A remote delete (`devices forget --delete-remote`) is done by the running
    /// daemon with its own key; without the daemon the command reads the config
    /// again for the key (`control::client`).
    Local,
}

/// The telemetry bridge (`src/bridge/`): readings of bridged sensors forwarded to
/// Qubitro's broker under each device's own login, buffered durably meanwhile.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Whether sensors may ask to be bridged (costs nothing while none does).
    pub enabled: bool,
    /// Where a bridged sensor publishes its readings; `{sensor_id}` is its id.
    pub data_topic: String,
    /// Readings kept per device while Qubitro cannot take them; the oldest go first.
    pub max_buffered_messages: u64,
    /// Bytes of readings kept in total across devices; the oldest go first.
    pub max_buffer_bytes: u64,
    /// A device's uplink connection closes after this long without data.
    pub idle_disconnect_s: u64,
    /// Uplink connections open at once; the least recently used closes first.
    pub max_connections: usize,
    /// The longest wait between reconnects of one device's uplink.
    pub reconnect_max_ms: u64,
    /// A reading Qubitro has not acknowledged within this long is spilled to the
    /// buffer and acknowledged locally once durable.
    pub spill_after_ms: u64,
    /// At most one flush of spilled readings per this long (group commit).
    pub spill_flush_ms: u64,
    /// Readings per second one sensor may publish; the excess is dropped and counted.
    pub max_readings_per_s: u32,
}

/// Zero-firmware onboarding (`src/discovery/`): devices that describe themselves
/// with Home Assistant or Tasmota discovery become bridged devices. Off by
/// default: each device is billed, and turning it on trusts whoever may publish
/// under the prefixes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// Read Home Assistant discovery configs under `homeassistant_prefix`.
    pub homeassistant: bool,
    pub homeassistant_prefix: String,
    /// Read Tasmota's own discovery under `tasmota_prefix`.
    pub tasmota: bool,
    pub tasmota_prefix: String,
    /// Home Assistant components whose entities are onboarded (readings).
    pub components: Vec<String>,
    /// Devices any of whose identifiers matches one of these (`*`, `?`) are left out.
    pub skip_identifiers: Vec<String>,
    /// Larger configs are skipped with a warning.
    pub max_config_bytes: usize,
    /// A discovered device retired this many seconds is deleted from Qubitro and
    /// forgotten (0: never, kept and billed until the operator forgets it).
    #[serde(default)]
    pub delete_retired_after_s: u64,
    /// Devices discovery keeps at most; configs of further devices are skipped with
    /// a warning (each device is billed).
    pub max_devices: usize,
    /// Cap on new discovered devices per hour, apart from `security`'s cap on
    /// announced sensors.
    pub max_new_devices_per_hour: u32,
}

impl DiscoveryConfig {
    /// Whether any discovery source is on.
    pub fn enabled(&self) -> bool {
        self.homeassistant || self.tasmota
    }
}

impl Config {
    pub fn keep_alive(&self) -> Duration {
        Duration::from_secs(self.mqtt.keep_alive_s)
    }

    /// The effective config as TOML with every secret redacted.
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MINIMAL;

    #[test]
    fn redacted_output_hides_secrets() {
        let c = Config::from_toml(MINIMAL).unwrap();
        let out = c.redacted_toml();
        assert!(!out.contains("QB_secret_value"));
        assert!(out.contains("<redacted>"));
        assert!(!format!("{c:?}").contains("QB_secret_value"));
    }
}
