//! Hardening: tombstones expire.
//!
//! A delete leaves a tombstone (the key and the delete's version, no
//! content) so that an older store arriving late still loses to it. Kept
//! forever, tombstones would let any peer grow every node's disk and index
//! without limit, one delete of a never-stored key at a time. So a
//! tombstone older than [`crate::Config::tombstone_grace`] (seven days by
//! default, like Cassandra's `gc_grace_seconds`) is removed, from the index
//! and then from the disk.
//!
//! The rule that follows: **a node that was offline for longer than the
//! grace period may bring deleted files back.** Its old copy meets no
//! tombstone any more, wins, and spreads. Keep nodes offline for less than
//! the grace period, or wipe a node's root before it rejoins.
//!
//! Hooks into the core through the store's index and
//! `Store::remove_files_of`, on a timer that `FileServer::start_on` starts.

use std::sync::Arc;
use std::time::Duration;

use log::debug;

use crate::host::Host;
use crate::support::version::{LOGICAL_BITS, Version, wall_millis};

/// How often a node looks for expired tombstones, at most.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Starts the sweeper: every [`SWEEP_INTERVAL`] (or the grace period, if
/// shorter), it removes the tombstones older than the grace period.
pub(crate) fn start(node: &Arc<dyn Host>) {
    let sweeper = Arc::clone(node);
    let grace = node.config().tombstone_grace;
    let interval = SWEEP_INTERVAL.min(grace);
    node.threads().spawn(format!("{} tombstones", node.name()), move || {
        while !sweeper.threads().wait_for_stop(interval) {
            let grace = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
            let before = wall_millis().saturating_sub(grace);
            let before = Version { time: before << LOGICAL_BITS, node: 0 };
            let expired = sweeper.store().expire_tombstones(before);
            if expired > 0 {
                debug!(target: sweeper.name(), "Expired {expired} tombstones older than the grace period");
            }
        }
    });
}
