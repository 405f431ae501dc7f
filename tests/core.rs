//! The core behaviours of a gossipfs cluster, each checked on real nodes on
//! loopback: replication, fetching on `get`, deletes and clears, the peer
//! map, two large streams crossing, and what a node does with a broken or
//! hostile peer (played by a raw `TcpStream` speaking the wire format).

mod common;

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use gossipfs::frame::{
    ErrorCode, Frame, MAGIC, MAX_FRAME_LEN, PROTOCOL_VERSION, Role, read_frame, write_frame,
};
use gossipfs::{Error, FileServer, NodeId, Version};

/// The size of the "large file" tests: big enough to fill every socket
/// buffer many times over.
const BIG: u64 = 64 << 20;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The root directory `common::config` gives the node called `name`.
fn root_of(dir: &TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// The names of the files in a node's `ROOT/tmp`.
fn temp_files(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join("tmp"))
        .expect("read ROOT/tmp")
        .map(|entry| entry.expect("read a ROOT/tmp entry").file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .collect()
}

/// Waits until every node lists exactly `expected` (sorted).
fn wait_for_keys(nodes: &[FileServer], expected: &[&str]) {
    wait_until(
        &format!("every node to hold exactly {expected:?}"),
        || nodes.iter().map(keys).collect::<Vec<_>>(),
        |seen| seen.iter().all(|k| k == expected),
    );
}

/// Waits until every node has received at least `frames` more frames from
/// its peers than it had when called: with anti-entropy on, that many
/// summaries have arrived, so any repair they would trigger has had its
/// chance. A wait on a condition, not on the clock.
fn wait_for_frames(nodes: &[FileServer], frames: u64) {
    let start: Vec<u64> = nodes.iter().map(|n| n.stats().frames_received).collect();
    wait_until(
        &format!("{frames} more frames on every node"),
        || {
            let now = nodes.iter().map(|n| n.stats().frames_received);
            now.zip(&start).map(|(now, s)| now - s).collect::<Vec<_>>()
        },
        |grown| grown.iter().all(|g| *g >= frames),
    );
}

/// A `TcpStream` playing a gossipfs peer, byte by byte.
struct FakePeer {
    /// The connection to the node under test.
    stream: TcpStream,
    /// The node id the fake announced.
    id: NodeId,
}

/// The `Hello` a fake peer sends. An empty listen address, so no node tries
/// to dial the fake.
fn hello(id: NodeId, magic: [u8; 4], protocol: u16) -> Frame {
    Frame::Hello {
        magic,
        protocol,
        role: Role::Peer,
        node: id,
        name: format!("fake-{id:x}"),
        listen_addr: String::new(),
        nonce: [7; 16],
        auth: false,
    }
}

/// Opens a raw connection to `node`, with a read timeout so that a test
/// waiting on it cannot hang.
fn connect(node: &FileServer) -> TcpStream {
    let stream = TcpStream::connect(node.local_addr()).expect("connect to the node");
    stream.set_read_timeout(Some(DEADLINE)).expect("set a read timeout");
    stream
}

impl FakePeer {
    /// Connects to `node`, sends a `Hello`, reads the node's, and waits
    /// until the node has put the fake in its peer map.
    ///
    /// The wait matters: reading the node's `Hello` does not mean the node
    /// has finished reading ours (both sides speak first), so a frame sent
    /// at once could reach a node that does not yet count the fake as a
    /// peer.
    fn join(node: &FileServer) -> FakePeer {
        let id = fake_id();
        let mut stream = connect(node);
        write_frame(&mut stream, &hello(id, MAGIC, PROTOCOL_VERSION)).expect("send Hello");
        let theirs = read_frame(&mut stream)
            .expect("read the node's Hello")
            .expect("the node closed the connection before its Hello");
        let Frame::Hello { magic, protocol, role, node: their_id, .. } = theirs else {
            panic!("expected the node's Hello, got {theirs:?}");
        };
        assert_eq!(
            (magic, protocol, role, their_id),
            (MAGIC, PROTOCOL_VERSION, Role::Peer, node.node_id())
        );
        wait_until(
            "the node to register the fake peer",
            || peer_ids(node),
            |ids| ids.contains(&id),
        );
        FakePeer { stream, id }
    }

    /// A version of a change made by this fake.
    fn version(&self, time: u64) -> Version {
        Version { time, node: self.id }
    }

    /// Sends raw bytes.
    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send bytes to the node");
    }

    /// Sends one frame.
    fn send_frame(&mut self, frame: &Frame) {
        write_frame(&mut self.stream, frame).expect("send a frame to the node");
    }

    /// Sends a `Store` frame announcing `content` with `sha1` as its SHA-1
    /// (the bytes themselves are the caller's to send, all or some).
    fn send_store(&mut self, key: &str, version: Version, content: &[u8], sha1: [u8; 20]) {
        self.send_frame(&Frame::Store {
            key: key.to_string(),
            version,
            size: content.len() as u64,
            sha1,
        });
    }

    /// Answers a `GoAhead` with a `File` frame and the whole content.
    fn send_file(&mut self, request: u64, key: &str, version: Version, content: &[u8]) {
        self.send_frame(&Frame::File {
            request,
            key: key.to_string(),
            version,
            size: content.len() as u64,
            sha1: sha1_of(content).expect("hash memory"),
        });
        self.send(content);
    }
}

/// Reads frames from `stream` until the node closes it; returns what it
/// sent first. Panics if the node keeps the connection open past the
/// deadline.
fn wait_for_disconnect(stream: &mut TcpStream, what: &str) -> Vec<Frame> {
    let deadline = Instant::now() + DEADLINE;
    let mut frames = Vec::new();
    loop {
        match read_frame(stream) {
            Ok(Some(frame)) => {
                // Anti-entropy keeps summaries coming while it is open.
                assert!(
                    Instant::now() < deadline,
                    "{what}: the node is still connected; it sent {} frames, the last {frame:?}",
                    frames.len()
                );
                frames.push(frame);
            }
            // A clean close.
            Ok(None) => return frames,
            Err(Error::Timeout(_)) => {
                panic!("{what}: the node neither closed nor spoke; it sent {} frames", frames.len())
            }
            // Reset: the node closed with our bytes still unread.
            Err(_) => return frames,
        }
    }
}

/// Waits until the node has dropped `id` from its peer map.
fn wait_for_peer_to_leave(node: &FileServer, id: NodeId) {
    wait_until(
        &format!("{} to drop peer {id:x}", node.name()),
        || peer_ids(node),
        |ids| !ids.contains(&id),
    );
}

/// A node under test (`n1`) with one real peer (`n2`), connected.
fn target_and_peer(dir: &TempDir) -> Vec<FileServer> {
    let nodes = chain(dir, 2, |_| {});
    wait_for_peers(&nodes, &[1, 1]);
    nodes
}

// ---------------------------------------------------------------------------
// 1. Replication
// ---------------------------------------------------------------------------

#[test]
fn a_store_appears_byte_identical_on_every_node_of_a_chain() {
    init_logging();
    let dir = TempDir::new("replicate");
    // No discovery: n1 and n3 reach each other only through n2's relay.
    let nodes = chain(&dir, 3, |c| c.discover_peers = false);
    wait_for_peers(&nodes, &[1, 2, 1]);

    // Empty, one byte, and more than one stream buffer (256 KiB); stored at
    // both ends and in the middle.
    let files = [
        ("empty", Vec::new()),
        ("one", vec![0x5a]),
        ("three-hundred-k", pseudo_random_bytes(300 << 10, 1)),
    ];
    for (node, (key, bytes)) in nodes.iter().zip(&files) {
        node.store(key, &bytes[..]).expect("store");
    }
    wait_for_keys(&nodes, &["empty", "one", "three-hundred-k"]);
    for node in &nodes {
        for (key, bytes) in &files {
            assert_eq!(&read(node, key).expect("read"), bytes, "{key} on {}", node.name());
        }
    }
}

#[test]
fn a_64_mib_store_appears_byte_identical_on_every_node_of_a_chain() {
    init_logging();
    let dir = TempDir::new("replicate-big");
    let nodes = chain(&dir, 3, |c| c.discover_peers = false);
    wait_for_peers(&nodes, &[1, 2, 1]);

    let expected = sha1_of(PseudoRandomReader::new(BIG, 64)).expect("hash the source");
    nodes[0].store("big", PseudoRandomReader::new(BIG, 64)).expect("store 64 MiB");
    wait_for_keys(&nodes, &["big"]);
    for node in &nodes {
        assert_eq!(node.list()[0].size, BIG, "size on {}", node.name());
        let file = node.get("big").expect("open the copy");
        let actual = sha1_of(file).expect("read the copy to the end");
        assert_eq!(actual, expected, "SHA-1 of the copy on {}", node.name());
    }
}

// ---------------------------------------------------------------------------
// 2. Getting a file a node lacks
// ---------------------------------------------------------------------------

#[test]
fn get_on_a_node_that_lacks_a_key_returns_the_peers_copy() {
    init_logging();
    let dir = TempDir::new("get-fetch");
    let no_anti_entropy = |name: &str| {
        let mut config = config(name, dir.path());
        config.anti_entropy_interval = std::time::Duration::from_secs(3600);
        config
    };
    let n1 = start(no_anti_entropy("n1"));
    let bytes = pseudo_random_bytes(300 << 10, 2);
    n1.store("k", &bytes[..]).expect("store on n1");

    let mut config = no_anti_entropy("n2");
    config.bootstrap = vec![n1.local_addr().to_string()];
    let n2 = start(config);
    let nodes = [n1, n2];
    wait_for_peers(&nodes, &[1, 1]);

    // The summaries exchanged on connect may already have pulled the file;
    // either way the bytes must be right, and after the get n2 keeps them.
    let pulled_already = keys(&nodes[1]).contains(&"k".to_string());
    println!(
        "get path: {}",
        if pulled_already { "already pulled by anti-entropy" } else { "fetched from the peer" }
    );
    assert_eq!(read(&nodes[1], "k").expect("get on n2"), bytes);
    assert_eq!(keys(&nodes[1]), ["k"], "n2 keeps the fetched copy");
}

#[test]
fn get_fetches_from_the_one_peer_that_has_the_key() {
    init_logging();
    let dir = TempDir::new("get-fake");
    // n1 lacks the key for certain: it is fresh, and its only holder is a
    // fake peer that answers nothing but a Get. n2 is a real peer that
    // lacks it too, so n1 hears "not found" from one peer and the file
    // from the other.
    let nodes = target_and_peer(&dir);
    let mut fake = FakePeer::join(&nodes[0]);
    let bytes = pseudo_random_bytes(300 << 10, 3);
    let version = fake.version(1);

    let expected = bytes.clone();
    let holder = thread::spawn(move || {
        loop {
            let frame = read_frame(&mut fake.stream)
                .expect("the fake reads the node's frames")
                .expect("the node closed the fake's connection");
            match frame {
                // Phase one: offer the file, no bytes yet.
                Frame::Get { request, key } => {
                    assert_eq!(key, "held-by-fake", "the node asks for the key it was asked for");
                    let (size, sha1) = (expected.len() as u64, sha1_of(&expected[..]).unwrap());
                    fake.send_frame(&Frame::Offer { request, key, version, size, sha1 });
                }
                // Phase two: the go-ahead for what we offered.
                Frame::GoAhead { request, key, version: wanted } => {
                    assert_eq!(wanted, version, "the go-ahead names the version offered");
                    fake.send_file(request, &key, version, &expected);
                    return fake; // keep the connection open until the test ends
                }
                _ => {} // summaries and peer lists
            }
        }
    });

    assert_eq!(read(&nodes[0], "held-by-fake").expect("get on n1"), bytes);
    assert_eq!(keys(&nodes[0]), ["held-by-fake"], "n1 keeps the fetched copy");
    let _fake = holder.join().expect("the fake holder");
}

#[test]
fn get_of_a_key_nobody_has_is_not_found() {
    init_logging();
    let dir = TempDir::new("get-missing");
    let nodes = chain(&dir, 3, |_| {});
    wait_for_peers(&nodes, &[2, 2, 2]);
    nodes[0].store("present", &b"here"[..]).expect("store");
    wait_for_keys(&nodes, &["present"]);

    // Every peer answers "not found" at once; a timeout (config: 10 s)
    // would be Error::Timeout instead.
    let started = Instant::now();
    let result = read(&nodes[1], "absent");
    println!("get of a missing key took {:?}", started.elapsed());
    assert!(
        matches!(result, Err(Error::NotFound(ref key)) if key == "absent"),
        "expected NotFound, got {result:?}"
    );
}

// ---------------------------------------------------------------------------
// 3. Deletes and clears
// ---------------------------------------------------------------------------

#[test]
fn delete_and_clear_reach_every_node_and_later_stores_survive_the_clear() {
    init_logging();
    let dir = TempDir::new("delete-clear");
    let nodes = chain(&dir, 3, |c| {
        c.discover_peers = false;
        // The comparisons awaited at the end come twice as often.
        c.anti_entropy_interval = Duration::from_millis(100);
    });
    wait_for_peers(&nodes, &[1, 2, 1]);
    for key in ["a", "b", "c"] {
        nodes[0].store(key, key.as_bytes()).expect("store");
    }
    wait_for_keys(&nodes, &["a", "b", "c"]);

    // A delete at one end of the chain reaches the other end.
    nodes[2].delete("a").expect("delete on n3");
    wait_for_keys(&nodes, &["b", "c"]);
    for node in &nodes {
        let result = read(node, "a");
        assert!(
            matches!(result, Err(Error::NotFound(_))),
            "a deleted key on {}: {result:?}",
            node.name()
        );
    }

    // A clear at one end, then a store on the same node right away: the
    // store is newer than the clear, so it must survive it everywhere.
    nodes[0].clear().expect("clear on n1");
    nodes[0].store("after-1", &b"stored after the clear"[..]).expect("store after clear");
    wait_for_keys(&nodes, &["after-1"]);
    // A store at the other end, once the clear has been applied there.
    nodes[2]
        .store("after-3", &b"stored after the clear, elsewhere"[..])
        .expect("store after clear on n3");
    wait_for_keys(&nodes, &["after-1", "after-3"]);
    // Let anti-entropy compare the nodes a few times: nothing may change.
    wait_for_frames(&nodes, 4);
    wait_for_keys(&nodes, &["after-1", "after-3"]);
    for node in &nodes {
        assert_eq!(read(node, "after-1").expect("read"), b"stored after the clear");
        assert_eq!(read(node, "after-3").expect("read"), b"stored after the clear, elsewhere");
    }
}

// ---------------------------------------------------------------------------
// 4. The peer map
// ---------------------------------------------------------------------------

#[test]
fn a_node_that_shuts_down_leaves_its_peers_peer_maps() {
    init_logging();
    let dir = TempDir::new("peer-leaves");
    let mut nodes = chain(&dir, 3, |_| {});
    // With discovery, the chain becomes a full mesh.
    wait_for_peers(&nodes, &[2, 2, 2]);
    let (id1, id2, id3) = (nodes[0].node_id(), nodes[1].node_id(), nodes[2].node_id());
    assert!(peer_ids(&nodes[0]).contains(&id2));
    assert!(peer_ids(&nodes[2]).contains(&id2));

    nodes.remove(1).shutdown();
    wait_until(
        "n1 and n3 to drop n2 and keep each other",
        || (peer_ids(&nodes[0]), peer_ids(&nodes[1])),
        |(p1, p3)| p1 == &[id3] && p3 == &[id1],
    );
}

// ---------------------------------------------------------------------------
// 5. Two large streams crossing
// ---------------------------------------------------------------------------

#[test]
fn two_nodes_storing_64_mib_to_each_other_at_once_both_finish() {
    init_logging();
    let dir = TempDir::new("crossing");
    let nodes = Arc::new(chain(&dir, 2, |_| {}));
    wait_for_peers(&nodes, &[1, 1]);

    // Each side's writer streams 64 MiB while its reader must keep draining
    // the other's 64 MiB; if a reader ever wrote to its socket, both would
    // block with full buffers.
    let barrier = Arc::new(Barrier::new(2));
    let writers: Vec<_> = (0..2)
        .map(|i| {
            let (nodes, barrier) = (Arc::clone(&nodes), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                let key = format!("big-{}", i + 1);
                nodes[i]
                    .store(&key, PseudoRandomReader::new(BIG, 100 + i as u64))
                    .expect("store 64 MiB");
            })
        })
        .collect();
    let expected: Vec<[u8; 20]> = (0..2)
        .map(|i| sha1_of(PseudoRandomReader::new(BIG, 100 + i)).expect("hash the source"))
        .collect();
    for writer in writers {
        writer.join().expect("a storing thread");
    }
    wait_for_keys(&nodes[..], &["big-1", "big-2"]);
    for node in nodes.iter() {
        for (key, expected) in ["big-1", "big-2"].iter().zip(&expected) {
            let actual = sha1_of(node.get(key).expect("open")).expect("read to the end");
            assert_eq!(&actual, expected, "SHA-1 of {key} on {}", node.name());
        }
    }
}

// ---------------------------------------------------------------------------
// 6. Broken streams from a fake peer
// ---------------------------------------------------------------------------

#[test]
fn a_stream_cut_in_the_middle_leaves_nothing_behind_and_the_node_keeps_serving() {
    init_logging();
    let dir = TempDir::new("cut-stream");
    let nodes = target_and_peer(&dir);
    let root = root_of(&dir, "n1");

    let content = pseudo_random_bytes(1 << 20, 6);
    let sha1 = sha1_of(&content[..]).expect("hash memory");
    let mut fake = FakePeer::join(&nodes[0]);
    let version = fake.version(1);
    fake.send_store("cut", version, &content, sha1);
    fake.send(&content[..content.len() / 2]);
    // The node is mid-stream: half the file sits in a temp file.
    wait_until("n1 to start a temp file", || temp_files(&root), |t| t.len() == 1);

    fake.stream.shutdown(Shutdown::Both).expect("cut the stream");
    wait_for_peer_to_leave(&nodes[0], fake.id);
    wait_until("n1's temp file to go", || temp_files(&root), Vec::is_empty);
    assert!(!keys(&nodes[0]).contains(&"cut".to_string()));
    let result = read(&nodes[0], "cut");
    assert!(
        matches!(result, Err(Error::NotFound(_))),
        "a cut stream must not be stored: {result:?}"
    );

    // The node still serves its real peer, both ways.
    assert_replicates(&nodes[1], &nodes[0], "after-cut-from-n2", 61);
    assert_replicates(&nodes[0], &nodes[1], "after-cut-from-n1", 62);
    // And the broken change is not remembered as seen: the whole stream,
    // same version, from a new connection, is stored and relayed.
    let mut again = FakePeer::join(&nodes[0]);
    again.send_store("cut", version, &content, sha1);
    again.send(&content);
    wait_until(
        "the complete stream on both nodes",
        || (keys(&nodes[0]), keys(&nodes[1])),
        |(k1, k2)| k1.contains(&"cut".to_string()) && k2.contains(&"cut".to_string()),
    );
    assert_eq!(read(&nodes[1], "cut").expect("read"), content);
}

#[test]
fn a_stream_that_fails_its_sha1_is_rejected_and_the_node_keeps_serving() {
    init_logging();
    let dir = TempDir::new("bad-sha1");
    let nodes = target_and_peer(&dir);
    let root = root_of(&dir, "n1");

    let content = pseudo_random_bytes(1 << 20, 7);
    let wrong = sha1_of(&b"something else"[..]).expect("hash memory");
    let mut liar = FakePeer::join(&nodes[0]);
    let version = liar.version(1);
    liar.send_store("bad", version, &content, wrong);
    let (most, last) = content.split_at(content.len() - 1);
    liar.send(most);
    wait_until("n1 to start a temp file", || temp_files(&root), |t| t.len() == 1);
    liar.send(last);

    // Every announced byte has arrived: the temp file goes, and since it
    // did not go into the store, the bytes were rejected. (Whether the
    // node also drops the liar's connection is its choice.)
    wait_until("n1's temp file to go", || temp_files(&root), Vec::is_empty);
    for node in nodes.iter() {
        assert!(
            !keys(node).contains(&"bad".to_string()),
            "{} stored bytes that failed their SHA-1",
            node.name()
        );
    }

    assert_replicates(&nodes[1], &nodes[0], "after-bad-from-n2", 71);
    assert_replicates(&nodes[0], &nodes[1], "after-bad-from-n1", 72);
    // The rejected change is not remembered as seen: the right bytes for
    // the same version, from another peer, are stored and relayed.
    let mut honest = FakePeer::join(&nodes[0]);
    let right = sha1_of(&content[..]).expect("hash memory");
    honest.send_store("bad", version, &content, right);
    honest.send(&content);
    wait_until(
        "the good copy on both nodes",
        || (keys(&nodes[0]), keys(&nodes[1])),
        |(k1, k2)| k1.contains(&"bad".to_string()) && k2.contains(&"bad".to_string()),
    );
    assert_eq!(read(&nodes[1], "bad").expect("read"), content);
}

// ---------------------------------------------------------------------------
// 7. Garbage from a fake peer
// ---------------------------------------------------------------------------

#[test]
fn garbage_after_the_handshake_disconnects_the_fake_peer_and_the_node_keeps_serving() {
    init_logging();
    let dir = TempDir::new("garbage");
    let nodes = target_and_peer(&dir);
    assert_replicates(&nodes[1], &nodes[0], "before", 80);

    let random = pseudo_random_bytes(64 << 10, 8);
    let random_len = u32::from_be_bytes(random[..4].try_into().expect("4 bytes"));
    assert!(random_len > MAX_FRAME_LEN, "fixture: random bytes start with an oversized length");
    let mut oversized = u32::MAX.to_be_bytes().to_vec();
    oversized.extend_from_slice(&[4; 64]);
    let just_over = (MAX_FRAME_LEN + 1).to_be_bytes().to_vec();
    // A length in bounds, then a tag that names no message.
    let unknown_tag = [0, 0, 0, 5, 0xee, 1, 2, 3, 4];
    // A Store tag whose body is too short to hold a Store.
    let short_store = [0, 0, 0, 4, 4, 0, 1, b'k'];
    let cases: [(&str, &[u8]); 5] = [
        ("random bytes", &random),
        ("a u32::MAX length prefix", &oversized),
        ("a length prefix of MAX_FRAME_LEN + 1", &just_over),
        ("an unknown tag", &unknown_tag),
        ("a Store frame cut short", &short_store),
    ];
    for (i, (what, garbage)) in cases.into_iter().enumerate() {
        let mut fake = FakePeer::join(&nodes[0]);
        // The node may close before it has read it all.
        let _ = fake.stream.write_all(garbage);
        wait_for_disconnect(&mut fake.stream, what);
        wait_for_peer_to_leave(&nodes[0], fake.id);
        assert_replicates(&nodes[1], &nodes[0], &format!("after-case-{i}"), 81 + i as u64);
    }
    assert_replicates(&nodes[0], &nodes[1], "from-n1", 90);
    // Nothing was lost, and the real peer never left.
    assert_eq!(peer_ids(&nodes[0]), [nodes[1].node_id()]);
    let expected = [
        "after-case-0",
        "after-case-1",
        "after-case-2",
        "after-case-3",
        "after-case-4",
        "before",
        "from-n1",
    ];
    wait_for_keys(&nodes, &expected);
}

#[test]
fn garbage_instead_of_a_handshake_is_refused_and_the_node_keeps_serving() {
    init_logging();
    let dir = TempDir::new("garbage-handshake");
    let nodes = target_and_peer(&dir);

    // Random bytes where the Hello should be.
    let mut stream = connect(&nodes[0]);
    let _ = stream.write_all(&pseudo_random_bytes(64 << 10, 8));
    wait_for_disconnect(&mut stream, "random bytes for a Hello");

    // A Hello with the wrong magic, then one with the wrong protocol
    // version: each is answered with an Error frame, then closed.
    for (what, magic, protocol) in [
        ("a bad magic", *b"HTTP", PROTOCOL_VERSION),
        ("a bad protocol version", MAGIC, PROTOCOL_VERSION + 1),
    ] {
        let mut stream = connect(&nodes[0]);
        let id = fake_id();
        write_frame(&mut stream, &hello(id, magic, protocol)).expect("send Hello");
        let frames = wait_for_disconnect(&mut stream, what);
        assert!(
            matches!(
                frames.as_slice(),
                [Frame::Hello { .. }, Frame::Error { code: ErrorCode::Protocol, .. }]
            ),
            "{what}: expected Hello then a protocol Error, got {frames:?}"
        );
        assert!(!peer_ids(&nodes[0]).contains(&id));
    }

    // Still accepting, still replicating.
    let fake = FakePeer::join(&nodes[0]);
    drop(fake);
    assert_replicates(&nodes[1], &nodes[0], "after-garbage-from-n2", 91);
    assert_replicates(&nodes[0], &nodes[1], "after-garbage-from-n1", 92);
}
