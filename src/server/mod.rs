//! `FileServer`: a gossipfs node. It owns the listener, the peer map and the
//! threads, and moves messages between the sockets, the gossip rules and the
//! disk store.
//!
//! # Files
//!
//! - this file: the public API ([`FileServer`], [`Config`]), the shared
//!   state of a node (`Node`), the local halves of the two diagrams
//!   (`Node::store`, `Node::get`), the peer map, threads and shutdown;
//! - `connection.rs`: accepting and dialling, the handshake's aftermath,
//!   and the reader loop that takes one frame at a time under the peer's
//!   transport lock;
//! - `replication.rs`: what a node does with each peer frame — the
//!   receiving halves of the diagrams, the relay, anti-entropy, membership;
//! - `session.rs`: command-line clients.
//!
//! # Threads
//!
//! - one **accept** thread, which hands each new connection to a connection
//!   thread;
//! - per connection, one **connection** thread, which runs the handshake and
//!   then the reader loop (`Node::read_loop`), and one **writer** thread
//!   ([`peer::write_loop`]);
//! - per bootstrap address, one **dialler**, which connects, runs that
//!   connection's reader loop itself, and redials with backoff when it ends;
//!   per address learned by discovery, a one-shot dialler that does the same
//!   once;
//! - one **anti-entropy** timer, which sends every peer a summary now and
//!   then;
//! - now and then, a **checking** thread that reads one of our files after a
//!   peer reported it corrupt.
//!
//! # Locks
//!
//! The peer map, the gossip state, the pending `get`s, the store's index and
//! a few small sets (`dialling`, `incoming`, `checking`, `sockets`) are each
//! behind their own `Mutex`, and each is a *leaf*: it is held to look up,
//! insert or remove, and released before any network I/O and before any
//! other lock is taken. (The store index alone is held across the disk
//! steps that must be atomic with it; see `store`.) The only lock held
//! across network I/O is a peer's transport (read) lock, held for one frame
//! and its stream; the leaf locks may be taken briefly while it is held,
//! never the other way round. So there is no lock cycle, and no thread
//! waits on a socket while holding anything another thread needs — except
//! that connection's own reader.

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::error::{Error, Result, lock};
use crate::frame::{
    DigestEntry, ErrorCode, Frame, ListingEntry, MAX_FRAME_LEN, Role, Sha1Digest, check_key,
    read_frame, write_frame,
};
use crate::gossip::{self, Gossip, Repair, Verdict};
use crate::handshake::{Hello, Identity, handshake};
use crate::peer::{self, Outbound, Peer, Stream, Traffic};
use crate::store::{FileReader, STREAM_BUFFER_LEN, Store};
use crate::version::{NodeId, Version};

mod connection;
mod replication;
mod session;

/// The first wait before redialling a bootstrap peer that did not answer.
pub const DIAL_RETRY_MIN: Duration = Duration::from_millis(100);

/// How long the accept thread waits after `accept` fails (out of file
/// descriptors, say) before it tries again.
pub const ACCEPT_RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// The longest wait between redials: the backoff doubles up to this.
pub const DIAL_RETRY_MAX: Duration = Duration::from_secs(5);

/// How long to wait for a TCP connection to a peer to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The default [`Config::idle_timeout`]: how long a connection may stay
/// silent — between frames or in the middle of a file — before it is
/// dropped.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The most connections (peers and clients, either direction) a node keeps
/// open at once. One more is answered with a `Busy` error frame and closed,
/// so a flood of connections cannot exhaust the node's threads and files.
pub const MAX_CONNECTIONS: usize = 256;

/// How many of our files may be re-checked at once after peers reported
/// them corrupt (each check is a thread reading a whole file).
pub const MAX_CHECKS: usize = 4;

/// How long a pulled key is left alone before anti-entropy may ask for it
/// again (the first pull may still be streaming a large file).
pub const PULL_RETRY_INTERVAL: Duration = Duration::from_secs(30);

/// How a node is set up.
#[derive(Clone, Debug)]
pub struct Config {
    /// A name for people: it starts every log line of this node.
    pub name: String,
    /// The address to listen on, used by [`FileServer::start`].
    pub listen: String,
    /// The directory the node keeps its files in.
    pub root: PathBuf,
    /// Peers to connect to at start, redialled with backoff while down.
    pub bootstrap: Vec<String>,
    /// Whether each commit is fsynced (file and directory). On by default;
    /// turn it off only for demos and benchmarks.
    pub fsync: bool,
    /// The cluster secret. With one, every connection must prove it knows it.
    pub secret: Option<Vec<u8>>,
    /// Whether this node starts anti-entropy: a summary to each new peer,
    /// then one every `anti_entropy_interval`. On by default. A node with it
    /// off still answers its peers' summaries (so they catch up from it) but
    /// never catches up by itself: only for tests and the benchmark, which
    /// need a file to stay on one node.
    pub anti_entropy: bool,
    /// How often the node compares its files with each peer's.
    pub anti_entropy_interval: Duration,
    /// How long a `get` waits for peers that have not answered.
    pub get_timeout: Duration,
    /// Whether the node connects to the peers its peers tell it about.
    pub discover_peers: bool,
    /// Discovery stops dialling new peers once the node has this many.
    pub max_peers: usize,
    /// How long a connection may stay silent before it is dropped, in the
    /// middle of a file as much as between frames (a stalled stream is
    /// abandoned and its partial file discarded). A peer connection uses at
    /// least three anti-entropy intervals, since the periodic summary is
    /// also its heartbeat; a client connection at least two get timeouts.
    pub idle_timeout: Duration,
}

impl Config {
    /// A config with the defaults: listen on an ephemeral loopback port,
    /// fsync on, no bootstrap peers, anti-entropy every 5 seconds.
    pub fn new(name: &str, root: impl Into<PathBuf>) -> Config {
        Config {
            name: name.to_string(),
            listen: "127.0.0.1:0".to_string(),
            root: root.into(),
            bootstrap: Vec::new(),
            fsync: true,
            secret: None,
            anti_entropy: true,
            anti_entropy_interval: Duration::from_secs(5),
            get_timeout: Duration::from_secs(10),
            discover_peers: true,
            max_peers: 8,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// A live file, as [`FileServer::list`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    /// The key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// The version of the store that wrote it.
    pub version: Version,
}

/// A connected peer, as [`FileServer::peers`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its node id.
    pub id: NodeId,
    /// Its name.
    pub name: String,
    /// The address it listens on.
    pub addr: String,
}

/// Counters, for tests, the benchmark and `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Changes received from peers and applied (stores, deletes, clears).
    pub changes_applied: u64,
    /// Changes received that had been seen before.
    pub duplicates_dropped: u64,
    /// Changes received that lost to something newer.
    pub stale_dropped: u64,
    /// Frames written to peers.
    pub frames_sent: u64,
    /// File content bytes streamed to peers.
    pub bytes_sent: u64,
    /// Frames read from peers.
    pub frames_received: u64,
}

/// A gossipfs node: the seed's `FileServer`. Dropping it shuts it down.
pub struct FileServer {
    node: Arc<Node>,
}

impl FileServer {
    /// Binds `config.listen` and starts the node.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the address cannot be bound or the root directory
    /// cannot be opened.
    pub fn start(config: Config) -> Result<FileServer> {
        let listener = TcpListener::bind(&config.listen)?;
        FileServer::start_on(listener, config)
    }

    /// Starts the node on an already-bound listener (tests bind port 0).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the root directory cannot be opened.
    pub fn start_on(listener: TcpListener, config: Config) -> Result<FileServer> {
        let store = Store::open(&config.name, &config.root, config.fsync)?;
        let listen_addr = listener.local_addr()?;
        let gossip = Gossip::new(store.node_id(), store.max_counter());
        let node = Arc::new(Node {
            listen_addr,
            store,
            gossip: Mutex::new(gossip),
            peers: Mutex::new(HashMap::new()),
            dialling: Mutex::new(HashSet::new()),
            checking: Mutex::new(HashSet::new()),
            pending: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
            sockets: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            next_socket: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            stop_lock: Mutex::new(()),
            stop_signal: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            counters: Counters::default(),
            traffic: Traffic::default(),
            config,
        });
        info!(
            target: node.name(),
            "Node started id={:016x} listen={} root={}",
            node.id(),
            listen_addr,
            node.config.root.display()
        );

        let accept_node = Arc::clone(&node);
        node.spawn(move || accept_node.accept_loop(listener));
        for addr in node.config.bootstrap.clone() {
            let dial_node = Arc::clone(&node);
            node.spawn(move || dial_node.dial_loop(addr));
        }
        if node.config.anti_entropy {
            let timer_node = Arc::clone(&node);
            node.spawn(move || timer_node.anti_entropy_loop());
        }
        Ok(FileServer { node })
    }

    /// Stores the bytes of `reader` under `key`, here and then on every
    /// node: saved locally first (streamed, hashed as it goes), then sent to
    /// every peer, which relays it on.
    ///
    /// Returns once the local copy is committed; replication continues in
    /// the background.
    ///
    /// # Errors
    ///
    /// [`Error::BadKey`] for a bad key; [`Error::Io`] if reading `reader` or
    /// writing the disk fails (nothing is stored then).
    pub fn store(&self, key: &str, mut reader: impl Read) -> Result<()> {
        self.node.store(key, &mut reader)
    }

    /// Returns the content stored under `key`: from the local disk if it is
    /// there, else fetched from a peer (and kept locally).
    ///
    /// The reader checks the content against its SHA-1 as it goes and fails
    /// at the end if they differ.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] if every peer says it has no such file;
    /// [`Error::Timeout`] if some peers never answered; [`Error::BadKey`],
    /// [`Error::Io`].
    pub fn get(&self, key: &str) -> Result<FileReader> {
        self.node.get(key)
    }

    /// Deletes `key` on every node.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] if this node holds no live file under `key`.
    pub fn delete(&self, key: &str) -> Result<()> {
        self.node.delete(key)
    }

    /// Deletes every file on every node. A store ordered after the clear —
    /// made on this node afterwards, or on any node that had already
    /// received the clear — survives it everywhere. A store made elsewhere
    /// at the same moment, before the clear reached that node, is
    /// concurrent with it: the two are ordered by version like any other
    /// pair of changes, and every node ends with the same outcome.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the local disk fails.
    pub fn clear(&self) -> Result<()> {
        self.node.clear()
    }

    /// The live files this node holds, sorted by key.
    pub fn list(&self) -> Vec<FileInfo> {
        self.node.list()
    }

    /// The peers this node is connected to, sorted by name.
    pub fn peers(&self) -> Vec<PeerInfo> {
        self.node.peer_infos()
    }

    /// The address the node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.node.listen_addr
    }

    /// The node's id.
    pub fn node_id(&self) -> NodeId {
        self.node.id()
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        self.node.name()
    }

    /// The node's counters.
    pub fn stats(&self) -> Stats {
        self.node.stats()
    }

    /// Stops the node: stops accepting, closes every connection and joins
    /// every thread. Also done on drop.
    pub fn shutdown(self) {
        // Drop does the work.
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.node.shutdown();
    }
}

/// What a `get` hears back from one peer.
#[derive(Debug)]
enum GetAnswer {
    /// The file arrived and is committed locally.
    Found,
    /// The peer has no live file under the key.
    NotFound,
    /// The peer's stream broke or failed its SHA-1 check.
    Failed(String),
}

/// A change that was applied locally and now goes to the peers.
#[derive(Clone, Debug)]
enum Change {
    Store { key: String, version: Version },
    Delete { key: String, version: Version },
    Clear(Version),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Store { key, version } => write!(f, "store key={key} version={version}"),
            Change::Delete { key, version } => write!(f, "delete key={key} version={version}"),
            Change::Clear(version) => write!(f, "clear version={version}"),
        }
    }
}

impl Change {
    /// The change's id (its version).
    fn version(&self) -> Version {
        match self {
            Change::Store { version, .. } | Change::Delete { version, .. } => *version,
            Change::Clear(version) => *version,
        }
    }

    /// What a peer's writer thread should send for it.
    fn outbound(&self) -> Outbound {
        match self {
            Change::Store { key, version } => Outbound::Store {
                key: key.clone(),
                version: *version,
            },
            Change::Delete { key, version } => Outbound::Frame(Frame::Delete {
                key: key.clone(),
                version: *version,
            }),
            Change::Clear(version) => Outbound::Frame(Frame::Clear { version: *version }),
        }
    }
}

/// Why a key's content is on its way to us.
#[derive(Clone, Copy, Debug)]
enum Incoming {
    /// A peer's store of it is streaming in right now.
    Streaming,
    /// Anti-entropy asked a peer for it at this moment.
    Pulled(Instant),
}

/// What the reader loop does once it has unlocked the transport layer.
enum After {
    Nothing,
    /// Relay a change that the frame applied.
    Relay(Change),
    /// Tell a waiting `get` what the peer answered.
    Answer(u64, GetAnswer),
}

/// The counters behind [`Stats`].
#[derive(Default)]
struct Counters {
    changes_applied: AtomicU64,
    duplicates_dropped: AtomicU64,
    stale_dropped: AtomicU64,
    frames_received: AtomicU64,
}

/// Everything a node's threads share.
struct Node {
    /// How the node was set up.
    config: Config,
    /// The address the listener is bound to.
    listen_addr: SocketAddr,
    /// The local disk store.
    store: Store,
    /// The clock and the seen-set. Leaf lock.
    gossip: Mutex<Gossip>,
    /// The connected peers, by node id: one connection per pair of nodes.
    /// Leaf lock: copy the `Arc<Peer>`s out, unlock, then do I/O.
    peers: Mutex<HashMap<NodeId, Arc<Peer>>>,
    /// Keys whose local copy is being checked after a peer's
    /// [`Frame::Corrupt`] notice. Leaf lock.
    checking: Mutex<HashSet<String>>,
    /// Addresses a discovery dial is under way to, so there is one at a time.
    dialling: Mutex<HashSet<SocketAddr>>,
    /// The `get`s waiting for answers, by request id. Leaf lock.
    /// Each answer names the connection it came from (`Peer::conn`).
    pending: Mutex<HashMap<u64, Sender<(u64, GetAnswer)>>>,
    /// Keys whose content is on its way to us, so anti-entropy does not ask
    /// for a file that is already coming (a large store takes longer than
    /// an anti-entropy interval to stream). Leaf lock.
    incoming: Mutex<HashMap<String, Incoming>>,
    /// Every open connection's socket, so shutdown can close even those
    /// still in their handshake.
    sockets: Mutex<HashMap<u64, TcpStream>>,
    /// The id of the next `get`.
    next_request: AtomicU64,
    /// The id of the next entry in `sockets`.
    next_socket: AtomicU64,
    /// Set once shutdown begins.
    stopping: AtomicBool,
    /// With `stop_signal`: lets timers wait "for this long, or until shutdown".
    stop_lock: Mutex<()>,
    /// Notified when shutdown begins.
    stop_signal: Condvar,
    /// Every thread the node started, joined at shutdown.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Gossip counters.
    counters: Counters,
    /// Frame counters, shared with the writer threads.
    traffic: Traffic,
}

impl Node {
    fn id(&self) -> NodeId {
        self.store.node_id()
    }

    fn name(&self) -> &str {
        &self.config.name
    }

    // -----------------------------------------------------------------------
    // The API: saving, getting, deleting, clearing
    // -----------------------------------------------------------------------

    /// Saving a file, the first sequence diagram, on the node the client
    /// called.
    fn store(&self, key: &str, reader: &mut dyn Read) -> Result<()> {
        check_key(key)?;
        self.check_running()?;
        debug!(target: self.name(), "Save file key={key}");
        let temp = self.store.write_temp(key, reader)?;
        let size = temp.size();
        let version = lock(&self.gossip).next_version();
        if !self.store.commit(temp, version)? {
            // A newer version from a peer landed while we were writing.
            info!(target: self.name(), "Store of key={key} lost to a newer version");
            return Ok(());
        }
        info!(target: self.name(), "Successfully stored file key={key} size={size} version={version}");
        // Send metadata (filename, size) and stream file data to every peer:
        // queued here, written by each peer's writer thread.
        self.relay(
            &Change::Store {
                key: key.to_string(),
                version,
            },
            None,
        );
        Ok(())
    }

    /// Getting a file, the second sequence diagram, on the requesting node.
    fn get(&self, key: &str) -> Result<FileReader> {
        check_key(key)?;
        self.check_running()?;
        debug!(target: self.name(), "Check local storage key={key}");
        if let Some(file) = self.store.open_file(key)? {
            debug!(target: self.name(), "File found locally key={key}");
            return Ok(file);
        }
        // Register for answers before looking at the peers: a connection
        // that closes after the snapshot below is then sure to be reported.
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        lock(&self.pending).insert(request, tx);
        let _pending = PendingGet {
            node: self,
            request,
        };
        let peers = self.peer_handles();
        if peers.is_empty() {
            return Err(Error::NotFound(key.to_string()));
        }
        debug!(
            target: self.name(),
            "File not found locally; broadcast getfile key={key} peers={}",
            peers.len()
        );
        for peer in &peers {
            peer.queue(Outbound::Frame(Frame::Get {
                request,
                key: key.to_string(),
            }));
        }

        // Wait for every asked connection to answer, or to close (a closed
        // connection counts as a failed answer, so `get` need not wait for
        // the timeout to learn that nobody has the key).
        let mut waiting: HashSet<u64> = peers.iter().map(|peer| peer.conn).collect();
        let deadline = Instant::now() + self.config.get_timeout;
        let mut failures = Vec::new();
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let (conn, answer) = match rx.recv_timeout(left) {
                Ok(answer) => answer,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::Timeout(format!("no peer sent {key:?} in time")));
                }
                Err(RecvTimeoutError::Disconnected) => return Err(Error::Closed),
            };
            if !waiting.remove(&conn) {
                continue; // a second answer, or one from a connection not asked
            }
            match answer {
                GetAnswer::Found => {
                    // Serve file: it is committed locally now.
                    if let Some(file) = self.store.open_file(key)? {
                        debug!(target: self.name(), "Serve file key={key}");
                        return Ok(file);
                    }
                }
                GetAnswer::NotFound => {}
                GetAnswer::Failed(why) => failures.push(why),
            }
        }
        if failures.is_empty() {
            Err(Error::NotFound(key.to_string()))
        } else {
            Err(Error::Protocol(format!(
                "every copy of {key:?} failed to arrive: {}",
                failures.join("; ")
            )))
        }
    }

    fn delete(&self, key: &str) -> Result<()> {
        check_key(key)?;
        self.check_running()?;
        if self.store.entry(key).is_none_or(|entry| entry.tombstone) {
            return Err(Error::NotFound(key.to_string()));
        }
        let version = lock(&self.gossip).next_version();
        if self.store.delete(key, version)? {
            info!(target: self.name(), "Successfully deleted file key={key} version={version}");
            self.relay(
                &Change::Delete {
                    key: key.to_string(),
                    version,
                },
                None,
            );
        }
        Ok(())
    }

    fn clear(&self) -> Result<()> {
        self.check_running()?;
        let version = lock(&self.gossip).next_version();
        self.store.clear(version)?;
        info!(target: self.name(), "Cleared every file version={version}");
        self.relay(&Change::Clear(version), None);
        Ok(())
    }

    fn list(&self) -> Vec<FileInfo> {
        let live = self.store.live().into_iter();
        live.map(|(key, entry)| FileInfo {
            key,
            size: entry.size,
            version: entry.version,
        })
        .collect()
    }

    fn peer_infos(&self) -> Vec<PeerInfo> {
        let mut infos: Vec<PeerInfo> = self
            .peer_handles()
            .iter()
            .map(|peer| PeerInfo {
                id: peer.id(),
                name: peer.name().to_string(),
                addr: peer.hello.listen_addr.clone(),
            })
            .collect();
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        infos
    }

    fn stats(&self) -> Stats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Stats {
            changes_applied: get(&self.counters.changes_applied),
            duplicates_dropped: get(&self.counters.duplicates_dropped),
            stale_dropped: get(&self.counters.stale_dropped),
            frames_sent: get(&self.traffic.frames_sent),
            bytes_sent: get(&self.traffic.bytes_sent),
            frames_received: get(&self.counters.frames_received),
        }
    }

    fn check_running(&self) -> Result<()> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    // -----------------------------------------------------------------------
    // The peer map
    // -----------------------------------------------------------------------

    /// A snapshot of the connected peers. The map is locked only to copy the
    /// handles out; callers then do their I/O with no lock held.
    fn peer_handles(&self) -> Vec<Arc<Peer>> {
        lock(&self.peers).values().cloned().collect()
    }

    /// Queues `change` for every peer but `from` and the change's origin.
    fn relay(&self, change: &Change, from: Option<NodeId>) {
        let peers = lock(&self.peers);
        let ids: Vec<NodeId> = peers.keys().copied().collect();
        let targets: Vec<Arc<Peer>> = gossip::relay_targets(&ids, from, change.version().node)
            .into_iter()
            .filter_map(|id| peers.get(&id).cloned())
            .collect();
        // Unlock before queueing: the map is a leaf lock.
        drop(peers);
        for peer in targets {
            debug!(target: self.name(), "Relaying {change} to peer={}", peer.name());
            peer.queue(change.outbound());
        }
    }

    /// Adds a peer to the map. If a connection to the same node is already
    /// there, keeps exactly one of the two by a rule both ends apply alike,
    /// and closes the other. Returns whether `peer` is the one kept.
    fn register(&self, peer: &Arc<Peer>) -> bool {
        let mut peers = lock(&self.peers);
        let Some(existing) = peers.get(&peer.id()) else {
            peers.insert(peer.id(), Arc::clone(peer));
            return true;
        };
        // Both ends must pick the same connection, from facts both know:
        // prefer the one dialled by the smaller node id, and between two
        // dialled by the same node, the one whose dialler sent the smaller
        // nonce in its Hello.
        let smaller_id = self.id().min(peer.id());
        let dialler = |p: &Peer| if p.outbound { self.id() } else { p.id() };
        let rank = |p: &Peer| (dialler(p) != smaller_id, p.hello.dialler_nonce);
        if rank(peer) >= rank(existing) {
            return false;
        }
        let replaced = peers.insert(peer.id(), Arc::clone(peer));
        // Unlock before closing the loser: closing a socket is I/O.
        drop(peers);
        if let Some(replaced) = replaced {
            debug!(target: self.name(), "Replacing duplicate connection to peer={}", peer.name());
            replaced.close();
        }
        true
    }

    /// Removes a peer from the map, if this very connection is still the
    /// one registered (it may have been replaced by a duplicate's winner).
    fn unregister(&self, peer: &Peer) {
        let mut peers = lock(&self.peers);
        if peers.get(&peer.id()).is_some_and(|p| p.conn == peer.conn) {
            peers.remove(&peer.id());
            drop(peers);
            info!(
                target: self.name(),
                "Peer left peer={} addr={}",
                peer.name(),
                peer.hello.listen_addr
            );
        }
    }

    /// Whether a peer listening on `addr` is connected: by the address it
    /// advertised, or, for a connection we dialled, by the address we
    /// dialled (a node listening on 0.0.0.0 advertises that, which matches
    /// no address anyone dials).
    fn connected_to(&self, addr: SocketAddr) -> bool {
        let peers = lock(&self.peers);
        peers
            .values()
            .any(|p| (p.outbound && p.addr == addr) || p.hello.listen_addr.parse() == Ok(addr))
    }

    // -----------------------------------------------------------------------
    // Threads and shutdown
    // -----------------------------------------------------------------------

    /// Starts a thread and keeps its handle for shutdown to join.
    fn spawn(&self, work: impl FnOnce() + Send + 'static) {
        let mut threads = lock(&self.threads);
        // Forget the handles of threads that are done, so the list stays
        // as long as the number of live threads.
        threads.retain(|handle| !handle.is_finished());
        threads.push(thread::spawn(work));
    }

    /// Waits for `timeout` or until shutdown begins; true if it has.
    fn wait_for_stop(&self, timeout: Duration) -> bool {
        let guard = lock(&self.stop_lock);
        let (_guard, _) = self
            .stop_signal
            .wait_timeout_while(guard, timeout, |_| !self.stopping.load(Ordering::SeqCst))
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.stopping.load(Ordering::SeqCst)
    }

    /// Stops accepting, closes every socket, wakes every timer and joins
    /// every thread.
    fn shutdown(&self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        info!(target: self.name(), "Shutting down");
        {
            // Take the lock so no timer misses the notification between its
            // check and its wait.
            let _guard = lock(&self.stop_lock);
            self.stop_signal.notify_all();
        }
        // Wake the accept thread, blocked in accept(), with a connection of
        // our own; it sees the flag and stops.
        let mut wake = self.listen_addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let _ = TcpStream::connect_timeout(&wake, CONNECT_TIMEOUT);
        for peer in self.peer_handles() {
            peer.close();
        }
        let sockets: Vec<TcpStream> = lock(&self.sockets).drain().map(|(_, s)| s).collect();
        for socket in sockets {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        // Threads may start others while stopping (a connection accepted
        // just now), so join until none are left.
        loop {
            let threads = std::mem::take(&mut *lock(&self.threads));
            if threads.is_empty() {
                break;
            }
            for thread in threads {
                let _ = thread.join();
            }
        }
        info!(target: self.name(), "Node stopped");
    }
}

/// Removes a `get`'s entry from the pending map when the `get` returns, by
/// any path.
struct PendingGet<'a> {
    node: &'a Node,
    request: u64,
}

impl Drop for PendingGet<'_> {
    fn drop(&mut self) {
        lock(&self.node.pending).remove(&self.request);
    }
}
