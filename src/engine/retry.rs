//! How long one sensor waits before its next cloud attempt.

use std::time::Duration;

/// The shortest wait between two attempts for one sensor.
const MIN_RETRY: Duration = Duration::from_millis(50);
/// The wait before retrying after a retryable failure: the backoff's jitter, at
/// least the cloud's Retry-After (but not more than twice it), never more than the
/// backoff cap, and at least the request timeout after a failure that may have
/// created the device (a create still being processed must become visible to the
/// lookup before it runs). Saturating everywhere: the inputs come from the network.
pub(super) fn retry_wait(
    jitter: Duration,
    retry_after: Option<Duration>,
    maybe_created: bool,
    cap: Duration,
    request_timeout: Duration,
) -> Duration {
    let wait = match retry_after {
        Some(ra) => ra.max(jitter.min(ra.saturating_mul(2))),
        None => jitter,
    };
    let wait = wait.min(cap);
    let wait = if maybe_created {
        wait.max(request_timeout)
    } else {
        wait
    };
    wait.max(MIN_RETRY)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(30);
    const TIMEOUT: Duration = Duration::from_secs(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_jitter_is_used_when_the_cloud_says_nothing() {
        assert_eq!(retry_wait(ms(700), None, false, CAP, TIMEOUT), ms(700));
        assert_eq!(retry_wait(ms(0), None, false, CAP, TIMEOUT), MIN_RETRY);
    }

    #[test]
    fn retry_after_is_a_floor_and_twice_it_a_ceiling() {
        let ra = Some(Duration::from_secs(2));
        assert_eq!(retry_wait(ms(100), ra, false, CAP, TIMEOUT), ms(2000));
        assert_eq!(retry_wait(ms(3000), ra, false, CAP, TIMEOUT), ms(3000));
        assert_eq!(retry_wait(ms(9000), ra, false, CAP, TIMEOUT), ms(4000));
    }

    #[test]
    fn a_huge_retry_after_saturates_and_is_clamped_to_the_cap() {
        let huge = Some(Duration::from_secs(u64::MAX));
        assert_eq!(retry_wait(ms(100), huge, false, CAP, TIMEOUT), CAP);
        assert_eq!(retry_wait(Duration::MAX, huge, false, CAP, TIMEOUT), CAP);
    }

    #[test]
    fn after_a_possible_create_the_lookup_waits_for_the_request_timeout() {
        assert_eq!(retry_wait(ms(100), None, true, CAP, TIMEOUT), TIMEOUT);
        assert_eq!(retry_wait(ms(20_000), None, true, CAP, TIMEOUT), ms(20_000));
    }
}
