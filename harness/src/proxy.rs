//! A loopback TCP proxy for hostile-network tests: put it between onboardd and the broker
//! (or the cloud) and add latency, stall the bytes without closing anything (a half-open
//! connection, a dead Wi-Fi link), or sever every connection (a reset).
//!
//! It runs on a thread and runtime of its own, so it keeps forwarding while a test blocks
//! its own thread (e.g. in [`crate::LogLines::wait_for`]). Bounded: at most
//! [`MAX_CONNECTIONS`] at a time, and [`QUEUE_CHUNKS`] chunks of [`CHUNK`] bytes waiting per
//! direction, after which it stops reading and TCP's flow control pushes back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::WAIT;

/// Connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 64;
/// Bytes read at a time; latency applies to each such chunk.
pub const CHUNK: usize = 16 * 1024;
/// Chunks waiting to be written, per direction of a connection.
pub const QUEUE_CHUNKS: usize = 16;

#[derive(Clone, Copy, Default)]
struct Switches {
    latency: Duration,
    stalled: bool,
    /// Only the client-to-upstream direction is stalled.
    upstream_stalled: bool,
    /// Only the upstream-to-client direction is stalled.
    downstream_stalled: bool,
}

impl Switches {
    fn holds(&self, upstream: bool) -> bool {
        self.stalled
            || (upstream && self.upstream_stalled)
            || (!upstream && self.downstream_stalled)
    }
}

/// The connections accepted since the last sever, and how to end them.
#[derive(Clone)]
struct Generation {
    cancel: CancellationToken,
    live: Arc<AtomicUsize>,
}

impl Generation {
    fn new() -> Self {
        Generation {
            cancel: CancellationToken::new(),
            live: Arc::new(AtomicUsize::new(0)),
        }
    }
}

struct Ctl {
    switches: watch::Sender<Switches>,
    generation: Mutex<Generation>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A TCP proxy from `127.0.0.1:port` to `127.0.0.1:upstream_port`; stops when dropped.
pub struct Proxy {
    /// Where clients connect instead of the upstream port.
    pub port: u16,
    ctl: Arc<Ctl>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards each connection to `upstream_port`.
    pub fn start(upstream_port: u16) -> Proxy {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy's loopback port");
        let port = listener.local_addr().expect("local addr").port();
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener for tokio");
        let ctl = Arc::new(Ctl {
            switches: watch::Sender::new(Switches::default()),
            generation: Mutex::new(Generation::new()),
        });
        let shutdown = CancellationToken::new();
        let upstream = SocketAddr::from(([127, 0, 0, 1], upstream_port));
        let thread = {
            let ctl = ctl.clone();
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name(format!("proxy-{port}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("the proxy's runtime");
                    rt.block_on(serve(listener, upstream, ctl, shutdown));
                })
                .expect("spawn the proxy thread")
        };
        Proxy {
            port,
            ctl,
            shutdown,
            thread: Some(thread),
        }
    }

    /// Delays every chunk by `latency`, in each direction (a round trip gains twice it).
    /// Order is kept. Applies to chunks read from now on.
    pub fn set_latency(&self, latency: Duration) {
        self.ctl.switches.send_modify(|s| s.latency = latency);
    }

    /// Stops forwarding bytes both ways; connections stay open (and new ones are accepted,
    /// then stalled too).
    pub fn stall(&self) {
        self.ctl.switches.send_modify(|s| s.stalled = true);
    }

    /// Stops forwarding what clients send; what upstream sends still reaches them
    /// (a client whose packets are lost while it still hears the server).
    /// [`Proxy::resume`] ends it.
    pub fn stall_upstream(&self) {
        self.ctl.switches.send_modify(|s| s.upstream_stalled = true);
    }

    /// Stops forwarding what upstream sends; what clients send still reaches it (a
    /// broker that takes publishes but withholds its PUBACKs). [`Proxy::resume`] ends it.
    pub fn stall_downstream(&self) {
        self.ctl
            .switches
            .send_modify(|s| s.downstream_stalled = true);
    }

    /// Forwards again, both ways, starting with what was held back.
    pub fn resume(&self) {
        self.ctl.switches.send_modify(|s| {
            s.stalled = false;
            s.upstream_stalled = false;
            s.downstream_stalled = false;
        });
    }

    /// Drops every current connection (both sides see it closed) and returns once they are
    /// gone; new connections are accepted as before.
    pub fn sever(&self) {
        let old = std::mem::replace(&mut *lock(&self.ctl.generation), Generation::new());
        old.cancel.cancel();
        let deadline = Instant::now() + WAIT;
        while old.live.load(Ordering::SeqCst) > 0 {
            assert!(
                Instant::now() < deadline,
                "proxy: {} connection(s) still open {WAIT:?} after sever",
                old.live.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        lock(&self.ctl.generation).live.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    upstream: SocketAddr,
    ctl: Arc<Ctl>,
    shutdown: CancellationToken,
) {
    let listener = TcpListener::from_std(listener).expect("register the listener");
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else {
            // EMFILE and the like: pause instead of spinning on the error.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if conns.len() >= MAX_CONNECTIONS {
            drop(client);
            continue;
        }
        let generation = lock(&ctl.generation).clone();
        generation.live.fetch_add(1, Ordering::SeqCst);
        let switches = ctl.switches.subscribe();
        conns.spawn(async move {
            tokio::select! {
                () = generation.cancel.cancelled() => {}
                () = connection(client, upstream, switches) => {}
            }
            // The sockets are dropped by now: sever() may return.
            generation.live.fetch_sub(1, Ordering::SeqCst);
        });
    }
    // Dropping the set aborts every connection task, which closes their sockets.
}

async fn connection(client: TcpStream, upstream: SocketAddr, switches: watch::Receiver<Switches>) {
    let Ok(Ok(server)) = tokio::time::timeout(WAIT, TcpStream::connect(upstream)).await else {
        return;
    };
    // Our own Nagle delays would add to the latency under test.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    tokio::join!(
        pump(client_r, server_w, switches.clone(), true),
        pump(server_r, client_w, switches, false),
    );
}

/// One direction: a reader stamps each chunk with when it may leave, a writer sends chunks
/// in order once due and not stalled. EOF is passed on as a write shutdown.
/// `upstream`: this is the client-to-upstream direction.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    switches: watch::Receiver<Switches>,
    upstream: bool,
) {
    let (tx, mut rx) = mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(QUEUE_CHUNKS);
    let mut read_switches = switches.clone();
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            // Err only when the proxy is being dropped.
            let _ = read_switches.wait_for(|s| !s.holds(upstream)).await;
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let due = tokio::time::Instant::now() + read_switches.borrow().latency;
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let mut write_switches = switches;
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let _ = write_switches.wait_for(|s| !s.holds(upstream)).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{ErrorKind, Read, Write};

    /// An upstream that echoes every byte back, on its own threads.
    fn echo_server() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut r = s.try_clone().expect("clone");
                    let _ = std::io::copy(&mut r, &mut s);
                });
            }
        });
        port
    }

    fn connect(proxy: &Proxy) -> std::net::TcpStream {
        let s = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        s
    }

    fn read_n(s: &mut std::net::TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        s.read_exact(&mut buf).expect("the echo arrives");
        buf
    }

    #[test]
    fn bytes_pass_both_ways_unchanged() {
        let proxy = Proxy::start(echo_server());
        let mut s = connect(&proxy);
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = s.try_clone().expect("clone");
        let sent = big.clone();
        let writer = std::thread::spawn(move || w.write_all(&sent).expect("write"));
        assert_eq!(read_n(&mut s, big.len()), big);
        writer.join().expect("writer");
        assert_eq!(proxy.connections(), 1);
    }

    #[test]
    fn latency_is_added_in_each_direction_and_keeps_the_order() {
        let proxy = Proxy::start(echo_server());
        let mut s = connect(&proxy);
        s.write_all(b"warm").expect("write");
        read_n(&mut s, 4);
        proxy.set_latency(Duration::from_millis(150));
        let started = Instant::now();
        for chunk in [b"a", b"b", b"c"] {
            s.write_all(chunk).expect("write");
        }
        assert_eq!(read_n(&mut s, 3), b"abc");
        // A lower bound on a delay the proxy imposes is its behaviour, not a speed claim:
        // a loaded machine only makes the round trip longer, so this cannot fail
        // spuriously. (No upper bound after the latency is removed: that one could.)
        let rtt = started.elapsed();
        assert!(rtt >= Duration::from_millis(300), "{rtt:?}");
        proxy.set_latency(Duration::ZERO);
        s.write_all(b"d").expect("write");
        assert_eq!(read_n(&mut s, 1), b"d");
    }

    #[test]
    fn a_stall_holds_the_bytes_without_closing_and_resume_delivers_them() {
        let proxy = Proxy::start(echo_server());
        let mut s = connect(&proxy);
        s.write_all(b"1").expect("write");
        read_n(&mut s, 1);
        proxy.stall();
        s.write_all(b"2").expect("write while stalled");
        // An absence has no event to await: watch for a while. A slow machine can only
        // make this miss a leak, never report one that did not happen.
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut buf = [0u8; 1];
        let err = s.read(&mut buf).expect_err("nothing comes through a stall");
        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err:?}"
        );
        assert_eq!(proxy.connections(), 1, "still open");
        proxy.resume();
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        assert_eq!(read_n(&mut s, 1), b"2");
    }

    #[test]
    fn an_upstream_stall_holds_what_clients_send_but_not_what_they_receive() {
        // An upstream that greets on request and echoes everything else.
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let (greet_tx, greet_rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let Ok((mut s, _)) = l.accept() else { return };
            let mut r = s.try_clone().expect("clone");
            let mut w = s.try_clone().expect("clone");
            std::thread::spawn(move || {
                while greet_rx.recv().is_ok() {
                    let _ = w.write_all(b"g");
                }
            });
            let _ = std::io::copy(&mut r, &mut s);
        });
        let proxy = Proxy::start(port);
        let mut s = connect(&proxy);
        s.write_all(b"1").expect("write");
        assert_eq!(read_n(&mut s, 1), b"1");
        proxy.stall_upstream();
        s.write_all(b"2")
            .expect("write while the upstream direction is stalled");
        greet_tx.send(()).expect("greet");
        assert_eq!(
            read_n(&mut s, 1),
            b"g",
            "the server's bytes still come through"
        );
        proxy.resume();
        assert_eq!(read_n(&mut s, 1), b"2", "the held bytes go out on resume");
    }

    #[test]
    fn sever_closes_current_connections_and_new_ones_still_work() {
        let proxy = Proxy::start(echo_server());
        let mut old = connect(&proxy);
        old.write_all(b"x").expect("write");
        read_n(&mut old, 1);
        proxy.sever();
        assert_eq!(proxy.connections(), 0);
        let mut buf = [0u8; 1];
        match old.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("a severed connection reads EOF or a reset, not {other:?}"),
        }
        let mut new = connect(&proxy);
        new.write_all(b"y").expect("write");
        assert_eq!(read_n(&mut new, 1), b"y");
    }

    #[test]
    fn connections_beyond_the_limit_are_closed() {
        let proxy = Proxy::start(echo_server());
        let mut open: Vec<_> = (0..MAX_CONNECTIONS).map(|_| connect(&proxy)).collect();
        for s in &mut open {
            s.write_all(b"k").expect("write");
            read_n(s, 1);
        }
        let mut extra = connect(&proxy);
        let mut buf = [0u8; 1];
        let _ = extra.write_all(b"z");
        match extra.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("the connection over the limit is closed, not {other:?}"),
        }
    }
}
