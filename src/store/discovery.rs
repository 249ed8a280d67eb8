//! Zero-firmware onboarding's persisted state, in the sensor database so its
//! writes join the same group commit as the records they lead to: each device
//! discovery knows (by its registry key) and each config topic it read, as JSON.
//!
//! The key layout lives here and nowhere else. Generic over the values, so the
//! store needs no discovery type: the engine reads and writes the registry's own.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{ReadingsTree, Store, StoreError, RETIRED_PREFIX};

/// Key prefixes in the `discovery` tree: a device by its registry key, a config by
/// its topic. (`RETIRED_PREFIX`: marks a previous version wrote for retired devices.)
const DEVICE_PREFIX: &str = "d/";
const CONFIG_PREFIX: &str = "c/";

/// Discovery's tree, with typed access.
#[derive(Clone)]
pub struct DiscoveryTree {
    tree: ReadingsTree,
}

/// What discovery stored, read back at start.
pub struct DiscoveryState<D, C> {
    /// (registry key, device).
    pub devices: Vec<(String, D)>,
    /// (config topic, config).
    pub configs: Vec<(String, C)>,
}

impl Store {
    /// Discovery's tree (created on first use).
    pub fn discovery_tree(&self) -> Result<DiscoveryTree, StoreError> {
        Ok(DiscoveryTree {
            tree: self.discovery()?,
        })
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data always serialises")
}

impl DiscoveryTree {
    /// Every device and config stored; unreadable entries are logged and skipped
    /// (discovery re-reads retained configs anyway).
    pub fn load<D: DeserializeOwned, C: DeserializeOwned>(
        &self,
    ) -> Result<DiscoveryState<D, C>, StoreError> {
        let mut state = DiscoveryState {
            devices: Vec::new(),
            configs: Vec::new(),
        };
        for item in self.tree.tree.iter() {
            let (k, v) = item?;
            let Ok(k) = std::str::from_utf8(&k) else {
                continue;
            };
            if let Some(key) = k.strip_prefix(DEVICE_PREFIX) {
                match serde_json::from_slice::<D>(&v) {
                    Ok(known) => state.devices.push((key.to_string(), known)),
                    Err(e) => {
                        tracing::warn!(key, error = %e, "unreadable discovered device {key} in the store: ignored")
                    }
                }
            } else if let Some(topic) = k.strip_prefix(CONFIG_PREFIX) {
                match serde_json::from_slice::<C>(&v) {
                    Ok(c) => state.configs.push((topic.to_string(), c)),
                    Err(e) => {
                        tracing::warn!(topic, error = %e, "unreadable discovery config {topic} in the store: ignored")
                    }
                }
            }
        }
        Ok(state)
    }

    /// Stores what the registry says of a config topic (`None`: it has none now).
    pub fn set_config<C: Serialize>(
        &self,
        topic: &str,
        config: Option<&C>,
    ) -> Result<(), StoreError> {
        let key = format!("{CONFIG_PREFIX}{topic}");
        match config {
            Some(c) => self.tree.tree.insert(key, json(c))?,
            None => self.tree.tree.remove(key)?,
        };
        Ok(())
    }

    /// Stores a device under its registry key.
    pub fn set_device<D: Serialize>(&self, key: &str, device: &D) -> Result<(), StoreError> {
        self.tree
            .tree
            .insert(format!("{DEVICE_PREFIX}{key}"), json(device))?;
        Ok(())
    }

    /// Sensors a previous version marked retired in this tree (now a record state).
    pub fn retired_marks(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.tree.scan_prefix(RETIRED_PREFIX) {
            let (k, _) = item?;
            out.push(String::from_utf8_lossy(&k[RETIRED_PREFIX.len()..]).into_owned());
        }
        Ok(out)
    }

    /// Removes a previous version's retired mark; true when there was one.
    pub fn remove_retired_mark(&self, sensor: &str) -> Result<bool, StoreError> {
        Ok(self
            .tree
            .tree
            .remove(format!("{RETIRED_PREFIX}{sensor}"))?
            .is_some())
    }

    /// Records that writes happened; `durable(seq)` then covers them.
    pub fn wrote(&self) -> u64 {
        self.tree.wrote()
    }

    /// Writes a previous version's retired mark, to test that it is still read.
    #[cfg(test)]
    pub fn mark_retired_as_before(&self, sensor: &str) -> Result<(), StoreError> {
        self.tree
            .tree
            .insert(format!("{RETIRED_PREFIX}{sensor}"), b"".as_slice())?;
        Ok(())
    }
}
