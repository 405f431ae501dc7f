//! The gossip rules, free of I/O: which change wins, the clock, what is new,
//! where to relay it, and what a digest says is missing.
//!
//! # How a change spreads
//!
//! A node that changes a key (a store, a delete) or clears everything stamps
//! the change with a fresh [`Version`] from its hybrid logical clock and
//! sends it to its peers. A node that receives a change:
//!
//! 1. moves its clock up to the change's time ([`Gossip::observe`]), so its
//!    own next change is ordered after everything it has seen;
//! 2. drops it if it has seen the change's id before — it came round a loop,
//!    or from two peers at once ([`Gossip::receive`] says `Duplicate`);
//! 3. drops it if it already holds something newer for the key (`Stale`);
//! 4. otherwise applies it and passes it on to every peer except the one it
//!    came from and the node that made it ([`relay_targets`]): a delete or
//!    a clear as it is, a store as a small announcement that a peer lacking
//!    the file fetches from (the bytes travel once per link; see `server`).
//!
//! A change's id is its version: each node gives out each time once, and
//! the node id is in the version, so no two changes share one. Step 2 keeps
//! a mesh from echoing a change forever; step 3 makes the outcome independent
//! of the order changes arrive in.
//!
//! # The clock
//!
//! A version's time is wall-clock milliseconds with a logical counter below
//! them (see `version`). The rule is one line ([`Gossip::next_version`]):
//! a new change gets the wall clock if that is ahead of every time the node
//! has given out or seen, else one tick past the newest. So:
//!
//! - a write made later in real time than another, by more than the skew
//!   between the two nodes' clocks, gets the higher version and wins, however
//!   many writes the other side made (a Lamport counter would let the busier
//!   side win);
//! - a node never gives out a version below one it has seen, so a change it
//!   makes after hearing of another is ordered after it, whatever the clocks;
//! - a restarted node starts from the newest version on its disk, so a clock
//!   set back while it was down cannot take it back in time.
//!
//! The assumption: honest nodes' clocks agree to within a small skew (NTP
//! keeps them within milliseconds). Two writes closer together than the
//! skew are ordered arbitrarily, but the same way on every node. A version
//! more than [`MAX_CLOCK_AHEAD_MILLIS`] ahead of a node's wall clock is
//! refused as `Implausible`, with a log line: a clock that far off is broken
//! or hostile, and following it would make this node's writes lose to it.
//!
//! # Last writer wins
//!
//! Versions are totally ordered (time, then node id), and a node moves a
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
//! A: {store k 1005.0@A}   B: {delete k 1006.0@B}   → tombstone k 1006.0@B everywhere
//! A: {store k 1007.0@A}   B: {delete k 1006.0@B}   → k from 1007.0@A everywhere
//! ```
//!
//! A clear is a change too: it deletes every key older than it, and its
//! version becomes the node's *clear watermark*, below which every store or
//! delete is refused. A store made after the clear, anywhere, has a higher
//! version and survives it; one made before it, anywhere, is removed.
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
//! Tombstones expire after a grace period (`hardening::tombstones`), and a
//! peer silent for the heartbeat timeout is taken for dead
//! (`hardening::liveness`): those live outside these rules.
//!
//! Not implemented: versions do not detect concurrent writes (one of them
//! silently wins); a node holds every file (full replication, no
//! partitioning).

use std::collections::{HashSet, VecDeque};

use sha1::{Digest, Sha1};

use crate::frame::{DigestEntry, Sha1Digest};
use crate::support::version::{LOGICAL_BITS, NodeId, Version};

/// How many change ids a node remembers. A duplicate older than this many
/// changes is still dropped by the version check ([`wins`]); the seen-set
/// only saves the work of streaming it.
pub const SEEN_CAPACITY: usize = 1 << 16;

/// How far ahead of this node's wall clock a version may be, in
/// milliseconds. The clocks of honest nodes agree to well within this (NTP
/// keeps them within milliseconds); a version further ahead comes from a
/// clock that is badly wrong, or a hostile peer, and accepting it would
/// drag this node's clock forward with it: every later write here would
/// carry that wrong time, and a correct node's writes would lose to them.
pub const MAX_CLOCK_AHEAD_MILLIS: u64 = 60_000;

/// Wall-clock milliseconds as a hybrid time with a zero counter.
fn hybrid(millis: u64) -> u64 {
    millis.min(u64::MAX >> LOGICAL_BITS) << LOGICAL_BITS
}

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
    /// Its time is implausibly far ahead of our wall clock
    /// ([`MAX_CLOCK_AHEAD_MILLIS`]): refuse it, and do not let it move the
    /// clock.
    Implausible,
}

/// One node's gossip state: its hybrid logical clock and the ids it has
/// seen.
#[derive(Debug)]
pub struct Gossip {
    /// This node's id, the second half of every version it gives out.
    node: NodeId,
    /// The hybrid logical clock: the highest time this node has given out
    /// or seen. The next local change gets a time above it.
    clock: u64,
    /// Recently seen change ids, for dropping duplicates.
    seen: HashSet<Version>,
    /// The same ids in arrival order, so the oldest can be forgotten once
    /// there are [`SEEN_CAPACITY`] of them.
    seen_order: VecDeque<Version>,
}

impl Gossip {
    /// A node's gossip state, its clock at `clock`: the highest time the
    /// node's store holds, so a restart never gives out a version below one
    /// it gave out (or took in) before, whatever its wall clock says.
    pub fn new(node: NodeId, clock: u64) -> Gossip {
        Gossip { node, clock, seen: HashSet::new(), seen_order: VecDeque::new() }
    }

    /// The version for a new local change made at wall-clock time `now`
    /// (milliseconds). The change is marked seen, so it is dropped when it
    /// comes back round a loop.
    pub fn next_version(&mut self, now: u64) -> Version {
        // The hybrid clock's rule: the wall clock, if it is ahead of every
        // time seen; else one tick past the newest (the logical counter
        // goes up, and carries into the milliseconds if it overflows).
        // `observe` keeps the clock near real time, so the add cannot
        // saturate in practice; saturating keeps a bug from panicking.
        self.clock = hybrid(now).max(self.clock.saturating_add(1));
        let version = Version { time: self.clock, node: self.node };
        self.remember(version);
        version
    }

    /// Takes in a version seen from a peer at wall-clock time `now`: our
    /// next change must be ordered after it. Returns false, and leaves the
    /// clock alone, for a version more than [`MAX_CLOCK_AHEAD_MILLIS`]
    /// ahead of `now`: the caller must then refuse whatever carried it.
    pub fn observe(&mut self, version: Version, now: u64) -> bool {
        if version.time > hybrid(now.saturating_add(MAX_CLOCK_AHEAD_MILLIS)) {
            return false;
        }
        self.clock = self.clock.max(version.time);
        true
    }

    /// Decides what to do with a change `change` arriving from a peer at
    /// wall-clock time `now`, given what the node holds for the key
    /// (`held`) and its clear watermark. Marks the change seen unless it is
    /// a duplicate.
    pub fn receive(
        &mut self,
        change: Version,
        held: Option<Version>,
        cleared: Version,
        now: u64,
    ) -> Verdict {
        // From a clock no honest node could have: refuse before it counts.
        if !self.observe(change, now) {
            return Verdict::Implausible;
        }
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
        // It stays in `seen_order`. If it is seen again before that stale
        // entry reaches the front, the entry evicts it a little early: the
        // id is then forgotten sooner than others, which the version check
        // (`wins`) makes harmless.
        self.seen.remove(&change);
    }

    /// Records `change` as seen; returns false if it already was.
    fn remember(&mut self, change: Version) -> bool {
        if !self.seen.insert(change) {
            return false;
        }
        self.seen_order.push_back(change);
        if self.seen_order.len() > SEEN_CAPACITY
            && let Some(oldest) = self.seen_order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        true
    }
}

/// The peers to relay a change to: all of `peers` except the one it came
/// from (`from`, `None` for a local change) and the node that made it.
pub fn relay_targets(peers: &[NodeId], from: Option<NodeId>, origin: NodeId) -> Vec<NodeId> {
    peers.iter().copied().filter(|peer| Some(*peer) != from && *peer != origin).collect()
}

/// A fingerprint of everything a node holds: SHA-1 over the clear
/// watermark and the (key, version, tombstone) list in key order. Two nodes
/// with equal fingerprints hold the same versions of the same keys.
///
/// `entries` must be sorted by key (as `Store::digest`
/// returns them).
pub fn summary_hash(cleared: Version, entries: &[DigestEntry]) -> Sha1Digest {
    let mut hasher = Sha1::new();
    hasher.update(cleared.time.to_be_bytes());
    hasher.update(cleared.node.to_be_bytes());
    for entry in entries {
        // Length-prefix the key so ("ab","c") and ("a","bc") differ.
        hasher.update((entry.key.len() as u64).to_be_bytes());
        hasher.update(entry.key.as_bytes());
        hasher.update(entry.version.time.to_be_bytes());
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
    /// Fetch the peer's newer copy of this file.
    Pull {
        key: String,
        /// The version the peer holds.
        version: Version,
    },
    /// Apply the peer's newer tombstone.
    Delete {
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
            Repair::Delete { key: entry.key.clone(), version: entry.version }
        } else {
            Repair::Pull { key: entry.key.clone(), version: entry.version }
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(time: u64, node: u64) -> Version {
        Version { time, node }
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

    /// A hybrid time: `millis` on the wall clock, `logical` ticks past it.
    fn at(millis: u64, logical: u64) -> u64 {
        (millis << LOGICAL_BITS) | logical
    }

    #[test]
    fn clock_follows_the_hybrid_rules() {
        let mut g = Gossip::new(7, 0);
        // The wall clock leads: the version is the wall clock.
        assert_eq!(g.next_version(1000), v(at(1000, 0), 7));
        // Twice in one millisecond: the logical counter orders them.
        assert_eq!(g.next_version(1000), v(at(1000, 1), 7));
        // A peer's clock is ahead of ours: our next change goes past it,
        // although our own wall clock has not got there yet.
        assert!(g.observe(v(at(1500, 3), 2), 1001));
        assert_eq!(g.next_version(1002), v(at(1500, 4), 7));
        // Older versions move nothing; the wall clock takes over again as
        // soon as it passes everything seen.
        assert!(g.observe(v(at(10, 0), 2), 1003));
        assert_eq!(g.next_version(1600), v(at(1600, 0), 7));
    }

    #[test]
    fn a_restart_never_goes_back_in_time() {
        // Before the restart the node wrote at 5000 ms; it restarts with
        // its wall clock set back to 4000 ms. Its clock starts from what its
        // disk holds, so its next version is still the newer one.
        let mut before = Gossip::new(7, 0);
        let last = before.next_version(5000);
        let mut after = Gossip::new(7, last.time);
        let next = after.next_version(4000);
        assert!(next > last, "{next} after {last}");
    }

    #[test]
    fn receive_drops_duplicates_and_stale_changes() {
        let mut g = Gossip::new(1, 0);
        assert_eq!(g.receive(v(5, 2), None, Version::ZERO, 0), Verdict::Apply);
        assert_eq!(g.receive(v(5, 2), None, Version::ZERO, 0), Verdict::Duplicate);
        assert_eq!(g.receive(v(4, 3), Some(v(5, 2)), Version::ZERO, 0), Verdict::Stale);
        // Our own change coming back round a loop is a duplicate.
        let mine = g.next_version(0);
        assert_eq!(mine, v(6, 1));
        assert_eq!(g.receive(mine, Some(mine), Version::ZERO, 0), Verdict::Duplicate);
        // A forgotten change (its stream broke) is accepted again.
        g.forget(v(5, 2));
        assert_eq!(g.receive(v(5, 2), None, Version::ZERO, 0), Verdict::Apply);
    }

    #[test]
    fn the_seen_set_is_bounded() {
        let mut g = Gossip::new(1, 0);
        for time in 1..=(SEEN_CAPACITY as u64 + 10) {
            g.receive(v(time, 2), None, Version::ZERO, 0);
        }
        assert_eq!(g.seen.len(), SEEN_CAPACITY);
        assert_eq!(g.seen_order.len(), SEEN_CAPACITY);
        // The oldest were forgotten, the newest are remembered.
        assert!(!g.seen.contains(&v(1, 2)));
        assert!(g.seen.contains(&v(SEEN_CAPACITY as u64 + 10, 2)));
    }

    #[test]
    fn a_version_far_ahead_of_the_wall_clock_is_refused_and_does_not_move_it() {
        let now = 1_000_000;
        let mut g = Gossip::new(1, 0);
        assert_eq!(g.receive(v(u64::MAX, 2), None, Version::ZERO, now), Verdict::Implausible);
        let limit = now + MAX_CLOCK_AHEAD_MILLIS;
        assert!(!g.observe(v(at(limit, 1), 2), now));
        assert_eq!(g.next_version(now), v(at(now, 0), 1), "the clock did not move");
        // Just within the bound is a clock that runs a little fast.
        assert!(g.observe(v(at(limit, 0), 2), now));
        assert_eq!(g.next_version(now), v(at(limit, 1), 1));
    }

    #[test]
    fn relay_skips_the_sender_and_the_origin() {
        assert_eq!(relay_targets(&[1, 2, 3, 4], Some(2), 3), vec![1, 4]);
        assert_eq!(relay_targets(&[1, 2], None, 9), vec![1, 2]);
    }

    fn pull(key: &str, version: Version) -> Repair {
        Repair::Pull { key: key.into(), version }
    }

    fn entry(key: &str, version: Version, tombstone: bool) -> DigestEntry {
        DigestEntry { key: key.into(), version, tombstone }
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
        assert_ne!(summary_hash(Version::ZERO, &split), summary_hash(Version::ZERO, &joined));
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
                pull("older-here", v(4, 2)),
                pull("missing-here", v(2, 2)),
                Repair::Delete { key: "deleted-there".into(), version: v(6, 2) },
            ]
        );
    }

    // -----------------------------------------------------------------------
    // Several replicas stepped by hand
    //
    // The rules above, wired together the way `server` wires them, with the
    // network replaced by a list of messages in flight that each test
    // delivers in an order of its choosing: reordered, duplicated or lost.
    // No sockets, no disk, no threads, so every interleaving is repeatable.
    // -----------------------------------------------------------------------

    use std::collections::BTreeMap;

    /// A change as it travels between replicas.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Change {
        Store(String, Version),
        Delete(String, Version),
        Clear(Version),
    }

    impl Change {
        fn version(&self) -> Version {
            match self {
                Change::Store(_, version) | Change::Delete(_, version) => *version,
                Change::Clear(version) => *version,
            }
        }
    }

    /// One change on its way from one replica to a peer.
    #[derive(Clone, Debug)]
    struct Message {
        from: NodeId,
        to: NodeId,
        change: Change,
    }

    /// What a replica holds: key → (version, tombstone).
    type Files = BTreeMap<String, (Version, bool)>;

    /// One node without sockets or a disk: its gossip state, its peers, and
    /// what its store would hold.
    struct Replica {
        gossip: Gossip,
        peers: Vec<NodeId>,
        files: Files,
        /// The clear watermark.
        cleared: Version,
        /// Changes received from peers and applied, in arrival order.
        applied: Vec<Version>,
        /// Changes received from peers and dropped as duplicates.
        duplicates: Vec<Version>,
        /// Changes received from peers and dropped as stale.
        stale: Vec<Version>,
    }

    impl Replica {
        fn held(&self, key: &str) -> Option<Version> {
            self.files.get(key).map(|(version, _)| *version)
        }

        fn is_live(&self, key: &str) -> bool {
            self.files.get(key).is_some_and(|(_, tombstone)| !tombstone)
        }

        /// What `Store::commit`, `Store::delete` and `Store::clear` do: move
        /// a key (or the watermark) only forward. Returns whether it moved.
        fn apply(&mut self, change: &Change) -> bool {
            match change {
                Change::Store(key, version) | Change::Delete(key, version) => {
                    if !wins(*version, self.held(key), self.cleared) {
                        return false;
                    }
                    let tombstone = matches!(change, Change::Delete(..));
                    self.files.insert(key.clone(), (*version, tombstone));
                    true
                }
                Change::Clear(version) => {
                    if *version <= self.cleared {
                        return false;
                    }
                    self.cleared = *version;
                    self.files.retain(|_, (held, _)| *held > *version);
                    true
                }
            }
        }

        /// Everything held, sorted by key, as `Store::digest` lists it.
        fn digest(&self) -> Vec<DigestEntry> {
            let files = self.files.iter();
            files.map(|(key, (version, tombstone))| entry(key, *version, *tombstone)).collect()
        }

        fn summary(&self) -> Sha1Digest {
            summary_hash(self.cleared, &self.digest())
        }
    }

    /// Replicas and the messages in flight between them, on a simulated
    /// wall clock.
    struct Cluster {
        replicas: BTreeMap<NodeId, Replica>,
        in_flight: Vec<Message>,
        /// Real time, in milliseconds. Stays 0 unless a test moves it, so
        /// clocks then tick by their logical counter alone.
        now: u64,
        /// How far each replica's wall clock is off real time, in ms.
        skew: BTreeMap<NodeId, i64>,
    }

    impl Cluster {
        /// Replicas 1..=n, connected along `edges` (each edge both ways).
        fn new(n: u64, edges: &[(NodeId, NodeId)]) -> Cluster {
            let replicas = (1..=n).map(|node| {
                let peers = edges
                    .iter()
                    .filter_map(|&(a, b)| match node {
                        _ if node == a => Some(b),
                        _ if node == b => Some(a),
                        _ => None,
                    })
                    .collect();
                let replica = Replica {
                    gossip: Gossip::new(node, 0),
                    peers,
                    files: Files::new(),
                    cleared: Version::ZERO,
                    applied: Vec::new(),
                    duplicates: Vec::new(),
                    stale: Vec::new(),
                };
                (node, replica)
            });
            Cluster {
                replicas: replicas.collect(),
                in_flight: Vec::new(),
                now: 0,
                skew: BTreeMap::new(),
            }
        }

        /// What `node`'s wall clock reads now.
        fn wall(&self, node: NodeId) -> u64 {
            let skew = self.skew.get(&node).copied().unwrap_or(0);
            self.now.saturating_add_signed(skew)
        }

        /// `node` restarts on its disk: its seen-set is gone, and its clock
        /// starts from the newest version it holds.
        fn restart(&mut self, node: NodeId) {
            let replica = self.replica(node);
            let newest = replica.files.values().map(|(version, _)| version.time);
            let clock = newest.fold(replica.cleared.time, u64::max);
            replica.gossip = Gossip::new(node, clock);
        }

        fn replica(&mut self, node: NodeId) -> &mut Replica {
            self.replicas.get_mut(&node).expect("no such replica")
        }

        fn store(&mut self, node: NodeId, key: &str) -> Version {
            self.local(node, |version| Change::Store(key.into(), version))
        }

        /// A delete, made (as `FileServer::delete` allows) only of a live key.
        fn delete(&mut self, node: NodeId, key: &str) -> Version {
            assert!(self.replica(node).is_live(key), "{node} deletes {key:?}");
            self.local(node, |version| Change::Delete(key.into(), version))
        }

        fn clear(&mut self, node: NodeId) -> Version {
            self.local(node, Change::Clear)
        }

        /// A change made at `node`: a fresh version, applied locally, sent
        /// to every peer.
        fn local(&mut self, node: NodeId, make: impl FnOnce(Version) -> Change) -> Version {
            let wall = self.wall(node);
            let replica = self.replica(node);
            let change = make(replica.gossip.next_version(wall));
            assert!(replica.apply(&change), "a local change always applies");
            let version = change.version();
            self.relay(node, None, change);
            version
        }

        /// Queues `change` from `at` to its relay targets.
        fn relay(&mut self, at: NodeId, from: Option<NodeId>, change: Change) {
            let peers = &self.replicas[&at].peers;
            for to in relay_targets(peers, from, change.version().node) {
                let change = change.clone();
                self.in_flight.push(Message { from: at, to, change });
            }
        }

        /// Delivers (and removes) the message at `index`.
        fn deliver(&mut self, index: usize) -> Verdict {
            let message = self.in_flight.remove(index);
            self.receive(message)
        }

        /// Delivers a copy of the message at `index`, leaving it in flight
        /// to arrive again later: a duplicate.
        fn deliver_copy(&mut self, index: usize) -> Verdict {
            let message = self.in_flight[index].clone();
            self.receive(message)
        }

        /// What a reader thread does with a change: ask the rules, apply,
        /// relay to all but the sender and the origin.
        fn receive(&mut self, message: Message) -> Verdict {
            let Message { from, to, change } = message;
            let wall = self.wall(to);
            let replica = self.replica(to);
            let held = match &change {
                Change::Store(key, _) | Change::Delete(key, _) => replica.held(key),
                Change::Clear(_) => None,
            };
            let verdict = replica.gossip.receive(change.version(), held, replica.cleared, wall);
            match verdict {
                Verdict::Apply => {
                    assert!(replica.apply(&change), "an Apply verdict must apply");
                    replica.applied.push(change.version());
                    self.relay(to, Some(from), change);
                }
                Verdict::Duplicate => replica.duplicates.push(change.version()),
                Verdict::Stale => replica.stale.push(change.version()),
                Verdict::Implausible => panic!("honest test clocks never jump that far"),
            }
            verdict
        }

        /// The index of the first message in flight that `wanted` accepts.
        fn find(&self, wanted: impl Fn(&Message) -> bool) -> usize {
            let found = self.in_flight.iter().position(wanted);
            found.expect("no such message in flight")
        }

        /// Delivers until nothing is in flight, `pick` choosing each next
        /// message. Returns how many were delivered.
        fn run(&mut self, mut pick: impl FnMut(&[Message]) -> usize) -> usize {
            let mut delivered = 0;
            while !self.in_flight.is_empty() {
                let index = pick(&self.in_flight);
                self.deliver(index);
                delivered += 1;
            }
            delivered
        }

        /// Delivers in the order sent.
        fn run_in_order(&mut self) -> usize {
            self.run(|_| 0)
        }

        /// Anti-entropy between two replicas, as `server` does it: compare
        /// summaries; if they differ, each side catches up from the other's
        /// digest. Returns whether they differed.
        fn anti_entropy(&mut self, a: NodeId, b: NodeId) -> bool {
            if self.replicas[&a].summary() == self.replicas[&b].summary() {
                return false;
            }
            self.catch_up(a, b);
            self.catch_up(b, a);
            true
        }

        /// `node` carries out the repairs that `peer`'s digest calls for
        /// (as `server::on_digest` does, a pull answered with what the peer
        /// holds); returns them.
        fn catch_up(&mut self, node: NodeId, peer: NodeId) -> Vec<Repair> {
            let remote = &self.replicas[&peer];
            let remote_cleared = remote.cleared;
            let remote_digest = remote.digest();
            let remote_files = remote.files.clone();
            let wall = self.wall(node);
            let replica = self.replica(node);
            if let Some(newest) = remote_digest.iter().map(|e| e.version).max() {
                replica.gossip.observe(newest.max(remote_cleared), wall);
            }
            let held = |key: &str| replica.held(key);
            let todo = repairs(held, replica.cleared, remote_cleared, &remote_digest);
            for repair in &todo {
                let change = match repair {
                    Repair::Clear(version) => Change::Clear(*version),
                    Repair::Delete { key, version } => Change::Delete(key.clone(), *version),
                    Repair::Pull { key, .. } => {
                        let (version, tombstone) = remote_files[key];
                        assert!(!tombstone, "a pull is only listed for a live file");
                        Change::Store(key.clone(), version)
                    }
                };
                assert!(replica.apply(&change), "{repair:?} changed nothing");
            }
            todo
        }

        /// Every replica holds the same keys at the same versions with the
        /// same watermark, and so has the same summary.
        fn assert_converged(&self, context: &str) {
            let mut replicas = self.replicas.iter();
            let (first, reference) = replicas.next().expect("a cluster has replicas");
            for (node, replica) in replicas {
                assert_eq!(
                    (replica.cleared, &replica.files),
                    (reference.cleared, &reference.files),
                    "{context}: replica {node} differs from replica {first}"
                );
                assert_eq!(replica.summary(), reference.summary(), "{context}");
            }
        }
    }

    /// A small deterministic random number generator (splitmix64), so a
    /// failing schedule can be replayed from its seed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % n as u64) as usize
        }

        /// Any message in flight: arbitrary reordering.
        fn any(&mut self, in_flight: &[Message]) -> usize {
            self.below(in_flight.len())
        }

        /// The oldest message of a random link: what TCP allows, each
        /// connection in order, the connections racing each other.
        fn per_link(&mut self, in_flight: &[Message]) -> usize {
            let heads: Vec<usize> = (0..in_flight.len())
                .filter(|&i| {
                    let link = |m: &Message| (m.from, m.to);
                    !in_flight[..i].iter().any(|m| link(m) == link(&in_flight[i]))
                })
                .collect();
            heads[self.below(heads.len())]
        }
    }

    #[test]
    fn a_store_and_a_delete_that_cross_end_the_same_in_either_order() {
        // A triangle. Replica 1 overwrites k while replica 2, not having
        // seen that, deletes it; the higher version wins everywhere.
        for store_is_newer in [false, true] {
            let mut outcomes = Vec::new();
            for store_first in [true, false] {
                let mut c = Cluster::new(3, &[(1, 2), (2, 3), (1, 3)]);
                c.store(1, "k");
                c.run_in_order();
                if store_is_newer {
                    // Replica 1 has heard of a later change elsewhere.
                    c.replica(1).gossip.observe(v(10, 9), 0);
                }
                let store = c.store(1, "k");
                let delete = c.delete(2, "k");
                assert_eq!(store > delete, store_is_newer);
                // Every copy of one change is delivered before any copy of
                // the other: replica 3 sees them in that order.
                let first = if store_first { store } else { delete };
                c.run(|m| {
                    let first = m.iter().position(|m| m.change.version() == first);
                    first.unwrap_or(0)
                });
                let context = format!("store_is_newer={store_is_newer} store_first={store_first}");
                c.assert_converged(&context);
                let expected = if store_is_newer { (store, false) } else { (delete, true) };
                assert_eq!(c.replicas[&3].files["k"], expected, "{context}");
                outcomes.push(c.replicas[&3].files.clone());
            }
            assert_eq!(outcomes[0], outcomes[1], "store_is_newer={store_is_newer}");
        }
    }

    #[test]
    fn a_change_delivered_twice_is_applied_and_relayed_once() {
        // A line, 1 - 2 - 3, so every message is the receiver's first copy
        // and the second copy can only be a duplicate.
        let mut c = Cluster::new(3, &[(1, 2), (2, 3)]);
        let mut delivered = 0;
        let mut deliver_each_twice = |c: &mut Cluster| {
            while !c.in_flight.is_empty() {
                let before = c.in_flight.len();
                assert_eq!(c.deliver_copy(0), Verdict::Apply, "{:?}", c.in_flight[0]);
                let relayed = c.in_flight.len() - before;
                assert_eq!(c.deliver(0), Verdict::Duplicate);
                // The duplicate queued nothing more.
                assert_eq!(c.in_flight.len(), before - 1 + relayed);
                delivered += 1;
            }
        };
        let stored = c.store(1, "k");
        deliver_each_twice(&mut c);
        let deleted = c.delete(3, "k");
        deliver_each_twice(&mut c);
        let cleared = c.clear(2);
        deliver_each_twice(&mut c);
        // 1→2 store, 2→3 store, 3→2 delete, 2→1 delete, 2→1 clear, 2→3 clear.
        assert_eq!(delivered, 6);
        c.assert_converged("duplicated");
        assert_eq!(c.replicas[&1].applied, vec![deleted, cleared]);
        assert_eq!(c.replicas[&2].applied, vec![stored, deleted]);
        assert_eq!(c.replicas[&3].applied, vec![stored, cleared]);
        for replica in c.replicas.values() {
            assert_eq!(replica.duplicates, replica.applied);
        }

        // A copy so late that the seen-set has forgotten it is still
        // dropped, by the version check, and changes nothing.
        c.replica(3).gossip.forget(stored);
        let late = Message { from: 2, to: 3, change: Change::Store("k".into(), stored) };
        assert_eq!(c.receive(late), Verdict::Stale);
        assert!(c.in_flight.is_empty());
        c.assert_converged("after a late copy");
    }

    #[test]
    fn a_clear_removes_what_is_older_and_spares_a_store_made_after_it() {
        for clear_first in [true, false] {
            let mut c = Cluster::new(3, &[(1, 2), (2, 3), (1, 3)]);
            c.store(1, "old");
            c.run_in_order();
            let clear = c.clear(3);
            // Replica 2 hears of the clear, then stores: its store is newer.
            let to_2 = c.find(|m| m.change == Change::Clear(clear) && m.to == 2);
            assert_eq!(c.deliver(to_2), Verdict::Apply);
            let new = c.store(2, "new");
            assert!(new > clear);
            // Replica 1 stores without having heard of the clear: the two
            // are concurrent, and the tie on the counter goes to the higher
            // node id, the clear's. The store is wiped even where it was made.
            let racer = c.store(1, "racer");
            assert!(racer < clear);
            // Replica 1 gets the store made after the clear before the clear
            // itself, or the other way round.
            let first = if clear_first { clear } else { new };
            c.run(|m| {
                let first = m.iter().position(|m| m.change.version() == first);
                first.unwrap_or(0)
            });
            let context = format!("clear_first={clear_first}");
            c.assert_converged(&context);
            let replica = &c.replicas[&1];
            assert_eq!(replica.cleared, clear, "{context}");
            let keys: Vec<&String> = replica.files.keys().collect();
            assert_eq!(keys, ["new"], "{context}");
        }
    }

    #[test]
    fn a_ring_of_three_applies_every_change_exactly_once_per_replica() {
        let mut all_duplicates = 0;
        for seed in 0..300 {
            let mut rng = Rng(seed);
            let mut c = Cluster::new(3, &[(1, 2), (2, 3), (3, 1)]);
            let mut made = Vec::new();
            // Each replica stores, overwrites and deletes keys of its own,
            // while messages move on at random, one TCP-like link at a time.
            // (Changes to one key come from one replica, so none is stale:
            // per-link order is enough for every copy to arrive in order.)
            for step in 0..18 {
                let node = step % 3 + 1;
                let key = format!("{node}-{}", step / 9);
                let version =
                    if step % 9 >= 6 { c.delete(node, &key) } else { c.store(node, &key) };
                made.push(version);
                for _ in 0..rng.below(c.in_flight.len() + 1) {
                    let next = rng.per_link(&c.in_flight);
                    c.deliver(next);
                }
            }
            let delivered = c.run(|m| rng.per_link(m));
            assert!(delivered > 0);
            c.assert_converged(&format!("seed {seed}"));
            for (node, replica) in &c.replicas {
                let mut expected: Vec<Version> =
                    made.iter().filter(|v| v.node != *node).copied().collect();
                let mut applied = replica.applied.clone();
                expected.sort();
                applied.sort();
                assert_eq!(applied, expected, "seed {seed} replica {node}");
            }
            // Each change goes out twice from its origin and is relayed at
            // most once per other replica: at most 4 copies for 2 applies.
            let duplicates: usize = c.replicas.values().map(|r| r.duplicates.len()).sum();
            assert!(duplicates <= 2 * made.len(), "seed {seed}: {duplicates} duplicates");
            all_duplicates += duplicates;
        }
        assert!(all_duplicates > 0, "no schedule sent a change both ways round");
    }

    #[test]
    fn any_order_with_duplicates_converges() {
        // Messages reordered freely (not just per link) and some delivered
        // twice: changes may now arrive stale, but everyone still agrees.
        let (mut all_stale, mut all_duplicates) = (0, 0);
        for seed in 0..300 {
            let mut rng = Rng(seed);
            let mut c = Cluster::new(4, &[(1, 2), (2, 3), (3, 4), (4, 1), (1, 3)]);
            for _ in 0..20 {
                let node = rng.below(4) as NodeId + 1;
                let key = format!("k{}", rng.below(4));
                let _version = match rng.below(10) {
                    0 => c.clear(node),
                    1..=3 if c.replica(node).is_live(&key) => c.delete(node, &key),
                    _ => c.store(node, &key),
                };
                for _ in 0..rng.below(c.in_flight.len() + 1) {
                    let next = rng.any(&c.in_flight);
                    if rng.below(4) == 0 {
                        c.deliver_copy(next);
                    } else {
                        c.deliver(next);
                    }
                }
            }
            c.run(|m| rng.any(m));
            c.assert_converged(&format!("seed {seed}"));
            all_stale += c.replicas.values().map(|r| r.stale.len()).sum::<usize>();
            all_duplicates += c.replicas.values().map(|r| r.duplicates.len()).sum::<usize>();
        }
        // The schedules did exercise both guards.
        assert!(all_stale > 0 && all_duplicates > 0);
    }

    /// Skewed clocks, moving in real time: each replica's wall clock is
    /// off by up to `SKEW` ms, and each change happens `STEP` ms after the
    /// last. A change made later in real time by more than the skew beats
    /// every earlier one, however busy the earlier writers were and
    /// whatever order the messages arrive in.
    #[test]
    fn with_skewed_clocks_the_later_write_wins_in_any_schedule() {
        const SKEW: i64 = 5;
        const STEP: u64 = 2 * SKEW as u64 + 1;
        for seed in 0..200 {
            let mut rng = Rng(seed);
            let mut c = Cluster::new(4, &[(1, 2), (2, 3), (3, 4), (4, 1)]);
            c.now = 1_000_000;
            for node in 1..=4 {
                c.skew.insert(node, rng.below(2 * SKEW as usize + 1) as i64 - SKEW);
            }
            // Writes to one key from random replicas; only some messages
            // get through between them (a partition, a slow link).
            let mut last = (Version::ZERO, false);
            for _ in 0..12 {
                c.now += STEP;
                let node = rng.below(4) as NodeId + 1;
                last = if rng.below(3) == 0 && c.replica(node).is_live("k") {
                    (c.delete(node, "k"), true)
                } else {
                    (c.store(node, "k"), false)
                };
                for _ in 0..rng.below(c.in_flight.len() + 1) {
                    let next = rng.any(&c.in_flight);
                    c.deliver(next);
                }
            }
            c.run(|m| rng.any(m));
            c.assert_converged(&format!("seed {seed}"));
            assert_eq!(c.replicas[&1].files["k"], last, "seed {seed}: the last write won");
        }
    }

    /// The failure a Lamport clock had: replica 1 makes fifty changes while
    /// cut off from replica 2, which then writes the key once, later in
    /// real time. The later write wins, as it would on one machine.
    #[test]
    fn after_a_partition_the_later_write_wins_not_the_busier_side() {
        let mut c = Cluster::new(2, &[(1, 2)]);
        c.now = 1_000_000;
        c.skew.insert(2, -3); // replica 2's clock runs 3 ms slow
        let mut busy = Version::ZERO;
        for _ in 0..50 {
            busy = c.store(1, "k");
        }
        c.now += 10;
        let later = c.store(2, "k");
        assert!(later > busy, "{later} after {busy}");
        c.run(|m| m.len() - 1); // the heal: newest first, for good measure
        c.assert_converged("after the heal");
        assert_eq!(c.replicas[&1].files["k"], (later, false));
    }

    /// A clear on one side of a partition removes what is older than it,
    /// and spares a store the other side made later in real time.
    #[test]
    fn a_clear_spares_a_later_store_from_the_other_side_of_a_partition() {
        let mut c = Cluster::new(2, &[(1, 2)]);
        c.now = 1_000_000;
        let old = c.store(2, "old");
        c.run_in_order();
        let clear = c.clear(1);
        c.now += 10;
        let new = c.store(2, "new"); // replica 2 has not heard of the clear
        assert!(old < clear && clear < new);
        c.run_in_order();
        c.assert_converged("after the heal");
        let keys: Vec<&String> = c.replicas[&1].files.keys().collect();
        assert_eq!(keys, ["new"]);
    }

    /// A replica restarts with its wall clock set back by ten seconds, and
    /// writes right away: the write still beats everything it held.
    #[test]
    fn a_write_right_after_a_restart_beats_what_the_cluster_held() {
        let mut c = Cluster::new(3, &[(1, 2), (2, 3)]);
        c.now = 1_000_000;
        for _ in 0..20 {
            c.now += 1;
            c.store(1, "k");
            c.run_in_order();
        }
        let before = c.replicas[&3].files["k"].0;
        c.restart(3);
        c.skew.insert(3, -10_000);
        c.now += 1;
        let after = c.store(3, "k");
        assert!(after > before, "{after} after {before}");
        c.run_in_order();
        c.assert_converged("after the restart");
        assert_eq!(c.replicas[&1].files["k"], (after, false));
    }

    #[test]
    fn anti_entropy_brings_a_replica_that_missed_changes_up_to_date() {
        // Replicas 1 and 2 gossip; replica 3 has no live connection and
        // only ever hears of anything through anti-entropy.
        let mut c = Cluster::new(3, &[(1, 2)]);
        for key in ["a", "b", "c"] {
            c.store(1, key);
        }
        c.run_in_order();
        assert!(c.anti_entropy(1, 3));
        assert!(!c.anti_entropy(1, 3), "equal summaries: nothing to do");
        assert_eq!(c.replicas[&3].files, c.replicas[&1].files);

        // Replica 3 is cut off while the others change things, and makes a
        // change of its own.
        let deleted = c.delete(1, "a");
        let b = c.store(2, "b");
        let d = c.store(2, "d");
        c.run_in_order();
        let e = c.store(3, "e");
        assert_ne!(c.replicas[&1].summary(), c.replicas[&3].summary());
        // Each side lists exactly what the other has newer.
        let got = c.catch_up(3, 1);
        assert_eq!(
            got,
            vec![Repair::Delete { key: "a".into(), version: deleted }, pull("b", b), pull("d", d),]
        );
        assert_eq!(c.catch_up(1, 3), vec![pull("e", e)]);
        assert_eq!(c.replicas[&1].summary(), c.replicas[&3].summary());
        assert!(c.anti_entropy(2, 3));
        c.assert_converged("after the first repairs");

        // A clear that replica 3 missed, and a store made after it.
        let clear = c.clear(2);
        c.run_in_order();
        let f = c.store(1, "f");
        c.run_in_order();
        assert_eq!(c.catch_up(3, 2), vec![Repair::Clear(clear), pull("f", f)]);
        assert!(!c.anti_entropy(3, 1));
        c.assert_converged("after the clear");
        let keys: Vec<&String> = c.replicas[&3].files.keys().collect();
        assert_eq!(keys, ["f"]);
        // Having seen everything, replica 3's next change is the newest.
        let next = c.store(3, "g");
        assert!(c.replicas[&1].files.values().all(|(version, _)| *version < next));
    }

    #[test]
    fn anti_entropy_repairs_whatever_gossip_lost() {
        // Messages dropped at random, then anti-entropy between neighbours
        // (a line, so news takes several rounds to cross it) until every
        // summary agrees.
        let mut most_rounds = 0;
        for seed in 0..200 {
            let mut rng = Rng(seed);
            let mut c = Cluster::new(4, &[(1, 2), (2, 3), (3, 4)]);
            for _ in 0..20 {
                let node = rng.below(4) as NodeId + 1;
                let key = format!("k{}", rng.below(5));
                let _version = match rng.below(12) {
                    0 => c.clear(node),
                    1..=4 if c.replica(node).is_live(&key) => c.delete(node, &key),
                    _ => c.store(node, &key),
                };
                for _ in 0..rng.below(c.in_flight.len() + 1) {
                    let next = rng.any(&c.in_flight);
                    if rng.below(3) == 0 {
                        c.in_flight.remove(next); // lost
                    } else {
                        c.deliver(next);
                    }
                }
            }
            c.in_flight.clear(); // every connection breaks
            let mut rounds = 0;
            while [(1, 2), (2, 3), (3, 4)]
                .into_iter()
                .fold(false, |differed, (a, b)| c.anti_entropy(a, b) | differed)
            {
                rounds += 1;
                assert!(rounds <= 4, "seed {seed}: anti-entropy does not settle");
            }
            c.assert_converged(&format!("seed {seed}"));
            most_rounds = most_rounds.max(rounds);
        }
        // Some schedule lost news that had to cross the whole line.
        assert!(most_rounds >= 2);
    }
}
