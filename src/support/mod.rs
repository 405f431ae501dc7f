//! Support: plain types and bookkeeping the core uses, with no protocol of
//! their own. Nothing here imports the core or the hardening, except the
//! peer map, which holds the core's connections.
//!
//! - `version`: [`crate::Version`] and [`crate::NodeId`], and the wall clock.
//! - `config`: [`crate::Config`], the counters behind [`crate::Stats`], the
//!   stream buffer's size.
//! - `threads`: every thread a node starts, and the flag that stops them.
//! - `peers`: the peer map, one connection per node id.

pub(crate) mod config;
pub(crate) mod peers;
pub(crate) mod threads;
pub(crate) mod version;
