//! The gossip rules, free of I/O: which change wins, the clock, what is new,
//! where to relay it, and what a digest says is missing.
//!
//! # How a change spreads
//!
//! A node that changes a key (a store, a delete) or clears everything stamps
//! the change with a fresh [`Version`] from its Lamport clock and sends it to
//! every peer. A node that receives a change:
//!
//! 1. moves its clock past the change's counter ([`Gossip::observe`]), so its
//!    own next change is ordered after everything it has seen;
//! 2. drops it if it has seen the change's id before — it came round a loop,
//!    or from two peers at once ([`Gossip::receive`] says `Duplicate`);
//! 3. drops it if it already holds something newer for the key (`Stale`);
//! 4. otherwise applies it and relays it to every peer except the one it came
//!    from and the node that made it ([`relay_targets`]).
//!
//! A change's id is its version: each node gives out each counter once, and
//! the node id is in the version, so no two changes share one. Step 2 keeps
//! a mesh from echoing a change forever; step 3 makes the outcome independent
//! of the order changes arrive in.
//!
//! # Last writer wins
//!
//! Versions are totally ordered (counter, then node id), and a node moves a
//! key only forward: it applies a change only if its version beats what it
//! holds ([`wins`]). Deletes leave a *tombstone* (the key and the delete's
//! version, no data) so that an older store arriving late still loses. Two
//! nodes that see the same changes in different orders end in the same
//! state, because each keeps the same maximum.
//!
//! When a store and a delete of the same key cross, the higher version wins
//! everywhere:
//!
//! ```text
//! A: {store k 5@A}   B: {delete k 6@B}   → every node ends with tombstone k 6@B
//! A: {store k 7@A}   B: {delete k 6@B}   → every node ends with k from 7@A
//! ```
//!
//! A clear is a change too: it deletes every key older than it, and its
//! version becomes the node's *clear watermark*, below which every store or
//! delete is refused. A store made after the clear has a higher version and
//! survives it.
//!
//! # Anti-entropy
//!
//! Relaying is fast but can miss: a node may be down, or a connection may
//! break mid-stream. So nodes also compare what they hold. Each node sends
//! its peers a [`summary_hash`] of its (key, version, tombstone) list and
//! clear watermark, when a connection opens and then periodically. A node
//! whose own hash differs answers with its full list (the digest), and each
//! side works out with [`repairs`] what the other has that it lacks: a newer
//! file to pull, a newer tombstone or clear to apply. Since both sides do
//! this, both end with the newer of each key. When nothing differs, one small
//! frame per interval is all anti-entropy costs.
//!
//! Not implemented: tombstones are kept forever (no garbage collection);
//! versions do not detect concurrent writes (one of them silently wins);
//! membership has no failure detector beyond TCP itself; a node holds every
//! file (full replication, no partitioning).

use std::collections::{HashSet, VecDeque};

use sha1::{Digest, Sha1};

use crate::frame::{DigestEntry, Sha1Digest};
use crate::version::{NodeId, Version};

/// How many change ids a node remembers. A duplicate older than this many
/// changes is still dropped by the version check ([`wins`]); the seen-set
/// only saves the work of streaming it.
pub const SEEN_CAPACITY: usize = 1 << 16;

/// Last writer wins: whether a change at `incoming` should replace what a
/// node holds for its key (`held`, `None` if nothing), given the node's
/// clear watermark `cleared`.
pub fn wins(incoming: Version, held: Option<Version>, cleared: Version) -> bool {
    incoming > cleared && held.is_none_or(|held| incoming > held)
}

/// What to do with an incoming change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// New and newer than what the node holds: apply it, then relay it.
    Apply,
    /// Seen before: drop it (and drain its bytes, if it has any).
    Duplicate,
    /// New to us, but we hold something newer: drop it.
    Stale,
}

/// One node's gossip state: its Lamport clock and the ids it has seen.
#[derive(Debug)]
pub struct Gossip {
    /// This node's id, the second half of every version it gives out.
    node: NodeId,
    /// The Lamport clock: higher than the counter of every version this node
    /// has given out or seen.
    clock: u64,
    /// Recently seen change ids, for dropping duplicates.
    seen: HashSet<Version>,
    /// The same ids in arrival order, so the oldest can be forgotten once
    /// there are [`SEEN_CAPACITY`] of them.
    seen_order: VecDeque<Version>,
}

impl Gossip {
    /// A node's gossip state, its clock starting after `clock` (the highest
    /// counter the node's store holds, so a restart never reuses a version).
    pub fn new(node: NodeId, clock: u64) -> Gossip {
        Gossip {
            node,
            clock,
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
        }
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The version for a new local change: ticks the clock. The change is
    /// marked seen, so it is dropped when it comes back round a loop.
    pub fn next_version(&mut self) -> Version {
        self.clock += 1;
        let version = Version {
            counter: self.clock,
            node: self.node,
        };
        self.remember(version);
        version
    }

    /// The Lamport receive rule: after seeing `version`, our next change
    /// must be ordered after it.
    pub fn observe(&mut self, version: Version) {
        self.clock = self.clock.max(version.counter);
    }

    /// Decides what to do with a change `change` arriving from a peer, given
    /// what the node holds for the key (`held`) and its clear watermark.
    /// Marks the change seen unless it is a duplicate.
    pub fn receive(&mut self, change: Version, held: Option<Version>, cleared: Version) -> Verdict {
        self.observe(change);
        // Seen it already: it came round a loop, or from two peers at once.
        if !self.remember(change) {
            return Verdict::Duplicate;
        }
        // New to us, but we hold something newer: it lost; nothing to relay.
        if !wins(change, held, cleared) {
            return Verdict::Stale;
        }
        Verdict::Apply
    }

    /// Forgets that `change` was seen: its stream broke or failed its
    /// SHA-1 check, so another copy (from another peer) must be accepted.
    pub fn forget(&mut self, change: Version) {
        // Leaving it in `seen_order` is harmless: evicting an id that is
        // no longer in `seen` does nothing.
        self.seen.remove(&change);
    }

    /// Records `change` as seen; returns false if it already was.
    fn remember(&mut self, change: Version) -> bool {
        if !self.seen.insert(change) {
            return false;
        }
        self.seen_order.push_back(change);
        if self.seen_order.len() > SEEN_CAPACITY {
            if let Some(oldest) = self.seen_order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        true
    }
}

/// The peers to relay a change to: all of `peers` except the one it came
/// from (`from`, `None` for a local change) and the node that made it.
pub fn relay_targets(peers: &[NodeId], from: Option<NodeId>, origin: NodeId) -> Vec<NodeId> {
    peers
        .iter()
        .copied()
        .filter(|peer| Some(*peer) != from && *peer != origin)
        .collect()
}

/// A fingerprint of everything a node holds: SHA-1 over the clear
/// watermark and the (key, version, tombstone) list in key order. Two nodes
/// with equal fingerprints hold the same versions of the same keys.
///
/// `entries` must be sorted by key (as [`crate::store::Store::digest`]
/// returns them).
pub fn summary_hash(cleared: Version, entries: &[DigestEntry]) -> Sha1Digest {
    let mut hasher = Sha1::new();
    hasher.update(cleared.counter.to_be_bytes());
    hasher.update(cleared.node.to_be_bytes());
    for entry in entries {
        // Length-prefix the key so ("ab","c") and ("a","bc") differ.
        hasher.update((entry.key.len() as u64).to_be_bytes());
        hasher.update(entry.key.as_bytes());
        hasher.update(entry.version.counter.to_be_bytes());
        hasher.update(entry.version.node.to_be_bytes());
        hasher.update([u8::from(entry.tombstone)]);
    }
    hasher.finalize().into()
}

/// One thing a node should do to catch up with a peer's digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Apply the peer's newer clear watermark.
    Clear(Version),
    /// Ask the peer for its newer copy of this file.
    Pull(String),
    /// Apply the peer's newer tombstone.
    Delete {
        /// The deleted key.
        key: String,
        /// The version of the delete.
        version: Version,
    },
}

/// What a node should do to catch up with a peer, given the peer's digest
/// (`remote_cleared`, `remote`) and a way to look up what the node holds
/// for a key (`held`) and its own clear watermark (`cleared`).
///
/// Only the peer's newer state is listed: where the node is newer, the peer
/// finds that out from the node's digest and pulls in turn.
pub fn repairs(
    held: impl Fn(&str) -> Option<Version>,
    cleared: Version,
    remote_cleared: Version,
    remote: &[DigestEntry],
) -> Vec<Repair> {
    let mut out = Vec::new();
    if remote_cleared > cleared {
        out.push(Repair::Clear(remote_cleared));
    }
    // Judge entries against the watermark we will have after that clear.
    let cleared = cleared.max(remote_cleared);
    for entry in remote {
        if !wins(entry.version, held(&entry.key), cleared) {
            continue;
        }
        out.push(if entry.tombstone {
            Repair::Delete {
                key: entry.key.clone(),
                version: entry.version,
            }
        } else {
            Repair::Pull(entry.key.clone())
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(counter: u64, node: u64) -> Version {
        Version { counter, node }
    }

    #[test]
    fn newer_wins_and_the_clear_watermark_refuses_older() {
        assert!(wins(v(1, 1), None, Version::ZERO));
        assert!(wins(v(2, 1), Some(v(1, 9)), Version::ZERO));
        assert!(!wins(v(1, 9), Some(v(2, 1)), Version::ZERO));
        assert!(!wins(v(2, 1), Some(v(2, 1)), Version::ZERO));
        assert!(!wins(v(3, 1), None, v(3, 1)));
        assert!(wins(v(4, 1), None, v(3, 1)));
    }

    #[test]
    fn clock_follows_the_lamport_rules() {
        let mut g = Gossip::new(7, 0);
        assert_eq!(g.next_version(), v(1, 7));
        g.observe(v(10, 3));
        assert_eq!(g.next_version(), v(11, 7));
        g.observe(v(2, 3)); // older: no effect
        assert_eq!(g.next_version(), v(12, 7));
        // A restarted node starts after what it already holds.
        assert_eq!(Gossip::new(7, 12).next_version(), v(13, 7));
    }

    #[test]
    fn receive_drops_duplicates_and_stale_changes() {
        let mut g = Gossip::new(1, 0);
        assert_eq!(g.receive(v(5, 2), None, Version::ZERO), Verdict::Apply);
        assert_eq!(g.receive(v(5, 2), None, Version::ZERO), Verdict::Duplicate);
        assert_eq!(
            g.receive(v(4, 3), Some(v(5, 2)), Version::ZERO),
            Verdict::Stale
        );
        // Our own change coming back round a loop is a duplicate.
        let mine = g.next_version();
        assert_eq!(mine, v(6, 1));
        assert_eq!(
            g.receive(mine, Some(mine), Version::ZERO),
            Verdict::Duplicate
        );
        // A forgotten change (its stream broke) is accepted again.
        g.forget(v(5, 2));
        assert_eq!(g.receive(v(5, 2), None, Version::ZERO), Verdict::Apply);
    }

    #[test]
    fn the_seen_set_is_bounded() {
        let mut g = Gossip::new(1, 0);
        for counter in 1..=(SEEN_CAPACITY as u64 + 10) {
            g.receive(v(counter, 2), None, Version::ZERO);
        }
        assert_eq!(g.seen.len(), SEEN_CAPACITY);
        assert_eq!(g.seen_order.len(), SEEN_CAPACITY);
        // The oldest were forgotten, the newest are remembered.
        assert!(!g.seen.contains(&v(1, 2)));
        assert!(g.seen.contains(&v(SEEN_CAPACITY as u64 + 10, 2)));
    }

    #[test]
    fn relay_skips_the_sender_and_the_origin() {
        assert_eq!(relay_targets(&[1, 2, 3, 4], Some(2), 3), vec![1, 4]);
        assert_eq!(relay_targets(&[1, 2], None, 9), vec![1, 2]);
    }

    fn entry(key: &str, version: Version, tombstone: bool) -> DigestEntry {
        DigestEntry {
            key: key.into(),
            version,
            tombstone,
        }
    }

    #[test]
    fn summary_hash_sees_every_field() {
        let base = vec![entry("a", v(1, 1), false), entry("b", v(2, 1), false)];
        let h = summary_hash(Version::ZERO, &base);
        assert_eq!(h, summary_hash(Version::ZERO, &base.clone()));
        assert_ne!(h, summary_hash(v(1, 1), &base));
        let mut changed = base.clone();
        changed[1].tombstone = true;
        assert_ne!(h, summary_hash(Version::ZERO, &changed));
        changed = base.clone();
        changed[0].version = v(1, 2);
        assert_ne!(h, summary_hash(Version::ZERO, &changed));
        let split = vec![entry("ab", v(1, 1), false), entry("c", v(2, 1), false)];
        let joined = vec![entry("a", v(1, 1), false), entry("bc", v(2, 1), false)];
        assert_ne!(
            summary_hash(Version::ZERO, &split),
            summary_hash(Version::ZERO, &joined)
        );
    }

    #[test]
    fn repairs_list_only_what_the_peer_has_newer() {
        let mine = |key: &str| match key {
            "same" => Some(v(3, 1)),
            "older-here" => Some(v(1, 1)),
            "newer-here" => Some(v(9, 1)),
            _ => None,
        };
        let remote = vec![
            entry("same", v(3, 1), false),
            entry("older-here", v(4, 2), false),
            entry("newer-here", v(5, 2), false),
            entry("missing-here", v(2, 2), false),
            entry("deleted-there", v(6, 2), true),
            entry("below-their-clear", v(1, 5), false),
        ];
        let got = repairs(mine, Version::ZERO, v(2, 0), &remote);
        assert_eq!(
            got,
            vec![
                Repair::Clear(v(2, 0)),
                Repair::Pull("older-here".into()),
                Repair::Pull("missing-here".into()),
                Repair::Delete {
                    key: "deleted-there".into(),
                    version: v(6, 2)
                },
            ]
        );
    }
}
