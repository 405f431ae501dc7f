//! Liveness, with threaded nodes on loopback and a fault proxy between
//! some of them: a hung peer is declared dead by its silence, a `get` says
//! "could not ask" rather than "not found", links come back after a
//! partition, a stream whose sender vanishes is fetched from another
//! holder, and a restarted node rejoins through a peer it remembers.
//!
//! These nodes beat every 100 ms and declare a peer dead after 600 ms of
//! silence (six missed beats), so the tests wait a second or so, not the
//! defaults' tens. No test
//! asserts a duration: the error kinds tell which mechanism answered (a
//! closed connection gives `Unavailable`, the 10 s get timeout `Timeout`).

mod common;

use std::time::{Duration, Instant};

use common::{
    FaultProxy, TempDir, config, init_logging, pseudo_random_bytes, read, start, wait_until,
};
use gossipfs::{Config, Error, FileServer};

fn lively(config: &mut Config) {
    config.heartbeat_interval = Duration::from_millis(100);
    config.heartbeat_timeout = Duration::from_millis(600);
    config.discover_peers = false;
}

fn node(dir: &TempDir, name: &str, peers: &[std::net::SocketAddr]) -> FileServer {
    let mut config = config(name, dir.path());
    lively(&mut config);
    config.bootstrap = peers.iter().map(ToString::to_string).collect();
    start(config)
}

fn free_listener() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port")
}

fn holds(node: &FileServer, key: &str) -> bool {
    node.list().iter().any(|f| f.key == key)
}

fn peer_names(node: &FileServer) -> Vec<String> {
    node.peers().into_iter().map(|p| p.name).collect()
}

/// n1 asks for a key nobody has. n2 says so at once; the other peer is
/// hung. The heartbeat declares it dead, and the get ends "unavailable"
/// (it could not be asked), not "not found" and not by its own 10 s
/// timeout. Without the hung peer, the same get is "not found".
#[test]
fn a_hung_peer_is_declared_dead_and_a_get_says_it_could_not_ask() {
    init_logging();
    let dir = TempDir::new("live-hung");
    let n2 = node(&dir, "lh-n2", &[]);
    let n1 = node(&dir, "lh-n1", &[n2.local_addr()]);
    wait_until("n1 to reach n2", || peer_names(&n1), |p| p == &["lh-n2"]);
    // A peer that completes its handshake, then never says or reads a byte.
    let hung = common::handshaken_peer(&n1, common::fake_id());
    wait_until("n1 to register the hung peer", || peer_names(&n1), |p| p.len() == 2);

    let started = Instant::now();
    let answer = n1.get("nobody-has-this").map(|_| ());
    println!("missing-key get with one hung peer answered in {:?}", started.elapsed());
    assert!(matches!(answer, Err(Error::Unavailable(_))), "{answer:?}");
    wait_until("n1 to drop the hung peer", || peer_names(&n1), |p| p == &["lh-n2"]);
    let answer = n1.get("nobody-has-this").map(|_| ());
    assert!(matches!(answer, Err(Error::NotFound(_))), "{answer:?}");
    drop(hung);
}

/// A partition longer than the heartbeat timeout: both sides declare the
/// other dead, each keeps writing, and after the heal the link comes back
/// by itself and anti-entropy brings both sides together.
#[test]
fn after_a_partition_the_link_comes_back_and_both_sides_converge() {
    init_logging();
    let dir = TempDir::new("live-partition");
    // Each node is reached only through its own proxy (it advertises the
    // proxy's address), so pausing both cuts every path between them.
    let (n1_listener, n2_listener) = (free_listener(), free_listener());
    let to_n1 = FaultProxy::start(n1_listener.local_addr().unwrap());
    let to_n2 = FaultProxy::start(n2_listener.local_addr().unwrap());
    let behind = |name: &str, proxy: &FaultProxy, peers: &[std::net::SocketAddr]| {
        let mut c = config(name, dir.path());
        lively(&mut c);
        c.advertise = Some(proxy.addr().to_string());
        c.bootstrap = peers.iter().map(ToString::to_string).collect();
        c
    };
    let n1 = FileServer::start_on(n1_listener, behind("lp-n1", &to_n1, &[])).unwrap();
    let n2 = FileServer::start_on(n2_listener, behind("lp-n2", &to_n2, &[to_n1.addr()])).unwrap();
    wait_until("the link", || (n1.peers().len(), n2.peers().len()), |c| *c == (1, 1));
    let partition = |on: bool| {
        for proxy in [&to_n1, &to_n2] {
            if on { proxy.partition() } else { proxy.heal() }
        }
    };

    partition(true);
    wait_until(
        "both to declare the other dead",
        || (n1.peers().len(), n2.peers().len()),
        |c| *c == (0, 0),
    );
    n1.store("from-n1", &b"written during the partition"[..]).unwrap();
    n2.store("from-n2", &b"written on the other side"[..]).unwrap();

    partition(false);
    let healed = Instant::now();
    for node in [&n1, &n2] {
        wait_until(
            &format!("{} to hold both files", node.name()),
            || (holds(node, "from-n1"), holds(node, "from-n2")),
            |held| *held == (true, true),
        );
    }
    println!("converged {:?} after the heal", healed.elapsed());
    assert_eq!(read(&n2, "from-n1").unwrap(), b"written during the partition");
    assert_eq!(read(&n1, "from-n2").unwrap(), b"written on the other side");
}

/// n3 lacks a file that n1 and n2 hold and asks for it. n1's answer comes
/// first and starts streaming, then n1 vanishes mid-stream (its proxy stops
/// forwarding after a megabyte). The stalled stream fails by the heartbeat
/// timeout and the get takes n2's copy: it returns the whole file.
#[test]
fn a_sender_vanishing_mid_stream_is_replaced_by_another_holder() {
    init_logging();
    let dir = TempDir::new("live-vanish");
    let n1 = node(&dir, "lv-n1", &[]);
    let n2 = node(&dir, "lv-n2", &[n1.local_addr()]);
    wait_until("n1 and n2 to connect", || n2.peers().len(), |n| *n == 1);
    let content = pseudo_random_bytes(8 << 20, 21);
    n1.store("big", &content[..]).unwrap();
    wait_until("n2 to hold the file", || holds(&n2, "big"), |held| *held);

    let via_n1 = FaultProxy::start(n1.local_addr());
    let via_n2 = FaultProxy::start(n2.local_addr());
    let n3 = start({
        let mut c = config("lv-n3", dir.path());
        lively(&mut c);
        c.anti_entropy = false; // n3 must lack the file until it asks
        c.bootstrap = vec![via_n1.addr().to_string(), via_n2.addr().to_string()];
        c
    });
    wait_until("n3 to reach both", || n3.peers().len(), |n| *n == 2);
    assert!(!holds(&n3, "big"));

    // n2's answer is held back until n1's stream has begun; n1 sends one
    // megabyte more, then goes silent without closing.
    via_n2.partition();
    via_n1.partition_after(1 << 20);
    let asker = std::thread::scope(|scope| {
        let get = scope.spawn(|| read(&n3, "big"));
        wait_until("n1's copy to start streaming", || n3.stats().bytes_received, |b| *b > 0);
        via_n2.heal();
        get.join().expect("the get thread")
    });
    assert_eq!(asker.expect("the get succeeds from n2"), content);
}

/// n3 joined through n1 and, by discovery, met n2. It is stopped; so is
/// n1, its only bootstrap peer. Restarted, n3 rejoins through n2, which it
/// remembers, and catches up with what n2 stored meanwhile.
#[test]
fn a_restarted_node_rejoins_through_a_remembered_peer_when_its_bootstrap_is_down() {
    init_logging();
    let dir = TempDir::new("live-rejoin");
    let discovering = |name: &str, peers: &[std::net::SocketAddr]| {
        let mut c = config(name, dir.path());
        lively(&mut c);
        c.discover_peers = true;
        c.bootstrap = peers.iter().map(ToString::to_string).collect();
        c
    };
    let n1 = start(discovering("lr-n1", &[]));
    let n2 = start(discovering("lr-n2", &[n1.local_addr()]));
    let n3_config = discovering("lr-n3", &[n1.local_addr()]);
    let n3 = start(n3_config.clone());
    wait_until("n3 to meet n2 through discovery", || peer_names(&n3), |p| p.len() == 2);
    drop(n3);
    drop(n1);

    n2.store("while-you-were-out", &b"news"[..]).unwrap();
    let n3 = start(n3_config);
    wait_until("n3 to rejoin through n2", || peer_names(&n3), |p| p == &["lr-n2"]);
    wait_until("n3 to catch up", || holds(&n3, "while-you-were-out"), |held| *held);
    assert_eq!(read(&n3, "while-you-were-out").unwrap(), b"news");
}
