//! Versions: how nodes agree which of two changes to a key is the newer.
//!
//! Every change (a store, a delete, a clear) is stamped with a [`Version`]:
//! a *hybrid logical time* from the clock of the node that made it, paired
//! with that node's id. Versions are compared as a pair, time first and node
//! id to break ties, so any two versions are ordered and no two changes
//! share one. That total order is what lets every node pick the same winner
//! without talking to the others ("last writer wins"); see `gossip` for the
//! clock's rules.
//!
//! # Hybrid logical time
//!
//! One `u64`: wall-clock milliseconds since the Unix epoch in the high 48
//! bits, a logical counter in the low [`LOGICAL_BITS`] (Kulkarni et al.,
//! "Logical Physical Clocks", 2014, packed as in CockroachDB's and
//! YugabyteDB's hybrid timestamps). Compared as a number, it orders by the
//! wall clock first, and by the counter between changes made in the same
//! millisecond or on a clock that lags one already seen.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// A node's identity: a random 64-bit number chosen on first start and kept
/// in the node's root directory, so a restarted node is the same node.
pub type NodeId = u64;

/// How many low bits of a hybrid time hold the logical counter.
pub const LOGICAL_BITS: u32 = 16;

/// The version of one change: `(time, node)`, ordered as a pair.
///
/// The derived `Ord` compares `time` first and `node` second, which is
/// exactly the order we want; do not reorder the fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// The hybrid logical time of the change (see the module doc). Zero
    /// only in [`Version::ZERO`].
    pub time: u64,
    /// The node that made the change. Also the change's origin, which the
    /// relay uses to avoid sending a change back to where it started.
    pub node: NodeId,
}

impl Version {
    /// Older than every real change: "nothing held", "never cleared".
    pub const ZERO: Version = Version { time: 0, node: 0 };

    /// The wall-clock milliseconds part of the time.
    pub fn millis(&self) -> u64 {
        self.time >> LOGICAL_BITS
    }
}

impl fmt::Display for Version {
    /// `1764561600123.0@00c0ffee00c0ffee`: milliseconds, the logical
    /// counter, then the node id in hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let logical = self.time & ((1 << LOGICAL_BITS) - 1);
        write!(f, "{}.{logical}@{:016x}", self.millis(), self.node)
    }
}

impl std::str::FromStr for Version {
    type Err = ();

    /// Parses what `Display` writes.
    fn from_str(text: &str) -> Result<Version, ()> {
        let (time, node) = text.split_once('@').ok_or(())?;
        let (millis, logical) = time.split_once('.').ok_or(())?;
        let millis: u64 = millis.parse().map_err(|_| ())?;
        let logical: u64 = logical.parse().map_err(|_| ())?;
        if millis >> (64 - LOGICAL_BITS) != 0 || logical >> LOGICAL_BITS != 0 {
            return Err(());
        }
        let node = u64::from_str_radix(node, 16).map_err(|_| ())?;
        Ok(Version { time: (millis << LOGICAL_BITS) | logical, node })
    }
}

/// The wall clock, in milliseconds since the Unix epoch (0 if the clock is
/// set before 1970, which only makes this node's versions lose ties).
pub fn wall_millis() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_time_then_node() {
        let v = |time, node| Version { time, node };
        assert!(v(2, 1) > v(1, 9));
        assert!(v(2, 2) > v(2, 1));
        assert!(v(1, 1) > Version::ZERO);
        assert_eq!(v(3, 4), v(3, 4));
    }

    #[test]
    fn display_and_parse_round_trip() {
        let version = Version { time: (1_764_561_600_123 << LOGICAL_BITS) | 7, node: 0xc0ffee };
        assert_eq!(version.to_string(), "1764561600123.7@0000000000c0ffee");
        assert_eq!(version.to_string().parse(), Ok(version));
        for bad in ["", "5@ab", "1.2", "x.1@ab", "1.70000@ab", "1.1@zz"] {
            assert_eq!(bad.parse::<Version>(), Err(()), "{bad:?}");
        }
    }
}
