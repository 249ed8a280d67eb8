//! The daemon's side of the control socket: accept connections, answer each
//! request line against the store (and the engine and its Qubitro client, for
//! `forget --delete-remote`).

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::forget::Remote;
use super::{ControlError, DeviceRow, Request, Response};
use crate::cloud::Cloud;
use crate::config::ControlConfig;
use crate::engine::Engine;
use crate::store::Store;

/// Starts the socket server, or returns None when `control.socket` is empty.
pub fn serve(
    cfg: &ControlConfig,
    engine: Arc<Engine>,
    stop: CancellationToken,
) -> Result<Option<JoinHandle<()>>, ControlError> {
    use std::os::unix::fs::PermissionsExt;
    if cfg.socket.is_empty() {
        return Ok(None);
    }
    let path = Path::new(&cfg.socket);
    fn prepare(path: &Path) -> impl FnOnce(std::io::Error) -> ControlError + '_ {
        move |source| ControlError::Prepare {
            path: path.to_path_buf(),
            source,
        }
    }
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(prepare(dir))?;
            std::fs::set_permissions(dir, PermissionsExt::from_mode(0o700))
                .map_err(prepare(dir))?;
        }
    }
    // A stale socket from a killed daemon would make bind fail.
    let _ = std::fs::remove_file(path);
    // bind() creates the socket file with the umask's mode: owner-only from the
    // first instant, never a window in which another user could connect (`run`
    // sets 077 for the whole process; this holds even if it did not).
    let listener =
        with_umask(0o177, || UnixListener::bind(path)).map_err(|source| ControlError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    std::fs::set_permissions(path, PermissionsExt::from_mode(0o600)).map_err(prepare(path))?;
    let path = path.to_path_buf();
    Ok(Some(tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                _ = stop.cancelled() => break,
            };
            if let Ok((stream, _)) = conn {
                let engine = engine.clone();
                tokio::spawn(async move {
                    if let Err(message) = check_peer(&stream) {
                        refuse(stream, message).await;
                        return;
                    }
                    if let Err(e) = handle(stream, engine).await {
                        tracing::debug!(error = %crate::logging::chain(&e), "control connection failed");
                    }
                });
            }
        }
        let _ = std::fs::remove_file(path);
    })))
}

/// Runs `f` with the process umask set to `mask`, then restores the old one.
fn with_umask<T>(mask: libc::mode_t, f: impl FnOnce() -> T) -> T {
    // SAFETY: umask(2) cannot fail and touches no memory.
    let old = unsafe { libc::umask(mask) };
    let out = f();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    out
}

/// Only root and the daemon's own user may use the socket (`SO_PEERCRED`): the
/// socket's mode says the same, this holds even if someone loosened it.
fn check_peer(stream: &UnixStream) -> Result<(), String> {
    // SAFETY: geteuid(2) cannot fail.
    let own = unsafe { libc::geteuid() };
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 || cred.uid() == own => Ok(()),
        Ok(cred) => Err(format!(
            "uid {} may not use the control socket: only root and the daemon's own user (uid {own}) may (run the command with sudo)",
            cred.uid()
        )),
        Err(e) => Err(format!("cannot tell who connected (SO_PEERCRED: {e})")),
    }
}

/// Answers a refused peer's first request with the reason, and logs it.
async fn refuse(stream: UnixStream, message: String) {
    tracing::warn!(
        reason = %message,
        "control connection refused: {message}"
    );
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    // Reply to the request so the client prints the reason rather than "closed".
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), lines.next_line()).await;
    if let Ok(mut out) = serde_json::to_vec(&Response::Error {
        message: format!("refused: {message}"),
    }) {
        out.push(b'\n');
        let _ = w.write_all(&out).await;
    }
}

async fn handle(stream: UnixStream, engine: Arc<Engine>) -> Result<(), ControlError> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(req, engine.store(), Some(&engine), Some(engine.cloud())).await,
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        let mut out = serde_json::to_vec(&resp)?;
        out.push(b'\n');
        w.write_all(&out).await?;
    }
    Ok(())
}

/// Answers one request against a store (the daemon's, or one the CLI opened).
/// `cloud`: the Qubitro client a remote delete goes through (the daemon's own, or
/// one the CLI made when asked to delete without the daemon).
pub async fn answer(
    req: Request,
    store: &Store,
    engine: Option<&Arc<Engine>>,
    cloud: Option<&Cloud>,
) -> Response {
    let daemon = engine.map(|e| &**e);
    match req {
        Request::List { with_tokens } => {
            let mut devices = Vec::new();
            // Discovered devices whose entities are all gone are kept, shown retired
            // (their records say so; a store written before also has marks).
            let retired = match store.retired_discovered() {
                Ok(r) => r,
                Err(e) => {
                    return Response::Error {
                        message: e.to_string(),
                    }
                }
            };
            for item in store.scan() {
                match item {
                    Ok((id, rec)) => {
                        let mut row = DeviceRow::from_record(&id, &rec, with_tokens);
                        row.last_seen_ms = store.last_seen(&id).ok().flatten();
                        if retired.contains(&id) {
                            row.state = "retired".into();
                        }
                        devices.push(row)
                    }
                    Err(e) => {
                        return Response::Error {
                            message: e.to_string(),
                        }
                    }
                }
            }
            Response::Devices { devices }
        }
        Request::Show {
            sensor_id,
            with_token,
        } => match store.get(&sensor_id) {
            Ok(rec) => Response::Device {
                device: rec.map(|r| {
                    let mut row = DeviceRow::from_record(&sensor_id, &r, with_token);
                    row.last_seen_ms = store.last_seen(&sensor_id).ok().flatten();
                    row.bridge = daemon
                        .and_then(Engine::bridge)
                        .and_then(|b| b.device_status(&sensor_id))
                        .and_then(|st| serde_json::to_value(st).ok());
                    Box::new(row)
                }),
            },
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
        Request::Forget {
            sensor_id,
            delete_remote,
        } => forget(store, daemon, cloud, &sensor_id, delete_remote).await,
        Request::Resume { sensor_id } => resume(daemon, &sensor_id),
        Request::Ignored => match store.ignored() {
            Ok(ignored) => Response::Ignored { ignored },
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
        Request::Unignore { sensor_id } => unignore(store, engine, &sensor_id).await,
        Request::Adopt { sensor_id } => adopt(store, daemon, &sensor_id).await,
        Request::Prune {
            not_seen_for_s,
            delete_remote,
            dry_run,
        } => {
            let delete_with = match delete_with(delete_remote, cloud, "prune") {
                Ok(d) => d,
                Err(r) => return r,
            };
            let not_seen_for = std::time::Duration::from_secs(not_seen_for_s);
            super::prune::prune(store, daemon, delete_with, not_seen_for, dry_run).await
        }
    }
}

/// The client a remote delete goes through: `Err` answers that there is none.
fn delete_with<'a>(
    delete_remote: bool,
    cloud: Option<&'a Cloud>,
    what: &str,
) -> Result<Option<&'a Cloud>, Response> {
    match (delete_remote, cloud) {
        (false, _) => Ok(None),
        (true, Some(cloud)) => Ok(Some(cloud)),
        (true, None) => Err(Response::Error {
            message: format!(
                "no Qubitro client here to delete devices with ({what}); nothing was forgotten"
            ),
        }),
    }
}

/// Lifts a device from the ignore list; with the daemon running, discovery
/// onboards it at once when it knows it (otherwise at its next subscribe: every
/// reconnect and every start reads the retained configs again).
async fn unignore(store: &Store, engine: Option<&Arc<Engine>>, sensor: &str) -> Response {
    let lifted = match engine {
        Some(engine) => engine.unignore(sensor).await,
        None => match store.unignore(sensor) {
            Ok(None) => Ok(None),
            Ok(Some(_)) => store.flush_all().await.map(|()| Some(false)),
            Err(e) => Err(e),
        },
    };
    match lifted {
        Ok(None) => Response::Unignored {
            found: false,
            message: format!("{sensor} is not on the ignore list"),
        },
        Ok(Some(true)) => Response::Unignored {
            found: true,
            message: format!("{sensor} is no longer ignored: discovery onboards it now"),
        },
        Ok(Some(false)) => Response::Unignored {
            found: true,
            message: format!(
                "{sensor} is no longer ignored: discovery onboards it when it next reads its retained config \
                 (the daemon's next start or reconnect to the broker)"
            ),
        },
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    }
}

/// Makes this gateway the one that bridges the sensor's device; with the daemon
/// running its buffered readings flow at once, otherwise from its next start.
async fn adopt(store: &Store, engine: Option<&Engine>, sensor: &str) -> Response {
    use crate::engine::records::{self, Applied};
    let applied = match engine {
        Some(engine) => engine.adopt(sensor).await,
        None => records::adopt(store, sensor, crate::clock::system_ms()).await,
    };
    let (found, message) = match applied {
        Ok(Applied::Gone) => (false, format!("{sensor} is not known to this gateway")),
        Ok(Applied::Already(_)) => (true, format!("{sensor} was adopted already: nothing to do")),
        Ok(Applied::Written(rec, _)) => {
            let made_by = match rec.owner.as_deref() {
                Some(owner) => crate::onboarding::owner::describe(owner),
                None => "this gateway".into(),
            };
            let when = if engine.is_some() {
                "now"
            } else {
                "from the daemon's next start"
            };
            (true, format!("{sensor} adopted: this gateway bridges its device (made by {made_by}) {when}; \
                 forget it on the gateway that bridged it before, or both log in as the device and knock each other off"))
        }
        Ok(Applied::Refused(e)) => {
            return Response::Error {
                message: e.to_string(),
            }
        }
        Err(e) => {
            return Response::Error {
                message: e.to_string(),
            }
        }
    };
    Response::Adopted { found, message }
}

/// Lifts a bridged device's pause at once (an operator fixed it in Qubitro).
fn resume(engine: Option<&Engine>, sensor: &str) -> Response {
    let Some(engine) = engine else {
        return Response::Error {
            message: "the daemon is not running: nothing is paused \
                      (a pause lasts only while it runs; each start logs every device in again)"
                .into(),
        };
    };
    let Some(bridge) = engine.bridge() else {
        return Response::Error {
            message: "the bridge is off (bridge.enabled = false): nothing to resume".into(),
        };
    };
    let (found, message) = match bridge.resume(sensor) {
        None => (
            false,
            format!("{sensor} has no bridged device on this gateway"),
        ),
        Some(true) => (
            true,
            format!("{sensor} resumed: its uplink logs in again now"),
        ),
        Some(false) => (true, format!("{sensor} was not paused: nothing to do")),
    };
    Response::Resumed { found, message }
}

/// Forgets one sensor; with `delete_remote`, deletes its Qubitro device first and
/// forgets nothing when that fails (see [`super::forget`]).
async fn forget(
    store: &Store,
    engine: Option<&Engine>,
    cloud: Option<&Cloud>,
    sensor: &str,
    delete_remote: bool,
) -> Response {
    let delete_with = match delete_with(delete_remote, cloud, sensor) {
        Ok(d) => d,
        Err(r) => return r,
    };
    match super::forget::forget(store, engine, delete_with, sensor).await {
        Ok(None) => Response::Forgot {
            found: false,
            remote_deleted: false,
            message: format!("{sensor} is not known to this gateway"),
        },
        Ok(Some(done)) => {
            let message = super::forget::describe(sensor, &done.remote);
            match done.remote {
                Remote::Left { .. } => Response::Error { message },
                remote => Response::Forgot {
                    found: true,
                    remote_deleted: matches!(remote, Remote::Deleted(_) | Remote::AlreadyGone(_)),
                    message,
                },
            }
        }
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    }
}
