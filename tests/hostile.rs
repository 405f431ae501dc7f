//! Hostile peers and the edges of the disk: a peer that asks and never
//! reads is cut off while the node keeps serving the others; file data
//! nobody asked for is never stored; tombstones expire; a second node on
//! the same root is refused.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{
    TempDir, config, fake_id, init_logging, pseudo_random_bytes, read, start, wait_until,
};
use gossipfs::frame::{Frame, write_frame};
use gossipfs::{Config, Error, FileServer, Version};

fn peer_count(node: &FileServer) -> usize {
    node.peers().len()
}

/// A peer asks for a 1 MiB file as fast as it can and never reads an
/// answer. Its queue fills (in items or bytes), and the node disconnects
/// it; meanwhile the node's real peer is still served.
#[test]
fn a_peer_that_asks_and_never_reads_is_cut_off_and_others_are_served() {
    init_logging();
    let dir = TempDir::new("hostile-flood");
    let n1 = start(config("hf-n1", dir.path()));
    let n2 = start({
        let mut c = config("hf-n2", dir.path());
        c.bootstrap = vec![n1.local_addr().to_string()];
        c
    });
    wait_until("n1 and n2 to connect", || peer_count(&n1), |n| *n == 1);
    // The longest key a frame allows: each answer carries it, so the socket
    // buffers between the node and the fake fill after a few thousand
    // answers, not the hundreds of thousands a short key takes.
    let big = format!("big-{}", "x".repeat(gossipfs::frame::MAX_KEY_LEN - 4));
    n1.store(&big, &pseudo_random_bytes(1 << 20, 3)[..]).unwrap();

    let mut flood = common::handshaken_peer(&n1, fake_id());
    wait_until("n1 to register the fake", || peer_count(&n1), |n| *n == 2);
    // Gets until the node stops taking them: it closed the connection.
    let mut sent = 0u64;
    let get = |request| Frame::Get { request, key: big.clone() };
    while write_frame(&mut flood, &get(sent + 1)).and_then(|()| Ok(flood.flush()?)).is_ok() {
        sent += 1;
        if sent.is_multiple_of(1000) && peer_count(&n1) == 1 {
            break;
        }
        assert!(sent < 1_000_000, "a million gets and the node still takes them");
    }
    println!("the node cut the flood off after {sent} gets");
    wait_until("n1 to drop the flooding peer", || peer_count(&n1), |n| *n == 1);

    n1.store("after", &b"still served"[..]).unwrap();
    wait_until(
        "n2 to get the next store",
        || read(&n2, "after").ok(),
        |got| got.as_deref() == Some(&b"still served"[..]),
    );
}

/// A peer sends a File frame, with its bytes, answering a request the node
/// never made. The bytes are discarded, nothing is stored, and the
/// connection stays in step: a Get behind it is answered.
#[test]
fn file_data_nobody_asked_for_is_never_stored() {
    init_logging();
    let dir = TempDir::new("hostile-unsolicited");
    let n1 = start(config("hu-n1", dir.path()));
    let mut fake = common::handshaken_peer(&n1, fake_id());
    wait_until("n1 to register the fake", || peer_count(&n1), |n| *n == 1);
    let content = b"nobody asked for this";
    let sha1 = common::sha1_of(&content[..]).unwrap();
    let version = Version { time: 1, node: 7 };
    let file = Frame::File { request: 4242, key: "planted".into(), version, size: 21, sha1 };
    write_frame(&mut fake, &file).unwrap();
    fake.write_all(content).unwrap();
    write_frame(&mut fake, &Frame::Get { request: 1, key: "probe".into() }).unwrap();
    // Frames until the answer to the probe: heartbeats may come first.
    loop {
        match gossipfs::frame::read_frame(&mut fake) {
            Ok(Some(Frame::NotFound { request: 1, .. })) => break,
            Ok(Some(_)) => {}
            other => panic!("expected the probe's answer, got {other:?}"),
        }
    }
    assert!(n1.list().is_empty(), "{:?}", n1.list());
    drop(fake);
    wait_until("n1 to drop the fake", || peer_count(&n1), |n| *n == 0);
    assert!(matches!(n1.get("planted"), Err(Error::NotFound(_))));
}

/// Deletes leave tombstones; after the grace period they are gone from the
/// index and the disk. (A delete of a key never stored leaves one too: that
/// is how a peer could grow every node's disk, one delete at a time.)
#[test]
fn tombstones_expire_after_the_grace_period() {
    init_logging();
    let dir = TempDir::new("hostile-tombstones");
    let mut c = config("ht-n1", dir.path());
    // Long enough that no tombstone expires before all twenty are made,
    // even on a busy machine.
    c.tombstone_grace = Duration::from_secs(1);
    let root = c.root.clone();
    let n1 = start(c);
    for i in 0..20 {
        let key = format!("k{i}");
        n1.store(&key, key.as_bytes()).unwrap();
        n1.delete(&key).unwrap();
    }
    let key_files = || std::fs::read_dir(root.join("objects")).unwrap().count();
    assert_eq!(key_files(), 20, "twenty tombstones on disk");
    wait_until("the tombstones to expire", key_files, |n| *n == 0);
    // The node is none the worse: a new store of an expired key works.
    n1.store("k3", &b"back"[..]).unwrap();
    let mut got = Vec::new();
    n1.get("k3").unwrap().read_to_end(&mut got).unwrap();
    assert_eq!(got, b"back");
}

/// A second node on a root that a running node holds fails at start with a
/// clear error, and leaves the first node's files alone.
#[test]
fn a_second_node_on_the_same_root_is_refused() {
    init_logging();
    let dir = TempDir::new("hostile-root");
    let first = start(config("hr-n1", dir.path()));
    first.store("mine", &b"kept"[..]).unwrap();
    let second: Config = config("hr-n1", dir.path());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = FileServer::start_on(listener, second).err().expect("refused");
    assert!(matches!(err, Error::Config(_)), "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
    assert_eq!(read(&first, "mine").unwrap(), b"kept");
    // Once the first has stopped, the root opens again.
    drop(first);
    let again = start(config("hr-n1", dir.path()));
    assert_eq!(read(&again, "mine").unwrap(), b"kept");
}

/// Two peers announce thousands of fresh files each, read everything the
/// node sends them, and never send a file. The fetches waiting for them,
/// and the files the node expects, stay within their bounds; what does not
/// fit is refused (anti-entropy asks again later). The node keeps serving.
#[test]
fn an_announce_flood_is_bounded_per_peer_and_per_node() {
    init_logging();
    let dir = TempDir::new("hostile-announce");
    let node = start({
        let mut c = config("ha-n1", dir.path());
        c.anti_entropy = false;
        c
    });
    const PER_FAKE: u64 = 3000;
    let fakes: Vec<std::thread::JoinHandle<()>> = (0..2)
        .map(|_| {
            let id = fake_id();
            let mut stream = common::handshaken_peer(&node, id);
            let mut drain = stream.try_clone().unwrap();
            // Read (and drop) whatever the node sends: its go-aheads too.
            std::thread::spawn(move || while drain.read(&mut [0u8; 4096]).unwrap_or(0) > 0 {});
            std::thread::spawn(move || {
                for i in 0..PER_FAKE {
                    let announce = Frame::Announce {
                        key: format!("flood-{id:x}-{i}"),
                        version: Version { time: (i + 1) << 16, node: id },
                        size: 1 << 20,
                        sha1: [0; 20],
                    };
                    if write_frame(&mut stream, &announce).is_err() {
                        return;
                    }
                }
                // Hold the connection open until the test drops the node.
                let _ = stream.read(&mut [0u8; 1]);
            })
        })
        .collect();
    wait_until("both fakes to be peers", || peer_count(&node), |n| *n == 2);
    let all = 2 * PER_FAKE;
    // Every announcement is either fetched (and waits for ever) or refused.
    let stats = wait_until(
        "the node to act on every announcement",
        || node.stats(),
        |s| s.fetches_waiting + s.fetches_refused >= all,
    );
    assert!(stats.fetches_waiting <= 2 * 64, "fetches waiting: {}", stats.fetches_waiting);
    assert!(stats.files_expected <= 2 * 64, "files expected: {}", stats.files_expected);
    assert!(stats.fetches_refused >= all - 2 * 64, "refused: {}", stats.fetches_refused);
    node.store("still", &b"served"[..]).unwrap();
    assert_eq!(read(&node, "still").unwrap(), b"served");
    drop(node);
    for fake in fakes {
        fake.join().unwrap();
    }
}

/// A peer answers a fetch with a file under another key than the one asked:
/// the node refuses it and closes that connection, and stores nothing.
#[test]
fn a_file_sent_under_another_key_than_asked_is_refused() {
    init_logging();
    let dir = TempDir::new("hostile-other-key");
    let node = start({
        let mut c = config("hk-n1", dir.path());
        c.anti_entropy = false;
        c
    });
    let id = fake_id();
    let mut fake = common::handshaken_peer(&node, id);
    wait_until("the fake to be a peer", || peer_count(&node), |n| *n == 1);
    let version = Version { time: 1 << 16, node: id };
    let content = b"not what was asked";
    let sha1 = common::sha1_of(&content[..]).unwrap();
    let announce = Frame::Announce { key: "asked".into(), version, size: 18, sha1 };
    write_frame(&mut fake, &announce).unwrap();
    let (request, _, _) = common::next_go_ahead(&fake);
    let file = Frame::File { request, key: "other".into(), version, size: 18, sha1 };
    write_frame(&mut fake, &file).unwrap();
    fake.write_all(content).unwrap();
    wait_until("the node to drop the fake", || peer_count(&node), |n| *n == 0);
    assert!(node.list().is_empty(), "nothing was stored: {:?}", node.list());
}
