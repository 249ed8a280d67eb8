//! The store of devices and what the fake saw: devices indexed by id and metadata, the recorded
//! requests, queued faults and the run-time switches, behind the lock every clone shares.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use crate::devices::{
    device_token, rfc3339_now, DeviceHook, FakeDevice, NewDevice, RecordedRequest,
};
use crate::faults::Fault;
use crate::lock;
use crate::options::FakeOptions;
use crate::shapes::ListOptions;

/// What every clone of the handle and every connection share.
pub(crate) struct Shared {
    pub(crate) opts: FakeOptions,
    pub(crate) state: Mutex<Registry>,
    // Arrival counters, in a watch channel so wait_for_requests needs no polling.
    pub(crate) counts: watch::Sender<[usize; 4]>,
    /// See [`crate::FakeQubitro::on_device_created`].
    pub(crate) hooks: Mutex<Vec<DeviceHook>>,
    /// `true` while creates are held (see [`crate::FakeQubitro::hold_creates`]); a watch so
    /// held requests wake on release without polling.
    pub(crate) creates_held: watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Registry> {
        lock(&self.state)
    }

    /// Tells every hook of a new device (outside the registry lock).
    pub(crate) fn created(&self, device: &FakeDevice) {
        let hooks: Vec<DeviceHook> = lock(&self.hooks).clone();
        for hook in hooks {
            hook(device);
        }
    }

    /// Resolves at once unless creates are held, else once they are released.
    pub(crate) async fn creates_released(&self) {
        let mut held = self.creates_held.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = held.wait_for(|held| !held).await;
    }

    /// Holds every create from now on (`true`), or lets the held ones and later ones through.
    pub(crate) fn set_creates_held(&self, held: bool) {
        self.creates_held.send_replace(held);
    }

    pub(crate) fn reset(&self) {
        let mut state = self.lock();
        let epoch = state.epoch + 1;
        *state = Registry::new(&self.opts);
        state.epoch = epoch;
        drop(state);
        self.counts.send_replace([0; 4]);
        self.set_creates_held(false);
    }
}

pub(crate) struct StoredDevice {
    pub(crate) device: FakeDevice,
}

pub(crate) struct Registry {
    pub(crate) list: ListOptions,
    // Keyed by creation sequence, so listing newest first is a reverse walk, not a sort.
    pub(crate) devices: BTreeMap<u64, StoredDevice>,
    pub(crate) by_id: HashMap<String, u64>,
    // (metadata key, value) -> sequences of the devices carrying it, so that a filtered list
    // (onboardd's lookup before create) does not scan every device: with 100 000 devices in
    // the benchmark a scan per lookup made the fake, not onboardd, the bottleneck.
    pub(crate) by_meta: HashMap<(String, String), BTreeSet<u64>>,
    pub(crate) next_seq: u64,
    pub(crate) requests: Vec<RecordedRequest>,
    // Bumped by reset() so a request in flight across a reset does not mark someone else's record.
    pub(crate) epoch: u64,
    pub(crate) faults: [VecDeque<Fault>; 4],
    pub(crate) delay: Duration,
    /// Whether the API key may delete devices (a 403 on every delete otherwise).
    pub(crate) delete_permission: bool,
}

impl Registry {
    pub(crate) fn new(opts: &FakeOptions) -> Self {
        Registry {
            list: ListOptions::of(opts),
            devices: BTreeMap::new(),
            by_id: HashMap::new(),
            by_meta: HashMap::new(),
            next_seq: 0,
            requests: Vec::new(),
            epoch: 0,
            faults: Default::default(),
            delay: opts.delay,
            delete_permission: opts.delete_permission,
        }
    }

    pub(crate) fn insert(&mut self, d: NewDevice) -> FakeDevice {
        let device = FakeDevice {
            id: uuid::Uuid::new_v4().to_string(),
            token: device_token(),
            name: d.name,
            description: d.description,
            source: d.source,
            brand: d.brand,
            model: d.model,
            tags: d.tags,
            metadata: d.metadata,
            created_at: rfc3339_now(),
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_id.insert(device.id.clone(), seq);
        for (k, v) in &device.metadata {
            self.by_meta
                .entry((k.clone(), v.clone()))
                .or_default()
                .insert(seq);
        }
        self.devices.insert(
            seq,
            StoredDevice {
                device: device.clone(),
            },
        );
        device
    }

    /// All devices, newest first, credentials included.
    pub(crate) fn newest_first(&self) -> Vec<FakeDevice> {
        self.devices
            .values()
            .rev()
            .map(|s| s.device.clone())
            .collect()
    }

    pub(crate) fn get(&self, id: &str) -> Option<&StoredDevice> {
        self.by_id.get(id).and_then(|seq| self.devices.get(seq))
    }

    pub(crate) fn remove(&mut self, id: &str) -> Option<StoredDevice> {
        let seq = self.by_id.remove(id)?;
        let stored = self.devices.remove(&seq)?;
        for (k, v) in &stored.device.metadata {
            let key = (k.clone(), v.clone());
            if let Some(seqs) = self.by_meta.get_mut(&key) {
                seqs.remove(&seq);
                if seqs.is_empty() {
                    self.by_meta.remove(&key);
                }
            }
        }
        Some(stored)
    }

    /// Devices carrying every pair of `filter`, in creation order or its reverse; only those
    /// carrying the filter's first pair are visited.
    pub(crate) fn matching(
        &self,
        filter: &[(String, String)],
        newest_first: bool,
    ) -> Vec<&StoredDevice> {
        let candidates: Vec<&StoredDevice> = match filter.first() {
            Some(pair) => self
                .by_meta
                .get(pair)
                .into_iter()
                .flatten()
                .filter_map(|seq| self.devices.get(seq))
                .collect(),
            None => self.devices.values().collect(),
        };
        let matches = |s: &&StoredDevice| {
            filter
                .iter()
                .all(|(k, v)| s.device.metadata.get(k).is_some_and(|have| have == v))
        };
        let mut found: Vec<&StoredDevice> = candidates.into_iter().filter(matches).collect();
        if newest_first {
            found.reverse();
        }
        found
    }
}
