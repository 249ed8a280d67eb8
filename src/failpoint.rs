//! Crash injection for the reliability tests: `ONBOARDD_FAILPOINTS=name,name` makes
//! the process SIGKILL itself when it reaches a named step of an onboarding.
//!
//! Only builds with the cargo feature `failpoints` look at the variable (`cargo test
//! --workspace --features failpoints`); without it `hit` is an empty inline function, so
//! shipped binaries behave the same whatever the environment. A feature rather than
//! `debug_assertions`, so that `cargo test --release` runs the same tests the same way.

/// The variable naming the steps to crash at.
pub const ENV: &str = "ONBOARDD_FAILPOINTS";

/// The steps a test can crash at, in onboarding order.
pub const STEPS: &[&str] = &[
    "after_pending_recorded",
    "after_announce_acked",
    "after_creating_recorded",
    "after_create_response",
    "after_created_recorded",
    "after_reply_published",
];

/// Whether this binary was built with failpoints.
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Refuses to run when a failpoint is asked for but compiled out: a crash test against such
/// a binary would wait for a crash that never comes, so it fails here, at once, instead.
pub fn refuse_if_requested_but_compiled_out() -> anyhow::Result<()> {
    match std::env::var_os(ENV) {
        Some(v) if !ENABLED && !v.is_empty() => anyhow::bail!(
            "{ENV} is set but this onboardd was built without the `failpoints` feature; \
             build with `--features failpoints` (e.g. cargo test --workspace --features \
             failpoints) or unset {ENV}"
        ),
        _ => Ok(()),
    }
}

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    use std::sync::OnceLock;
    static ACTIVE: OnceLock<Vec<String>> = OnceLock::new();
    let active = ACTIVE.get_or_init(|| {
        std::env::var(ENV)
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

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
