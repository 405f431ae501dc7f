//! Hardening: how much a peer can make a node fetch, and when a node
//! fetches a file although its origin is pushing it.
//!
//! Relay by announcement lets any peer make a node ask for files: each
//! announcement of a version the node lacks sends a go-ahead and leaves
//! an entry in the node's pending requests and in its files on their way.
//! A peer that announces faster than it answers would grow both without
//! end. So a fetch is sent only if it fits ([`room`]): at most
//! [`MAX_FETCHES_PER_PEER`] waiting on one peer, [`MAX_FETCHES`] on all of
//! them, and as many files expected. What does not fit is refused: the
//! core forgets its version, so a later announcement or anti-entropy
//! round brings it.
//!
//! **The unanswered-fetch cutoff.** A peer whose share is full and whose
//! oldest fetch has waited [`UNANSWERED_FETCH_LIMIT`] is cut off: closing
//! its connection fails its fetches over to other sources and frees their
//! room.
//!
//! **The busy origin.** A node waits for the push of a store whose origin
//! is its direct peer, rather than fetch a second copy. But the origin's
//! connection streams one file at a time: a small file whose push waits
//! behind a large one is fetched from its announcer ([`past_busy_origin`]).
//!
//! Hooks into the core where an announcement is judged and where a fetch's
//! go-ahead is about to be sent.

use std::time::{Duration, Instant};

use log::{debug, warn};

use crate::hardening::limits::{MAX_FETCHES, MAX_FETCHES_PER_PEER};
use crate::host::Host;
use crate::transport::Transport;

/// How long a peer may leave its share of fetches unanswered before it is
/// cut off.
pub(crate) const UNANSWERED_FETCH_LIMIT: Duration = Duration::from_secs(30);

/// The largest file fetched from an announcer at once when its origin's
/// push would wait behind another stream on the origin's connection: a
/// small change should not wait for a large one, and a file this small
/// costs little if its push crosses too.
pub(crate) const BUSY_ORIGIN_FETCH_MAX: u64 = 64 << 10;

/// Whether one more fetch of `key` from `peer` fits, given the fetches
/// waiting (each as its connection and when it was asked) and how many
/// files the node expects. Cuts `peer` off if it has left its full share
/// unanswered for too long.
pub(crate) fn room(
    node: &dyn Host,
    peer: &Transport,
    key: &str,
    waiting: &[(u64, Instant)],
    expected: usize,
) -> bool {
    let ages = waiting.iter().filter(|(conn, _)| *conn == peer.conn).map(|(_, at)| at.elapsed());
    let (mine, oldest) = ages.fold((0, Duration::ZERO), |(n, max), age| (n + 1, max.max(age)));
    if mine >= MAX_FETCHES_PER_PEER && oldest >= UNANSWERED_FETCH_LIMIT {
        warn!(target: node.name(), "Closing peer={}: {mine} fetches left unanswered", peer.name());
        peer.close();
    }
    let full = mine >= MAX_FETCHES_PER_PEER || !room_to_expect(waiting.len().max(expected));
    if full {
        debug!(target: node.name(), "Not fetching key={key} from={}: too many fetches wait", peer.name());
    }
    !full
}

/// Whether the node may note one more file as on its way, `expected` being
/// noted already.
pub(crate) fn room_to_expect(expected: usize) -> bool {
    expected < MAX_FETCHES
}

/// Whether to fetch a file of `size` bytes from its announcer although
/// `origin` promised to push it: its push would wait behind another
/// stream, and it is small.
pub(crate) fn past_busy_origin(origin: &Transport, size: u64) -> bool {
    origin.is_streaming() && size <= BUSY_ORIGIN_FETCH_MAX
}
