//! Configuration: a TOML file read with the `config` crate, overridden key by key
//! from `ONBOARDD__SECTION__KEY` environment variables, then validated once at start
//! so that every mistake is a config error naming its key, never a runtime surprise.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use crate::announce::valid_id;

/// The built-in defaults, which are also what `print-default-config` shows.
pub const DEFAULT_CONFIG: &str = include_str!("../config/onboardd.toml");

/// Where `run` and `check-config` look when `--config` and `$ONBOARDD_CONFIG` are absent.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/onboardd/onboardd.toml";

/// A configuration problem, always naming the key (or the file) at fault. The
/// detail of a wrapped error is its `source()`: print the chain (`{:#}` via anyhow).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {}: not found (give --config FILE or set ONBOARDD_CONFIG)", path.display())]
    NotFound { path: PathBuf },
    /// The file does not parse, or a key has the wrong type or is unknown.
    #[error("config file {}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: config::ConfigError,
    },
    #[error("invalid config")]
    Invalid(#[source] config::ConfigError),
    #[error("{key}: {message}")]
    Key { key: String, message: String },
    /// A `*_file` secret (or `claim --key-file`) cannot be read.
    #[error("{key}: cannot read {}", path.display())]
    SecretFile {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {} is empty", path.display())]
    EmptySecretFile { key: &'static str, path: PathBuf },
    #[error("log.level")]
    LogLevel(#[source] crate::logging::LogError),
}

fn key_err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.to_string(),
        message: message.into(),
    }
}

/// A secret value: never printed by `Debug`, `Display` or serialization.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; call only where it is put on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("\"<redacted>\"")
        }
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_empty() {
            s.serialize_str("")
        } else {
            s.serialize_str("<redacted>")
        }
    }
}

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
    /// daemon with its own key.
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
}

impl DiscoveryConfig {
    /// Whether any discovery source is on.
    pub fn enabled(&self) -> bool {
        self.homeassistant || self.tasmota
    }

    fn validate(&self, bridge: &BridgeConfig) -> Result<(), ConfigError> {
        for (key, p) in [
            ("discovery.homeassistant_prefix", &self.homeassistant_prefix),
            ("discovery.tasmota_prefix", &self.tasmota_prefix),
        ] {
            if p.is_empty() || p.contains(['+', '#']) || p.ends_with('/') || p.starts_with('$') {
                return Err(key_err(
                    key,
                    "must be a topic without wildcards or a trailing /",
                ));
            }
        }
        if self.max_config_bytes == 0 {
            return Err(key_err("discovery.max_config_bytes", "must be at least 1"));
        }
        if self.enabled() && !bridge.enabled {
            return Err(key_err(
                "discovery.homeassistant",
                "discovery forwards readings through the bridge: set bridge.enabled = true",
            ));
        }
        Ok(())
    }
}

impl BridgeConfig {
    /// Checks the `[bridge]` keys and `qubitro.broker_tls`.
    fn validate(&self, qubitro: &QubitroConfig) -> Result<(), ConfigError> {
        let t = &self.data_topic;
        if t.matches("{sensor_id}").count() != 1 || t.contains(['+', '#']) || t.starts_with('$') {
            return Err(key_err(
                "bridge.data_topic",
                "must contain {sensor_id} exactly once and no wildcards",
            ));
        }
        for (key, v) in [
            ("bridge.max_buffered_messages", self.max_buffered_messages),
            ("bridge.max_buffer_bytes", self.max_buffer_bytes),
            ("bridge.idle_disconnect_s", self.idle_disconnect_s),
            ("bridge.max_connections", self.max_connections as u64),
            ("bridge.reconnect_max_ms", self.reconnect_max_ms),
        ] {
            if v == 0 {
                return Err(key_err(key, "must be at least 1"));
            }
        }
        if !qubitro.broker_tls && !is_loopback_host(&qubitro.broker_host) {
            return Err(key_err(
                "qubitro.broker_tls",
                format!(
                    "may be false only for a loopback qubitro.broker_host (tests, local development), not {:?}: device tokens would cross the network in clear",
                    qubitro.broker_host
                ),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Reads FILE (required to exist), then the environment, then validates for `run`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_for(path, Needs::Cloud)
    }

    /// As [`Config::load`], requiring only what `needs` says.
    pub fn load_for(path: &Path, needs: Needs) -> Result<Config, ConfigError> {
        let built = layered(path)?;
        let mut cfg: Config = built.try_deserialize().map_err(ConfigError::Invalid)?;
        cfg.resolve(needs)?;
        Ok(cfg)
    }

    /// Parses a config from TOML text alone (tests, defaults), then validates for `run`.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_for(text, Needs::Cloud)
    }

    /// As [`Config::from_toml`], requiring only what `needs` says.
    pub fn from_toml_for(text: &str, needs: Needs) -> Result<Config, ConfigError> {
        let built = config::Config::builder()
            .add_source(config::File::from_str(
                DEFAULT_CONFIG,
                config::FileFormat::Toml,
            ))
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(ConfigError::Invalid)?;
        let mut cfg: Config = built.try_deserialize().map_err(ConfigError::Invalid)?;
        cfg.resolve(needs)?;
        Ok(cfg)
    }

    /// Fills derived defaults, reads secret files and checks every key.
    fn resolve(&mut self, needs: Needs) -> Result<(), ConfigError> {
        let cloud = needs == Needs::Cloud;
        if self.gateway_id.is_empty() {
            self.gateway_id = host_name().unwrap_or_else(|| "gateway".to_string());
        }
        if !valid_id(&self.gateway_id) {
            return Err(key_err(
                "gateway_id",
                "must be 1-64 characters of A-Z a-z 0-9 . _ : -",
            ));
        }
        if self.mqtt.client_id.is_empty() {
            self.mqtt.client_id = format!("onboardd-{}", self.gateway_id);
        }
        self.mqtt.status_topic = self
            .mqtt
            .status_topic
            .replace("{gateway_id}", &self.gateway_id);
        self.mqtt.stats_topic = self
            .mqtt
            .stats_topic
            .replace("{gateway_id}", &self.gateway_id);

        if cloud {
            read_secret_file(
                "mqtt.password_file",
                &self.mqtt.password_file,
                &mut self.mqtt.password,
            )?;
            read_secret_file(
                "qubitro.api_key_file",
                &self.qubitro.api_key_file,
                &mut self.qubitro.api_key,
            )?;
        }
        read_secret_file(
            "security.claim_key_file",
            &self.security.claim_key_file,
            &mut self.security.claim_key,
        )?;

        let plus = self
            .mqtt
            .announce_topic
            .split('/')
            .filter(|l| *l == "+")
            .count();
        if plus != 1 || self.mqtt.announce_topic.contains('#') {
            return Err(key_err(
                "mqtt.announce_topic",
                "must contain exactly one '+' level (the sensor id) and no '#'",
            ));
        }
        if !self.mqtt.reply_topic.contains("{sensor_id}")
            || self.mqtt.reply_topic.contains('+')
            || self.mqtt.reply_topic.contains('#')
        {
            return Err(key_err(
                "mqtt.reply_topic",
                "must contain {sensor_id} and no wildcards",
            ));
        }
        if self.mqtt.host.is_empty() {
            return Err(key_err("mqtt.host", "must not be empty"));
        }
        if self.mqtt.receive_maximum == 0 {
            return Err(key_err("mqtt.receive_maximum", "must be at least 1"));
        }
        if (self.mqtt.max_packet_bytes as usize) < self.announce.max_payload_bytes + 1024 {
            return Err(key_err(
                "mqtt.max_packet_bytes",
                "must exceed announce.max_payload_bytes by at least 1024 so that an oversized announce still gets an answer",
            ));
        }
        if self.mqtt.keep_alive_s < 5 {
            return Err(key_err("mqtt.keep_alive_s", "must be at least 5"));
        }
        if self.mqtt.cert_file.is_empty() != self.mqtt.key_file.is_empty() {
            return Err(key_err(
                "mqtt.cert_file",
                "mqtt.cert_file and mqtt.key_file go together",
            ));
        }
        // TLS to the broker is on when mqtt.ca_file is set: a client certificate
        // without it would silently be a plain-text connection.
        if !self.mqtt.cert_file.is_empty() && self.mqtt.ca_file.is_empty() {
            return Err(key_err(
                "mqtt.ca_file",
                "is required with mqtt.cert_file/mqtt.key_file (TLS to the broker); without it the connection would be plain text",
            ));
        }
        if self.announce.max_payload_bytes == 0 {
            return Err(key_err("announce.max_payload_bytes", "must be at least 1"));
        }
        if self.announce.queue_capacity < self.mqtt.receive_maximum as usize {
            return Err(key_err(
                "announce.queue_capacity",
                "must be at least mqtt.receive_maximum, so an announce the broker hands us always fits",
            ));
        }
        let url = &self.qubitro.base_url;
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(key_err(
                "qubitro.base_url",
                "must start with https:// (or http:// for a local fake)",
            ));
        }
        if url.starts_with("http://") && !loopback_url(url) {
            return Err(key_err(
                "qubitro.base_url",
                "http:// is allowed only for a loopback host (127.0.0.0/8, ::1, localhost): the API key and every device token would cross the network in clear; use https://",
            ));
        }
        self.qubitro.base_url = url.trim_end_matches('/').to_string();
        if self.qubitro.project_id.trim().is_empty() {
            return Err(key_err(
                "qubitro.project_id",
                "is required (the Qubitro project the devices are created in)",
            ));
        }
        if self.qubitro.project_id.contains(['/', '?', '#', ' ']) {
            return Err(key_err("qubitro.project_id", "must be a plain project id"));
        }
        if cloud {
            self.require_api_key()?;
        }
        if self.qubitro.max_in_flight == 0 {
            return Err(key_err("qubitro.max_in_flight", "must be at least 1"));
        }
        if self.qubitro.request_timeout_ms == 0 || self.qubitro.connect_timeout_ms == 0 {
            return Err(key_err(
                "qubitro.request_timeout_ms",
                "timeouts must be positive",
            ));
        }
        if self.qubitro.retry_initial_ms == 0
            || self.qubitro.retry_max_ms < self.qubitro.retry_initial_ms
        {
            return Err(key_err(
                "qubitro.retry_max_ms",
                "must be at least qubitro.retry_initial_ms, which must be positive",
            ));
        }
        if self.store.path.is_empty() {
            return Err(key_err("store.path", "must not be empty"));
        }
        // The same check `run` makes when it installs the filter, so that
        // `check-config` refuses what `run` would.
        crate::logging::validate_level(&self.log.level).map_err(ConfigError::LogLevel)?;
        self.bridge.validate(&self.qubitro)?;
        self.discovery.validate(&self.bridge)?;
        Ok(())
    }

    /// The API key is there: every command that calls Qubitro needs it.
    pub fn require_api_key(&self) -> Result<(), ConfigError> {
        if self.qubitro.api_key.is_empty() {
            return Err(key_err(
                "qubitro.api_key",
                "is required: set qubitro.api_key, qubitro.api_key_file or ONBOARDD__QUBITRO__API_KEY",
            ));
        }
        Ok(())
    }

    pub fn keep_alive(&self) -> Duration {
        Duration::from_secs(self.mqtt.keep_alive_s)
    }

    /// The effective config as TOML with every secret redacted.
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// Warns when a config file that holds a secret can be read by other users.
pub fn warn_if_readable_secrets(path: &Path, cfg: &Config) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let holds_secret = [
        cfg.qubitro.api_key.expose(),
        cfg.mqtt.password.expose(),
        cfg.security.claim_key.expose(),
    ]
    .iter()
    .any(|s| !s.is_empty() && text.contains(*s));
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode())
        .unwrap_or(0);
    if holds_secret && mode & 0o044 != 0 {
        let msg = format!(
            "{} holds a secret and is readable by other users (mode {:o}): move the secret out of it into a root-only file handed over with LoadCredential= and name it in the matching *_file key (the packaged unit does this for the API key: /etc/onboardd/qubitro-api-key, mode 0600). Do not chmod the config itself: the service's dynamic user must read it",
            path.display(),
            mode & 0o777
        );
        tracing::warn!("{msg}");
        if !tracing::dispatcher::has_been_set() {
            eprintln!("onboardd: warning: {msg}");
        }
    }
}

/// An `http://` URL whose host is 127.0.0.0/8, `::1` or `localhost`.
fn loopback_url(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    u.host_str().is_some_and(is_loopback_host)
}

/// The layers every command reads: the built-in defaults, FILE (required to
/// exist), then `ONBOARDD__…` variables.
fn layered(path: &Path) -> Result<config::Config, ConfigError> {
    if !path.exists() {
        return Err(ConfigError::NotFound {
            path: path.to_path_buf(),
        });
    }
    config::Config::builder()
        .add_source(config::File::from_str(
            DEFAULT_CONFIG,
            config::FileFormat::Toml,
        ))
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(env_source())
        .build()
        .map_err(|source| ConfigError::File {
            path: path.to_path_buf(),
            source,
        })
}

fn env_source() -> config::Environment {
    config::Environment::with_prefix("ONBOARDD")
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
}

/// Reads a secret from a file into `target` when `file` is set.
fn read_secret_file(key: &'static str, file: &str, target: &mut Secret) -> Result<(), ConfigError> {
    if file.is_empty() {
        return Ok(());
    }
    *target = read_key_file(key, &secret_path(file))?;
    Ok(())
}

/// Where a `*_file` secret is: a relative name is looked up in
/// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`) when that is set.
fn secret_path(file: &str) -> PathBuf {
    let mut path = PathBuf::from(file);
    if path.is_relative() {
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            path = Path::new(&dir).join(path);
        }
    }
    path
}

/// Warns (naming the file and the fix) when a `*_file` secret can be read by
/// group or others: anyone on the gateway could take the key.
pub fn warn_if_loose_secret_files(cfg: &Config) {
    use std::os::unix::fs::PermissionsExt;
    for (key, file) in [
        ("mqtt.password_file", &cfg.mqtt.password_file),
        ("qubitro.api_key_file", &cfg.qubitro.api_key_file),
        ("security.claim_key_file", &cfg.security.claim_key_file),
        ("mqtt.key_file", &cfg.mqtt.key_file),
    ] {
        if file.is_empty() {
            continue;
        }
        let path = secret_path(file);
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o044 != 0 {
            tracing::warn!(
                key,
                path = %path.display(),
                mode = %format!("{mode:o}"),
                "{key}: {} is readable by group or others (mode {mode:o}): make it owner-only (chmod 600, owned by the user that reads it) or hand it over with systemd's LoadCredential= (the packaged unit reads /etc/onboardd/qubitro-api-key, mode 0600 root, that way)",
                path.display()
            );
        }
    }
}

/// Reads a secret (API key, password, claim key) from `path`: the whole file
/// without its trailing line ending, which must leave something. `key` names the
/// setting in errors. The one place secret files are read, for the config's
/// `*_file` keys and for `onboardd claim --key-file`.
pub fn read_key_file(key: &'static str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
        key,
        path: path.to_path_buf(),
        source,
    })?;
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(ConfigError::EmptySecretFile {
            key,
            path: path.to_path_buf(),
        });
    }
    Ok(Secret::new(value))
}

/// What `onboardd claim --config FILE` needs: the configured claim key (from
/// `security.claim_key` or `claim_key_file`; empty when neither is set) and
/// `store.path`, read through the same layers as [`Config::load`] but without the
/// checks only `run` needs (a factory station or an operator shell has no API key).
pub fn load_claim_settings(path: &Path) -> Result<(Secret, String), ConfigError> {
    let built = layered(path)?;
    let mut security: SecurityConfig = built.get("security").map_err(ConfigError::Invalid)?;
    let store_path = built
        .get_string("store.path")
        .map_err(ConfigError::Invalid)?;
    read_secret_file(
        "security.claim_key_file",
        &security.claim_key_file,
        &mut security.claim_key,
    )?;
    Ok((security.claim_key, store_path))
}

/// The kernel's host name, from gethostname(2): under the unit's `ProcSubset=pid`
/// /proc/sys is hidden, so reading it there fell back to a constant.
fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that
    // many bytes and we stop at the first NUL (or the end).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    valid_id(&name).then_some(name)
}

/// Host names that many machines share out of the box: as a gateway id they make
/// several gateways look like one in Qubitro's metadata and on the status topic.
pub fn generic_gateway_id(id: &str) -> bool {
    const DEFAULTS: &[&str] = &[
        "raspberrypi",
        "localhost",
        "debian",
        "ubuntu",
        "gateway",
        "pi",
        "dietpi",
        "orangepi",
        "rockpi",
        "armbian",
        "onboardd",
    ];
    DEFAULTS.iter().any(|d| d.eq_ignore_ascii_case(id))
}

/// A host on this machine: 127.0.0.0/8, ::1 or localhost.
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if h.eq_ignore_ascii_case("localhost") {
        return true;
    }
    h.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        gateway_id = "gw1"
        [qubitro]
        project_id = "p1"
        api_key = "QB_secret_value"
    "#;

    /// The error and its sources, as main prints them.
    fn chain(err: &(dyn std::error::Error + 'static)) -> String {
        crate::logging::chain(err).to_string()
    }

    #[test]
    fn a_log_level_that_is_not_a_level_is_a_config_error_naming_the_key() {
        let err = Config::from_toml(&format!("{MINIMAL}\n[log]\nlevel = \"inf0\"")).unwrap_err();
        assert!(matches!(err, ConfigError::LogLevel(_)), "{err:?}");
        assert!(
            chain(&err).starts_with("log.level: invalid log level"),
            "{}",
            chain(&err)
        );
        Config::from_toml(&format!("{MINIMAL}\n[log]\nlevel = \"info,rumqttc=warn\"")).unwrap();
    }

    #[test]
    fn key_files_are_read_once_trimmed_and_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, "fleet\r\n").unwrap();
        assert_eq!(read_key_file("--key-file", &f).unwrap().expose(), "fleet");
        std::fs::write(&f, "\n").unwrap();
        let err = read_key_file("--key-file", &f).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::EmptySecretFile {
                    key: "--key-file",
                    ..
                }
            ),
            "{err:?}"
        );
        let err = read_key_file("qubitro.api_key_file", &dir.path().join("none")).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::SecretFile {
                    key: "qubitro.api_key_file",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("qubitro.api_key_file: cannot read "),
            "{err}"
        );
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.mqtt.host, "127.0.0.1");
        assert_eq!(c.mqtt.port, 1883);
        assert_eq!(c.mqtt.announce_topic, "onboard/announce/+");
        assert_eq!(c.mqtt.reply_topic, "onboard/reply/{sensor_id}");
        assert_eq!(c.mqtt.client_id, "onboardd-gw1");
        assert_eq!(c.qubitro.base_url, "https://api.qubitro.com");
        assert_eq!(c.store.path, "/var/lib/onboardd");
        assert_eq!(c.announce.max_payload_bytes, 4096);
        assert_eq!(c.mqtt.status_topic, "onboard/gateway/gw1/status");
        assert_eq!(c.qubitro.lookup_before_create, LookupPolicy::Always);
    }

    #[test]
    fn missing_api_key_names_the_key() {
        let err = Config::from_toml("[qubitro]\nproject_id = \"p\"").unwrap_err();
        assert!(err.to_string().contains("qubitro.api_key"), "{err}");
    }

    #[test]
    fn missing_project_id_names_the_key() {
        let err = Config::from_toml("[qubitro]\napi_key = \"k\"").unwrap_err();
        assert!(err.to_string().contains("qubitro.project_id"), "{err}");
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let err = Config::from_toml(&format!("{MINIMAL}\n[store]\npathh = \"/x\"")).unwrap_err();
        assert!(chain(&err).contains("pathh"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = Config::from_toml(&format!("{MINIMAL}\n[mqtt]\nport = \"abc\"")).unwrap_err();
        assert!(chain(&err).contains("port"), "{err}");
    }

    #[test]
    fn redacted_output_hides_secrets() {
        let c = Config::from_toml(MINIMAL).unwrap();
        let out = c.redacted_toml();
        assert!(!out.contains("QB_secret_value"));
        assert!(out.contains("<redacted>"));
        assert!(!format!("{c:?}").contains("QB_secret_value"));
    }

    #[test]
    fn announce_topic_needs_one_plus() {
        let err = Config::from_toml(&format!(
            "{MINIMAL}\n[mqtt]\nannounce_topic = \"onboard/announce/#\""
        ))
        .unwrap_err();
        assert!(err.to_string().contains("mqtt.announce_topic"), "{err}");
    }

    #[test]
    fn secret_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "QB_from_file\n").unwrap();
        let c = Config::from_toml(&format!(
            "[qubitro]\nproject_id = \"p\"\napi_key_file = \"{}\"",
            f.display()
        ))
        .unwrap();
        assert_eq!(c.qubitro.api_key.expose(), "QB_from_file");
    }

    #[test]
    fn the_host_name_comes_from_gethostname() {
        let out = std::process::Command::new("hostname").output().unwrap();
        let expected = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(host_name().as_deref(), Some(expected.as_str()));
    }

    #[test]
    fn default_host_names_are_recognised() {
        for id in [
            "raspberrypi",
            "RaspberryPi",
            "localhost",
            "debian",
            "gateway",
        ] {
            assert!(generic_gateway_id(id), "{id}");
        }
        assert!(!generic_gateway_id("greenhouse-gw-3"));
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "localhost",
            "LOCALHOST",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "192.168.1.2",
            "broker.local",
            "10.0.0.1",
            "::2",
            "localhost.evil.com",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn plain_http_is_refused_unless_the_host_is_loopback() {
        for url in [
            "http://api.qubitro.com",
            "http://10.0.0.5:8080",
            "http://127.example.com",
            "http://[::2]",
            "http://localhost.evil.com",
        ] {
            let err = Config::from_toml(&format!("{MINIMAL}\nbase_url = \"{url}\"")).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("qubitro.base_url: http:// is allowed only"),
                "{url}: {err}"
            );
        }
        for url in [
            "http://127.0.0.1:9000",
            "http://127.1.2.3",
            "http://[::1]:8080/",
            "http://localhost:3000",
            "http://LOCALHOST",
            "https://api.qubitro.com",
        ] {
            Config::from_toml(&format!("{MINIMAL}\nbase_url = \"{url}\""))
                .unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    #[test]
    fn a_client_certificate_without_a_ca_is_a_config_error() {
        let err = Config::from_toml(&format!(
            "{MINIMAL}\n[mqtt]\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\""
        ))
        .unwrap_err();
        assert!(
            err.to_string().starts_with("mqtt.ca_file: is required"),
            "{err}"
        );
    }

    #[test]
    fn local_commands_need_no_api_key_and_read_no_cloud_secret_file() {
        let text = "gateway_id = \"gw1\"\n[qubitro]\nproject_id = \"p\"\napi_key_file = \"/nonexistent/key\"\n[mqtt]\npassword_file = \"/nonexistent/pw\"";
        let c = Config::from_toml_for(text, Needs::Local).unwrap();
        assert!(c.qubitro.api_key.is_empty());
        assert!(matches!(
            c.require_api_key().unwrap_err(),
            ConfigError::Key { ref key, .. } if key == "qubitro.api_key"
        ));
        assert!(matches!(
            Config::from_toml_for(text, Needs::Cloud).unwrap_err(),
            ConfigError::SecretFile { .. }
        ));
        let err = Config::from_toml_for("[qubitro]\nproject_id = \"p\"", Needs::Cloud).unwrap_err();
        assert!(err.to_string().starts_with("qubitro.api_key"), "{err}");
    }
}
