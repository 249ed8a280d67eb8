//! The operator's way in: `onboardd devices …` while the daemon runs.
//!
//! sled allows one process per database, so the CLI cannot open the store while the
//! daemon holds it. The daemon therefore serves a Unix socket (owner-only, under
//! /run/onboardd via `RuntimeDirectory=`) speaking one JSON request per line and
//! one JSON answer per line. When no daemon answers, the CLI opens the store itself.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::ControlConfig;
use crate::engine::Engine;
use crate::store::{Phase, SensorRecord, Store};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    List,
    Show {
        sensor_id: String,
    },
    Forget {
        sensor_id: String,
        delete_remote: bool,
    },
}

/// One device as the CLI shows it. The token only when asked for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRow {
    pub sensor_id: String,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_token: Option<String>,
    pub name: String,
    pub brand: String,
    pub model: String,
    pub attempts: u32,
    pub first_seen_ms: u64,
    pub updated_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

impl DeviceRow {
    pub fn from_record(sensor_id: &str, rec: &SensorRecord, with_token: bool) -> DeviceRow {
        let (device_id, device_token) = match &rec.phase {
            Phase::Created {
                device_id,
                device_token,
                ..
            } => (
                Some(device_id.clone()),
                with_token.then(|| device_token.0.clone()),
            ),
            _ => (None, None),
        };
        DeviceRow {
            sensor_id: sensor_id.to_string(),
            state: rec.phase_name().to_string(),
            device_id,
            device_token,
            name: rec.spec.name.clone(),
            brand: rec.spec.brand.clone(),
            model: rec.spec.model.clone(),
            attempts: rec.attempts,
            first_seen_ms: rec.first_seen_ms,
            updated_ms: rec.updated_ms,
            last_error: rec.last_error.clone(),
            origin: rec.origin.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Devices {
        devices: Vec<DeviceRow>,
    },
    Device {
        device: Option<Box<DeviceRow>>,
    },
    Forgot {
        found: bool,
        remote_deleted: bool,
        message: String,
    },
    Error {
        message: String,
    },
}

/// Starts the socket server, or returns None when `control.socket` is empty.
pub fn serve(
    cfg: &ControlConfig,
    engine: Arc<Engine>,
    stop: CancellationToken,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    if cfg.socket.is_empty() {
        return Ok(None);
    }
    let path = Path::new(&cfg.socket);
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        }
    }
    // A stale socket from a killed daemon would make bind fail.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("control.socket: cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
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
                    if let Err(e) = handle(stream, engine).await {
                        tracing::debug!(error = %e, "control connection failed");
                    }
                });
            }
        }
        let _ = std::fs::remove_file(path);
    })))
}

async fn handle(stream: UnixStream, engine: Arc<Engine>) -> anyhow::Result<()> {
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
        Request::List => {
            let mut devices = Vec::new();
            for item in store.scan() {
                match item {
                    Ok((id, rec)) => devices.push(DeviceRow::from_record(&id, &rec, true)),
                    Err(e) => {
                        return Response::Error {
                            message: e.to_string(),
                        }
                    }
                }
            }
            Response::Devices { devices }
        }
        Request::Show { sensor_id } => match store.get(&sensor_id) {
            Ok(rec) => Response::Device {
                device: rec.map(|r| Box::new(DeviceRow::from_record(&sensor_id, &r, true))),
            },
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
        Request::Forget {
            sensor_id,
            delete_remote,
        } => forget(store, engine, &sensor_id, delete_remote).await,
    }
}

async fn forget(
    store: &Store,
    engine: Option<&Engine>,
    sensor: &str,
    delete_remote: bool,
) -> Response {
    let rec = match store.remove(sensor) {
        Ok(r) => r,
        Err(e) => {
            return Response::Error {
                message: e.to_string(),
            }
        }
    };
    if let Err(e) = store.flush_all().await {
        return Response::Error {
            message: e.to_string(),
        };
    }
    let Some(rec) = rec else {
        return Response::Forgot {
            found: false,
            remote_deleted: false,
            message: format!("{sensor} is not known to this gateway"),
        };
    };
    let device_id = rec.credentials().map(|c| c.device_id);
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
            "; the Qubitro device {id} is KEPT (use --delete-remote to delete it). With lookup_before_create on, the next announce adopts it again"
        )),
        (None, _, _) => {}
    }
    Response::Forgot {
        found: true,
        remote_deleted,
        message,
    }
}

/// Sends one request to a running daemon. `Ok(None)`: no daemon listens there.
pub async fn request(socket: &str, req: &Request) -> anyhow::Result<Option<Response>> {
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
        Err(e) => anyhow::bail!(
            "cannot reach the daemon at {socket}: {e} (run as the daemon's user or root)"
        ),
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut lines = BufReader::new(r).lines();
    let answer = lines
        .next_line()
        .await?
        .ok_or_else(|| anyhow::anyhow!("the daemon closed the control connection"))?;
    Ok(Some(serde_json::from_str(&answer)?))
}
