//! The `onboardd devices …` commands: ask the running daemon over the control
//! socket, or open the store directly when no daemon runs, and print the answer.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{server, ControlError, DeviceRow, Request, Response};
use crate::cloud::Cloud;
use crate::config::{Config, StoreConfig};
use crate::store::Store;

/// One `onboardd devices …` command (the clap subcommand of the binary).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DevicesCommand {
    /// A table of every known sensor and its state
    List {
        /// One JSON array instead of a table
        #[arg(long)]
        json: bool,
        /// The ignore list instead: discovered devices that were forgotten, which
        /// discovery leaves alone although their configs are still retained
        #[arg(long)]
        ignored: bool,
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
        /// Delete its Qubitro device first, and forget nothing if Qubitro refuses
        /// (without the daemon, this command needs the API key itself)
        #[arg(long)]
        delete_remote: bool,
    },
    /// Retry a bridged sensor's uplink now, after Qubitro refused its device (needs
    /// the daemon running; paused devices are also retried on their own)
    Resume { sensor_id: String },
    /// Lift a forgotten discovered device from the ignore list: discovery onboards
    /// it again (at once while the daemon runs, else at its next start)
    Unignore { sensor_id: String },
    /// Bridge the sensor's device on this gateway although another gateway made it
    /// (moving a sensor here; forget it on the old gateway)
    Adopt { sensor_id: String },
    /// Forget every sensor not heard from (no announce, no reading) for longer than
    /// DURATION, one line per sensor; each as `forget` would
    Prune {
        /// 30d, 12h, 15m, 90s
        #[arg(long, value_parser = super::prune::parse_duration)]
        not_seen_for: std::time::Duration,
        /// Delete each one's Qubitro device first; a sensor whose delete Qubitro
        /// refuses is kept (and the command exits non-zero)
        #[arg(long)]
        delete_remote: bool,
        /// Print what would be forgotten, change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Every sensor as JSON lines (tokens only with --include-tokens)
    Export {
        #[arg(long)]
        include_tokens: bool,
    },
}

/// How a `devices` command ended when nothing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// The sensor asked for is not known (exit 1, like `grep` finding nothing).
    NotFound,
}

/// Runs one `devices` command and prints its answer on stdout. `config_path`: the
/// file `cfg` came from, read again for the API key only when a remote delete must
/// be done without the daemon.
pub async fn devices(
    cfg: &Config,
    config_path: &Path,
    cmd: DevicesCommand,
) -> Result<Outcome, ControlError> {
    let ask = |req| ask(cfg, config_path, req);
    match cmd {
        DevicesCommand::List {
            json,
            ignored: true,
        } => {
            let Response::Ignored { ignored } = ask(Request::Ignored).await? else {
                return Err(ControlError::Unexpected);
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&ignored)?);
            } else {
                for i in &ignored {
                    println!(
                        "{}  ignored since {}  {}",
                        i.sensor_id,
                        utc(i.since_ms),
                        i.name
                    );
                }
                println!("{} ignored", ignored.len());
            }
        }
        DevicesCommand::List { json, .. } => {
            let req = Request::List { with_tokens: false };
            let Response::Devices { mut devices } = ask(req).await? else {
                return Err(ControlError::Unexpected);
            };
            devices.iter_mut().for_each(|d| d.device_token = None);
            if json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
            } else {
                print!("{}", table(&devices));
            }
        }
        DevicesCommand::Show {
            sensor_id,
            show_token,
        } => {
            let req = Request::Show {
                sensor_id: sensor_id.clone(),
                with_token: show_token,
            };
            let Response::Device { device } = ask(req).await? else {
                return Err(ControlError::Unexpected);
            };
            let Some(mut d) = device else {
                eprintln!("onboardd: {sensor_id} is not known to this gateway");
                return Ok(Outcome::NotFound);
            };
            if !show_token {
                d.device_token = None;
            }
            println!("{}", serde_json::to_string_pretty(&d)?);
        }
        DevicesCommand::Forget {
            sensor_id,
            delete_remote,
        } => {
            let req = Request::Forget {
                sensor_id,
                delete_remote,
            };
            if let Response::Forgot { found, message, .. } = ask(req).await? {
                println!("{message}");
                if !found {
                    return Ok(Outcome::NotFound);
                }
            }
        }
        DevicesCommand::Resume { sensor_id } => {
            let Response::Resumed { found, message } = ask(Request::Resume { sensor_id }).await?
            else {
                return Err(ControlError::Unexpected);
            };
            println!("{message}");
            if !found {
                return Ok(Outcome::NotFound);
            }
        }
        DevicesCommand::Unignore { sensor_id } => {
            let Response::Unignored { found, message } =
                ask(Request::Unignore { sensor_id }).await?
            else {
                return Err(ControlError::Unexpected);
            };
            println!("{message}");
            if !found {
                return Ok(Outcome::NotFound);
            }
        }
        DevicesCommand::Adopt { sensor_id } => {
            let Response::Adopted { found, message } = ask(Request::Adopt { sensor_id }).await?
            else {
                return Err(ControlError::Unexpected);
            };
            println!("{message}");
            if !found {
                return Ok(Outcome::NotFound);
            }
        }
        DevicesCommand::Prune {
            not_seen_for,
            delete_remote,
            dry_run,
        } => {
            let req = Request::Prune {
                not_seen_for_s: not_seen_for.as_secs(),
                delete_remote,
                dry_run,
            };
            let Response::Pruned { lines, failed } = ask(req).await? else {
                return Err(ControlError::Unexpected);
            };
            for l in &lines {
                println!("{l}");
            }
            if failed > 0 {
                return Err(ControlError::Daemon {
                    message: format!("{failed} sensor(s) could not be pruned (see above); they are kept as they were"),
                });
            }
        }
        DevicesCommand::Export { include_tokens } => {
            let req = Request::List {
                with_tokens: include_tokens,
            };
            let Response::Devices { devices } = ask(req).await? else {
                return Err(ControlError::Unexpected);
            };
            for mut d in devices {
                if !include_tokens {
                    d.device_token = None;
                }
                println!("{}", serde_json::to_string(&d)?);
            }
        }
    }
    Ok(Outcome::Done)
}

/// Asks the running daemon, or opens the store directly when none runs. An
/// error answer becomes [`ControlError::Daemon`].
async fn ask(cfg: &Config, config_path: &Path, req: Request) -> Result<Response, ControlError> {
    let resp = match request(&cfg.control.socket, &req).await? {
        Some(resp) => resp,
        None => {
            // Never create a store here: as root that would leave root-owned files
            // where the service's user must write.
            if !crate::store::exists(Path::new(&cfg.store.path)) {
                return Err(ControlError::NoStore {
                    socket: cfg.control.socket.clone(),
                    path: PathBuf::from(&cfg.store.path),
                });
            }
            // Before become_store_owner: the key file may be readable by root alone.
            let cloud = match &req {
                Request::Forget {
                    delete_remote: true,
                    ..
                }
                | Request::Prune {
                    delete_remote: true,
                    dry_run: false,
                    ..
                } => Some(offline_cloud(cfg, config_path)?),
                _ => None,
            };
            let dir = become_store_owner(&cfg.store)?;
            let (store, _) =
                Store::open_via(&dir, &cfg.store).map_err(|source| ControlError::NoDaemon {
                    socket: cfg.control.socket.clone(),
                    source,
                })?;
            let resp = server::answer(req, &store, None, cloud.as_ref()).await;
            // Nothing else writes to the store now: the next open need not reconcile.
            if let Err(e) = store.close_cleanly().await {
                return Err(ControlError::NoDaemon {
                    socket: cfg.control.socket.clone(),
                    source: e,
                });
            }
            resp
        }
    };
    match resp {
        Response::Error { message } if message.starts_with("refused: ") => {
            Err(ControlError::Refused {
                message: message["refused: ".len()..].to_string(),
            })
        }
        Response::Error { message } => Err(ControlError::Daemon { message }),
        other => Ok(other),
    }
}

/// The Qubitro client of a remote delete done without the daemon: the config read
/// again as `run` reads it, for the API key (`devices` commands otherwise skip it).
fn offline_cloud(cfg: &Config, config_path: &Path) -> Result<Cloud, ControlError> {
    let fail = |reason: String| ControlError::NoCloud {
        socket: cfg.control.socket.clone(),
        reason,
    };
    let full =
        Config::load(config_path).map_err(|e| fail(crate::logging::chain(&e).to_string()))?;
    Cloud::new(&full.qubitro).map_err(|e| fail(format!("{e:#}")))
}

/// Run as root with no daemon answering, the `devices` commands become the owner
/// of the store directory (its uid and gid, no supplementary groups) before
/// opening it, so that they never leave a root-owned file where the service's
/// user must write (under `DynamicUser=` that user exists only while the service
/// runs). Returns the path to open the store through.
///
/// The packaged directory (`/var/lib/private/onboardd`) sits below a root-only
/// directory its owner cannot traverse, so the process first changes into it and
/// then opens it as `/proc/self/cwd`: a relative path would not do, because sled
/// turns it into an absolute one (through getcwd) to look for its snapshot files,
/// and that path runs through the root-only directory again ("Permission denied").
/// `/proc/self/cwd` leads into the directory without walking its parents. glibc
/// applies set*id to every thread of the process. Does nothing when not root, or
/// when the store is owned by root.
pub fn become_store_owner(cfg: &StoreConfig) -> Result<PathBuf, ControlError> {
    use std::os::unix::fs::MetadataExt;
    let path = PathBuf::from(&cfg.path);
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(path);
    }
    let Ok(meta) = std::fs::metadata(&path) else {
        return Ok(path);
    };
    if !meta.is_dir() || meta.uid() == 0 {
        return Ok(path);
    }
    let (uid, gid) = (meta.uid(), meta.gid());
    let fail = |source: std::io::Error| ControlError::BecomeOwner {
        uid,
        path: path.clone(),
        source,
    };
    std::env::set_current_dir(&path).map_err(fail)?;
    // SAFETY: plain syscalls on integers. Groups first, then gid, then uid (after setuid we could no longer change them).
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
        {
            return Err(fail(std::io::Error::last_os_error()));
        }
    }
    Ok(PathBuf::from("/proc/self/cwd"))
}

/// Sends one request to a running daemon. `Ok(None)`: no daemon listens there.
pub async fn request(socket: &str, req: &Request) -> Result<Option<Response>, ControlError> {
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(source) if source.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(ControlError::Permission {
                socket: socket.to_string(),
                source,
            })
        }
        Err(source) => {
            return Err(ControlError::Connect {
                socket: socket.to_string(),
                source,
            })
        }
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut lines = BufReader::new(r).lines();
    let answer = lines.next_line().await?.ok_or(ControlError::Closed)?;
    Ok(Some(serde_json::from_str(&answer)?))
}

/// The `devices list` table: one line per sensor, then a count.
fn table(devices: &[DeviceRow]) -> String {
    use std::fmt::Write as _;
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
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "{:<w_id$}  {:<9}  {:<w_dev$}  {:<20}  {:<7}  NAME",
        "SENSOR_ID", "STATE", "DEVICE_ID", "LAST_SEEN", "BRIDGED"
    );
    for d in devices {
        let _ = writeln!(
            out,
            "{:<w_id$}  {:<9}  {:<w_dev$}  {:<20}  {:<7}  {}",
            d.sensor_id,
            d.state,
            d.device_id.as_deref().unwrap_or("-"),
            d.last_seen_ms.map_or("-".to_string(), utc),
            if d.bridged { "yes" } else { "-" },
            d.name
        );
    }
    let _ = writeln!(out, "{} sensors", devices.len());
    out
}

/// `2026-12-06T22:51:40Z` from wall-clock ms (UTC, to the second).
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's days_from_civil, inverted).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, device: Option<&str>) -> DeviceRow {
        DeviceRow {
            sensor_id: id.into(),
            state: "delivered".into(),
            device_id: device.map(str::to_string),
            device_token: Some("secret-token".into()),
            name: "Cellar".into(),
            brand: String::new(),
            model: String::new(),
            attempts: 0,
            first_seen_ms: 0,
            updated_ms: 0,
            last_error: None,
            origin: None,
            last_seen_ms: (id == "s2").then_some(1_765_061_500_000),
            bridged: id == "s2",
            owned_by: None,
            adopted_ms: None,
            bridge: None,
        }
    }

    #[test]
    fn the_table_aligns_columns_and_never_shows_a_token() {
        let t = table(&[row("a-long-sensor-id", Some("dev-1")), row("s2", None)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("SENSOR_ID         STATE"), "{t}");
        assert!(
            lines[2].starts_with("s2                delivered  -"),
            "{t}"
        );
        assert_eq!(lines[3], "2 sensors");
        assert!(lines[1].contains(" -        Cellar"), "not bridged: {t}");
        assert!(lines[2].contains(" yes      Cellar"), "bridged: {t}");
        assert!(
            lines[2].contains("  2025-12-06T22:51:40Z  yes"),
            "last seen: {t}"
        );
        assert!(
            lines[1].contains("dev-1      -                     -"),
            "never seen: {t}"
        );
        assert!(!t.contains("secret-token"));
    }

    #[test]
    fn wall_clock_times_are_shown_in_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_597_500_999), "2026-12-06T22:51:40Z");
    }

    #[tokio::test]
    async fn no_daemon_on_the_socket_is_none_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("absent.sock");
        let r = request(
            socket.to_str().unwrap(),
            &Request::List { with_tokens: false },
        )
        .await;
        assert!(matches!(r, Ok(None)), "{r:?}");
    }
}
