//! Unit tests of the spill buffer: order, bounds, batches and watermarks,
//! reopening, and the arrival marks behind the oldest reading's age.

use super::*;
use crate::config::StoreConfig;

fn open_store(dir: &std::path::Path) -> Store {
    Store::open(&StoreConfig {
        path: dir.join("db").display().to_string(),
        cache_capacity_bytes: 1 << 20,
        last_seen_flush_s: 600,
    })
    .expect("open the store")
    .0
}

const WIDE: Limits = Limits {
    max_per_sensor: 10_000,
    max_bytes: 64 << 20,
};

/// A store in a fresh directory and a buffer with `limits` in it.
struct Fixture {
    dir: tempfile::TempDir,
    store: Store,
    buf: Buffer,
}

fn fixture(limits: Limits) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(dir.path());
    let buf = Buffer::open(&store, limits).expect("open the buffer");
    Fixture { dir, store, buf }
}

impl Fixture {
    /// Flushes, closes and opens the store and the buffer again.
    async fn reopen(self, limits: Limits) -> Fixture {
        let Fixture { dir, store, buf } = self;
        store.flush_all().await.expect("flushed");
        drop((buf, store));
        // The flusher stops when the last clone goes; give the lock a moment.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let store = open_store(dir.path());
        let buf = Buffer::open(&store, limits).expect("reopen the buffer");
        Fixture { dir, store, buf }
    }

    /// The bytes of the batches in the buffer's tree.
    fn batch_bytes(&self) -> u64 {
        let tree = self.store.spill().expect("tree");
        let batches = tree
            .tree
            .range(disk::batch_key(0)..=disk::batch_key(u64::MAX));
        batches
            .values()
            .map(|v| v.expect("value").len() as u64)
            .sum()
    }

    /// The keys in the buffer's tree: (batches, watermarks).
    fn keys(&self) -> (usize, usize) {
        let tree = self.store.spill().expect("tree");
        let batches = tree
            .tree
            .iter()
            .keys()
            .filter(|k| disk::batch_no(k.as_ref().expect("key")).is_some())
            .count();
        (batches, tree.tree.len() - batches)
    }
}

fn ids(v: &[(u64, Vec<u8>)]) -> Vec<String> {
    v.iter()
        .map(|(_, b)| String::from_utf8(b.clone()).expect("utf8"))
        .collect()
}

#[tokio::test]
async fn readings_come_back_in_arrival_order_per_sensor() {
    let f = fixture(WIDE);
    for i in 0..5 {
        f.buf
            .append("a", format!("a{i}").as_bytes())
            .expect("append");
        f.buf
            .append("a1", format!("x{i}").as_bytes())
            .expect("append");
    }
    let got = f.buf.oldest("a", None, 3).expect("read");
    assert_eq!(ids(&got), ["a0", "a1", "a2"]);
    let rest = f.buf.oldest("a", Some(got[2].0), 10).expect("read");
    assert_eq!(ids(&rest), ["a3", "a4"]);
    // "a" is a prefix of "a1" as a string, not as a sensor.
    assert_eq!(f.buf.count("a"), 5);
    assert_eq!(ids(&f.buf.oldest("a1", None, 1).expect("read")), ["x0"]);
    assert_eq!(f.buf.totals().readings, 10);
}

#[tokio::test]
async fn remove_through_takes_acknowledged_readings_only() {
    let f = fixture(WIDE);
    let ids_: Vec<u64> = (0..4)
        .map(|i| f.buf.append("s", format!("r{i}").as_bytes()).expect("a").id)
        .collect();
    f.buf.append("t", b"other").expect("append");
    assert_eq!(f.buf.remove_through("s", ids_[1]).expect("remove"), 2);
    assert_eq!(f.buf.remove_through("s", ids_[1]).expect("again"), 0);
    assert_eq!(
        ids(&f.buf.oldest("s", None, 10).expect("read")),
        ["r2", "r3"]
    );
    assert_eq!(f.buf.count("s"), 2);
    assert_eq!(f.buf.count("t"), 1);
    // One-letter sensors count 10 bytes of key per reading.
    assert_eq!(f.buf.totals().bytes, 2 * (10 + 2) + (10 + 5));
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
    f.store.durable(last).await.expect("flushed");
    let f = f.reopen(WIDE).await;
    assert_eq!(f.buf.count("s"), 100);
    assert_eq!(f.buf.totals().readings, 100);
    f.buf.append("s", b"after").expect("append");
    let all = f.buf.oldest("s", None, 1000).expect("read");
    assert_eq!(all.len(), 101);
    assert_eq!(ids(&all[..2]), ["r0", "r1"]);
    assert_eq!(ids(&all[100..]), ["after"]);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
}

#[tokio::test]
async fn a_group_commit_writes_one_value_for_all_its_readings() {
    let f = fixture(WIDE);
    let mut last = 0;
    for i in 0..50 {
        last = f.buf.append(&format!("s{i}"), b"{\"n\":1}").expect("a").seq;
    }
    f.store.durable(last).await.expect("flushed");
    assert_eq!(f.keys(), (1, 0));
    for i in 0..50 {
        last = f.buf.append(&format!("s{i}"), b"{\"n\":2}").expect("a").seq;
    }
    f.store.durable(last).await.expect("flushed");
    assert_eq!(f.keys(), (2, 0));
    assert_eq!(f.buf.count("s7"), 2);
}

#[tokio::test]
async fn a_drained_buffer_leaves_nothing_in_the_tree() {
    let f = fixture(WIDE);
    for round in 0..3 {
        let mut last = 0;
        for i in 0..10 {
            last = f
                .buf
                .append(&format!("s{i}"), format!("{round}").as_bytes())
                .expect("a")
                .seq;
        }
        f.store.durable(last).await.expect("flushed");
    }
    // Drained one sensor after the other: the batches stay while any sensor
    // still has a reading in them.
    for i in 0..9 {
        let s = format!("s{i}");
        for (id, _) in f.buf.oldest(&s, None, 10).expect("read") {
            assert_eq!(f.buf.remove_through(&s, id).expect("removed"), 1);
        }
    }
    assert_eq!(f.keys(), (3, 9));
    f.buf.remove_through("s9", u64::MAX).expect("removed");
    assert_eq!(f.keys(), (0, 0));
    assert_eq!(f.buf.totals(), Totals::default());
}

#[tokio::test]
async fn acknowledged_readings_stay_gone_after_a_flush_and_reopen() {
    let f = fixture(WIDE);
    let mut taken = 0;
    for i in 0..100 {
        let a = f.buf.append("s", format!("r{i}").as_bytes()).expect("a");
        f.buf.append("t", format!("t{i}").as_bytes()).expect("a");
        if i == 69 {
            taken = a.id;
        }
    }
    assert_eq!(f.buf.remove_through("s", taken).expect("removed"), 70);
    f.buf.remove_through("t", u64::MAX).expect("removed");
    let f = f.reopen(WIDE).await;
    assert_eq!(f.buf.count("t"), 0);
    let left = f.buf.oldest("s", None, 100).expect("read");
    assert_eq!(left.len(), 30);
    assert_eq!(ids(&left[..1]), ["r70"]);
    // And a new reading of a drained sensor is not mistaken for a gone one.
    f.buf.append("t", b"new").expect("append");
    let f = f.reopen(WIDE).await;
    assert_eq!(ids(&f.buf.oldest("t", None, 10).expect("read")), ["new"]);
}

#[tokio::test]
async fn readings_an_earlier_version_buffered_are_kept_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open_store(dir.path());
        let old = store.readings().expect("old tree");
        for (i, s) in ["b", "a", "b", "a"].iter().enumerate() {
            let mut k = s.as_bytes().to_vec();
            k.push(0);
            k.extend_from_slice(&(10 + i as u64).to_be_bytes());
            old.tree
                .insert(k, format!("{s}{i}").as_bytes())
                .expect("insert");
        }
        store.flush_all().await.expect("flushed");
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let store = open_store(dir.path());
    let buf = Buffer::open(&store, WIDE).expect("open");
    assert_eq!(ids(&buf.oldest("a", None, 10).expect("read")), ["a1", "a3"]);
    assert_eq!(ids(&buf.oldest("b", None, 10).expect("read")), ["b0", "b2"]);
    assert!(store.readings().expect("old tree").tree.is_empty());
}

#[tokio::test]
async fn the_per_sensor_bound_drops_that_sensors_oldest() {
    let f = fixture(Limits {
        max_per_sensor: 3,
        max_bytes: 1 << 20,
    });
    f.buf.append("other", b"o").expect("append");
    let mut dropped = 0;
    for i in 0..5 {
        dropped += f
            .buf
            .append("s", format!("r{i}").as_bytes())
            .expect("a")
            .dropped;
    }
    assert_eq!(dropped, 2);
    assert_eq!(
        ids(&f.buf.oldest("s", None, 10).expect("read")),
        ["r2", "r3", "r4"]
    );
    assert_eq!(f.buf.count("other"), 1);
}

#[tokio::test]
async fn the_total_bound_drops_the_oldest_of_all_sensors() {
    let f = fixture(Limits {
        max_per_sensor: 100,
        max_bytes: 60,
    });
    // Each takes 20 bytes as stored: a 10-byte key and a 10-byte record.
    f.buf.append("a", b"aaaaaaaaaa").expect("append"); // 20, oldest
    f.buf.append("b", b"bbbbbbbbbb").expect("append"); // 40
    f.buf.append("a", b"AAAAAAAAAA").expect("append"); // 60
    let r = f.buf.append("c", b"cccccccccc").expect("append");
    assert_eq!(r.dropped, 1);
    assert_eq!(
        ids(&f.buf.oldest("a", None, 10).expect("read")),
        ["AAAAAAAAAA"]
    );
    assert_eq!(f.buf.count("b"), 1);
    assert_eq!(f.buf.count("c"), 1);
    assert_eq!(f.buf.totals().bytes, 60);
}

#[tokio::test]
async fn past_the_total_bound_the_sensor_with_the_most_buffered_loses_its_oldest() {
    let f = fixture(Limits {
        max_per_sensor: 100,
        max_bytes: 100,
    });
    // 20 bytes each as stored: the quiet sensor's one reading is the oldest.
    f.buf.append("q", b"qqqqqqqqqq").expect("append");
    for i in 0..10 {
        f.buf
            .append("c", format!("chatty-{i:03}").as_bytes())
            .expect("append");
    }
    assert_eq!(
        ids(&f.buf.oldest("q", None, 10).expect("read")),
        ["qqqqqqqqqq"]
    );
    assert_eq!(
        ids(&f.buf.oldest("c", None, 10).expect("read")),
        ["chatty-006", "chatty-007", "chatty-008", "chatty-009"]
    );
    assert_eq!(f.buf.totals().bytes, 100);
}

#[tokio::test]
async fn the_total_bound_counts_each_readings_key_as_well_as_its_payload() {
    let sensor = "a-sensor-with-a-long-id"; // 23 bytes: its keys are 32
                                            // Room for two readings of 10 bytes as stored (32 + 10 each), not ten.
    let limits = Limits {
        max_per_sensor: 100,
        max_bytes: 100,
    };
    let f = fixture(limits);
    assert_eq!(f.buf.append(sensor, b"0123456789").expect("a").dropped, 0);
    assert_eq!(f.buf.append(sensor, b"1123456789").expect("a").dropped, 0);
    let third = f.buf.append(sensor, b"2123456789").expect("a");
    assert_eq!(third.dropped, 1);
    assert_eq!(f.buf.totals().bytes, 2 * 42);
    // Counted the same way when the buffer is opened again.
    let f = f.reopen(WIDE).await;
    assert_eq!(f.buf.totals().bytes, 2 * 42);
    f.buf.remove_through(sensor, u64::MAX).expect("remove");
    assert_eq!(f.buf.totals().bytes, 0);
}

#[tokio::test]
async fn forwarded_readings_a_stuck_sensors_batch_keeps_are_compacted_away_and_its_reading_stays() {
    let limits = Limits {
        max_per_sensor: 10_000,
        max_bytes: 4_000,
    };
    let f = fixture(limits);
    // The stuck sensor's one reading is in the first batch; every later batch
    // is forwarded at once, but cannot go while that one reading is there.
    f.buf.append("stuck", b"{\"n\":0}").expect("append");
    let mut dropped = 0;
    for round in 0..100 {
        let mut last = 0;
        for i in 0..5 {
            let a = f
                .buf
                .append(&format!("fast{i}"), format!("{{\"n\":{round}}}").as_bytes());
            let a = a.expect("append");
            (last, dropped) = (a.seq, dropped + a.dropped);
        }
        f.store.durable(last).await.expect("flushed");
        for i in 0..5 {
            f.buf
                .remove_through(&format!("fast{i}"), u64::MAX)
                .expect("removed");
        }
        // Within twice the bound, plus this round's batch, written before the
        // next append could compact it.
        let bound = 2 * limits.max_bytes + 5 * (2 + 5 + 4 + 8);
        let on_disk = f.batch_bytes();
        assert!(on_disk <= bound, "round {round}: {on_disk} B");
    }
    assert_eq!(dropped, 0, "nothing was dropped for the batches' sake");
    assert_eq!(
        ids(&f.buf.oldest("stuck", None, 10).expect("read")),
        ["{\"n\":0}"]
    );
    // The compacted batches read the same after a reopen.
    let f = f.reopen(limits).await;
    assert_eq!(f.buf.count("stuck"), 1);
    assert_eq!(f.buf.totals().readings, 1);
    f.buf.remove_through("stuck", u64::MAX).expect("removed");
    assert_eq!(f.keys(), (0, 0));
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
    f.buf.append("a", b"1").expect("append");
    let before_reopen = Instant::now();
    let buf = f.reopen(WIDE).await.buf;
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

#[tokio::test]
async fn a_chatty_sensor_past_the_bound_cannot_evict_a_quiet_sensors_reading_from_the_batches() {
    // As an outage with `max_buffer_bytes = 1200`: the quiet sensor's one reading
    // is the oldest, then the chatty one's readings, each flushed on its own (a
    // sensor waiting for each PUBACK), so the batches hold the chatty readings the
    // bound dropped while the quiet reading keeps the first batch.
    let f = fixture(Limits {
        max_per_sensor: 10_000,
        max_bytes: 1_200,
    });
    let a = f.buf.append("br-quiet", br#"{"n":0}"#).expect("append");
    f.store.durable(a.seq).await.expect("flushed");
    let pad = "x".repeat(80);
    let mut dropped = 0;
    for n in 0..40 {
        let reading = format!(r#"{{"n":{n},"pad":"{pad}"}}"#);
        let a = f.buf.append("br-chatty", reading.as_bytes()).expect("a");
        dropped += a.dropped;
        f.store.durable(a.seq).await.expect("flushed");
    }
    assert!(dropped > 0, "the bound was reached");
    assert_eq!(
        f.buf.count("br-quiet"),
        1,
        "the quiet sensor kept its reading"
    );
    // The uplink comes back: each sensor's readings are read and removed in order.
    let quiet = f.buf.oldest("br-quiet", None, 16).expect("read");
    assert_eq!(ids(&quiet), [r#"{"n":0}"#]);
    let chatty = f.buf.oldest("br-chatty", None, 1_000).expect("read");
    let newest = format!(r#"{{"n":39,"pad":"{pad}"}}"#);
    assert_eq!(
        ids(&chatty).last(),
        Some(&newest),
        "the chatty one kept its newest"
    );
    assert_eq!(chatty.len() as u64 + dropped, 40);
    f.buf
        .remove_through("br-chatty", chatty[0].0)
        .expect("removed");
    f.buf
        .remove_through("br-quiet", quiet[0].0)
        .expect("removed");
    f.buf
        .remove_through("br-chatty", u64::MAX)
        .expect("removed");
    assert_eq!(f.buf.totals(), Totals::default());
    assert_eq!(f.keys(), (0, 0));
}

/// A small deterministic generator for the randomised test below (xorshift64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Each sensor's readings in the buffer, read as the uplink reads them (in windows).
fn contents(buf: &Buffer, sensor: &str) -> Vec<(u64, Vec<u8>)> {
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    loop {
        let window = buf
            .oldest(sensor, out.last().map(|r| r.0), 7)
            .expect("read");
        if window.is_empty() {
            return out;
        }
        out.extend(window);
    }
}

#[tokio::test]
async fn under_any_mix_of_spills_forwards_flushes_and_reopens_readings_leave_only_from_the_front() {
    const SENSORS: [&str; 4] = ["quiet", "chatty", "steady", "slow"];
    let limits = Limits {
        max_per_sensor: 40,
        max_bytes: 900,
    };
    for seed in [1u64, 7, 42, 1234, 99_991] {
        let mut rng = Rng(seed);
        let mut f = fixture(limits);
        // What the buffer must hold per sensor, oldest first: readings leave only
        // from the front (forwarded, or dropped by a bound), or come back after a
        // reopen (forwarded ones whose watermark was not written: at least once).
        let mut model: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); SENSORS.len()];
        let quiet = f.buf.append("quiet", b"q").expect("append");
        model[0].push((quiet.id, b"q".to_vec()));
        let mut seq = quiet.seq;
        for step in 0..1_500 {
            match rng.below(10) {
                0..=5 => {
                    let s = 1 + rng.below(3) as usize;
                    let len = if s == 1 {
                        60
                    } else {
                        5 + rng.below(30) as usize
                    };
                    let payload = format!("{step:05}{}", "x".repeat(len)).into_bytes();
                    let a = f.buf.append(SENSORS[s], &payload).expect("append");
                    seq = a.seq;
                    model[s].push((a.id, payload));
                }
                6 | 7 => {
                    // The uplink forwards a prefix of what it read (never the quiet one's).
                    let s = 1 + rng.below(3) as usize;
                    let read = contents(&f.buf, SENSORS[s]);
                    if !read.is_empty() {
                        let upto = read[rng.below(read.len() as u64) as usize].0;
                        f.buf.remove_through(SENSORS[s], upto).expect("remove");
                        model[s].retain(|(id, _)| *id > upto);
                    }
                }
                8 => f.store.durable(seq).await.expect("flushed"),
                _ => {
                    if rng.below(8) == 0 {
                        f = f.reopen(limits).await;
                        // A new store counts its writes from the start again.
                        seq = 0;
                    }
                }
            }
            for (s, sensor) in SENSORS.iter().enumerate() {
                let got = contents(&f.buf, sensor);
                assert!(
                    got.windows(2).all(|w| w[0].0 < w[1].0),
                    "seed {seed}: order"
                );
                assert!(
                    model[s].ends_with(&got) || got.ends_with(&model[s]),
                    "seed {seed} step {step}: {sensor} lost a reading from the middle"
                );
                assert_eq!(got.len() as u64, f.buf.count(sensor), "seed {seed}: count");
                model[s] = got;
            }
            assert_eq!(
                model[0].len(),
                1,
                "seed {seed} step {step}: the quiet reading"
            );
            assert!(f.buf.totals().bytes <= limits.max_bytes);
            // Twice the bound, plus the batch written at the last flush.
            let bound = 2 * limits.max_bytes + 64 * 80;
            assert!(
                f.batch_bytes() <= bound,
                "seed {seed}: {} B on disk",
                f.batch_bytes()
            );
        }
    }
}
