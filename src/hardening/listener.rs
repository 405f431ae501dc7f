//! Hardening: who gets a connection. The accept loop, the connection caps,
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
//! **A balanced mesh.** Peers we did not dial are capped too, at
//! [`crate::Config::max_inbound_peers`], so a node that many others
//! bootstrap through does not become a hub. A peer over that cap is
//! *declined*, not just refused: after the handshake it is sent a `Peers`
//! frame with the addresses of our peers (in a random order, so the
//! declined spread over them), then an `Error` frame with code `Busy`, and
//! the connection closes. The dialler's discovery dials those addresses
//! (`discovery::on_peers`), and its redialler backs off from the node that
//! declined it, so the cluster grows outwards instead of into one node.
//!
//! **Shutdown.** A connection takes its slot under the lock that
//! [`stop`] drains the sockets under, and a slot is refused once stopping
//! began: so no connection can open after shutdown closed the others and
//! keep the node's threads from ending.
//!
//! (The other caps sit where their data lives: frame lengths in `frame`,
//! writer queues in `transport`, handshake sizes in `handshake`.)
//!
//! Stands on the node's narrow interface ([`Host`]): [`run_connection`]
//! hands a peer that has passed to `Host::run_peer`, and the node calls
//! [`stop`] at shutdown.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::error::{Error, Result, lock};
use crate::frame::{ErrorCode, Frame, Role, write_frame};
use crate::hardening::handshake::{self, Hello, Identity};
use crate::hardening::session;
use crate::host::Host;
use crate::support::config::MAX_CONNECTIONS;

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
            match connection.run_connection(stream, false) {
                Ok(()) => {}
                // Declined or refused at a cap: said once where it happened.
                Err(Error::Busy(_)) => {}
                Err(err) => info!(target: &name, "Connection from {addr} ended: {err}"),
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
    // Counted against the connection cap until this returns; refused once
    // the node is stopping.
    let mut slot = take_slot(limits, node.name(), &stream)?;
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
        Role::Peer if outbound => node.run_peer(stream, hello, outbound),
        Role::Peer => {
            // Counted against the inbound cap until the peer is gone.
            if !slot.take_inbound(config.max_inbound_peers) {
                return decline(&*node, stream, &hello);
            }
            node.run_peer(stream, hello, outbound)
        }
        Role::Client => session::serve_client(node, stream),
    }
}

/// How long a declined peer has to read the decline and close its end.
const DECLINE_LINGER: Duration = Duration::from_secs(2);

/// Declines a peer that dialled a node at its inbound cap: tells it whom
/// else to try (our peers, in a random order, but not itself), says
/// `Busy`, and closes. Runs on the connection's own thread, before any
/// transport exists, so writing here breaks no "readers never write" rule.
///
/// # Errors
///
/// Always [`Error::Busy`]: the connection did not become a peer.
fn decline(node: &dyn Host, stream: TcpStream, hello: &Hello) -> Result<()> {
    let listed = node.peers().handles().into_iter().map(|p| p.peer.listen_addr.clone());
    let mut addrs: Vec<String> =
        listed.filter(|addr| !addr.is_empty() && *addr != hello.listen_addr).collect();
    if !addrs.is_empty() {
        let turn = u64::from_be_bytes(crate::random_bytes()?) % addrs.len() as u64;
        addrs.rotate_left(turn as usize);
    }
    let cap = node.config().max_inbound_peers;
    debug!(
        target: node.name(),
        "Declining peer={} addr={}: {cap} inbound peers; offering {} others",
        hello.name,
        hello.listen_addr,
        addrs.len()
    );
    let why = format!("the node has {cap} inbound peers; try the peers it listed");
    // Both frames in one write (they are small: a few dozen addresses).
    let mut bytes = Vec::new();
    write_frame(&mut bytes, &Frame::Peers { addrs })?;
    write_frame(&mut bytes, &Frame::Error { code: ErrorCode::Busy, message: why.clone() })?;
    if (&stream).write_all(&bytes).is_ok() {
        // Half-close, then read what the dialler sent (its greeting) until
        // it closes: closing with unread bytes would reset the connection,
        // and a reset may destroy the frames above before the dialler reads
        // them. Bounded in time, and read through a small buffer.
        let _ = stream.shutdown(Shutdown::Write);
        let _ = stream.set_read_timeout(Some(DECLINE_LINGER));
        let until = Instant::now() + DECLINE_LINGER;
        let mut buf = [0u8; 4096];
        while Instant::now() < until && matches!((&stream).read(&mut buf), Ok(n) if n > 0) {}
    }
    Err(Error::Busy(why))
}

/// The open sockets and the inbound peers, counted against the caps. Leaf
/// lock.
pub(crate) type Limits = Mutex<Open>;

/// What [`Limits`] guards.
#[derive(Default)]
pub(crate) struct Open {
    /// Every open connection's socket, by slot number.
    sockets: HashMap<u64, TcpStream>,
    /// Peers that dialled us and are still connected (or being registered).
    inbound_peers: usize,
    /// Set by [`stop`] when it drains `sockets`: no slot is given after.
    stopped: bool,
    /// The last slot number given.
    last_slot: u64,
}

/// A connection's place under the caps, freed when dropped.
pub(crate) struct Slot<'a> {
    limits: &'a Limits,
    id: u64,
    /// Whether it is counted as an inbound peer too ([`Slot::take_inbound`]).
    inbound: bool,
}

/// Takes a slot for a new connection, or refuses it with a `Busy` frame.
/// The count and the insert happen under one lock, so a burst of
/// connections cannot slip past the cap; and it is the lock [`stop`]
/// drains under, so a connection is either closed by `stop` or never
/// starts.
///
/// # Errors
///
/// [`Error::Closed`] if the node is stopping; [`Error::Busy`] if it is
/// full; [`Error::Io`] if the socket cannot be cloned.
fn take_slot<'a>(limits: &'a Limits, me: &str, stream: &TcpStream) -> Result<Slot<'a>> {
    let handle = stream.try_clone()?;
    let mut open = lock(limits);
    if open.stopped {
        return Err(Error::Closed); // dropping `stream` and `handle` closes it
    }
    if open.sockets.len() >= MAX_CONNECTIONS {
        drop(open); // writing to a socket is I/O: not under the lock
        let addr = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        warn!(target: me, "Refusing connection from {addr}: {MAX_CONNECTIONS} are open");
        let why = format!("the node has {MAX_CONNECTIONS} connections open; try later");
        // A fresh socket's send buffer takes one small frame without
        // blocking; if the write fails, the close says enough.
        let busy = Frame::Error { code: ErrorCode::Busy, message: why.clone() };
        let _ = write_frame(&mut &*stream, &busy);
        return Err(Error::Busy(why));
    }
    open.last_slot += 1;
    let id = open.last_slot;
    open.sockets.insert(id, handle);
    Ok(Slot { limits, id, inbound: false })
}

impl Slot<'_> {
    /// Counts the connection as one more inbound peer, unless `cap`
    /// ([`crate::Config::max_inbound_peers`]) are connected already.
    /// Counted before the peer registers, under one lock, so concurrent
    /// handshakes cannot slip past the cap either.
    fn take_inbound(&mut self, cap: usize) -> bool {
        let mut open = lock(self.limits);
        if open.inbound_peers >= cap {
            return false;
        }
        open.inbound_peers += 1;
        self.inbound = true;
        true
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut open = lock(self.limits);
        open.sockets.remove(&self.id);
        open.inbound_peers -= usize::from(self.inbound);
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
    // Drained and closed for good under one lock: a connection that has not
    // taken its slot yet never will (see `take_slot`).
    let mut open = lock(limits);
    open.stopped = true;
    let sockets: Vec<TcpStream> = open.sockets.drain().map(|(_, s)| s).collect();
    drop(open); // shutting sockets down is I/O: not under the lock
    for socket in sockets {
        let _ = socket.shutdown(Shutdown::Both);
    }
}
