//! The `onboardd` command line: parses arguments, sets up logging, hands over to
//! the library and turns the outcome into an exit code. Nothing else lives here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use onboardd::config::{self, Config, ConfigError, Needs, DEFAULT_CONFIG, DEFAULT_CONFIG_PATH};
use onboardd::control::{self, DevicesCommand, Outcome};
use onboardd::logging::LogError;

#[derive(Parser)]
#[command(
    name = "onboardd",
    version,
    about = "Onboards MQTT sensors on an edge gateway as Qubitro devices",
    long_about = "onboardd listens for sensor announces on the local MQTT broker, creates each sensor \
once as a Qubitro device, stores the credentials durably, and publishes them back on the sensor's \
reply topic.\n\nConfiguration: a TOML file (see `onboardd print-default-config`); every key can be \
overridden as ONBOARDD__SECTION__KEY."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ConfigArg {
    /// Configuration file
    #[arg(long, short = 'c', env = "ONBOARDD_CONFIG", default_value = DEFAULT_CONFIG_PATH, global = true)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (under systemd: Type=notify, journald, watchdog)
    Run(ConfigArg),
    /// Validate a config file and print the effective config, secrets redacted
    CheckConfig(ConfigArg),
    /// Print the default config file, every key commented
    PrintDefaultConfig,
    /// Show and manage the sensors this gateway knows (works while the daemon runs)
    Devices {
        #[command(flatten)]
        cfg: ConfigArg,
        #[command(subcommand)]
        action: DevicesCommand,
    },
    /// Print a sensor's key (64 hex): HMAC-SHA256(claim_key, SENSOR_ID), to flash into it
    #[command(
        long_about = "Print a sensor's key: HMAC-SHA256(claim_key, SENSOR_ID) as 64 hex characters, \
to flash into the sensor at manufacture (README, Security). The claim key comes from --key-file, \
else from the config (security.claim_key, claim_key_file, else the key onboardd generated at \
{store.path}/claim-key on its first start). Creates nothing."
    )]
    Claim {
        /// File holding the fleet claim key (as for `security.claim_key_file`)
        #[arg(long, env = "ONBOARDD_CLAIM_KEY_FILE")]
        key_file: Option<PathBuf>,
        #[command(flatten)]
        cfg: ConfigArg,
        /// The sensor id to derive the key for
        sensor_id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    onboardd::tls::install_ring_provider();
    match execute(cli.command) {
        Ok(code) => code,
        Err(failure) => {
            let (code, e) = match failure {
                Failure::Config(e) => (EXIT_CONFIG, e),
                Failure::Usage(e) => (EXIT_USAGE, e),
                Failure::Runtime(e) => (1, e),
            };
            eprintln!("onboardd: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// Exit code of a configuration error: the systemd unit does not restart on it
/// (RestartPreventExitStatus=78, EX_CONFIG from sysexits.h).
const EXIT_CONFIG: u8 = 78;
/// Exit code of a wrong argument, as clap itself uses.
const EXIT_USAGE: u8 = 2;

/// Why a command failed; the variant alone decides the exit code (in `main`).
enum Failure {
    /// The configuration is wrong (a key, a secret file, the log level): 78.
    Config(anyhow::Error),
    /// An argument is wrong: 2.
    Usage(anyhow::Error),
    /// Anything else: 1, which systemd restarts `run` after.
    Runtime(anyhow::Error),
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Config(e.into())
    }
}

impl From<LogError> for Failure {
    fn from(e: LogError) -> Self {
        Failure::Config(e.into())
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(e)
    }
}

fn execute(command: Command) -> Result<ExitCode, Failure> {
    match command {
        Command::PrintDefaultConfig => print!("{DEFAULT_CONFIG}"),
        Command::CheckConfig(c) => {
            // The packaged unit hands the API key (and the MQTT password) to the
            // service alone: their absence here is a note, not an error.
            let cfg = Config::load_for(&c.config, Needs::Local)?;
            println!("# {}: valid", c.config.display());
            print!("{}", cfg.redacted_toml());
            config::warn_if_readable_secrets(&c.config, &cfg);
            // What `run` would also need here: said, not failed on.
            if let Err(e) = Config::load(&c.config) {
                eprintln!(
                    "onboardd: note: `run` in this environment would stop: {:#}. Expected when the packaged unit hands \
                         the API key to the service alone (LoadCredential= and ONBOARDD__QUBITRO__API_KEY_FILE)",
                    anyhow::Error::from(e)
                );
            }
        }
        Command::Run(c) => run(&c.config)?,
        Command::Claim {
            key_file,
            cfg,
            sensor_id,
        } => claim(key_file.as_deref(), &cfg.config, &sensor_id)?,
        Command::Devices { cfg: path, action } => {
            let cfg = Config::load_for(&path.config, Needs::Local)?;
            let outcome = runtime()?
                .block_on(control::client::devices(&cfg, &path.config, action))
                .map_err(anyhow::Error::from)?;
            if outcome == Outcome::NotFound {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run(path: &Path) -> Result<(), Failure> {
    let cfg = Config::load(path)?;
    onboardd::logging::init(&cfg.log.level)?;
    config::warn_if_readable_secrets(path, &cfg);
    let rt = runtime()?;
    rt.block_on(async {
        // Installed before anything starts, so an early SIGTERM is a clean stop.
        let signals = shutdown_signal();
        onboardd::daemon::run(cfg, signals).await
    })
    .map_err(|e| {
        tracing::error!(error = %format!("{e:#}"), "onboardd stopped on an error");
        // A refusal the operator must resolve: restarting would only repeat it.
        let refused = e
            .downcast_ref::<onboardd::claim_key::ClaimKeyError>()
            .is_some_and(|c| c.is_config());
        if refused {
            Failure::Config(e)
        } else {
            Failure::Runtime(e)
        }
    })
}

/// With `--key-file`, only the key: a factory station has no API key and no full
/// config. Otherwise the config's key, or the one the daemon generated.
fn claim(key_file: Option<&Path>, config: &Path, sensor_id: &str) -> Result<(), Failure> {
    if !onboardd::announce::valid_id(sensor_id) {
        return Err(Failure::Usage(anyhow::anyhow!(
            "{sensor_id:?} is not a valid sensor id (1-64 of A-Z a-z 0-9 . _ : -)"
        )));
    }
    let key = match key_file {
        Some(f) => config::read_key_file("--key-file", f)?,
        None => {
            let (configured, store_path) = config::load_claim_settings(config)?;
            let found = onboardd::claim_key::existing(&configured, &store_path)
                .map_err(|e| Failure::Config(e.into()))?;
            match found {
                Some(key) => key,
                None => {
                    return Err(Failure::Runtime(anyhow::anyhow!(
                        "no claim key yet: {} does not exist and {} sets neither security.claim_key nor security.claim_key_file. \
Start the daemon once (`onboardd run` generates the key there), or set security.claim_key_file, \
or give --key-file FILE",
                        onboardd::claim_key::generated_path(&store_path).display(),
                        config.display()
                    )))
                }
            }
        }
    };
    println!(
        "{}",
        onboardd::proof::SensorKey::derive(&key, sensor_id).to_hex()
    );
    Ok(())
}

/// The runtime's worker threads: `TOKIO_WORKER_THREADS` when set (an operator's
/// override, the benchmark's A/B), else [`worker_threads`] of the cores. Read here, not
/// by tokio, which would panic on a bad value.
fn worker_count() -> anyhow::Result<usize> {
    match std::env::var("TOKIO_WORKER_THREADS") {
        Err(_) => Ok(worker_threads(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        )),
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=256).contains(n))
            .with_context(|| {
                format!("TOKIO_WORKER_THREADS={v:?} is not a number of threads from 1 to 256")
            }),
    }
}

/// A bad `TOKIO_WORKER_THREADS` is a configuration error (exit 78).
fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    let workers = worker_count().map_err(Failure::Config)?;
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .max_blocking_threads(8)
        .build()
        .context("cannot start the runtime")?)
}

/// Half the cores, at least one, at most four (a Pi has one to four). The gateway
/// shares its cores with the broker that every reading and announce crosses, and
/// sled's flusher; onboardd's own work per message is small, so a second worker on a
/// two-core Pi mostly adds cross-thread wake-ups (BENCHMARKS.md, "Tokio workers and
/// the reading's path").
fn worker_threads(cores: usize) -> usize {
    (cores / 2).clamp(1, 4)
}

/// Registers SIGTERM and SIGINT now; the returned future resolves on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::worker_threads;

    #[test]
    fn a_two_core_gateway_gets_one_worker_and_a_big_host_at_most_four() {
        assert_eq!(worker_threads(1), 1);
        assert_eq!(worker_threads(2), 1);
        assert_eq!(worker_threads(4), 2);
        assert_eq!(worker_threads(64), 4);
    }
}
