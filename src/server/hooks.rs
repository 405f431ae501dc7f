//! The node's side of `host::Host`: where the hardening calls back into
//! the core. Each method is a narrow door: a read-only view of the node's
//! parts, the fetch the hardening may start, and the hooks that hand work
//! to another hardening module (a connection to the listener, a dial to
//! discovery) or back to the core (a peer after its handshake).

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use super::Node;
use crate::error::{Result, lock};
use crate::hardening::checked::FileReader;
use crate::hardening::handshake::Hello;
use crate::hardening::{discovery, listener};
use crate::host::Host;
use crate::store::Store;
use crate::support::config::{Config, FileInfo};
use crate::support::peers::PeerMap;
use crate::support::threads::Threads;
use crate::support::version::{NodeId, Version, wall_millis};
use crate::transport::Transport;

/// The hardening's view of the node: each method a narrow door into the
/// core (see `host`).
impl Host for Node {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn id(&self) -> NodeId {
        self.store.node
    }

    fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    fn config(&self) -> &Config {
        &self.config
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn peers(&self) -> &PeerMap {
        &self.peers
    }

    fn threads(&self) -> &Threads {
        &self.threads
    }

    fn observe(&self, version: Version) -> bool {
        lock(&self.gossip).observe(version, wall_millis())
    }

    fn fetch_unless_coming(&self, peer: &Transport, key: &str, version: Version) {
        Node::fetch(self, peer, key, version, false);
    }

    fn run_connection(self: Arc<Self>, stream: TcpStream, outbound: bool) -> Result<()> {
        let host = self.host();
        listener::run_connection(host, &self.hardening.limits, stream, outbound)
    }

    fn run_peer(self: Arc<Self>, stream: TcpStream, hello: Hello, outbound: bool) -> Result<()> {
        Node::run_peer(&self, stream, hello, outbound)
    }

    fn dial(self: Arc<Self>, addr: SocketAddr, why: &str) {
        discovery::dial_once(self.host(), &self.hardening.discovery, addr, why);
    }

    fn store_file_then(
        self: Arc<Self>,
        key: &str,
        reader: &mut dyn Read,
        then: Box<dyn FnOnce(Result<()>) + Send>,
    ) -> Result<()> {
        Node::store_file_then(&self, key, reader, then)
    }

    fn get(&self, key: &str) -> Result<FileReader> {
        Node::get(self, key)
    }

    fn delete(&self, key: &str) -> Result<()> {
        Node::delete(self, key)
    }

    fn clear(&self) -> Result<()> {
        Node::clear(self)
    }

    fn list(&self) -> Vec<FileInfo> {
        Node::list(self)
    }
}
