//! The settings of a node and what it reports about itself: [`Config`],
//! checked before a node starts, and [`FileInfo`], [`PeerInfo`], [`Stats`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::frame::MAX_NAME_LEN;
use crate::support::version::{NodeId, Version};

/// The most connections a node keeps open at once, peers and clients, in
/// either direction (see `hardening::listener`).
pub(crate) const MAX_CONNECTIONS: usize = 256;

/// The buffer that content is streamed through: big enough that a gigabyte
/// costs few system calls, small enough not to matter per connection.
pub(crate) const STREAM_BUFFER_LEN: usize = 256 * 1024;

/// The buffer a connection's frames are read through. Smaller than
/// [`STREAM_BUFFER_LEN`], so that reading a stream into a whole stream
/// buffer skips it (`BufReader` does when it is empty and the read is at
/// least its size): the content is copied once, not twice.
pub(crate) const READ_BUFFER_LEN: usize = 64 * 1024;

/// How a node is set up. Start from [`Config::new`] and change fields.
#[derive(Clone)]
#[non_exhaustive]
pub struct Config {
    /// A name for people: it starts every log line of this node.
    pub name: String,
    /// The address to listen on, used by [`FileServer::start`](crate::FileServer::start).
    pub listen: String,
    /// The address peers should dial to reach this node, if not the one it
    /// listens on: behind a NAT or a proxy, say. It is what the node tells
    /// its peers in the handshake, and what they remember and redial.
    pub advertise: Option<String>,
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
    /// then one every `anti_entropy_interval`. A node with it off still
    /// answers its peers' summaries but never catches up by itself (tests
    /// and the demo use that to keep a file off one node).
    pub anti_entropy: bool,
    /// How often the node compares its files with each peer's.
    pub anti_entropy_interval: Duration,
    /// How long a `get` waits for peers that have not answered.
    pub get_timeout: Duration,
    /// Whether the node connects to the peers its peers tell it about.
    pub discover_peers: bool,
    /// Discovery stops dialling new peers once the node has this many.
    pub max_peers: usize,
    /// How often the node sends each peer a heartbeat (a `Ping` frame).
    pub heartbeat_interval: Duration,
    /// How long a peer may stay silent (no byte at all arrives from it,
    /// stream bytes included) before it is declared dead: its connection is
    /// closed, the `get`s waiting on it are answered, and it is redialled.
    /// At least twice `heartbeat_interval`.
    pub heartbeat_timeout: Duration,
    /// How long a tombstone (what a delete leaves) is kept. A node offline
    /// for longer than this may bring deleted files back (see the
    /// `tombstones` module). Seven days by default.
    pub tombstone_grace: Duration,
    /// How long a command-line client's session may stay silent before it
    /// is closed (at least two `get_timeout`s, so a slow `get` fits).
    pub idle_timeout: Duration,
    /// The most peer connections this node accepts (connections it did not
    /// dial). A peer dialling a node at this cap is declined: it is sent
    /// the addresses of the node's peers to try instead, then a `Busy`
    /// error. Twice the default `max_peers` by default, so no node becomes
    /// a hub however many nodes bootstrap through it. From 1 to
    /// 256 (the node's cap on connections of all kinds).
    pub max_inbound_peers: usize,
    /// The longest wait between two dials of an address that does not
    /// answer: the wait starts at 100 ms and doubles up to this. A minute
    /// by default.
    pub dial_retry_max: Duration,
    /// How long a remembered peer address (`ROOT/peers`) may stay
    /// unreachable before it is forgotten: dropped from that file and from
    /// memory, and dialled no more. A day by default.
    pub forget_unreachable_after: Duration,
}

impl Config {
    /// A config with the defaults: listen on an ephemeral loopback port,
    /// fsync on, no bootstrap peers, anti-entropy every 5 seconds.
    pub fn new(name: &str, root: impl Into<PathBuf>) -> Config {
        Config {
            name: name.to_string(),
            listen: "127.0.0.1:0".to_string(),
            advertise: None,
            root: root.into(),
            bootstrap: Vec::new(),
            fsync: true,
            secret: None,
            anti_entropy: true,
            anti_entropy_interval: Duration::from_secs(5),
            get_timeout: Duration::from_secs(10),
            discover_peers: true,
            max_peers: 8,
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(4),
            idle_timeout: Duration::from_secs(30),
            tombstone_grace: Duration::from_secs(7 * 24 * 3600),
            max_inbound_peers: 16,
            dial_retry_max: Duration::from_secs(60),
            forget_unreachable_after: Duration::from_secs(24 * 3600),
        }
    }

    /// Refuses settings the node cannot run with: a zero interval would
    /// spin, and a timeout beyond a day is a typo that would overflow
    /// deadlines.
    pub(crate) fn check(&self) -> Result<()> {
        const DAY: Duration = Duration::from_secs(24 * 3600);
        let durations = [
            ("anti_entropy_interval", self.anti_entropy_interval),
            ("get_timeout", self.get_timeout),
            ("idle_timeout", self.idle_timeout),
            ("heartbeat_interval", self.heartbeat_interval),
            ("heartbeat_timeout", self.heartbeat_timeout),
            ("dial_retry_max", self.dial_retry_max),
        ];
        for (field, value) in durations {
            if value.is_zero() || value > DAY {
                return Err(Error::Config(format!(
                    "{field} must be above zero and at most a day, not {value:?}"
                )));
            }
        }
        if self.tombstone_grace.is_zero() {
            return Err(Error::Config("tombstone_grace must be above zero".into()));
        }
        if self.forget_unreachable_after.is_zero() {
            return Err(Error::Config("forget_unreachable_after must be above zero".into()));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.max_inbound_peers) {
            return Err(Error::Config(format!(
                "max_inbound_peers must be 1 to {MAX_CONNECTIONS}, not {}",
                self.max_inbound_peers
            )));
        }
        if let Some(addr) = &self.advertise
            && addr.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(Error::Config(format!("advertise {addr:?} is not ip:port")));
        }
        if self.heartbeat_timeout < self.heartbeat_interval * 2 {
            return Err(Error::Config(format!(
                "heartbeat_timeout ({:?}) must be at least twice heartbeat_interval ({:?}): \
                 one late heartbeat must not kill a live link",
                self.heartbeat_timeout, self.heartbeat_interval
            )));
        }
        if !(1..=MAX_NAME_LEN).contains(&self.name.len()) || self.name.chars().any(char::is_control)
        {
            return Err(Error::Config(format!(
                "the node name must be 1 to {MAX_NAME_LEN} bytes, without control characters"
            )));
        }
        if self.secret.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(Error::Config("the cluster secret is empty".into()));
        }
        Ok(())
    }
}

impl std::fmt::Debug for Config {
    /// Which node this is, and whether it has a secret; not the secret
    /// itself. The rest is left out (`..`): a list of every field would
    /// have to remember to leave out any secret added later.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("name", &self.name)
            .field("listen", &self.listen)
            .field("root", &self.root)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// A live file, as [`FileServer::list`](crate::FileServer::list) reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileInfo {
    /// The key it was stored under.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// The version of the store that wrote it.
    pub version: Version,
}

/// A connected peer, as [`FileServer::peers`](crate::FileServer::peers) reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerInfo {
    /// The peer's node id.
    pub id: NodeId,
    /// The peer's node name (its [`Config::name`]).
    pub name: String,
    /// The address it listens on.
    pub addr: String,
    /// Whether this node dialled the connection (false: the peer dialled
    /// us, and it counts against `Config::max_inbound_peers`).
    pub outbound: bool,
}

/// Counters, for tests, the benchmark and `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Changes received from peers and applied (stores, deletes, clears).
    pub changes_applied: u64,
    /// Changes received that had been seen before.
    pub duplicates_dropped: u64,
    /// Changes received that lost to something newer.
    pub stale_dropped: u64,
    /// Frames written to peers.
    pub frames_sent: u64,
    /// File bytes streamed to peers.
    pub bytes_sent: u64,
    /// File bytes read from peers, stored or drained.
    pub bytes_received: u64,
    /// Streams a read loop handed to another thread (a handler or a `get`),
    /// which locked the transport to read them.
    pub handoffs: u64,
    /// Frames read from peers.
    pub frames_received: u64,
    /// Fetches waiting for their file now (a gauge, bounded: see
    /// `hardening::limits`).
    pub fetches_waiting: u64,
    /// Files noted as on their way now (a gauge, bounded likewise).
    pub files_expected: u64,
    /// Fetches not made because too many were waiting (anti-entropy asks
    /// again later).
    pub fetches_refused: u64,
    /// Syncs made to commit files: one per file and one per directory a
    /// batch touched (0 with `fsync` off). See `store`'s group commit.
    pub syncs: u64,
    /// Batches committed, each a run of files synced together (a file
    /// committed alone counts as one).
    pub batches: u64,
}

/// The live counters behind [`Stats`], shared by a node's threads and its
/// connections. Relaxed atomics: each is a tally, read only for reports.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// See [`Stats::changes_applied`].
    pub changes_applied: AtomicU64,
    /// See [`Stats::duplicates_dropped`].
    pub duplicates_dropped: AtomicU64,
    /// See [`Stats::stale_dropped`].
    pub stale_dropped: AtomicU64,
    /// See [`Stats::frames_sent`].
    pub frames_sent: AtomicU64,
    /// See [`Stats::bytes_sent`].
    pub bytes_sent: AtomicU64,
    /// See [`Stats::bytes_received`].
    pub bytes_received: AtomicU64,
    /// See [`Stats::handoffs`].
    pub handoffs: AtomicU64,
    /// See [`Stats::frames_received`].
    pub frames_received: AtomicU64,
    /// See [`Stats::fetches_refused`].
    pub fetches_refused: AtomicU64,
}

impl Counters {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters as they stand.
    pub fn snapshot(&self) -> Stats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        // The gauges and the store's tallies are not counted here:
        // `FileServer::stats` fills them in.
        Stats {
            changes_applied: get(&self.changes_applied),
            duplicates_dropped: get(&self.duplicates_dropped),
            stale_dropped: get(&self.stale_dropped),
            frames_sent: get(&self.frames_sent),
            bytes_sent: get(&self.bytes_sent),
            bytes_received: get(&self.bytes_received),
            handoffs: get(&self.handoffs),
            frames_received: get(&self.frames_received),
            fetches_refused: get(&self.fetches_refused),
            ..Stats::default()
        }
    }
}
