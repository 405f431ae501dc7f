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
//!   not connected, up to [`crate::Config::max_peers`] connections, each
//!   with a backoff of its own (`discovery::Redial`): from
//!   [`discovery::DIAL_RETRY_MIN`], doubling up to
//!   [`crate::Config::dial_retry_max`] while it stays unreachable or ends
//!   our connections at once (a busy node declining us). An address going
//!   down and coming back is logged once each, not at every attempt. A
//!   restarted node rejoins through any known peer it can reach, not only
//!   through its bootstrap addresses; after a partition, each side redials
//!   the other, and the new connection starts with an anti-entropy summary,
//!   so the cluster converges however long the partition lasted.
//! - **Forgetting the dead.** A known address that has not accepted a TCP
//!   connection for [`crate::Config::forget_unreachable_after`] (a node
//!   that left for good) is dropped from `ROOT/peers` and from memory, and
//!   dialled no more. A bootstrap address is its own dialler's, and is
//!   neither redialled here nor forgotten.
//!
//! Hooks into the core at `FileServer::start_on` ([`start`]), at
//! `Node::run_peer` once a peer is registered ([`remember`]), and in the
//! read loop's delivery, which drops pings.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use log::{info, warn};

use crate::error::lock;
use crate::frame::Frame;
use crate::hardening::discovery::{self, DIAL_RETRY_MIN, Redial};
use crate::hardening::recovery::write_atomically;
use crate::host::Host;
use crate::transport::{Outbound, Transport};

/// How many peer addresses a node remembers.
pub(crate) const MAX_KNOWN_PEERS: usize = 64;

/// The peers this node has been connected to: their listen addresses, as
/// written to `ROOT/peers`, and how each has answered our dials. Leaf lock
/// (held across the rewrite of that small file, so writes never reorder).
pub(crate) type Liveness = Mutex<BTreeMap<SocketAddr, Known>>;

/// One remembered address.
#[derive(Clone, Debug, Default)]
pub(crate) struct Known {
    /// Its backoff, and since when it is down.
    redial: Redial,
    /// Whether a dial of it is under way (one at a time).
    dialling: bool,
}

/// Starts the heartbeat timer and the redialler, and loads the peers a
/// previous run knew.
pub(crate) fn start(node: &Arc<dyn Host>, liveness: &Arc<Liveness>) {
    let loaded = fs::read_to_string(node.config().root.join("peers")).unwrap_or_default();
    let addrs = loaded.lines().filter_map(|line| line.parse::<SocketAddr>().ok());
    lock(liveness).extend(addrs.take(MAX_KNOWN_PEERS).map(|a| (a, Known::default())));

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
    !node.config().bootstrap.is_empty() || !lock(liveness).is_empty()
}

/// Remembers a newly connected peer's listen address; if it was down, it
/// is back.
pub(crate) fn remember(node: &dyn Host, liveness: &Liveness, peer: &Transport) {
    // An address nobody can dial (0.0.0.0, port 0) is not worth keeping.
    let addr = match peer.peer.listen_addr.parse::<SocketAddr>() {
        Ok(addr) if !addr.ip().is_unspecified() && addr.port() != 0 => addr,
        _ => return,
    };
    let mut known = lock(liveness);
    if let Some(entry) = known.get_mut(&addr) {
        entry.redial.answered(node, &addr.to_string());
        return;
    }
    if known.len() >= MAX_KNOWN_PEERS {
        return;
    }
    known.insert(addr, Known::default());
    write_known_locked(node, &known);
}

/// Rewrites `ROOT/peers` from `known`. The caller holds the lock, so two
/// rewrites never cross.
fn write_known_locked(node: &dyn Host, known: &BTreeMap<SocketAddr, Known>) {
    let lines: String = known.keys().map(|a| format!("{a}\n")).collect();
    let config = node.config();
    if let Err(err) = write_atomically(&config.root, "peers", lines.as_bytes(), config.fsync) {
        warn!(target: node.name(), "Cannot rewrite the known peers: {err}");
    }
}

/// Every [`DIAL_RETRY_MIN`]: forgets the known addresses down for too
/// long, and dials those not connected whose backoff has run out, while
/// the node has room for more peers.
fn redial_loop(node: &Arc<dyn Host>, liveness: &Arc<Liveness>) {
    let config = node.config();
    let bootstrap: Vec<SocketAddr> =
        config.bootstrap.iter().filter_map(|b| b.parse().ok()).collect();
    while !node.threads().wait_for_stop(DIAL_RETRY_MIN) {
        let now = Instant::now();
        // A snapshot, so the peer map is not consulted under our lock.
        let snapshot = lock(liveness).clone();
        let missing: Vec<(SocketAddr, Known)> = snapshot
            .into_iter()
            .filter(|(addr, _)| !bootstrap.contains(addr) && !node.peers().connected_to(*addr))
            .collect();
        // A dial stays under way until its connection ends; one still
        // connecting or in its handshake is not a peer yet, but takes room.
        let in_flight = missing.iter().filter(|(_, k)| k.dialling).count();
        let mut room = config.max_peers.saturating_sub(node.peers().handles().len() + in_flight);
        let mut forget = Vec::new();
        for (addr, known) in missing {
            let down_for = known.redial.down_for(now);
            if down_for.is_some_and(|down| down >= config.forget_unreachable_after) {
                forget.push(addr);
            } else if !known.dialling && known.redial.wait(now).is_zero() && room > 0 {
                room -= 1;
                dial_known(node, liveness, addr);
            }
        }
        if !forget.is_empty() {
            forget_dead(&**node, liveness, &forget);
        }
    }
}

/// Drops addresses down for longer than `forget_unreachable_after`.
fn forget_dead(node: &dyn Host, liveness: &Liveness, addrs: &[SocketAddr]) {
    let mut known = lock(liveness);
    for addr in addrs {
        if let Some(entry) = known.remove(addr) {
            let down = entry.redial.down_for(Instant::now()).unwrap_or_default();
            info!(target: node.name(), "Forgetting peer addr={addr}: unreachable for {down:?}");
        }
    }
    write_known_locked(node, &known);
}

/// Dials a known address on a thread of its own, recording the outcome in
/// its [`Redial`], unless a dial of it is under way.
fn dial_known(node: &Arc<dyn Host>, liveness: &Arc<Liveness>, addr: SocketAddr) {
    match lock(liveness).get_mut(&addr) {
        Some(entry) if !entry.dialling => entry.dialling = true,
        _ => return, // forgotten meanwhile, or under way
    }
    let (dialler, liveness) = (Arc::clone(node), Arc::clone(liveness));
    node.threads().spawn(format!("{} TL read", node.name()), move || {
        discovery::dial_and_run(&dialler, addr, &mut |dialled| {
            if let Some(entry) = lock(&liveness).get_mut(&addr) {
                entry.redial.record(&*dialler, &addr.to_string(), dialled);
            }
        });
        if let Some(entry) = lock(&liveness).get_mut(&addr) {
            entry.dialling = false;
        }
    });
}
