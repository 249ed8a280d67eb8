//! Times in Qubitro's answers: RFC 3339 creation times in the device list, and
//! `Retry-After` as seconds or an HTTP date.

use std::time::{Duration, SystemTime};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// RFC 3339 (`2024-05-01T12:00:00.5+02:00`) → (unix seconds, nanoseconds).
///
/// Qubitro is read as RFC 3339 says, with its allowances: `t`/`z` in lower case, a
/// space for the `T`, `-00:00`, any number of fraction digits (cut to nanoseconds).
/// A leap second counts as the last instant of its minute, so it still sorts
/// between the seconds around it.
pub(super) fn parse_rfc3339(s: &str) -> Option<(i64, u32)> {
    let at = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    Some((at.unix_timestamp(), at.nanosecond()))
}

/// `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP-date (IMF-fixdate,
/// and the obsolete RFC 850 and asctime forms). Clamped to `max`; a date in the
/// past is zero; a number too large for u64 counts as "very long", so no value can
/// overflow anything downstream. `None` when the header is unreadable.
pub fn parse_retry_after(value: &str, now: SystemTime, max: Duration) -> Option<Duration> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|c| c.is_ascii_digit()) {
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const MAX: Duration = Duration::from_secs(60);

    #[test]
    fn rfc3339_times_are_compared_as_instants() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some((0, 0)));
        assert_eq!(
            parse_rfc3339("2000-03-01T00:00:00.25Z"),
            Some((951_868_800, 250_000_000))
        );
        assert_eq!(
            parse_rfc3339("0001-01-01T00:00:00Z"),
            Some((-62_135_596_800, 0))
        );
        for bad in [
            "2024-02-30T00:00:00Z",
            "2024-05-01",
            "2024-05-01T10:00:00",
            "x",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_odd_timestamps_qubitro_may_send_are_read() {
        let ten = 1_714_557_600; // 2024-05-01T10:00:00Z
        for (form, want) in [
            // Go's zero time: what `last_seen` holds for a device never seen.
            ("0001-01-01T00:00:00Z", Some((-62_135_596_800, 0))),
            ("2024-05-01T10:00:00.123456789Z", Some((ten, 123_456_789))),
            ("2024-05-01T10:00:00.1234567891Z", Some((ten, 123_456_789))),
            ("2024-05-01T10:00:00.000Z", Some((ten, 0))),
            ("2024-05-01t10:00:00z", Some((ten, 0))),
            ("2024-05-01 10:00:00Z", Some((ten, 0))),
            ("2024-05-01T10:00:00-00:00", Some((ten, 0))),
            ("2024-05-01T15:45:00+05:45", Some((ten, 0))),
            ("9999-12-31T23:59:59Z", Some((253_402_300_799, 0))),
            ("2024-05-01T10:00:00+00", None),
            ("2024-05-01T10:00:00+0000", None),
            ("2024-05-01T10:00:00.Z", None),
            ("2024-05-01T10:00:00+24:00", None),
            ("+2024-05-01T10:00:00Z", None),
        ] {
            assert_eq!(parse_rfc3339(form), want, "{form}");
        }
        let leap = parse_rfc3339("2016-12-31T23:59:60Z").unwrap();
        let before = parse_rfc3339("2016-12-31T23:59:59Z").unwrap();
        let after = parse_rfc3339("2017-01-01T00:00:00Z").unwrap();
        assert!(before < leap && leap <= after, "{leap:?}");
    }

    #[test]
    fn retry_after_seconds_are_read_and_clamped() {
        let now = SystemTime::now();
        assert_eq!(
            parse_retry_after("7", now, MAX),
            Some(Duration::from_secs(7))
        );
        assert_eq!(parse_retry_after(" 0 ", now, MAX), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("3600", now, MAX), Some(MAX));
        for bad in ["", "-1", "1.5", "soon", "7s"] {
            assert_eq!(parse_retry_after(bad, now, MAX), None, "{bad:?}");
        }
    }

    #[test]
    fn a_huge_retry_after_is_clamped_without_overflow() {
        let now = SystemTime::now();
        for huge in [
            "18446744073709551615",
            "18446744073709551616",
            &"9".repeat(400),
        ] {
            let d = parse_retry_after(huge, now, MAX).unwrap();
            assert_eq!(d, MAX);
            // What the engine does with it must not overflow either.
            let _ = d.saturating_mul(2).saturating_add(d);
        }
        let unclamped = parse_retry_after("18446744073709551615", now, Duration::MAX).unwrap();
        assert_eq!(unclamped, Duration::from_secs(u64::MAX));
    }

    #[test]
    fn retry_after_http_dates_are_read_in_every_form() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let later = Some(Duration::from_secs(23));
        for form in [
            "Sun, 06 Nov 1994 08:50:00 GMT",
            "Sunday, 06-Nov-94 08:50:00 GMT",
            "Sun Nov  6 08:50:00 1994",
        ] {
            assert_eq!(parse_retry_after(form, now, MAX), later, "{form}");
        }
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now, MAX),
            Some(Duration::ZERO),
            "a date in the past is now"
        );
        assert_eq!(
            parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT", now, MAX),
            Some(MAX)
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 25:00:00 GMT", now, MAX),
            None
        );
    }
}
