//! Convergence: threaded nodes on loopback, changed in every order the tests
//! can provoke, must end holding the same files at the same versions.
//!
//! Where a test counts frames or changes, it turns discovery off (so the
//! topology is exactly the bootstrap lists) and anti-entropy down to once an
//! hour (so every count is gossip's alone).

mod common;

use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::*;
use gossipfs::frame::{self, Frame, MAGIC, PROTOCOL_VERSION, Role};
use gossipfs::{Config, Error, FileInfo, FileServer, Stats, Version};

/// Discovery off and anti-entropy as good as off: only gossip moves changes.
fn gossip_only(config: &mut Config) {
    config.discover_peers = false;
    config.anti_entropy_interval = Duration::from_secs(3600);
    // No heartbeats either: these tests count every frame a change costs.
    config.heartbeat_interval = Duration::from_secs(3600);
    config.heartbeat_timeout = Duration::from_secs(3 * 3600);
}

/// Starts `n` nodes named n1..nN; for each edge `(a, b)`, node `a` has node
/// `b` as a bootstrap peer. Every listener is bound before any node starts,
/// so any node can name any other.
fn cluster(
    dir: &TempDir,
    n: usize,
    edges: &[(usize, usize)],
    tweak: impl Fn(&mut Config),
) -> Vec<FileServer> {
    let listeners: Vec<TcpListener> =
        (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port")).collect();
    let addrs: Vec<String> =
        listeners.iter().map(|l| l.local_addr().expect("a bound address").to_string()).collect();
    let nodes = listeners.into_iter().enumerate().map(|(i, listener)| {
        let mut config = config(&format!("n{}", i + 1), dir.path());
        let dials = edges.iter().filter(|(a, _)| *a == i);
        config.bootstrap = dials.map(|(_, b)| addrs[*b].clone()).collect();
        tweak(&mut config);
        FileServer::start_on(listener, config).expect("start a node")
    });
    nodes.collect()
}

/// The edges of a ring of `n`.
fn ring(n: usize) -> Vec<(usize, usize)> {
    (0..n).map(|i| (i, (i + 1) % n)).collect()
}

/// The edges of a full mesh of `n`.
fn mesh(n: usize) -> Vec<(usize, usize)> {
    (0..n).flat_map(|i| (0..i).map(move |j| (i, j))).collect()
}

/// How many peers each node has in a topology.
fn degrees(n: usize, edges: &[(usize, usize)]) -> Vec<usize> {
    let mut degrees = vec![0; n];
    for &(a, b) in edges {
        degrees[a] += 1;
        degrees[b] += 1;
    }
    degrees
}

/// Waits until every node lists the same files at the same versions, and
/// returns that list.
fn wait_for_same_lists(nodes: &[FileServer], what: &str) -> Vec<FileInfo> {
    let lists = wait_until(
        what,
        || nodes.iter().map(FileServer::list).collect::<Vec<_>>(),
        |lists| lists.windows(2).all(|pair| pair[0] == pair[1]),
    );
    lists.into_iter().next().unwrap_or_default()
}

/// How many polls in a row must see the same frame counts for a cluster to
/// be called quiet.
const QUIET_POLLS: usize = 20;

/// Waits until no frame is in flight: every frame sent has been received
/// and handled, and the counts have stood still for [`QUIET_POLLS`] polls
/// and as long as that many full [`POLL_INTERVAL`]s (a handled frame's
/// relay is queued just after the frame is counted). Returns the nodes'
/// stats.
fn wait_for_quiet(nodes: &[FileServer]) -> Vec<Stats> {
    let mut last = None;
    let mut calm = 0;
    let mut still_since = Instant::now();
    let (_, _, stats) = wait_until(
        "no frame in flight",
        || {
            let stats: Vec<Stats> = nodes.iter().map(FileServer::stats).collect();
            let sent = total(&stats, |s| s.frames_sent);
            let received = total(&stats, |s| s.frames_received);
            let steady = sent == received && last == Some(sent);
            calm = if steady { calm + 1 } else { 0 };
            if !steady {
                still_since = Instant::now();
            }
            last = Some(sent);
            (calm, still_since.elapsed(), stats)
        },
        |(calm, still, _)| *calm >= QUIET_POLLS && *still >= POLL_INTERVAL * QUIET_POLLS as u32,
    );
    stats
}

fn total(stats: &[Stats], field: impl Fn(&Stats) -> u64) -> u64 {
    stats.iter().map(field).sum()
}

fn content(key: &str) -> Vec<u8> {
    format!("the content of {key}").into_bytes()
}

#[test]
fn a_change_crosses_a_chain_of_five_both_ways() {
    init_logging();
    let dir = TempDir::new("chain-of-five");
    let nodes = chain(&dir, 5, gossip_only);
    wait_for_peers(&nodes, &[1, 2, 2, 2, 1]);
    wait_for_quiet(&nodes);

    nodes[0].store("k", &content("k")[..]).unwrap();
    wait_until(
        "k on all five",
        || nodes.iter().map(keys).collect::<Vec<_>>(),
        |keys| keys.iter().all(|k| k == &["k"]),
    );
    for node in &nodes {
        assert_eq!(read(node, "k").unwrap(), content("k"), "{}", node.name());
    }

    nodes[4].delete("k").unwrap();
    wait_until(
        "k gone from all five",
        || nodes.iter().map(keys).collect::<Vec<_>>(),
        |keys| keys.iter().all(Vec::is_empty),
    );
    // Each node but the origin applied each change once; still a chain.
    let stats = wait_for_quiet(&nodes);
    let applied: Vec<u64> = stats.iter().map(|s| s.changes_applied).collect();
    assert_eq!(applied, [1, 2, 2, 2, 1]);
    wait_for_peers(&nodes, &[1, 2, 2, 2, 1]);
}

/// Makes a few changes in a topology, one at a time, each from a different
/// node and each allowed to settle, and checks that every node applied each
/// change made elsewhere exactly once, with a bounded number of duplicates.
/// Returns the frames one small store cost.
fn each_change_applied_once(name: &str, n: usize, edges: &[(usize, usize)]) -> u64 {
    init_logging();
    let dir = TempDir::new(name);
    let nodes = cluster(&dir, n, edges, gossip_only);
    wait_for_peers(&nodes, &degrees(n, edges));
    let before = wait_for_quiet(&nodes);
    assert_eq!(total(&before, |s| s.changes_applied), 0);

    // One small store, measured alone.
    nodes[0].store("a", &b"small"[..]).unwrap();
    wait_for_same_lists(&nodes, "a everywhere");
    let after = wait_for_quiet(&nodes);
    let frames = total(&after, |s| s.frames_sent) - total(&before, |s| s.frames_sent);
    let duplicates = total(&after, |s| s.duplicates_dropped);
    println!("{name}: one small store cost {frames} frames and {duplicates} duplicates");

    // Then a change of every kind, from every node in turn (n >= 5).
    let mut made = vec![0u64; n];
    made[0] += 1;
    let mut change = |origin: usize, what: &dyn Fn(&FileServer)| {
        what(&nodes[origin]);
        made[origin] += 1;
        let count: u64 = made.iter().sum();
        wait_for_same_lists(&nodes, &format!("change {count} from n{}", origin + 1));
        wait_for_quiet(&nodes);
    };
    change(1, &|node| node.store("b", &b"bee"[..]).unwrap());
    change(2, &|node| node.store("a", &b"overwritten"[..]).unwrap());
    change(3, &|node| node.delete("b").unwrap());
    change(4, &|node| node.clear().unwrap());
    change(0, &|node| node.store("c", &b"after the clear"[..]).unwrap());
    let changes: u64 = made.iter().sum();

    let stats = wait_for_quiet(&nodes);
    assert_eq!(keys(&nodes[n - 1]), ["c"]);
    for (i, s) in stats.iter().enumerate() {
        assert_eq!(s.changes_applied, changes - made[i], "n{}: {s:?}", i + 1);
        assert_eq!(s.stale_dropped, 0, "n{}: {s:?}", i + 1);
    }
    // No echo storm. A change goes out once on each of the origin's links
    // and is relayed (a push, an announcement, a delete) at most once on
    // each other node's links but the one it came in on: at most 2E - (n-1)
    // frames for n-1 applies. A store adds at most one fetch per node that
    // was not pushed to: a Get and its File, 2(n-1) frames at most.
    let relay_bound = 2 * edges.len() as u64 - (n as u64 - 1);
    let copies_bound = relay_bound + 2 * (n as u64 - 1);
    let duplicates = total(&stats, |s| s.duplicates_dropped);
    println!("{name}: {changes} changes, {duplicates} duplicates dropped in all");
    assert!(frames <= copies_bound, "{frames} frames for one store");
    assert!(
        duplicates <= changes * (relay_bound - (n as u64 - 1)),
        "{duplicates} duplicates for {changes} changes over {} edges",
        edges.len()
    );
    frames
}

#[test]
fn a_ring_of_five_applies_each_change_once_per_node() {
    let frames = each_change_applied_once("ring-of-five", 5, &ring(5));
    println!("ring of 5: {frames} frames for one small store");
}

#[test]
fn a_mesh_of_five_applies_each_change_once_per_node() {
    let frames = each_change_applied_once("mesh-of-five", 5, &mesh(5));
    println!("mesh of 5: {frames} frames for one small store");
}

#[test]
fn a_restarted_node_catches_up_on_what_it_missed() {
    init_logging();
    let dir = TempDir::new("restart");
    let mut nodes = chain(&dir, 3, |_| {});
    wait_for_peers(&nodes, &[2, 2, 2]); // discovery closes the triangle
    for i in 0..10 {
        let key = format!("old-{i}");
        nodes[i % 3].store(&key, &content(&key)[..]).unwrap();
    }
    wait_for_same_lists(&nodes, "the old files everywhere");

    let n3 = nodes.pop().expect("three nodes");
    let id = n3.node_id();
    n3.shutdown();
    wait_for_peers(&nodes, &[1, 1]);
    // While n3 is down: 20 stores, and 5 deletes of files it holds.
    for i in 0..20 {
        let key = format!("new-{i}");
        nodes[i % 2].store(&key, &content(&key)[..]).unwrap();
    }
    for i in 0..5 {
        nodes[i % 2].delete(&format!("old-{i}")).unwrap();
    }
    let expected = wait_for_same_lists(&nodes, "n1 and n2 to agree");
    assert_eq!(expected.len(), 25);

    // Back on the same root directory, under a new port.
    let mut config = config("n3", dir.path());
    config.bootstrap = vec![nodes[0].local_addr().to_string()];
    nodes.push(start(config));
    assert_eq!(nodes[2].node_id(), id, "the node id survives a restart");
    wait_until(
        "n3 to hold exactly what the others hold",
        || nodes[2].list(),
        |list| list == &expected,
    );
    assert_eq!(read(&nodes[2], "new-7").unwrap(), content("new-7"));

    // Its clock moved past everything it caught up on: its own overwrite
    // of a file made while it was down wins everywhere.
    nodes[2].store("new-19", &b"from n3"[..]).unwrap();
    let list = wait_for_same_lists(&nodes, "n3's overwrite everywhere");
    let overwritten = list.iter().find(|f| f.key == "new-19").expect("new-19");
    assert_eq!(overwritten.version.node, id);
    for node in &nodes {
        assert_eq!(read(node, "new-19").unwrap(), b"from n3", "{}", node.name());
    }
}

#[test]
fn a_store_and_a_delete_of_one_key_from_two_nodes_converge() {
    init_logging();
    let dir = TempDir::new("store-delete-race");
    let nodes = chain(&dir, 4, gossip_only);
    wait_for_peers(&nodes, &[1, 2, 2, 1]);
    wait_for_quiet(&nodes);
    let (ends, barrier) = ([0, 3], Barrier::new(2));
    let mut survivors = 0;
    for round in 0..10 {
        let key = format!("k{round}");
        nodes[0].store(&key, &content(&key)[..]).unwrap();
        wait_for_same_lists(&nodes, &format!("{key} everywhere"));
        // The two ends of the chain, at the same moment: one stores, the
        // other deletes. The roles swap every round.
        let (storer, deleter) = (ends[round % 2], ends[1 - round % 2]);
        let stored = std::thread::scope(|s| {
            let storing = s.spawn(|| {
                barrier.wait();
                nodes[storer].store(&key, &b"racing"[..])
            });
            s.spawn(|| {
                barrier.wait();
                nodes[deleter].delete(&key).unwrap();
            });
            storing.join().unwrap()
        });
        // The delete may land on the storer between the store taking its
        // version and committing it: if its version is newer, the store
        // changed nothing and says so.
        match &stored {
            Ok(()) | Err(Error::Superseded(_)) => {}
            Err(err) => panic!("round {round}: the store failed: {err}"),
        }
        let list = wait_for_same_lists(&nodes, &format!("every node to agree on {key}"));
        if let Some(file) = list.iter().find(|f| f.key == key) {
            assert!(stored.is_ok(), "round {round}: a superseded store survived");
            assert_eq!(file.version.node, nodes[storer].node_id());
            assert_eq!(read(&nodes[deleter], &key).unwrap(), b"racing");
            survivors += 1;
        }
    }
    // And they still agree once every frame has landed.
    wait_for_quiet(&nodes);
    let lists: Vec<Vec<FileInfo>> = nodes.iter().map(FileServer::list).collect();
    assert!(lists.windows(2).all(|pair| pair[0] == pair[1]), "{lists:#?}");
    println!("store-delete race: the store won {survivors} of 10 rounds");
}

#[test]
fn a_clear_removes_everything_older_and_spares_later_stores() {
    init_logging();
    let dir = TempDir::new("clear");
    let nodes = chain(&dir, 4, gossip_only);
    wait_for_peers(&nodes, &[1, 2, 2, 1]);
    wait_for_quiet(&nodes);
    for i in 0..12 {
        let key = format!("old-{i}");
        nodes[i % 4].store(&key, &content(&key)[..]).unwrap();
    }
    wait_for_same_lists(&nodes, "the old files everywhere");

    nodes[1].clear().unwrap();
    // A store at the far end right away, racing the clear down the chain.
    // It is later in real time, so it wins unless both fall in the same
    // millisecond, where the clocks' logical counters and then the node
    // ids decide; whichever wins, everyone must agree. If the clear lands
    // on n4 between the store taking its version and committing it, and
    // its version is newer, the store changed nothing and says so.
    let raced = nodes[3].store("racer", &b"racing the clear"[..]);
    assert!(matches!(raced, Ok(()) | Err(Error::Superseded(_))), "{raced:?}");
    // Stores made after the clear: on the node that cleared, and on the
    // far end once the clear has reached it.
    nodes[1].store("after-1", &content("after-1")[..]).unwrap();
    wait_until(
        "the clear to reach n4",
        || keys(&nodes[3]),
        |keys| !keys.iter().any(|k| k.starts_with("old-")),
    );
    nodes[3].store("after-2", &content("after-2")[..]).unwrap();

    let list = wait_for_same_lists(&nodes, "every node to agree after the clear");
    let mut survivors: Vec<&str> = list.iter().map(|f| f.key.as_str()).collect();
    let racer_won = survivors.contains(&"racer");
    assert!(raced.is_ok() || !racer_won, "a superseded store survived");
    survivors.retain(|k| *k != "racer");
    assert_eq!(survivors, ["after-1", "after-2"]);
    for node in &nodes {
        assert_eq!(read(node, "after-2").unwrap(), content("after-2"));
    }
    wait_for_quiet(&nodes);
    assert_eq!(wait_for_same_lists(&nodes, "the same lists, quiet"), list);
    println!("clear: the racing store survived: {racer_won}");
}

#[test]
fn two_nodes_that_dial_each_other_keep_one_connection() {
    init_logging();
    let dir = TempDir::new("mutual-bootstrap");
    let nodes = cluster(&dir, 2, &[(0, 1), (1, 0)], |_| {});
    wait_for_peers(&nodes, &[1, 1]);
    // Stays one: poll a hundred more times, failing on any other count.
    let mut polls = 0;
    wait_until(
        "one connection, a hundred polls in a row",
        || {
            let counts: Vec<usize> = nodes.iter().map(|n| n.peers().len()).collect();
            assert_eq!(counts, [1, 1], "after {polls} polls");
            polls += 1;
            polls
        },
        |polls| *polls >= 100,
    );
    // And it carries changes.
    nodes[1].store("k", &b"over the one connection"[..]).unwrap();
    wait_until("k on n1", || keys(&nodes[0]), |k| k == &["k"]);
}

/// Of two connections from one peer, the node closes the one it does not
/// keep only once the peer has said, by its `PushesFrom` on the kept one,
/// that it keeps the same: closed sooner, the peer could see it end before
/// it registers the kept one, and have no connection for a moment. Until
/// then the duplicate still serves what the peer sends on it.
#[test]
fn a_duplicate_connection_serves_until_the_peer_keeps_the_other() {
    init_logging();
    let dir = TempDir::new("duplicate-retires");
    let node = start(config("n1", dir.path()));
    let id = fake_id();
    let mut first = FakeConn::new(handshaken_peer(&node, id));
    first.until(|f| matches!(f, Frame::PushesFrom { .. }));
    // A second connection from the same node: which of the two the node
    // keeps depends on the random handshake nonces.
    let mut second = FakeConn::new(handshaken_peer(&node, id));
    // Both are served, each answering a get on its own: the node has
    // registered (or dropped) the second, and closed neither.
    for (fake, request) in [(&mut second, 1), (&mut first, 2)] {
        fake.send(&Frame::Get { request, key: "absent".into() });
        fake.until(|f| matches!(f, Frame::NotFound { request: r, .. } if *r == request));
    }
    assert_eq!(peer_ids(&node), [id]);
    // The peer keeps the same one, and says so on both.
    let promise = Frame::PushesFrom { version: Version { time: 1, node: id } };
    first.send(&promise);
    second.send(&promise);
    let closed = wait_until(
        "the duplicate to be closed",
        || [first.closed(), second.closed()],
        |closed| closed.iter().any(|c| *c),
    );
    let kept = if closed[0] { &mut second } else { &mut first };
    kept.send(&Frame::Get { request: 3, key: "absent".into() });
    kept.until(|f| matches!(f, Frame::NotFound { request: 3, .. }));
    assert_eq!(peer_ids(&node), [id]);
}

/// A peer that sends its first frames right behind its Hello (as a node
/// does once its own side of the handshake is done) must not lose them to
/// the buffer the handshake reads with.
#[test]
fn frames_right_behind_the_hello_are_not_lost() {
    init_logging();
    let dir = TempDir::new("behind-the-hello");
    let node = start({
        let mut config = config("n1", dir.path());
        config.discover_peers = false;
        config
    });
    let mut socket = TcpStream::connect(node.local_addr()).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).expect("set a read timeout");
    let get = |request| Frame::Get { request, key: "absent".into() };
    // Hello and a first Get in one write, before the node's Hello arrives.
    let mut first = Vec::new();
    let hello = Frame::Hello {
        magic: MAGIC,
        protocol: PROTOCOL_VERSION,
        role: Role::Peer,
        node: 0x5eed,
        name: "raw".into(),
        listen_addr: "127.0.0.1:9".into(),
        nonce: [7; 16],
        auth: false,
    };
    frame::write_frame(&mut first, &hello).unwrap();
    frame::write_frame(&mut first, &get(1)).unwrap();
    socket.write_all(&first).unwrap();
    let mut reader = BufReader::new(socket.try_clone().unwrap());
    let mut next = || match frame::read_frame(&mut reader).unwrap() {
        Some(frame) => frame,
        None => panic!("the node closed the connection"),
    };
    assert!(matches!(next(), Frame::Hello { .. }));
    // The node's greeting: its handshake is over, so a second Get, sent
    // now, reaches its reader loop whatever happened to the first.
    let mut answered = Vec::new();
    loop {
        match next() {
            Frame::Summary { .. } => break,
            Frame::NotFound { request, .. } => answered.push(request),
            _ => {}
        }
    }
    frame::write_frame(&mut socket, &get(2)).unwrap();
    // The node answers in order: "not found" for 1, then for 2.
    while !answered.contains(&2) {
        if let Frame::NotFound { request, .. } = next() {
            answered.push(request);
        }
    }
    assert_eq!(answered, [1, 2], "the Get behind the Hello was lost");
}
