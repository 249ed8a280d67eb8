//! Where an uplink outage's bytes go: the bridge's spill buffer driven the way the
//! bench's outage drives it, without brokers, counting the process's `write_bytes`
//! (`/proc/self/io`, which the kernel counts per 4 KiB page dirtied) per phase.
//!
//! `cargo run --release --example spill_profile -- [SENSORS] [SECONDS] [PACE_MS] [FLUSH_MS]`
//! (defaults 100 sensors, 60 s, 0 ms: the rounds run back to back; 500 paces them
//! like the daemon; FLUSH_MS 500, a multiple of 500: `bridge.spill_flush_ms`). Each
//! sensor spills one reading per second of outage, one group commit per FLUSH_MS
//! worth of appends (the pacer's cadence), then every
//! reading is read back in windows and removed one by one, as an uplink does per
//! PUBACK, and the process waits for sled's own background work to settle.

use std::time::Duration;

use onboardd::bridge::buffer::{Buffer, Limits};
use onboardd::config::StoreConfig;
use onboardd::store::Store;

/// The bench's reading (`examples/bench/bridge_flow.rs`, `reading_payload`).
fn payload(n: u64) -> Vec<u8> {
    format!(r#"{{"n":{n},"temp":21.5,"hum":40.2}}"#).into_bytes()
}

fn write_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").expect("read /proc/self/io");
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("write_bytes in /proc/self/io")
}

/// The uplink's window: how many readings it reads from the buffer at once.
const WINDOW: usize = 64;

#[tokio::main]
async fn main() {
    let arg = |i: usize, d: u64| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(d)
    };
    let (sensors, seconds, pace) = (arg(1, 100), arg(2, 60), arg(3, 0));
    let rounds_per_flush = (arg(4, 500) / 500).max(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = Store::open(&StoreConfig {
        path: dir.path().join("db").display().to_string(),
        cache_capacity_bytes: 4 << 20,
        last_seen_flush_s: 600,
    })
    .expect("open the store");
    let buffer = Buffer::open(
        &store,
        Limits {
            max_per_sensor: 10_000,
            max_bytes: 64 << 20,
        },
    )
    .expect("open the buffer");
    let names: Vec<String> = (0..sensors).map(|i| format!("s{i}")).collect();
    let one = payload(1000).len();
    println!(
        "reading: payload {one} B, key {} B (sensor \"s42\")",
        "s42".len() + 1 + 8
    );
    store.flush_all().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (mut appends, mut flushes, mut n) = (0u64, 0u64, 0u64);
    // Half the sensors report in each 500 ms round.
    for round in 0..seconds * 2 {
        let w = write_bytes();
        let mut seq = 0;
        for s in names.iter().skip((round % 2) as usize).step_by(2) {
            seq = buffer.append(s, &payload(1000 + n)).expect("append").seq;
            n += 1;
        }
        let w2 = write_bytes();
        if (round + 1) % rounds_per_flush == 0 || round + 1 == seconds * 2 {
            store.durable(seq).await.expect("durable");
        }
        let w3 = write_bytes();
        appends += w2 - w;
        flushes += w3 - w2;
        if pace > 0 {
            tokio::time::sleep(Duration::from_millis(pace)).await;
        }
    }
    let w = write_bytes();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let outage_background = write_bytes() - w;

    let w = write_bytes();
    for s in &names {
        loop {
            let batch = buffer.oldest(s, None, WINDOW).expect("read");
            if batch.is_empty() {
                break;
            }
            for (id, _) in batch {
                buffer.remove_through(s, id).expect("remove");
            }
        }
    }
    let removes = write_bytes() - w;
    let w = write_bytes();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let drain_background = write_bytes() - w;
    let w = write_bytes();
    store.flush_all().await.expect("flush");
    let final_flush = write_bytes() - w;

    let total = appends + flushes + outage_background + removes + drain_background + final_flush;
    let per = |b: u64| b as f64 / n as f64;
    let flushes_n = (seconds * 2).div_ceil(rounds_per_flush);
    println!("{n} readings, {sensors} sensors, {flushes_n} flushes");
    for (what, b) in [
        ("appends (inserts, not flushed)", appends),
        ("group-commit flushes", flushes),
        (
            "sled background after the outage (1.5 s)",
            outage_background,
        ),
        ("removes (one per PUBACK)", removes),
        ("sled background after the drain (3 s)", drain_background),
        ("a last flush", final_flush),
        ("total", total),
    ] {
        println!("{what:>44}: {b:>9} B = {:>7.1} B per reading", per(b));
    }
    assert_eq!(buffer.totals().readings, 0);
}
