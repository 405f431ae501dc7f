//! Hardening: staying connected — bootstrap diallers and peer discovery.
//!
//! A node is started with a few bootstrap addresses. For each, a dialler
//! thread keeps a connection open, redialling with exponential backoff
//! while the address is unreachable. With discovery on, connected peers
//! also tell each other whom they know (`Peers` frames, at connect time and
//! every anti-entropy interval), and a node dials the ones it lacks, up to
//! [`crate::Config::max_peers`].
//!
//! Hooks into the core at three points: `FileServer::start` calls
//! [`start`], `Node::run_peer` greets each new peer here, and the handler
//! passes `Peers` frames here. Every connection it opens runs through
//! `Host::run_connection`, like an accepted one.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::error::{Error, Result, lock};
use crate::frame::Frame;
use crate::host::Host;
use crate::transport::{Outbound, Transport};

/// The first wait before redialling a bootstrap peer that did not answer.
pub(crate) const DIAL_RETRY_MIN: Duration = Duration::from_millis(100);

/// The longest wait between redials: the backoff doubles up to this. Short,
/// so that a link comes back within seconds of a partition healing.
pub(crate) const DIAL_RETRY_MAX: Duration = Duration::from_secs(2);

/// How long to wait for a TCP connection to a peer to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Discovery dials under way, so there is one per address at a time.
#[derive(Default)]
pub(crate) struct Discovery {
    /// Addresses being dialled. Leaf lock.
    dialling: Mutex<HashSet<SocketAddr>>,
}

/// Starts one dialler per bootstrap address, and the discovery timer.
pub(crate) fn start(node: &Arc<dyn Host>) {
    for addr in node.config().bootstrap.clone() {
        let dialler = Arc::clone(node);
        node.threads()
            .spawn(format!("{} TL read", node.name()), move || dial_loop(&dialler, &addr));
    }
    if node.config().discover_peers {
        let timer = Arc::clone(node);
        node.threads().spawn(format!("{} discovery", node.name()), move || {
            while !timer.threads().wait_for_stop(timer.config().anti_entropy_interval) {
                let peers = peers_frame(&*timer);
                for peer in timer.peers().handles() {
                    peer.queue(Outbound::Frame(peers.clone()));
                }
            }
        });
    }
}

/// A new peer hears whom we know.
pub(crate) fn greet(node: &dyn Host, peer: &Transport) {
    if node.config().discover_peers {
        peer.queue(Outbound::Frame(peers_frame(node)));
    }
}

fn peers_frame(node: &dyn Host) -> Frame {
    let peers = node.peers().handles().into_iter();
    let addrs = peers.map(|p| p.peer.listen_addr.clone()).collect();
    Frame::Peers { addrs }
}

/// A bootstrap dialler: keeps this node connected to `addr`, redialling
/// with exponential backoff while it is unreachable.
fn dial_loop(node: &Arc<dyn Host>, addr: &str) {
    let mut backoff = DIAL_RETRY_MIN;
    while !node.threads().stopping() {
        let target = match resolve(addr) {
            Ok(target) => target,
            Err(err) => {
                warn!(target: node.name(), "Cannot resolve bootstrap peer {addr}: {err}");
                node.threads().wait_for_stop(DIAL_RETRY_MAX);
                continue;
            }
        };
        // Connected already (it dialled us, and that connection won).
        if node.peers().connected_to(target) {
            node.threads().wait_for_stop(DIAL_RETRY_MAX);
            continue;
        }
        match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
            Ok(stream) => {
                let started = Instant::now();
                if let Err(err) = Arc::clone(node).run_connection(stream, true) {
                    info!(target: node.name(), "Connection to {addr} ended: {err}");
                }
                // A connection that lasted was a real one: try again soon.
                // One that ended at once (refused, a wrong secret, a
                // duplicate) backs off like a failed dial, never a busy loop.
                if started.elapsed() >= DIAL_RETRY_MAX {
                    backoff = DIAL_RETRY_MIN;
                }
            }
            Err(err) => {
                debug!(target: node.name(), "Cannot reach {addr} ({err}); retrying in {backoff:?}")
            }
        }
        node.threads().wait_for_stop(backoff);
        backoff = (backoff * 2).min(DIAL_RETRY_MAX);
    }
}

/// A peer's list of its peers (which may name us, or hold empty or bad
/// addresses: those are skipped): dial the ones we lack, up to `max_peers`.
pub(crate) fn on_peers(node: &Arc<dyn Host>, addrs: &[String]) {
    if !node.config().discover_peers {
        return;
    }
    // A hostile frame may list thousands of addresses: consider no more than
    // we could use.
    for addr in addrs.iter().take(node.config().max_peers) {
        if let Ok(target) = addr.parse::<SocketAddr>() {
            Arc::clone(node).dial(target, "discovered");
        }
    }
}

/// Dials `target` once, on a thread of its own, unless it is us, already
/// connected or being dialled, or the node has `max_peers` connections
/// (counting dials under way). `why` is for the log.
pub(crate) fn dial_once(
    node: Arc<dyn Host>,
    discovery: &Arc<Discovery>,
    target: SocketAddr,
    why: &str,
) {
    let dialling = lock(&discovery.dialling).len();
    let config = node.config();
    let full = node.peers().handles().len() + dialling >= config.max_peers;
    let ours = target == node.listen_addr() || config.advertise == Some(target.to_string());
    if full || ours || node.peers().connected_to(target) {
        return;
    }
    if !lock(&discovery.dialling).insert(target) {
        return; // already under way
    }
    debug!(target: node.name(), "Dialling {why} peer addr={target}");
    let (dialler, discovery) = (Arc::clone(&node), Arc::clone(discovery));
    node.threads().spawn(format!("{} TL read", node.name()), move || {
        let name = dialler.name().to_string();
        let result = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
            .map_err(Error::from)
            .and_then(|stream| {
                // From the handshake on it is a peer like any other: no
                // longer a dial under way.
                lock(&discovery.dialling).remove(&target);
                dialler.run_connection(stream, true)
            });
        lock(&discovery.dialling).remove(&target);
        if let Err(err) = result {
            info!(target: &name, "Connection to {target} ended: {err}");
        }
    });
}

/// The first address `addr` resolves to.
fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| Error::Config(format!("{addr} resolves to no address")))
}
