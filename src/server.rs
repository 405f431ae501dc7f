//! `FileServer`: a gossipfs node. It owns the listener, the peer map and the
//! threads, and moves messages between the sockets, the gossip rules and the
//! disk store.
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
use crate::peer::{self, Hello, Identity, Outbound, Peer, Stream, Traffic};
use crate::store::{FileReader, STREAM_BUFFER_LEN, Store};
use crate::version::{NodeId, Version};

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
    // Connections
    // -----------------------------------------------------------------------

    /// The accept thread: one connection thread per accepted socket.
    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        for stream in listener.incoming() {
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            let stream = match stream {
                Ok(stream) => stream,
                Err(err) => {
                    // Out of file descriptors, say: back off a little rather
                    // than spin, and keep serving the connections we have.
                    warn!(target: self.name(), "Accept failed: {err}");
                    self.wait_for_stop(ACCEPT_RETRY_INTERVAL);
                    continue;
                }
            };
            let socket = match self.track(&stream) {
                Ok(Some(socket)) => socket,
                Ok(None) => {
                    self.refuse_busy(&stream);
                    continue;
                }
                Err(err) => {
                    warn!(target: self.name(), "Dropping a new connection: {err}");
                    continue;
                }
            };
            let node = Arc::clone(&self);
            self.spawn(move || {
                let addr = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                if let Err(err) = node.run_connection(stream, false) {
                    info!(target: node.name(), "Connection from {addr} ended: {err}");
                }
                drop(socket); // the connection is over: free its slot
            });
        }
        debug!(target: self.name(), "Accept loop stopped");
    }

    /// Registers a new connection's socket, so shutdown can close it
    /// whatever state it is in, and counts it against [`MAX_CONNECTIONS`]:
    /// `None` if the node is full. The count and the insert happen under one
    /// lock, so a burst of connections cannot slip past the limit.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the socket cannot be cloned.
    fn track(self: &Arc<Self>, stream: &TcpStream) -> Result<Option<SocketGuard>> {
        let handle = stream.try_clone()?;
        let mut sockets = lock(&self.sockets);
        if sockets.len() >= MAX_CONNECTIONS {
            return Ok(None);
        }
        let id = self.next_socket.fetch_add(1, Ordering::Relaxed);
        sockets.insert(id, handle);
        Ok(Some(SocketGuard {
            node: Arc::clone(self),
            id,
        }))
    }

    /// Turns away a connection over [`MAX_CONNECTIONS`] with a `Busy` error.
    fn refuse_busy(&self, stream: &TcpStream) {
        let addr = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        warn!(target: self.name(), "Refusing connection from {addr}: {MAX_CONNECTIONS} are open");
        let busy = Frame::Error {
            code: ErrorCode::Busy,
            message: format!("the node has {MAX_CONNECTIONS} connections open; try later"),
        };
        // A fresh socket's send buffer takes one small frame without
        // blocking; if the write fails, the close says enough.
        let _ = write_frame(&mut &*stream, &busy);
    }

    /// A bootstrap dialler: keeps this node connected to `addr`, redialling
    /// with exponential backoff while it is unreachable.
    fn dial_loop(self: Arc<Self>, addr: String) {
        let mut backoff = DIAL_RETRY_MIN;
        while !self.stopping.load(Ordering::SeqCst) {
            let target = match resolve(&addr) {
                Ok(target) => target,
                Err(err) => {
                    warn!(target: self.name(), "Cannot resolve bootstrap peer {addr}: {err}");
                    self.wait_for_stop(DIAL_RETRY_MAX);
                    continue;
                }
            };
            // Connected already (it dialled us, and that connection won).
            if self.connected_to(target) {
                self.wait_for_stop(DIAL_RETRY_MAX);
                continue;
            }
            match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    let started = Instant::now();
                    let ended = self
                        .track(&stream)
                        .and_then(|socket| {
                            socket.ok_or(Error::Protocol("no free connection slot".into()))
                        })
                        .and_then(|_socket| self.run_connection(stream, true));
                    if let Err(err) = ended {
                        info!(target: self.name(), "Connection to {addr} ended: {err}");
                    }
                    // A connection that lasted was a real one: after it, try
                    // again soon. One that ended at once (refused, a wrong
                    // secret, a duplicate) backs off like a failed dial, so
                    // it never turns into a busy loop.
                    if started.elapsed() >= DIAL_RETRY_MAX {
                        backoff = DIAL_RETRY_MIN;
                    }
                }
                Err(err) => {
                    debug!(target: self.name(), "Cannot reach {addr} ({err}); retrying in {backoff:?}");
                }
            }
            self.wait_for_stop(backoff);
            backoff = (backoff * 2).min(DIAL_RETRY_MAX);
        }
    }

    /// Dials a peer we were told about, once.
    fn dial_once(self: &Arc<Self>, target: SocketAddr) {
        if !lock(&self.dialling).insert(target) {
            return; // already under way
        }
        let node = Arc::clone(self);
        self.spawn(move || {
            // `run_connection` takes the target out of `dialling` once the
            // handshake is done; this catches every way of failing before.
            let result = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
                .map_err(Error::from)
                .and_then(|stream| {
                    let socket = node.track(&stream)?;
                    let _socket =
                        socket.ok_or(Error::Protocol("no free connection slot".into()))?;
                    node.run_connection(stream, true)
                });
            lock(&node.dialling).remove(&target);
            if let Err(err) = result {
                info!(target: node.name(), "Connection to {target} ended: {err}");
            }
        });
    }

    /// One connection, from handshake to close. Runs on the connection's own
    /// thread and returns when the connection ends.
    ///
    /// The caller has registered the socket with [`Node::track`] and holds
    /// its guard until this returns.
    fn run_connection(self: &Arc<Self>, stream: TcpStream, outbound: bool) -> Result<()> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let hello = peer::handshake(&stream, &self.identity(), outbound)?;
        if outbound {
            // A discovery dial stops counting as "under way" once it has a
            // handshake: from here it is a peer, or it is dropped.
            lock(&self.dialling).remove(&stream.peer_addr()?);
        }
        match hello.role {
            Role::Peer => self.run_peer(stream, hello, outbound),
            Role::Client => self.serve_client(stream),
        }
    }

    /// A command-line client's session (see `client`): one request at a
    /// time, each answered before the next is read. The session runs on the
    /// connection's own thread and writes its answers itself: a client never
    /// streams to us while we stream to it, so the deadlock that peers'
    /// writer threads prevent cannot happen here.
    fn serve_client(self: &Arc<Self>, stream: TcpStream) -> Result<()> {
        let idle = (self.config.idle_timeout).max(self.config.get_timeout.saturating_mul(2));
        stream.set_read_timeout(Some(idle))?;
        stream.set_write_timeout(Some(peer::WRITE_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let addr = stream.peer_addr()?;
        debug!(target: self.name(), "Client connected addr={addr}");
        let mut reader = BufReader::with_capacity(STREAM_BUFFER_LEN, stream.try_clone()?);
        let mut writer = BufWriter::with_capacity(STREAM_BUFFER_LEN, stream);
        loop {
            let request = match read_frame(&mut reader) {
                Ok(Some(request)) => request,
                Ok(None) => break,
                Err(err) => {
                    // Say why before closing: a bad key or a bad frame.
                    let code = error_code(&err);
                    let reply = Frame::Error {
                        code,
                        message: err.to_string(),
                    };
                    let _ = write_frame(&mut writer, &reply).and_then(|()| Ok(writer.flush()?));
                    return Err(err);
                }
            };
            // Changes from a client carry content or end the session on
            // error; a failed query (a missing key) leaves the session open.
            let fatal = matches!(request, Frame::Put { .. }) || !is_client_request(&request);
            if let Err(err) = self.client_request(request, &mut reader, &mut writer) {
                let reply = Frame::Error {
                    code: error_code(&err),
                    message: err.to_string(),
                };
                write_frame(&mut writer, &reply)?;
                writer.flush()?;
                if fatal || matches!(err, Error::Io(_)) {
                    return Err(err);
                }
            }
            writer.flush()?;
        }
        debug!(target: self.name(), "Client disconnected addr={addr}");
        Ok(())
    }

    /// Answers one client request.
    fn client_request(
        &self,
        request: Frame,
        reader: &mut impl Read,
        writer: &mut impl Write,
    ) -> Result<()> {
        match request {
            Frame::Put { key } => {
                check_key(&key)?;
                let mut content = ChunkReader::new(reader);
                self.store(&key, &mut content)?;
                write_frame(writer, &Frame::Ok)
            }
            Frame::Get { request, key } => {
                let file = match self.get(&key) {
                    Err(Error::NotFound(_)) => {
                        return write_frame(writer, &Frame::NotFound { request, key });
                    }
                    other => other?,
                };
                let entry = file.entry().clone();
                let header = Frame::File {
                    request,
                    key,
                    version: entry.version,
                    size: entry.size,
                    sha1: entry.sha1,
                };
                write_frame(writer, &header)?;
                // Read through the checking reader: a file found corrupt here
                // is taken out of service (and the client, which checks the
                // SHA-1 too, rejects the bytes).
                let mut file = file;
                let sent = std::io::copy(&mut file, writer)?;
                if sent != entry.size {
                    return Err(Error::Io(std::io::Error::other(
                        "the local file is shorter than its header says",
                    )));
                }
                Ok(())
            }
            Frame::Remove { key } => {
                self.delete(&key)?;
                write_frame(writer, &Frame::Ok)
            }
            Frame::ClearAll => {
                self.clear()?;
                write_frame(writer, &Frame::Ok)
            }
            Frame::List => {
                let entries: Vec<ListingEntry> = self
                    .list()
                    .into_iter()
                    .map(|file| ListingEntry {
                        key: file.key,
                        size: file.size,
                        version: file.version,
                    })
                    .collect();
                let chunks = chunks_within_frame(entries, |e| 2 + e.key.len() + 8 + 16);
                let last = chunks.len() - 1;
                for (i, chunk) in chunks.into_iter().enumerate() {
                    let frame = Frame::Listing {
                        entries: chunk,
                        done: i == last,
                    };
                    write_frame(writer, &frame)?;
                }
                Ok(())
            }
            Frame::Status => {
                let files = self.list();
                let peers = self.peer_infos().into_iter();
                let reply = Frame::StatusReply {
                    name: self.config.name.clone(),
                    node: self.id(),
                    listen_addr: self.listen_addr.to_string(),
                    peers: peers.map(|p| format!("{} ({})", p.name, p.addr)).collect(),
                    files: files.len() as u64,
                    bytes: files.iter().map(|f| f.size).sum(),
                };
                write_frame(writer, &reply)
            }
            other => Err(Error::Protocol(format!(
                "a client may not send {:?} frames",
                other.tag()
            ))),
        }
    }

    /// Who we are, for the handshake.
    fn identity(&self) -> Identity {
        Identity {
            role: Role::Peer,
            node: self.id(),
            name: self.config.name.clone(),
            listen_addr: self.listen_addr.to_string(),
            secret: self.config.secret.clone(),
        }
    }

    /// A peer connection after its handshake: start its writer, register
    /// it, greet it, and read from it until it closes.
    fn run_peer(self: &Arc<Self>, stream: TcpStream, hello: Hello, outbound: bool) -> Result<()> {
        if hello.node == self.id() {
            return Err(Error::Protocol("connected to ourselves".into()));
        }
        let idle =
            (self.config.idle_timeout).max(self.config.anti_entropy_interval.saturating_mul(3));
        let (peer, writer, rx) = Peer::new(self.name(), stream, hello, outbound, idle)?;
        let peer = Arc::new(peer);
        let node = Arc::clone(self);
        self.spawn(move || {
            if let Err(err) = peer::write_loop(writer, rx, &node.store, &node.traffic, node.name())
            {
                debug!(target: node.name(), "Writer stopped: {err}");
            }
        });
        if !self.register(&peer) {
            debug!(target: self.name(), "Dropping duplicate connection to peer={}", peer.name());
            peer.close();
            return Ok(());
        }
        info!(
            target: self.name(),
            "Connected to peer={} addr={} id={:016x}",
            peer.name(),
            peer.hello.listen_addr,
            peer.id()
        );
        self.greet(&peer);
        let result = self.read_loop(&peer);
        self.unregister(&peer);
        peer.close();
        self.answer_closed(peer.conn);
        result
    }

    /// A new peer hears who else we know and what we hold.
    fn greet(&self, peer: &Peer) {
        if self.config.discover_peers {
            peer.queue(Outbound::Frame(self.peers_frame()));
        }
        if self.config.anti_entropy {
            peer.queue(Outbound::Frame(self.summary_frame()));
        }
    }

    /// The reader loop of one peer connection: one frame at a time, each
    /// handled under the transport lock; relays and answers happen after the
    /// lock is released.
    fn read_loop(self: &Arc<Self>, peer: &Arc<Peer>) -> Result<()> {
        loop {
            let next = peer.read_next(|frame, stream| self.handle(peer, frame, stream))?;
            let Some(after) = next else {
                return Ok(()); // the peer closed the connection
            };
            self.counters
                .frames_received
                .fetch_add(1, Ordering::Relaxed);
            match after {
                After::Nothing => {}
                After::Relay(change) => self.relay(&change, Some(peer.id())),
                After::Answer(request, answer) => self.answer(request, peer.conn, answer),
            }
        }
    }

    /// Handles one frame from a peer, with that peer's transport lock held.
    /// `stream` holds the frame's file bytes, if it announced any.
    fn handle(self: &Arc<Self>, peer: &Peer, frame: Frame, stream: &mut Stream) -> Result<After> {
        match frame {
            Frame::Store {
                key,
                version,
                size,
                sha1,
            } => self.on_store(peer, key, version, size, sha1, stream),
            Frame::Delete { key, version } => self.on_delete(peer, key, version),
            Frame::Clear { version } => self.on_clear(peer, version),
            Frame::Get { request, key } => {
                // The peer side of the get diagram: "peer receives getfile".
                // The reader never writes: the writer sends the metadata and
                // streams the file (or says not found).
                debug!(target: self.name(), "Peer receives getfile key={key} from={}", peer.name());
                peer.queue(Outbound::File { request, key });
                Ok(After::Nothing)
            }
            Frame::File {
                request,
                key,
                version,
                size,
                sha1,
            } => self.on_file(peer, request, key, version, size, sha1, stream),
            Frame::NotFound { request, key } => {
                debug!(target: self.name(), "Peer has no file key={key} peer={}", peer.name());
                lock(&self.incoming).remove(&key);
                Ok(After::Answer(request, GetAnswer::NotFound))
            }
            Frame::Summary { hash, count, .. } => {
                self.on_summary(peer, hash, count);
                Ok(After::Nothing)
            }
            Frame::Digest { cleared, entries } => {
                self.on_digest(peer, cleared, &entries)?;
                Ok(After::Nothing)
            }
            Frame::Peers { addrs } => {
                self.on_peers(&addrs);
                Ok(After::Nothing)
            }
            Frame::Corrupt { key, version } => {
                self.on_corrupt(peer, key, version);
                Ok(After::Nothing)
            }
            Frame::Error { code, message } => Err(Error::Protocol(format!(
                "the peer closed the connection ({code:?}): {message}"
            ))),
            other => Err(Error::Protocol(format!(
                "a peer may not send {:?} frames",
                other.tag()
            ))),
        }
    }

    /// A peer's store: the receiving half of the save diagram.
    fn on_store(
        &self,
        peer: &Peer,
        key: String,
        version: Version,
        size: u64,
        sha1: Sha1Digest,
        stream: &mut Stream,
    ) -> Result<After> {
        debug!(
            target: self.name(),
            "Received metadata (filename, size) key={key} size={size} version={version} from={}",
            peer.name()
        );
        if !self.accept_change(peer, &key, version) {
            return Ok(After::Nothing); // the unread bytes are drained by read_next
        }
        lock(&self.incoming).insert(key.clone(), Incoming::Streaming);
        let committed = self
            .store
            .receive_temp(&key, stream, size, &sha1)
            .and_then(|temp| self.store.commit(temp, version));
        lock(&self.incoming).remove(&key);
        let committed = match committed {
            Ok(committed) => committed,
            Err(err) => {
                // Let another copy of this change (from another peer) in.
                lock(&self.gossip).forget(version);
                return self.discard_stream(peer, &key, version, err, stream);
            }
        };
        if !committed {
            return Ok(After::Nothing);
        }
        self.counters
            .changes_applied
            .fetch_add(1, Ordering::Relaxed);
        info!(
            target: self.name(),
            "Successfully stored file key={key} size={size} version={version} from={}",
            peer.name()
        );
        Ok(After::Relay(Change::Store { key, version }))
    }

    fn on_delete(&self, peer: &Peer, key: String, version: Version) -> Result<After> {
        if !self.accept_change(peer, &key, version) || !self.store.delete(&key, version)? {
            return Ok(After::Nothing);
        }
        self.counters
            .changes_applied
            .fetch_add(1, Ordering::Relaxed);
        info!(target: self.name(), "Deleted file key={key} version={version} from={}", peer.name());
        Ok(After::Relay(Change::Delete { key, version }))
    }

    fn on_clear(&self, peer: &Peer, version: Version) -> Result<After> {
        // Read the store first: the gossip lock is a leaf, never held while
        // taking the store's index lock.
        let cleared = self.store.cleared();
        let verdict = lock(&self.gossip).receive(version, None, cleared);
        if !self.count_verdict(peer, "clear", verdict, version) || !self.store.clear(version)? {
            return Ok(After::Nothing);
        }
        self.counters
            .changes_applied
            .fetch_add(1, Ordering::Relaxed);
        info!(target: self.name(), "Cleared every file version={version} from={}", peer.name());
        Ok(After::Relay(Change::Clear(version)))
    }

    /// The gossip guard for a store or delete of `key`: true if it is new
    /// and newer than what we hold.
    fn accept_change(&self, peer: &Peer, key: &str, version: Version) -> bool {
        // Read the store first: the gossip lock is a leaf, never held while
        // taking the store's index lock.
        let held = self.store.entry(key).map(|entry| entry.version);
        let cleared = self.store.cleared();
        let verdict = lock(&self.gossip).receive(version, held, cleared);
        self.count_verdict(peer, key, verdict, version)
    }

    /// Counts and logs a gossip verdict; true for [`Verdict::Apply`].
    fn count_verdict(&self, peer: &Peer, what: &str, verdict: Verdict, version: Version) -> bool {
        let counter = match verdict {
            Verdict::Apply => return true,
            Verdict::Duplicate => &self.counters.duplicates_dropped,
            Verdict::Stale | Verdict::Implausible => &self.counters.stale_dropped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        debug!(
            target: self.name(),
            "Dropping {verdict:?} change {what} version={version} from={}",
            peer.name()
        );
        false
    }

    /// A file a peer sent in answer to our `Get`: the requesting half of the
    /// get diagram (stream it under the lock, store it; the waiting `get`
    /// is told after the unlock).
    #[allow(clippy::too_many_arguments)]
    fn on_file(
        &self,
        peer: &Peer,
        request: u64,
        key: String,
        version: Version,
        size: u64,
        sha1: Sha1Digest,
        stream: &mut Stream,
    ) -> Result<After> {
        debug!(
            target: self.name(),
            "Received metadata (filename, size) key={key} size={size} from={}; stream file data",
            peer.name()
        );
        if !lock(&self.gossip).observe(version) {
            warn!(target: self.name(), "Refusing file key={key} version={version} from={}: the version is implausibly far ahead", peer.name());
            let why = "its version is implausibly far ahead".to_string();
            self.answer(request, peer.conn, GetAnswer::Failed(why));
            return Ok(After::Nothing); // the bytes are drained by read_next
        }
        let received = self
            .store
            .receive_temp(&key, stream, size, &sha1)
            .and_then(|temp| self.store.commit(temp, version));
        lock(&self.incoming).remove(&key);
        let committed = match received {
            Ok(committed) => committed,
            Err(err) => {
                // Tell the waiting get now: it goes on with the other peers.
                let why = format!("from {}: {err}", peer.name());
                self.answer(request, peer.conn, GetAnswer::Failed(why));
                return self.discard_stream(peer, &key, version, err, stream);
            }
        };
        if committed {
            debug!(target: self.name(), "Saved file key={key} size={size} version={version} from={}", peer.name());
        }
        // Found if we hold it now, whether this copy or an equal one that
        // arrived first; not found if something newer (a delete) beat it.
        let live = self.store.entry(&key).is_some_and(|entry| !entry.tombstone);
        let answer = if live {
            GetAnswer::Found
        } else {
            GetAnswer::NotFound
        };
        Ok(After::Answer(request, answer))
    }

    /// What a failed file stream costs: if every announced byte was read
    /// (the SHA-1 did not match, or the disk refused the file), the
    /// connection is still in step and stays open — the file is dropped and
    /// anti-entropy or the next `get` tries again. If the stream broke
    /// halfway, the error closes the connection.
    ///
    /// Bytes that arrived whole but failed their SHA-1 (a protocol error,
    /// where a disk error is an I/O one) mean the sender's copy is bad: we
    /// tell it so with a [`Frame::Corrupt`] notice.
    fn discard_stream(
        &self,
        peer: &Peer,
        key: &str,
        version: Version,
        err: Error,
        stream: &Stream,
    ) -> Result<After> {
        if stream.limit() > 0 {
            return Err(err);
        }
        warn!(target: self.name(), "Discarded file key={key} from={}: {err}", peer.name());
        if matches!(err, Error::Protocol(_)) {
            let key = key.to_string();
            peer.queue(Outbound::Frame(Frame::Corrupt { key, version }));
        }
        Ok(After::Nothing)
    }

    /// A peer says the bytes we sent for `key` failed their SHA-1. Check our
    /// copy on a thread of its own (it may be large): reading it through
    /// the checking [`FileReader`] takes it out of service if it is bad.
    /// One check per key at a time, however many notices arrive.
    fn on_corrupt(self: &Arc<Self>, peer: &Peer, key: String, version: Version) {
        let ours = self.store.entry(&key).map(|entry| entry.version);
        if ours != Some(version) || !lock(&self.checking).insert(key.clone()) {
            return; // not the copy we hold now, or already being checked
        }
        warn!(target: self.name(), "Checking our copy of key={key} version={version}: peer={} found it corrupt", peer.name());
        let node = Arc::clone(self);
        self.spawn(move || {
            let checked = node
                .store
                .open_file(&key)
                .and_then(|file| match file {
                    Some(mut file) => Ok(std::io::copy(&mut file, &mut std::io::sink())?),
                    None => Ok(0),
                });
            match checked {
                Ok(_) => info!(target: node.name(), "Our copy of key={key} is sound"),
                Err(err) => warn!(target: node.name(), "Our copy of key={key} is bad and was set aside: {err}"),
            }
            lock(&node.checking).remove(&key);
        });
    }

    /// Hands a peer's answer to the `get` waiting for it, if any (request 0,
    /// an anti-entropy pull, has none; a `get` that timed out has gone).
    fn answer(&self, request: u64, conn: u64, answer: GetAnswer) {
        let waiter = lock(&self.pending).get(&request).cloned();
        if let Some(waiter) = waiter {
            let _ = waiter.send((conn, answer));
        }
    }

    /// Tells every waiting `get` that connection `conn` closed: whatever it
    /// was asked, it will not answer. For a `get`, a peer that is gone does
    /// not have the file: if no other peer has it either, the key is not
    /// found on any node we can reach.
    fn answer_closed(&self, conn: u64) {
        let waiters: Vec<_> = lock(&self.pending).values().cloned().collect();
        for waiter in waiters {
            let _ = waiter.send((conn, GetAnswer::NotFound));
        }
    }

    // -----------------------------------------------------------------------
    // Anti-entropy and membership
    // -----------------------------------------------------------------------

    /// The anti-entropy timer: every interval, each peer gets our summary
    /// (and, with discovery on, our list of peers).
    fn anti_entropy_loop(self: Arc<Self>) {
        while !self.wait_for_stop(self.config.anti_entropy_interval) {
            let peers = self.peer_handles();
            if peers.is_empty() {
                continue;
            }
            let summary = self.summary_frame();
            let peers_frame = self.peers_frame();
            for peer in peers {
                peer.queue(Outbound::Frame(summary.clone()));
                if self.config.discover_peers {
                    peer.queue(Outbound::Frame(peers_frame.clone()));
                }
            }
        }
    }

    fn summary_frame(&self) -> Frame {
        let (cleared, entries) = self.store.digest();
        Frame::Summary {
            cleared,
            hash: gossip::summary_hash(cleared, &entries),
            count: entries.len() as u64,
        }
    }

    fn peers_frame(&self) -> Frame {
        let peers = self.peer_handles().into_iter();
        let addrs = peers.map(|p| p.hello.listen_addr.clone()).collect();
        Frame::Peers { addrs }
    }

    /// A peer's summary: if it differs from ours, send our whole digest so
    /// the peer can pull what it lacks. (The peer does the same for us when
    /// it gets our summary.)
    /// (The hash covers the clear watermark too; `count` is for the log.)
    fn on_summary(&self, peer: &Peer, hash: Sha1Digest, count: u64) {
        let (my_cleared, entries) = self.store.digest();
        if gossip::summary_hash(my_cleared, &entries) == hash {
            return;
        }
        debug!(
            target: self.name(),
            "Anti-entropy: summaries differ (ours keys={}, theirs keys={count}), sending digest to peer={}",
            entries.len(),
            peer.name()
        );
        // Each entry: u16 key length + key + 16-byte version + tombstone byte.
        for chunk in chunks_within_frame(entries, |e| 2 + e.key.len() + 16 + 1) {
            peer.queue(Outbound::Frame(Frame::Digest {
                cleared: my_cleared,
                entries: chunk,
            }));
        }
    }

    /// A peer's digest: apply its newer clear and tombstones, pull its newer
    /// files.
    fn on_digest(&self, peer: &Peer, cleared: Version, entries: &[DigestEntry]) -> Result<()> {
        let newest = entries
            .iter()
            .map(|e| e.version)
            .fold(cleared, Version::max);
        if !lock(&self.gossip).observe(newest) {
            // One hostile entry spoils the digest: ignore all of it.
            warn!(target: self.name(), "Ignoring a digest from={}: version {newest} is implausibly far ahead", peer.name());
            return Ok(());
        }
        let held = |key: &str| self.store.entry(key).map(|entry| entry.version);
        for repair in gossip::repairs(held, self.store.cleared(), cleared, entries) {
            match repair {
                Repair::Clear(version) => {
                    if self.store.clear(version)? {
                        info!(target: self.name(), "Anti-entropy: applied clear version={version} from={}", peer.name());
                    }
                }
                Repair::Delete { key, version } => {
                    if self.store.delete(&key, version)? {
                        info!(target: self.name(), "Anti-entropy: applied delete key={key} version={version} from={}", peer.name());
                    }
                }
                Repair::Pull(key) => {
                    if !self.start_pull(&key) {
                        continue;
                    }
                    debug!(target: self.name(), "Anti-entropy: pulling key={key} from={}", peer.name());
                    peer.queue(Outbound::Frame(Frame::Get { request: 0, key }));
                }
            }
        }
        Ok(())
    }

    /// Records that `key` is being pulled; false if it is streaming in
    /// already, or a pull of it started less than [`PULL_RETRY_INTERVAL`] ago.
    fn start_pull(&self, key: &str) -> bool {
        let mut incoming = lock(&self.incoming);
        let now = Instant::now();
        let coming = match incoming.get(key) {
            Some(Incoming::Streaming) => true,
            Some(Incoming::Pulled(at)) => now.duration_since(*at) < PULL_RETRY_INTERVAL,
            None => false,
        };
        if !coming {
            incoming.insert(key.to_string(), Incoming::Pulled(now));
        }
        !coming
    }

    /// A peer's list of its peers: dial the ones we lack, up to
    /// `max_peers`.
    fn on_peers(self: &Arc<Self>, addrs: &[String]) {
        if !self.config.discover_peers {
            return;
        }
        // A hostile frame may list thousands of addresses: consider no more
        // than we could ever use, and count dials under way as peers, so the
        // node never has more than `max_peers` connections it started itself
        // by discovery.
        for addr in addrs.iter().take(self.config.max_peers) {
            let Ok(target) = addr.parse::<SocketAddr>() else {
                continue;
            };
            let dialling = lock(&self.dialling).len();
            let full = lock(&self.peers).len() + dialling >= self.config.max_peers;
            if full || target == self.listen_addr || self.connected_to(target) {
                continue;
            }
            debug!(target: self.name(), "Discovered peer addr={target}; dialling");
            self.dial_once(target);
        }
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

/// Removes a connection's socket from the node's list when it ends.
struct SocketGuard {
    node: Arc<Node>,
    id: u64,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        lock(&self.node.sockets).remove(&self.id);
    }
}

/// The first address `addr` resolves to.
fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| Error::Protocol(format!("{addr} resolves to no address")))
}

/// Splits a list into lists that each fit in one frame, given each item's
/// encoded length. Always returns at least one (maybe empty) list.
fn chunks_within_frame<T>(items: Vec<T>, encoded_len: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    // Room for the frame's own fields, with a margin.
    let budget = MAX_FRAME_LEN as usize - 256;
    let mut chunks = vec![Vec::new()];
    let mut used = 0;
    for entry in items {
        let len = encoded_len(&entry);
        if used + len > budget {
            chunks.push(Vec::new());
            used = 0;
        }
        used += len;
        chunks
            .last_mut()
            .expect("chunks is never empty")
            .push(entry);
    }
    chunks
}

/// Whether a frame is one a client may send.
fn is_client_request(frame: &Frame) -> bool {
    matches!(
        frame,
        Frame::Put { .. }
            | Frame::Get { .. }
            | Frame::Remove { .. }
            | Frame::ClearAll
            | Frame::List
            | Frame::Status
    )
}

/// The content of a client's [`Frame::Put`], read as a plain `Read`: the
/// bytes of each [`Frame::Chunk`] in turn, ending at the empty chunk.
struct ChunkReader<'a, R: Read> {
    /// The client connection, positioned inside or between chunks.
    conn: &'a mut R,
    /// Bytes left in the current chunk.
    left: u64,
    /// Set once the empty chunk was read.
    ended: bool,
}

impl<'a, R: Read> ChunkReader<'a, R> {
    fn new(conn: &'a mut R) -> Self {
        ChunkReader {
            conn,
            left: 0,
            ended: false,
        }
    }
}

impl<R: Read> Read for ChunkReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.left == 0 {
            if self.ended {
                return Ok(0);
            }
            match read_frame(self.conn)? {
                Some(Frame::Chunk { size: 0 }) => self.ended = true,
                Some(Frame::Chunk { size }) => self.left = u64::from(size),
                // A client that stops mid-file (closed, or sent something
                // else) must not leave half a file: fail the store.
                _ => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the client's upload ended without its final empty chunk",
                    ));
                }
            }
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.conn.read(&mut buf[..want])?;
        if n == 0 && want > 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the client closed the connection inside a chunk",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Turns an error into the code sent to the other side in an `Error` frame.
fn error_code(err: &Error) -> ErrorCode {
    match err {
        Error::NotFound(_) => ErrorCode::NotFound,
        Error::BadKey(_) => ErrorCode::BadKey,
        Error::Protocol(_) => ErrorCode::Protocol,
        Error::Unauthorized(_) => ErrorCode::Unauthorized,
        _ => ErrorCode::Internal,
    }
}
