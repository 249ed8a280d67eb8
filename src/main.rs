//! The `onboardd` command line: parses arguments and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use onboardd::config::{Config, DEFAULT_CONFIG, DEFAULT_CONFIG_PATH};
use onboardd::control::{self, DeviceRow, Request, Response};

/// Exit code of a configuration error: the systemd unit does not restart on it
/// (RestartPreventExitStatus=78, EX_CONFIG from sysexits.h).
const EXIT_CONFIG: u8 = 78;

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
        action: DevicesCmd,
    },
    /// Print the claim a sensor must carry: hex(HMAC-SHA256(claim_key, SENSOR_ID))
    Claim {
        /// File holding the fleet claim key (as for `security.claim_key_file`)
        #[arg(long, env = "ONBOARDD_CLAIM_KEY_FILE")]
        key_file: PathBuf,
        /// The sensor id to derive the claim for
        sensor_id: String,
    },
}

#[derive(Subcommand)]
enum DevicesCmd {
    /// A table of every known sensor and its state
    List {
        /// One JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Everything known of one sensor (the token only with --show-token)
    Show {
        sensor_id: String,
        #[arg(long)]
        show_token: bool,
    },
    /// Forget a sensor: it is onboarded anew on its next announce. Its Qubitro
    /// device is KEPT unless --delete-remote is given.
    Forget {
        sensor_id: String,
        /// Also delete the device in Qubitro (needs the daemon running)
        #[arg(long)]
        delete_remote: bool,
    },
    /// Every sensor as JSON lines (tokens only with --include-tokens)
    Export {
        #[arg(long)]
        include_tokens: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // reqwest and rumqttc are built without a default TLS provider: ring builds for
    // every Pi (aws-lc-rs does not for armv7). Installed once, before any client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::CheckConfig(c) => match Config::load(&c.config) {
            Ok(cfg) => {
                println!("# {}: valid", c.config.display());
                print!("{}", cfg.redacted_toml());
                onboardd::config::warn_if_readable_secrets(&c.config, &cfg);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("onboardd: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run(c) => {
            let cfg = match Config::load(&c.config) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("onboardd: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            if let Err(e) = onboardd::logging::init(&cfg.log.level) {
                eprintln!("onboardd: log.level: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            onboardd::config::warn_if_readable_secrets(&c.config, &cfg);
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("onboardd: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(async {
                // Installed before anything starts, so an early SIGTERM is a clean stop.
                let signals = shutdown_signal();
                onboardd::daemon::run(cfg, signals).await
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "onboardd stopped on an error");
                    eprintln!("onboardd: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Claim {
            key_file,
            sensor_id,
        } => {
            // Only the key: a factory station has no API key and no full config.
            let key = match std::fs::read_to_string(&key_file) {
                Ok(k) if !k.trim_end_matches(['\n', '\r']).is_empty() => {
                    onboardd::config::Secret::new(k.trim_end_matches(['\n', '\r']))
                }
                Ok(_) => {
                    eprintln!("onboardd: {} is empty", key_file.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
                Err(e) => {
                    eprintln!("onboardd: cannot read {}: {e}", key_file.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            if !onboardd::config::valid_topic_level(&sensor_id) {
                eprintln!("onboardd: {sensor_id:?} is not a valid sensor id (1-64 of A-Z a-z 0-9 . _ : -)");
                return ExitCode::from(2);
            }
            println!("{}", onboardd::security::claim_for(&key, &sensor_id));
            ExitCode::SUCCESS
        }
        Command::Devices { cfg, action } => {
            let cfg = match Config::load(&cfg.config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("onboardd: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("onboardd: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(devices(cfg, action)) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("onboardd: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // A Pi has 1-4 cores; more threads only cost memory.
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().min(4)))
        .max_blocking_threads(8)
        .build()
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

/// Asks the running daemon, or opens the store directly when none runs.
async fn ask(cfg: &Config, req: Request) -> anyhow::Result<Response> {
    if let Some(resp) = control::request(&cfg.control.socket, &req).await? {
        return Ok(resp);
    }
    let (store, _) = onboardd::store::Store::open(&cfg.store)
        .map_err(|e| anyhow::anyhow!("{e}; no daemon answers on {} either", cfg.control.socket))?;
    Ok(control::answer(req, &store, None).await)
}

async fn devices(cfg: Config, action: DevicesCmd) -> anyhow::Result<ExitCode> {
    match action {
        DevicesCmd::List { json } => {
            let Response::Devices { mut devices } = expect_ok(ask(&cfg, Request::List).await?)?
            else {
                anyhow::bail!("unexpected answer from the daemon");
            };
            devices.iter_mut().for_each(|d| d.device_token = None);
            if json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
            } else {
                print_table(&devices);
            }
        }
        DevicesCmd::Show {
            sensor_id,
            show_token,
        } => {
            let Response::Device { device } = expect_ok(
                ask(
                    &cfg,
                    Request::Show {
                        sensor_id: sensor_id.clone(),
                    },
                )
                .await?,
            )?
            else {
                anyhow::bail!("unexpected answer from the daemon");
            };
            match device {
                Some(mut d) => {
                    if !show_token {
                        d.device_token = None;
                    }
                    println!("{}", serde_json::to_string_pretty(&d)?);
                }
                None => {
                    eprintln!("onboardd: {sensor_id} is not known to this gateway");
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        DevicesCmd::Forget {
            sensor_id,
            delete_remote,
        } => {
            let resp = expect_ok(
                ask(
                    &cfg,
                    Request::Forget {
                        sensor_id,
                        delete_remote,
                    },
                )
                .await?,
            )?;
            if let Response::Forgot { found, message, .. } = resp {
                println!("{message}");
                if !found {
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        DevicesCmd::Export { include_tokens } => {
            let Response::Devices { devices } = expect_ok(ask(&cfg, Request::List).await?)? else {
                anyhow::bail!("unexpected answer from the daemon");
            };
            for mut d in devices {
                if !include_tokens {
                    d.device_token = None;
                }
                println!("{}", serde_json::to_string(&d)?);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn expect_ok(resp: Response) -> anyhow::Result<Response> {
    match resp {
        Response::Error { message } => anyhow::bail!("{message}"),
        other => Ok(other),
    }
}

fn print_table(devices: &[DeviceRow]) {
    let w_id = devices
        .iter()
        .map(|d| d.sensor_id.len())
        .max()
        .unwrap_or(0)
        .max(9);
    let w_dev = devices
        .iter()
        .map(|d| d.device_id.as_deref().unwrap_or("-").len())
        .max()
        .unwrap_or(0)
        .max(9);
    println!(
        "{:<w_id$}  {:<9}  {:<w_dev$}  NAME",
        "SENSOR_ID", "STATE", "DEVICE_ID"
    );
    for d in devices {
        println!(
            "{:<w_id$}  {:<9}  {:<w_dev$}  {}",
            d.sensor_id,
            d.state,
            d.device_id.as_deref().unwrap_or("-"),
            d.name
        );
    }
    println!("{} sensors", devices.len());
}
