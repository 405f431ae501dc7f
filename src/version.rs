//! Versions: how nodes agree which of two changes to a key is the newer.
//!
//! Every change (a store, a delete, a clear) is stamped with a [`Version`]:
//! the Lamport clock of the node that made it, paired with that node's id.
//! Versions are compared as a pair — counter first, node id to break ties —
//! so any two versions are ordered and no two changes share one. That total
//! order is what lets every node pick the same winner without talking to
//! the others ("last writer wins"); see `gossip` for the clock rules.

use std::fmt;

/// A node's identity: a random 64-bit number chosen on first start and kept
/// in the node's root directory, so a restarted node is the same node.
pub type NodeId = u64;

/// The version of one change: `(counter, node)`, ordered as a pair.
///
/// The derived `Ord` compares `counter` first and `node` second, which is
/// exactly the order we want; do not reorder the fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// The Lamport clock of the node that made the change, at the moment it
    /// made it. Zero only in [`Version::ZERO`].
    pub counter: u64,
    /// The node that made the change. Also the change's origin, which the
    /// relay uses to avoid sending a change back to where it started.
    pub node: NodeId,
}

impl Version {
    /// Older than every real change: "nothing held", "never cleared".
    pub const ZERO: Version = Version { counter: 0, node: 0 };
}

impl fmt::Display for Version {
    /// `12@00c0ffee00c0ffee`: the counter, then the node id in hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{:016x}", self.counter, self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_counter_then_node() {
        let v = |counter, node| Version { counter, node };
        assert!(v(2, 1) > v(1, 9));
        assert!(v(2, 2) > v(2, 1));
        assert!(v(1, 1) > Version::ZERO);
        assert_eq!(v(3, 4), v(3, 4));
    }
}
