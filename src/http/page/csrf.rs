//! The token a forget form carries against cross-site requests.
//!
//! Any web page a browser visits can make it POST a form to the gateway (forms
//! cross origins freely, and the browser adds the Basic credentials it remembers
//! for the gateway), so a POST alone proves nothing. What such a page cannot do is
//! read the gateway's pages (the same-origin policy): it never sees the token. The
//! token is an HMAC, under a secret made at each start that never leaves the
//! process, of the sensor id and the hour: it cannot be guessed, it forgets only
//! the sensor whose page gave it, and it expires after one to two hours (and at
//! every restart). No cookie is needed, so there is no session to steal either.

use hmac::{Hmac, Mac};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::Sha256;

/// A token is made for the current window and accepted in it and the next.
pub const WINDOW_S: u64 = 3600;

pub struct Csrf {
    secret: [u8; 32],
}

impl Csrf {
    pub fn new() -> Csrf {
        let mut secret = [0u8; 32];
        SystemRandom::new()
            .fill(&mut secret)
            .expect("the kernel's random source works (getrandom or /dev/urandom)");
        Csrf { secret }
    }

    fn mac(&self, sensor: &str, window: u64) -> Hmac<Sha256> {
        let mut m =
            Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        m.update(b"onboardd forget\0");
        m.update(sensor.as_bytes());
        m.update(b"\0");
        m.update(&window.to_be_bytes());
        m
    }

    /// The token of a forget form for `sensor`, at `now_s` (Unix seconds).
    pub fn token(&self, sensor: &str, now_s: u64) -> String {
        hex::encode(self.mac(sensor, now_s / WINDOW_S).finalize().into_bytes())
    }

    /// Whether `token` was made for `sensor` in this window or the one before;
    /// compared in constant time.
    pub fn verify(&self, sensor: &str, token: &str, now_s: u64) -> bool {
        let Ok(bytes) = hex::decode(token) else {
            return false;
        };
        let window = now_s / WINDOW_S;
        [window, window.saturating_sub(1)]
            .iter()
            .any(|w| self.mac(sensor, *w).verify_slice(&bytes).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_holds_for_its_sensor_within_its_window_and_the_next() {
        let c = Csrf::new();
        let t = c.token("s1", 10_000);
        assert!(c.verify("s1", &t, 10_000));
        assert!(c.verify("s1", &t, 10_000 + WINDOW_S));
        assert!(!c.verify("s1", &t, 10_000 + 2 * WINDOW_S), "expired");
        assert!(!c.verify("s2", &t, 10_000), "another sensor's");
        assert!(!Csrf::new().verify("s1", &t, 10_000), "another process's");
        assert!(!c.verify("s1", "", 10_000));
        assert!(!c.verify("s1", "zz", 10_000));
        assert!(!c.verify("s1", &t[..62], 10_000));
    }
}
