//! Crash injection for the reliability tests: `ONBOARDD_FAILPOINTS=name,name` makes
//! the process SIGKILL itself when it reaches a named step of an onboarding.
//!
//! Only debug builds look at the variable; in release builds `hit` is an empty
//! inline function, so shipped binaries behave the same whatever the environment.

/// The steps a test can crash at, in onboarding order.
pub const STEPS: &[&str] = &[
    "after_pending_recorded",
    "after_announce_acked",
    "after_creating_recorded",
    "after_create_response",
    "after_created_recorded",
    "after_reply_published",
];

#[cfg(debug_assertions)]
pub fn hit(name: &str) {
    use std::sync::OnceLock;
    static ACTIVE: OnceLock<Vec<String>> = OnceLock::new();
    let active = ACTIVE.get_or_init(|| {
        std::env::var("ONBOARDD_FAILPOINTS")
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default()
    });
    if active.iter().any(|a| a == name) {
        eprintln!("onboardd: failpoint {name} reached, killing myself with SIGKILL");
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_name: &str) {}
