//! Hardening: the connection cap.
//!
//! Every connection costs threads and file descriptors, so a node keeps at
//! most [`MAX_CONNECTIONS`] open at once, peers and clients, in either
//! direction. One more is answered with a `Busy` error frame and closed: a
//! flood of connections cannot exhaust the node. The list of open sockets
//! also lets shutdown close connections still in their handshake.
//!
//! (The other caps sit where their data lives: frame lengths in `frame`,
//! writer queues in `transport`, handshake sizes in `handshake`.)
//!
//! Hooks into the core at `Node::run_connection`, which takes a slot
//! before the handshake, and at shutdown.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use log::warn;

use crate::error::{Error, Result, lock};
use crate::frame::{ErrorCode, Frame, write_frame};
use crate::server::Node;

/// The most connections a node keeps open at once.
pub(crate) const MAX_CONNECTIONS: usize = 256;

/// The open sockets, by slot number.
#[derive(Default)]
pub(crate) struct Limits {
    /// Every open connection's socket. Leaf lock.
    sockets: Mutex<HashMap<u64, TcpStream>>,
    /// The next slot number.
    next: AtomicU64,
}

/// A connection's place under the cap, freed when dropped.
pub(crate) struct Slot<'a> {
    limits: &'a Limits,
    id: u64,
}

/// Takes a slot for a new connection, or refuses it with a `Busy` frame.
/// The count and the insert happen under one lock, so a burst of
/// connections cannot slip past the cap.
///
/// # Errors
///
/// [`Error::Busy`] if the node is full; [`Error::Io`] if the socket cannot
/// be cloned.
pub(crate) fn take_slot<'a>(node: &'a Node, stream: &TcpStream) -> Result<Slot<'a>> {
    let handle = stream.try_clone()?;
    let mut sockets = lock(&node.limits.sockets);
    if sockets.len() >= MAX_CONNECTIONS {
        drop(sockets); // writing to a socket is I/O: not under the lock
        let addr = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        warn!(target: node.name(), "Refusing connection from {addr}: {MAX_CONNECTIONS} are open");
        let why = format!("the node has {MAX_CONNECTIONS} connections open; try later");
        // A fresh socket's send buffer takes one small frame without
        // blocking; if the write fails, the close says enough.
        let busy = Frame::Error { code: ErrorCode::Busy, message: why.clone() };
        let _ = write_frame(&mut &*stream, &busy);
        return Err(Error::Busy(why));
    }
    let id = node.limits.next.fetch_add(1, Ordering::Relaxed);
    sockets.insert(id, handle);
    Ok(Slot { limits: &node.limits, id })
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        lock(&self.limits.sockets).remove(&self.id);
    }
}

/// Shuts down every open socket, handshakes included (at shutdown).
pub(crate) fn close_all(node: &Node) {
    let sockets: Vec<TcpStream> = lock(&node.limits.sockets).drain().map(|(_, s)| s).collect();
    for socket in sockets {
        let _ = socket.shutdown(Shutdown::Both);
    }
}
