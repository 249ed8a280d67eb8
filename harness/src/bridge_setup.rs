//! The setup every test of the telemetry bridge starts from: a local broker, the fake
//! Qubitro, the stand-in for Qubitro's broker with its observer, and onboardd with its
//! bridge pointed there ([`bridged`], [`Bridged`]).
//!
//! A test states only what differs (a persistent local broker, a debug-logging one, a
//! proxy in front of the stand-in, the daemon's stats, extra config) on the builder.

use fake_qubitro::{FakeOptions, FakeQubitro};

use crate::daemon::{merge_toml, Daemon};
use crate::firmware::Reply;
use crate::mosquitto::{Mosquitto, MosquittoBuilder};
use crate::proxy::Proxy;
use crate::qubitro_broker::{Observer, QubitroBroker};
use crate::sensor::Sensor;

/// Where onboardd publishes its stats (with `[log] stats_interval_s` above 0).
pub const STATS_TOPIC: &str = "onboard/gateway/+/stats";

/// What [`bridged`] started. The daemon is the first field so that it stops first when
/// the test ends (fields drop in declaration order): what it talks to outlives it.
pub struct Bridged {
    /// onboardd, started and subscribed, its bridge pointed at `qubitro` (or at
    /// `proxy`, when there is one).
    pub d: Daemon,
    /// A subscriber to every topic of the stand-in broker: what Qubitro would receive.
    pub obs: Observer,
    /// A client subscribed to the daemon's stats before it started (with
    /// [`BridgedBuilder::stats`]): [`Bridged::stats`].
    stats: Option<Sensor>,
    /// A proxy between the bridge and the stand-in (with
    /// [`BridgedBuilder::through_proxy`]): [`Bridged::proxy`].
    proxy: Option<Proxy>,
    /// The stand-in for Qubitro's broker, a login for each device the fake creates.
    pub qubitro: QubitroBroker,
    /// The fake Qubitro the daemon onboards with.
    pub cloud: FakeQubitro,
    /// The local broker the sensors and onboardd share.
    pub broker: Mosquitto,
}

/// The options of [`bridged`]; [`BridgedBuilder::start`] starts everything.
#[derive(Default)]
pub struct BridgedBuilder {
    broker: MosquittoBuilder,
    cloud: FakeOptions,
    extra: String,
    proxy: bool,
    stats: bool,
}

/// A builder of the bridge's test setup; `bridged().start().await` is the plain one.
pub fn bridged() -> BridgedBuilder {
    BridgedBuilder::default()
}

/// The plain setup with `extra` config (TOML, merged over the bridge's lines).
pub async fn bridged_daemon(extra: &str) -> Bridged {
    bridged().extra(extra).start().await
}

impl BridgedBuilder {
    /// A local broker that keeps sessions and queued messages across its and the
    /// daemon's restarts (a kill -9 of onboardd must lose nothing it did not acknowledge).
    pub fn persistent_broker(mut self) -> Self {
        self.broker = self.broker.persistent();
        self
    }

    /// Lines added to the local broker's config (`log_type debug\n` to read onboardd's
    /// PUBACKs in [`Mosquitto::log`]).
    pub fn broker_conf(mut self, lines: &str) -> Self {
        self.broker = self.broker.conf(lines);
        self
    }

    /// The fake Qubitro's options (the default: [`FakeOptions::default`]).
    pub fn cloud(mut self, options: FakeOptions) -> Self {
        self.cloud = options;
        self
    }

    /// Config (TOML) merged, table by table, over the lines that point the bridge at
    /// the stand-in ([`QubitroBroker::daemon_toml`]).
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra = merge_toml(&self.extra, toml);
        self
    }

    /// The bridge reaches the stand-in through a [`Proxy`], which can withhold its
    /// PUBACKs or sever the uplink.
    pub fn through_proxy(mut self) -> Self {
        self.proxy = true;
        self
    }

    /// A stats subscriber connected before the daemon starts, and stats every second.
    pub fn stats(mut self) -> Self {
        self.stats = true;
        self.extra("[log]\nstats_interval_s = 1\n")
    }

    /// Starts the local broker, the fake, the stand-in and its observer, then the
    /// daemon, and returns once the daemon has subscribed to announces.
    pub async fn start(self) -> Bridged {
        let broker = self.broker.start();
        let cloud = FakeQubitro::start(self.cloud)
            .await
            .expect("start the fake Qubitro");
        let qubitro = QubitroBroker::start(&cloud);
        let obs = qubitro.observer().await;
        let proxy = self.proxy.then(|| Proxy::start(qubitro.port()));
        let stats = if self.stats {
            Some(Sensor::connect_as(broker.port, "stats", STATS_TOPIC, None, None).await)
        } else {
            None
        };
        let uplink = qubitro.daemon_toml_via(proxy.as_ref().map_or(qubitro.port(), |p| p.port));
        let d = Daemon::start(&broker, &cloud, &merge_toml(&uplink, &self.extra));
        Bridged {
            d,
            obs,
            stats,
            proxy,
            qubitro,
            cloud,
            broker,
        }
    }
}

impl Bridged {
    /// A sensor flashed for this gateway, connected to the local broker.
    pub async fn sensor(&self, id: &str) -> Sensor {
        self.d.sensor(self.broker.port, id).await
    }

    /// The stats subscriber; panics when built without [`BridgedBuilder::stats`].
    pub fn stats(&mut self) -> &mut Sensor {
        self.stats
            .as_mut()
            .expect("a stats subscriber: build the setup with stats()")
    }

    /// The proxy in front of the stand-in; panics when built without
    /// [`BridgedBuilder::through_proxy`].
    pub fn proxy(&self) -> &Proxy {
        self.proxy
            .as_ref()
            .expect("a proxy: build the setup with through_proxy()")
    }
}

/// Onboards `s` as a bridged sensor (named "Bridged") and returns its `ok` reply.
pub async fn onboard_bridged(s: &mut Sensor) -> Reply {
    s.announce(r#"{"bridge":true,"name":"Bridged"}"#).await;
    s.reply_with_status("ok").await
}
