//! Unit tests of the spill buffer: order, bounds, reopening, and the arrival marks
//! behind the oldest reading's age.

use super::*;
use crate::config::StoreConfig;

/// A buffer over a fresh store in a temporary directory.
struct Fixture {
    dir: tempfile::TempDir,
    store: Store,
    buf: Buffer,
}

fn open_store(dir: &std::path::Path) -> Store {
    Store::open(&StoreConfig {
        path: dir.join("db").display().to_string(),
        cache_capacity_bytes: 1 << 20,
        last_seen_flush_s: 600,
    })
    .expect("open the store")
    .0
}

fn fixture(limits: Limits) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(dir.path());
    let buf = Buffer::open(&store, limits).expect("open");
    Fixture { dir, store, buf }
}

impl Fixture {
    /// Closes the store (after `seq` is durable) and opens it again with `limits`.
    async fn reopen(self, seq: u64, limits: Limits) -> Fixture {
        self.store.durable(seq).await.expect("flushed");
        let Fixture { dir, store, buf } = self;
        drop((buf, store));
        // The flusher stops when the last clone goes; give the lock a moment.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let store = open_store(dir.path());
        let buf = Buffer::open(&store, limits).expect("reopen");
        Fixture { dir, store, buf }
    }
}

const WIDE: Limits = Limits {
    max_per_sensor: 10_000,
    max_bytes: 64 << 20,
};

fn limits(max_per_sensor: u64, max_bytes: u64) -> Limits {
    Limits {
        max_per_sensor,
        max_bytes,
    }
}

fn ids(v: &[(u64, Vec<u8>)]) -> Vec<String> {
    v.iter()
        .map(|(_, b)| String::from_utf8(b.clone()).expect("utf8"))
        .collect()
}

#[tokio::test]
async fn readings_come_back_in_arrival_order_per_sensor() {
    let buf = fixture(WIDE).buf;
    for i in 0..5 {
        buf.append("a", format!("a{i}").as_bytes()).expect("append");
        buf.append("a1", format!("x{i}").as_bytes())
            .expect("append");
    }
    let got = buf.oldest("a", None, 3).expect("read");
    assert_eq!(ids(&got), ["a0", "a1", "a2"]);
    let rest = buf.oldest("a", Some(got[2].0), 10).expect("read");
    assert_eq!(ids(&rest), ["a3", "a4"]);
    // "a" is a prefix of "a1" as a string, not as a key.
    assert_eq!(buf.count("a"), 5);
    assert_eq!(ids(&buf.oldest("a1", None, 1).expect("read")), ["x0"]);
    assert_eq!(buf.totals().readings, 10);
}

#[tokio::test]
async fn remove_through_takes_acknowledged_readings_only() {
    let buf = fixture(WIDE).buf;
    let ids_: Vec<u64> = (0..4)
        .map(|i| buf.append("s", format!("r{i}").as_bytes()).expect("a").id)
        .collect();
    buf.append("t", b"other").expect("append");
    assert_eq!(buf.remove_through("s", ids_[1]).expect("remove"), 2);
    assert_eq!(buf.remove_through("s", ids_[1]).expect("again"), 0);
    assert_eq!(ids(&buf.oldest("s", None, 10).expect("read")), ["r2", "r3"]);
    assert_eq!(buf.count("s"), 2);
    assert_eq!(buf.count("t"), 1);
    // Keys of one-letter sensors are 10 bytes.
    assert_eq!(buf.totals().bytes, 2 * (10 + 2) + (10 + 5));
}

#[tokio::test]
async fn readings_survive_a_flush_and_reopen_and_new_ones_queue_after_them() {
    let f = fixture(WIDE);
    let mut last = 0;
    for i in 0..100 {
        last = f
            .buf
            .append("s", format!("r{i}").as_bytes())
            .expect("a")
            .seq;
    }
    let buf = f.reopen(last, WIDE).await.buf;
    assert_eq!(buf.count("s"), 100);
    assert_eq!(buf.totals().readings, 100);
    buf.append("s", b"after").expect("append");
    let all = buf.oldest("s", None, 1000).expect("read");
    assert_eq!(all.len(), 101);
    assert_eq!(ids(&all[..2]), ["r0", "r1"]);
    assert_eq!(ids(&all[100..]), ["after"]);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
}

#[tokio::test]
async fn the_per_sensor_bound_drops_that_sensors_oldest() {
    let buf = fixture(limits(3, 1 << 20)).buf;
    buf.append("other", b"o").expect("append");
    let mut dropped = 0;
    for i in 0..5 {
        dropped += buf
            .append("s", format!("r{i}").as_bytes())
            .expect("a")
            .dropped;
    }
    assert_eq!(dropped, 2);
    assert_eq!(
        ids(&buf.oldest("s", None, 10).expect("read")),
        ["r2", "r3", "r4"]
    );
    assert_eq!(buf.count("other"), 1);
}

#[tokio::test]
async fn the_total_bound_drops_the_oldest_of_all_sensors() {
    let buf = fixture(limits(100, 60)).buf;
    // Each takes 20 bytes as stored: a 10-byte key and a 10-byte record.
    buf.append("a", b"aaaaaaaaaa").expect("append"); // 20, oldest
    buf.append("b", b"bbbbbbbbbb").expect("append"); // 40
    buf.append("a", b"AAAAAAAAAA").expect("append"); // 60
    let r = buf.append("c", b"cccccccccc").expect("append");
    assert_eq!(r.dropped, 1);
    assert_eq!(
        ids(&buf.oldest("a", None, 10).expect("read")),
        ["AAAAAAAAAA"]
    );
    assert_eq!(buf.count("b"), 1);
    assert_eq!(buf.count("c"), 1);
    assert_eq!(buf.totals().bytes, 60);
}

#[tokio::test]
async fn past_the_total_bound_the_sensor_with_the_most_buffered_loses_its_oldest() {
    let buf = fixture(limits(100, 100)).buf;
    // 20 bytes each as stored: the quiet sensor's one reading is the oldest.
    buf.append("q", b"qqqqqqqqqq").expect("append");
    for i in 0..10 {
        buf.append("c", format!("chatty-{i:03}").as_bytes())
            .expect("append");
    }
    assert_eq!(
        ids(&buf.oldest("q", None, 10).expect("read")),
        ["qqqqqqqqqq"]
    );
    assert_eq!(
        ids(&buf.oldest("c", None, 10).expect("read")),
        ["chatty-006", "chatty-007", "chatty-008", "chatty-009"]
    );
    assert_eq!(buf.totals().bytes, 100);
}

#[tokio::test]
async fn the_total_bound_counts_each_readings_key_as_well_as_its_payload() {
    let sensor = "a-sensor-with-a-long-id"; // 23 bytes: its keys are 32
                                            // Room for two readings of 10 bytes as stored (32 + 10 each), not ten.
    let f = fixture(limits(100, 100));
    assert_eq!(f.buf.append(sensor, b"0123456789").expect("a").dropped, 0);
    assert_eq!(f.buf.append(sensor, b"1123456789").expect("a").dropped, 0);
    let third = f.buf.append(sensor, b"2123456789").expect("a");
    assert_eq!(third.dropped, 1);
    assert_eq!(f.buf.totals().bytes, 2 * 42);
    // Counted the same way when the buffer is opened again.
    let buf = f.reopen(third.seq, WIDE).await.buf;
    assert_eq!(buf.totals().bytes, 2 * 42);
    buf.remove_through(sensor, u64::MAX).expect("remove");
    assert_eq!(buf.totals().bytes, 0);
}

#[test]
fn keys_split_back_into_sensor_and_id() {
    assert_eq!(split_key(&key("temp-01", 42)), Some(("temp-01", 42)));
    assert_eq!(split_key(b"short"), None);
}

#[tokio::test]
async fn the_oldest_readings_arrival_follows_the_oldest_reading_still_buffered() {
    let buf = fixture(WIDE).buf;
    assert_eq!(buf.oldest_since(), None);
    let before = Instant::now();
    let first = buf.append("a", b"1").expect("append");
    let a_since = buf.oldest_since().expect("one buffered");
    assert!(a_since >= before);
    buf.append("b", b"2").expect("append");
    assert_eq!(buf.oldest_since(), Some(a_since), "b's reading is younger");
    buf.remove_through("a", first.id).expect("remove");
    let b_since = buf.oldest_since().expect("b's reading is left");
    assert!(b_since >= a_since);
    buf.remove_through("b", u64::MAX).expect("remove");
    assert_eq!(buf.oldest_since(), None);
    assert_eq!(buf.oldest_age(), None);
}

#[tokio::test]
async fn readings_found_at_open_count_from_the_open() {
    let f = fixture(WIDE);
    let seq = f.buf.append("a", b"1").expect("append").seq;
    let before_reopen = Instant::now();
    let buf = f.reopen(seq, WIDE).await.buf;
    assert!(buf.oldest_since().expect("found at open") >= before_reopen);
}

#[test]
fn arrival_marks_are_a_second_apart_and_follow_the_oldest_reading() {
    let t0 = Instant::now();
    let mut t = Tally::new(10, t0);
    t.arrived(10, t0);
    t.arrived(11, t0 + Duration::from_millis(900)); // shares the first mark
    t.arrived(12, t0 + Duration::from_secs(2));
    t.arrived(13, t0 + Duration::from_secs(5));
    assert_eq!(t.arrivals.len(), 3);
    // Readings 10 and 11 gone: the oldest (12) arrived at the second mark.
    t.oldest = 12;
    t.prune();
    assert_eq!(t.arrivals.front(), Some(&(12, t0 + Duration::from_secs(2))));
    // Reading 12 gone too: 13 has its own mark.
    t.oldest = 13;
    t.prune();
    assert_eq!(t.arrivals.front(), Some(&(13, t0 + Duration::from_secs(5))));
}

#[test]
fn arrival_marks_are_thinned_out_keeping_the_oldest_so_the_age_is_never_understated() {
    let t0 = Instant::now();
    let mut t = Tally::new(0, t0);
    for i in 1..1_000u64 {
        t.arrived(i, t0 + Duration::from_secs(i));
        assert!(t.arrivals.len() <= MAX_MARKS);
    }
    assert_eq!(t.arrivals.front(), Some(&(0, t0)));
    // Whichever reading is oldest, its mark is no later than its arrival.
    for oldest in [1, 17, 500, 998] {
        let mut u = t.clone();
        u.oldest = oldest;
        u.prune();
        let (first, at) = *u.arrivals.front().expect("a mark");
        assert!(first <= oldest);
        assert!(at <= t0 + Duration::from_secs(oldest));
    }
}
