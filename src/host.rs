//! The node as its hardening sees it: the core's narrow interface.
//!
//! The hardening modules (anti-entropy, discovery, liveness, the listener,
//! the command line's sessions, ...) stand on this trait, never on
//! `server`, where the diagrams happen. `server::Node` implements it; the
//! core calls the hardening at named hooks, and the hardening calls back
//! only through these methods. So the import graph runs one way: the
//! hardening knows the store, the peer map, the transport and this trait;
//! only `server` knows the hardening.
//!
//! Each hardening module keeps its own state in a struct of its own, which
//! the node holds and passes in. What one hardening module needs of
//! another (a dial, a connection run from handshake to close) is a method
//! here, which the node wires to that module.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use crate::error::Result;
use crate::hardening::checked::FileReader;
use crate::hardening::handshake::Hello;
use crate::store::Store;
use crate::support::config::{Config, FileInfo};
use crate::support::peers::PeerMap;
use crate::support::threads::Threads;
use crate::support::version::{NodeId, Version};
use crate::transport::Transport;

/// What a hardening module may ask of the node it hardens.
pub(crate) trait Host: Send + Sync {
    /// The node's name, for log lines.
    fn name(&self) -> &str;

    /// The node's id.
    fn id(&self) -> NodeId;

    /// The address the node's listener is bound to.
    fn listen_addr(&self) -> SocketAddr;

    /// How the node was set up.
    fn config(&self) -> &Config;

    /// The node's disk.
    fn store(&self) -> &Store;

    /// The node's peer connections.
    fn peers(&self) -> &PeerMap;

    /// The node's threads, and the flag that stops them.
    fn threads(&self) -> &Threads;

    /// Whether `version` is plausible by the node's clock (not implausibly
    /// far ahead); a plausible one moves the clock on.
    fn observe(&self, version: Version) -> bool;

    /// Diagram 2's go-ahead to `peer` for `key` at `version`, unless a copy
    /// of that version or newer is already on its way.
    fn fetch_unless_coming(&self, peer: &Transport, key: &str, version: Version);

    /// A connection, accepted or dialled, from its handshake to its close,
    /// on the calling thread (the listener's, which the node wires).
    ///
    /// # Errors
    ///
    /// Whatever refused or ended the connection.
    fn run_connection(self: Arc<Self>, stream: TcpStream, outbound: bool) -> Result<()>;

    /// A peer connection after its handshake: registered, then read until
    /// it closes, on the calling thread (the core's).
    ///
    /// # Errors
    ///
    /// Whatever ended the connection.
    fn run_peer(self: Arc<Self>, stream: TcpStream, hello: Hello, outbound: bool) -> Result<()>;

    /// Dials `addr` once, on a thread of its own, unless it is connected or
    /// being dialled already (discovery's, which the node wires).
    fn dial(self: Arc<Self>, addr: SocketAddr, why: &str);

    /// The API, for the command line's sessions: see `FileServer`.
    ///
    /// Stores `reader` under `key` as `FileServer::store` does, but
    /// returns once the file is written: `then` hears how the store ended,
    /// once its batch commit is durable. It runs on the committer thread
    /// (or, with none running, on this one).
    ///
    /// # Errors
    ///
    /// As `FileServer::store`, for what goes wrong before the commit.
    fn store_file_then(
        self: Arc<Self>,
        key: &str,
        reader: &mut dyn Read,
        then: Box<dyn FnOnce(Result<()>) + Send>,
    ) -> Result<()>;

    /// As `FileServer::get`.
    ///
    /// # Errors
    ///
    /// As `FileServer::get`.
    fn get(&self, key: &str) -> Result<FileReader>;

    /// As `FileServer::delete`.
    ///
    /// # Errors
    ///
    /// As `FileServer::delete`.
    fn delete(&self, key: &str) -> Result<()>;

    /// As `FileServer::clear`.
    ///
    /// # Errors
    ///
    /// As `FileServer::clear`.
    fn clear(&self) -> Result<()>;

    /// As `FileServer::list`.
    fn list(&self) -> Vec<FileInfo>;
}
