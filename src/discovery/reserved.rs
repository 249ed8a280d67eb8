//! The topics discovery may never follow: onboardd's own (announces, replies,
//! bridged readings, status, stats) and the broker's `$` topics.
//!
//! Whoever may publish a discovery config names the state topic it follows. Were
//! it one of onboardd's topics, the message would be read as a reading instead of
//! what it is (a sensor's announces vanishing, across restarts, since the registry
//! is persisted), so such a state topic is refused when the config is parsed.

use crate::config::Config;

/// onboardd's topic patterns as MQTT filters (`{…}` placeholders as `+`).
#[derive(Debug, Clone, Default)]
pub struct Reserved {
    filters: Vec<String>,
}

impl Reserved {
    pub fn from_config(cfg: &Config) -> Reserved {
        let m = &cfg.mqtt;
        let patterns = [
            &m.announce_topic,
            &m.reply_topic,
            &m.status_topic,
            &m.stats_topic,
            &cfg.bridge.data_topic,
        ];
        Reserved {
            filters: patterns.iter().map(|p| as_filter(p)).collect(),
        }
    }

    /// Why `topic` may not be followed (the pattern it falls under), or `None`.
    pub fn refusal(&self, topic: &str) -> Option<String> {
        if topic.starts_with('$') {
            return Some(format!(
                "state topic {topic:?} is a broker ($) topic; skipped"
            ));
        }
        self.filters
            .iter()
            .find(|f| under(f, topic))
            .map(|f| format!("state topic {topic:?} is under onboardd's own topic {f:?}; skipped"))
    }
}

/// A pattern as a filter: a level holding a `{…}` placeholder matches any level.
fn as_filter(pattern: &str) -> String {
    pattern
        .split('/')
        .map(|level| if level.contains('{') { "+" } else { level })
        .collect::<Vec<_>>()
        .join("/")
}

/// Whether `topic` matches `filter` or lies below a topic that does.
fn under(filter: &str, topic: &str) -> bool {
    let mut levels = topic.split('/');
    for f in filter.split('/') {
        match (f, levels.next()) {
            ("#", _) => return true,
            (_, None) => return false,
            ("+", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reserved() -> Reserved {
        let cfg = Config::from_toml(
            "gateway_id = \"gw\"\n[qubitro]\nproject_id = \"p\"\napi_key = \"k\"",
        )
        .expect("valid");
        Reserved::from_config(&cfg)
    }

    #[test]
    fn onboardds_own_topics_and_broker_topics_are_refused_with_the_pattern_named() {
        let r = reserved();
        for (topic, named) in [
            ("onboard/announce/x", "onboard/announce/+"),
            ("onboard/announce/x/deeper", "onboard/announce/+"),
            ("onboard/reply/temp-01", "onboard/reply/+"),
            ("onboard/data/temp-01", "onboard/data/+"),
            ("onboard/gateway/gw/status", "onboard/gateway/gw/status"),
            ("onboard/gateway/gw/stats", "onboard/gateway/gw/stats"),
        ] {
            let why = r
                .refusal(topic)
                .unwrap_or_else(|| panic!("{topic} allowed"));
            assert!(why.contains(named) && why.contains(topic), "{why}");
        }
        assert!(r.refusal("$SYS/broker/uptime").is_some());
    }

    #[test]
    fn ordinary_state_topics_and_near_misses_are_allowed() {
        let r = reserved();
        for topic in [
            "zigbee2mqtt/living_room",
            "onboard/announce",
            "onboard/announcements/x",
            "onboard/gateway/other/status",
            "tele/th/SENSOR",
        ] {
            assert_eq!(r.refusal(topic), None, "{topic}");
        }
    }
}
