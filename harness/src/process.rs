//! Child processes with their output captured line by line, killed when dropped.
//!
//! Tests wait for log lines ([`LogLines::wait_for`]) instead of sleeping; every wait has a
//! deadline and fails at once, with the output so far, when the process has exited.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::WAIT;

/// Lines of the tail kept whatever the retention, for failure messages.
const TAIL: usize = 30;

/// Every live child, so a panic hook can kill them ([`kill_all_children`]).
static CHILD_PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not turn every later wait into a second panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// SIGKILLs every child still running. For panic hooks of programs built with
/// `panic = "abort"` (the benchmark in release), where no `Drop` runs.
pub fn kill_all_children() {
    if let Ok(pids) = CHILD_PIDS.try_lock() {
        for &pid in pids.iter() {
            // SAFETY: kill(2) on a pid we spawned; no memory is involved.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    }
}

/// Makes the command's process get SIGKILL when the thread that spawns it exits.
///
/// Only for programs that spawn from a thread living as long as they do (the benchmark's
/// main thread): a tokio blocking-pool thread exits after 10 s idle, and would take the
/// child with it.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl(2) is async-signal-safe; it only sets a flag of the new process.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            Ok(())
        })
    }
}

/// What a [`LogLines`] keeps beyond its tail.
#[derive(Clone, Copy)]
enum Retention {
    /// Every line (tests: a few hundred lines).
    All,
    /// Only lines containing one of these (case-insensitive), at most `max` (the benchmark:
    /// onboardd logs a line per sensor, a hundred thousand of them).
    Matching {
        needles: &'static [&'static str],
        max: usize,
    },
}

struct LogState {
    kept: Vec<(Instant, String)>,
    tail: VecDeque<String>,
    retention: Retention,
    /// Streams still open; when it falls back to 0 the process has exited (or closed its
    /// output).
    open: usize,
    /// Whether a process was ever attached (a detached log never "exits").
    attached: bool,
    /// Prefix for echoing lines to our stderr (env `ONBOARDD_TEST_ECHO`), if any.
    echo: Option<String>,
}

/// Lines a child process wrote (stdout and stderr), with a way to wait for one.
#[derive(Clone)]
pub struct LogLines {
    inner: Arc<(Mutex<LogState>, Condvar)>,
}

impl Default for LogLines {
    fn default() -> Self {
        LogLines::with(Retention::All)
    }
}

impl LogLines {
    fn with(retention: Retention) -> Self {
        LogLines {
            inner: Arc::new((
                Mutex::new(LogState {
                    kept: Vec::new(),
                    tail: VecDeque::new(),
                    retention,
                    open: 0,
                    attached: false,
                    echo: None,
                }),
                Condvar::new(),
            )),
        }
    }

    /// Keeps only lines containing one of `needles` (case-insensitive), at most `max`, plus
    /// the last lines for failure messages: bounded memory for long runs.
    pub fn keeping(needles: &'static [&'static str], max: usize) -> Self {
        LogLines::with(Retention::Matching { needles, max })
    }

    fn push(&self, line: String) {
        let at = Instant::now();
        let (m, c) = &*self.inner;
        let mut s = lock(m);
        if let Some(prefix) = &s.echo {
            eprintln!("[{prefix}] {line}");
        }
        let keep = match s.retention {
            Retention::All => true,
            Retention::Matching { needles, max } => {
                let lower = line.to_ascii_lowercase();
                s.kept.len() < max && needles.iter().any(|n| lower.contains(n))
            }
        };
        if keep {
            s.kept.push((at, line.clone()));
        }
        if s.tail.len() == TAIL {
            s.tail.pop_front();
        }
        s.tail.push_back(line);
        c.notify_all();
    }

    fn opened(&self) {
        let mut s = lock(&self.inner.0);
        s.open += 1;
        s.attached = true;
    }

    fn close(&self) {
        let (m, c) = &*self.inner;
        let mut s = lock(m);
        s.open = s.open.saturating_sub(1);
        c.notify_all();
    }

    /// Waits (until `deadline` at the latest) for the reading threads to reach the end
    /// of every stream: a process that has exited may still have lines in its pipes
    /// that no thread has read yet, and a test that reads the log right after the
    /// exit must see them all.
    fn wait_drained(&self, deadline: Instant) {
        let (m, c) = &*self.inner;
        let mut s = lock(m);
        while s.open > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            s = c
                .wait_timeout(s, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Every kept line, in order.
    pub fn all(&self) -> Vec<String> {
        lock(&self.inner.0)
            .kept
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    pub fn text(&self) -> String {
        self.all().join("\n")
    }

    /// The last lines written, kept whatever the retention.
    pub fn tail(&self) -> String {
        let s = lock(&self.inner.0);
        s.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    pub fn count(&self, needle: &str) -> usize {
        lock(&self.inner.0)
            .kept
            .iter()
            .filter(|(_, l)| l.contains(needle))
            .count()
    }

    /// The `n`th kept line containing `needle` and when it arrived, waiting at most `within`.
    /// Err (saying what was awaited, why it failed, and the last output) on timeout, or as
    /// soon as the process has exited without writing it.
    pub fn try_wait_for_n(
        &self,
        needle: &str,
        n: usize,
        within: Duration,
    ) -> Result<(Instant, String), String> {
        let (m, c) = &*self.inner;
        let deadline = Instant::now() + within;
        let mut s = lock(m);
        loop {
            if let Some(hit) = s
                .kept
                .iter()
                .filter(|(_, l)| l.contains(needle))
                .nth(n.saturating_sub(1))
            {
                return Ok(hit.clone());
            }
            let now = Instant::now();
            let exited = s.attached && s.open == 0;
            if exited || now >= deadline {
                let why = if exited {
                    "the process exited first".to_owned()
                } else {
                    format!("timed out after {within:?}")
                };
                let seen = s.kept.iter().filter(|(_, l)| l.contains(needle)).count();
                let tail = s.tail.iter().cloned().collect::<Vec<_>>().join("\n");
                return Err(format!(
                    "waiting for {n} log line(s) with {needle:?} ({seen} seen): {why}; \
                     last output:\n{tail}"
                ));
            }
            s = c
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Blocks until `n` lines contain `needle` (panics after [`WAIT`], or once the process
    /// has exited, with the log).
    pub fn wait_for_n(&self, needle: &str, n: usize) {
        if let Err(e) = self.try_wait_for_n(needle, n, WAIT) {
            panic!("{e}\nfull log:\n{}", self.text());
        }
    }

    pub fn wait_for(&self, needle: &str) {
        self.wait_for_n(needle, 1)
    }

    /// [`wait_for`](Self::wait_for) without blocking the async runtime's thread.
    pub async fn wait_for_async(&self, needle: &str) {
        self.wait_for_n_async(needle, 1).await
    }

    pub async fn wait_for_n_async(&self, needle: &str, n: usize) {
        let me = self.clone();
        let needle = needle.to_string();
        let waited = tokio::task::spawn_blocking(move || me.try_wait_for_n(&needle, n, WAIT))
            .await
            .expect("the waiting thread does not panic");
        if let Err(e) = waited {
            panic!("{e}\nfull log:\n{}", self.text());
        }
    }
}

/// A child process whose stdout and stderr go to a [`LogLines`]; SIGKILLed when dropped.
pub struct Proc {
    name: String,
    child: Option<Child>,
    /// When it was spawned (start-up times are measured from here).
    pub spawned: Instant,
    pub log: LogLines,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and its output read into `log` line by line. With
    /// `ONBOARDD_TEST_ECHO` set, lines are also echoed to stderr as `[name] line`.
    pub fn spawn(name: &str, cmd: &mut Command, log: LogLines) -> std::io::Result<Proc> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if std::env::var_os("ONBOARDD_TEST_ECHO").is_some() {
            lock(&log.inner.0).echo = Some(name.to_owned());
        }
        let spawned = Instant::now();
        let mut child = cmd.spawn()?;
        lock(&CHILD_PIDS).push(child.id());
        let out = child.stdout.take().expect("stdout is piped");
        let err = child.stderr.take().expect("stderr is piped");
        for stream in [Box::new(out) as Box<dyn Read + Send>, Box::new(err)] {
            log.opened();
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    log.push(line);
                }
                log.close();
            });
        }
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            spawned,
            log,
        })
    }

    /// 0 once it has been reaped.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn reaped(&mut self) -> Option<Child> {
        let c = self.child.take()?;
        lock(&CHILD_PIDS).retain(|&p| p != c.id());
        Some(c)
    }

    /// SIGKILL (no clean shutdown, like a crash or a power cut) and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.reaped() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `sig`, then waits for the exit at most `within`; SIGKILL and Err after that.
    pub fn signal_and_wait(&mut self, sig: i32, within: Duration) -> Result<ExitStatus, String> {
        let pid = self.pid();
        if pid == 0 {
            return Err(format!("{} is not running", self.name));
        }
        // SAFETY: kill(2) on our own child, not yet reaped, so the pid is still ours.
        unsafe {
            libc::kill(pid as i32, sig);
        }
        self.wait_exit(within)
    }

    /// Sends `sig` without waiting.
    pub fn signal(&self, sig: i32) {
        let pid = self.pid();
        if pid != 0 {
            // SAFETY: kill(2) on our own child, not yet reaped, so the pid is still ours.
            unsafe {
                libc::kill(pid as i32, sig);
            }
        }
    }

    /// Waits at most `within` for the exit: Some(status) once reaped, None if it still runs.
    pub fn exited_within(&mut self, within: Duration) -> Result<Option<ExitStatus>, String> {
        let deadline = Instant::now() + within;
        loop {
            let Some(c) = self.child.as_mut() else {
                return Err(format!("{} is not running", self.name));
            };
            match c.try_wait() {
                Ok(Some(status)) => {
                    self.reaped();
                    return Ok(Some(status));
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => return Ok(None),
                Err(e) => return Err(format!("waiting for {}: {e}", self.name)),
            }
        }
    }

    /// Waits for the process to exit by itself, at most `within`; SIGKILL and Err after that.
    pub fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus, String> {
        let Some(mut c) = self.reaped() else {
            return Err(format!("{} is not running", self.name));
        };
        let deadline = Instant::now() + within;
        loop {
            match c.try_wait() {
                Ok(Some(status)) => {
                    // Its last lines (the reason it exited) may still be in the pipes.
                    self.log
                        .wait_drained(Instant::now() + Duration::from_secs(5));
                    return Ok(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return Err(format!(
                        "{} did not exit within {within:?} (killed); last output:\n{}",
                        self.name,
                        self.log.tail()
                    ));
                }
                Err(e) => return Err(format!("waiting for {}: {e}", self.name)),
            }
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited `within`. True if it exited with 0.
    pub fn terminate(&mut self, within: Duration) -> bool {
        self.signal_and_wait(libc::SIGTERM, within)
            .is_ok_and(|st| st.success())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_fails_at_once_when_the_process_exits_without_the_line() {
        let mut p = Proc::spawn(
            "sh",
            Command::new("sh").args(["-c", "echo one; echo two >&2"]),
            LogLines::default(),
        )
        .expect("sh runs");
        let err = p
            .log
            .try_wait_for_n("three", 1, WAIT)
            .expect_err("never written");
        // Why it gave up is the point, not how long it took: the exit, not the deadline.
        assert!(err.contains("the process exited first"), "{err}");
        assert!(err.contains("two"), "{err}");
        assert_eq!(p.log.count("o"), 2);
        assert!(p.wait_exit(WAIT).expect("exits").success());
    }

    #[test]
    fn keeping_retains_only_matching_lines_but_the_tail_has_everything() {
        let log = LogLines::keeping(&["warn"], 2);
        let mut p = Proc::spawn(
            "sh",
            Command::new("sh").args([
                "-c",
                "echo a; echo WARN 1; echo b; echo warn 2; echo warn 3",
            ]),
            log,
        )
        .expect("sh runs");
        p.log.wait_for("warn 2");
        p.wait_exit(WAIT).expect("exits");
        p.log
            .try_wait_for_n("warn 3", 1, Duration::from_millis(100))
            .expect_err("over the limit");
        assert_eq!(p.log.all(), ["WARN 1", "warn 2"]);
        assert!(p.log.tail().ends_with("warn 3"), "{}", p.log.tail());
    }

    #[test]
    fn wait_exit_gives_up_and_kills_after_the_deadline() {
        let mut p = Proc::spawn(
            "sleep",
            Command::new("sleep").arg("30"),
            LogLines::default(),
        )
        .expect("sleep runs");
        let err = p
            .wait_exit(Duration::from_millis(100))
            .expect_err("still sleeping");
        assert!(err.contains("did not exit"), "{err}");
        assert_eq!(p.pid(), 0, "reaped");
    }
}
