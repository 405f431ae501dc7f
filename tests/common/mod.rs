//! Shared helpers for the integration tests: temp directories, nodes on
//! ephemeral loopback ports, waiting for a condition with a deadline, and a
//! small client built on the public `frame` and `handshake` modules.
//!
//! Each test binary compiles this module separately and uses only part of
//! it, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::fmt::Debug;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gossipfs::frame::client::{ListingEntry, Message};
use gossipfs::frame::{ErrorCode, Frame, Role, read_frame, write_frame};
use gossipfs::handshake::{Identity, handshake};
use gossipfs::{Config, Error, FileServer, NodeId};
use sha1::Digest;

/// How long a test waits for a cluster to reach a state before failing.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// How often `wait_until` polls its condition, at the most: it starts at
/// [`FIRST_POLL_INTERVAL`] and doubles up to this.
pub const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// `wait_until`'s first pause. Many conditions hold within a millisecond
/// (a peer registered, a connection closed); a test that waits on one in a
/// loop should not pay a whole [`POLL_INTERVAL`] each time.
pub const FIRST_POLL_INTERVAL: Duration = Duration::from_micros(250);

/// Sends the library's logs to the test harness (shown for failing tests).
pub fn init_logging() {
    let config = simplelog::ConfigBuilder::new().set_target_level(log::LevelFilter::Error).build();
    let _ = simplelog::TestLogger::init(log::LevelFilter::Debug, config);
}

/// Where the tests' directories go: `$TMPDIR` if it is set, else `/dev/shm`
/// (memory) where there is one, else the system temp dir.
///
/// Tests check logic, not disks (their nodes run with fsync off), yet on a
/// disk file system the kernel still writes back each file a rename
/// replaces (ext4's `auto_da_alloc`): the load test spent ten seconds there
/// for a second and a half of work. In memory the node runs the same code,
/// renames and all. Set `TMPDIR` to run the tests on a disk.
pub fn scratch_base() -> PathBuf {
    if std::env::var_os("TMPDIR").is_none() {
        let shm = Path::new("/dev/shm");
        let writable =
            std::fs::metadata(shm).is_ok_and(|m| m.is_dir() && !m.permissions().readonly());
        if writable {
            return shm.to_path_buf();
        }
    }
    std::env::temp_dir()
}

/// A fresh directory under [`scratch_base`], removed on drop.
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
        let path =
            scratch_base().join(format!("gossipfs-test-{name}-{}-{n}-{nanos}", std::process::id()));
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
    let mut poll_pause = FIRST_POLL_INTERVAL;
    loop {
        let seen = observe();
        if done(&seen) {
            return seen;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}; last saw {seen:?}");
        }
        // The condition is re-checked, never assumed: this only paces the poll.
        std::thread::sleep(poll_pause);
        poll_pause = (poll_pause * 2).min(POLL_INTERVAL);
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
    reader.read_to_end(&mut out).expect("reading memory cannot fail");
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
        // A block of 8 at a time (the first and last may be partial): the
        // same bytes as one at a time, for a fraction of the work.
        let mut done = 0;
        while done < n {
            let block = stream_byte_block(self.seed, self.pos / 8);
            let from = (self.pos % 8) as usize;
            let take = (8 - from).min(n - done);
            buf[done..done + take].copy_from_slice(&block[from..from + take]);
            done += take;
            self.pos += take as u64;
        }
        Ok(n)
    }
}

/// SHA-1 of everything `reader` yields, for comparing large files without
/// holding them.
pub fn sha1_of(mut reader: impl Read) -> std::io::Result<[u8; 20]> {
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

/// How long the test client waits for any single read or write: far longer
/// than any answer takes, so it is reached only on a hang.
const CLIENT_IO_TIMEOUT: Duration = Duration::from_secs(60);

/// What a node says about itself in answer to `Status`, as far as the tests
/// look at it.
#[derive(Debug)]
pub struct NodeStatus {
    /// The node's name.
    pub name: String,
    /// Its peers, as `name (ip:port)`.
    pub peers: Vec<String>,
}

/// A client connection to a node, speaking the protocol through the
/// library's public `frame` and `handshake` modules: one request at a time,
/// and only the requests the tests make.
pub struct TestClient {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

impl TestClient {
    /// Connects to `addr` and runs the client handshake. A node that wants
    /// a secret we lack fails with `Error::Unauthorized`, a full one with
    /// `Error::Busy`: `handshake` turns the node's `Error` frame into those.
    pub fn connect(addr: &str, secret: Option<Vec<u8>>) -> gossipfs::Result<TestClient> {
        let stream = TcpStream::connect(addr)?;
        let me = Identity {
            role: Role::Client,
            node: 0,
            name: "test-client".to_string(),
            listen_addr: String::new(),
            secret,
        };
        handshake(&stream, &me, true)?;
        stream.set_read_timeout(Some(CLIENT_IO_TIMEOUT))?;
        stream.set_write_timeout(Some(CLIENT_IO_TIMEOUT))?;
        Ok(TestClient {
            reader: BufReader::new(stream.try_clone()?),
            writer: BufWriter::new(stream),
        })
    }

    /// Stores everything `content` yields under `key`: a `Put`, then one
    /// `Chunk` frame and its bytes per read, then the empty chunk that ends
    /// the file. Returns the bytes sent.
    pub fn put(&mut self, key: &str, content: &mut impl Read) -> gossipfs::Result<u64> {
        write_frame(&mut self.writer, &Frame::Client(Message::Put { key: key.to_string() }))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        loop {
            let n = content.read(&mut buf)?;
            let size = u32::try_from(n).expect("the buffer is smaller than 4 GiB");
            write_frame(&mut self.writer, &Frame::Client(Message::Chunk { size }))?;
            if n == 0 {
                break;
            }
            self.writer.write_all(&buf[..n])?;
            sent += n as u64;
        }
        self.writer.flush()?;
        self.expect_ok(key)?;
        Ok(sent)
    }

    /// Writes the file under `key` to `out` and checks it against the
    /// SHA-1 its `File` frame announced, so bad bytes fail the call.
    pub fn get(&mut self, key: &str, out: &mut impl Write) -> gossipfs::Result<u64> {
        self.send(&Frame::Get { request: 1, key: key.to_string() })?;
        let (size, sha1) = match self.receive(key)? {
            Frame::File { size, sha1, .. } => (size, sha1),
            Frame::NotFound { .. } => return Err(Error::NotFound(key.to_string())),
            other => return Err(unexpected(&other)),
        };
        let mut hashing = HashingWriter { inner: out, hasher: sha1::Sha1::new() };
        let copied = io::copy(&mut (&mut self.reader).take(size), &mut hashing)?;
        if copied != size {
            return Err(Error::Protocol(format!(
                "the connection closed after {copied} of {size} bytes"
            )));
        }
        if <[u8; 20]>::from(hashing.hasher.finalize()) != sha1 {
            return Err(Error::Protocol(format!("the bytes of {key:?} do not match their SHA-1")));
        }
        Ok(copied)
    }

    /// Deletes `key` everywhere; `Error::NotFound` if the node holds no
    /// live file under it.
    pub fn remove(&mut self, key: &str) -> gossipfs::Result<()> {
        self.send(&Frame::Client(Message::Remove { key: key.to_string() }))?;
        self.expect_ok(key)
    }

    /// The node's live files, gathered from as many `Listing` frames as it
    /// sends.
    pub fn list(&mut self) -> gossipfs::Result<Vec<ListingEntry>> {
        self.send(&Frame::Client(Message::List))?;
        let mut all = Vec::new();
        loop {
            match self.receive("")? {
                Frame::Client(Message::Listing { entries, done }) => {
                    all.extend(entries);
                    if done {
                        return Ok(all);
                    }
                }
                other => return Err(unexpected(&other)),
            }
        }
    }

    /// The node's name and peers.
    pub fn status(&mut self) -> gossipfs::Result<NodeStatus> {
        self.send(&Frame::Client(Message::Status))?;
        match self.receive("")? {
            Frame::Client(Message::StatusReply { name, peers, .. }) => {
                Ok(NodeStatus { name, peers })
            }
            other => Err(unexpected(&other)),
        }
    }

    fn send(&mut self, frame: &Frame) -> gossipfs::Result<()> {
        write_frame(&mut self.writer, frame)?;
        self.writer.flush()?;
        Ok(())
    }

    /// Reads the answer to a request about `key`; an `Error` frame becomes
    /// the matching error, so tests can tell a missing key from a failure.
    fn receive(&mut self, key: &str) -> gossipfs::Result<Frame> {
        match read_frame(&mut self.reader)? {
            Some(Frame::Error { code, message }) => Err(match code {
                ErrorCode::NotFound => Error::NotFound(key.to_string()),
                ErrorCode::BadKey => Error::BadKey(message),
                ErrorCode::Unauthorized => Error::Unauthorized(message),
                ErrorCode::Busy => Error::Busy(message),
                _ => Error::Protocol(format!("the node says: {message}")),
            }),
            Some(frame) => Ok(frame),
            None => {
                Err(Error::Protocol("the node closed the connection without answering".to_string()))
            }
        }
    }

    fn expect_ok(&mut self, key: &str) -> gossipfs::Result<()> {
        match self.receive(key)? {
            Frame::Client(Message::Ok) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(frame: &Frame) -> Error {
    Error::Protocol(format!("unexpected {:?} frame", frame.tag()))
}

/// Passes bytes on to `inner`, hashing them on the way.
struct HashingWriter<'a, W: Write> {
    inner: &'a mut W,
    hasher: sha1::Sha1,
}

impl<W: Write> Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A small fault proxy: forwards every connection made to it to `target`,
/// byte for byte, and can stop forwarding without closing anything (as a
/// host that vanished from the network does: no reset, no FIN, just
/// silence) and resume.
pub struct FaultProxy {
    addr: std::net::SocketAddr,
    state: std::sync::Arc<ProxyState>,
    accept: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct ProxyState {
    /// While true, bytes read are held, not written on.
    paused: std::sync::Mutex<bool>,
    /// Signalled when `paused` goes false.
    resumed: std::sync::Condvar,
    /// Set when the proxy is dropped.
    stopping: std::sync::atomic::AtomicBool,
    /// Every socket opened, to shut down on drop.
    sockets: std::sync::Mutex<Vec<std::net::TcpStream>>,
    /// Bytes the target may still send before the proxy pauses by itself
    /// (a sender vanishing mid-stream); `u64::MAX` for no limit.
    budget: std::sync::atomic::AtomicU64,
    /// Bytes per second the target's side is let through (a slow link); 0
    /// for no limit.
    rate: std::sync::atomic::AtomicU64,
}

impl FaultProxy {
    /// Listens on an ephemeral loopback port and forwards to `target`.
    pub fn start(target: std::net::SocketAddr) -> FaultProxy {
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let state = Arc::new(ProxyState::default());
        state.budget.store(u64::MAX, Ordering::SeqCst);
        let accept_state = Arc::clone(&state);
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if accept_state.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(target) else { continue };
                let handles = [&client, &server].map(|s| s.try_clone().expect("clone a socket"));
                accept_state.sockets.lock().expect("proxy lock").extend(handles);
                for (from, to, metered) in [(&client, &server, false), (&server, &client, true)] {
                    let (from, to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    let pump_state = Arc::clone(&accept_state);
                    std::thread::spawn(move || pump(from, to, metered, &pump_state));
                }
            }
        });
        FaultProxy { addr, state, accept: Some(accept) }
    }

    /// The address to dial instead of the target.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Stops forwarding, closing nothing.
    pub fn partition(&self) {
        *self.state.paused.lock().expect("proxy lock") = true;
    }

    /// Lets the target send `bytes` more (on every connection together),
    /// then stops forwarding as [`FaultProxy::partition`] does.
    pub fn partition_after(&self, bytes: u64) {
        self.state.budget.store(bytes, Ordering::SeqCst);
    }

    /// Lets the target's side through at `bytes_per_second` at most, as a
    /// slow link would.
    pub fn throttle(&self, bytes_per_second: u64) {
        self.state.rate.store(bytes_per_second, Ordering::SeqCst);
    }

    /// Forwards again, starting with what was held.
    pub fn heal(&self) {
        self.state.budget.store(u64::MAX, Ordering::SeqCst);
        *self.state.paused.lock().expect("proxy lock") = false;
        self.state.resumed.notify_all();
    }
}

/// Copies `from` to `to`, holding what it read while the proxy is paused.
/// A `metered` pump (the target's side) spends the proxy's budget first.
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    metered: bool,
    state: &ProxyState,
) {
    use std::io::Write;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // A slow link: small reads, each paid for in time before it goes on.
        let rate = if metered { state.rate.load(Ordering::SeqCst) } else { 0 };
        let want = if rate == 0 { buf.len() } else { buf.len().min(4096) };
        let n = match from.read(&mut buf[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut held = &buf[..n];
        let budget = state.budget.load(Ordering::SeqCst);
        if metered && budget != u64::MAX {
            if budget < n as u64 {
                // Send what the budget allows, then vanish.
                let (now, later) = held.split_at(budget as usize);
                if to.write_all(now).is_err() {
                    break;
                }
                held = later;
                *state.paused.lock().expect("proxy lock") = true;
            }
            let left = budget.saturating_sub(n as u64);
            let _ = state.budget.compare_exchange(budget, left, Ordering::SeqCst, Ordering::SeqCst);
        }
        let mut paused = state.paused.lock().expect("proxy lock");
        while *paused && !state.stopping.load(Ordering::SeqCst) {
            paused = state.resumed.wait(paused).expect("proxy lock");
        }
        drop(paused);
        if let Some(micros) = (held.len() as u64 * 1_000_000).checked_div(rate) {
            // The link's pace: a fault being simulated, not a wait for a
            // condition.
            std::thread::sleep(Duration::from_micros(micros));
        }
        if to.write_all(held).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stopping.store(true, Ordering::SeqCst);
        self.heal();
        for socket in self.state.sockets.lock().expect("proxy lock").iter() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// A peer that completes its handshake with `node` as node `id`, and
/// advertises no address (so nobody redials it). What it does next is up to
/// the test: say nothing and read nothing, like a hung process, or write
/// frames of its own with `gossipfs::frame::write_frame`.
pub fn handshaken_peer(node: &FileServer, id: NodeId) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect(node.local_addr()).expect("connect");
    let me = gossipfs::handshake::Identity {
        role: gossipfs::frame::Role::Peer,
        node: id,
        name: "fake".into(),
        listen_addr: String::new(),
        secret: None,
    };
    gossipfs::handshake::handshake(&stream, &me, true).expect("the handshake");
    stream
}

/// One line a node logged, as a test's own `log` sink caught it.
pub struct LogLine {
    pub level: log::Level,
    /// The node's name (the log target).
    pub node: String,
    /// The name of the thread that logged it: which actor of the diagrams.
    pub thread: String,
    pub message: String,
}

/// Every line caught so far in this test binary.
static LOG_LINES: std::sync::Mutex<Vec<LogLine>> = std::sync::Mutex::new(Vec::new());

/// Only nodes whose names start with this are caught.
static LOG_PREFIX: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.target().starts_with(LOG_PREFIX.get().copied().unwrap_or(""))
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let line = LogLine {
                level: record.level(),
                node: record.target().to_string(),
                thread: std::thread::current().name().unwrap_or("").to_string(),
                message: record.args().to_string(),
            };
            LOG_LINES.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    }
    fn flush(&self) {}
}

/// Installs this binary's log sink, catching every debug line of the nodes
/// whose names start with `prefix` (the first call's prefix holds).
pub fn capture_logs(prefix: &'static str) {
    LOG_PREFIX.get_or_init(|| {
        log::set_logger(&Capture).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Debug);
        prefix
    });
}

/// Runs `look` over the lines caught so far.
pub fn with_logs<T>(look: impl FnOnce(&[LogLine]) -> T) -> T {
    look(&LOG_LINES.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Reads what a node sends a fake peer on `stream` until a go-ahead comes
/// (summaries, peer lists and pings are skipped), for at most [`DEADLINE`].
/// Returns its request, key and version.
pub fn next_go_ahead(stream: &std::net::TcpStream) -> (u64, String, gossipfs::Version) {
    stream.set_read_timeout(Some(DEADLINE)).expect("set a read timeout");
    let mut frames = BufReader::new(stream.try_clone().expect("clone the fake's socket"));
    loop {
        match read_frame(&mut frames) {
            Ok(Some(Frame::GoAhead { request, key, version })) => return (request, key, version),
            Ok(Some(_)) => continue,
            other => panic!("no go-ahead came: {other:?}"),
        }
    }
}

/// A fake peer's connection. A thread reads what the node sends, so a test
/// can wait for a frame or see that the node has closed the connection.
pub struct FakeConn {
    pub socket: TcpStream,
    frames: std::sync::mpsc::Receiver<Frame>,
}

impl FakeConn {
    pub fn new(socket: TcpStream) -> FakeConn {
        let (tx, frames) = std::sync::mpsc::channel();
        let mut reader = BufReader::new(socket.try_clone().unwrap());
        // Ends, dropping `tx`, when the node closes the connection.
        std::thread::spawn(move || {
            while let Ok(Some(frame)) = read_frame(&mut reader) {
                if tx.send(frame).is_err() {
                    return;
                }
            }
        });
        FakeConn { socket, frames }
    }

    pub fn send(&mut self, frame: &Frame) {
        write_frame(&mut self.socket, frame).unwrap();
    }

    /// Waits for a frame that `wanted` accepts, skipping the rest, and
    /// returns it.
    pub fn until(&mut self, wanted: impl Fn(&Frame) -> bool) -> Frame {
        loop {
            match self.frames.recv_timeout(DEADLINE) {
                Ok(frame) if wanted(&frame) => return frame,
                Ok(_) => {}
                Err(err) => panic!("the node stopped serving this connection: {err}"),
            }
        }
    }

    /// Whether the node has closed the connection (frames before the close
    /// are skipped).
    pub fn closed(&mut self) -> bool {
        loop {
            match self.frames.try_recv() {
                Ok(_) => {}
                Err(std::sync::mpsc::TryRecvError::Empty) => return false,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return true,
            }
        }
    }
}

/// A peer that completes its handshake with `node` as node `id`, saying
/// `nonce` in its Hello: among connections from one node, the one with the
/// smallest nonce is the one kept.
pub fn peer_with_nonce(node: &FileServer, id: NodeId, nonce: [u8; 16]) -> FakeConn {
    let mut stream = TcpStream::connect(node.local_addr()).expect("connect");
    let hello = Frame::Hello {
        magic: gossipfs::frame::MAGIC,
        protocol: gossipfs::frame::PROTOCOL_VERSION,
        role: Role::Peer,
        node: id,
        name: "fake".into(),
        listen_addr: String::new(),
        nonce,
        auth: false,
    };
    write_frame(&mut stream, &hello).expect("send a Hello");
    let mut conn = FakeConn::new(stream);
    conn.until(|frame| matches!(frame, Frame::Hello { .. }));
    conn
}
