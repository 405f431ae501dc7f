//! Hardening: who gets a connection. The accept loop, the connection cap,
//! and the handshake that tells peers from command-line clients.
//!
//! Every connection costs threads and file descriptors, so a node keeps at
//! most [`MAX_CONNECTIONS`] open at once, peers and clients, in either
//! direction. One more is answered with a `Busy` error frame and closed: a
//! flood of connections cannot exhaust the node. The list of open sockets
//! also lets shutdown close connections still in their handshake. Then the
//! handshake (`handshake`) checks the magic, the version and, with a
//! cluster secret, the proof; only then does a peer get its transport.
//!
//! (The other caps sit where their data lives: frame lengths in `frame`,
//! writer queues in `transport`, handshake sizes in `handshake`.)
//!
//! Stands on the node's narrow interface ([`Host`]): [`run_connection`]
//! hands a peer that has passed to `Host::run_peer`, and the node calls
//! [`stop`] at shutdown.

use std::collections::HashMap;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};

use crate::error::{Error, Result, lock};
use crate::frame::{ErrorCode, Frame, Role, write_frame};
use crate::hardening::handshake::{self, Identity};
use crate::hardening::session;
use crate::host::Host;

/// How long the accept loop backs off after `accept` fails.
const ACCEPT_RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// The accept thread: one connection thread per accepted socket.
pub(crate) fn accept_loop(node: &Arc<dyn Host>, listener: TcpListener) {
    for stream in listener.incoming() {
        if node.threads().stopping() {
            break;
        }
        let stream = match stream {
            Ok(stream) => stream,
            Err(err) => {
                // Out of file descriptors, say: back off rather than spin.
                warn!(target: node.name(), "Accept failed: {err}");
                node.threads().wait_for_stop(ACCEPT_RETRY_INTERVAL);
                continue;
            }
        };
        let connection = Arc::clone(node);
        node.threads().spawn(format!("{} TL read", node.name()), move || {
            let addr = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let name = connection.name().to_string();
            if let Err(err) = connection.run_connection(stream, false) {
                info!(target: &name, "Connection from {addr} ended: {err}");
            }
        });
    }
}

/// One connection, accepted or dialled, from handshake to close. Runs on
/// the connection's own thread, which becomes its read loop.
///
/// # Errors
///
/// [`Error::Busy`] over the cap; the handshake's errors; whatever ended the
/// connection.
pub(crate) fn run_connection(
    node: Arc<dyn Host>,
    limits: &Limits,
    stream: TcpStream,
    outbound: bool,
) -> Result<()> {
    if node.threads().stopping() {
        return Err(Error::Closed);
    }
    // Counted against the connection cap until this returns.
    let _slot = take_slot(limits, node.name(), &stream)?;
    let config = node.config();
    let me = Identity {
        role: Role::Peer,
        node: node.id(),
        name: config.name.clone(),
        listen_addr: config.advertise.clone().unwrap_or(node.listen_addr().to_string()),
        secret: config.secret.clone(),
    };
    let hello = handshake::handshake(&stream, &me, outbound)?;
    match hello.role {
        Role::Peer => node.run_peer(stream, hello, outbound),
        Role::Client => session::serve_client(&*node, stream),
    }
}

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
fn take_slot<'a>(limits: &'a Limits, me: &str, stream: &TcpStream) -> Result<Slot<'a>> {
    let handle = stream.try_clone()?;
    let mut sockets = lock(&limits.sockets);
    if sockets.len() >= MAX_CONNECTIONS {
        drop(sockets); // writing to a socket is I/O: not under the lock
        let addr = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        warn!(target: me, "Refusing connection from {addr}: {MAX_CONNECTIONS} are open");
        let why = format!("the node has {MAX_CONNECTIONS} connections open; try later");
        // A fresh socket's send buffer takes one small frame without
        // blocking; if the write fails, the close says enough.
        let busy = Frame::Error { code: ErrorCode::Busy, message: why.clone() };
        let _ = write_frame(&mut &*stream, &busy);
        return Err(Error::Busy(why));
    }
    let id = limits.next.fetch_add(1, Ordering::Relaxed);
    sockets.insert(id, handle);
    Ok(Slot { limits, id })
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        lock(&self.limits.sockets).remove(&self.id);
    }
}

/// At shutdown: wakes the accept thread with a connection of our own (it
/// sees the flag and stops), then shuts down every open socket, peers and
/// handshakes included.
pub(crate) fn stop(node: &dyn Host, limits: &Limits) {
    let mut wake = node.listen_addr();
    if wake.ip().is_unspecified() {
        wake.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
    for peer in node.peers().handles() {
        peer.close();
    }
    let sockets: Vec<TcpStream> = lock(&limits.sockets).drain().map(|(_, s)| s).collect();
    for socket in sockets {
        let _ = socket.shutdown(Shutdown::Both);
    }
}
