//! The shape of the mesh and the life of a connection at its edges: the
//! inbound cap and the decline that points elsewhere, a cluster bootstrapped
//! through one node, the redial backoff and its cap, the log-once rule,
//! forgetting the dead, and a shutdown that races incoming connections.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TempDir, config, fake_id, handshaken_peer, start, wait_until};
use gossipfs::frame::{ErrorCode, Frame, Role, read_frame, write_frame};
use gossipfs::handshake::{Identity, handshake};
use gossipfs::{Config, Error, FileServer, NodeId, Version};
use sha1::Digest;

// ---------------------------------------------------------------------------
// A log sink of our own: the log-once rule is about log lines.
// ---------------------------------------------------------------------------

fn capture_logs() {
    common::capture_logs("lg");
}

/// The lines `node` logged at `level` that contain every one of `parts`.
fn logged(node: &str, level: log::Level, parts: &[&str]) -> usize {
    common::with_logs(|lines| {
        let wanted = |l: &&common::LogLine| {
            l.level == level && l.node == node && parts.iter().all(|p| l.message.contains(p))
        };
        lines.iter().filter(wanted).count()
    })
}

/// An address nothing listens on: bound, then let go.
fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

// ---------------------------------------------------------------------------
// Duplicate connections
// ---------------------------------------------------------------------------

/// A second connection from a node that loses the tie-break ends at once
/// when the kept one has its promise; its end must leave alone the pushes
/// awaited from that node, which come on the kept one. Were they given up,
/// the node would fetch the file from another peer that announced it: a
/// second copy.
#[test]
fn a_duplicate_that_ends_leaves_the_pushes_awaited_on_the_kept_connection() {
    capture_logs();
    let dir = TempDir::new("mesh-duplicate-awaited");
    let node = start(config("lg-dup", dir.path()));
    let origin = fake_id();
    // No nonce is smaller: this connection is the one kept.
    let mut kept = common::peer_with_nonce(&node, origin, [0; 16]);
    kept.until(|f| matches!(f, Frame::PushesFrom { .. }));
    kept.send(&Frame::PushesFrom { version: Version { time: 1, node: origin } });
    // Its handler takes frames in order: once this get is answered, the
    // promise is in.
    kept.send(&Frame::Get { request: 1, key: "absent".into() });
    kept.until(|f| matches!(f, Frame::NotFound { request: 1, .. }));
    let mut other = common::peer_with_nonce(&node, fake_id(), [0; 16]);
    other.until(|f| matches!(f, Frame::PushesFrom { .. }));

    // The other peer announces a store of the origin's: the node waits for
    // the origin's push rather than fetch it.
    let content = b"pushed once".to_vec();
    let version = Version { time: 5, node: origin };
    let sha1: [u8; 20] = sha1::Sha1::digest(&content).into();
    let (key, size) = ("k".to_string(), content.len() as u64);
    other.send(&Frame::Announce { key: key.clone(), version, size, sha1 });
    wait_until("the push to be awaited", || node.stats().files_expected, |n| *n == 1);

    // A second connection from the origin loses, and ends.
    let duplicate = common::peer_with_nonce(&node, origin, [9; 16]);
    let closed = ["Duplicate connection to peer=fake closed"];
    wait_until(
        "the duplicate to end",
        || logged("lg-dup", log::Level::Debug, &closed),
        |n| *n == 1,
    );
    // Nothing was fetched from the other peer: a go-ahead, sent as the
    // duplicate ended, would come before the answer to this get.
    other.send(&Frame::Get { request: 1, key: "absent".into() });
    let answer = other.until(|f| matches!(f, Frame::NotFound { request: 1, .. }) || is_go_ahead(f));
    assert!(!is_go_ahead(&answer), "a second copy was asked for: {answer:?}");

    // The push comes on the kept connection.
    kept.send(&Frame::Store { key: key.clone(), version, size, sha1 });
    kept.socket.write_all(&content).expect("send the content");
    wait_until(
        "the push to be stored",
        || common::keys(&node),
        |keys| keys == std::slice::from_ref(&key),
    );
    drop(duplicate);
}

fn is_go_ahead(frame: &Frame) -> bool {
    matches!(frame, Frame::GoAhead { .. })
}

// ---------------------------------------------------------------------------
// The inbound cap and the decline
// ---------------------------------------------------------------------------

#[test]
fn a_node_at_its_inbound_cap_declines_with_its_peers_addresses_then_busy() {
    let dir = TempDir::new("mesh-decline-wire");
    let mut hub_config = config("hub", dir.path());
    hub_config.max_inbound_peers = 1;
    let hub = start(hub_config);
    let mut n2_config = config("n2", dir.path());
    n2_config.bootstrap = vec![hub.local_addr().to_string()];
    let n2 = start(n2_config);
    wait_until("n2 to be the hub's one peer", || hub.peers().len(), |n| *n == 1);

    // A peer dialling the full hub completes its handshake, then hears whom
    // to try instead, then Busy, then the close.
    let stream = handshaken_peer(&hub, fake_id());
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut reader = BufReader::new(&stream);
    let frame = read_frame(&mut reader).expect("a frame").expect("not the end");
    assert_eq!(frame, Frame::Peers { addrs: vec![n2.local_addr().to_string()] });
    let frame = read_frame(&mut reader).expect("a frame").expect("not the end");
    assert!(matches!(frame, Frame::Error { code: ErrorCode::Busy, .. }), "got {frame:?}");
    assert!(matches!(read_frame(&mut reader), Ok(None)), "the hub closes after Busy");

    // The declined never counted: the hub still has its one peer, and
    // takes another once that one leaves.
    assert_eq!(hub.peers().len(), 1);
    drop(n2);
    wait_until("n2 to leave the hub", || hub.peers().len(), |n| *n == 0);
    // The place is freed when n2's connection thread ends, just after n2
    // leaves the peer map: a peer that dials in between is declined, and
    // dials again, as a node would.
    let mut diallers = Vec::new();
    wait_until(
        "a peer in the freed place",
        || {
            if hub.peers().is_empty() {
                diallers.push(handshaken_peer(&hub, fake_id()));
            }
            hub.peers().len()
        },
        |n| *n == 1,
    );
}

#[test]
fn a_declined_node_joins_through_the_addresses_it_was_given() {
    let dir = TempDir::new("mesh-decline-join");
    let mut hub_config = config("hub", dir.path());
    hub_config.max_inbound_peers = 1;
    let hub = start(hub_config);
    let with_hub = |name: &str| {
        let mut config = config(name, dir.path());
        config.bootstrap = vec![hub.local_addr().to_string()];
        start(config)
    };
    let n2 = with_hub("n2");
    wait_until("n2 to connect to the hub", || hub.peers().len(), |n| *n == 1);
    // n3 knows only the hub, which is full: it must find n2 by the decline.
    let n3 = with_hub("n3");
    wait_until(
        "n3 to join through n2",
        || n3.peers().into_iter().map(|p| p.name).collect::<Vec<_>>(),
        |names| names.contains(&"n2".to_string()),
    );
    assert_eq!(hub.peers().len(), 1, "the hub stayed at its cap");
    n3.store("from-n3", &b"through n2"[..]).expect("store");
    wait_until("n3's file on the hub", || common::keys(&hub), |k| k.contains(&"from-n3".into()));
    drop((n2, n3));
}

/// How many nodes the mesh test starts.
const MESH_NODES: usize = 40;

#[test]
fn forty_nodes_bootstrapped_through_one_stay_under_the_cap_and_connected() {
    let dir = TempDir::new("mesh-forty");
    let tweak = |config: &mut Config| {
        config.max_peers = 3;
        config.max_inbound_peers = 6;
        config.dial_retry_max = Duration::from_millis(500);
        config.anti_entropy_interval = Duration::from_millis(300);
    };
    let started = Instant::now();
    let mut first = config("m1", dir.path());
    tweak(&mut first);
    let mut nodes = vec![start(first)];
    let hub = nodes[0].local_addr().to_string();
    for i in 2..=MESH_NODES {
        let mut config = config(&format!("m{i}"), dir.path());
        tweak(&mut config);
        config.bootstrap = vec![hub.clone()];
        nodes.push(start(config));
    }
    let check_caps = |nodes: &[FileServer]| {
        for node in nodes {
            let peers = node.peers();
            let inbound = peers.iter().filter(|p| !p.outbound).count();
            assert!(inbound <= 6, "{} has {inbound} inbound peers, over the cap", node.name());
        }
    };
    wait_until(
        "every node in one connected mesh",
        || {
            check_caps(&nodes);
            components(&nodes)
        },
        |parts| *parts == 1,
    );
    let settled = started.elapsed();

    // A store reaches everyone, about once per node.
    let before: u64 = nodes.iter().map(|n| n.stats().bytes_received).sum();
    let size = 64 * 1024;
    let content = common::pseudo_random_bytes(size, 40);
    nodes[MESH_NODES / 2].store("spread", &content[..]).expect("store");
    wait_until(
        "the file on every node",
        || {
            check_caps(&nodes);
            nodes.iter().filter(|n| !common::keys(n).contains(&"spread".to_string())).count()
        },
        |missing| *missing == 0,
    );
    let after: u64 = nodes.iter().map(|n| n.stats().bytes_received).sum();
    let copies = (after - before) as f64 / size as f64;
    assert_eq!(components(&nodes), 1, "the mesh stays connected");
    check_caps(&nodes);

    let mut peers: Vec<usize> = nodes.iter().map(|n| n.peers().len()).collect();
    peers.sort_unstable();
    let threads = threads_per_node(&nodes);
    println!(
        "figures: {MESH_NODES} nodes settled in {settled:?}; connections per node min {} median {} max {}; \
         threads per node min {} median {} max {}; copies of one store {copies:.1} (N-1 = {})",
        peers[0],
        peers[peers.len() / 2],
        peers[peers.len() - 1],
        threads.first().copied().unwrap_or(0),
        threads.get(threads.len() / 2).copied().unwrap_or(0),
        threads.last().copied().unwrap_or(0),
        MESH_NODES - 1,
    );
    assert!(copies <= 1.5 * (MESH_NODES - 1) as f64, "{copies:.1} copies of one store");
}

/// How many connected components the peer graph has.
fn components(nodes: &[FileServer]) -> usize {
    let ids: HashMap<NodeId, usize> =
        nodes.iter().enumerate().map(|(i, n)| (n.node_id(), i)).collect();
    let edges: Vec<Vec<usize>> = nodes
        .iter()
        .map(|n| n.peers().iter().filter_map(|p| ids.get(&p.id).copied()).collect())
        .collect();
    let mut seen = vec![false; nodes.len()];
    let mut parts = 0;
    for root in 0..nodes.len() {
        if seen[root] {
            continue;
        }
        parts += 1;
        seen[root] = true;
        let mut queue = VecDeque::from([root]);
        while let Some(at) = queue.pop_front() {
            // Links as either end sees them: one end may know a moment first.
            let out = edges[at].iter().copied();
            let back = (0..nodes.len()).filter(|&i| edges[i].contains(&at));
            for next in out.chain(back).collect::<Vec<_>>() {
                if !seen[next] {
                    seen[next] = true;
                    queue.push_back(next);
                }
            }
        }
    }
    parts
}

/// Each node's thread count, sorted, from the names the node gives its
/// threads ("m12 TL read"; the kernel keeps 15 bytes of a name). Linux
/// only; elsewhere, empty.
fn threads_per_node(nodes: &[FileServer]) -> Vec<usize> {
    let mut counts: BTreeMap<String, usize> =
        nodes.iter().map(|n| (format!("{} ", n.name()), 0)).collect();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if let Some(count) = comm.split(' ').next().and_then(|n| counts.get_mut(&format!("{n} "))) {
            *count += 1;
        }
    }
    let mut counts: Vec<usize> = counts.into_values().collect();
    counts.sort_unstable();
    counts
}

// ---------------------------------------------------------------------------
// Redial: backoff, its cap, the log-once rule, forgetting
// ---------------------------------------------------------------------------

/// A fake node that declines every peer: handshake, an empty `Peers`,
/// `Busy`, close. Records when each dial came.
struct Decliner {
    addr: SocketAddr,
    dials: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
}

impl Decliner {
    fn start() -> Decliner {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let dials = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, stopping) = (Arc::clone(&dials), Arc::clone(&stop));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                log.lock().expect("lock").push(Instant::now());
                let me = Identity {
                    role: Role::Peer,
                    node: fake_id(),
                    name: "decliner".into(),
                    listen_addr: String::new(),
                    secret: None,
                };
                if handshake(&stream, &me, false).is_err() {
                    continue;
                }
                let _ = write_frame(&mut &stream, &Frame::Peers { addrs: Vec::new() });
                let busy = Frame::Error { code: ErrorCode::Busy, message: "full".into() };
                let _ = write_frame(&mut &stream, &busy);
                let _ = stream.shutdown(std::net::Shutdown::Write);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = std::io::copy(&mut &stream, &mut std::io::sink());
            }
        });
        Decliner { addr, dials, stop }
    }

    fn dials(&self) -> Vec<Instant> {
        self.dials.lock().expect("lock").clone()
    }
}

impl Drop for Decliner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

#[test]
fn a_declined_dialler_backs_off_and_the_backoff_stops_at_its_cap() {
    let dir = TempDir::new("mesh-backoff");
    let decliner = Decliner::start();
    let cap = Duration::from_millis(400);
    let mut node_config = config("b1", dir.path());
    node_config.bootstrap = vec![decliner.addr.to_string()];
    node_config.dial_retry_max = cap;
    let node = start(node_config);

    let dials = wait_until("eight dials of the decliner", || decliner.dials(), |d| d.len() >= 8);
    let gaps: Vec<Duration> = dials.windows(2).map(|w| w[1] - w[0]).collect();
    // Each decline doubles the wait (100, 200, 400 ms), never past the cap.
    let floor = [100, 200, 400, 400, 400, 400, 400].map(Duration::from_millis);
    for (gap, least) in gaps.iter().zip(floor) {
        assert!(*gap >= least.mul_f64(0.9), "a redial came too soon: gaps {gaps:?}");
        assert!(
            *gap <= cap + Duration::from_millis(600),
            "the backoff passed its cap: gaps {gaps:?}"
        );
    }
    drop(node);
}

#[test]
fn discovery_does_not_redial_a_node_that_declined_it_at_every_mention() {
    let dir = TempDir::new("mesh-held-off");
    let (decliner, sentinel) = (Decliner::start(), Decliner::start());
    let node = start(config("h1", dir.path()));
    let mut fake = handshaken_peer(&node, fake_id());
    let mention = |fake: &mut TcpStream, addr: SocketAddr| {
        write_frame(fake, &Frame::Peers { addrs: vec![addr.to_string()] }).expect("send Peers");
    };
    mention(&mut fake, decliner.addr);
    wait_until("the first dial", || decliner.dials().len(), |n| *n == 1);
    // A peer keeps naming it, a hundred times over half a second.
    let mut sent = 0;
    wait_until(
        "a hundred mentions",
        || {
            mention(&mut fake, decliner.addr);
            sent += 1;
            sent
        },
        |n| *n >= 100,
    );
    // Frames are handled in order: once the sentinel is dialled, every
    // mention before it has been weighed.
    mention(&mut fake, sentinel.addr);
    wait_until("the sentinel's dial", || sentinel.dials().len(), |n| *n == 1);
    let dials = decliner.dials().len();
    assert!(dials <= 2, "the node dialled a node that declined it {dials} times");
}

#[test]
fn an_address_going_down_and_coming_back_is_logged_once_each() {
    capture_logs();
    let dir = TempDir::new("mesh-log-once");
    let down = dead_addr();
    let label = format!("addr={down}");
    let mut node_config = config("lg1", dir.path());
    node_config.bootstrap = vec![down.to_string()];
    // Redials every 100 ms (the backoff's first step is its cap).
    node_config.dial_retry_max = Duration::from_millis(100);
    let node = start(node_config);

    wait_until(
        "six failed redials",
        || logged("lg1", log::Level::Debug, &[&label, "still unreachable"]),
        |n| *n >= 6,
    );
    assert_eq!(
        logged("lg1", log::Level::Info, &[&label, "is unreachable"]),
        1,
        "down is said once"
    );

    // It comes back: a node on that port.
    let listener = TcpListener::bind(down).expect("rebind the port");
    let mut back_config = config("lg2", dir.path());
    back_config.max_inbound_peers = 4;
    let back = FileServer::start_on(listener, back_config).expect("start");
    wait_until("the redial to connect", || node.peers().len(), |n| *n == 1);
    assert_eq!(logged("lg1", log::Level::Info, &[&label, "reachable again"]), 1);
    assert_eq!(
        logged("lg1", log::Level::Info, &[&label, "is unreachable"]),
        1,
        "and down only once"
    );
    drop((node, back));
}

#[test]
fn a_known_address_unreachable_for_long_is_forgotten() {
    capture_logs();
    let dir = TempDir::new("mesh-forget");
    let mut node_config = config("lg3", dir.path());
    node_config.dial_retry_max = Duration::from_millis(200);
    node_config.forget_unreachable_after = Duration::from_millis(800);
    // A first run, so the root exists; then a peer that left for good.
    start(node_config.clone()).shutdown();
    let dead = dead_addr();
    let peers_file = node_config.root.join("peers");
    std::fs::write(&peers_file, format!("{dead}\n")).expect("write ROOT/peers");

    let node = start(node_config);
    // While it is remembered, a get cannot tell "nobody has it".
    assert!(matches!(node.get("nothing"), Err(Error::Unavailable(_))));
    let label = format!("addr={dead}");
    wait_until(
        "the dead address to be forgotten",
        || std::fs::read_to_string(&peers_file).unwrap_or_default(),
        |text| !text.contains(&dead.to_string()),
    );
    assert_eq!(logged("lg3", log::Level::Info, &["Forgetting", &label]), 1);
    assert_eq!(logged("lg3", log::Level::Info, &[&label, "is unreachable"]), 1);
    // Forgotten from memory too: the node no longer expects peers.
    assert!(matches!(node.get("nothing"), Err(Error::NotFound(_))));
}

// ---------------------------------------------------------------------------
// Shutdown while connections arrive
// ---------------------------------------------------------------------------

/// How many nodes the shutdown race stops, and how many of them race at once.
const SHUTDOWN_ROUNDS: usize = 12;
const SHUTDOWN_ROUNDS_AT_ONCE: usize = 6;

#[test]
fn a_node_stopping_while_connections_arrive_closes_them_all_and_returns() {
    let dir = TempDir::new("mesh-shutdown-race");
    // Each round stops a node of its own, so rounds run side by side. Most
    // of a round is idle: shutdown wakes the accept loop with a connection
    // of its own, which a backlog full of the hammers' connections can hold
    // up for that connection's whole 1 s timeout.
    let rounds: Vec<usize> = (0..SHUTDOWN_ROUNDS).collect();
    for wave in rounds.chunks(SHUTDOWN_ROUNDS_AT_ONCE) {
        std::thread::scope(|scope| {
            for &round in wave {
                let dir = &dir;
                scope.spawn(move || shutdown_race_round(dir, round));
            }
        });
    }
}

/// One round of the shutdown race: a node stopped while four threads keep
/// connecting to it.
fn shutdown_race_round(dir: &TempDir, round: usize) {
    let node = start(config(&format!("r{round}"), dir.path()));
    let addr = node.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let opened: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    // Silent connections: a leaked one would wait out the handshake.
    let hammers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, opened) = (Arc::clone(&stop), Arc::clone(&opened));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match TcpStream::connect(addr) {
                        Ok(stream) => opened.lock().expect("lock").push(stream),
                        Err(_) => return, // the listener is gone
                    }
                }
            })
        })
        .collect();
    wait_until("connections arriving", || opened.lock().expect("lock").len(), |n| *n >= 20);

    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        node.shutdown();
        let _ = done_tx.send(());
    });
    // Well under the handshake's 5 s: no thread waits on a connection
    // nobody closed.
    let stopped = done_rx.recv_timeout(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    for hammer in hammers {
        hammer.join().expect("a hammer");
    }
    assert!(stopped.is_ok(), "round {round}: shutdown did not return");
    // Every connection the node accepted is closed: each reads to its end.
    let streams = std::mem::take(&mut *opened.lock().expect("lock"));
    let mut open = HashSet::new();
    for (i, mut stream) in streams.into_iter().enumerate() {
        stream.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        // A byte first: a connection the kernel set up just as the
        // listener closed has no socket on the node's side, and only
        // hears the reset when it sends. One the node still held
        // would take the byte and stay silent.
        let _ = std::io::Write::write_all(&mut stream, &[0]);
        let mut buf = [0u8; 256];
        let closed = loop {
            match stream.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break false,
                Err(_) => break true,
            }
        };
        if !closed {
            open.insert(i);
        }
    }
    assert!(open.is_empty(), "round {round}: connections left open: {open:?}");
}
