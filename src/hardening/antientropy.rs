//! Hardening: anti-entropy repair.
//!
//! Gossip alone loses changes: a node that was down, a connection that
//! broke in the middle of a relay, a frame dropped by a full queue. So
//! nodes also compare what they hold. When two nodes connect, and every
//! [`crate::Config::anti_entropy_interval`] after, each sends the other a
//! `Summary`: one hash over its clear watermark and every (key, version).
//! A node whose hash differs answers with its whole `Digest`, and the
//! receiver of a digest repairs itself from it ([`gossip::repairs`]):
//! newer clears and tombstones are applied at once, newer files are
//! fetched with the same fetch that follows an announcement
//! (`Host::fetch_unless_coming`).
//!
//! Hooks into the core at two points: `Node::run_peer` greets each new
//! peer here, and the handler passes `Summary` and `Digest` frames here.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use log::{debug, info, warn};

use crate::error::Result;
use crate::frame::{DigestEntry, Frame, MAX_FRAME_LEN, Sha1Digest};
use crate::gossip::{self, Repair};
use crate::host::Host;
use crate::support::version::Version;
use crate::transport::{Outbound, Transport};

/// A new peer hears what we hold.
pub(crate) fn greet(node: &dyn Host, peer: &Transport) {
    if node.config().anti_entropy {
        peer.queue(Outbound::Frame(summary_frame(node)));
    }
}

/// The anti-entropy timer: every interval, each peer gets our summary.
pub(crate) fn timer_loop(node: &dyn Host) {
    while !node.threads().wait_for_stop(node.config().anti_entropy_interval) {
        let summary = summary_frame(node);
        for peer in node.peers().handles() {
            peer.queue(Outbound::Frame(summary.clone()));
        }
    }
}

fn summary_frame(node: &dyn Host) -> Frame {
    let (cleared, entries) = node.store().digest();
    Frame::Summary {
        cleared,
        hash: gossip::summary_hash(cleared, &entries),
        count: entries.len() as u64,
    }
}

/// A peer's summary: if it differs from ours, send our whole digest so the
/// peer can fetch what it lacks. (The peer does the same for us when it
/// gets our summary.)
pub(crate) fn on_summary(node: &dyn Host, peer: &Transport, hash: Sha1Digest, count: u64) {
    // One digest in flight per peer: a peer that sends summaries faster
    // than it reads must not make us queue a copy of the index for each.
    if peer.digest_in_flight.load(Ordering::SeqCst) {
        return;
    }
    let (cleared, entries) = node.store().digest();
    if gossip::summary_hash(cleared, &entries) == hash {
        return;
    }
    peer.digest_in_flight.store(true, Ordering::SeqCst);
    debug!(target: node.name(), "Anti-entropy: summaries differ (ours keys={}, theirs keys={count}), sending digest to peer={}", entries.len(), peer.name());
    // Each entry: u16 key length + key + 16-byte version + tombstone byte.
    for chunk in chunks_within_frame(entries, |e| 2 + e.key.len() + 16 + 1) {
        peer.queue(Outbound::Frame(Frame::Digest { cleared, entries: chunk }));
    }
    peer.queue(Outbound::ClearWhenSent(Arc::clone(&peer.digest_in_flight)));
}

/// A peer's digest: apply its newer clear and tombstones, fetch its newer
/// files.
pub(crate) fn on_digest(
    node: &dyn Host,
    peer: &Transport,
    cleared: Version,
    entries: &[DigestEntry],
) -> Result<()> {
    let me = node.name();
    let newest = entries.iter().map(|e| e.version).fold(cleared, Version::max);
    if !node.observe(newest) {
        // One hostile entry spoils the digest: ignore all of it.
        warn!(target: me, "Ignoring a digest from={}: version {newest} is implausibly far ahead", peer.name());
        return Ok(());
    }
    let store = node.store();
    let held = |key: &str| store.entry(key).map(|entry| entry.version);
    for repair in gossip::repairs(held, store.cleared(), cleared, entries) {
        // A peer cut off halfway (its queue filled with our go-aheads) gets no
        // more of them.
        if peer.is_closed() {
            break;
        }
        match repair {
            Repair::Clear(version) => {
                if store.clear(version)? {
                    info!(target: me, "Anti-entropy: applied clear version={version} from={}", peer.name());
                }
            }
            Repair::Delete { key, version } => {
                if store.delete(&key, version)? {
                    info!(target: me, "Anti-entropy: applied delete key={key} version={version} from={}", peer.name());
                }
            }
            Repair::Pull { key, version } => {
                // Unless it is already on its way, from a push, a `get`, an
                // announcement or another digest: one copy is enough.
                node.fetch_unless_coming(peer, &key, version);
            }
        }
    }
    Ok(())
}

/// Splits a list into lists that each fit in one frame, given each item's
/// encoded length. Always returns at least one (maybe empty) list. The
/// budget bounds the items; the frame's other fields fit in the 256-byte
/// margin.
pub(crate) fn chunks_within_frame<T>(
    items: Vec<T>,
    encoded_len: impl Fn(&T) -> usize,
) -> Vec<Vec<T>> {
    let budget = MAX_FRAME_LEN as usize - 256;
    let mut chunks = vec![Vec::new()];
    let mut used = 0;
    for item in items {
        let len = encoded_len(&item);
        if used + len > budget {
            chunks.push(Vec::new());
            used = 0;
        }
        used += len;
        chunks.last_mut().expect("starts with one list, never shrinks").push(item);
    }
    chunks
}
