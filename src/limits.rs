//! Hardening: memory that no peer can grow.
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

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::frame::{Frame, MAX_KEY_LEN};
use crate::transport::Outbound;

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
