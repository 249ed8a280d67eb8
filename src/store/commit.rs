//! Group commit: every write gets a sequence number, and one flusher task makes
//! the writes that someone waits for durable, many at a time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::{Store, StoreError};

/// Writes a user of the database keeps in memory until a flush needs them (the
/// bridge's spill buffer gathers a group commit's readings into one value): the
/// flusher asks for them just before each flush, so whatever was written before
/// the flush's sequence number is on disk after it.
pub trait BeforeFlush: Send + Sync {
    fn before_flush(&self) -> Result<(), StoreError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlushState {
    flushed: u64,
    failed: bool,
}

pub(super) struct Flusher {
    /// Sequence number of the last completed write.
    written: AtomicU64,
    /// The highest write a `durable` caller waits for. Only these make a flush:
    /// writes nobody waits for (a delivered mark, a forwarded reading's removal) ride
    /// along with the next flush or sled's own every second, so they cost no extra
    /// fsync (SD-card wear).
    wanted: AtomicU64,
    state: watch::Sender<FlushState>,
    wake: Notify,
    /// Asked before each flush; weak, so a dropped user simply falls out.
    before: Mutex<Vec<Weak<dyn BeforeFlush>>>,
    /// Flushes done, for tests.
    #[cfg(test)]
    flushes: AtomicU64,
}

impl Flusher {
    /// Starts the flusher task for `db`; cancelling the token stops it (and so
    /// releases the database).
    pub(super) fn start(db: &sled::Db) -> (Arc<Flusher>, CancellationToken) {
        let (state, _) = watch::channel(FlushState {
            flushed: 0,
            failed: false,
        });
        let flusher = Arc::new(Flusher {
            written: AtomicU64::new(0),
            wanted: AtomicU64::new(0),
            state,
            wake: Notify::new(),
            before: Mutex::new(Vec::new()),
            #[cfg(test)]
            flushes: AtomicU64::new(0),
        });
        let closer = CancellationToken::new();
        tokio::spawn(run_flusher(db.clone(), flusher.clone(), closer.clone()));
        (flusher, closer)
    }
}

impl Flusher {
    /// The users to ask before a flush (the gone ones dropped).
    fn before(&self) -> Vec<Arc<dyn BeforeFlush>> {
        let mut list = self.before.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(Weak::upgrade).collect()
    }
}

impl Store {
    /// Asks `user` for its held-back writes before every flush from now on.
    pub fn before_flush(&self, user: Weak<dyn BeforeFlush>) {
        let mut list = self
            .flusher
            .before
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        list.push(user);
    }

    pub(super) fn wrote(&self) -> u64 {
        self.flusher.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The sequence number of the latest write, for waiting on everything so far.
    pub fn last_write(&self) -> u64 {
        self.flusher.written.load(Ordering::SeqCst)
    }

    /// The last write known to be on disk.
    pub fn flushed(&self) -> u64 {
        self.flusher.state.borrow().flushed
    }

    /// Whether write `seq` is on disk already.
    pub fn is_durable(&self, seq: u64) -> bool {
        self.flushed() >= seq
    }

    /// Resolves once write `seq` is on disk. Many waiters share one flush.
    pub async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        let mut rx = self.flusher.state.subscribe();
        {
            let s = *rx.borrow();
            if s.failed {
                return Err(StoreError::Flush("an earlier flush failed".into()));
            }
            if s.flushed >= seq {
                return Ok(());
            }
        }
        self.flusher.wanted.fetch_max(seq, Ordering::SeqCst);
        self.flusher.wake.notify_one();
        let s = rx
            .wait_for(|s| s.failed || s.flushed >= seq)
            .await
            .map_err(|_| StoreError::Flush("the flusher stopped".into()))?;
        if s.failed {
            Err(StoreError::Flush("flush failed".into()))
        } else {
            Ok(())
        }
    }

    /// Flushes everything written so far (shutdown, CLI writes).
    pub async fn flush_all(&self) -> Result<(), StoreError> {
        self.durable(self.last_write()).await
    }

    /// The end of an orderly stop: flushes, then leaves [`super::CLEAN_STOP_FILE`]
    /// beside sled's files. Every record write and its index entries happen with no
    /// await between them, so once every task has stopped no change is half-written,
    /// and the next open can skip [`Store::reconcile_indexes`]. That open removes the
    /// file again, so a crash after it is followed by a reconcile.
    pub async fn close_cleanly(&self) -> Result<(), StoreError> {
        self.write_last_seen()?;
        self.flush_all().await?;
        let mark = self.dir.join(super::CLEAN_STOP_FILE);
        let census = self.census.encode();
        let written = std::fs::File::create(&mark)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, census.as_bytes())?;
                f.sync_all()
            })
            .and_then(|()| std::fs::File::open(&self.dir)?.sync_all());
        written.map_err(|e| StoreError::Flush(format!("cannot write {}: {e}", mark.display())))
    }
}

async fn run_flusher(db: sled::Db, f: Arc<Flusher>, closer: CancellationToken) {
    loop {
        tokio::select! {
            _ = f.wake.notified() => {}
            _ = closer.cancelled() => return,
        }
        loop {
            if f.wanted.load(Ordering::SeqCst) <= f.state.borrow().flushed {
                break;
            }
            // Everything written so far is covered by this flush, waited for or not.
            let target = f.written.load(Ordering::SeqCst);
            if target <= f.state.borrow().flushed {
                // A wait for a write not made yet: nothing new to flush, so wait for
                // the next write's wake-up instead of flushing in a loop.
                break;
            }
            let db2 = db.clone();
            let before = f.before();
            let result = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
                for user in before {
                    user.before_flush()?;
                }
                db2.flush()?;
                Ok(())
            })
            .await;
            match result {
                Ok(Ok(_)) => {
                    #[cfg(test)]
                    f.flushes.fetch_add(1, Ordering::Relaxed);
                    f.state.send_modify(|s| s.flushed = s.flushed.max(target));
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "flushing the database failed");
                    f.state.send_modify(|s| s.failed = true);
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "the flush task died");
                    f.state.send_modify(|s| s.failed = true);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{cfg, pending};
    use super::*;

    #[tokio::test]
    async fn a_wait_for_a_write_not_made_yet_makes_no_flush_until_it_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        let seq = s.insert_new("a", &pending()).unwrap().unwrap();
        s.durable(seq).await.unwrap();
        let before = s.flusher.flushes.load(Ordering::Relaxed);
        let ahead = s.clone();
        let early = tokio::spawn(async move { ahead.durable(seq + 1).await });
        // The flusher gets the wake-up and the runtime's turns while no write comes.
        for _ in 0..100 {
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(s.flusher.flushes.load(Ordering::Relaxed), before);
        assert!(!early.is_finished());
        s.insert_new("b", &pending()).unwrap().unwrap();
        s.flush_all().await.unwrap();
        early.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn many_waiters_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        let mut waits = Vec::new();
        for i in 0..200 {
            let rec = pending();
            let seq = s.insert_new(&format!("s{i}"), &rec).unwrap().unwrap();
            let s2 = s.clone();
            waits.push(tokio::spawn(async move { s2.durable(seq).await }));
        }
        for w in waits {
            w.await.unwrap().unwrap();
        }
        assert_eq!(s.len(), 200);
    }

    #[tokio::test]
    async fn writes_nobody_waits_for_cost_no_flush_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&cfg(dir.path())).unwrap();
        let seq = s.insert_new("a", &pending()).unwrap().unwrap();
        s.durable(seq).await.unwrap();
        let flushes = || s.flusher.flushes.load(Ordering::Relaxed);
        assert_eq!(flushes(), 1);
        // Marks and removals that nobody awaits: no flush.
        for i in 0..20 {
            s.update("a", |r| r.retry_later(i, None, true, i).ok())
                .unwrap();
        }
        s.insert_new("b", &pending()).unwrap();
        tokio::task::yield_now().await;
        assert_eq!(flushes(), 1);
        // The next awaited write covers them all in one flush.
        let seq = s.update("b", |r| r.creating(9).ok()).unwrap().unwrap().1;
        s.durable(seq).await.unwrap();
        assert_eq!(flushes(), 2);
        assert!(
            s.durable(seq - 1).await.is_ok(),
            "earlier writes are durable too"
        );
    }
}
