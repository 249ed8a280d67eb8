//! Configuration: a TOML file read with the `config` crate, overridden key by key
//! from `ONBOARDD__SECTION__KEY` environment variables, then validated once at start
//! so that every mistake is a config error naming its key, never a runtime surprise.
//!
//! - `types`: the sections and keys, with the defaults of `config/onboardd.toml`.
//! - `load`: the layers (defaults, file, environment) and the claim command's subset.
//! - `validate`: the checks every key passes and the defaults derived from others.
//! - `secrets`: [`Secret`], the key and password files, the loose-permission warnings.
//! - `error`: [`ConfigError`].

mod error;
mod load;
mod secrets;
mod types;
mod validate;

pub use error::ConfigError;
pub use load::{load_claim_settings, DEFAULT_CONFIG, DEFAULT_CONFIG_PATH};
pub use secrets::{read_key_file, warn_if_loose_secret_files, warn_if_readable_secrets, Secret};
pub use types::{
    AnnounceConfig, BridgeConfig, Config, ControlConfig, DiscoveryConfig, HttpConfig, LogConfig,
    LookupPolicy, MqttConfig, Needs, QubitroConfig, SecurityConfig, StoreConfig,
};
pub use validate::{generic_gateway_id, is_loopback_host};

#[cfg(test)]
pub(crate) const MINIMAL: &str = r#"
    gateway_id = "gw1"
    [qubitro]
    project_id = "p1"
    api_key = "QB_secret_value"
"#;

/// The error and its sources, as main prints them.
#[cfg(test)]
pub(crate) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    crate::logging::chain(err).to_string()
}
