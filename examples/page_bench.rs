//! The gateway page with a large fleet in the store: how long `/` takes to answer a
//! page of 100 (the target: under 200 ms with 100 000 sensors), the next pages, a
//! sensor's page and a search that must read the whole fleet. Not a test: a number
//! to read against the target.
//!
//! ```sh
//! cargo build --release && cargo run --release --example page_bench -- 100000
//! ```
//!
//! It starts a real mosquitto, the fake Qubitro and onboardd once (to make the claim
//! key), stops it, writes N delivered records straight into its store, starts it again
//! and asks the page over HTTP on loopback.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use harness::{Daemon, Mosquitto};
use onboardd::config::StoreConfig;
use onboardd::onboarding::{Origin, Record, State};
use onboardd::reply::{Credentials, Route, Token};
use onboardd::store::Store;

fn get(port: u16, path: &str) -> (u16, usize) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, raw.len())
}

/// Median and worst of `n` requests of `path`, after one not counted.
fn time(port: u16, path: &str, n: usize) -> (Duration, Duration, usize) {
    let (status, bytes) = get(port, path);
    assert_eq!(status, 200, "{path}");
    let mut took: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            get(port, path);
            t.elapsed()
        })
        .collect();
    took.sort();
    (took[n / 2], took[n - 1], bytes)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let broker = Mosquitto::start();
    let cloud = harness::fake_cloud().await;
    let port = harness::free_port();
    let mut d = Daemon::start(
        &broker,
        &cloud,
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    d.log.wait_for("http listening");
    d.signal_and_wait(libc::SIGTERM);

    let t = Instant::now();
    let cfg = StoreConfig {
        path: d.store_path().display().to_string(),
        cache_capacity_bytes: 8 << 20,
        last_seen_flush_s: 600,
    };
    let (store, _) = Store::open(&cfg).expect("open the store");
    let now = onboardd::clock::system_ms();
    for i in 0..n {
        let id = format!("s-{i:06}");
        let name = format!(r#"{{"name":"Room {i}"}}"#);
        let spec = onboardd::announce::parse(&id, name.as_bytes(), 4096, "gw")
            .expect("an announce")
            .spec;
        let mut rec = Record::pending(spec, Route::default(), i as u64 + 1, now);
        rec.state = State::Delivered {
            credentials: Credentials {
                device_id: format!("dev-{i:06}"),
                device_token: Token(format!("token-{i:06}")),
            },
            origin: Origin::Created,
        };
        store.insert_new(&id, &rec).expect("insert");
    }
    store.close_cleanly().await.expect("close the store");
    drop(store);
    println!("{n} records written in {:.1} s", t.elapsed().as_secs_f64());

    d.spawn();
    d.log.wait_for("http listening");
    let last = format!("s-{:06}", n / 2);
    for (what, path) in [
        ("/ (first page of 100)", "/".to_string()),
        ("a page in the middle", format!("/?after={last}")),
        ("a sensor's page", format!("/sensor/{last}")),
        (
            "a search reading the whole fleet",
            format!("/?q=s-{:05}", n / 10 - 1),
        ),
    ] {
        let (median, worst, bytes) = time(port, &path, 20);
        println!(
            "{what:<34} {path:<22} median {:>7.1} ms, worst {:>7.1} ms, {bytes} bytes",
            median.as_secs_f64() * 1e3,
            worst.as_secs_f64() * 1e3
        );
    }
}
