//! Shared helpers for the integration tests: temp directories, nodes on
//! ephemeral loopback ports, and waiting for a condition with a deadline.
//!
//! Each test binary compiles this module separately and uses only part of
//! it, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::fmt::Debug;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gossipfs::version::NodeId;
use gossipfs::{Config, FileServer};

/// How long a test waits for a cluster to reach a state before failing.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// How often `wait_until` polls its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Sends the library's logs to the test harness (shown for failing tests).
pub fn init_logging() {
    let config = simplelog::ConfigBuilder::new()
        .set_target_level(log::LevelFilter::Error)
        .build();
    let _ = simplelog::TestLogger::init(log::LevelFilter::Debug, config);
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "gossipfs-test-{name}-{}-{n}-{nanos}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A test config: fsync off (tests check logic, not disks), a short get
/// timeout, anti-entropy every 200 ms.
pub fn config(name: &str, root: &Path) -> Config {
    let mut config = Config::new(name, root.join(name));
    config.fsync = false;
    config.anti_entropy_interval = Duration::from_millis(200);
    config.get_timeout = Duration::from_secs(10);
    config
}

/// Starts a node on an ephemeral loopback port.
pub fn start(config: Config) -> FileServer {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    FileServer::start_on(listener, config).expect("start a node")
}

/// Starts `n` nodes named n1..nN, each bootstrapping from the one before
/// (a chain), with `tweak` applied to every config first.
pub fn chain(dir: &TempDir, n: usize, tweak: impl Fn(&mut Config)) -> Vec<FileServer> {
    let mut nodes: Vec<FileServer> = Vec::new();
    for i in 0..n {
        let mut config = config(&format!("n{}", i + 1), dir.path());
        if let Some(prev) = nodes.last() {
            config.bootstrap = vec![prev.local_addr().to_string()];
        }
        tweak(&mut config);
        nodes.push(start(config));
    }
    nodes
}

/// Polls `observe` until `done` holds for what it returns, or panics after
/// [`DEADLINE`] showing the last thing observed.
pub fn wait_until<T: Debug>(
    what: &str,
    mut observe: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let seen = observe();
        if done(&seen) {
            return seen;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}; last saw {seen:?}");
        }
        // The condition is re-checked, never assumed: this only paces the poll.
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Waits until every node has exactly `peers[i]` peers.
pub fn wait_for_peers(nodes: &[FileServer], peers: &[usize]) {
    wait_until(
        "the expected peer counts",
        || nodes.iter().map(|n| n.peers().len()).collect::<Vec<_>>(),
        |counts| counts == peers,
    );
}

/// The keys a node holds, sorted.
pub fn keys(node: &FileServer) -> Vec<String> {
    node.list().into_iter().map(|f| f.key).collect()
}

/// Reads a node's copy of `key` (local or fetched).
pub fn read(node: &FileServer, key: &str) -> gossipfs::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    node.get(key)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Byte `pos` of the deterministic pseudo-random stream `seed`: the same
/// bytes whatever sizes they are read in, so a failing test can be rerun
/// with the same data.
fn stream_byte_block(seed: u64, block: u64) -> [u8; 8] {
    // splitmix64 of (seed, block index)
    let mut z = seed.wrapping_add(block.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).to_le_bytes()
}

/// `len` deterministic pseudo-random bytes.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut reader = PseudoRandomReader::new(len as u64, seed);
    let mut out = Vec::with_capacity(len);
    reader
        .read_to_end(&mut out)
        .expect("reading memory cannot fail");
    out
}

/// A reader that yields `len` deterministic pseudo-random bytes without
/// holding them, for large files.
pub struct PseudoRandomReader {
    seed: u64,
    pos: u64,
    len: u64,
}

impl PseudoRandomReader {
    pub fn new(len: u64, seed: u64) -> PseudoRandomReader {
        PseudoRandomReader { seed, pos: 0, len }
    }
}

impl Read for PseudoRandomReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.len - self.pos) as usize;
        for byte in &mut buf[..n] {
            *byte = stream_byte_block(self.seed, self.pos / 8)[(self.pos % 8) as usize];
            self.pos += 1;
        }
        Ok(n)
    }
}

/// SHA-1 of everything `reader` yields, for comparing large files without
/// holding them.
pub fn sha1_of(mut reader: impl Read) -> std::io::Result<[u8; 20]> {
    use sha1::Digest;
    let mut hasher = sha1::Sha1::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finalize().into());
        }
        hasher.update(&buf[..n]);
    }
}

/// The node ids of a node's peers.
pub fn peer_ids(node: &FileServer) -> Vec<NodeId> {
    node.peers().into_iter().map(|p| p.id).collect()
}

/// Stores 20,000 pseudo-random bytes under `key` on `from` and checks they
/// arrive byte for byte on `to`: the proof that a node keeps serving.
pub fn assert_replicates(from: &FileServer, to: &FileServer, key: &str, seed: u64) {
    let bytes = pseudo_random_bytes(20_000, seed);
    from.store(key, &bytes[..]).expect("store");
    wait_until(
        &format!("{key} stored on {} to reach {}", from.name(), to.name()),
        || keys(to),
        |k| k.iter().any(|x| x == key),
    );
    assert_eq!(read(to, key).expect("read the replica"), bytes);
}

/// A fresh node id for a fake peer (real nodes pick random ones).
pub fn fake_id() -> NodeId {
    static NEXT_FAKE: AtomicU64 = AtomicU64::new(1);
    0xfa4e_0000_0000_0000 | NEXT_FAKE.fetch_add(1, Ordering::Relaxed)
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("a bound address").port()
}

/// A child process that is killed (SIGKILL) and reaped when dropped,
/// whatever happens in the test. A failing test prints the process's log.
pub struct Proc {
    pub child: Child,
    /// The command line, for messages.
    pub what: String,
    /// Where the process's stderr goes, for a node; `None` for a command
    /// whose stderr the test reads itself.
    pub log: Option<PathBuf>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Kill fails only if the process has exited already; wait reaps it
        // either way, so no zombie outlives the test.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking()
            && let Some(log) = &self.log
        {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            eprintln!("--- log of `{}` ---\n{text}--- end of log ---", self.what);
        }
    }
}
