//! Hardening: memory that no peer can grow, and time that no holder can
//! take.
//!
//! Everything a peer can make a node hold is bounded where it is held:
//! control frames by `frame::MAX_FRAME_LEN`, handshakes by their own cap,
//! connections by `config::MAX_CONNECTIONS`, the seen-set by
//! `gossip::SEEN_CAPACITY`, the known peers by `liveness`, tombstones by
//! their grace period. This module bounds the last one: what waits in a
//! peer's writer queue. The queue holds at most `transport::QUEUE_LEN`
//! items, and at most [`MAX_QUEUED_BYTES`] by [`frame_weight`] and
//! [`key_weight`]: a peer that asks for files or digests faster than it
//! reads them is disconnected, with a log line, instead of queueing
//! without end. File contents never wait in
//! the queue: the writer reads them from disk when their turn comes.
//!
//! Hooks into the core at `Transport::queue`, which takes room here before
//! queueing, and the writer, which gives it back as it takes each item.
//!
//! Every table a peer's frames add to is bounded too: fetches waiting per
//! peer ([`MAX_FETCHES_PER_PEER`]) and per node ([`MAX_FETCHES`]), files
//! expected, and the other sources each remembers ([`MAX_SOURCES`]). What
//! does not fit is dropped, and anti-entropy repairs it later. Hooks into
//! the core where a fetch or an expected file is noted.
//!
//! Diagram 2's holders keep at most [`MAX_HELD_OFFERS`] files open per
//! connection, for at most [`OFFER_HOLD`] ([`HeldOffers`]): an asker that
//! asks and never says go or release cannot make a node hold its files
//! open. Hooks into the core at the Peer's handler.
//!
//! It also sets the **floor rate** ([`Floor`]) of diagram 2: the holder a
//! `get` or a fetch picked must stream at least [`FLOOR_RATE`], measured
//! over every [`FLOOR_WINDOW`]. A holder that trickles (one byte a second
//! keeps the heartbeat happy) is cut off after one window, and the next
//! holder is asked. Hooks into the core where the server streams a fetched
//! file in.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::frame::{Frame, MAX_KEY_LEN};
use crate::hardening::checked::FileReader;

/// The slowest a picked holder may stream, in bytes per second: far below
/// any real link (a 1 Mbit/s line moves 122 KiB/s), far above a trickle.
pub(crate) const FLOOR_RATE: u64 = 64 << 10;

/// How long the floor rate is measured over, window after window.
pub(crate) const FLOOR_WINDOW: Duration = Duration::from_secs(2);

/// A fetched stream, read through its transport lock, that fails once a
/// window delivers less than the floor rate (or less than all that was
/// still owed, for the stream's last bytes). The window counts the
/// asker's own disk writes too: a disk slower than the floor would cut off
/// honest holders, which is why the floor is far below any disk.
pub(crate) struct Floor<'a, S: Owed> {
    /// The transport lock the bytes come through.
    stream: &'a mut S,
    /// When the current window began.
    window_start: Instant,
    /// Bytes read in the current window. What the stream owed when the
    /// window began is what it owes now plus these.
    in_window: u64,
}

/// A stream that knows how many of its bytes are still to come: the
/// transport lock, to the floor.
pub(crate) trait Owed: Read {
    /// Bytes still to be read.
    fn owed(&self) -> u64;
}

impl<S: Owed> Floor<'_, S> {
    /// Starts measuring now.
    pub fn new(stream: &mut S) -> Floor<'_, S> {
        Floor { stream, window_start: Instant::now(), in_window: 0 }
    }
}

impl<S: Owed> Read for Floor<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stream.read(buf)?;
        self.in_window += n as u64;
        let elapsed = self.window_start.elapsed();
        if elapsed >= FLOOR_WINDOW {
            let owed_at_start = self.stream.owed() + self.in_window;
            let due = FLOOR_RATE.saturating_mul(elapsed.as_secs()).min(owed_at_start);
            if self.in_window < due {
                return Err(io::Error::other(format!(
                    "the holder sent {} bytes in {elapsed:.1?}, below the floor of {} KiB/s",
                    self.in_window,
                    FLOOR_RATE >> 10
                )));
            }
            self.window_start = Instant::now();
            self.in_window = 0;
        }
        Ok(n)
    }
}

/// How many fetches may wait for their file from one peer. A peer that
/// announces faster than it answers fills this, and what does not fit is
/// not fetched: anti-entropy asks again later. Bounds the `pending` and
/// `incoming` tables per connection.
pub(crate) const MAX_FETCHES_PER_PEER: usize = 64;

/// How many fetches may wait in a node, all peers together, and how many
/// files it notes as on their way: at most a few hundred KiB of keys.
pub(crate) const MAX_FETCHES: usize = 1024;

/// How many other peers a file on its way remembers as places to ask next.
pub(crate) const MAX_SOURCES: usize = 8;

/// How many bytes of work may wait in one peer's queue.
pub(crate) const MAX_QUEUED_BYTES: usize = 8 << 20;

/// The bytes waiting in one peer's queue.
#[derive(Debug, Default)]
pub(crate) struct QueueBudget(AtomicUsize);

impl QueueBudget {
    /// Takes room for an item of `weight` bytes, or says why there is none.
    pub fn take(&self, weight: usize) -> Result<(), String> {
        let queued = self.0.fetch_add(weight, Ordering::SeqCst) + weight;
        if queued > MAX_QUEUED_BYTES {
            self.0.fetch_sub(weight, Ordering::SeqCst);
            return Err(format!("{queued} bytes of frames wait for it to read"));
        }
        Ok(())
    }

    /// Gives back the room an item of `weight` bytes took.
    pub fn give_back(&self, weight: usize) {
        self.0.fetch_sub(weight, Ordering::SeqCst);
    }
}

/// What one queued item costs besides what it names, roughly.
const ITEM: usize = 64;

/// What a queued frame costs in memory, roughly: a key is the most that
/// most frames hold, and a digest holds many.
pub(crate) fn frame_weight(frame: &Frame) -> usize {
    match frame {
        Frame::Digest { entries, .. } => {
            ITEM + entries.iter().map(|entry| entry.key.len() + 32).sum::<usize>()
        }
        _ => ITEM + MAX_KEY_LEN,
    }
}

/// What a queued piece of work that names a key costs (a push, a reply):
/// the file itself is read from disk when its turn comes.
pub(crate) fn key_weight(key: &str) -> usize {
    ITEM + key.len()
}

/// How many offered files one connection's handler holds open, waiting for
/// a go-ahead. An asker that asks for more lets the oldest lapse (a
/// go-ahead for a lapsed offer opens the file anew).
pub(crate) const MAX_HELD_OFFERS: usize = 8;

/// How long an offered file is held open waiting for its go-ahead.
pub(crate) const OFFER_HOLD: Duration = Duration::from_secs(60);

/// Files this node offered on one connection, open and held ready for the
/// go-ahead. Owned by that connection's handler: no lock. Bounded by
/// [`MAX_HELD_OFFERS`] and [`OFFER_HOLD`]; what lapses is only closed (a
/// go-ahead for it opens the file anew).
#[derive(Default)]
pub(crate) struct HeldOffers(VecDeque<HeldOffer>);

/// One offered file, held open for the asker.
struct HeldOffer {
    /// The request it answers.
    request: u64,
    /// Its key: a go-ahead for another key under the same request gets none.
    key: String,
    /// When it was offered.
    at: Instant,
    file: Box<FileReader>,
}

impl HeldOffers {
    /// Holds `file` for `request`, letting the lapsed and the oldest go.
    pub fn hold(&mut self, request: u64, key: String, file: Box<FileReader>) {
        self.0.retain(|held| held.at.elapsed() < OFFER_HOLD);
        if self.0.len() >= MAX_HELD_OFFERS {
            self.0.pop_front();
        }
        self.0.push_back(HeldOffer { request, key, at: Instant::now(), file });
    }

    /// Takes the file held for `request`, if any (a go-ahead, or a release).
    pub fn take(&mut self, request: u64, key: Option<&str>) -> Option<Box<FileReader>> {
        let at = self.0.iter().position(|held| held.request == request)?;
        let held = self.0.remove(at)?;
        key.is_none_or(|key| key == held.key).then_some(held.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refuses_past_its_cap_and_balances_to_zero() {
        let budget = QueueBudget::default();
        let push = key_weight(&"k".repeat(1000));
        let mut taken = 0;
        while budget.take(push).is_ok() {
            taken += 1;
        }
        assert_eq!(taken, MAX_QUEUED_BYTES / push);
        for _ in 0..taken {
            budget.give_back(push);
        }
        assert_eq!(budget.0.load(Ordering::SeqCst), 0);
    }
}
