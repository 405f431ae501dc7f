//! [`FileServer`]: a gossipfs node. It owns the listener, the peer map and
//! the threads, and it is where the two sequence diagrams happen.
//!
//! # The actors of the diagrams, as threads
//!
//! - **Client**: whoever calls [`FileServer::store`] or [`FileServer::get`]
//!   (a library user, or a command-line session).
//! - **Server**: the thread running that call, on the node it was made on.
//! - **TL1 / TL2**: each peer connection's [`Transport`]: its read loop
//!   (bytes in, frames out) and its writer thread (frames in, bytes out).
//! - **Peer**: each connection's *handler* thread on the receiving node,
//!   which acts on every frame its read loop delivers ([`Node::handle`]).
//! - **Store1 / Store2**: each node's [`Store`].
//!
//! # Saving a file (diagram 1)
//!
//! [`Node::store`] saves the file locally, then queues a push to each
//! direct peer. The peer's read loop delivers the metadata to its handler
//! and waits; the handler locks the transport, streams the bytes into its
//! store, commits, and unlocks ([`Node::on_store`]).
//!
//! # Getting a file (diagram 2)
//!
//! [`Node::get`] checks the local store; if the file is not there it
//! broadcasts a `Get` and waits. Each peer's handler checks its store and
//! queues the answer, which its writer sends with the file's bytes behind
//! it ([`Node::on_get`]); a peer without the file answers "not found" at
//! once. The asking node's read loop hands each answer to the thread inside
//! `get`, which locks that transport, streams the file into its store,
//! unlocks, and serves it ([`Node::stream_in`] is that consumer's side, for
//! both diagrams).
//!
//! # Relay by announcement
//!
//! Only the node where a store was made pushes its bytes, to its direct
//! peers. Every node that commits a new version then tells its other peers
//! with a small `Announce`. A node that lacks that version fetches it from
//! the announcer with diagram 2's flow aimed at that one peer
//! ([`Node::on_announce`]), unless it holds it, is already receiving it, or
//! the store's origin is its direct peer (whose push is then on its way).
//! If a fetch or a push fails, it asks the next peer that announced the
//! same version. So each store crosses each link at most once. Deletes and
//! clears are small frames, relayed as they are.
//!
//! # Locks
//!
//! The peer map, the gossip state, the pending requests and the incoming
//! files are each behind their own `Mutex`, and each is a *leaf*: held to
//! look up, insert or remove, released before any I/O and before any other
//! lock is taken. The only lock held across network I/O is a connection's
//! transport lock, held by its read loop for one frame and by one actor for
//! one stream. The peer-map lock is never held while taking a transport
//! lock.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::config::{Config, Counters, FileInfo, PeerInfo, Stats};
use crate::corruption::FileReader;
use crate::error::{Error, Result, lock};
use crate::frame::{Frame, Sha1Digest, check_key};
use crate::gossip::{self, Gossip, Verdict};
use crate::handshake::Hello;
use crate::peers::PeerMap;
use crate::store::Store;
use crate::threads::Threads;
use crate::transport::{Outbound, StreamClaim, Transport, write_loop};
use crate::version::{NodeId, Version, wall_millis};
use crate::{antientropy, corruption, discovery, listener, liveness, tombstones};

/// How many delivered frames may wait for a connection's handler. When
/// they do, the read loop stops reading and TCP slows the peer down. Small:
/// a decoded digest can take a few MiB.
const HANDLER_QUEUE_LEN: usize = 8;

/// How long a fetch may wait for its first answer before another
/// announcement or anti-entropy may ask for the same key again.
const FETCH_RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// A gossipfs node: the seed's `FileServer`. Dropping it shuts it down.
pub struct FileServer {
    node: Arc<Node>,
}

impl FileServer {
    /// Binds `config.listen` and starts the node.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for settings the node cannot run with;
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
    /// As [`FileServer::start`].
    pub fn start_on(listener: TcpListener, config: Config) -> Result<FileServer> {
        config.check()?;
        let store = Store::open(&config.name, &config.root, config.fsync)?;
        let listen_addr = listener.local_addr()?;
        let gossip = Gossip::new(store.node, store.max_time());
        let node = Arc::new(Node {
            listen_addr,
            store,
            gossip: Mutex::new(gossip),
            peers: PeerMap::default(),
            pending: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            threads: Threads::default(),
            counters: Arc::new(Counters::default()),
            limits: listener::Limits::default(),
            discovery: discovery::Discovery::default(),
            checks: corruption::Checks::default(),
            liveness: liveness::Liveness::default(),
            config,
        });
        info!(target: node.name(), "Node started id={:016x} listen={listen_addr} root={}", node.id(), node.config.root.display());
        let accept_node = Arc::clone(&node);
        node.threads.spawn(move || listener::accept_loop(&accept_node, listener));
        discovery::start(&node);
        liveness::start(&node);
        tombstones::start(&node);
        if node.config.anti_entropy {
            let timer_node = Arc::clone(&node);
            node.threads.spawn(move || antientropy::timer_loop(&timer_node));
        }
        Ok(FileServer { node })
    }

    /// Stores the bytes of `reader` under `key`, here and then on every
    /// node. Returns once the local copy is committed; replication goes on
    /// in the background.
    ///
    /// # Errors
    ///
    /// [`Error::BadKey`] for a bad key; [`Error::Io`] if reading `reader` or
    /// writing the disk fails (nothing is stored then);
    /// [`Error::Superseded`] if a newer version of the key (or a newer
    /// clear) landed between taking this write's version and committing it,
    /// so the write changed nothing.
    pub fn store(&self, key: &str, mut reader: impl Read) -> Result<()> {
        self.node.store(key, &mut reader)
    }

    /// Returns the content stored under `key`: from the local disk if it is
    /// there, else fetched from a peer (and kept locally). The reader
    /// checks the content against its SHA-1 and fails at the end if they
    /// differ.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] if every peer asked says it has no such file (or
    /// the node has never had peers); [`Error::Unavailable`] if a peer that
    /// might hold it could not be asked (none connected, a connection that
    /// closed, a copy that broke or failed its SHA-1); [`Error::Timeout`] if
    /// some never answered; [`Error::BadKey`], [`Error::Io`].
    pub fn get(&self, key: &str) -> Result<FileReader> {
        self.node.get(key)
    }

    /// Deletes `key` on every node.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] if this node holds no live file under `key`;
    /// [`Error::Superseded`] if a newer version landed meanwhile.
    pub fn delete(&self, key: &str) -> Result<()> {
        self.node.delete(key)
    }

    /// Deletes every file on every node: everything older than the clear.
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
        self.node.peers.infos()
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
        self.node.counters.snapshot()
    }

    /// Stops the node: stops accepting, closes every connection and joins
    /// every thread. Also done on drop.
    pub fn shutdown(self) {}
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.node.shutdown();
    }
}

/// Who is waiting for the answer to a `Get` this node sent.
#[derive(Clone)]
enum Waiter {
    /// A [`FileServer::get`] call, on its own thread, and the connections
    /// it asked.
    Get(SyncSender<Answer>, Arc<HashSet<u64>>),
    /// A fetch after an announcement or an anti-entropy digest: the
    /// handler of the connection it was sent on takes the answer.
    Fetch {
        /// The connection asked.
        conn: u64,
        /// The key asked for.
        key: String,
    },
}

/// What a waiting `get` hears from one connection.
enum Answer {
    /// The peer has it: metadata, and the claim on the stream that follows.
    File { meta: Meta, claim: StreamClaim },
    /// The peer has no live file under the key.
    NotFound { conn: u64 },
    /// The connection closed before it answered.
    Closed { conn: u64 },
}

/// What a frame that announces file data says about the bytes behind it.
struct Meta {
    /// The file's key.
    key: String,
    /// The version of the content that follows.
    version: Version,
    /// How many bytes follow the frame.
    size: u64,
    /// Their SHA-1, checked before the file is committed.
    sha1: Sha1Digest,
}

/// A file on its way to this node, so no second copy is asked for.
pub(crate) struct Incoming {
    /// The version coming.
    pub version: Version,
    /// The request of the fetch under way, if it is a fetch (0 for a push).
    pub request: u64,
    /// When the fetch was asked for, or the push expected.
    pub asked_at: Instant,
    /// Set once its bytes are streaming in: then it is not asked for again,
    /// however long it takes (a stalled stream fails by the heartbeat
    /// timeout, and the next source is asked then).
    pub streaming: bool,
    /// Other peers that announced the same version: where to ask next if
    /// this copy fails.
    pub sources: Vec<NodeId>,
}

impl Incoming {
    /// Whether it is still worth waiting for: streaming, or asked for
    /// within [`FETCH_RETRY_INTERVAL`].
    pub fn is_expected(&self) -> bool {
        self.streaming || self.asked_at.elapsed() < FETCH_RETRY_INTERVAL
    }
}

/// One frame a read loop delivers to its connection's handler.
struct Delivery {
    /// The frame.
    frame: Frame,
    /// The claim on its stream, if it announces file data.
    claim: Option<StreamClaim>,
}

/// Everything a node's threads share.
pub(crate) struct Node {
    /// How the node was set up.
    pub config: Config,
    /// The address the listener is bound to.
    pub listen_addr: SocketAddr,
    /// The local disk store.
    pub store: Store,
    /// The clock and the seen-set. Leaf lock.
    pub gossip: Mutex<Gossip>,
    /// The connected peers, one connection per pair of nodes.
    pub peers: PeerMap,
    /// Who waits for the answer to each `Get` we sent, by request id.
    pending: Mutex<HashMap<u64, Waiter>>,
    /// Files on their way to us, by key. Leaf lock.
    pub incoming: Mutex<HashMap<String, Incoming>>,
    /// The id of the next `Get` we send.
    next_request: AtomicU64,
    /// Every thread the node started, and the flag that stops them.
    pub threads: Threads,
    /// What the node did and moved, for [`Stats`].
    pub counters: Arc<Counters>,
    /// The open connections under their cap (hardening: see `listener`).
    pub limits: listener::Limits,
    /// Diallers under way (hardening: see `discovery`).
    pub discovery: discovery::Discovery,
    /// Our files being re-checked (hardening: see `corruption`).
    pub checks: corruption::Checks,
    /// The peers we have known (hardening: see `liveness`).
    pub liveness: liveness::Liveness,
}

impl Node {
    pub fn id(&self) -> NodeId {
        self.store.node
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    // -----------------------------------------------------------------------
    // Diagram 1 on the node the client called; diagram 2 on the asking node
    // -----------------------------------------------------------------------

    /// Saving a file: save it locally, then push it to every direct peer.
    pub fn store(&self, key: &str, reader: &mut dyn Read) -> Result<()> {
        check_key(key)?;
        self.check_running()?;
        let me = self.name();
        debug!(target: me, "Upload file key={key}");
        debug!(target: me, "Save file key={key}");
        let temp = self.store.write_temp(key, reader)?;
        let size = temp.size();
        let version = lock(&self.gossip).next_version(wall_millis());
        if !self.store.commit(temp, version)? {
            // A newer write (or clear) landed between taking the version
            // and committing.
            info!(target: me, "Store of key={key} version={version} was superseded");
            return Err(Error::Superseded(format!("a newer version of {key:?} is held")));
        }
        info!(target: me, "Stored file key={key} size={size} version={version}");
        for peer in self.peers.handles() {
            debug!(target: me, "Send metadata (filename, size) key={key} size={size} to={}", peer.name());
            let key = key.to_string();
            peer.queue(Outbound::Push { key, version });
        }
        Ok(())
    }

    /// Getting a file: from the local store if it is there, else from the
    /// first peer that answers with it.
    pub fn get(&self, key: &str) -> Result<FileReader> {
        check_key(key)?;
        self.check_running()?;
        let me = self.name();
        debug!(target: me, "Request file key={key}");
        debug!(target: me, "Check local storage key={key}");
        if let Some(file) = self.store.open_file(key)? {
            debug!(target: me, "Send file key={key} size={}", file.size());
            return Ok(file);
        }
        debug!(target: me, "File not found key={key}");
        let peers = self.peers.handles();
        if peers.is_empty() && liveness::expects_peers(self) {
            return Err(Error::Unavailable(format!("no peer is connected to ask for {key:?}")));
        }
        // Register before asking, so no answer can arrive unexpected. Room
        // for one answer per peer; extra answers are dropped.
        let (tx, rx) = mpsc::sync_channel(peers.len());
        let mut waiting: HashSet<u64> = peers.iter().map(|peer| peer.conn).collect();
        let request = self.new_request(Waiter::Get(tx, Arc::new(waiting.clone())));
        let _pending = PendingRequest { node: self, request };
        debug!(target: me, "Broadcast getfile key={key} peers={}", peers.len());
        let get = Frame::Get { request, key: key.to_string() };
        let mut failures = Vec::new();
        for peer in &peers {
            if !peer.queue(Outbound::Frame(get.clone())) {
                waiting.remove(&peer.conn);
                failures.push(format!("peer={} could not be asked", peer.name()));
            }
        }
        let deadline = Instant::now() + self.config.get_timeout;
        // Why peers that might have the file did not deliver it (above: not
        // asked; below: a closed connection, a broken or bad copy). Any of
        // these, and "not found" would be a guess.
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = match rx.recv_timeout(left) {
                Ok(answer) => answer,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::Timeout(format!("no peer sent {key:?} in time")));
                }
                Err(RecvTimeoutError::Disconnected) => return Err(Error::Closed),
            };
            let (meta, mut claim) = match answer {
                Answer::File { meta, claim } => (meta, claim),
                Answer::NotFound { conn } => {
                    waiting.remove(&conn);
                    continue;
                }
                Answer::Closed { conn } => {
                    if waiting.remove(&conn) {
                        failures.push("a peer's connection closed before it answered".into());
                    }
                    continue;
                }
            };
            waiting.remove(&claim.peer().conn);
            if let Err(err) = self.stream_in(&mut claim, &meta, false) {
                failures.push(format!("from {}: {err}", claim.peer().name()));
                continue;
            }
            // Held now, from this copy or an equal one that came first; gone
            // if something newer (a delete) beat it.
            if let Some(file) = self.store.open_file(key)? {
                debug!(target: me, "Serve file key={key} size={}", file.size());
                return Ok(file);
            }
        }
        if failures.is_empty() {
            return Err(Error::NotFound(key.to_string()));
        }
        Err(Error::Unavailable(format!("no copy of {key:?} arrived: {}", failures.join("; "))))
    }

    /// The consumer's side of the hand-off, for diagram 1's Peer and
    /// diagram 2's Server alike: lock the transport the metadata came on,
    /// stream exactly the announced bytes into a temp file (checked against
    /// the SHA-1), commit, unlock. `save_step` logs diagram 1's "Save file",
    /// which diagram 2 does not draw. Returns whether the file was committed
    /// (false if something newer is held). A copy whose bytes do not match
    /// is reported to its sender, whose own copy may be damaged.
    fn stream_in(&self, claim: &mut StreamClaim, meta: &Meta, save_step: bool) -> Result<bool> {
        let (me, peer) = (self.name(), claim.peer());
        let (from, key, version) = (peer.name(), meta.key.as_str(), meta.version);
        let mut stream = claim.lock();
        debug!(target: me, "Lock transport layer peer={from} key={key}");
        let committed = if lock(&self.gossip).observe(version, wall_millis()) {
            debug!(target: me, "Stream file data key={key} size={} from={from}", meta.size);
            self.store.receive_temp(key, &mut stream, meta.size, &meta.sha1).and_then(|temp| {
                if save_step {
                    debug!(target: me, "Save file key={key} version={version}");
                }
                self.store.commit(temp, version)
            })
        } else {
            Err(Error::Protocol(format!("version {version} is implausibly far ahead of our clock")))
        };
        drop(stream);
        debug!(target: me, "Unlock transport layer peer={from}");
        if let Err(err) = &committed {
            warn!(target: me, "Discarded file key={key} from={from}: {err}");
            if matches!(err, Error::Corrupt(_)) {
                let key = key.to_string();
                peer.queue(Outbound::Frame(Frame::Corrupt { key, version }));
            }
        }
        committed
    }

    pub fn delete(&self, key: &str) -> Result<()> {
        check_key(key)?;
        self.check_running()?;
        if self.store.entry(key).is_none_or(|entry| entry.tombstone) {
            return Err(Error::NotFound(key.to_string()));
        }
        let version = lock(&self.gossip).next_version(wall_millis());
        if !self.store.delete(key, version)? {
            return Err(Error::Superseded(format!("a newer version of {key:?} is held")));
        }
        info!(target: self.name(), "Deleted file key={key} version={version}");
        let key = key.to_string();
        self.relay(&Frame::Delete { key, version }, version.node, None);
        Ok(())
    }

    pub fn clear(&self) -> Result<()> {
        self.check_running()?;
        let version = lock(&self.gossip).next_version(wall_millis());
        self.store.clear(version)?;
        info!(target: self.name(), "Cleared every file version={version}");
        self.relay(&Frame::Clear { version }, version.node, None);
        Ok(())
    }

    pub fn list(&self) -> Vec<FileInfo> {
        let live = self.store.live().into_iter();
        live.map(|(key, entry)| FileInfo { key, size: entry.size, version: entry.version })
            .collect()
    }

    pub fn check_running(&self) -> Result<()> {
        if self.threads.stopping() {
            return Err(Error::Closed);
        }
        Ok(())
    }

    // -----------------------------------------------------------------------
    // A peer connection: its read loop (TL) and its handler (Peer)
    // -----------------------------------------------------------------------

    /// A peer connection after its handshake: start its writer and its
    /// handler, register it, then run its read loop until it closes.
    pub fn run_peer(
        self: &Arc<Self>,
        stream: TcpStream,
        hello: Hello,
        outbound: bool,
    ) -> Result<()> {
        if hello.node == self.id() {
            return Err(Error::Protocol("connected to ourselves".into()));
        }
        let silence = self.config.heartbeat_timeout;
        let counters = Arc::clone(&self.counters);
        let (transport, writer, rx) =
            Transport::new(self.name(), stream, hello, outbound, silence, counters)?;
        let peer = Arc::new(transport);
        let (node, writer_peer) = (Arc::clone(self), Arc::clone(&peer));
        self.threads.spawn(move || {
            if let Err(err) = write_loop(&writer_peer, writer, rx, &node.store) {
                debug!(target: node.name(), "Writer for peer={} stopped: {err}", writer_peer.name());
            }
        });
        if !self.peers.register(self.id(), &peer) {
            debug!(target: self.name(), "Dropping duplicate connection to peer={}", peer.name());
            peer.close();
            return Ok(());
        }
        info!(target: self.name(), "Connected to peer={} addr={}", peer.name(), peer.peer.listen_addr);
        liveness::remember(self, &peer);
        discovery::greet(self, &peer);
        antientropy::greet(self, &peer);

        let (handler_tx, handler_rx) = mpsc::sync_channel(HANDLER_QUEUE_LEN);
        let (node, handler_peer) = (Arc::clone(self), Arc::clone(&peer));
        self.threads.spawn(move || node.handle_loop(&handler_peer, handler_rx));
        let result = peer.read_loop(|frame, claim| self.deliver(&peer, &handler_tx, frame, claim));

        drop(handler_tx); // ends the handler once it has done what it was given
        if self.peers.unregister(&peer) {
            info!(target: self.name(), "Peer left peer={} addr={}", peer.name(), peer.peer.listen_addr);
        }
        peer.close();
        self.connection_closed(peer.conn);
        result
    }

    /// Runs on the read loop (TL) for every frame: an answer to a `get` goes
    /// to the thread inside that `get`; everything else goes to this
    /// connection's handler (the diagrams' Peer). Logs the TL's arrows.
    fn deliver(
        &self,
        peer: &Transport,
        handler: &SyncSender<Delivery>,
        frame: Frame,
        claim: Option<StreamClaim>,
    ) -> Result<()> {
        Counters::add(&self.counters.frames_received, 1);
        let (me, from) = (self.name(), peer.name());
        match &frame {
            // Liveness is the transport's business: its bytes were the point.
            Frame::Ping => return Ok(()),
            Frame::Store { key, size, .. } => {
                debug!(target: me, "Send metadata (filename, size) key={key} size={size} from={from}");
            }
            Frame::Get { key, .. } => {
                debug!(target: me, "Peer receives getfile key={key} from={from}")
            }
            Frame::File { request, .. } | Frame::NotFound { request, .. } => {
                let waiter = lock(&self.pending).get(request).cloned();
                match waiter {
                    Some(Waiter::Get(tx, _)) => {
                        let answer = match frame {
                            Frame::File { key, version, size, sha1, .. } => {
                                debug!(target: me, "Send metadata (filename, size) key={key} size={size} from={from}");
                                let claim = claim.ok_or(Error::Closed)?;
                                Answer::File { meta: Meta { key, version, size, sha1 }, claim }
                            }
                            _ => Answer::NotFound { conn: peer.conn },
                        };
                        // A full or closed channel means the get has what it
                        // needs or has gone: the answer (and any stream,
                        // through its dropped claim) is discarded.
                        let _ = tx.try_send(answer);
                        return Ok(());
                    }
                    Some(Waiter::Fetch { conn, .. }) if conn == peer.conn => {
                        if let Frame::File { key, size, .. } = &frame {
                            debug!(target: me, "Send metadata (filename, size) key={key} size={size} from={from}");
                        }
                    }
                    // We asked nobody this, or asked another peer: the frame
                    // is dropped, and its stream discarded unread.
                    _ => {
                        debug!(target: me, "Ignoring an answer to no question of ours from={from}");
                        return Ok(());
                    }
                }
            }
            _ => {}
        }
        handler.send(Delivery { frame, claim }).map_err(|_| Error::Closed)
    }

    /// A connection's handler thread: the diagrams' Peer. Acts on each
    /// frame the read loop delivers, in order; an error closes the
    /// connection.
    fn handle_loop(self: &Arc<Self>, peer: &Arc<Transport>, deliveries: Receiver<Delivery>) {
        for Delivery { frame, claim } in deliveries {
            // A closed connection's leftovers are dropped, not acted on.
            if peer.is_closed() {
                break;
            }
            if let Err(err) = self.handle(peer, frame, claim) {
                warn!(target: self.name(), "Closing peer={}: {err}", peer.name());
                peer.close();
                break;
            }
        }
    }

    /// What the node does with one frame from a peer.
    fn handle(
        self: &Arc<Self>,
        peer: &Transport,
        frame: Frame,
        claim: Option<StreamClaim>,
    ) -> Result<()> {
        let stream = || claim.ok_or_else(|| Error::Protocol("a frame without its stream".into()));
        match frame {
            Frame::Store { key, version, size, sha1 } => {
                self.on_store(peer, Meta { key, version, size, sha1 }, stream()?);
            }
            Frame::Get { request, key } => self.on_get(peer, request, key),
            Frame::Announce { key, version, .. } => self.on_announce(peer, &key, version),
            Frame::File { request, key, version, size, sha1 } => {
                self.on_fetched(peer, request, Meta { key, version, size, sha1 }, stream()?);
            }
            Frame::NotFound { request, key } => {
                self.fetch_failed(request, &key, &format!("peer={} has no such file", peer.name()));
            }
            Frame::Delete { key, version } => self.on_delete(peer, key, version)?,
            Frame::Clear { version } => self.on_clear(peer, version)?,
            Frame::Summary { hash, count, .. } => antientropy::on_summary(self, peer, hash, count),
            Frame::Digest { cleared, entries } => {
                antientropy::on_digest(self, peer, cleared, &entries)?;
            }
            Frame::Peers { addrs } => discovery::on_peers(self, &addrs),
            Frame::Corrupt { key, version } => corruption::on_corrupt(self, peer, key, version),
            Frame::Error { code, message } => {
                let why = format!("the peer closed the connection ({code:?}): {message}");
                return Err(Error::Protocol(why));
            }
            other => {
                return Err(Error::Protocol(format!(
                    "a peer may not send {:?} frames",
                    other.tag()
                )));
            }
        }
        Ok(())
    }

    /// Diagram 1, the receiving half: lock the transport, stream the file
    /// into the store, commit, unlock; then announce it to our other peers.
    fn on_store(&self, peer: &Transport, meta: Meta, mut claim: StreamClaim) {
        // Seen, or older than what we hold: the claim is dropped unlocked and
        // the read loop discards the bytes.
        if !self.accept_change(peer, Some(&meta.key), meta.version) {
            return;
        }
        self.expect_incoming(&meta.key, meta.version, 0, true);
        let committed = self.stream_in(&mut claim, &meta, true);
        self.received(peer, &meta, 0, committed);
    }

    /// Diagram 2, the peer's half: "Get file" from the store; if it is
    /// there, "Retrieve File Stream" and "Send metadata" to the writer,
    /// which opens the file and streams it after the metadata. A missing
    /// file is answered "not found" at once.
    fn on_get(&self, peer: &Transport, request: u64, key: String) {
        let me = self.name();
        debug!(target: me, "Get file key={key}");
        let Some(entry) = self.store.entry(&key).filter(|e| !e.tombstone) else {
            peer.queue(Outbound::Frame(Frame::NotFound { request, key }));
            return;
        };
        debug!(target: me, "Retrieve File Stream key={key} size={}", entry.size);
        debug!(target: me, "Send metadata (filename, size) key={key} size={}", entry.size);
        peer.queue(Outbound::Reply { request, key });
    }

    /// A peer committed a version of `key` and tells us. Fetch it from that
    /// peer, unless we hold it, it is on its way, or its origin (a direct
    /// peer of ours) is pushing it to us anyway.
    fn on_announce(&self, peer: &Transport, key: &str, version: Version) {
        let mut incoming = lock(&self.incoming);
        if let Some(coming) = incoming.get_mut(key).filter(|c| c.version >= version) {
            if coming.is_expected() {
                // On its way: keep this peer in mind in case that copy fails.
                if coming.version == version {
                    coming.sources.push(peer.id());
                }
                return;
            }
            if coming.version == version {
                // Asked for long ago and still not here: ask this peer.
                drop(incoming); // a leaf lock: released before queueing
                self.fetch(peer, key, version);
                return;
            }
        }
        drop(incoming); // a leaf lock: released before the store's and gossip's
        let origin = self.peers.get(version.node).filter(|_| version.node != peer.id());
        if origin.is_some_and(|origin| origin.opened_millis < version.millis()) {
            // The origin pushes each store to the peers it has, and we were
            // one when it stored this: its push is on its way, and a fetch
            // too would bring a second copy. Wait for the push, with this
            // peer as the place to ask if it fails or does not come. The
            // version is judged but not marked seen, so the push gets through.
            let held = self.store.entry(key).map(|entry| entry.version);
            let cleared = self.store.cleared();
            if lock(&self.gossip).observe(version, wall_millis())
                && gossip::wins(version, held, cleared)
            {
                self.expect_incoming(key, version, 0, false);
                if let Some(coming) = lock(&self.incoming).get_mut(key) {
                    coming.sources.push(peer.id());
                }
            }
            return;
        }
        if !self.accept_change(peer, Some(key), version) {
            return;
        }
        self.fetch(peer, key, version);
    }

    /// Diagram 2 aimed at one peer: ask `peer` for `key`. Its answer comes
    /// back to this connection's handler ([`Node::on_fetched`]).
    pub fn fetch(&self, peer: &Transport, key: &str, version: Version) {
        let request = self.new_request(Waiter::Fetch { conn: peer.conn, key: key.to_string() });
        self.expect_incoming(key, version, request, false);
        debug!(target: self.name(), "Fetching key={key} version={version} from={}", peer.name());
        let key = key.to_string();
        if !peer.queue(Outbound::Frame(Frame::Get { request, key: key.clone() })) {
            self.fetch_failed(request, &key, "the connection is closing");
        }
    }

    /// The answer to a fetch: the same lock, stream and unlock as a `get`,
    /// on this connection's handler.
    fn on_fetched(&self, peer: &Transport, request: u64, meta: Meta, mut claim: StreamClaim) {
        lock(&self.pending).remove(&request);
        let held = self.store.entry(&meta.key).map(|entry| entry.version);
        if !gossip::wins(meta.version, held, self.store.cleared()) {
            // We got it meanwhile (or something newer): the claim is dropped
            // unlocked and the bytes are discarded.
            self.fetch_done(&meta.key, request);
            return;
        }
        if let Some(coming) = lock(&self.incoming).get_mut(&meta.key) {
            coming.streaming = coming.request == request;
        }
        let committed = self.stream_in(&mut claim, &meta, false);
        self.received(peer, &meta, request, committed);
    }

    /// After a pushed or fetched file was streamed in: count it and announce
    /// it on, or, if it failed, try the next peer that has it.
    fn received(&self, peer: &Transport, meta: &Meta, request: u64, committed: Result<bool>) {
        let Meta { key, version, size, sha1 } = meta;
        match committed {
            Ok(false) => self.fetch_done(key, request),
            Ok(true) => {
                self.fetch_done(key, request);
                Counters::add(&self.counters.changes_applied, 1);
                info!(target: self.name(), "Stored file key={key} size={size} version={version} from={}", peer.name());
                let (key, version, size, sha1) = (key.clone(), *version, *size, *sha1);
                self.relay(
                    &Frame::Announce { key, version, size, sha1 },
                    version.node,
                    Some(peer.id()),
                );
            }
            Err(err) => self.fetch_failed(request, key, &err.to_string()),
        }
    }

    /// Notes that `key` at `version` is on its way (`request` 0 for a push).
    fn expect_incoming(&self, key: &str, version: Version, request: u64, streaming: bool) {
        let mut incoming = lock(&self.incoming);
        let replaced = incoming.remove(key);
        let (sources, old_request) = replaced.map_or((Vec::new(), 0), |c| (c.sources, c.request));
        let asked_at = Instant::now();
        incoming
            .insert(key.to_string(), Incoming { version, request, asked_at, streaming, sources });
        drop(incoming); // a leaf lock: released before the pending map's
        // A fetch this one replaces will not be answered to anyone.
        if old_request != 0 && old_request != request {
            lock(&self.pending).remove(&old_request);
        }
    }

    /// The file for `key` arrived (or need not): forget the fetch.
    fn fetch_done(&self, key: &str, request: u64) {
        let mut incoming = lock(&self.incoming);
        if incoming.get(key).is_some_and(|c| c.request == request) {
            incoming.remove(key);
        }
    }

    /// A fetch or push of `key` failed: ask the next peer that announced the
    /// same version, or give up and let the version be accepted again.
    fn fetch_failed(&self, request: u64, key: &str, why: &str) {
        lock(&self.pending).remove(&request);
        loop {
            let mut incoming = lock(&self.incoming);
            let Some(coming) = incoming.get_mut(key).filter(|c| c.request == request) else {
                return; // a newer fetch or push of the key replaced this one
            };
            let version = coming.version;
            let Some(next) = coming.sources.pop() else {
                incoming.remove(key);
                drop(incoming); // a leaf lock: released before the gossip lock
                debug!(target: self.name(), "Gave up on key={key} version={version}: {why}");
                lock(&self.gossip).forget(version);
                return;
            };
            drop(incoming); // a leaf lock: released before the peer map's
            if let Some(peer) = self.peers.get(next) {
                info!(target: self.name(), "Fetching key={key} from another peer ({why})");
                self.fetch(&peer, key, version);
                return;
            }
        }
    }

    fn on_delete(&self, peer: &Transport, key: String, version: Version) -> Result<()> {
        if !self.accept_change(peer, Some(&key), version) || !self.store.delete(&key, version)? {
            return Ok(());
        }
        Counters::add(&self.counters.changes_applied, 1);
        info!(target: self.name(), "Deleted file key={key} version={version} from={}", peer.name());
        self.relay(&Frame::Delete { key, version }, version.node, Some(peer.id()));
        Ok(())
    }

    fn on_clear(&self, peer: &Transport, version: Version) -> Result<()> {
        if !self.accept_change(peer, None, version) || !self.store.clear(version)? {
            return Ok(());
        }
        Counters::add(&self.counters.changes_applied, 1);
        info!(target: self.name(), "Cleared every file version={version} from={}", peer.name());
        self.relay(&Frame::Clear { version }, version.node, Some(peer.id()));
        Ok(())
    }

    /// The gossip guard for a change to `key` (`None` for a clear): true if
    /// it is new and newer than what we hold. A change dropped is counted
    /// and logged.
    fn accept_change(&self, peer: &Transport, key: Option<&str>, version: Version) -> bool {
        // Read the store first: the gossip lock is never held while taking
        // the store's index lock.
        let held = key.and_then(|key| self.store.entry(key)).map(|entry| entry.version);
        let cleared = self.store.cleared();
        let verdict = lock(&self.gossip).receive(version, held, cleared, wall_millis());
        let counter = match verdict {
            Verdict::Apply => return true,
            Verdict::Duplicate => &self.counters.duplicates_dropped,
            Verdict::Stale | Verdict::Implausible => &self.counters.stale_dropped,
        };
        Counters::add(counter, 1);
        let what = key.unwrap_or("(clear)");
        debug!(target: self.name(), "Dropping {verdict:?} change key={what} version={version} from={}", peer.name());
        false
    }

    /// Queues `frame` for every peer but `from` and the change's `origin`.
    fn relay(&self, frame: &Frame, origin: NodeId, from: Option<NodeId>) {
        let peers = self.peers.handles();
        let ids: Vec<NodeId> = peers.iter().map(|p| p.id()).collect();
        let targets = gossip::relay_targets(&ids, from, origin);
        for peer in peers.iter().filter(|p| targets.contains(&p.id())) {
            debug!(target: self.name(), "Relaying {:?} to peer={}", frame.tag(), peer.name());
            peer.queue(Outbound::Frame(frame.clone()));
        }
    }

    /// Registers a waiter and returns the request id to send.
    fn new_request(&self, waiter: Waiter) -> u64 {
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        lock(&self.pending).insert(request, waiter);
        request
    }

    /// A connection closed: every `get` that asked it stops waiting for it,
    /// and every fetch from it moves on to another source.
    fn connection_closed(&self, conn: u64) {
        let waiters: Vec<(u64, Waiter)> = lock(&self.pending)
            .iter()
            .map(|(request, waiter)| (*request, waiter.clone()))
            .collect();
        for (request, waiter) in waiters {
            match waiter {
                Waiter::Get(tx, asked) if asked.contains(&conn) => {
                    drop(tx.try_send(Answer::Closed { conn }));
                }
                Waiter::Fetch { conn: asked, key } if asked == conn => {
                    self.fetch_failed(request, &key, "the connection closed");
                }
                _ => {} // a request that did not go to this connection
            }
        }
    }

    /// Stops accepting, closes every socket, wakes every timer and joins
    /// every thread.
    fn shutdown(&self) {
        if !self.threads.begin_stop() {
            return;
        }
        info!(target: self.name(), "Shutting down");
        listener::stop(self);
        self.threads.join_all();
        info!(target: self.name(), "Node stopped");
    }
}

/// Removes a request's waiter when the `get` that made it returns.
struct PendingRequest<'a> {
    node: &'a Node,
    request: u64,
}

impl Drop for PendingRequest<'_> {
    fn drop(&mut self) {
        lock(&self.node.pending).remove(&self.request);
    }
}
