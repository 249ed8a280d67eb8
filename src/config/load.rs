//! Loading: the built-in defaults, then the TOML file, then `ONBOARDD__SECTION__KEY`
//! environment variables, read with the `config` crate and validated once.

use std::path::Path;

use super::error::ConfigError;
use super::secrets::{read_secret_file, require_strong_claim_key, Secret};
use super::types::{Config, Needs, SecurityConfig};

/// The built-in defaults, which are also what `print-default-config` shows.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/onboardd.toml");

/// Where `run` and `check-config` look when `--config` and `$ONBOARDD_CONFIG` are absent.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/onboardd/onboardd.toml";

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
    // What `run` would refuse, `claim` does not derive sensor keys from.
    require_strong_claim_key(&security)?;
    Ok((security.claim_key, store_path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{chain, LookupPolicy, MINIMAL};

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
    fn unknown_key_is_rejected_by_name() {
        let err = Config::from_toml(&format!("{MINIMAL}\n[store]\npathh = \"/x\"")).unwrap_err();
        assert!(chain(&err).contains("pathh"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = Config::from_toml(&format!("{MINIMAL}\n[mqtt]\nport = \"abc\"")).unwrap_err();
        assert!(chain(&err).contains("port"), "{err}");
    }
}
