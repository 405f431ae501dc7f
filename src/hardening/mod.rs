//! Hardening: what makes the core safe to run, outside the reading path.
//!
//! Each module opens with what it hardens and the core step it hooks into.
//! They stand on the core's narrow interface below them (the store, the
//! peer map, the transport, and `host::Host`), never on `server`, where the
//! diagrams happen; `server` calls them at named hooks. Some are hooks the
//! core calls on its way (checked reads, hashing, recovery, limits).
//!
//! - `handshake`: who may connect (magic, version, the cluster secret).
//! - `listener`: the accept loop, the connection caps (all connections,
//!   inbound peers) and the decline that names others to try.
//! - `limits`: writer-queue budgets, and the floor rate of a fetched stream.
//! - `fetches`: the bounds on fetches, the unanswered-fetch cutoff, the
//!   busy-origin rule.
//! - `liveness`: heartbeats, known peers, redial.
//! - `discovery`: bootstrap diallers and peer lists.
//! - `antientropy`: summaries, digests and the repairs they bring.
//! - `tombstones`: expiry after the grace period.
//! - `checked`: reads checked against their SHA-1 ([`crate::FileReader`]).
//! - `corruption`: a peer's report that our copy is corrupt.
//! - `hashing`: hashing a large file on a thread of its own as it is written.
//! - `recovery`: the root's lock, format and small files; crash leftovers.
//! - `session`: the command line's sessions.
//! - `wiring`: the core's hooks into all of the above, in one place.

pub(crate) mod antientropy;
pub(crate) mod checked;
pub(crate) mod corruption;
pub(crate) mod discovery;
pub(crate) mod fetches;
pub mod handshake;
pub(crate) mod hashing;
pub(crate) mod limits;
pub(crate) mod listener;
pub(crate) mod liveness;
pub(crate) mod recovery;
pub(crate) mod session;
pub(crate) mod tombstones;
pub(crate) mod wiring;
