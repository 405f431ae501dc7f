//! Relay under pressure: a small change is not held up behind a large
//! stream to a slow peer, and after a restart no node waits for a push
//! that its origin never promised. Anti-entropy is off in both, so relay
//! alone must deliver, and a stale wait could not be repaired behind its
//! back.

mod common;

use std::time::{Duration, Instant};

use common::{FaultProxy, TempDir, config, read, start, wait_for_peers, wait_until};
use gossipfs::{Config, FileServer};

fn quiet(config: &mut Config) {
    config.anti_entropy = false;
    config.discover_peers = false;
}

/// A quiet node named `name`, dialling `bootstrap`.
fn quiet_node(dir: &TempDir, name: &str, bootstrap: Vec<String>) -> FileServer {
    let mut c = config(name, dir.path());
    quiet(&mut c);
    c.bootstrap = bootstrap;
    start(c)
}

fn holds(node: &FileServer, key: &str) -> bool {
    node.list().iter().any(|f| f.key == key)
}

/// n1 pushes a 1 MiB file to n5 over a slow link (the proxy lets 1 MiB/s
/// through n1's side), and to n2 over a fast one. A small file stored on
/// n1 meanwhile has its push queued behind the big stream on the slow
/// link; n5 hears of it from n2 and fetches it from n2 at once, instead of
/// waiting for a push that would come after the big one. The big file
/// still crosses the slow link once.
#[test]
fn a_small_change_is_not_held_up_behind_a_large_stream_to_a_slow_peer() {
    common::init_logging();
    let dir = TempDir::new("busy-origin");
    let mut c1 = config("b-n1", dir.path());
    quiet(&mut c1);
    let n1 = start(c1);
    let mut c2 = config("b-n2", dir.path());
    quiet(&mut c2);
    c2.bootstrap = vec![n1.local_addr().to_string()];
    let n2 = start(c2);
    let slow = FaultProxy::start(n1.local_addr());
    // About a second for the big file: the small one reaches n5 through n2
    // in milliseconds, and would come after the big one by n1's push.
    slow.throttle(1 << 20);
    let mut c5 = config("b-n5", dir.path());
    quiet(&mut c5);
    c5.bootstrap = vec![slow.addr().to_string(), n2.local_addr().to_string()];
    let n5 = start(c5);
    let nodes = [n1, n2, n5];
    wait_for_peers(&nodes, &[2, 2, 2]);
    let [n1, n2, n5] = &nodes;

    let big = common::pseudo_random_bytes(1 << 20, 1);
    n1.store("big", &big[..]).unwrap();
    wait_until("n2 to hold the big file", || holds(n2, "big"), |held| *held);
    wait_until("the big file to stream to n5", || n5.stats().bytes_received, |n| *n > 0);
    let small = b"a small change".to_vec();
    n1.store("small", &small[..]).unwrap();
    wait_until("n5 to hold the small file", || holds(n5, "small"), |held| *held);
    assert!(!holds(n5, "big"), "the small file came while the big one still streamed");
    assert_eq!(read(n5, "small").unwrap(), small);

    wait_until("n5 to hold the big file", || holds(n5, "big"), |held| *held);
    assert_eq!(read(n5, "big").unwrap(), big);
    // n1's own push of the small file crosses the slow link too, after the
    // big one (and is discarded): the price of not waiting. The big one
    // crossed once.
    let all = (big.len() + 2 * small.len()) as u64;
    let received = wait_until("n1's queued push", || n5.stats().bytes_received, |n| *n >= all);
    assert_eq!(received, all, "the big file crossed once, the small one twice");
}

/// A node restarts and is written to at once, again and again: the first
/// write after each restart reaches every node by relay. The restarted
/// node's peers learn whether the origin pushes to them from the origin's
/// own promise (`PushesFrom`), so none of them waits for a push that was
/// never queued.
#[test]
fn a_write_right_after_a_restart_reaches_every_node_by_relay() {
    common::init_logging();
    let dir = TempDir::new("restart-relay");
    let node = |name: &str, bootstrap: Vec<String>| quiet_node(&dir, name, bootstrap);
    let n1 = node("r-n1", Vec::new());
    let n2 = node("r-n2", vec![n1.local_addr().to_string()]);
    let addrs = vec![n1.local_addr().to_string(), n2.local_addr().to_string()];
    // How long a write may take to cross: far more than loopback needs, far
    // less than a wait for a push that never comes (5 s before asking again).
    let within = Duration::from_secs(3);
    for trial in 0..20 {
        let n3 = node("r-n3", addrs.clone());
        // Written as soon as n3 and the relay n2 have each other, whether or
        // not the origin n1 has registered n3 yet: then n1 does not push to
        // n3, and n3 must not wait for it.
        wait_until("n3 to join", || (n2.peers().len(), n3.peers().len()), |p| *p == (2, 2));
        let key = format!("after-restart-{trial}");
        n1.store(&key, key.as_bytes()).unwrap();
        let since = Instant::now();
        while !(holds(&n2, &key) && holds(&n3, &key)) {
            assert!(since.elapsed() < within, "trial {trial}: {key} did not reach every node");
            std::thread::yield_now();
        }
        // Gone, and back on a fresh port.
        drop(n3);
        wait_until("n3 to leave", || (n1.peers().len(), n2.peers().len()), |p| *p == (1, 1));
    }
}

/// The origin's promise is held up on a slow link: n1 has registered n3
/// and pushes to it, but n3 has not heard n1's `PushesFrom` yet when n2
/// announces the write. A node that has no promise in hand fetches from
/// the announcer rather than wait for a push it cannot count on.
#[test]
fn a_node_without_the_origins_promise_fetches_rather_than_waits() {
    use gossipfs::frame::{Frame, MAGIC, PROTOCOL_VERSION, Role, write_frame};
    common::init_logging();
    let dir = TempDir::new("no-promise");
    let node = |name: &str, bootstrap: Vec<String>| quiet_node(&dir, name, bootstrap);
    let n1 = node("p-n1", Vec::new());
    let n2 = node("p-n2", vec![n1.local_addr().to_string()]);
    let link = FaultProxy::start(n1.local_addr());
    // n1's Hello gets through, then n1's side of the link stalls: the
    // handshake completes on both ends, n1's frames after it wait.
    let hello = Frame::Hello {
        magic: MAGIC,
        protocol: PROTOCOL_VERSION,
        role: Role::Peer,
        node: n1.node_id(),
        name: n1.name().to_string(),
        listen_addr: n1.local_addr().to_string(),
        nonce: [0; 16],
        auth: false,
    };
    let mut bytes = Vec::new();
    write_frame(&mut bytes, &hello).unwrap();
    link.partition_after(bytes.len() as u64);
    let n3 = node("p-n3", vec![link.addr().to_string(), n2.local_addr().to_string()]);
    let nodes = [n1, n2, n3];
    wait_for_peers(&nodes, &[2, 2, 2]);
    let [n1, n2, n3] = &nodes;

    n1.store("promised", &b"written while the promise is held up"[..]).unwrap();
    wait_until("n2 to hold it", || holds(n2, "promised"), |held| *held);
    // Far more than loopback needs, far less than the 5 s a wrong wait for
    // a push lasts before anyone asks again.
    let since = Instant::now();
    while !holds(n3, "promised") {
        assert!(
            since.elapsed() < Duration::from_secs(3),
            "n3 waited for a push it had no promise of"
        );
        std::thread::yield_now();
    }
    assert_eq!(read(n3, "promised").unwrap(), b"written while the promise is held up");
    link.heal();
}

/// A node waits for the origin's promised push, and the origin's connection
/// closes before the push comes: the node asks the peer that announced the
/// version at once, not only at the next anti-entropy round.
#[test]
fn when_the_origin_leaves_before_its_push_the_announcer_is_asked() {
    use gossipfs::Version;
    use gossipfs::frame::{Frame, write_frame};
    common::init_logging();
    let dir = TempDir::new("origin-leaves");
    let node = quiet_node(&dir, "o-n1", Vec::new());
    let (origin_id, announcer_id) = (common::fake_id(), common::fake_id());
    let mut origin = common::handshaken_peer(&node, origin_id);
    let mut announcer = common::handshaken_peer(&node, announcer_id);
    wait_until("both fakes to be peers", || node.peers().len(), |n| *n == 2);
    // The origin promises its pushes; the announcer tells of its store.
    write_frame(&mut origin, &Frame::PushesFrom { version: Version { time: 1, node: origin_id } })
        .unwrap();
    // A delete behind the promise, on the same connection: once it is
    // applied, the promise is recorded too (a connection's frames are
    // handled in order).
    let delete = Frame::Delete { key: "x".into(), version: Version { time: 2, node: origin_id } };
    write_frame(&mut origin, &delete).unwrap();
    wait_until("the promise to be recorded", || node.stats().changes_applied, |n| *n == 1);
    let version = Version { time: 5 << 16, node: origin_id };
    let announce = Frame::Announce { key: "orphan".into(), version, size: 3, sha1: [0; 20] };
    write_frame(&mut announcer, &announce).unwrap();
    wait_until("the wait for the push", || node.stats().files_expected, |n| *n == 1);
    assert_eq!(node.stats().fetches_waiting, 0, "the node waits for the push, asks nobody");
    drop(origin);
    let (_, key, asked) = common::next_go_ahead(&announcer);
    assert_eq!((key, asked), ("orphan".to_string(), version));
}

/// A newer version is being fetched when a push of an older one arrives:
/// the older push is stored, and the newer fetch still lands on top of it.
#[test]
fn an_older_push_does_not_cancel_a_newer_fetch() {
    use gossipfs::Version;
    use gossipfs::frame::{Frame, write_frame};
    use std::io::Write;
    common::init_logging();
    let dir = TempDir::new("older-push");
    let node = quiet_node(&dir, "v-n1", Vec::new());
    let (newer_id, older_id) = (common::fake_id(), common::fake_id());
    let mut newer = common::handshaken_peer(&node, newer_id);
    let mut older = common::handshaken_peer(&node, older_id);
    wait_until("both fakes to be peers", || node.peers().len(), |n| *n == 2);
    let file = |content: &[u8]| (content.len() as u64, common::sha1_of(content).unwrap());

    // The newer version is announced, and its go-ahead comes back to us.
    let (v2, new_content) = (Version { time: 9 << 16, node: newer_id }, b"newer".to_vec());
    let (size, sha1) = file(&new_content);
    let announce = Frame::Announce { key: "k".into(), version: v2, size, sha1 };
    write_frame(&mut newer, &announce).unwrap();
    let (request, _, _) = common::next_go_ahead(&newer);
    // Meanwhile, a push of an older version: stored, for now.
    let (v1, old_content) = (Version { time: 5 << 16, node: older_id }, b"older".to_vec());
    let (size, sha1) = file(&old_content);
    write_frame(&mut older, &Frame::Store { key: "k".into(), version: v1, size, sha1 }).unwrap();
    older.write_all(&old_content).unwrap();
    let version_held = || node.list().first().map(|f| f.version);
    wait_until("the older push to land", version_held, |held| *held == Some(v1));
    // Then the newer file: it wins.
    let (size, sha1) = file(&new_content);
    write_frame(&mut newer, &Frame::File { request, key: "k".into(), version: v2, size, sha1 })
        .unwrap();
    newer.write_all(&new_content).unwrap();
    wait_until("the newer fetch to land", version_held, |held| *held == Some(v2));
    assert_eq!(read(&node, "k").unwrap(), new_content);
}
