//! Validation: every key checked once at start, so that a mistake is a config
//! error naming its key, never a runtime surprise; and the defaults derived from
//! others (gateway id from the host name, client id, topics).

use crate::announce::valid_id;

use super::error::{key_err, ConfigError};
use super::secrets::{read_secret_file, require_strong_claim_key};
use super::types::{BridgeConfig, Config, DiscoveryConfig, HttpConfig, Needs, QubitroConfig};

impl Config {
    /// Fills derived defaults, reads secret files and checks every key.
    pub(super) fn resolve(&mut self, needs: Needs) -> Result<(), ConfigError> {
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
            read_secret_file(
                "http.password_file",
                &self.http.password_file,
                &mut self.http.password,
            )?;
        }
        self.http.check()?;
        if cloud {
            read_secret_file("http.key_file", &self.http.key_file, &mut self.http.key)?;
        }
        read_secret_file(
            "security.claim_key_file",
            &self.security.claim_key_file,
            &mut self.security.claim_key,
        )?;
        require_strong_claim_key(&self.security)?;

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
                "http:// is allowed only for a loopback host (127.0.0.0/8, ::1, localhost): the API \
                    key and every device token would cross the network in clear; use https://",
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
}

impl DiscoveryConfig {
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
            ("bridge.spill_after_ms", self.spill_after_ms),
            (
                "bridge.max_readings_per_s",
                u64::from(self.max_readings_per_s),
            ),
        ] {
            if v == 0 {
                return Err(key_err(key, "must be at least 1"));
            }
        }
        if !qubitro.broker_tls && !is_loopback_host(&qubitro.broker_host) {
            return Err(key_err(
                "qubitro.broker_tls",
                format!(
                    "may be false only for a loopback qubitro.broker_host (tests, local \
                        development), not {:?}: device tokens would cross the network in clear",
                    qubitro.broker_host
                ),
            ));
        }
        Ok(())
    }
}

/// An `http://` URL whose host is 127.0.0.0/8, `::1` or `localhost`.
fn loopback_url(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    u.host_str().is_some_and(is_loopback_host)
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

impl HttpConfig {
    /// The address to listen on, when the listener is on.
    pub fn listen_addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
    }

    /// Whether the listener speaks HTTPS (`cert_file` and `key_file` set).
    pub fn tls(&self) -> bool {
        !self.cert_file.is_empty()
    }

    fn check(&self) -> Result<(), ConfigError> {
        // One without the other would serve plain HTTP where HTTPS was meant.
        match (self.cert_file.is_empty(), self.key_file.is_empty()) {
            (true, false) => {
                return Err(key_err(
                    "http.cert_file",
                    "missing: http.key_file is set, and HTTPS needs the certificate too",
                ))
            }
            (false, true) => {
                return Err(key_err(
                    "http.key_file",
                    "missing: http.cert_file is set, and HTTPS needs its private key too",
                ))
            }
            _ => {}
        }
        if self.listen.is_empty() {
            return Ok(());
        }
        let Some(addr) = self.listen_addr() else {
            return Err(key_err(
                "http.listen",
                format!(
                    "{:?} is not IP:port (e.g. 127.0.0.1:8099), nor \"\" (off)",
                    self.listen
                ),
            ));
        };
        // Metrics and health say what the gateway runs and when it is down: beyond
        // this machine only for those who know the password.
        if !addr.ip().is_loopback() && self.password_file.is_empty() {
            return Err(key_err(
                "http.listen",
                format!(
                    "{addr} is reachable beyond this machine: set http.password_file (HTTP Basic) \
                        or listen on 127.0.0.1"
                ),
            ));
        }
        Ok(())
    }
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
    use crate::config::{chain, MINIMAL};

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
    fn announce_topic_needs_one_plus() {
        let err = Config::from_toml(&format!(
            "{MINIMAL}\n[mqtt]\nannounce_topic = \"onboard/announce/#\""
        ))
        .unwrap_err();
        assert!(err.to_string().contains("mqtt.announce_topic"), "{err}");
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
    fn the_http_listener_goes_beyond_loopback_only_with_a_password_file() {
        let with =
            |http: &str| Config::from_toml_for(&format!("{MINIMAL}\n[http]\n{http}"), Needs::Local);
        for ok in [
            "listen = \"\"",
            "listen = \"127.0.0.1:9\"",
            "listen = \"[::1]:9\"",
        ] {
            assert!(with(ok).is_ok(), "{ok}");
        }
        let beyond = with("listen = \"0.0.0.0:9\"").unwrap_err();
        assert!(
            matches!(beyond, ConfigError::Key { ref key, .. } if key == "http.listen"),
            "{beyond}"
        );
        assert!(with("listen = \"0.0.0.0:9\"\npassword_file = \"/etc/pw\"").is_ok());
        let bad = with("listen = \"localhost\"").unwrap_err();
        assert!(
            matches!(bad, ConfigError::Key { ref key, .. } if key == "http.listen"),
            "{bad}"
        );
    }

    #[test]
    fn https_needs_both_the_certificate_and_the_key_and_an_error_names_the_missing_one() {
        let with =
            |http: &str| Config::from_toml_for(&format!("{MINIMAL}\n[http]\n{http}"), Needs::Local);
        let both = with("listen = \"127.0.0.1:9\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"");
        assert!(both.unwrap().http.tls());
        for (given, missing) in [
            ("cert_file = \"/c.pem\"", "http.key_file"),
            ("key_file = \"/k.pem\"", "http.cert_file"),
        ] {
            let err = with(&format!("listen = \"127.0.0.1:9\"\n{given}")).unwrap_err();
            assert!(
                matches!(err, ConfigError::Key { ref key, .. } if key == missing),
                "{given}: {err}"
            );
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
        let text = "gateway_id = \"gw1\"\n[qubitro]\nproject_id = \"p\"\napi_key_file = \
            \"/nonexistent/key\"\n[mqtt]\npassword_file = \"/nonexistent/pw\"";
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
