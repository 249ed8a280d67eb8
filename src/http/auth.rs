//! HTTP Basic for the listener beyond loopback: the password check, and the
//! per-address limit on failed attempts that keeps it from being guessed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Failed attempts an address may make per window before it is refused unheard.
pub const MAX_FAILURES: u32 = 5;
/// How long failures are remembered.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most: a scan from many addresses cannot grow memory.
const MAX_ADDRESSES: usize = 4096;

/// Whether an `Authorization` header value carries `password` (any user name).
pub fn basic_matches(header: Option<&[u8]>, password: &str) -> bool {
    let Some(encoded) = header.and_then(|h| h.strip_prefix(b"Basic ")) else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim_ascii()) else {
        return false;
    };
    let Some(colon) = decoded.iter().position(|b| *b == b':') else {
        return false;
    };
    // Comparing MACs in constant time: the time taken says nothing of how much of
    // the password (or of its length) matched.
    let mac = |bytes: &[u8]| {
        let mut m = Hmac::<Sha256>::new_from_slice(b"onboardd http basic")
            .expect("HMAC takes any key length");
        m.update(bytes);
        m
    };
    let expected = mac(password.as_bytes()).finalize().into_bytes();
    mac(&decoded[colon + 1..]).verify_slice(&expected).is_ok()
}

/// Failed attempts per client address; time is a parameter so tests drive it.
#[derive(Default)]
pub struct Failures {
    by_addr: HashMap<IpAddr, (u32, Instant)>,
}

impl Failures {
    /// Whether `addr` has used up its attempts for now.
    pub fn blocked(&self, addr: IpAddr, now: Instant) -> bool {
        self.by_addr
            .get(&addr)
            .is_some_and(|(n, since)| *n >= MAX_FAILURES && now.duration_since(*since) < WINDOW)
    }

    /// Counts a failed attempt; returns how many `addr` made in this window.
    pub fn record(&mut self, addr: IpAddr, now: Instant) -> u32 {
        if self.by_addr.len() >= MAX_ADDRESSES && !self.by_addr.contains_key(&addr) {
            self.by_addr
                .retain(|_, (_, since)| now.duration_since(*since) < WINDOW);
            if self.by_addr.len() >= MAX_ADDRESSES {
                // Still full of fresh entries: forget them all rather than grow.
                self.by_addr.clear();
            }
        }
        let entry = self.by_addr.entry(addr).or_insert((0, now));
        if now.duration_since(entry.1) >= WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
        entry.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user_pass: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        )
        .into_bytes()
    }

    #[test]
    fn only_the_right_password_passes_whatever_the_user_name() {
        assert!(basic_matches(Some(&basic("prometheus:s3cret")), "s3cret"));
        assert!(basic_matches(Some(&basic(":s3cret")), "s3cret"));
        assert!(!basic_matches(Some(&basic("prometheus:s3cre")), "s3cret"));
        assert!(!basic_matches(Some(&basic("s3cret")), "s3cret"));
        assert!(!basic_matches(Some(b"Bearer s3cret"), "s3cret"));
        assert!(!basic_matches(Some(b"Basic !!!"), "s3cret"));
        assert!(!basic_matches(None, "s3cret"));
    }

    #[test]
    fn an_address_is_refused_after_its_failures_until_the_window_passes() {
        let mut f = Failures::default();
        let a: IpAddr = "10.0.0.7".parse().unwrap();
        let b: IpAddr = "10.0.0.8".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert!(!f.blocked(a, t0));
            f.record(a, t0);
        }
        assert!(f.blocked(a, t0 + Duration::from_secs(1)));
        assert!(!f.blocked(b, t0), "another address is not held back");
        assert!(!f.blocked(a, t0 + WINDOW));
        assert_eq!(f.record(a, t0 + WINDOW), 1, "a new window counts afresh");
    }
}
