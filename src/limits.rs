//! Hardening: memory that no peer can grow, and time that no holder can
//! take.
//!
//! Everything a peer can make a node hold is bounded where it is held:
//! control frames by `frame::MAX_FRAME_LEN`, handshakes by their own cap,
//! connections by `listener::MAX_CONNECTIONS`, the seen-set by
//! `gossip::SEEN_CAPACITY`, the known peers by `liveness`, tombstones by
//! their grace period. This module bounds the last one: what waits in a
//! peer's writer queue. The queue holds at most `transport::QUEUE_LEN`
//! items, and at most [`MAX_QUEUED_BYTES`] by [`weight`]: a peer that asks
//! for files or digests faster than it reads them is disconnected, with a
//! log line, instead of queueing without end. File contents never wait in
//! the queue: the writer reads them from disk when their turn comes.
//!
//! Hooks into the core at `Transport::queue`, which takes room here before
//! queueing, and the writer, which gives it back as it takes each item.
//!
//! It also sets the **floor rate** ([`Floor`]) of diagram 2: the holder a
//! `get` or a fetch picked must stream at least [`FLOOR_RATE`], measured
//! over every [`FLOOR_WINDOW`]. A holder that trickles (one byte a second
//! keeps the heartbeat happy) is cut off after one window, and the next
//! holder is asked. Hooks into the core where the server streams a fetched
//! file in.

use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::frame::{Frame, MAX_KEY_LEN};
use crate::transport::{Outbound, StreamLock};

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
pub(crate) struct Floor<'a> {
    /// The transport lock the bytes come through.
    stream: &'a mut StreamLock,
    /// When the current window began.
    window_start: Instant,
    /// Bytes read in the current window.
    in_window: u64,
    /// Bytes the stream still owed when the window began.
    owed_at_start: u64,
}

impl Floor<'_> {
    /// Starts measuring now.
    pub fn new(stream: &mut StreamLock) -> Floor<'_> {
        let owed_at_start = stream.owed();
        Floor { stream, window_start: Instant::now(), in_window: 0, owed_at_start }
    }
}

impl Read for Floor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stream.read(buf)?;
        self.in_window += n as u64;
        let elapsed = self.window_start.elapsed();
        if elapsed >= FLOOR_WINDOW {
            let due = FLOOR_RATE.saturating_mul(elapsed.as_secs()).min(self.owed_at_start);
            if self.in_window < due {
                return Err(io::Error::other(format!(
                    "the holder sent {} bytes in {elapsed:.1?}, below the floor of {} KiB/s",
                    self.in_window,
                    FLOOR_RATE >> 10
                )));
            }
            self.window_start = Instant::now();
            self.in_window = 0;
            self.owed_at_start = self.stream.owed();
        }
        Ok(n)
    }
}

/// How many bytes of work may wait in one peer's queue.
pub(crate) const MAX_QUEUED_BYTES: usize = 8 << 20;

/// The bytes waiting in one peer's queue.
#[derive(Debug, Default)]
pub(crate) struct QueueBudget(AtomicUsize);

impl QueueBudget {
    /// Takes room for `work`, or says why there is none.
    pub fn take(&self, work: &Outbound) -> Result<(), String> {
        let weight = weight(work);
        let queued = self.0.fetch_add(weight, Ordering::SeqCst) + weight;
        if queued > MAX_QUEUED_BYTES {
            self.0.fetch_sub(weight, Ordering::SeqCst);
            return Err(format!("{queued} bytes of frames wait for it to read"));
        }
        Ok(())
    }

    /// Gives back the room `work` took.
    pub fn give_back(&self, work: &Outbound) {
        self.0.fetch_sub(weight(work), Ordering::SeqCst);
    }
}

/// What a queued item costs in memory, roughly: a key is the most that most
/// frames hold, and a digest holds many. Markers cost nothing (and `Close`,
/// which `Transport::close` queues without taking room, must not).
fn weight(work: &Outbound) -> usize {
    const ITEM: usize = 64;
    match work {
        Outbound::Frame(Frame::Digest { entries, .. }) => {
            ITEM + entries.iter().map(|entry| entry.key.len() + 32).sum::<usize>()
        }
        Outbound::Push { key, .. } | Outbound::Reply { key, .. } => ITEM + key.len(),
        Outbound::Frame(_) => ITEM + MAX_KEY_LEN,
        Outbound::Written(_) | Outbound::Close => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refuses_past_its_cap_and_balances_to_zero() {
        let budget = QueueBudget::default();
        let push = |n: usize| Outbound::Push {
            key: "k".repeat(n),
            version: crate::version::Version::ZERO,
        };
        let mut taken = Vec::new();
        while budget.take(&push(1000)).is_ok() {
            taken.push(push(1000));
        }
        assert_eq!(taken.len(), MAX_QUEUED_BYTES / weight(&push(1000)));
        for work in &taken {
            budget.give_back(work);
        }
        // What `close` queues without taking room gives nothing back.
        budget.give_back(&Outbound::Close);
        assert_eq!(budget.0.load(Ordering::SeqCst), 0);
    }
}
