//! The peer map: the connected peers by node id, behind one `Mutex`.
//!
//! The lock is a leaf: it is held to look up, insert or remove, and never
//! across I/O. Callers copy the `Arc<Transport>` handles out
//! ([`PeerMap::handles`]), let go, and only then queue work or close
//! sockets. It is never held while taking a transport lock.
//!
//! It keeps **one connection per pair of nodes**. Two nodes that dial each
//! other at once end up with two connections; both ends keep the same one
//! by a rule both can apply from facts both know ([`PeerMap::register`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::error::lock;
use crate::support::config::PeerInfo;
use crate::support::version::NodeId;
use crate::transport::Transport;

/// The connected peers, by node id.
#[derive(Default)]
pub(crate) struct PeerMap {
    peers: Mutex<HashMap<NodeId, Arc<Transport>>>,
}

impl PeerMap {
    /// A snapshot of the connected peers.
    pub fn handles(&self) -> Vec<Arc<Transport>> {
        lock(&self.peers).values().cloned().collect()
    }

    /// The connection to node `id`, if there is one.
    pub fn get(&self, id: NodeId) -> Option<Arc<Transport>> {
        lock(&self.peers).get(&id).cloned()
    }

    /// Adds a peer (we are node `us`). If a connection to the same node is
    /// there already, keeps exactly one of the two and retires the other:
    /// it is closed once the peer, by its `PushesFrom` on the kept one,
    /// shows that it kept the same one. Closed any sooner, the peer could
    /// see it end before it registers the kept one, and lose us for a
    /// moment. Returns whether `peer` is the one kept.
    pub fn register(&self, us: NodeId, peer: &Arc<Transport>) -> bool {
        let mut peers = lock(&self.peers);
        let Some(existing) = peers.get(&peer.id()) else {
            peers.insert(peer.id(), Arc::clone(peer));
            return true;
        };
        // Prefer the connection dialled by the smaller node id; between two
        // dialled by the same node, the one whose dialler's nonce is smaller
        // (bytewise).
        let smaller_id = us.min(peer.id());
        let dialler = |p: &Transport| if p.outbound { us } else { p.id() };
        let rank = |p: &Transport| (dialler(p) != smaller_id, p.peer.dialler_nonce);
        let (kept, retired) = if rank(peer) < rank(existing) {
            (Arc::clone(peer), peers.insert(peer.id(), Arc::clone(peer)))
        } else {
            (Arc::clone(existing), Some(Arc::clone(peer)))
        };
        drop(peers); // closing a socket is I/O: not under the map lock
        if let Some(retired) = retired {
            kept.retire_when_promised(retired);
        }
        Arc::ptr_eq(&kept, peer)
    }

    /// Removes a peer, if this very connection is still the one registered
    /// (a duplicate's winner may have replaced it). Returns whether it was.
    pub fn unregister(&self, peer: &Transport) -> bool {
        let mut peers = lock(&self.peers);
        if peers.get(&peer.id()).is_some_and(|p| p.conn == peer.conn) {
            peers.remove(&peer.id());
            return true;
        }
        false
    }

    /// Whether a peer listening on `addr` is connected: by the address it
    /// advertised, or, for a connection we dialled, by the address we
    /// dialled (a node listening on 0.0.0.0 advertises that).
    pub fn connected_to(&self, addr: SocketAddr) -> bool {
        lock(&self.peers)
            .values()
            .any(|p| (p.outbound && p.addr == addr) || p.peer.listen_addr.parse() == Ok(addr))
    }

    /// The peers as [`crate::FileServer::peers`] reports them, by name.
    pub fn infos(&self) -> Vec<PeerInfo> {
        let mut infos: Vec<PeerInfo> = self
            .handles()
            .into_iter()
            .map(|p| PeerInfo {
                id: p.id(),
                name: p.name().to_string(),
                addr: p.peer.listen_addr.clone(),
                outbound: p.outbound,
            })
            .collect();
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        infos
    }
}
