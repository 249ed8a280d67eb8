//! The daemon's side of the control socket: accept connections, answer each
//! request line against the store (and the engine, for `forget --delete-remote`).

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{ControlError, DeviceRow, Request, Response};
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
            Ok(req) => answer(req, engine.store(), Some(&engine)).await,
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
pub async fn answer(req: Request, store: &Store, engine: Option<&Engine>) -> Response {
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
                    row.bridge = engine
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
        } => forget(store, engine, &sensor_id, delete_remote).await,
        Request::Resume { sensor_id } => resume(engine, &sensor_id),
    }
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

/// Forgets one sensor, and deletes its Qubitro device when asked and possible.
async fn forget(
    store: &Store,
    engine: Option<&Engine>,
    sensor: &str,
    delete_remote: bool,
) -> Response {
    // With the daemon running, the engine forgets (it owns every record and the
    // cool-downs); without it, nothing else holds the store. Both remove the same.
    let removed = match engine {
        Some(engine) => engine.forget(sensor).await,
        None => crate::engine::forget_stored(store, None, sensor).await,
    };
    let rec = match removed {
        Ok(r) => r,
        Err(e) => {
            return Response::Error {
                message: e.to_string(),
            }
        }
    };
    let Some(rec) = rec else {
        return Response::Forgot {
            found: false,
            remote_deleted: false,
            message: format!("{sensor} is not known to this gateway"),
        };
    };
    let device_id = rec.credentials().map(|c| c.device_id.clone());
    let mut remote_deleted = false;
    let mut message = format!("{sensor} forgotten: it is onboarded anew on its next announce");
    match (&device_id, delete_remote, engine) {
        (Some(id), true, Some(engine)) => match engine.cloud().delete(id).await {
            Ok(()) => {
                remote_deleted = true;
                message.push_str(&format!("; Qubitro device {id} deleted"));
            }
            Err(e) => message.push_str(&format!("; deleting Qubitro device {id} FAILED: {e}")),
        },
        (Some(id), true, None) => {
            message.push_str(&format!("; Qubitro device {id} NOT deleted (the daemon is not running to do it)"))
        }
        (Some(id), false, _) => message.push_str(&format!(
            "; the Qubitro device {id} is KEPT (use --delete-remote to delete it). With lookup_before_create on, the next announce \
                adopts it again"
        )),
        (None, _, _) => {}
    }
    Response::Forgot {
        found: true,
        remote_deleted,
        message,
    }
}
