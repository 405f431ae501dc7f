//! Hardening: liveness. A dead or hung peer is noticed in seconds, and the
//! node finds its way back to the cluster by itself.
//!
//! - **Heartbeats.** Every [`crate::Config::heartbeat_interval`] each peer
//!   gets a `Ping`. A peer connection's socket read timeout is
//!   [`crate::Config::heartbeat_timeout`], so a peer from which no byte at
//!   all arrives for that long is declared dead: the read fails, the read
//!   loop ends, the connection closes, and every `get` waiting on it is
//!   answered at once. Any byte counts (pings, frames, file bytes), so a
//!   long stream over a slow link keeps its link alive; and the timeout is
//!   only checked while the connection is being read, so a busy handler
//!   elsewhere in the node never makes a live peer look dead.
//! - **Known peers.** Every peer this node connects to is remembered in
//!   `ROOT/peers` (its listen address, one a line, at most
//!   [`MAX_KNOWN_PEERS`]). A redialler thread dials the known peers that are
//!   not connected, up to [`crate::Config::max_peers`] connections, with a
//!   backoff from [`discovery::DIAL_RETRY_MIN`] to
//!   [`discovery::DIAL_RETRY_MAX`] while some stay unreachable. A restarted
//!   node rejoins through any known peer it can reach, not only through its
//!   bootstrap addresses; after a partition, each side redials the other
//!   within seconds of the heal, and the new connection starts with an
//!   anti-entropy summary, so the cluster converges however long the
//!   partition lasted.
//!
//! Hooks into the core at `FileServer::start_on` ([`start`]), at
//! `Node::run_peer` once a peer is registered ([`remember`]), and in the
//! read loop's delivery, which drops pings.

use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use log::warn;

use crate::error::lock;
use crate::frame::Frame;
use crate::hardening::discovery::{DIAL_RETRY_MAX, DIAL_RETRY_MIN};
use crate::hardening::recovery::write_atomically;
use crate::host::Host;
use crate::transport::{Outbound, Transport};

/// How many peer addresses a node remembers.
pub(crate) const MAX_KNOWN_PEERS: usize = 64;

/// The peers this node has been connected to.
#[derive(Default)]
pub(crate) struct Liveness {
    /// Their listen addresses, as written to `ROOT/peers`. Leaf lock (held
    /// across the rewrite of that small file, so writes never reorder).
    known: Mutex<BTreeSet<SocketAddr>>,
}

/// Starts the heartbeat timer and the redialler, and loads the peers a
/// previous run knew.
pub(crate) fn start(node: &Arc<dyn Host>, liveness: &Arc<Liveness>) {
    let loaded = fs::read_to_string(node.config().root.join("peers")).unwrap_or_default();
    lock(&liveness.known).extend(loaded.lines().filter_map(|line| line.parse::<SocketAddr>().ok()));

    let timer = Arc::clone(node);
    node.threads().spawn(format!("{} heartbeat", node.name()), move || {
        while !timer.threads().wait_for_stop(timer.config().heartbeat_interval) {
            for peer in timer.peers().handles() {
                peer.queue(Outbound::Frame(Frame::Ping));
            }
        }
    });
    let (redialler, liveness) = (Arc::clone(node), Arc::clone(liveness));
    node.threads()
        .spawn(format!("{} redial", node.name()), move || redial_loop(&redialler, &liveness));
}

/// Whether this node has ever had peers (configured or remembered): if so,
/// a `get` with none connected could not ask them, which is not the same as
/// "nobody has it".
pub(crate) fn expects_peers(node: &dyn Host, liveness: &Liveness) -> bool {
    !node.config().bootstrap.is_empty() || !lock(&liveness.known).is_empty()
}

/// Remembers a newly connected peer's listen address.
pub(crate) fn remember(node: &dyn Host, liveness: &Liveness, peer: &Transport) {
    let Ok(addr) = peer.peer.listen_addr.parse::<SocketAddr>() else {
        return;
    };
    // An address nobody can dial (0.0.0.0, port 0) is not worth keeping.
    if addr.ip().is_unspecified() || addr.port() == 0 {
        return;
    }
    let mut known = lock(&liveness.known);
    if known.len() >= MAX_KNOWN_PEERS || !known.insert(addr) {
        return;
    }
    let lines: String = known.iter().map(|a| format!("{a}\n")).collect();
    let config = node.config();
    if let Err(err) = write_atomically(&config.root, "peers", lines.as_bytes(), config.fsync) {
        warn!(target: node.name(), "Cannot remember peer addr={addr}: {err}");
    }
}

/// Dials the known peers that are not connected, backing off while some
/// stay unreachable, and starting quick again once all are back.
fn redial_loop(node: &Arc<dyn Host>, liveness: &Liveness) {
    let mut backoff = DIAL_RETRY_MIN;
    while !node.threads().wait_for_stop(backoff) {
        let known: Vec<SocketAddr> = lock(&liveness.known).iter().copied().collect();
        let missing: Vec<SocketAddr> =
            known.into_iter().filter(|addr| !node.peers().connected_to(*addr)).collect();
        if missing.is_empty() {
            backoff = DIAL_RETRY_MIN;
            continue;
        }
        for addr in missing {
            Arc::clone(node).dial(addr, "known");
        }
        backoff = (backoff * 2).min(DIAL_RETRY_MAX);
    }
}
