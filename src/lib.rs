//! gossipfs: a small distributed file system. Every node keeps every file
//! on its own disk, and every change — a store, a delete, a clear — spreads
//! to the other nodes by gossip over plain TCP.
//!
//! It is a port of two small Go learning projects, rebuilt to be correct
//! (changes cross any number of hops and converge), to stream (memory does
//! not grow with file size), and to be read: the protocol code is written
//! to be learned from.
//!
//! # A store travelling through three nodes
//!
//! ```text
//!  client        s1 (Server)                s2 (Peer)                   s3
//!    | store(k) -->| save: tmp, SHA-1, commit |                          |
//!    |             |-- Store{k,v,size,sha1} ->| read loop hands it to the|
//!    |             |== size raw bytes =======>| handler and waits; the   |
//!    |             |                          | handler locks, streams,  |
//!    |             |                          | unlocks; batch commit    |
//!    |             |                          |-- Announce{k,v,...} ---->| lacks v: asks s2
//!    |             |                          |<----- GoAhead{k,v} ------|
//!    |             |                          |-- File{k,v,..} + bytes ->| locks, streams,
//!    |             |                          |                          | unlocks; commits
//! ```
//!
//! Only the node where the store was made pushes the bytes (diagram 1);
//! every further hop is a small announcement that a node lacking that
//! version answers with diagram 2's second phase aimed at one peer (the
//! announcement is the offer, so the go-ahead goes out at once), so a store
//! crosses each link once. A `get` of a key the node lacks asks every peer
//! in two phases: each holder offers (metadata, no bytes), the thread
//! inside `get` gives one of them the go-ahead, locks that transport,
//! streams the file into the store, and serves it. One copy moves.
//!
//! # Example
//!
//! One node on an ephemeral loopback port; with peers in
//! [`Config::bootstrap`], the same calls reach every node.
//!
//! ```
//! use std::io::Read;
//! use gossipfs::{Config, Error, FileServer};
//!
//! # fn main() -> gossipfs::Result<()> {
//! let root = std::env::temp_dir().join(format!("gossipfs-doc-{}", std::process::id()));
//! let mut config = Config::new("s1", &root); // listens on 127.0.0.1:0
//! config.fsync = false;
//! let node = FileServer::start(config)?;
//!
//! node.store("greeting", &b"hello"[..])?;
//! let mut text = String::new();
//! node.get("greeting")?.read_to_string(&mut text)?;
//! assert_eq!(text, "hello");
//!
//! node.delete("greeting")?;
//! assert!(matches!(node.get("greeting"), Err(Error::NotFound(_))));
//! node.shutdown();
//! # std::fs::remove_dir_all(&root).ok();
//! # Ok(())
//! # }
//! ```
//!
//! # Modules
//!
//! Two modules are public, because a program that speaks the protocol to a
//! node needs them: [`frame`], the wire format (every message, encode and
//! decode, limits; the command line's messages in [`frame::client`]), and
//! [`handshake`], who may connect (magic and version checks, the optional
//! cluster-secret proof). The rest is private; what a library user needs
//! is re-exported here.
//!
//! The core, in reading order (the README's "Reading the code"):
//!
//! 1. `frame`: the wire format.
//! 2. `transport`: one connection, the diagrams' transport layer: the read
//!    loop and the lock it hands to a stream's consumer, the writer thread.
//! 3. `server`: [`FileServer`] and the node behind it: the two diagrams,
//!    relay by announcement, the waiting `get`s.
//! 4. `gossip`: the rules, free of I/O: the hybrid logical clock, which
//!    change wins, the seen-set, relay targets, anti-entropy repairs.
//! 5. `store`: the disk: one file per key, atomic commits, tombstones, the
//!    clear watermark.
//!
//! The folders show the layers, and the imports run one way, downwards:
//!
//! - **Core**, `src/*.rs`: the five files above, `error` ([`Error`]), and
//!   `host`: the narrow interface the hardening stands on. `server` is the
//!   only module that knows the hardening; it calls it at named hooks and
//!   implements `host::Host` for it.
//! - **Support**, `src/support/`: `version` ([`Version`]), `config`
//!   ([`Config`], [`Stats`]), `threads`, `peers` (the peer map).
//! - **Hardening**, `src/hardening/`: each module opening with what it
//!   hardens and the core step it hooks into: `handshake`, `listener` (the
//!   connection cap), `limits` (queue budgets, the floor rate), `liveness`,
//!   `discovery`, `antientropy`, `tombstones`, `checked` (checked reads,
//!   [`FileReader`]), `corruption`, `hashing`, `recovery`, `session` (the
//!   command line's sessions), `fetches` (the bounds on fetches, the
//!   unanswered-fetch cutoff, the busy-origin rule) and `wiring` (the
//!   core's hooks into the rest, in one place). A hardening module imports
//!   the store, the peer map, the transport, `host` and other hardening
//!   modules, never `server`.
//!
//! The command line, the demo (`make run`) and the benchmark (`make bench`)
//! are not part of the library: they live in the `gossipfs` binary's own
//! modules (`src/cli/`) and use only the public API.
//!
//! # Threads
//!
//! Per node: one accept thread; per peer connection three: the read loop
//! (the connection's own thread, after the handshake), the handler (the
//! diagrams' Peer: it acts on what the read loop delivers) and the writer;
//! per client connection, one thread that answers each request; per
//! bootstrap address, a dialler that redials with backoff (and a one-shot
//! dialler per peer learned by discovery, and per remembered address being
//! redialled); a heartbeat timer, a redial timer, an anti-entropy timer, a
//! discovery timer and a tombstone sweeper; and the store's committer,
//! which commits queued files in batches (group commit), and while a
//! client's puts wait for their batch, that session's ack thread.
//! Short-lived helpers: a writer and a hashing thread (and, with fsync on,
//! a syncer) while a large file is written, the threads that sync a batch, and a
//! checking thread when a peer reports one of our files corrupt. Readers never write to sockets: they queue work for the
//! writer, so two nodes streaming to each other cannot deadlock.
//!
//! # Lock order
//!
//! No lock is held across network I/O. A connection's read half is not
//! behind a lock at all: it is owned, by the read loop or by one stream's
//! consumer, and the read loop waits for it to come home on a `Condvar`,
//! holding nothing (the slot it waits on is a leaf). Every lock (the peer
//! map, the gossip state, the pending requests, the incoming files, a
//! `get`'s answers, the store index, the commit queue, a few small sets)
//! is a leaf: taken
//! alone, briefly, never while holding another leaf. The one leaf held across disk work is
//! the store index, across the metadata steps that must be atomic with it
//! (a commit's rename, a clear's watermark and unlinks, setting a corrupt
//! file aside); never across streaming a file.
//!
//! # Non-goals
//!
//! No encryption in transit (a cluster secret authenticates, it does not
//! hide), no partial replication (every node holds every file), no
//! conflict detection (last writer wins), no async.
//!
//! # Platform
//!
//! Unix only: node ids and nonces come from `/dev/urandom`, a commit
//! fsyncs the directory it renamed into (a directory opened as a file), and
//! the store reads files at an offset with `std::os::unix::fs::FileExt`.

#![warn(missing_docs)]

// The core, `src/*.rs`: the reading path (frame, transport, server,
// gossip, store), the error kinds, and the interface the hardening stands on.
mod error;
pub mod frame;
mod gossip;
mod host;
mod server;
mod store;
mod transport;

// Support, `src/support/`: plain types and bookkeeping that the core uses.
mod support;

// Hardening, `src/hardening/`: each module hooked into one core step.
mod hardening;

pub use error::{Error, Result};
pub use hardening::checked::FileReader;
pub use hardening::handshake;
pub use server::FileServer;
pub use support::config::{Config, FileInfo, PeerInfo, Stats};
pub use support::version::{NodeId, Version};

/// `N` random bytes from the operating system (`/dev/urandom`), for node
/// ids, nonces and temp names.
///
/// # Errors
///
/// [`Error::Io`] if the operating system's random source cannot be read:
/// the caller refuses to go on rather than use ids or nonces that others
/// could predict.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    use std::io::{self, Read};
    let mut bytes = [0u8; N];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    read.map_err(|err| {
        io::Error::new(err.kind(), format!("cannot read random bytes from /dev/urandom: {err}"))
    })?;
    Ok(bytes)
}
