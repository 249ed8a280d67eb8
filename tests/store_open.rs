//! Opening the database: only real corruption is moved aside. A store path that is
//! a file, a directory the daemon may not read, a full file system: the daemon
//! exits non-zero naming the path and the OS error (or, on a full disk, may start),
//! and the database with its acknowledged Pending sensor is left exactly as it was.
//!
//! Each checks the last line the daemon prints before it exits
//! (`onboardd: cannot open the database at PATH: OS error`), not the log lines
//! before it: the old code logged the same words, then tried to move the directory.
//!
//! These run the real binary. The permission test drops to uid 65534 with `setpriv`
//! when run as root (root ignores file modes) and uses `chmod 000` otherwise; the
//! full-disk test mounts a small tmpfs inside `unshare --user --map-root-user
//! --mount`, which works as root and as an ordinary user, and which unmounts itself
//! when the namespace ends, even if the test fails.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use onboardd::announce::DeviceSpec;
use onboardd::config::StoreConfig;
use onboardd::onboarding::{Record, State};
use onboardd::reply::Route;
use onboardd::store::Store;

const SENSOR: &str = "pending-sensor";

/// A configured claim key: otherwise onboardd would first try to generate one inside
/// the store directory, and fail there (naming the same path and OS error) before it
/// ever opens the database these tests are about.
const CLAIM_KEY_SET: &str = "[security]\nclaim_key = \"store-open-test-key-0123456789abcd\"";

/// `store.path` set to `db`: these tests put a file, or a database made beforehand,
/// exactly there instead of the harness's unit-like state directory.
fn at(db: &Path) -> String {
    format!("[store]\npath = \"{}\"", db.display())
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn store_cfg(path: &Path) -> StoreConfig {
    StoreConfig {
        path: path.display().to_string(),
        cache_capacity_bytes: 1 << 20,
        last_seen_flush_s: 600,
    }
}

/// A healthy database at `path` holding one acknowledged, still Pending sensor.
async fn healthy_db_with_a_pending_sensor(path: &Path) {
    let (store, _) = Store::open(&store_cfg(path)).expect("create the database");
    let spec = DeviceSpec {
        name: SENSOR.into(),
        description: String::new(),
        brand: "Custom".into(),
        model: "Custom".into(),
        tags: vec![],
        metadata: [("sensor_id".to_string(), SENSOR.to_string())].into(),
    };
    let rec = Record::pending(spec, Route::default(), 1, 1);
    store
        .insert_new(SENSOR, &rec)
        .expect("insert")
        .expect("new");
    store.flush_all().await.expect("flush");
}

/// The phase of the sensor in the database at `path` (opened, read, closed).
async fn phase_of_the_sensor(path: &Path) -> Option<State> {
    let (store, _) = Store::open(&store_cfg(path))
        .unwrap_or_else(|e| panic!("the database at {} no longer opens: {e}", path.display()));
    store.get(SENSOR).expect("read").map(|r| r.state)
}

/// Every file under `dir` with its bytes: "untouched" means this is unchanged.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let bytes = std::fs::read(&p).expect("read file");
                out.insert(p.strip_prefix(dir).expect("under dir").to_path_buf(), bytes);
            }
        }
    }
    out
}

/// Panics, naming the files, unless `after` holds the same files as `before` with the
/// same bytes; `zero_tail` also allows a file to have grown by zeros only (sled
/// extends its log file to a segment boundary when it opens it).
fn assert_same_files(
    before: &BTreeMap<PathBuf, Vec<u8>>,
    after: &BTreeMap<PathBuf, Vec<u8>>,
    zero_tail: bool,
) {
    let names = |m: &BTreeMap<PathBuf, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(after), names(before), "the database's files changed");
    for (name, old) in before {
        let new = &after[name];
        let same = new == old
            || (zero_tail && new.starts_with(old) && new[old.len()..].iter().all(|b| *b == 0));
        assert!(
            same,
            "{} changed: {} bytes before, {} after",
            name.display(),
            old.len(),
            new.len()
        );
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn assert_nothing_moved_aside(dir: &Path) {
    let aside: Vec<String> = names_in(dir)
        .into_iter()
        .filter(|n| n.contains(".corrupt-"))
        .collect();
    assert!(aside.is_empty(), "moved aside: {aside:?}");
}

/// Runs `cmd` to its exit (killed after WAIT): (exit code, stderr).
fn run_to_exit(mut cmd: Command) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let err_path = dir.path().join("stderr");
    let err = std::fs::File::create(&err_path).expect("stderr file");
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not exit within {WAIT:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    (status.code(), stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_path_that_is_a_regular_file_exits_non_zero_naming_it_and_leaves_it_alone() {
    let cloud = fake_cloud().await;
    let state = tempfile::tempdir().expect("tempdir");
    let db = state.path().join("db");
    std::fs::write(&db, b"my notes, not a database\n").expect("write the file");
    let toml = merge_toml(
        &config_toml(free_port(), &cloud, state.path(), CLAIM_KEY_SET),
        &at(&db),
    );
    let mut d = Daemon::from_toml(state.path(), &toml, vec![]);
    // The line main prints just before it exits (a started daemon never prints it).
    d.log.wait_for("onboardd: cannot open the database");
    let status = d.wait_exit();
    let log = d.log.text();
    assert!(!status.success(), "exit {status:?}; log:\n{log}");
    let line = format!(
        "onboardd: cannot open the database at {}: Not a directory (os error 20)",
        db.display()
    );
    assert!(log.contains(&line), "expected {line:?} in:\n{log}");
    assert_eq!(
        std::fs::read(&db).expect("the file is still there"),
        b"my notes, not a database\n"
    );
    assert_nothing_moved_aside(state.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_dir_without_permission_exits_non_zero_naming_eacces_and_is_untouched() {
    let cloud = fake_cloud().await;
    let state = tempfile::tempdir().expect("tempdir");
    // The unprivileged user must reach the config and the store's parent.
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod state dir");
    let db = state.path().join("db");
    healthy_db_with_a_pending_sensor(&db).await;
    let before = snapshot(&db);
    let config = state.path().join("onboardd.toml");
    std::fs::write(
        &config,
        merge_toml(
            &config_toml(free_port(), &cloud, state.path(), CLAIM_KEY_SET),
            &at(&db),
        ),
    )
    .expect("write config");
    let (code, stderr) = if is_root() {
        // Root ignores file modes: run as nobody against root's 0700 directory.
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644))
            .expect("chmod config");
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o700)).expect("chmod db");
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM");
        run_to_exit(cmd)
    } else {
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o000)).expect("chmod db");
        let mut cmd = Command::new(bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM");
        let out = run_to_exit(cmd);
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o700)).expect("chmod db");
        out
    };
    assert!(
        !stderr.contains("setpriv:"),
        "setpriv could not run the binary as uid 65534 (is the checkout readable by others?):\n{stderr}"
    );
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit {code:?}; stderr:\n{stderr}"
    );
    let line = format!(
        "onboardd: cannot open the database at {}: Permission denied (os error 13)",
        db.join("db").display()
    );
    assert!(stderr.contains(&line), "expected {line:?} in:\n{stderr}");
    assert_nothing_moved_aside(state.path());
    assert_same_files(&before, &snapshot(&db), false);
    assert_eq!(phase_of_the_sensor(&db).await, Some(State::Pending));
}

/// What the full-disk scenario does inside its own user and mount namespace.
const FULL_DISK_SCRIPT: &str = r#"
set -eu
mount -t tmpfs -o size=1m,nr_inodes=64 tmpfs "$MNT"
cp -a "$SRC" "$MNT/db"
dd if=/dev/zero of="$MNT/fill" bs=4096 2>/dev/null || true
avail=$(df --output=avail -B1 "$MNT" | tail -n 1 | tr -d ' ')
echo "$avail" > "$OUT/avail"
set +e
"$BIN" run --config "$CFG" 2> "$OUT/stderr" &
echo $! > "$OUT/pid"
wait $!
echo $? > "$OUT/status"
rm -f "$MNT/fill"
ls -a "$MNT" > "$OUT/listing"
cp -a "$MNT/db" "$OUT/db-after"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_file_system_never_moves_the_database_aside_nor_loses_the_pending_sensor() {
    let broker = Mosquitto::start();
    let cloud = fake_cloud().await;
    let work = tempfile::tempdir().expect("tempdir");
    let (src, mnt, out) = (
        work.path().join("src-db"),
        work.path().join("mnt"),
        work.path().join("out"),
    );
    std::fs::create_dir(&mnt).expect("mkdir mnt");
    std::fs::create_dir(&out).expect("mkdir out");
    healthy_db_with_a_pending_sensor(&src).await;
    let before = snapshot(&src);
    // The cloud is down: the Pending sensor stays Pending whatever the daemon does.
    cloud.stop().await;
    let mut toml = config_toml(broker.port, &cloud, &mnt, CLAIM_KEY_SET);
    toml = merge_toml(
        &toml,
        &format!(
            "[store]\npath = \"{}\"\n[control]\nsocket = \"{}\"\n",
            mnt.join("db").display(),
            out.join("onboardd.sock").display()
        ),
    );
    let cfg = work.path().join("onboardd.toml");
    std::fs::write(&cfg, toml).expect("write config");
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    let mut child = Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            FULL_DISK_SCRIPT,
        ])
        .env("MNT", &mnt)
        .env("SRC", &src)
        .env("OUT", &out)
        .env("CFG", &cfg)
        .env("BIN", bin())
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run unshare (util-linux)");
    // Wait for the daemon to exit by itself, or to start (then stop it with SIGTERM).
    let deadline = Instant::now() + WAIT;
    let mut started = false;
    let script_status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        let log = std::fs::read_to_string(out.join("stderr")).unwrap_or_default();
        if !started && log.contains("subscribed to announces") {
            started = true;
            let pid: i32 = std::fs::read_to_string(out.join("pid"))
                .expect("pid file")
                .trim()
                .parse()
                .expect("pid");
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the full-disk scenario did not finish within {WAIT:?}; daemon log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut script_err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut script_err);
    }
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    let log = read("stderr");
    assert!(
        script_status.success(),
        "the namespace script failed ({script_status:?}); unprivileged user namespaces or \
         tmpfs mounts may be disabled here:\n{script_err}\ndaemon log:\n{log}"
    );
    let avail: u64 = read("avail").trim().parse().expect("df output");
    assert!(avail < 4096, "the tmpfs was not full: {avail} bytes free");
    let code: i32 = read("status").trim().parse().expect("daemon exit status");
    if started {
        eprintln!("sled opened the full database; the daemon started (exit {code} after SIGTERM)");
    } else {
        assert_ne!(code, 0, "log:\n{log}");
        let line = format!(
            "onboardd: cannot open the database at {}: No space left on device (os error 28)",
            mnt.join("db").join("db").display()
        );
        assert!(log.contains(&line), "expected {line:?} in:\n{log}");
    }
    let listing = read("listing");
    assert!(
        !listing.contains(".corrupt-"),
        "moved aside:\n{listing}\nlog:\n{log}"
    );
    assert!(listing.lines().any(|l| l == "db"), "no db left:\n{listing}");
    let after = out.join("db-after");
    if !started {
        assert_same_files(&before, &snapshot(&after), true);
    }
    let phase = phase_of_the_sensor(&after).await;
    assert!(
        matches!(phase, Some(State::Pending | State::Creating)),
        "the acknowledged sensor is {phase:?} after the full disk; log:\n{log}"
    );
}
