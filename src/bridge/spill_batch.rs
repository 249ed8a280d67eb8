//! The on-disk form of the spill buffer ([`super::buffer`]): the readings
//! spilled between two flushes are one sled value (a batch), so a group commit
//! writes one key instead of one per reading, and a drained batch is one removal.
//! sled rewrites a whole leaf every few changes to it; one change per batch instead
//! of one per reading is what keeps an outage's bytes near the readings' own.
//!
//! Keys: `b ‖ batch number (u64, big endian)` for a batch, `w ‖ sensor id` for a
//! sensor's watermark (the id of the last reading Qubitro took or a bound dropped;
//! readings at or below it are gone even while their batch is still on disk).
//! A reading's id is `batch number << 20 | its position in the batch`, so ids grow
//! in arrival order per sensor, across batches and, since batch numbers come from
//! sled's id generator, across a kill -9.
//!
//! A batch's value: per reading, the sensor id's length (u16), the id, the
//! payload's length (u32) and the payload, all big endian. A batch rewritten to
//! drop the readings that are gone ([`compacted`]) holds a gap in their place: the
//! length [`GAP`] and how many positions it skips (u32), so the readings left keep
//! their ids.
//!
//! The one piece of I/O here is [`migrate`]: earlier versions' one key per reading
//! moved into batches.

use crate::store::{ReadingsTree, Store, StoreError};

/// Bits of a reading id that give its position in its batch.
const POSITION_BITS: u32 = 20;

/// Readings in one batch at most: their positions must fit in [`POSITION_BITS`].
pub(super) const MAX_READINGS: usize = 1 << POSITION_BITS;

const BATCH: u8 = b'b';
const MARK: u8 = b'w';

pub(super) fn batch_key(no: u64) -> [u8; 9] {
    let mut k = [BATCH; 9];
    k[1..].copy_from_slice(&no.to_be_bytes());
    k
}

/// The batch number of a batch key; `None` for any other key.
pub(super) fn batch_no(key: &[u8]) -> Option<u64> {
    match key {
        [BATCH, rest @ ..] => Some(u64::from_be_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

pub(super) fn mark_key(sensor: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(sensor.len() + 1);
    k.push(MARK);
    k.extend_from_slice(sensor.as_bytes());
    k
}

/// The sensor of a watermark key; `None` for any other key.
pub(super) fn mark_sensor(key: &[u8]) -> Option<&str> {
    match key {
        [MARK, rest @ ..] => std::str::from_utf8(rest).ok(),
        _ => None,
    }
}

pub(super) fn reading_id(batch: u64, position: usize) -> u64 {
    (batch << POSITION_BITS) | position as u64
}

/// The batch a reading id belongs to.
pub(super) fn batch_of(id: u64) -> u64 {
    id >> POSITION_BITS
}

/// The sensor id length that marks a gap instead of a reading.
const GAP: u16 = u16::MAX;

/// Appends one reading to a batch's value. Sensor ids are far below 64 KiB and
/// readings below 4 GiB (both are bounded long before they reach the buffer).
pub(super) fn encode(out: &mut Vec<u8>, sensor: &str, payload: &[u8]) {
    let sensor_len = u16::try_from(sensor.len()).unwrap_or(GAP).min(GAP - 1);
    let payload_len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&sensor_len.to_be_bytes());
    out.extend_from_slice(&sensor.as_bytes()[..usize::from(sensor_len)]);
    out.extend_from_slice(&payload_len.to_be_bytes());
    out.extend_from_slice(&payload[..payload_len as usize]);
}

/// The readings of batch `batch`'s value, in order: (id, sensor, payload). Stops at
/// the first malformed one (a torn or corrupt value: what follows is unreadable).
pub(super) fn decode(batch: u64, value: &[u8]) -> impl Iterator<Item = (u64, &str, &[u8])> {
    let mut rest = value;
    let mut position = 0;
    std::iter::from_fn(move || loop {
        if let Some((skip, tail)) = gap(rest) {
            (rest, position) = (tail, position + skip);
            continue;
        }
        let (sensor, payload, tail) = next(rest)?;
        rest = tail;
        let id = reading_id(batch, position);
        position += 1;
        return Some((id, sensor, payload));
    })
}

/// A gap at the start of `buf`: the positions it skips and what follows it.
fn gap(buf: &[u8]) -> Option<(usize, &[u8])> {
    let (len, buf) = buf.split_first_chunk::<2>()?;
    if u16::from_be_bytes(*len) != GAP {
        return None;
    }
    let (skip, buf) = buf.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*skip) as usize, buf))
}

/// Batch `batch`'s value with only the readings `live` keeps, the others replaced
/// by gaps (none at the end: no id past the last reading is looked for); `None`
/// when it keeps them all, empty when it keeps none.
pub(super) fn compacted(
    batch: u64,
    value: &[u8],
    mut live: impl FnMut(u64, &str) -> bool,
) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut expected = reading_id(batch, 0);
    let mut dropped = false;
    for (id, sensor, payload) in decode(batch, value) {
        if !live(id, sensor) {
            dropped = true;
            continue;
        }
        if id > expected {
            let skip = u32::try_from(id - expected).unwrap_or(u32::MAX);
            out.extend_from_slice(&GAP.to_be_bytes());
            out.extend_from_slice(&skip.to_be_bytes());
        }
        encode(&mut out, sensor, payload);
        expected = id + 1;
    }
    dropped.then_some(out)
}

fn next(buf: &[u8]) -> Option<(&str, &[u8], &[u8])> {
    let (len, buf) = buf.split_first_chunk::<2>()?;
    let (sensor, buf) = buf.split_at_checked(usize::from(u16::from_be_bytes(*len)))?;
    let (len, buf) = buf.split_first_chunk::<4>()?;
    let (payload, buf) = buf.split_at_checked(u32::from_be_bytes(*len) as usize)?;
    Some((std::str::from_utf8(sensor).ok()?, payload, buf))
}

/// Readings of an earlier version's buffer per batch when they move into batches.
const MIGRATED_BATCH_BYTES: usize = 64 * 1024;

/// Moves readings an earlier version kept one key each (`sensor ‖ 0x00 ‖ id`, in
/// [`Store::readings`]) into batches, in that order, and flushes. A crash before the
/// old tree is emptied sends them twice (at least once).
pub(super) fn migrate(store: &Store, tree: &ReadingsTree) -> Result<(), StoreError> {
    let old = store.readings()?;
    if old.tree.is_empty() {
        return Ok(());
    }
    let mut value = Vec::new();
    for item in old.tree.iter() {
        let (k, v) = item?;
        let Some(sensor) = k
            .len()
            .checked_sub(9)
            .filter(|n| k[*n] == 0)
            .and_then(|n| std::str::from_utf8(&k[..n]).ok())
        else {
            continue;
        };
        encode(&mut value, sensor, &v);
        if value.len() >= MIGRATED_BATCH_BYTES {
            let full = std::mem::take(&mut value);
            tree.tree.insert(batch_key(tree.next_id()?), full)?;
        }
    }
    if !value.is_empty() {
        tree.tree.insert(batch_key(tree.next_id()?), value)?;
    }
    tree.tree.flush()?;
    old.tree.clear()?;
    old.tree.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_decodes_to_its_readings_in_order_with_their_ids() {
        let mut v = Vec::new();
        encode(&mut v, "a", b"one");
        encode(&mut v, "bb", b"");
        encode(&mut v, "a", b"three");
        let got: Vec<_> = decode(7, &v).collect();
        assert_eq!(
            got,
            [
                (reading_id(7, 0), "a", &b"one"[..]),
                (reading_id(7, 1), "bb", &b""[..]),
                (reading_id(7, 2), "a", &b"three"[..]),
            ]
        );
        assert!(got.iter().all(|(id, _, _)| batch_of(*id) == 7));
        assert!(reading_id(7, MAX_READINGS - 1) < reading_id(8, 0));
    }

    #[test]
    fn a_torn_batch_yields_the_readings_before_the_tear() {
        let mut v = Vec::new();
        encode(&mut v, "a", b"one");
        encode(&mut v, "a", b"two");
        v.truncate(v.len() - 1);
        assert_eq!(decode(1, &v).count(), 1);
    }

    #[test]
    fn a_compacted_batch_keeps_its_live_readings_ids_and_drops_the_rest() {
        let mut v = Vec::new();
        for (s, p) in [("a", "0"), ("b", "1"), ("b", "2"), ("a", "3"), ("b", "4")] {
            encode(&mut v, s, p.as_bytes());
        }
        let all: Vec<_> = decode(3, &v).collect();
        let keep = [all[1].0, all[3].0];
        let c = compacted(3, &v, |id, _| keep.contains(&id)).expect("some dropped");
        assert!(c.len() < v.len());
        let left: Vec<_> = decode(3, &c).collect();
        assert_eq!(left, [all[1], all[3]]);
        // Compacting again keeps the gaps' positions.
        let again = compacted(3, &c, |id, _| id == all[3].0).expect("one dropped");
        assert_eq!(decode(3, &again).collect::<Vec<_>>(), [all[3]]);
        assert_eq!(compacted(3, &c, |_, _| true), None);
        assert_eq!(compacted(3, &v, |_, _| false), Some(Vec::new()));
    }

    #[test]
    fn keys_tell_batches_from_watermarks() {
        assert_eq!(batch_no(&batch_key(42)), Some(42));
        assert_eq!(batch_no(&mark_key("s1")), None);
        assert_eq!(mark_sensor(&mark_key("s1")), Some("s1"));
        assert_eq!(mark_sensor(&batch_key(1)), None);
        // Batches sort by number.
        assert!(batch_key(255) < batch_key(256));
    }
}
