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
//! [`Node::store_file`] saves the file locally (it joins the store's next
//! batch commit), then, once that batch is durable, queues a push to each
//! direct peer. The peer's read loop delivers the metadata to its handler
//! and waits; the handler locks the transport, streams the bytes into a
//! temp file and unlocks ([`Node::on_store`]); the file joins the peer's
//! next batch commit, and once it is durable the peer announces it.
//!
//! # Getting a file (diagram 2)
//!
//! [`Node::get`] checks the local store; if the file is not there (and not
//! already on its way), it broadcasts a `Get` and waits, in two phases.
//!
//! 1. **Offers.** Each peer's handler gets the file from its store and
//!    retrieves its stream (opens it and holds it ready), then sends only
//!    its metadata back: an `Offer`, no bytes ([`Node::on_get`]). A peer
//!    without the file answers `NotFound`. The asking node's read loops
//!    hand the answers to the thread inside `get` ([`GetWaiter`]).
//! 2. **Go-ahead.** That thread picks one offer (the newest version; among
//!    equals the first to arrive) and sends metadata back to that holder
//!    alone: a `GoAhead`. The holder streams its held file in a `File`;
//!    the `get` thread locks that transport, streams the bytes into its
//!    store, unlocks, and serves the file. A holder that says no, stalls,
//!    streams below the floor rate or fails the SHA-1 is dropped, and the
//!    next offer gets the go-ahead. Offers not picked are released.
//!
//! So one `get` moves one copy, and no connection but the picked holder's
//! ever waits on a `get`: offers carry no bytes.
//!
//! # Relay by announcement
//!
//! Only the node where a store was made pushes its bytes, to its direct
//! peers. Every node that commits a new version then tells its other peers
//! with a small `Announce`. A node that lacks that version fetches it from
//! the announcer with diagram 2's second phase aimed at that one peer (the
//! announcement is the offer, so the go-ahead goes out at once:
//! [`Node::on_announce`]), unless it holds it, is already receiving it, or
//! the store's origin is its direct peer (whose push is then on its way).
//! If a fetch or a push fails, it asks the next peer that announced the
//! same version. So each store crosses each link at most once. Deletes and
//! clears are small frames, relayed as they are.
//!
//! # Where the hardening hooks in
//!
//! What makes this safe to run against hostile or broken peers lives in
//! `src/hardening/`, called at named steps and never calling back but
//! through `host::Host`: `hardening::wiring` (start, a new peer, the
//! frames neither diagram uses, stop), `hardening::fetches` (how many
//! fetches may wait, the cutoff for a peer that leaves them unanswered,
//! fetching past a busy origin) where a fetch is sent, and
//! `hardening::limits` (the floor rate, the offers held) where a fetched
//! file is streamed in and a `Get` is answered. Skip them on a first read.
//!
//! # Locks
//!
//! The peer map, the gossip state, the pending requests, the incoming
//! files and each `get`'s answers are behind their own `Mutex`, and each is
//! a *leaf*: held to look up, insert or remove, released before any I/O and
//! before any other lock is taken. No lock is held across network I/O: the
//! transport lock is ownership of a connection's read half (see
//! `transport`), held by its read loop for one frame and by one actor for
//! one stream.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::error::{Error, Result, lock};
use crate::frame::{Frame, Sha1Digest, check_key};
use crate::gossip::{self, Gossip, Verdict};
use crate::hardening::checked::FileReader;
use crate::hardening::fetches;
use crate::hardening::handshake::Hello;
use crate::hardening::limits::{Floor, HeldOffers};
use crate::hardening::wiring::Hardening;
use crate::host::Host;
use crate::store::{Store, TempFile};
use crate::support::config::{Config, Counters, FileInfo, PeerInfo, Stats};
use crate::support::peers::PeerMap;
use crate::support::threads::Threads;
use crate::support::version::{NodeId, Version, wall_millis};
use crate::transport::{Outbound, StreamClaim, Transport, write_loop};

mod expected;
mod hooks;

use expected::{Announced, Expected, Next};

/// How many delivered frames may wait for a connection's handler. When
/// they do, the read loop stops reading and TCP slows the peer down. Small:
/// a decoded digest can take a few MiB.
const HANDLER_QUEUE_LEN: usize = 8;

/// How long after the first offer a `get` waits for the other peers'
/// answers before it picks: long enough for every peer on a LAN to answer,
/// so the newest version wins; short enough that a peer that never answers
/// costs little.
const OFFER_GRACE: Duration = Duration::from_millis(50);

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
        FileServer::start_on(TcpListener::bind(&config.listen)?, config)
    }

    /// Starts the node on an already-bound listener (tests bind port 0).
    ///
    /// # Errors
    ///
    /// As [`FileServer::start`].
    pub fn start_on(listener: TcpListener, config: Config) -> Result<FileServer> {
        config.check()?;
        // Node ids and handshake nonces need the OS's random source: a node
        // without one refuses to start, rather than run with guessable ones.
        crate::random_bytes::<8>()?;
        let store = Store::open(&config.name, &config.root, config.fsync)?;
        let listen_addr = listener.local_addr()?;
        let gossip = Gossip::new(store.node, store.max_time());
        let node = Arc::new(Node {
            listen_addr,
            store,
            gossip: Mutex::new(gossip),
            peers: PeerMap::default(),
            pending: Mutex::new(HashMap::new()),
            expected: Expected::default(),
            next_request: AtomicU64::new(1),
            threads: Threads::default(),
            counters: Arc::new(Counters::default()),
            hardening: Hardening::default(),
            config,
        });
        info!(target: node.name(), "Node started id={:016x} listen={listen_addr} root={}", node.id(), node.config.root.display());
        // The store's committer: batch after batch, until shutdown.
        let committer = Arc::clone(&node);
        node.threads.spawn(format!("{} commit", node.name()), move || {
            committer.store.run_batches();
        });
        // The hardening, the accept loop included, stands on `Host`.
        node.hardening.start(&node.host(), listener);
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
        self.node.store_file(key, &mut reader)
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
        let mut stats = self.node.counters.snapshot();
        let fetches =
            lock(&self.node.pending).values().filter(|w| matches!(w, Waiter::Fetch { .. })).count();
        stats.fetches_waiting = fetches as u64;
        stats.files_expected = self.node.expected.len_swept() as u64;
        (stats.syncs, stats.batches) = self.node.store.syncs_and_batches();
        stats
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

/// Who is waiting for the answers to a request this node sent.
#[derive(Clone)]
enum Waiter {
    /// A [`FileServer::get`] call, on its own thread.
    Get(Arc<GetWaiter>),
    /// A fetch after an announcement or an anti-entropy digest: the
    /// handler of the connection it was sent on takes the answer.
    Fetch {
        /// The connection it was sent on.
        conn: u64,
        /// The key asked for.
        key: String,
        /// The version asked for.
        version: Version,
        /// When the go-ahead went out: a peer that leaves its fetches
        /// unanswered for long is cut off (see `hardening::fetches`).
        asked_at: Instant,
    },
}

/// What the thread inside a `get` (diagram 2's Server) waits on. The read
/// loops of the connections it asked fill it in; it wakes on each change.
struct GetWaiter {
    /// The key the `get` is for: an answer about another key is ignored.
    key: String,
    /// The answers so far. Leaf lock.
    answers: Mutex<Answers>,
    /// Notified on every change to `answers`.
    changed: Condvar,
}

/// The answers to one `get`'s broadcast, as they arrive.
#[derive(Default)]
struct Answers {
    /// Connections asked that have not answered yet.
    unanswered: HashSet<u64>,
    /// Offers not tried yet, in the order they arrived.
    offers: Vec<Offer>,
    /// When the first offer arrived: the pick waits at most
    /// [`OFFER_GRACE`] after it for the others.
    first_offer_at: Option<Instant>,
    /// Why peers that might hold the file did not deliver it: any of these,
    /// and "not found" would be a guess.
    failures: Vec<String>,
    /// The connection given the go-ahead, whose file the `get` waits for.
    chosen: Option<u64>,
    /// Set once the `get` has returned: later answers are not taken (an
    /// offer is released at once).
    done: bool,
    /// That file, handed over by the chosen connection's read loop: its
    /// metadata, and the claim on its stream (the connection's read half).
    /// Only the chosen holder's file is ever put here, and only while the
    /// `get` waits for it.
    arrived: Option<(Meta, StreamClaim)>,
}

/// A holder's "I have it, ready to send".
struct Offer {
    /// The connection it came on.
    peer: Arc<Transport>,
    /// The version held ready.
    version: Version,
    /// Its size in bytes.
    size: u64,
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

/// Which diagram a stream belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Diagram 1: the origin's push. It alone sends these bytes, so it sets
    /// the pace (bounded only by the heartbeat timeout), and the Peer logs
    /// "Save file".
    Push,
    /// Diagram 2: a file this node asked for. Another holder can be asked,
    /// so this one must keep the floor rate (see `limits`).
    Fetch,
}

/// One frame a read loop delivers to its connection's handler.
struct Delivery {
    frame: Frame,
    /// The claim on its stream, if it announces file data.
    claim: Option<StreamClaim>,
}

/// Everything a node's threads share.
pub(crate) struct Node {
    /// How the node was set up.
    config: Config,
    /// The address the listener is bound to.
    listen_addr: SocketAddr,
    /// The local disk store.
    store: Store,
    /// The clock and the seen-set. Leaf lock.
    gossip: Mutex<Gossip>,
    /// The connected peers, one connection per pair of nodes.
    peers: PeerMap,
    /// Who waits for the answer to each `Get` we sent, by request id.
    pending: Mutex<HashMap<u64, Waiter>>,
    /// Files on their way to us, by key (see `expected`).
    expected: Expected,
    /// The id of the next `Get` we send.
    next_request: AtomicU64,
    /// Every thread the node started, and the flag that stops them.
    threads: Threads,
    /// What the node did and moved, for [`Stats`].
    counters: Arc<Counters>,
    /// What the hardening keeps (see `hardening::wiring`).
    hardening: Hardening,
}

// `id()` and `name()` come from the node's `Host` impl (`server/hooks.rs`).
impl Node {
    /// This node as its hardening sees it.
    fn host(self: &Arc<Self>) -> Arc<dyn Host> {
        Arc::clone(self) as Arc<dyn Host>
    }

    // -----------------------------------------------------------------------
    // Diagram 1 on the node the client called; diagram 2 on the asking node
    // -----------------------------------------------------------------------

    /// Saving a file: save it locally, then push it to every direct peer.
    /// Returns once the local copy is durable.
    pub fn store_file(&self, key: &str, reader: &mut dyn Read) -> Result<()> {
        let (temp, version) = self.upload(key, reader)?;
        let size = temp.size();
        let (done_tx, done_rx) = mpsc::channel();
        self.store.commit_later(temp, version, Box::new(move |c| drop(done_tx.send(c))));
        self.stored(key, size, version, done_rx.recv().unwrap_or(Err(Error::Closed)))
    }

    /// A store that returns once the file is written, not committed: the
    /// file joins the next batch commit, and `then` hears how the store
    /// ended once the batch is durable and the pushes are queued. A client
    /// putting a folder sends file after file this way, and they commit
    /// together. `then` runs on the committer thread (on this one if no
    /// committer runs).
    pub fn store_file_then(
        self: &Arc<Self>,
        key: &str,
        reader: &mut dyn Read,
        then: Box<dyn FnOnce(Result<()>) + Send>,
    ) -> Result<()> {
        let (temp, version) = self.upload(key, reader)?;
        let (node, key, size) = (Arc::clone(self), key.to_string(), temp.size());
        let done = move |committed| then(node.stored(&key, size, version, committed));
        self.store.commit_later(temp, version, Box::new(done));
        Ok(())
    }

    /// A store's first steps: the upload into a temp file, and the write's
    /// version; the caller queues the file for its batch commit.
    fn upload(&self, key: &str, reader: &mut dyn Read) -> Result<(TempFile, Version)> {
        check_key(key)?;
        self.check_running()?;
        let me = self.name();
        debug!(target: me, "Upload file key={key}");
        let temp = self.store.write_temp(key, reader)?;
        let version = lock(&self.gossip).next_version(wall_millis());
        debug!(target: me, "Save file key={key} size={} version={version} (queued for its batch)", temp.size());
        Ok((temp, version))
    }

    /// The rest of a store, once its batch is durable: log the save, and
    /// push the file to every direct peer.
    fn stored(
        &self,
        key: &str,
        size: u64,
        version: Version,
        committed: Result<bool>,
    ) -> Result<()> {
        let me = self.name();
        if !committed? {
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

    /// Getting a file: from the local store if it is there (or once the
    /// copy already on its way is), else from the peer whose offer it picks.
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
        let deadline = Instant::now() + self.config.get_timeout;
        if self.wait_for_incoming(key, deadline)
            && let Some(file) = self.store.open_file(key)?
        {
            debug!(target: me, "Serve file key={key} size={} (the copy on its way)", file.size());
            return Ok(file);
        }
        let peers = self.peers.handles();
        if peers.is_empty() && self.hardening.expects_peers(self) {
            return Err(Error::Unavailable(format!("no peer is connected to ask for {key:?}")));
        }
        // Register before asking, so no answer can arrive unexpected.
        let waiter = Arc::new(GetWaiter::new(key, peers.iter().map(|peer| peer.conn).collect()));
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        lock(&self.pending).insert(request, Waiter::Get(Arc::clone(&waiter)));
        let _pending = PendingGet { node: self, request, waiter: &waiter };
        debug!(target: me, "Broadcast getfile key={key} peers={}", peers.len());
        let get = Frame::Get { request, key: key.to_string() };
        for peer in &peers {
            if !peer.queue(Outbound::Frame(get.clone())) {
                waiter.gone(peer.conn, format!("peer={} could not be asked", peer.name()));
            }
        }
        // Phase two, offer by offer, until one delivers. Past the deadline
        // there is one stall bound more for the copy under way, and no
        // further go-ahead.
        let last = deadline + self.config.heartbeat_timeout;
        while let Some(offer) = waiter.pick(deadline, key)? {
            if Instant::now() >= last {
                return Err(Error::Timeout(format!("no copy of {key:?} arrived in time")));
            }
            if let Some(file) = self.take_offer(&waiter, request, key, &offer, last)? {
                return Ok(file);
            }
        }
        let failures = std::mem::take(&mut lock(&waiter.answers).failures);
        if failures.is_empty() {
            return Err(Error::NotFound(key.to_string()));
        }
        Err(Error::Unavailable(format!("no copy of {key:?} arrived: {}", failures.join("; "))))
    }

    /// Diagram 2's second phase for one offer: "Send metadata" back to its
    /// holder (the go-ahead), wait for its file, then lock, stream, unlock
    /// and serve. Returns `None` if this holder did not deliver (the reason
    /// is kept in the waiter's failures), so the next offer is tried.
    fn take_offer(
        &self,
        waiter: &GetWaiter,
        request: u64,
        key: &str,
        offer: &Offer,
        last: Instant,
    ) -> Result<Option<FileReader>> {
        let (me, peer) = (self.name(), &offer.peer);
        // A push or a fetch may have set out since the broadcast, or even
        // arrived: then that copy is the one to serve, not a second.
        if self.expected.is_coming(key, offer.version) {
            self.wait_for_incoming(key, last);
        }
        if let Some(file) = self.store.open_file(key)?
            && file.version() >= offer.version
        {
            debug!(target: me, "Serve file key={key} size={} (the copy that came meanwhile)", file.size());
            return Ok(Some(file));
        }
        // This copy is on its way now: announcements and digests wait for it.
        self.expect_incoming(key, offer.version, request, true, None);
        lock(&waiter.answers).chosen = Some(peer.conn);
        debug!(target: me, "Send metadata (filename, size) key={key} size={} to={} (go-ahead)", offer.size, peer.name());
        let go = Frame::GoAhead { request, key: key.to_string(), version: offer.version };
        let arrived = if peer.queue(Outbound::Frame(go)) {
            waiter.wait_for_file(peer, last.min(Instant::now() + self.config.heartbeat_timeout))
        } else {
            Err(format!("peer={} could not be given the go-ahead", peer.name()))
        };
        let outcome = arrived.and_then(|(meta, claim)| {
            // A lone file: its batch is itself, on this thread.
            self.stream_in(claim, &meta, Flow::Fetch)
                .and_then(|temp| self.store.commit(temp, meta.version))
                .map_err(|err| format!("from {}: {err}", peer.name()))
        });
        self.expected.done(key, request, offer.version);
        if let Err(why) = outcome {
            lock(&waiter.answers).failures.push(why);
            return Ok(None);
        }
        // Held now, from this copy or an equal one that came first; gone
        // if something newer (a delete) beat it.
        let file = self.store.open_file(key)?;
        Ok(file.inspect(|file| debug!(target: me, "Serve file key={key} size={}", file.size())))
    }

    /// A `get` found no local copy: if one is on its way (a push, a fetch,
    /// another `get`), wait for it rather than ask for a second, until
    /// `deadline`. Returns whether it waited.
    fn wait_for_incoming(&self, key: &str, deadline: Instant) -> bool {
        self.expected.wait(key, deadline, |version| {
            debug!(target: self.name(), "Waiting for the copy on its way key={key} version={version}");
        })
    }

    /// The consumer's side of the hand-off, for diagram 1's Peer and
    /// diagram 2's Server alike: lock the transport the metadata came on
    /// (the claim is consumed), stream exactly the announced bytes into a
    /// temp file (checked against the SHA-1), unlock. The caller commits
    /// the file once the transport is free again, so the next file can
    /// stream in while this one waits for its batch (see `store`'s group
    /// commit). A copy whose bytes do not match is reported to its sender,
    /// whose own copy may be damaged.
    fn stream_in(&self, claim: StreamClaim, meta: &Meta, flow: Flow) -> Result<TempFile> {
        let (me, peer) = (self.name(), Arc::clone(claim.peer()));
        let (from, key, version) = (peer.name(), meta.key.as_str(), meta.version);
        let mut stream = claim.lock();
        debug!(target: me, "Lock transport layer peer={from} key={key}");
        let received = if lock(&self.gossip).observe(version, wall_millis()) {
            debug!(target: me, "Stream file data key={key} size={} from={from}", meta.size);
            match flow {
                Flow::Push => self.store.receive_temp(key, &mut stream, meta.size, &meta.sha1),
                // Another holder can be asked: this one must keep pace.
                Flow::Fetch => {
                    let mut paced = Floor::new(&mut stream);
                    self.store.receive_temp(key, &mut paced, meta.size, &meta.sha1)
                }
            }
        } else {
            Err(Error::Protocol(format!("version {version} is implausibly far ahead of our clock")))
        };
        if flow == Flow::Push && received.is_ok() {
            debug!(target: me, "Save file key={key} version={version} (queued for its batch)");
        }
        drop(stream);
        debug!(target: me, "Unlock transport layer peer={from}");
        if let Err(err) = &received {
            warn!(target: me, "Discarded file key={key} from={from}: {err}");
            if matches!(err, Error::Corrupt(_)) {
                let key = key.to_string();
                peer.queue(Outbound::Frame(Frame::Corrupt { key, version }));
            }
        }
        received
    }

    /// After the unlock: a received file joins the next batch commit, and
    /// `received` hears how it went once the batch is durable.
    fn commit_received(
        self: &Arc<Self>,
        peer: &Arc<Transport>,
        meta: Meta,
        request: u64,
        received: Result<TempFile>,
    ) {
        match received {
            Err(err) => self.received(peer, meta, request, Err(err)),
            Ok(temp) => {
                let (node, peer, version) = (Arc::clone(self), Arc::clone(peer), meta.version);
                let done = move |committed| node.received(&peer, meta, request, committed);
                self.store.commit_later(temp, version, Box::new(done));
            }
        }
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

    fn check_running(&self) -> Result<()> {
        if self.threads.stopping() { Err(Error::Closed) } else { Ok(()) }
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
        let (silence, counters) = (self.config.heartbeat_timeout, Arc::clone(&self.counters));
        let (transport, writer, rx) =
            Transport::new(self.name(), stream, hello, outbound, silence, counters)?;
        let peer = Arc::new(transport);
        let (node, writer_peer) = (Arc::clone(self), Arc::clone(&peer));
        self.threads.spawn(format!("{} TL write {}", self.name(), peer.name()), move || {
            if let Err(err) = write_loop(&writer_peer, writer, rx, &node.store) {
                debug!(target: node.name(), "Writer for peer={} stopped: {err}", writer_peer.name());
            }
        });
        if self.peers.register(self.id(), &peer) {
            // Registered: every store from now on is pushed here. Say so,
            // so the peer decides "a push is coming" exactly as we do.
            let now = lock(&self.gossip).next_version(wall_millis());
            peer.queue(Outbound::Frame(Frame::PushesFrom { version: now }));
            info!(target: self.name(), "Connected to peer={} addr={}", peer.name(), peer.peer.listen_addr);
            self.hardening.greet(&**self, &peer);
        } else {
            // A duplicate still serves what the peer sends on it, until the
            // connection kept closes it (see `PeerMap::register`).
            debug!(target: self.name(), "Dropping duplicate connection to peer={}", peer.name());
        }

        let (handler_tx, handler_rx) = mpsc::sync_channel(HANDLER_QUEUE_LEN);
        let (node, handler_peer) = (Arc::clone(self), Arc::clone(&peer));
        self.threads.spawn(format!("{} Peer {}", self.name(), peer.name()), move || {
            node.handle_loop(&handler_peer, handler_rx)
        });
        let result = peer.read_loop(|frame, claim| self.deliver(&peer, &handler_tx, frame, claim));

        drop(handler_tx); // ends the handler once it has done what it was given
        let left = self.peers.unregister(&peer);
        if left {
            info!(target: self.name(), "Peer left peer={} addr={}", peer.name(), peer.peer.listen_addr);
        }
        peer.close();
        self.connection_closed(peer.conn, peer.id());
        if !left {
            debug!(target: self.name(), "Duplicate connection to peer={} closed", peer.name());
        }
        result
    }

    /// Runs on the read loop (TL) for every frame: an answer to a `get` goes
    /// to the thread inside that `get`; everything else goes to this
    /// connection's handler (the diagrams' Peer). Logs the TL's arrows.
    fn deliver(
        &self,
        peer: &Arc<Transport>,
        handler: &SyncSender<Delivery>,
        frame: Frame,
        claim: Option<StreamClaim>,
    ) -> Result<()> {
        Counters::add(&self.counters.frames_received, 1);
        let (me, from) = (self.name(), peer.name());
        let request = match &frame {
            // Liveness is the transport's business: its bytes were the point.
            Frame::Ping => return Ok(()),
            Frame::Store { key, size, .. } => {
                debug!(target: me, "Send metadata (filename, size) key={key} size={size} from={from}");
                None
            }
            Frame::Offer { request, .. }
            | Frame::File { request, .. }
            | Frame::NotFound { request, .. } => Some(*request),
            _ => None,
        };
        let Some(request) = request else {
            return handler.send(Delivery { frame, claim }).map_err(|_| Error::Closed);
        };
        let waiter = lock(&self.pending).get(&request).cloned();
        let unasked = match waiter {
            Some(Waiter::Get(waiter)) => {
                if let Frame::Offer { key, size, .. } = &frame {
                    debug!(target: me, "Send metadata (filename, size) key={key} size={size} from={from}");
                }
                // Taken by the `get`, or not wanted by it.
                let Some(unwanted) = waiter.answer(peer, frame, claim) else {
                    return Ok(());
                };
                unwanted
            }
            Some(Waiter::Fetch { conn, .. })
                if conn == peer.conn && !matches!(frame, Frame::Offer { .. }) =>
            {
                if let Frame::File { key, size, .. } = &frame {
                    debug!(target: me, "Send metadata (filename, size) key={key} size={size} from={from}");
                }
                return handler.send(Delivery { frame, claim }).map_err(|_| Error::Closed);
            }
            // We asked nobody this, asked another peer, or stopped asking.
            _ => frame,
        };
        // Dropped; a stream's claim goes unlocked, so the read loop discards
        // the bytes. An offer nobody takes is released at once.
        debug!(target: me, "Ignoring an answer to no question of ours from={from}: {:?}", unasked.tag());
        if let Frame::Offer { request, .. } = unasked {
            peer.queue(Outbound::Frame(Frame::Release { request }));
        }
        Ok(())
    }

    /// A connection's handler thread: the diagrams' Peer. Acts on each
    /// frame the read loop delivers, in order; an error closes the
    /// connection.
    fn handle_loop(self: &Arc<Self>, peer: &Arc<Transport>, deliveries: Receiver<Delivery>) {
        // The files this Peer offered on this connection, held ready.
        let mut offers = HeldOffers::default();
        for Delivery { frame, claim } in deliveries {
            // A closed connection's leftovers are not acted on.
            if peer.is_closed() {
                self.hardening.after_close(&self.host(), frame);
                continue;
            }
            if let Err(err) = self.handle(peer, &mut offers, frame, claim) {
                warn!(target: self.name(), "Closing peer={}: {err}", peer.name());
                peer.close();
                break;
            }
        }
    }

    /// What the node does with one frame from a peer.
    fn handle(
        self: &Arc<Self>,
        peer: &Arc<Transport>,
        offers: &mut HeldOffers,
        frame: Frame,
        claim: Option<StreamClaim>,
    ) -> Result<()> {
        let stream = || claim.ok_or_else(|| Error::Protocol("a frame without its stream".into()));
        match frame {
            Frame::Store { key, version, size, sha1 } => {
                self.on_store(peer, Meta { key, version, size, sha1 }, stream()?);
            }
            Frame::Get { request, key } => self.on_get(peer, offers, request, key),
            Frame::GoAhead { request, key, version } => {
                self.on_go_ahead(peer, offers, request, key, version);
            }
            Frame::Release { request } => drop(offers.take(request, None)),
            Frame::Announce { key, version, size, .. } => {
                self.on_announce(peer, &key, version, size);
            }
            Frame::PushesFrom { version } => peer.promise_pushes_from(version),
            Frame::File { request, key, version, size, sha1 } => {
                self.on_fetched(peer, request, Meta { key, version, size, sha1 }, stream()?)?;
            }
            Frame::NotFound { request, .. } => {
                // The key asked, not the one the answer names.
                let asked = lock(&self.pending).get(&request).cloned();
                if let Some(Waiter::Fetch { key, version, .. }) = asked {
                    let why = format!("peer={} has no such file", peer.name());
                    self.fetch_failed(request, &key, version, &why);
                }
            }
            Frame::Delete { key, version } => self.on_delete(peer, key, version)?,
            Frame::Clear { version } => self.on_clear(peer, version)?,
            Frame::Error { code, message } => {
                let why = format!("the peer closed the connection ({code:?}): {message}");
                return Err(Error::Protocol(why));
            }
            // Anti-entropy, discovery, corruption reports; or a frame no
            // peer may send.
            other => self.hardening.handle(&self.host(), peer, other)?,
        }
        Ok(())
    }

    /// Diagram 1, the receiving half: lock the transport, stream the file
    /// into a temp file, unlock; once its batch commit is durable, announce
    /// it to our other peers.
    fn on_store(self: &Arc<Self>, peer: &Arc<Transport>, meta: Meta, claim: StreamClaim) {
        // Seen, or older than what we hold: the claim is dropped unlocked and
        // the read loop discards the bytes.
        if !self.accept_change(peer, Some(&meta.key), meta.version) {
            return;
        }
        self.expect_incoming(&meta.key, meta.version, 0, true, None);
        let received = self.stream_in(claim, &meta, Flow::Push);
        self.commit_received(peer, meta, 0, received);
    }

    /// Diagram 2, the Peer's half of phase one: it receives getfile, gets
    /// the file from its store and retrieves its stream (the file, opened
    /// and held ready in `offers`), then sends only its metadata back: an
    /// offer. A missing file is answered "not found" at once.
    fn on_get(&self, peer: &Transport, offers: &mut HeldOffers, request: u64, key: String) {
        let me = self.name();
        debug!(target: me, "Peer receives getfile key={key} from={}", peer.name());
        debug!(target: me, "Get file key={key}");
        let file = self.store.open_file(&key).unwrap_or_else(|err| {
            warn!(target: me, "Answering not found for key={key}: {err}");
            None
        });
        let Some(file) = file else {
            peer.queue(Outbound::Frame(Frame::NotFound { request, key }));
            return;
        };
        let (version, size, sha1) = (file.version(), file.size(), file.sha1());
        debug!(target: me, "Retrieve File Stream key={key} size={size} version={version}");
        offers.hold(request, key.clone(), Box::new(file));
        debug!(target: me, "Send metadata (filename, size) key={key} size={size} to={}", peer.name());
        peer.queue(Outbound::Frame(Frame::Offer { request, key, version, size, sha1 }));
    }

    /// Diagram 2, the Peer's half of phase two: the asker picked us. Hand
    /// the file held ready (or, for a fetch, none: the writer opens it) to
    /// the writer, which streams it after a `File` frame.
    fn on_go_ahead(
        &self,
        peer: &Transport,
        offers: &mut HeldOffers,
        request: u64,
        key: String,
        version: Version,
    ) {
        let held = offers.take(request, Some(&key));
        let ready = if held.is_some() { "held ready" } else { "to open" };
        debug!(target: self.name(), "Go-ahead for key={key} version={version} ({ready}) from={}", peer.name());
        peer.queue(Outbound::Reply { request, key, version, held });
    }

    /// A peer committed a version of `key` and tells us. Fetch it from that
    /// peer, unless we hold it, it is on its way, or its origin (a direct
    /// peer of ours) is pushing it to us anyway.
    fn on_announce(&self, peer: &Transport, key: &str, version: Version, size: u64) {
        match self.expected.announced(key, version, peer.id()) {
            // On its way: this peer is kept in mind in case that copy fails.
            Announced::Coming => return,
            // Asked for long ago and still not here: ask this peer.
            Announced::Lapsed => {
                self.fetch(peer, key, version, true);
                return;
            }
            Announced::New => {}
        }
        let origin = self.peers.get(version.node).filter(|origin| origin.pushes(version));
        // A small file whose push waits behind another stream is fetched.
        let busy = |origin: &Transport| fetches::past_busy_origin(origin, size);
        if origin.is_some_and(|origin| version.node != peer.id() && !busy(&origin)) {
            // The origin promised (`PushesFrom`) to push this store to us:
            // its push is on its way, and a fetch too would bring a second
            // copy. Wait for the push, with this peer as the place to ask
            // if it fails or does not come. The version is judged but not
            // marked seen, so the push gets through.
            let held = self.store.entry(key).map(|entry| entry.version);
            let cleared = self.store.cleared();
            if !fetches::room_to_expect(self.expected.len_swept()) {
                self.refuse_fetch(key, version);
            } else if lock(&self.gossip).observe(version, wall_millis())
                && gossip::wins(version, held, cleared)
            {
                self.expect_incoming(key, version, 0, false, None);
                self.expected.add_source(key, version, peer.id());
            }
            return;
        }
        if self.accept_change(peer, Some(key), version) {
            self.fetch(peer, key, version, false);
        }
    }

    /// Diagram 2's second phase aimed at one peer: its announcement or
    /// digest entry is the offer, so the go-ahead goes out at once. The
    /// file comes back to this connection's handler ([`Node::on_fetched`]).
    ///
    /// Unless this `retry`s a copy that failed or lapsed, nothing is asked
    /// if a copy of that version or newer is already on its way (a push, a
    /// fetch, a `get`): `peer` is only kept as the place to ask if that
    /// copy fails. The check and the note that a copy is coming are one
    /// step, under the incoming lock, so two handlers that hear of the same
    /// version at once fetch it once. Returns false if the fetch did not
    /// fit the bounds (see `hardening::fetches`).
    pub fn fetch(&self, peer: &Transport, key: &str, version: Version, retry: bool) -> bool {
        // Checked before the bounds: what is on its way is never refused.
        if !retry && matches!(self.expected.announced(key, version, peer.id()), Announced::Coming) {
            return true;
        }
        let waiting: Vec<(u64, Instant)> = lock(&self.pending)
            .values()
            .filter_map(|waiter| match waiter {
                Waiter::Fetch { conn, asked_at, .. } => Some((*conn, *asked_at)),
                Waiter::Get(_) => None,
            })
            .collect();
        if !fetches::room(self, peer, key, &waiting, self.expected.len_swept()) {
            self.refuse_fetch(key, version);
            return false;
        }
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        if !self.expect_incoming(key, version, request, false, (!retry).then(|| peer.id())) {
            return true; // another handler set out for it meanwhile
        }
        let (conn, asked_at) = (peer.conn, Instant::now());
        let waiter = Waiter::Fetch { conn, key: key.to_string(), version, asked_at };
        lock(&self.pending).insert(request, waiter);
        debug!(target: self.name(), "Fetching key={key} version={version} from={}", peer.name());
        let go = Frame::GoAhead { request, key: key.to_string(), version };
        if !peer.queue(Outbound::Frame(go)) {
            self.fetch_failed(request, key, version, "the connection is closing");
        }
        true
    }

    /// A fetch or a wait that did not fit: counted, and its version
    /// forgotten, so a later announcement or anti-entropy round brings it.
    fn refuse_fetch(&self, key: &str, version: Version) {
        Counters::add(&self.counters.fetches_refused, 1);
        debug!(target: self.name(), "Not expecting key={key} version={version}: no room");
        lock(&self.gossip).forget(version);
    }

    /// The answer to a fetch: the same lock, stream and unlock as a `get`,
    /// on this connection's handler.
    fn on_fetched(
        self: &Arc<Self>,
        peer: &Arc<Transport>,
        request: u64,
        meta: Meta,
        claim: StreamClaim,
    ) -> Result<()> {
        let asked = lock(&self.pending).remove(&request);
        if let Some(Waiter::Fetch { key, .. }) = asked
            && key != meta.key
        {
            let why = format!("asked for {key:?}, sent {:?}", meta.key);
            return Err(Error::Protocol(why));
        }
        let held = self.store.entry(&meta.key).map(|entry| entry.version);
        if !gossip::wins(meta.version, held, self.store.cleared()) {
            // We got it meanwhile (or something newer): the claim is dropped
            // unlocked and the bytes are discarded.
            self.expected.done(&meta.key, request, meta.version);
            return Ok(());
        }
        self.expected.streaming(&meta.key, request);
        let received = self.stream_in(claim, &meta, Flow::Fetch);
        self.commit_received(peer, meta, request, received);
        Ok(())
    }

    /// After a pushed or fetched file was streamed in: count it and announce
    /// it on, or, if it failed, try the next peer that has it.
    fn received(&self, peer: &Transport, meta: Meta, request: u64, committed: Result<bool>) {
        let Meta { key, version, size, sha1 } = meta;
        let applied = match committed {
            Ok(applied) => applied,
            Err(err) => return self.fetch_failed(request, &key, version, &err.to_string()),
        };
        self.expected.done(&key, request, version);
        if applied {
            Counters::add(&self.counters.changes_applied, 1);
            info!(target: self.name(), "Stored file key={key} size={size} version={version} from={}", peer.name());
            let announce = Frame::Announce { key, version, size, sha1 };
            self.relay(&announce, version.node, Some(peer.id()));
        }
    }

    /// Notes that `key` at `version` is on its way by `request` (0 for a
    /// push): see `Expected::note`, which says when it is not (false). A
    /// fetch whose entry this replaces will be answered to nobody: its
    /// request is forgotten. (A `get` replaced goes on: its thread ends its
    /// own request.)
    fn expect_incoming(
        &self,
        key: &str,
        version: Version,
        request: u64,
        streaming: bool,
        source: Option<NodeId>,
    ) -> bool {
        let Some(replaced) = self.expected.note(key, version, request, streaming, source) else {
            return false;
        };
        let mut pending = lock(&self.pending);
        if matches!(pending.get(&replaced), Some(Waiter::Fetch { .. })) {
            pending.remove(&replaced);
        }
        true
    }

    /// A fetch or push of `key` failed: ask the next peer that announced the
    /// same version, or give up and let the version be accepted again.
    fn fetch_failed(&self, request: u64, key: &str, version: Version, why: &str) {
        lock(&self.pending).remove(&request);
        loop {
            let (version, next) = match self.expected.next_source(key, request, version) {
                Next::Replaced => return, // a newer fetch or push took over
                Next::GiveUp(version) => {
                    debug!(target: self.name(), "Gave up on key={key} version={version}: {why}");
                    lock(&self.gossip).forget(version);
                    return;
                }
                Next::Ask(version, next) => (version, next),
            };
            if let Some(peer) = self.peers.get(next) {
                info!(target: self.name(), "Fetching key={key} from another peer ({why})");
                if !self.fetch(&peer, key, version, true) {
                    // No room: give the entry up, so it neither blocks the
                    // key nor counts against the bound.
                    self.expected.done(key, request, version);
                }
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

    /// A connection closed: every `get` that asked it stops waiting for it,
    /// and every fetch from it moves on to another source.
    fn connection_closed(&self, conn: u64, id: NodeId) {
        // With no connection left to the node behind this one, the pushes
        // awaited from it will not come: ask the other peers that announced
        // those versions. (A duplicate that closes leaves the one kept.)
        if self.peers.get(id).is_none() {
            for (key, version) in self.expected.awaited_from(id) {
                self.fetch_failed(0, &key, version, "the origin's connection closed");
            }
        }
        // A copy: `fetch_failed` takes the pending lock itself.
        let waiters = lock(&self.pending).clone();
        for (request, waiter) in waiters {
            match waiter {
                Waiter::Get(waiter) => {
                    waiter.gone(conn, "a peer's connection closed before it delivered".into());
                }
                Waiter::Fetch { conn: asked, key, version, .. } if asked == conn => {
                    self.fetch_failed(request, &key, version, "the connection closed");
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
        self.hardening.stop(self);
        // The committer finishes what is queued, then ends.
        self.store.stop_batches();
        self.threads.join_all();
        info!(target: self.name(), "Node stopped");
    }
}

/// Ends a `get`'s request when the `get` returns: no more answers are
/// taken for it, and the offers it did not pick are released.
struct PendingGet<'a> {
    node: &'a Node,
    request: u64,
    waiter: &'a GetWaiter,
}

impl GetWaiter {
    /// A waiter for the answers of these connections.
    fn new(key: &str, unanswered: HashSet<u64>) -> GetWaiter {
        let answers = Mutex::new(Answers { unanswered, ..Answers::default() });
        GetWaiter { key: key.to_string(), answers, changed: Condvar::new() }
    }

    /// Runs on a read loop (TL1): takes one answer from `peer`. Returns the
    /// frame if it answers nothing this `get` waits for: its stream, if any,
    /// is then not claimed, and the read loop discards it.
    fn answer(
        &self,
        peer: &Arc<Transport>,
        frame: Frame,
        claim: Option<StreamClaim>,
    ) -> Option<Frame> {
        let mut answers = lock(&self.answers);
        let conn = peer.conn;
        let ours = |key: &str| key == self.key && !answers.done;
        match frame {
            Frame::Offer { ref key, .. } | Frame::File { ref key, .. } if !ours(key) => {
                return Some(frame);
            }
            Frame::Offer { version, size, .. } if answers.unanswered.remove(&conn) => {
                answers.first_offer_at.get_or_insert_with(Instant::now);
                answers.offers.push(Offer { peer: Arc::clone(peer), version, size });
            }
            Frame::NotFound { .. } if answers.unanswered.remove(&conn) => {}
            Frame::NotFound { .. } if answers.chosen == Some(conn) => {
                answers.chosen = None;
                answers.failures.push(format!("peer={} no longer has it", peer.name()));
            }
            Frame::File { key, version, size, sha1, .. }
                if answers.chosen == Some(conn) && answers.arrived.is_none() =>
            {
                // A File frame always travels with its claim.
                answers.arrived = claim.map(|claim| (Meta { key, version, size, sha1 }, claim));
            }
            other => return Some(other),
        }
        drop(answers); // a leaf lock: released before waking the `get`
        self.changed.notify_all();
        None
    }

    /// `conn` will not answer: it could not be asked, or it closed.
    fn gone(&self, conn: u64, why: String) {
        let mut answers = lock(&self.answers);
        let asked = answers.unanswered.remove(&conn);
        let chosen = answers.chosen.take_if(|chosen| *chosen == conn).is_some();
        let offers = answers.offers.len();
        answers.offers.retain(|offer| offer.peer.conn != conn);
        if asked || chosen || answers.offers.len() < offers {
            answers.failures.push(why);
        }
        drop(answers); // a leaf lock: released before waking the `get`
        self.changed.notify_all();
    }

    /// Waits for the offers and takes the best: the newest version, among
    /// equals the first to arrive. Picks once every peer asked has
    /// answered, or [`OFFER_GRACE`] after the first offer. `None` once no
    /// offer is left and nobody else will answer.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if `deadline` passes with peers that might hold
    /// the file still silent, and no offer in hand.
    fn pick(&self, deadline: Instant, key: &str) -> Result<Option<Offer>> {
        let mut answers = lock(&self.answers);
        loop {
            let now = Instant::now();
            // Better offers are awaited until OFFER_GRACE after the first,
            // never past the deadline.
            let grace_end =
                answers.first_offer_at.map_or(deadline, |at| deadline.min(at + OFFER_GRACE));
            let all_in = answers.unanswered.is_empty();
            // max_by_key keeps the last of equals: search from the end so
            // the first to arrive wins a tie. None while no offer is in.
            let best = (0..answers.offers.len()).rev().max_by_key(|&i| answers.offers[i].version);
            if let Some(best) = best
                && (all_in || now >= grace_end)
            {
                return Ok(Some(answers.offers.remove(best)));
            }
            if all_in {
                return Ok(None);
            }
            if now >= deadline {
                return Err(Error::Timeout(format!("no peer answered for {key:?} in time")));
            }
            // A grace over with no offer left: only an answer or the deadline.
            let until = if now < grace_end { grace_end } else { deadline };
            let woken = self.changed.wait_timeout(answers, until - now);
            answers = woken.unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// After the go-ahead to `peer`: waits for its file, until `until`.
    /// Returns the file's metadata and its claim, or why it did not come.
    fn wait_for_file(
        &self,
        peer: &Transport,
        until: Instant,
    ) -> std::result::Result<(Meta, StreamClaim), String> {
        let mut answers = lock(&self.answers);
        loop {
            if let Some(arrived) = answers.arrived.take() {
                answers.chosen = None;
                return Ok(arrived);
            }
            let now = Instant::now();
            if answers.chosen != Some(peer.conn) || now >= until {
                // Said no, closed, or stalled: a file that comes later finds
                // nobody waiting, and its read loop discards it.
                answers.chosen = None;
                return Err(format!(
                    "peer={} did not send the file after its go-ahead",
                    peer.name()
                ));
            }
            let woken = self.changed.wait_timeout(answers, until - now);
            answers = woken.unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

impl Drop for PendingGet<'_> {
    fn drop(&mut self) {
        lock(&self.node.pending).remove(&self.request);
        let mut answers = lock(&self.waiter.answers);
        answers.done = true;
        let offers = std::mem::take(&mut answers.offers);
        drop(answers); // a leaf lock: released before queueing
        for offer in offers {
            offer.peer.queue(Outbound::Frame(Frame::Release { request: self.request }));
        }
    }
}
