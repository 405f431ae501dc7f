//! Reliability and security: what a gossipfs node does when it is lied to,
//! flooded, cut off, killed or corrupted, and under load.
//!
//! Six groups, each backing promises in `docs/RELIABILITY.md`:
//!
//! 1. **Security** — the cluster secret lets its holders in and nobody else.
//! 2. **Limits** — silent handshakes, oversized length prefixes, stalled
//!    streams and connection floods are cut off.
//! 3. **Fuzz** — seeded random and mutated frames, into the decoder and into
//!    a live node's port, before and after the handshake.
//! 4. **Hostile keys** — through the API and the command line.
//! 5. **Faults** — a sender dying mid-stream, `kill -9` of a `serve` process
//!    receiving 256 MiB, a node restarted ten times under traffic, a file
//!    corrupted on disk.
//! 6. **Load** — 32 concurrent clients on a three-node cluster.
//!
//! Nodes listen on `127.0.0.1:0` (or a free port, for processes), keep their
//! files in temp directories, and every wait polls a condition until a
//! deadline: nothing sleeps to let things settle, and no test asserts how
//! long anything took. Every child process sits in a [`Proc`] guard that
//! kills and reaps it on drop. Random inputs come from [`Rng`], a seeded
//! splitmix64, so a failing case is reproduced by running the test again.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{
    DEADLINE, Proc, TempDir, TestClient, assert_replicates, chain, config, fake_id, free_port,
    init_logging, keys, peer_ids, pseudo_random_bytes, read, sha1_of, start, wait_for_peers,
    wait_until,
};
use gossipfs::frame::client::{ListingEntry, Message};
use gossipfs::frame::{
    self, DigestEntry, ErrorCode, Frame, MAGIC, MAX_FRAME_LEN, MAX_KEY_LEN, PROTOCOL_VERSION, Role,
    read_frame, write_frame,
};
use gossipfs::handshake::{HANDSHAKE_TIMEOUT, MAX_HANDSHAKE_FRAME_LEN};
use gossipfs::{Config, Error, FileInfo, FileServer, NodeId, Version};
use sha1::Digest;

/// The binary under test, built by cargo for this test target.
const BIN: &str = env!("CARGO_BIN_EXE_gossipfs");

/// The most connections a node keeps open at once: `MAX_CONNECTIONS` in
/// `src/server/mod.rs`, private to the library. If that changes, change this.
const MAX_CONNECTIONS: usize = 256;

/// How long a command-line client may run before the test gives up on it
/// (a 256 MiB `get` in a debug build included). Reached only on a hang.
const COMMAND_DEADLINE: Duration = Duration::from_secs(300);

/// How many fresh ports a `serve` process is tried on when the free port
/// it was given was taken before it could bind it.
const PORT_ATTEMPTS: usize = 5;

// ---------------------------------------------------------------------------
// A seeded generator
// ---------------------------------------------------------------------------

/// splitmix64: a small, fast, std-only generator. The same seed yields the
/// same sequence on every machine, so every fuzz case can be replayed.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`; `n` must not be 0.
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A number in `lo..=hi`.
    fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below((hi - lo) as u64 + 1) as usize
    }

    /// True `percent` times in a hundred.
    fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.fill(&mut bytes);
        bytes
    }
}

/// SHA-1 of a byte slice.
fn sha1(bytes: &[u8]) -> [u8; 20] {
    sha1::Sha1::digest(bytes).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A reader of `len` pseudo-random bytes that costs almost nothing to
/// produce, for the 256 MiB file: a random 1 MiB block, repeated, with
/// each block stamped with its index so no two blocks are alike. It hashes
/// what it yields, so the test learns the SHA-1 without a second pass.
struct BigReader {
    block: Vec<u8>,
    pos: u64,
    len: u64,
    hasher: sha1::Sha1,
}

impl BigReader {
    const BLOCK: u64 = 1 << 20;

    fn new(len: u64, seed: u64) -> BigReader {
        BigReader {
            block: Rng::new(seed).bytes(Self::BLOCK as usize),
            pos: 0,
            len,
            hasher: sha1::Sha1::new(),
        }
    }

    /// SHA-1 of everything read so far.
    fn sha1(&self) -> [u8; 20] {
        self.hasher.clone().finalize().into()
    }
}

impl Read for BigReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let in_block = self.pos % Self::BLOCK;
        let n = (buf.len() as u64).min(self.len - self.pos).min(Self::BLOCK - in_block) as usize;
        buf[..n].copy_from_slice(&self.block[in_block as usize..in_block as usize + n]);
        // Stamp the block index over the first 8 bytes of each block.
        let stamp = (self.pos / Self::BLOCK).to_be_bytes();
        for (i, byte) in buf[..n].iter_mut().enumerate() {
            let at = in_block as usize + i;
            if at >= 8 {
                break;
            }
            *byte = stamp[at];
        }
        self.hasher.update(&buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

// ---------------------------------------------------------------------------
// Disk and peer-map helpers
// ---------------------------------------------------------------------------

/// The root directory `common::config` gives the node called `name`.
fn root_of(dir: &TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// The files in a node's `ROOT/tmp`, with their sizes.
fn temp_files(root: &Path) -> Vec<(String, u64)> {
    let Ok(entries) = fs::read_dir(root.join("tmp")) else {
        return Vec::new();
    };
    let mut files: Vec<(String, u64)> = entries
        .filter_map(|entry| entry.ok())
        .map(|entry| {
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            (entry.file_name().to_string_lossy().into_owned(), len)
        })
        .collect();
    files.sort();
    files
}

/// Where the store keeps `key`: `ROOT/objects/<sha1-hex-of-key>`.
fn object_path(root: &Path, key: &str) -> PathBuf {
    root.join("objects").join(hex(&sha1(key.as_bytes())))
}

/// Every file and directory under `dir`, recursively: a file maps to the
/// SHA-1 of its content, a directory to `None`.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Option<[u8; 20]>> {
    let mut found = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(|entry| entry.ok()) {
            let path = entry.path();
            if path.is_dir() {
                found.insert(path.clone(), None);
                todo.push(path);
            } else {
                let hash = fs::read(&path).map(|bytes| sha1(&bytes)).ok();
                found.insert(path, hash);
            }
        }
    }
    found
}

/// Waits until every node lists the same files at the same versions, and
/// returns that list.
fn wait_for_agreement(nodes: &[&FileServer], what: &str) -> Vec<FileInfo> {
    let lists = wait_until(
        what,
        || nodes.iter().map(|n| n.list()).collect::<Vec<_>>(),
        |lists| lists.windows(2).all(|w| w[0] == w[1]),
    );
    lists.into_iter().next().unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Raw connections: playing a peer or a client by hand
// ---------------------------------------------------------------------------

/// A `Hello` as a hand-made peer or client sends it. An empty listen
/// address, so no node ever tries to dial the fake.
fn hello(role: Role, node: NodeId, auth: bool) -> Frame {
    Frame::Hello {
        magic: MAGIC,
        protocol: PROTOCOL_VERSION,
        role,
        node,
        name: format!("fake-{node:x}"),
        listen_addr: String::new(),
        nonce: [7; 16],
        auth,
    }
}

/// The bytes of one frame.
fn encode(frame: &Frame) -> Vec<u8> {
    let mut bytes = Vec::new();
    write_frame(&mut bytes, frame).expect("encode a valid frame into memory");
    bytes
}

/// A raw connection to `addr`, with a read timeout so no read can hang.
fn raw_connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to the node");
    stream.set_read_timeout(Some(DEADLINE)).expect("set a read timeout");
    stream
}

/// Reads from `stream` until the node closes it (end of stream, or a reset
/// because our bytes were left unread), and returns what it sent. Panics if
/// it is still open after `patience`.
fn read_until_closed(stream: &mut TcpStream, patience: Duration, what: &str) -> Vec<u8> {
    let deadline = Instant::now() + patience;
    stream.set_read_timeout(Some(patience)).expect("set a read timeout");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // A peer connection gets anti-entropy summaries while it is open,
        // so the read timeout alone would never fire: check the deadline.
        assert!(
            Instant::now() < deadline,
            "{what}: the node kept the connection open; it sent {} bytes",
            got.len()
        );
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err)
                if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
            {
                panic!(
                    "{what}: the node neither closed nor spoke in {patience:?}; it sent {} bytes",
                    got.len()
                )
            }
            Err(_) => return got,
        }
    }
}

/// The frames in `bytes`, in order, skipping the content that follows a
/// frame that announces some, up to the first that does not decode.
fn frames_in(mut bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Ok(Some(frame)) = read_frame(&mut bytes) {
        let skip = usize::try_from(frame.stream_len()).unwrap_or(usize::MAX).min(bytes.len());
        bytes = &bytes[skip..];
        frames.push(frame);
    }
    frames
}

/// A `TcpStream` playing a gossipfs peer.
struct FakePeer {
    stream: TcpStream,
    id: NodeId,
}

impl FakePeer {
    /// Connects to `node` as peer `id`, does the handshake by hand, and
    /// waits until the node has put the fake in its peer map. (Sending
    /// anything before that would race the node's handshake.)
    fn join(node: &FileServer, id: NodeId) -> FakePeer {
        let mut stream = raw_connect(node.local_addr());
        write_frame(&mut stream, &hello(Role::Peer, id, false)).expect("send Hello");
        let theirs = read_frame(&mut stream).expect("read the node's Hello");
        assert!(
            matches!(theirs, Some(Frame::Hello { role: Role::Peer, node: n, .. }) if n == node.node_id()),
            "expected the node's Hello, got {theirs:?}"
        );
        wait_until(
            "the node to register the fake peer",
            || peer_ids(node),
            |ids| ids.contains(&id),
        );
        FakePeer { stream, id }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send bytes to the node");
    }

    fn send_frame(&mut self, frame: &Frame) {
        write_frame(&mut self.stream, frame).expect("send a frame to the node");
    }
}

/// Waits until `node` has dropped peer `id` from its map.
fn wait_for_peer_to_leave(node: &FileServer, id: NodeId) {
    wait_until(
        &format!("{} to drop peer {id:x}", node.name()),
        || peer_ids(node),
        |ids| !ids.contains(&id),
    );
}

/// A TCP relay between a node and whoever dials `addr`, which counts the
/// connections it carried and records every byte, so a test can see what
/// went over the wire (and how often a refused node tried again).
struct Proxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    accept: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct ProxyState {
    stop: AtomicBool,
    /// Connections accepted.
    accepted: AtomicUsize,
    /// Directions (two per connection) that have finished.
    pumps_done: AtomicUsize,
    /// Every byte carried, one buffer per connection and direction.
    captured: Mutex<Vec<Arc<Mutex<Vec<u8>>>>>,
    sockets: Mutex<Vec<TcpStream>>,
    pumps: Mutex<Vec<JoinHandle<()>>>,
}

impl Proxy {
    fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let state = Arc::new(ProxyState::default());
        let accept_state = Arc::clone(&state);
        let accept = thread::spawn(move || {
            for inbound in listener.incoming() {
                if accept_state.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(inbound) = inbound else { continue };
                let Ok(outbound) = TcpStream::connect(target) else {
                    continue;
                };
                accept_state.accepted.fetch_add(1, Ordering::SeqCst);
                for (from, to) in [(&inbound, &outbound), (&outbound, &inbound)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    let capture = Arc::new(Mutex::new(Vec::new()));
                    accept_state.captured.lock().expect("proxy lock").push(Arc::clone(&capture));
                    let state = Arc::clone(&accept_state);
                    let pump = thread::spawn(move || pump(from, to, &capture, &state));
                    accept_state.pumps.lock().expect("proxy lock").push(pump);
                }
                let mut sockets = accept_state.sockets.lock().expect("proxy lock");
                sockets.push(inbound);
                sockets.push(outbound);
            }
        });
        Proxy { addr, state, accept: Some(accept) }
    }

    /// Connections that have been carried and have ended, both ways.
    fn ended(&self) -> usize {
        self.state.pumps_done.load(Ordering::SeqCst) / 2
    }

    /// Whether `needle` appears in any direction of any connection.
    fn saw(&self, needle: &[u8]) -> bool {
        let captured = self.state.captured.lock().expect("proxy lock");
        captured.iter().any(|capture| {
            let bytes = capture.lock().expect("proxy lock");
            bytes.windows(needle.len()).any(|w| w == needle)
        })
    }

    /// Bytes carried so far, all connections and directions.
    fn bytes_carried(&self) -> usize {
        let captured = self.state.captured.lock().expect("proxy lock");
        captured.iter().map(|c| c.lock().expect("proxy lock").len()).sum()
    }
}

/// Copies one direction of a proxied connection until it ends.
fn pump(mut from: TcpStream, mut to: TcpStream, capture: &Mutex<Vec<u8>>, state: &ProxyState) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                capture.lock().expect("proxy lock").extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
    state.pumps_done.fetch_add(1, Ordering::SeqCst);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop with a connection of our own.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for socket in self.state.sockets.lock().expect("proxy lock").iter() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        let pumps = std::mem::take(&mut *self.state.pumps.lock().expect("proxy lock"));
        for pump in pumps {
            let _ = pump.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A running `gossipfs serve`.
struct ServeProc {
    /// `127.0.0.1:PORT`, where clients reach it.
    addr: String,
    /// Its log (stderr).
    log: PathBuf,
    proc: Proc,
}

impl ServeProc {
    /// Starts `gossipfs serve --name NAME --root ROOT --no-fsync` plus
    /// `extra`, listening on `IP:PORT` for a free port, with its log in
    /// `dir`, and waits until it answers `status` as `name`.
    fn start(dir: &Path, name: &str, root: &Path, ip: &str, extra: &[&str]) -> ServeProc {
        ServeProc::start_with_secret(dir, name, root, ip, extra, None)
    }

    fn start_with_secret(
        dir: &Path,
        name: &str,
        root: &Path,
        ip: &str,
        extra: &[&str],
        secret: Option<&[u8]>,
    ) -> ServeProc {
        static STARTS: AtomicU64 = AtomicU64::new(0);
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let addr = format!("127.0.0.1:{port}");
            let listen = format!("{ip}:{port}");
            let n = STARTS.fetch_add(1, Ordering::Relaxed);
            let log = dir.join(format!("{name}-{n}.log"));
            let log_file = File::create(&log).expect("create a log file");
            let root = root.to_str().expect("temp paths are UTF-8");
            let mut args =
                vec!["serve", "--listen", &listen, "--root", root, "--name", name, "--no-fsync"];
            args.extend_from_slice(extra);
            let what = format!("gossipfs {}", args.join(" "));
            let child = Command::new(BIN)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|err| panic!("cannot start `{what}`: {err}"));
            let mut proc = Proc { child, what, log: Some(log.clone()) };
            let secret = secret.map(<[u8]>::to_vec);
            let seen = wait_until(
                &format!("{name} to answer status at {addr}"),
                || match proc.child.try_wait() {
                    Ok(None) => TestClient::connect(&addr, secret.clone())
                        .and_then(|mut c| c.status())
                        .map(|s| s.name)
                        .map_err(|err| err.to_string()),
                    _ => Err("exited".to_string()),
                },
                |seen| {
                    matches!(seen, Ok(n) if n == name) || matches!(seen, Err(e) if e == "exited")
                },
            );
            if seen.is_ok() {
                return ServeProc { addr, log, proc };
            }
            let text = fs::read_to_string(&log).unwrap_or_default();
            eprintln!("{name} exited at start; retrying on another port:\n{text}");
        }
        panic!("{name} could not start in {PORT_ATTEMPTS} attempts");
    }

    fn client(&self) -> TestClient {
        TestClient::connect(&self.addr, None).expect("connect a client")
    }

    /// `kill -9`, and wait for the process to be gone.
    fn kill_9(mut self) {
        self.proc.child.kill().expect("SIGKILL the node");
        self.proc.child.wait().expect("reap the node");
    }
}

/// What a finished command-line client did.
#[derive(Debug)]
struct CliOut {
    what: String,
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

impl CliOut {
    fn success(self) -> CliOut {
        assert_eq!(self.code, Some(0), "`{}` failed: {}", self.what, self.stderr);
        self
    }

    /// Asserts exit 1 with one `error: ` line mentioning `words`.
    fn failure(&self, words: &str) {
        assert_eq!(self.code, Some(1), "`{}` should exit 1; stderr: {}", self.what, self.stderr);
        let first = self.stderr.lines().find(|l| l.starts_with("error: "));
        assert!(
            first.is_some_and(|line| line.contains(words)),
            "`{}` should say `error: ...{words}...`, said: {}",
            self.what,
            self.stderr
        );
    }
}

/// Runs `gossipfs ARGS` with `stdin` as its input; `consume` reads its
/// stdout on a thread. Returns the exit code, what `consume` returned, and
/// stderr.
fn run_cli_with<T: Send + 'static>(
    args: &[&str],
    stdin: Vec<u8>,
    consume: impl FnOnce(ChildStdout) -> T + Send + 'static,
) -> (String, Option<i32>, T, String) {
    let what = format!("gossipfs {}", args.join(" ").escape_debug());
    let child = Command::new(BIN)
        .args(args)
        .env_remove("GOSSIPFS_NODE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start `{what}`: {err}"));
    let mut proc = Proc { child, what: what.clone(), log: None };
    let mut input = proc.child.stdin.take().expect("stdin is piped");
    let feeder = thread::spawn(move || {
        // A write error means the command stopped reading: its exit says why.
        let _ = input.write_all(&stdin);
    });
    let stdout = proc.child.stdout.take().expect("stdout is piped");
    let stdout = thread::spawn(move || consume(stdout));
    let mut stderr_pipe = proc.child.stderr.take().expect("stderr is piped");
    let stderr = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + COMMAND_DEADLINE;
    let status = loop {
        match proc.child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(2)),
            Ok(None) => panic!("`{what}` still running after {COMMAND_DEADLINE:?}"),
            Err(err) => panic!("cannot wait for `{what}`: {err}"),
        }
    };
    feeder.join().expect("the stdin feeder does not panic");
    let out = stdout.join().expect("the stdout reader does not panic");
    let err = stderr.join().expect("the stderr reader does not panic");
    (what, status.code(), out, err)
}

/// Runs `gossipfs ARGS` with `stdin` and collects everything.
fn run_cli(args: &[&str], stdin: &[u8]) -> CliOut {
    let (what, code, stdout, stderr) = run_cli_with(args, stdin.to_vec(), |mut out| {
        let mut bytes = Vec::new();
        let _ = out.read_to_end(&mut bytes);
        bytes
    });
    CliOut { what, code, stdout, stderr }
}

// ---------------------------------------------------------------------------
// 1. Security
// ---------------------------------------------------------------------------

const SECRET: &[u8] = b"correct horse battery staple";
const WRONG_SECRET: &[u8] = b"incorrect donkey battery staple";

/// A node config with the cluster secret `secret`.
fn secret_config(dir: &TempDir, name: &str, secret: Option<&[u8]>) -> Config {
    let mut config = config(name, dir.path());
    config.secret = secret.map(<[u8]>::to_vec);
    config
}

#[test]
fn nodes_with_the_secret_connect_and_nodes_without_it_are_refused() {
    init_logging();
    let dir = TempDir::new("rel-secret-peers");
    let s1 = start(secret_config(&dir, "s1", Some(SECRET)));
    // Every other node reaches s1 through a proxy that counts its
    // attempts and records the bytes on the wire.
    let good = Proxy::start(s1.local_addr());
    let wrong = Proxy::start(s1.local_addr());
    let none = Proxy::start(s1.local_addr());
    let with = |name: &str, secret: Option<&[u8]>, proxy: &Proxy| {
        let mut config = secret_config(&dir, name, secret);
        config.bootstrap = vec![proxy.addr.to_string()];
        start(config)
    };
    let s2 = with("s2", Some(SECRET), &good);
    let s3 = with("s3", Some(WRONG_SECRET), &wrong);
    let s4 = with("s4", None, &none);

    wait_until(
        "s1 and s2 to connect",
        || (peer_ids(&s1), peer_ids(&s2)),
        |(p1, p2)| p1 == &[s2.node_id()] && p2 == &[s1.node_id()],
    );
    // The refused nodes keep redialling; wait for three refusals each,
    // and at every look, check that none of them got in.
    let attempts = wait_until(
        "three refused connections each from s3 and s4",
        || {
            assert_eq!(peer_ids(&s1), [s2.node_id()], "s1 let a stranger in");
            assert!(s3.peers().is_empty(), "s3 (wrong secret) got in");
            assert!(s4.peers().is_empty(), "s4 (no secret) got in");
            (wrong.ended(), none.ended())
        },
        |(w, n)| *w >= 3 && *n >= 3,
    );
    println!(
        "figures: refused attempts seen: wrong secret {}, no secret {}",
        attempts.0, attempts.1
    );

    // The refusing node keeps serving its real peer, both ways.
    assert_replicates(&s2, &s1, "from-s2", 1);
    let payload = b"plain file bytes: the secret authenticates, it does not encrypt";
    s1.store("from-s1", &payload[..]).expect("store on s1");
    wait_until("from-s1 on s2", || keys(&s2), |k| k.contains(&"from-s1".to_string()));
    assert_eq!(read(&s2, "from-s1").expect("read"), payload);
    assert!(keys(&s3).is_empty() && keys(&s4).is_empty());

    // On the wire: the secret itself never, the file bytes in the clear.
    assert!(good.bytes_carried() > 0);
    for proxy in [&good, &wrong, &none] {
        assert!(!proxy.saw(SECRET), "the secret crossed the wire in the clear");
        assert!(!proxy.saw(WRONG_SECRET), "a secret crossed the wire in the clear");
    }
    assert!(good.saw(payload), "file content is expected in the clear (no encryption)");
}

#[test]
fn clients_need_the_secret_and_a_raw_hello_without_auth_gets_an_unauthorized_error() {
    init_logging();
    let dir = TempDir::new("rel-secret-clients");
    let node = start(secret_config(&dir, "s1", Some(SECRET)));
    let addr = node.local_addr().to_string();

    for (what, secret) in [("no secret", None), ("the wrong secret", Some(WRONG_SECRET))] {
        let result = TestClient::connect(&addr, secret.map(<[u8]>::to_vec));
        assert!(
            matches!(result, Err(Error::Unauthorized(_))),
            "a client with {what} should be unauthorized, got {:?}",
            result.map(|_| "a connection")
        );
    }
    let mut client = TestClient::connect(&addr, Some(SECRET.to_vec())).expect("the right secret");
    client.put("k", &mut &b"v"[..]).expect("put with the secret");
    let mut got = Vec::new();
    client.get("k", &mut got).expect("get");
    assert_eq!(got, b"v");

    // A hand-made client or peer that does not offer auth is told why.
    for role in [Role::Client, Role::Peer] {
        let mut stream = raw_connect(node.local_addr());
        write_frame(&mut stream, &hello(role, fake_id(), false)).expect("send Hello");
        let frames = frames_in(&read_until_closed(&mut stream, DEADLINE, "a Hello without auth"));
        assert!(
            matches!(
                frames.as_slice(),
                [
                    Frame::Hello { auth: true, .. },
                    Frame::Error { code: ErrorCode::Unauthorized, .. }
                ]
            ),
            "{role:?} without auth: expected Hello then Error(Unauthorized), got {frames:?}"
        );
    }
    // One that offers auth but cannot prove it: a made-up proof.
    let mut stream = raw_connect(node.local_addr());
    write_frame(&mut stream, &hello(Role::Peer, fake_id(), true)).expect("send Hello");
    write_frame(&mut stream, &Frame::Auth { proof: [0x5a; 20] }).expect("send Auth");
    let frames = frames_in(&read_until_closed(&mut stream, DEADLINE, "a made-up proof"));
    assert!(
        matches!(
            frames.as_slice(),
            [
                Frame::Hello { .. },
                Frame::Auth { .. },
                Frame::Error { code: ErrorCode::Unauthorized, .. }
            ]
        ),
        "a made-up proof: expected Hello, Auth, Error(Unauthorized), got {frames:?}"
    );
    assert!(node.peers().is_empty(), "a fake got into the peer map");
    assert_eq!(keys(&node), ["k"]);
}

#[test]
fn the_command_line_takes_a_secret_file_and_never_logs_the_secret() {
    let dir = TempDir::new("rel-secret-cli");
    let secret_file = dir.path().join("secret");
    let wrong_file = dir.path().join("wrong");
    let loose_file = dir.path().join("loose");
    let secret_text = "s3cr3t-that-must-not-leak-5f1d";
    for (path, text, mode) in [
        (&secret_file, secret_text, 0o600),
        (&wrong_file, "another-secret", 0o600),
        (&loose_file, secret_text, 0o644),
    ] {
        fs::write(path, format!("{text}\n")).expect("write a secret file");
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let secret_arg = secret_file.to_str().expect("UTF-8 path");
    let node = ServeProc::start_with_secret(
        dir.path(),
        "cli-secret",
        &dir.path().join("root"),
        "127.0.0.1",
        &["--secret-file", secret_arg, "--verbose"],
        Some(secret_text.as_bytes()),
    );
    // `gossipfs COMMAND --node ADDR [--secret-file FILE] EXTRA...`
    let args = |command: &str, extra: &[&str], file: Option<&Path>| {
        let mut all = vec![command.to_string(), "--node".into(), node.addr.clone()];
        if let Some(file) = file {
            all.push("--secret-file".into());
            all.push(file.to_str().expect("UTF-8 path").into());
        }
        all.extend(extra.iter().map(|s| s.to_string()));
        all
    };
    let run = |all: Vec<String>, stdin: &[u8]| {
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        run_cli(&refs, stdin)
    };

    run(args("put", &["k"], Some(&secret_file)), b"guarded").success();
    let got = run(args("get", &["k"], Some(&secret_file)), b"").success();
    assert_eq!(got.stdout, b"guarded");
    assert!(!got.stderr.contains("warning"), "a 0600 file gets no warning");
    run(args("ls", &[], None), b"").failure("unauthorized");
    run(args("ls", &[], Some(&wrong_file)), b"").failure("unauthorized");
    let loose = run(args("ls", &[], Some(&loose_file)), b"").success();
    assert!(
        loose.stderr.contains("warning") && loose.stderr.contains("other users"),
        "a secret file others can read should get a warning, got: {}",
        loose.stderr
    );

    // The node logged the refusals with the address (after refusing, so
    // the line may come just after the client's exit), and never the
    // secret.
    let refused =
        |log: &String| log.lines().any(|l| l.contains("unauthorized") && l.contains("127.0.0.1:"));
    let log = wait_until(
        "the node to log a refused client with its address",
        || fs::read_to_string(&node.log).expect("read the log"),
        refused,
    );
    assert!(!log.contains(secret_text), "the secret is in the log:\n{log}");

    // Without a secret, on a non-loopback address: a warning at start.
    let open = ServeProc::start(dir.path(), "cli-open", &dir.path().join("open"), "0.0.0.0", &[]);
    // The node may still be writing its start-up lines: wait for the one
    // that says it serves, which comes after the warning.
    let log = wait_until(
        "cli-open to log that it serves",
        || fs::read_to_string(&open.log).expect("read the log"),
        |log| log.contains("Serving on"),
    );
    assert!(
        log.contains("without a cluster secret"),
        "listening on 0.0.0.0 without a secret should warn:\n{log}"
    );
}

// ---------------------------------------------------------------------------
// 2. Limits
// ---------------------------------------------------------------------------

#[test]
fn a_silent_or_stalled_handshake_is_closed_by_the_node() {
    init_logging();
    let dir = TempDir::new("rel-silent");
    let nodes = chain(&dir, 2, |_| {});
    wait_for_peers(&nodes, &[1, 1]);

    let mut silent = raw_connect(nodes[0].local_addr());
    // Three bytes of a length prefix, then nothing.
    let mut stalled = raw_connect(nodes[0].local_addr());
    stalled.write_all(&[0, 0, 0]).expect("send a partial prefix");
    // While both hang, the node serves its peer as usual.
    assert_replicates(&nodes[1], &nodes[0], "during-silence", 2);

    let patience = HANDSHAKE_TIMEOUT + DEADLINE;
    for (stream, what) in [(&mut silent, "a silent connection"), (&mut stalled, "a stalled prefix")]
    {
        let frames = frames_in(&read_until_closed(stream, patience, what));
        // The node speaks first (its Hello), then gives up on us.
        assert!(
            matches!(frames.as_slice(), [Frame::Hello { .. }]),
            "{what}: expected only the node's Hello before the close, got {frames:?}"
        );
    }
    assert_eq!(peer_ids(&nodes[0]), [nodes[1].node_id()]);
    assert_replicates(&nodes[0], &nodes[1], "after-silence", 3);
}

#[test]
fn a_length_prefix_over_max_frame_len_is_refused_at_once_without_harm() {
    init_logging();
    let dir = TempDir::new("rel-oversize");
    let nodes = chain(&dir, 2, |_| {});
    wait_for_peers(&nodes, &[1, 1]);
    assert_replicates(&nodes[1], &nodes[0], "before", 4);
    let before = nodes[0].list();

    for len in [MAX_FRAME_LEN + 1, u32::MAX] {
        // Before the handshake. A control connection announces a frame of
        // exactly the largest handshake frame and sends no body: the node
        // waits for it. The oversized one, sent after, must be closed while
        // the control is still open: refused on the prefix alone, not after
        // waiting for (or allocating) a body.
        let mut control = raw_connect(nodes[0].local_addr());
        control.write_all(&MAX_HANDSHAKE_FRAME_LEN.to_be_bytes()).expect("send");
        let mut over = raw_connect(nodes[0].local_addr());
        over.write_all(&len.to_be_bytes()).expect("send");
        read_until_closed(&mut over, DEADLINE, "an oversized prefix for a Hello");
        control.set_nonblocking(true).expect("nonblocking");
        let mut byte = [0u8; 1];
        let mut hello_bytes = Vec::new();
        // Drain the node's Hello; the control must not be at its end.
        let open = loop {
            match control.read(&mut byte) {
                Ok(0) => break false,
                Ok(_) => hello_bytes.push(byte[0]),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break true,
                Err(_) => break false,
            }
        };
        assert!(open, "prefix {len}: the control connection was closed too");
        drop(control);

        // After the handshake, as a peer: the same, with a control peer.
        let control = FakePeer::join(&nodes[0], fake_id());
        let mut control = control;
        control.send(&MAX_FRAME_LEN.to_be_bytes());
        let mut fake = FakePeer::join(&nodes[0], fake_id());
        fake.send(&len.to_be_bytes());
        read_until_closed(&mut fake.stream, DEADLINE, "an oversized prefix from a peer");
        wait_for_peer_to_leave(&nodes[0], fake.id);
        assert!(
            peer_ids(&nodes[0]).contains(&control.id),
            "prefix {len}: the control peer was dropped too"
        );
        drop(control);

        // After the handshake, as a client.
        let mut client = raw_connect(nodes[0].local_addr());
        write_frame(&mut client, &hello(Role::Client, 0, false)).expect("send Hello");
        let theirs = read_frame(&mut client).expect("read Hello");
        assert!(matches!(theirs, Some(Frame::Hello { .. })));
        client.write_all(&len.to_be_bytes()).expect("send");
        read_until_closed(&mut client, DEADLINE, "an oversized prefix from a client");
    }

    // No harm done: same files, same peer, still replicating.
    assert_eq!(nodes[0].list(), before);
    wait_until(
        "only the real peer to remain",
        || peer_ids(&nodes[0]),
        |ids| ids == &[nodes[1].node_id()],
    );
    assert_replicates(&nodes[1], &nodes[0], "after", 5);
    assert_replicates(&nodes[0], &nodes[1], "after-back", 6);
}

#[test]
fn a_stream_that_stalls_mid_file_is_timed_out_and_discarded() {
    init_logging();
    let dir = TempDir::new("rel-stall");
    // A short heartbeat timeout, so the test waits a second rather than the
    // default four (heartbeats every 100 ms keep the real peers alive, as
    // in the liveness tests).
    let idle = Duration::from_secs(1);
    let nodes = chain(&dir, 2, |config| {
        config.heartbeat_interval = Duration::from_millis(100);
        config.heartbeat_timeout = idle;
    });
    wait_for_peers(&nodes, &[1, 1]);
    let root = root_of(&dir, "n1");

    let content = pseudo_random_bytes(1 << 20, 7);
    let mut fake = FakePeer::join(&nodes[0], fake_id());
    fake.send_frame(&Frame::Store {
        key: "stalled".into(),
        version: Version { time: 1, node: fake.id },
        size: content.len() as u64,
        sha1: sha1(&content),
    });
    fake.send(&content[..content.len() / 2]);
    wait_until(
        "n1 to start a temp file for the stalled stream",
        || temp_files(&root),
        |t| t.len() == 1,
    );
    // Now the fake says nothing more, and keeps the socket open. The node
    // gives up after its idle timeout.
    read_until_closed(&mut fake.stream, idle + DEADLINE, "a stream stalled mid-file");
    wait_for_peer_to_leave(&nodes[0], fake.id);
    wait_until("n1's temp file to go", || temp_files(&root), Vec::is_empty);
    assert!(!keys(&nodes[0]).contains(&"stalled".to_string()));
    assert_replicates(&nodes[1], &nodes[0], "after-stall", 8);
}

#[test]
fn the_connection_after_max_connections_is_refused_with_busy() {
    init_logging();
    let dir = TempDir::new("rel-busy");
    let nodes = chain(&dir, 1, |_| {});
    let addr = nodes[0].local_addr().to_string();
    let mut clients: Vec<TestClient> = (0..MAX_CONNECTIONS)
        .map(|_| TestClient::connect(&addr, None).expect("connect a client under the limit"))
        .collect();

    let mut stream = raw_connect(nodes[0].local_addr());
    let _ = write_frame(&mut stream, &hello(Role::Client, 0, false));
    let frames = frames_in(&read_until_closed(
        &mut stream,
        HANDSHAKE_TIMEOUT + DEADLINE,
        "connection MAX_CONNECTIONS + 1",
    ));
    assert!(
        frames.iter().any(|f| matches!(f, Frame::Error { code: ErrorCode::Busy, .. })),
        "connection {} of a node allowing {MAX_CONNECTIONS} should get Error(Busy), got {frames:?}",
        MAX_CONNECTIONS + 1
    );
    // Through the handshake, the refusal is its own kind of error, so
    // a caller can tell "try again later" from a broken protocol.
    let refused = TestClient::connect(&addr, None).err();
    assert!(
        matches!(refused, Some(Error::Busy(_))),
        "a full node must refuse a client with Error::Busy, got {refused:?}"
    );
    // One leaves; the next is welcome again.
    clients.pop();
    wait_until(
        "a client to be accepted again",
        || TestClient::connect(&addr, None).and_then(|mut c| c.status()).is_ok(),
        |ok| *ok,
    );
}

/// Each anti-entropy digest is a copy of the node's whole index. A peer
/// that sends summaries and never reads must not make the node queue one
/// per summary (found in review: 5 MiB of summaries grew a node to 7 GiB).
#[test]
fn summaries_from_a_peer_that_does_not_read_queue_one_digest_at_a_time() {
    init_logging();
    let dir = TempDir::new("rel-digests");
    // No summaries of the node's own, so it falls quiet once it has answered.
    let nodes = chain(&dir, 1, |config| config.anti_entropy_interval = Duration::from_secs(3600));
    // Long keys make each digest over a megabyte: two frames, and more than
    // the socket buffers hold after a few.
    let keys = 5_000;
    for i in 0..keys {
        nodes[0].store(&format!("{i:05}-{}", "k".repeat(200)), &b"x"[..]).expect("store");
    }
    let mut fake = FakePeer::join(&nodes[0], fake_id());
    let summaries = 300;
    for _ in 0..summaries {
        fake.send_frame(&Frame::Summary { cleared: Version::ZERO, hash: [0; 20], count: 0 });
    }
    // Now read everything the node queued for us, until it goes quiet.
    fake.stream.set_read_timeout(Some(Duration::from_millis(500))).expect("set a read timeout");
    let mut received = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        match fake.stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(err)
                if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
            {
                break; // quiet for half a second: everything queued has come
            }
            Err(err) => panic!("reading from the node: {err}"),
        }
    }
    let digests = frames_in(&received).iter().filter(|f| matches!(f, Frame::Digest { .. })).count();
    println!("figures: {summaries} summaries sent, {digests} digest frames received");
    assert!(digests > 0, "a differing summary must be answered with a digest");
    assert!(
        digests < 2 * summaries / 10,
        "{digests} digest frames for {summaries} summaries: one per summary was queued"
    );
}

/// A node name goes into log lines and thread names, so a Hello whose
/// name holds a control character (a NUL cannot be in a thread name; a
/// newline would forge log lines) is refused with a clear error, and the
/// node goes on serving its peers.
#[test]
fn a_hello_whose_name_holds_a_control_character_is_refused() {
    init_logging();
    let dir = TempDir::new("rel-name");
    let nodes = chain(&dir, 2, |_| {});
    wait_for_peers(&nodes, &[1, 1]);
    for name in ["evil\0name", "two\nlines"] {
        let Frame::Hello { magic, protocol, role, node, listen_addr, nonce, auth, .. } =
            hello(Role::Peer, 0x5eed, false)
        else {
            unreachable!("hello makes a Hello");
        };
        let name = name.to_string();
        let evil = Frame::Hello { magic, protocol, role, node, name, listen_addr, nonce, auth };
        let mut stream = raw_connect(nodes[0].local_addr());
        stream.write_all(&encode(&evil)).expect("send the Hello");
        let frames = frames_in(&read_until_closed(&mut stream, DEADLINE, "a bad name"));
        assert!(
            frames.iter().any(|frame| matches!(frame,
                Frame::Error { code: ErrorCode::Protocol, message } if message.contains("control characters"))),
            "expected a Protocol error naming the rule, got {frames:?}"
        );
    }
    nodes[0].store("after", &b"still serving"[..]).expect("store");
    wait_until("the store to reach n2", || keys(&nodes[1]), |k| k == &["after"]);
    assert_eq!(peer_ids(&nodes[0]), vec![nodes[1].node_id()]);
}

#[test]
fn a_request_sent_right_behind_the_hello_is_not_lost() {
    init_logging();
    let dir = TempDir::new("rel-pipelined");
    let nodes = chain(&dir, 1, |_| {});
    // Hello and the first request in one write, as a client whose node
    // was slow to read its Hello would deliver them.
    let mut bytes = encode(&hello(Role::Client, 0, false));
    bytes.extend(encode(&Frame::Client(Message::Status)));
    let mut stream = raw_connect(nodes[0].local_addr());
    stream.write_all(&bytes).expect("send Hello and Status");
    let first = read_frame(&mut stream);
    assert!(matches!(first, Ok(Some(Frame::Hello { .. }))), "got {first:?}");
    let answer = read_frame(&mut stream);
    assert!(
        matches!(answer, Ok(Some(Frame::Client(Message::StatusReply { .. })))),
        "the Status sent right behind the Hello was never answered: got {answer:?}"
    );
}

#[test]
fn a_hostile_version_cannot_wedge_the_clock() {
    init_logging();
    let dir = TempDir::new("rel-clock");
    let nodes = chain(&dir, 2, |_| {});
    wait_for_peers(&nodes, &[1, 1]);
    nodes[0].store("k", &b"before"[..]).expect("store");
    wait_until("k on n2", || keys(&nodes[1]), |k| k == &["k"]);

    // A peer (this cluster has no secret, so anyone) announces a store at
    // the highest time there is, with bytes that fail their SHA-1: it is
    // refused as implausibly far ahead, and nothing is stored.
    let mut fake = FakePeer::join(&nodes[0], fake_id());
    fake.send_frame(&Frame::Store {
        key: "wedge".into(),
        version: Version { time: u64::MAX, node: fake.id },
        size: 0,
        sha1: [0; 20],
    });
    // A Get behind it: once it is answered, the Store has been handled.
    fake.send_frame(&Frame::Get { request: 77, key: "probe".into() });
    loop {
        match read_frame(&mut fake.stream) {
            Ok(Some(Frame::NotFound { request: 77, .. })) => break,
            Ok(Some(_)) => {}
            other => panic!("expected the answer to the probe, got {other:?}"),
        }
    }
    assert!(!keys(&nodes[0]).contains(&"wedge".to_string()));

    // The node's next change must still be made, and win.
    let result = panic::catch_unwind(AssertUnwindSafe(|| nodes[0].store("k", &b"after"[..])));
    assert!(
        matches!(result, Ok(Ok(()))),
        "n1's next store after a peer announced time u64::MAX: {:?}",
        result.map_err(|_| "it panicked")
    );
    for node in &nodes {
        wait_until(
            &format!("the new k on {}", node.name()),
            || read(node, "k").ok(),
            |got| got.as_deref() == Some(&b"after"[..]),
        );
    }
}

// ---------------------------------------------------------------------------
// 3. Deterministic fuzz
// ---------------------------------------------------------------------------

/// Pieces random text is made of: plain, path-like, control and multi-byte.
const TEXT_PIECES: [&str; 22] = [
    "a",
    "Z",
    "0",
    "/",
    ".",
    "..",
    "../",
    "\0",
    "\n",
    "\r",
    "\t",
    " ",
    "é",
    "ключ",
    "日本",
    "🦀",
    "\u{feff}",
    "\u{202e}",
    "%",
    "\\",
    ":",
    "127.0.0.1:1",
];

fn random_text(rng: &mut Rng, max_bytes: usize) -> String {
    let target = rng.between(0, max_bytes);
    let mut text = String::new();
    while text.len() < target {
        let piece = *rng.pick(&TEXT_PIECES);
        if text.len() + piece.len() > max_bytes {
            break;
        }
        text.push_str(piece);
    }
    text
}

fn random_key(rng: &mut Rng) -> String {
    let max = if rng.percent(5) { MAX_KEY_LEN } else { 40 };
    loop {
        let key = random_text(rng, max);
        if !key.is_empty() {
            return key;
        }
    }
}

fn random_version(rng: &mut Rng) -> Version {
    let shift = rng.below(64);
    Version { time: rng.next_u64() >> shift, node: rng.next_u64() }
}

fn random_digest(rng: &mut Rng) -> [u8; 20] {
    let mut digest = [0u8; 20];
    rng.fill(&mut digest);
    digest
}

/// A valid frame of a random kind with random fields.
fn random_frame(rng: &mut Rng) -> Frame {
    let small = |rng: &mut Rng| rng.between(0, 4);
    match rng.below(21) {
        0 => Frame::Hello {
            magic: if rng.percent(90) { MAGIC } else { *b"HTTP" },
            protocol: if rng.percent(90) { PROTOCOL_VERSION } else { rng.below(1 << 16) as u16 },
            role: if rng.percent(50) { Role::Peer } else { Role::Client },
            node: rng.next_u64(),
            name: random_text(rng, 32),
            listen_addr: random_text(rng, 24),
            nonce: {
                let mut nonce = [0u8; 16];
                rng.fill(&mut nonce);
                nonce
            },
            auth: rng.percent(30),
        },
        1 => Frame::Auth { proof: random_digest(rng) },
        2 => Frame::Error {
            code: *rng.pick(&[
                ErrorCode::Protocol,
                ErrorCode::Unauthorized,
                ErrorCode::Busy,
                ErrorCode::NotFound,
                ErrorCode::BadKey,
                ErrorCode::Internal,
            ]),
            message: random_text(rng, 64),
        },
        3 => Frame::Store {
            key: random_key(rng),
            version: random_version(rng),
            size: rng.next_u64() >> rng.below(64),
            sha1: random_digest(rng),
        },
        4 => Frame::Delete { key: random_key(rng), version: random_version(rng) },
        5 => Frame::Clear { version: random_version(rng) },
        6 => Frame::Get { request: rng.next_u64(), key: random_key(rng) },
        7 => Frame::File {
            request: rng.next_u64(),
            key: random_key(rng),
            version: random_version(rng),
            size: rng.next_u64() >> rng.below(64),
            sha1: random_digest(rng),
        },
        8 => Frame::NotFound { request: rng.next_u64(), key: random_key(rng) },
        9 => Frame::Summary {
            cleared: random_version(rng),
            hash: random_digest(rng),
            count: rng.next_u64(),
        },
        10 => Frame::Digest {
            cleared: random_version(rng),
            entries: (0..small(rng))
                .map(|_| DigestEntry {
                    key: random_key(rng),
                    version: random_version(rng),
                    tombstone: rng.percent(50),
                })
                .collect(),
        },
        11 => Frame::Peers { addrs: (0..small(rng)).map(|_| random_text(rng, 24)).collect() },
        12 => Frame::Client(Message::List),
        13 => Frame::Client(Message::Listing {
            entries: (0..small(rng))
                .map(|_| ListingEntry {
                    key: random_key(rng),
                    size: rng.next_u64(),
                    version: random_version(rng),
                })
                .collect(),
            done: rng.percent(50),
        }),
        14 => Frame::Client(Message::Status),
        15 => Frame::Client(Message::StatusReply {
            name: random_text(rng, 32),
            node: rng.next_u64(),
            listen_addr: random_text(rng, 24),
            peers: (0..small(rng)).map(|_| random_text(rng, 24)).collect(),
            files: rng.next_u64(),
            bytes: rng.next_u64(),
        }),
        16 => Frame::Client(Message::Ok),
        17 => Frame::Client(Message::Put { key: random_key(rng) }),
        18 => Frame::Client(Message::Chunk { size: rng.below(1 << 32) as u32 >> rng.below(32) }),
        19 => Frame::Client(Message::Remove { key: random_key(rng) }),
        _ => Frame::Client(Message::ClearAll),
    }
}

/// Damages `bytes` in one to three random ways.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    for _ in 0..rng.between(1, 3) {
        let len = bytes.len();
        let at = |rng: &mut Rng| rng.between(0, len.saturating_sub(1));
        match rng.below(10) {
            // Flip a bit.
            0 if len > 0 => {
                let i = at(rng);
                bytes[i] ^= 1 << rng.below(8);
            }
            // A boundary value somewhere.
            1 if len > 0 => {
                let i = at(rng);
                bytes[i] = *rng.pick(&[0, 1, 0x7f, 0x80, 0xfe, 0xff]);
            }
            // Cut it short.
            2 => bytes.truncate(rng.between(0, len)),
            // Insert random bytes.
            3 => {
                let i = rng.between(0, len);
                let n = rng.between(1, 16);
                let extra = rng.bytes(n);
                bytes.splice(i..i, extra);
            }
            // Remove a range.
            4 if len > 0 => {
                let i = at(rng);
                let j = rng.between(i, len);
                bytes.drain(i..j);
            }
            // Rewrite the length prefix.
            5 if len >= 4 => {
                let body = (len - 4) as u32;
                let random = rng.next_u64() as u32;
                let prefix = *rng.pick(&[
                    0,
                    1,
                    body.saturating_sub(1),
                    body + 1,
                    MAX_FRAME_LEN,
                    MAX_FRAME_LEN + 1,
                    u32::MAX,
                    random,
                ]);
                bytes[..4].copy_from_slice(&prefix.to_be_bytes());
            }
            // A string length or list count gone wild.
            6 if len >= 2 => {
                let i = rng.between(0, len - 2);
                let value = *rng.pick(&[0u16, 1, 0x7fff, 0xffff]);
                bytes[i..i + 2].copy_from_slice(&value.to_be_bytes());
            }
            7 if len >= 4 => {
                let i = rng.between(0, len - 4);
                let value = *rng.pick(&[0u32, 1, 0xffff, 0x7fff_ffff, u32::MAX]);
                bytes[i..i + 4].copy_from_slice(&value.to_be_bytes());
            }
            // Another frame glued on.
            8 => bytes.extend(encode(&random_frame(rng))),
            // Random bytes glued on.
            _ => {
                let n = rng.between(0, 64);
                let extra = rng.bytes(n);
                bytes.extend(extra);
            }
        }
    }
}

/// A reader that hands out its bytes one to three at a time, interrupted
/// now and then, as a slow socket would.
struct Dribble<'a> {
    bytes: &'a [u8],
    rng: Rng,
}

impl Read for Dribble<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.rng.percent(10) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = self.rng.between(1, 3).min(buf.len()).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

/// Feeds `input` to the decoder three ways and checks what must hold
/// whatever the bytes: no panic, the same answer from a slice and from a
/// dribbling reader, and every frame that decodes encodes back to exactly
/// the bytes it came from (one encoding per frame). Returns the number of
/// frames that decoded.
fn check_decoder(input: &[u8], seed: u64) -> usize {
    let mut decoded = 0;
    let mut rest = input;
    let mut dribble = Dribble { bytes: input, rng: Rng::new(seed) };
    for _ in 0..64 {
        let before = rest;
        let from_slice = read_frame(&mut rest);
        let from_dribble = read_frame(&mut dribble);
        assert_eq!(
            from_slice.as_ref().ok(),
            from_dribble.as_ref().ok(),
            "a slice and a dribbling reader disagree"
        );
        let Ok(Some(frame)) = from_slice else { break };
        decoded += 1;
        let consumed = &before[..before.len() - rest.len()];
        assert_eq!(
            encode(&frame),
            consumed,
            "{frame:?} decoded from bytes that are not its encoding"
        );
        let skip = usize::try_from(frame.stream_len()).unwrap_or(usize::MAX).min(rest.len());
        rest = &rest[skip..];
        dribble.bytes = rest;
    }
    // The body decoder alone, on whatever follows a 4-byte prefix.
    let _ = frame::decode(input.get(4..).unwrap_or_default());
    let _ = frame::decode(input);
    decoded
}

#[test]
fn fuzzed_frames_never_panic_the_decoder() {
    const VALID: u64 = 5_000;
    const MUTATED: u64 = 40_000;
    const RANDOM: u64 = 10_000;
    let mut decoded = 0;
    let mut decoded_cases = 0;
    for case in 0..VALID + MUTATED + RANDOM {
        let seed = 0x5eed_0000 + case;
        let mut rng = Rng::new(seed);
        let mut input = Vec::new();
        if case < VALID + MUTATED {
            for _ in 0..rng.between(1, 3) {
                let frame = random_frame(&mut rng);
                let bytes = encode(&frame);
                // Every valid frame round-trips.
                assert_eq!(
                    read_frame(&mut bytes.as_slice()).ok().flatten().as_ref(),
                    Some(&frame),
                    "case {case}: a valid frame did not round-trip"
                );
                input.extend(bytes);
            }
            if case >= VALID {
                mutate(&mut rng, &mut input);
            }
        } else {
            let len = rng.between(0, 256);
            input = rng.bytes(len);
            if rng.percent(50) && input.len() >= 4 {
                // A plausible prefix, so the body decoder gets a go.
                let body = (input.len() - 4) as u32;
                input[..4].copy_from_slice(&body.to_be_bytes());
            }
        }
        let result = panic::catch_unwind(AssertUnwindSafe(|| check_decoder(&input, seed)));
        match result {
            Ok(n) => {
                decoded += n;
                decoded_cases += usize::from(n > 0);
            }
            Err(_) => panic!(
                "case {case} (seed {seed:#x}) failed on {} bytes: {}",
                input.len(),
                hex(&input[..input.len().min(256)])
            ),
        }
    }
    println!(
        "figures: decoder fuzz: {} cases ({VALID} valid, {MUTATED} mutated, {RANDOM} random), \
         {decoded_cases} yielded at least one frame, {decoded} frames decoded",
        VALID + MUTATED + RANDOM
    );
}

/// Frames that change a node's files or its peer set when they are valid:
/// a fuzz case that decodes to one of these is a legitimate request, not
/// hostile input, so the live fuzz leaves them out to keep "nothing on disk
/// changes" meaningful.
fn changes_state(frame: &Frame) -> bool {
    matches!(
        frame,
        Frame::Delete { .. }
            | Frame::Clear { .. }
            | Frame::Digest { .. }
            | Frame::Peers { .. }
            | Frame::Client(Message::Put { .. })
            | Frame::Client(Message::Remove { .. })
            | Frame::Client(Message::ClearAll)
    )
}

/// A fuzz case for a fresh connection: mostly a damaged Hello, or a Hello
/// followed by damaged frames, or damaged frames, or noise.
fn pre_handshake_case(rng: &mut Rng) -> Vec<u8> {
    loop {
        let mut bytes = match rng.below(4) {
            0 => {
                let mut bytes = encode(&hello(Role::Peer, rng.next_u64(), false));
                mutate(rng, &mut bytes);
                bytes
            }
            1 => {
                let role = if rng.percent(50) { Role::Peer } else { Role::Client };
                let mut bytes = encode(&hello(role, rng.next_u64(), false));
                let mut tail = encode(&random_frame(rng));
                mutate(rng, &mut tail);
                bytes.extend(tail);
                bytes
            }
            2 => {
                let mut bytes = encode(&random_frame(rng));
                mutate(rng, &mut bytes);
                bytes
            }
            _ => {
                let len = rng.between(0, 200);
                rng.bytes(len)
            }
        };
        if rng.percent(10) {
            bytes.truncate(rng.between(0, bytes.len()));
        }
        if !frames_in(&bytes).iter().any(changes_state) {
            return bytes;
        }
    }
}

/// A fuzz case for a connection that has done its handshake as a peer.
fn post_handshake_case(rng: &mut Rng) -> Vec<u8> {
    loop {
        let mut bytes = Vec::new();
        if rng.percent(15) {
            let len = rng.between(1, 200);
            bytes = rng.bytes(len);
        } else {
            for _ in 0..rng.between(1, 3) {
                let mut frame = encode(&random_frame(rng));
                if rng.percent(70) {
                    mutate(rng, &mut frame);
                }
                bytes.extend(frame);
            }
        }
        if !frames_in(&bytes).iter().any(changes_state) {
            return bytes;
        }
    }
}

/// Sends one fuzz case on `stream`, ends our side, and waits for the node
/// to close its side.
fn send_case(mut stream: TcpStream, bytes: &[u8], what: &str) {
    // The node may close before it has read everything: not an error here.
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(Shutdown::Write);
    read_until_closed(&mut stream, DEADLINE, what);
}

/// How many fuzz connections are open at once: well under the node's
/// inbound peer cap (16), fakes that are closing included.
const FUZZ_CONNECTIONS_AT_ONCE: u64 = 3;

#[test]
fn fuzzed_frames_into_a_live_node_change_nothing_and_it_keeps_serving() {
    const BEFORE_HANDSHAKE: u64 = 1_500;
    const AFTER_HANDSHAKE: u64 = 1_000;
    init_logging();
    let dir = TempDir::new("rel-fuzz-live");
    let nodes = chain(&dir, 2, |_| {});
    wait_for_peers(&nodes, &[1, 1]);
    let root = root_of(&dir, "n1");
    for i in 0..4 {
        let key = format!("held/{i}");
        nodes[0].store(&key, &pseudo_random_bytes(5_000 * (i + 1), i as u64)[..]).expect("store");
    }
    wait_for_agreement(&[&nodes[0], &nodes[1]], "both nodes to hold the four files");
    wait_until("n1's ROOT/tmp to be empty", || temp_files(&root), Vec::is_empty);

    let started = Instant::now();
    for phase in ["before the handshake", "after the handshake"] {
        let list = nodes[0].list();
        let disk = tree(&root);
        let cases =
            if phase == "before the handshake" { BEFORE_HANDSHAKE } else { AFTER_HANDSHAKE };
        // The cases are independent connections, each mostly waiting for
        // the node to close it: they run a few at a time.
        thread::scope(|scope| {
            for worker in 0..FUZZ_CONNECTIONS_AT_ONCE {
                let node = &nodes[0];
                scope.spawn(move || {
                    for case in (worker..cases).step_by(FUZZ_CONNECTIONS_AT_ONCE as usize) {
                        let seed = 0xf022_0000
                            + case
                            + if cases == BEFORE_HANDSHAKE { 0 } else { 1 << 20 };
                        let mut rng = Rng::new(seed);
                        let what = format!("case {case} {phase} (seed {seed:#x})");
                        if phase == "before the handshake" {
                            let bytes = pre_handshake_case(&mut rng);
                            send_case(raw_connect(node.local_addr()), &bytes, &what);
                        } else {
                            let bytes = post_handshake_case(&mut rng);
                            let fake = FakePeer::join(node, fake_id());
                            send_case(fake.stream, &bytes, &what);
                        }
                    }
                });
            }
        });
        // Every fake has gone; the real peer is still there.
        wait_until(
            &format!("only n2 to remain a peer of n1 {phase}"),
            || peer_ids(&nodes[0]),
            |ids| ids == &[nodes[1].node_id()],
        );
        wait_until("n1's ROOT/tmp to be empty", || temp_files(&root), Vec::is_empty);
        assert_eq!(nodes[0].list(), list, "n1's files changed {phase}");
        let now = tree(&root);
        assert_eq!(now, disk, "n1's disk changed {phase}");
        // And n1 still serves its peer, both ways.
        assert_replicates(&nodes[1], &nodes[0], &format!("after fuzz {phase}"), 9);
        assert_replicates(&nodes[0], &nodes[1], &format!("from n1 {phase}"), 10);
    }
    println!(
        "figures: live fuzz: {BEFORE_HANDSHAKE} connections before the handshake, \
         {AFTER_HANDSHAKE} after, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// 4. Hostile keys
// ---------------------------------------------------------------------------

/// Keys that would escape a naive store, or break a line-based format.
fn hostile_keys() -> Vec<String> {
    let escape = std::env::temp_dir().join(format!("gossipfs-escape-{}", std::process::id()));
    vec![
        "../escape".to_string(),
        "../../escape".to_string(),
        format!("../../../../../../../../..{}", escape.display()),
        "/etc/passwd".to_string(),
        "..".to_string(),
        ".".to_string(),
        "a/../../b".to_string(),
        "nul\0inside".to_string(),
        "\0".to_string(),
        "line1\nline2".to_string(),
        "\n".to_string(),
        "\r\n".to_string(),
        "tab\there".to_string(),
        "🦀/../🦀".to_string(),
        "x".repeat(MAX_KEY_LEN),
        "é".repeat(MAX_KEY_LEN / 2),
    ]
}

/// Paths a key could have escaped to.
fn escape_targets(dir: &TempDir) -> Vec<PathBuf> {
    let parent = dir.path().parent().expect("temp dirs have a parent");
    vec![
        dir.path().join("escape"),
        parent.join("escape"),
        std::env::temp_dir().join(format!("gossipfs-escape-{}", std::process::id())),
        parent.join("b"),
    ]
}

#[test]
fn hostile_keys_through_the_api_get_a_clear_error_or_round_trip_inside_the_root() {
    init_logging();
    let dir = TempDir::new("rel-keys-api");
    let nodes = chain(&dir, 2, |_| {});
    wait_for_peers(&nodes, &[1, 1]);
    let roots = [root_of(&dir, "n1"), root_of(&dir, "n2")];
    let before = tree(dir.path());

    for bad in [String::new(), "x".repeat(MAX_KEY_LEN + 1)] {
        let len = bad.len();
        let store = nodes[0].store(&bad, &b"x"[..]);
        assert!(
            matches!(&store, Err(Error::BadKey(why)) if !why.is_empty()),
            "store of a {len}-byte key: {store:?}"
        );
        let get = nodes[0].get(&bad).map(|_| ());
        assert!(matches!(get, Err(Error::BadKey(_))), "get: {get:?}");
        let delete = nodes[0].delete(&bad);
        assert!(matches!(delete, Err(Error::BadKey(_))), "delete: {delete:?}");
    }

    let hostile = hostile_keys();
    let contents: Vec<Vec<u8>> =
        (0..hostile.len()).map(|i| pseudo_random_bytes(1_000 + i, 100 + i as u64)).collect();
    for (key, content) in hostile.iter().zip(&contents) {
        nodes[0].store(key, &content[..]).expect("store a hostile key");
    }
    let mut sorted = hostile.clone();
    sorted.sort();
    wait_until("every hostile key on n2", || keys(&nodes[1]), |k| k == &sorted);
    assert_eq!(keys(&nodes[0]), sorted);
    for node in &nodes {
        for (key, content) in hostile.iter().zip(&contents) {
            assert_eq!(
                &read(node, key).expect("read a hostile key back"),
                content,
                "{key:?} on {}",
                node.name()
            );
        }
    }

    // Everything created is inside a node's root.
    for (path, _) in tree(dir.path()) {
        if !before.contains_key(&path) {
            assert!(
                roots.iter().any(|root| path.starts_with(root)),
                "{} was created outside the roots",
                path.display()
            );
        }
    }
    for target in escape_targets(&dir) {
        assert!(!target.exists(), "{} exists", target.display());
    }

    // They delete like any other key.
    for key in &hostile {
        nodes[0].delete(key).expect("delete a hostile key");
    }
    wait_until("n2 to delete them all", || keys(&nodes[1]), Vec::is_empty);
    assert!(matches!(read(&nodes[1], &hostile[0]), Err(Error::NotFound(_))));
}

#[test]
fn hostile_keys_through_the_command_line_get_a_clear_error_or_round_trip() {
    init_logging();
    let dir = TempDir::new("rel-keys-cli");
    let nodes = chain(&dir, 1, |_| {});
    let node = &nodes[0];
    let addr = node.local_addr().to_string();
    let before = tree(dir.path());

    let long = "x".repeat(MAX_KEY_LEN + 1);
    for bad in ["", long.as_str()] {
        for command in ["put", "get", "rm"] {
            run_cli(&[command, "--node", &addr, bad], b"content").failure("bad key");
        }
    }
    assert!(keys(node).is_empty(), "a bad key stored something");

    // NUL cannot be in a command-line argument at all (the OS takes
    // arguments as C strings), so it is covered by the API test only.
    let keys_ok: Vec<String> = hostile_keys().into_iter().filter(|k| !k.contains('\0')).collect();
    for (i, key) in keys_ok.iter().enumerate() {
        let content = pseudo_random_bytes(777 + i, 200 + i as u64);
        run_cli(&["put", "--node", &addr, key], &content).success();
        let got = run_cli(&["get", "--node", &addr, key], b"").success();
        assert!(got.stdout == content, "`get {key:?}` returned other bytes");
        assert!(keys(node).contains(key), "{key:?} is not listed as itself");
    }
    for target in escape_targets(&dir) {
        assert!(!target.exists(), "{} exists", target.display());
    }
    let root = root_of(&dir, "n1");
    for (path, _) in tree(dir.path()) {
        if !before.contains_key(&path) {
            assert!(path.starts_with(&root), "{} was created outside the root", path.display());
        }
    }
    for key in &keys_ok {
        run_cli(&["rm", "--node", &addr, key], b"").success();
        run_cli(&["get", "--node", &addr, key], b"").failure("not found");
    }
}

// ---------------------------------------------------------------------------
// 5. Faults
// ---------------------------------------------------------------------------

#[test]
fn a_fake_sender_that_dies_mid_stream_leaves_nothing_and_the_key_arrives_later() {
    init_logging();
    let dir = TempDir::new("rel-sender-dies");
    let nodes = chain(&dir, 2, |_| {});
    wait_for_peers(&nodes, &[1, 1]);
    let root = root_of(&dir, "n1");
    let key = "dies-mid-stream";

    let content = pseudo_random_bytes(2 << 20, 11);
    let id = fake_id();
    let version = Version { time: 1, node: id };
    let store =
        Frame::Store { key: key.into(), version, size: content.len() as u64, sha1: sha1(&content) };
    let mut fake = FakePeer::join(&nodes[0], id);
    fake.send_frame(&store);
    fake.send(&content[..content.len() / 3]);
    wait_until(
        "n1 to stream into a temp file",
        || temp_files(&root),
        |t| t.len() == 1 && t[0].1 > 0,
    );
    // The sender dies.
    fake.stream.shutdown(Shutdown::Both).expect("cut the stream");
    drop(fake);
    wait_for_peer_to_leave(&nodes[0], id);
    wait_until("the partial file to go", || temp_files(&root), Vec::is_empty);
    for node in &nodes {
        assert!(!keys(node).contains(&key.to_string()), "{} kept a partial", node.name());
    }
    assert!(!object_path(&root, key).exists());
    assert_replicates(&nodes[1], &nodes[0], "while-the-sender-is-gone", 12);

    // The sender returns and sends the same change whole: it is accepted
    // (the broken attempt did not mark it as seen) and relayed.
    let mut fake = FakePeer::join(&nodes[0], id);
    fake.send_frame(&store);
    fake.send(&content);
    wait_until(
        "the whole file on both nodes",
        || nodes.iter().map(keys).collect::<Vec<_>>(),
        |k| k.iter().all(|k| k.contains(&key.to_string())),
    );
    assert_eq!(read(&nodes[1], key).expect("read"), content);

    // And a real node's later store of the key arrives too.
    let newer = pseudo_random_bytes(300_000, 13);
    nodes[1].store(key, &newer[..]).expect("store");
    wait_until(
        "the real node's store to reach n1",
        || read(&nodes[0], key).ok(),
        |got| got.as_deref() == Some(&newer[..]),
    );
    drop(fake);
}

#[test]
fn a_real_sender_that_stops_mid_stream_is_reconnected_and_the_file_arrives() {
    init_logging();
    let dir = TempDir::new("rel-sender-stops");
    // n2 sends; n1 dials n2, so n1 redials when n2 comes back on its port.
    let n2_config = config("n2", dir.path());
    let n2_listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let n2_addr = n2_listener.local_addr().expect("address");
    let n2 = FileServer::start_on(n2_listener, n2_config.clone()).expect("start n2");
    let mut n1_config = config("n1", dir.path());
    n1_config.bootstrap = vec![n2_addr.to_string()];
    let n1 = start(n1_config);
    let root = root_of(&dir, "n1");
    wait_until("n1 and n2 to connect", || (n1.peers().len(), n2.peers().len()), |p| *p == (1, 1));

    let key = "big-from-n2";
    let size: u64 = 64 << 20;
    let mut reader = BigReader::new(size, 14);
    n2.store(key, &mut reader).expect("store on n2");
    let expected = reader.sha1();
    let mut last = 0;
    wait_until(
        "n1's temp file to grow",
        || {
            let now = temp_files(&root).first().map_or(0, |t| t.1);
            let grew = last > 0 && now > last;
            last = now;
            grew
        },
        |grew| *grew,
    );
    // The sender stops in the middle.
    drop(n2);
    wait_until("n1 to drop n2", || n1.peers().len(), |n| *n == 0);
    wait_until("the partial to go", || temp_files(&root), Vec::is_empty);
    assert!(!keys(&n1).contains(&key.to_string()));

    // The sender comes back on the same port and root: n1 redials it, and
    // anti-entropy brings the whole file.
    let listener = TcpListener::bind(n2_addr).expect("rebind n2's port");
    let n2 = FileServer::start_on(listener, n2_config).expect("restart n2");
    wait_until("n1 to reconnect", || n1.peers().len(), |n| *n == 1);
    wait_until(
        "the file on n1",
        || n1.list().into_iter().find(|f| f.key == key).map(|f| f.size),
        |size_seen| *size_seen == Some(size),
    );
    let got = sha1_of(n1.get(key).expect("open")).expect("read to the end");
    assert_eq!(got, expected);
    drop(n2);
}

#[test]
fn kill_9_while_receiving_256_mib_leaves_no_partial_and_anti_entropy_brings_it_whole() {
    const SIZE: u64 = 256 << 20;
    let dir = TempDir::new("rel-kill9");
    let root_a = dir.path().join("a");
    let root_b = dir.path().join("b");
    let a = ServeProc::start(dir.path(), "k9-a", &root_a, "127.0.0.1", &[]);
    let b = ServeProc::start(dir.path(), "k9-b", &root_b, "127.0.0.1", &["--peer", &a.addr]);
    wait_until(
        "a and b to connect",
        || {
            let peers = |node: &ServeProc| node.client().status().map(|s| s.peers.len()).ok();
            (peers(&a), peers(&b))
        },
        |seen| *seen == (Some(1), Some(1)),
    );

    let key = "big/kill-9.bin";
    let started = Instant::now();
    let a_addr = a.addr.clone();
    let put = thread::spawn(move || {
        let mut reader = BigReader::new(SIZE, 15);
        let mut client = TestClient::connect(&a_addr, None)?;
        client.put(key, &mut reader)?;
        Ok::<_, Error>(reader.sha1())
    });
    // Wait until b is receiving: a temp file that exists and grows.
    let mut last = 0;
    let seen = wait_until(
        "a temp file growing in b's ROOT/tmp",
        || {
            let now = temp_files(&root_b).first().map_or(0, |t| t.1);
            let grew = last > 0 && now > last && now < SIZE;
            last = now;
            (now, grew)
        },
        |(_, grew)| *grew,
    );
    b.kill_9();
    let expected = put.join().expect("the put thread").expect("put 256 MiB to a");
    let partial = temp_files(&root_b);
    println!(
        "figures: kill -9 at about {} MiB of {} MiB received; left behind: {partial:?}",
        seen.0 >> 20,
        SIZE >> 20
    );
    assert!(!partial.is_empty(), "the kill should have left a temp file to sweep");
    assert!(!object_path(&root_b, key).exists(), "a partial file was committed");

    // Restart b alone first: at start it holds no partial and no temp file.
    let alone = ServeProc::start(dir.path(), "k9-b", &root_b, "127.0.0.1", &[]);
    assert!(temp_files(&root_b).is_empty(), "temp files survived the restart");
    assert!(!object_path(&root_b, key).exists());
    assert!(alone.client().list().expect("ls").is_empty());
    drop(alone);

    // Restart it with its peer: anti-entropy brings the file in full.
    let b = ServeProc::start(dir.path(), "k9-b", &root_b, "127.0.0.1", &["--peer", &a.addr]);
    let b_addr = b.addr.clone();
    wait_until(
        "the whole file listed on b",
        || {
            let list = TestClient::connect(&b_addr, None).and_then(|mut c| c.list());
            list.map(|l| l.into_iter().map(|e| (e.key, e.size)).collect::<Vec<_>>())
                .unwrap_or_default()
        },
        |files| files == &[(key.to_string(), SIZE)],
    );
    let (_, code, (len, got), stderr) =
        run_cli_with(&["get", "--node", &b.addr, key], Vec::new(), |stdout| {
            let mut counted = Counted { inner: stdout, count: 0 };
            let hash = sha1_of(&mut counted).expect("read the get's stdout");
            (counted.count, hash)
        });
    assert_eq!(code, Some(0), "`gossipfs get` from b failed: {stderr}");
    assert_eq!(len, SIZE);
    assert_eq!(hex(&got), hex(&expected), "b's copy differs from what was put");
    assert!(temp_files(&root_b).is_empty());
    println!(
        "figures: kill -9 test: 256 MiB put, killed, restarted twice, healed and checked in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Counts the bytes read through it.
struct Counted<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// One writer's view of its own keys: the content of its latest store, or
/// `None` after its delete.
type Model = HashMap<String, Option<Vec<u8>>>;

/// Stores and deletes random keys of its own on `node` until `stop`, at
/// least `min_ops` times; returns the model of what it did.
fn churn(
    node: &FileServer,
    prefix: &str,
    seed: u64,
    stop: &AtomicBool,
    min_ops: usize,
) -> (Model, usize) {
    let mut rng = Rng::new(seed);
    let mut model = Model::new();
    let mut ops = 0;
    while ops < min_ops || !stop.load(Ordering::SeqCst) {
        let key = format!("{prefix}/{}", rng.below(16));
        let live = model.get(&key).is_some_and(Option::is_some);
        if live && rng.percent(30) {
            node.delete(&key).expect("delete a live key");
            model.insert(key, None);
        } else {
            let len = if rng.percent(10) {
                rng.between(100_000, 512 << 10)
            } else {
                rng.between(0, 8_000)
            };
            let content = rng.bytes(len);
            node.store(&key, &content[..]).expect("store");
            model.insert(key, Some(content));
        }
        ops += 1;
    }
    (model, ops)
}

#[test]
fn a_node_restarted_ten_times_under_traffic_ends_byte_identical_with_the_others() {
    init_logging();
    let dir = TempDir::new("rel-restarts");
    let nodes = chain(&dir, 2, |_| {});
    wait_for_peers(&nodes, &[1, 1]);
    let mut n3_config = config("n3", dir.path());
    n3_config.bootstrap = nodes.iter().map(|n| n.local_addr().to_string()).collect();

    let n3_root = root_of(&dir, "n3");
    let stop = AtomicBool::new(false);
    let mut changes_seen = Vec::new();
    let mut cut_mid_stream = 0;
    let (models, ops, n3) = thread::scope(|scope| {
        let writers: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let stop = &stop;
                scope.spawn(move || churn(node, &format!("w{i}"), 16 + i as u64, stop, 50))
            })
            .collect();
        for _ in 0..10 {
            let n3 = start(n3_config.clone());
            // Let it join and take in some traffic, then stop it, wherever
            // its streams are.
            wait_until(
                "n3 to connect and apply a change",
                || (n3.peers().len(), n3.stats().changes_applied),
                |(peers, applied)| *peers >= 1 && *applied >= 1,
            );
            changes_seen.push(n3.stats().changes_applied);
            // Observed, not required: whether a stream was coming in.
            cut_mid_stream += usize::from(!temp_files(&n3_root).is_empty());
            n3.shutdown();
        }
        let n3 = start(n3_config.clone());
        stop.store(true, Ordering::SeqCst);
        let (models, ops): (Vec<Model>, Vec<usize>) =
            writers.into_iter().map(|w| w.join().expect("a writer")).unzip();
        (models, ops.iter().sum::<usize>(), n3)
    });

    let all = [&nodes[0], &nodes[1], &n3];
    let files = wait_for_agreement(&all, "all three nodes to hold the same files");
    let mut expected: Vec<(String, u64)> = models
        .iter()
        .flat_map(|m| m.iter())
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.clone(), v.len() as u64)))
        .collect();
    expected.sort();
    let listed: Vec<(String, u64)> = files.iter().map(|f| (f.key.clone(), f.size)).collect();
    assert_eq!(listed, expected, "the agreed files are not the writers' latest");
    for node in all {
        for model in &models {
            for (key, content) in model {
                let Some(content) = content else { continue };
                let got = sha1_of(node.get(key).expect("open")).expect("read");
                assert_eq!(got, sha1(content), "{key} on {}", node.name());
            }
        }
        let root = root_of(&dir, node.name());
        assert!(temp_files(&root).is_empty(), "{} has temp files", node.name());
    }
    println!(
        "figures: restarts: 10 restarts of n3 ({cut_mid_stream} with a temp file in flight), \
         changes applied per life {changes_seen:?}, {ops} stores and deletes on n1 and n2, \
         {} live files agreed",
        files.len()
    );
}

#[test]
fn a_file_corrupted_on_disk_is_detected_when_read_and_healed_from_a_peer() {
    init_logging();
    let dir = TempDir::new("rel-corrupt");
    let nodes = chain(&dir, 2, |_| {});
    wait_for_peers(&nodes, &[1, 1]);
    let (root1, root2) = (root_of(&dir, "n1"), root_of(&dir, "n2"));

    // One file read through the API, one through a client, one never read
    // on n1 at all: only a peer's Corrupt notice can reveal that one.
    let names = ["corrupt/api", "corrupt/client", "corrupt/notice"];
    let contents: Vec<Vec<u8>> =
        (0..names.len() as u64).map(|i| pseudo_random_bytes(100_000, 17 + i)).collect();
    for (key, content) in names.iter().zip(&contents) {
        nodes[0].store(key, &content[..]).expect("store");
    }
    wait_for_agreement(&[&nodes[0], &nodes[1]], "both nodes to hold every file");
    let versions = nodes[0].list();
    let n2_files: Vec<Vec<u8>> =
        names.iter().map(|k| fs::read(object_path(&root2, k)).expect("n2's file")).collect();

    // Flip a byte of content (content is the tail of each key's file).
    for key in names {
        let path = object_path(&root1, key);
        let mut bytes = fs::read(&path).expect("read the key file");
        let at = bytes.len() - 1_000;
        bytes[at] ^= 0x20;
        fs::write(&path, bytes).expect("write the corrupt file");
    }

    // Read through the API: the last read fails, with InvalidData.
    let mut reader = nodes[0].get(names[0]).expect("open");
    let mut sink = Vec::new();
    let err = reader.read_to_end(&mut sink).expect_err("a corrupt file must not read cleanly");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    // Read through a client: the bytes are refused, not passed off as good.
    let mut client =
        TestClient::connect(&nodes[0].local_addr().to_string(), None).expect("connect");
    let mut out = Vec::new();
    let got = client.get(names[1], &mut out);
    assert!(got.is_err(), "a client got a corrupt file as good");

    // A node that joins now through n1 pulls all three from it: the third
    // one's bad bytes fail their SHA-1 on arrival, it tells n1, and n1
    // finds its copy bad without anyone reading it there.
    // n1 only: a get moves one copy, from the holder it picks, and only
    // n1's copy can reveal n1's damage.
    let mut n3_config = config("n3", dir.path());
    n3_config.bootstrap = vec![nodes[0].local_addr().to_string()];
    n3_config.discover_peers = false;
    let n3 = start(n3_config);
    for (key, content) in names.iter().zip(&contents) {
        wait_until(
            &format!("{key} on n3"),
            || read(&n3, key).ok(),
            |got| got.as_ref() == Some(content),
        );
    }
    drop(n3);

    // All three taken out of service, then healed from n2 at the same
    // versions.
    let healed =
        wait_until("n1 to hold every file again", || nodes[0].list(), |list| list == &versions);
    assert_eq!(healed, versions);
    let quarantined = wait_until(
        "n1 to have set aside all three corrupt files",
        || fs::read_dir(root1.join("corrupt")).map(|d| d.count()).unwrap_or(0),
        |count| *count == names.len(),
    );
    assert_eq!(quarantined, names.len(), "each corrupt file is kept aside in ROOT/corrupt");
    for (key, content) in names.iter().zip(&contents) {
        assert_eq!(&read(&nodes[0], key).expect("read the healed file"), content);
        assert_eq!(&read(&nodes[1], key).expect("read n2's copy"), content);
    }
    // n2 never took the bad bytes: its files are exactly as they were.
    for (key, before) in names.iter().zip(&n2_files) {
        assert_eq!(&fs::read(object_path(&root2, key)).expect("n2's file"), before);
    }
}

// ---------------------------------------------------------------------------
// 6. Load
// ---------------------------------------------------------------------------

/// Sizes for the load test: mostly small, some medium, a few up to 1 MiB.
fn load_size(rng: &mut Rng) -> usize {
    match rng.below(100) {
        0..80 => rng.between(1, 4 << 10),
        80..97 => rng.between(4 << 10, 64 << 10),
        _ => rng.between(64 << 10, 1 << 20),
    }
}

/// What one load client did.
#[derive(Default)]
struct LoadReport {
    model: Model,
    ops: u64,
    bytes: u64,
    errors: Vec<String>,
}

/// One load client: 200 random put/get/rm on keys of its own, always on
/// the same node, checking every answer against its model.
fn load_client(addr: &str, client_no: usize) -> LoadReport {
    const OPS: usize = 200;
    const KEYS: u64 = 8;
    let mut rng = Rng::new(0x10ad_0000 + client_no as u64);
    let mut report = LoadReport::default();
    let mut client = match TestClient::connect(addr, None) {
        Ok(client) => client,
        Err(err) => {
            report.errors.push(format!("connect: {err}"));
            return report;
        }
    };
    for op in 0..OPS {
        let key = format!("load/c{client_no:02}/k{}", rng.below(KEYS));
        let latest = report.model.get(&key).cloned().flatten();
        let roll = rng.below(100);
        let outcome = if roll < 45 {
            let size = load_size(&mut rng);
            let content = rng.bytes(size);
            report.bytes += content.len() as u64;
            let result = client.put(&key, &mut &content[..]);
            report.model.insert(key.clone(), Some(content));
            result.map(|_| ())
        } else if roll < 85 {
            let mut got = Vec::new();
            match (client.get(&key, &mut got), latest) {
                (Ok(_), Some(want)) if got == want => {
                    report.bytes += got.len() as u64;
                    Ok(())
                }
                (Ok(_), Some(want)) => Err(Error::Protocol(format!(
                    "got {} bytes, not the {} of the latest put",
                    got.len(),
                    want.len()
                ))),
                (Ok(_), None) => Err(Error::Protocol(format!(
                    "got {} bytes of a key that was removed or never put",
                    got.len()
                ))),
                (Err(Error::NotFound(_)), None) => Ok(()),
                (Err(err), _) => Err(err),
            }
        } else {
            let result = client.remove(&key);
            let was_live = latest.is_some();
            report.model.insert(key.clone(), None);
            match (result, was_live) {
                (Ok(()), true) | (Err(Error::NotFound(_)), false) => Ok(()),
                (Ok(()), false) => Err(Error::Protocol("rm of a dead key succeeded".into())),
                (Err(err), _) => Err(err),
            }
        };
        report.ops += 1;
        if let Err(err) = outcome {
            report.errors.push(format!("client {client_no} op {op} on {key}: {err}"));
            // The connection may be unusable after an error: start afresh.
            match TestClient::connect(addr, None) {
                Ok(fresh) => client = fresh,
                Err(err) => {
                    report.errors.push(format!("reconnect: {err}"));
                    return report;
                }
            }
        }
    }
    report
}

#[test]
fn thirty_two_clients_doing_200_random_ops_each_see_no_error_and_the_nodes_agree() {
    const CLIENTS: usize = 32;
    init_logging();
    let dir = TempDir::new("rel-load");
    let nodes = chain(&dir, 3, |_| {});
    wait_for_peers(&nodes, &[2, 2, 2]);
    let addrs: Vec<String> = nodes.iter().map(|n| n.local_addr().to_string()).collect();

    let started = Instant::now();
    let reports: Vec<LoadReport> = thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let addr = &addrs[i % nodes.len()];
                scope.spawn(move || load_client(addr, i))
            })
            .collect();
        clients.into_iter().map(|c| c.join().expect("a load client")).collect()
    });
    let ops_time = started.elapsed();
    let errors: Vec<&String> = reports.iter().flat_map(|r| &r.errors).collect();
    assert!(errors.is_empty(), "{} errors: {errors:#?}", errors.len());

    let all: Vec<&FileServer> = nodes.iter().collect();
    let files = wait_for_agreement(&all, "all three nodes to agree");
    let converged = started.elapsed();
    let mut expected: Vec<(String, u64)> = reports
        .iter()
        .flat_map(|r| &r.model)
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.clone(), v.len() as u64)))
        .collect();
    expected.sort();
    let listed: Vec<(String, u64)> = files.iter().map(|f| (f.key.clone(), f.size)).collect();
    assert_eq!(listed, expected, "the agreed files are not the clients' latest puts");
    for node in &nodes {
        for report in &reports {
            for (key, content) in &report.model {
                let Some(content) = content else { continue };
                let got = sha1_of(node.get(key).expect("open")).expect("read");
                assert_eq!(got, sha1(content), "{key} on {}", node.name());
            }
        }
    }
    let ops: u64 = reports.iter().map(|r| r.ops).sum();
    let bytes: u64 = reports.iter().map(|r| r.bytes).sum();
    println!(
        "figures: load: {CLIENTS} clients, {ops} ops, {:.1} MiB put+got, ops done in {:.1} s, \
         all nodes agreed on {} files after {:.1} s",
        bytes as f64 / (1 << 20) as f64,
        ops_time.as_secs_f64(),
        files.len(),
        converged.as_secs_f64()
    );
}

/// A client that sends a frame only a peer may send is told why in an
/// `Error` frame, and its session ends; a query that merely fails (a
/// missing key) before it leaves the session open.
#[test]
fn a_client_sending_a_peer_frame_is_told_and_its_session_ends() {
    init_logging();
    let dir = TempDir::new("rel-client-peer-frame");
    let node = start(config("n1", dir.path()));
    let mut client = raw_connect(node.local_addr());
    write_frame(&mut client, &hello(Role::Client, 0, false)).expect("send Hello");
    assert!(matches!(read_frame(&mut client), Ok(Some(Frame::Hello { .. }))));

    let get = |request| Frame::Get { request, key: "absent".into() };
    write_frame(&mut client, &get(1)).expect("send a Get");
    assert!(matches!(read_frame(&mut client), Ok(Some(Frame::NotFound { request: 1, .. }))));

    let announce = Frame::Announce {
        key: "k".into(),
        version: Version { time: 1, node: fake_id() },
        size: 0,
        sha1: [0; 20],
    };
    write_frame(&mut client, &announce).expect("send an Announce");
    match read_frame(&mut client) {
        Ok(Some(Frame::Error { message, .. })) => {
            assert!(message.contains("may not send"), "{message}");
        }
        other => panic!("no Error frame for a peer's frame: {other:?}"),
    }
    // A request after it is not answered: the session is over.
    let _ = write_frame(&mut client, &get(2));
    let rest = read_until_closed(&mut client, DEADLINE, "a client that sent a peer's frame");
    assert!(rest.is_empty(), "the node answered {} more bytes", rest.len());
    assert!(keys(&node).is_empty());
}
