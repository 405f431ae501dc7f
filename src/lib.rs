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
//!  client          s1                        s2                        s3
//!    | store(k) -->|                          |                         |
//!    |             | save to disk (tmp+rename)|                         |
//!    |             |-- Store{k,v,size,sha1} ->| lock s1's transport     |
//!    |             |== size raw bytes =======>| stream to tmp, check    |
//!    |             |                          | SHA-1, commit, unlock   |
//!    |             |                          |-- Store{k,v,...} ------>| lock, stream,
//!    |             |                          |== bytes ===============>| commit, unlock
//! ```
//!
//! A `get` of a key the node lacks asks every peer; the first to answer
//! with the file streams it back under the asking node's transport lock,
//! and a peer without it answers "not found" at once.
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
//! # Modules, in reading order (wire first, node last)
//!
//! Two modules are public, because a program that speaks the protocol to a
//! node needs them:
//!
//! - [`frame`]: the wire format — every message, encode and decode, limits.
//! - [`handshake`]: who may connect — the magic and version checks and the
//!   optional cluster-secret proof, run on every fresh connection.
//!
//! The others are private; what a user of the library needs from them is
//! re-exported at the crate root:
//!
//! - `peer`: one connection after its handshake — the transport (read)
//!   lock, the writer thread.
//! - `gossip`: the rules, free of I/O — versions and the Lamport clock,
//!   seen ids, which change wins, relay targets, anti-entropy repairs.
//! - `store`: the local disk — one file per key, atomic commits
//!   ([`FileReader`]).
//! - `server`: [`FileServer`] — the API, the peer map, the threads
//!   ([`Config`], [`FileInfo`], [`PeerInfo`], [`Stats`]).
//! - `version`, `error`: the shared vocabulary ([`Version`], [`NodeId`],
//!   [`Error`], [`Result`]).
//!
//! The command line, the demo (`make run`) and the benchmark (`make bench`)
//! are not part of the library: they live in the `gossipfs` binary's own
//! modules (`src/cli/`) and use only the public API above.
//!
//! # Threads
//!
//! Per node: one accept thread; per peer connection, a connection thread
//! (the handshake, then the reader loop) and a writer thread fed by a
//! channel; per client connection, one thread that reads each request and
//! writes its answer;
//! per bootstrap address, a dialler that redials with backoff (and a
//! one-shot dialler per peer learned by discovery); one anti-entropy timer.
//! Short-lived helpers: a hashing thread while a large file is written, and
//! a checking thread when a peer reports one of our files corrupt. Readers
//! never write to sockets: they queue work for the writer, so two nodes
//! streaming to each other cannot deadlock.
//!
//! # Lock order
//!
//! The only lock held across network I/O is a peer's transport lock, for
//! exactly one frame and its stream. Every other lock — the peer map, the
//! gossip state, the pending gets, the store index and a few small sets — is
//! a leaf: taken alone, briefly, and never while holding another leaf. In
//! particular the peer-map lock is never held while taking a transport lock.
//! The one leaf held across disk work is the store index, across the
//! metadata steps that must be atomic with its update (a commit's rename, a
//! clear's watermark and unlinks, setting a corrupt file aside); never across
//! streaming a file.
//!
//! # Non-goals
//!
//! No encryption in transit (a cluster secret authenticates, it does not
//! hide), no partial replication (every node holds every file), no
//! tombstone garbage collection, no async.
//!
//! # Platform
//!
//! Unix only: node ids and nonces come from `/dev/urandom`, a commit
//! fsyncs the directory it renamed into (a directory opened as a file), and
//! the store reads files at an offset with `std::os::unix::fs::FileExt`.

#![warn(missing_docs)]

pub mod frame;
pub mod handshake;

mod config;
mod error;
mod gossip;
mod server;
mod store;
mod threads;
mod transport;
mod version;

// Hardening: outside the reading path, each hooked into one core step.
mod antientropy;
mod corruption;
mod discovery;
mod hashing;
mod listener;
mod peers;
mod recovery;
mod session;

pub use config::{Config, FileInfo, PeerInfo, Stats};
pub use corruption::FileReader;
pub use error::{Error, Result};
pub use server::FileServer;
pub use version::{NodeId, Version};

/// `N` random bytes from the operating system, for node ids and nonces.
///
/// Reads `/dev/urandom`. Where that is missing (not Linux or a BSD), falls
/// back to hashing the time, the process id and a counter: unique enough
/// for ids and temp names, though not for secrets.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    use std::io::Read;
    let mut bytes = [0u8; N];
    let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if from_os.is_err() {
        use sha1::Digest;
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut filled = 0;
        while filled < N {
            let mut hasher = sha1::Sha1::new();
            hasher.update(format!("{:?}", std::time::SystemTime::now()).as_bytes());
            hasher.update(std::process::id().to_be_bytes());
            hasher.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
            let block = hasher.finalize();
            let n = (N - filled).min(block.len());
            bytes[filled..filled + n].copy_from_slice(&block[..n]);
            filled += n;
        }
    }
    bytes
}
