//! The two sequence diagrams, tested as diagrams: a `log` sink of our own
//! captures every node's debug lines with the thread that logged them, and
//! each flow's step labels must appear in the diagram's order, each logged
//! by the actor that performs it: the Server (the thread that called
//! `store` or `get`), a transport layer (a connection's read loop or
//! writer, threads named "NODE TL ..."), or the Peer (a connection's
//! handler, "NODE Peer ..."). Also: relays travel by announcement, so a
//! store crosses each link once, and a `get` moves one copy however many
//! peers hold the file.
//!
//! Every node here runs with anti-entropy and discovery off, so the only
//! traffic is the flow under test and the paths are deterministic.

mod common;

use std::sync::Mutex;

use common::{TempDir, config, read, start, wait_for_peers, wait_until};
use gossipfs::{Config, FileServer};

fn capture_logs() {
    common::capture_logs("");
}

/// Which actor of the diagrams a thread of `node` is.
fn actor(node: &str, thread: &str) -> &'static str {
    match thread.strip_prefix(node) {
        Some(rest) if rest.starts_with(" TL ") => "TL",
        Some(rest) if rest.starts_with(" Peer ") => "Peer",
        // Not one of the node's own threads: the caller of `store` or `get`.
        _ => "Server",
    }
}

/// The diagram steps logged so far by the nodes in `names` about `key`, as
/// (node, actor, label), in the order they were logged. A line is a step
/// if it starts with one of `labels` and names the key.
fn steps(names: &[&str], key: &str, labels: &[&str]) -> Vec<(String, String, String)> {
    let key_field = format!("key={key}");
    common::with_logs(|lines| {
        lines
            .iter()
            .filter(|line| names.contains(&line.node.as_str()))
            .filter_map(|common::LogLine { node, thread, message, .. }| {
                let label = labels.iter().find(|l| message.starts_with(**l))?;
                // Lock and unlock lines name the key on lock only; keep both.
                let about_key = message.split(' ').any(|field| field == key_field);
                let step = (node.clone(), actor(node, thread).to_string(), label.to_string());
                (about_key || label.starts_with("Unlock")).then_some(step)
            })
            .collect()
    })
}

/// Whether `node` holds `key`, asked without a `get` (which would fetch it).
fn holds(node: &FileServer, key: &str) -> bool {
    node.list().iter().any(|f| f.key == key)
}

fn quiet(config: &mut Config) {
    config.anti_entropy = false;
    config.discover_peers = false;
}

fn node(dir: &TempDir, name: &str, bootstrap: Option<&FileServer>) -> FileServer {
    let mut config = config(name, dir.path());
    quiet(&mut config);
    if let Some(peer) = bootstrap {
        config.bootstrap = vec![peer.local_addr().to_string()];
    }
    start(config)
}

fn expected(steps: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    steps.iter().map(|(n, a, l)| (n.to_string(), a.to_string(), l.to_string())).collect()
}

const DIAGRAM_1: [&str; 8] = [
    "Upload file",
    "Save file",
    "Send metadata (filename, size)",
    "Send metadata by TCP",
    "Lock transport layer",
    "Stream file data",
    "Unlock transport layer",
    "Serve file", // not in diagram 1: must not appear
];

#[test]
fn saving_a_file_walks_diagram_1_in_order() {
    capture_logs();
    let dir = TempDir::new("diagram1");
    let s1 = node(&dir, "d1-s1", None);
    let s2 = node(&dir, "d1-s2", Some(&s1));
    let nodes = [s1, s2];
    wait_for_peers(&nodes, &[1, 1]);

    nodes[0].store("one.txt", &b"diagram one"[..]).unwrap();
    wait_until("d1-s2 to hold one.txt", || holds(&nodes[1], "one.txt"), |held| *held);
    assert_eq!(read(&nodes[1], "one.txt").unwrap(), b"diagram one");
    // The last step (the unlock) is logged before the commit that made the
    // file readable, but by another thread: wait for it rather than race it.
    let names = ["d1-s1", "d1-s2"];
    let got = wait_until(
        "the unlock on d1-s2",
        || steps(&names, "one.txt", &DIAGRAM_1),
        |s| s.last().is_some_and(|(_, _, l)| l.starts_with("Unlock")),
    );
    assert_eq!(
        got,
        expected(&[
            ("d1-s1", "Server", "Upload file"),
            ("d1-s1", "Server", "Save file"),
            ("d1-s1", "Server", "Send metadata (filename, size)"),
            ("d1-s1", "TL", "Send metadata by TCP"),
            ("d1-s2", "TL", "Send metadata (filename, size)"),
            ("d1-s2", "Peer", "Lock transport layer"),
            ("d1-s2", "Peer", "Stream file data"),
            ("d1-s2", "Peer", "Save file"),
            ("d1-s2", "Peer", "Unlock transport layer"),
        ])
    );
    let handoffs = nodes[1].stats().handoffs;
    assert_eq!(handoffs, 1, "d1-s2's read loop handed one stream over and waited");
    // After the unlock, d1-s2's committer commits the file's batch and
    // names the file: group commit, seen step by step.
    let batch = |line: &common::LogLine| {
        line.node == "d1-s2"
            && line.thread == "d1-s2 commit"
            && line.message.starts_with("Commit batch")
    };
    let commits = wait_until(
        "d1-s2's batch commit",
        || common::with_logs(|lines| lines.iter().filter(|l| batch(l)).count()),
        |n| *n > 0,
    );
    assert_eq!(commits, 1);
    let named = common::with_logs(|lines| {
        lines.iter().any(|l| batch(l) && l.message.ends_with("keys=one.txt"))
    });
    assert!(named, "the batch line names one.txt");
}

const DIAGRAM_2: [&str; 14] = [
    "Request file",
    "Check local storage",
    "Send file",
    "File not found",
    "Broadcast getfile",
    "Get File",
    "Peer receives getfile",
    "Get file",
    "Retrieve File Stream",
    "Send metadata (filename, size)",
    "Lock transport layer",
    "Stream file data",
    "Unlock transport layer",
    "Serve file",
];

/// Three nodes. d2-s1 and d2-s2 hold the file; d2-s3 joins afterwards,
/// connected to d2-s1 only, with anti-entropy off: it truly lacks the file,
/// and its `get` must fetch it through the network.
#[test]
fn getting_a_missing_file_walks_diagram_2_in_order() {
    capture_logs();
    let dir = TempDir::new("diagram2");
    let s1 = node(&dir, "d2-s1", None);
    let s2 = node(&dir, "d2-s2", Some(&s1));
    let early = [s1, s2];
    wait_for_peers(&early, &[1, 1]);
    early[0].store("two.txt", &b"diagram two"[..]).unwrap();
    wait_until("d2-s2 to hold two.txt", || holds(&early[1], "two.txt"), |held| *held);

    let s3 = node(&dir, "d2-s3", Some(&early[0]));
    wait_until("d2-s3 to connect", || s3.peers().len(), |n| *n == 1);
    assert!(s3.list().is_empty(), "d2-s3 must start without the file");
    assert_eq!(read(&s3, "two.txt").unwrap(), b"diagram two");

    let names = ["d2-s1", "d2-s3"];
    let got = steps(&names, "two.txt", &DIAGRAM_2);
    // d2-s1 logged its local store and the push to d2-s2 before d2-s3
    // existed; the get flow is what follows d2-s3's first line.
    let start = got.iter().position(|(n, _, _)| n == "d2-s3").expect("d2-s3 logged the get");
    assert_eq!(
        got[start..].to_vec(),
        expected(&[
            ("d2-s3", "Server", "Request file"),
            ("d2-s3", "Server", "Check local storage"),
            ("d2-s3", "Server", "File not found"),
            ("d2-s3", "Server", "Broadcast getfile"),
            ("d2-s3", "TL", "Get File"),
            ("d2-s1", "Peer", "Peer receives getfile"),
            ("d2-s1", "Peer", "Get file"),
            ("d2-s1", "Peer", "Retrieve File Stream"),
            ("d2-s1", "Peer", "Send metadata (filename, size)"),
            ("d2-s1", "TL", "Send metadata (filename, size)"),
            ("d2-s3", "TL", "Send metadata (filename, size)"),
            // The go-ahead: metadata back to the one holder picked.
            ("d2-s3", "Server", "Send metadata (filename, size)"),
            ("d2-s3", "Server", "Lock transport layer"),
            ("d2-s3", "Server", "Stream file data"),
            ("d2-s3", "Server", "Unlock transport layer"),
            ("d2-s3", "Server", "Serve file"),
        ])
    );
    assert_eq!(s3.stats().handoffs, 1, "the get's stream was handed over once");

    // Asked again, the file is local now: the found branch.
    assert_eq!(read(&s3, "two.txt").unwrap(), b"diagram two");
    let again = steps(&["d2-s3"], "two.txt", &DIAGRAM_2);
    assert_eq!(
        again[again.len() - 3..].to_vec(),
        expected(&[
            ("d2-s3", "Server", "Request file"),
            ("d2-s3", "Server", "Check local storage"),
            ("d2-s3", "Server", "Send file"),
        ])
    );
}

/// In a chain, only the node where the store was made pushes the bytes;
/// the next hop fetches them after a small announcement. Each link carries
/// the file exactly once.
#[test]
fn a_store_crosses_each_link_of_a_chain_once() {
    capture_logs();
    let dir = TempDir::new("relay");
    let n1 = node(&dir, "r-n1", None);
    let n2 = node(&dir, "r-n2", Some(&n1));
    let n3 = node(&dir, "r-n3", Some(&n2));
    let n4 = node(&dir, "r-n4", Some(&n3));
    let nodes = [n1, n2, n3, n4];
    wait_for_peers(&nodes, &[1, 2, 2, 1]);

    let content = common::pseudo_random_bytes(300_000, 7);
    nodes[0].store("chain.bin", &content[..]).unwrap();
    for node in &nodes[1..] {
        wait_until("every node to hold chain.bin", || holds(node, "chain.bin"), |held| *held);
        assert_eq!(read(node, "chain.bin").unwrap(), content);
    }
    let received: Vec<u64> = nodes.iter().map(|n| n.stats().bytes_received).collect();
    assert_eq!(received, [0, 300_000, 300_000, 300_000]);
    // n3 and n4 fetched after an announcement: each one's read loop handed
    // the reply's stream to its handler.
    for node in &nodes[2..] {
        assert_eq!(node.stats().handoffs, 1, "{}", node.name());
    }
    let fetched = steps(&["r-n3", "r-n4"], "chain.bin", &["Fetching", "Lock transport layer"]);
    assert_eq!(fetched.len(), 4, "n3 and n4 each asked once and locked once: {fetched:?}");
}

/// In a full mesh every node is a direct peer of the origin and gets its
/// push; the announcements that cross the mesh meanwhile must not make
/// anyone fetch a second copy. Each node receives the file once.
#[test]
fn a_store_in_a_full_mesh_moves_one_copy_per_node() {
    capture_logs();
    let dir = TempDir::new("mesh");
    let mut nodes: Vec<FileServer> = Vec::new();
    for i in 0..4 {
        let mut config = config(&format!("m-n{}", i + 1), dir.path());
        quiet(&mut config);
        config.bootstrap = nodes.iter().map(|n| n.local_addr().to_string()).collect();
        nodes.push(start(config));
    }
    wait_for_peers(&nodes, &[3, 3, 3, 3]);
    let content = common::pseudo_random_bytes(200_000, 11);
    for round in 0..5 {
        let key = format!("mesh-{round}.bin");
        nodes[0].store(&key, &content[..]).unwrap();
        for node in &nodes[1..] {
            wait_until("every node to hold the file", || holds(node, &key), |held| *held);
        }
    }
    let received: Vec<u64> = nodes.iter().map(|n| n.stats().bytes_received).collect();
    assert_eq!(received, [0, 1_000_000, 1_000_000, 1_000_000]);
}

/// Three nodes hold a file; a fourth, connected to all three, asks for it.
/// Each holder offers, the `get` picks one, and one copy crosses.
#[test]
fn a_get_with_three_holders_moves_one_copy() {
    capture_logs();
    let dir = TempDir::new("holders");
    let h1 = node(&dir, "h-n1", None);
    let h2 = node(&dir, "h-n2", Some(&h1));
    let h3 = node(&dir, "h-n3", Some(&h1));
    let holders = [h1, h2, h3];
    wait_for_peers(&holders, &[2, 1, 1]);
    let content = common::pseudo_random_bytes(250_000, 5);
    holders[0].store("held.bin", &content[..]).unwrap();
    for holder in &holders[1..] {
        wait_until("every holder to hold held.bin", || holds(holder, "held.bin"), |held| *held);
    }

    let mut config = config("h-n4", dir.path());
    quiet(&mut config);
    config.bootstrap = holders.iter().map(|h| h.local_addr().to_string()).collect();
    let asker = start(config);
    wait_until("h-n4 to connect to the three holders", || asker.peers().len(), |n| *n == 3);
    assert_eq!(read(&asker, "held.bin").unwrap(), content);
    assert_eq!(asker.stats().bytes_received, 250_000, "one copy crossed");
    let offers = steps(&["h-n1", "h-n2", "h-n3"], "held.bin", &["Retrieve File Stream"]);
    assert_eq!(offers.len(), 3, "every holder offered: {offers:?}");
    // h-n1 pushed to h-n2 and h-n3, and one holder streamed to h-n4. A
    // sender counts a stream once its last byte is written, which can be a
    // moment after the asker has read it: wait for three copies, then check
    // there are no more.
    let sent = wait_until(
        "the holders to count the bytes they sent",
        || holders.iter().map(|h| h.stats().bytes_sent).sum::<u64>(),
        |sent| *sent >= 3 * 250_000,
    );
    assert_eq!(sent, 3 * 250_000, "the holders streamed three copies in all");
}

/// A node that has just joined catches up by anti-entropy, and is asked
/// for files at the same moment: each file crosses once, either by the
/// catch-up or by the `get`, never by both.
#[test]
fn a_fresh_node_asked_while_it_catches_up_moves_one_copy_of_each_file() {
    capture_logs();
    let dir = TempDir::new("catch-up");
    let mut holders: Vec<FileServer> = Vec::new();
    for i in 0..3 {
        let mut config = config(&format!("c-n{}", i + 1), dir.path());
        config.discover_peers = false;
        config.bootstrap = holders.iter().map(|n| n.local_addr().to_string()).collect();
        holders.push(start(config));
    }
    wait_for_peers(&holders, &[2, 2, 2]);
    let keys = ["c-0.bin", "c-1.bin", "c-2.bin", "c-3.bin"];
    let contents: Vec<Vec<u8>> =
        (0..keys.len()).map(|i| common::pseudo_random_bytes(100_000, 20 + i as u64)).collect();
    for (key, content) in keys.iter().zip(&contents) {
        holders[0].store(key, &content[..]).unwrap();
    }
    for holder in &holders[1..] {
        wait_until("every holder to hold every file", || common::keys(holder), |k| k.len() == 4);
    }

    let mut config = config("c-n4", dir.path());
    config.discover_peers = false;
    config.bootstrap = holders.iter().map(|n| n.local_addr().to_string()).collect();
    let fresh = start(config);
    wait_until("c-n4 to connect to the three holders", || fresh.peers().len(), |n| *n == 3);
    // Asked at once, while its catch-up is under way.
    for (key, content) in keys.iter().zip(&contents) {
        assert_eq!(&read(&fresh, key).unwrap(), content);
    }
    wait_until("c-n4 to hold every file", || common::keys(&fresh), |k| k.len() == 4);
    // A second copy asked for meanwhile would still be on its way: let a
    // few anti-entropy rounds (each a frame from every holder) go by first.
    let frames = fresh.stats().frames_received;
    wait_until("a few anti-entropy rounds", || fresh.stats().frames_received, |n| *n >= frames + 9);
    let labels = ["Fetching", "Send metadata", "Lock transport layer", "Waiting for the copy"];
    let flows: Vec<_> = keys.iter().map(|key| steps(&["c-n4"], key, &labels)).collect();
    assert_eq!(fresh.stats().bytes_received, 400_000, "each file crossed once: {flows:#?}");
}

/// A fake holder on its own connection to `node`: answers each `Get` for
/// `key` with an offer of `content` at `version`, and each go-ahead with
/// the file, sending its bytes one at a time, `per_second` a second (0: all
/// at once). Reports each go-ahead on `went`, and returns when the
/// node closes the connection. `writer` is the same connection, for the
/// test to send frames of its own.
fn fake_holder(
    stream: std::net::TcpStream,
    key: &'static str,
    version: gossipfs::Version,
    content: Vec<u8>,
    per_second: usize,
    went: std::sync::mpsc::Sender<()>,
) -> (std::thread::JoinHandle<()>, std::sync::Arc<Mutex<std::net::TcpStream>>) {
    use gossipfs::frame::{Frame, read_frame, write_frame};
    use std::io::{BufReader, Write};
    let writer = std::sync::Arc::new(Mutex::new(stream.try_clone().unwrap()));
    let out = std::sync::Arc::clone(&writer);
    let thread = std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let sha1 = common::sha1_of(&content[..]).unwrap();
        let size = content.len() as u64;
        while let Ok(Some(frame)) = read_frame(&mut reader) {
            let mut out = out.lock().unwrap();
            let sent = match frame {
                Frame::Get { request, key: asked } if asked == key => {
                    let offer = Frame::Offer { request, key: asked, version, size, sha1 };
                    write_frame(&mut *out, &offer)
                }
                Frame::GoAhead { request, key: asked, .. } if asked == key => {
                    let _ = went.send(());
                    let file = Frame::File { request, key: asked, version, size, sha1 };
                    if write_frame(&mut *out, &file).is_err() {
                        return;
                    }
                    if per_second == 0 {
                        let _ = out.write_all(&content);
                        continue;
                    }
                    // A trickle: a byte, then a pause, for ever (the file
                    // is long enough never to end). The pause is the fault
                    // being played, not a wait for a condition.
                    let pause = std::time::Duration::from_secs(1) / per_second as u32;
                    for byte in content.chunks(1) {
                        if out.write_all(byte).is_err() {
                            return;
                        }
                        std::thread::sleep(pause);
                    }
                    Ok(())
                }
                _ => Ok(()), // summaries, peer lists, pings, releases
            };
            if sent.is_err() {
                return;
            }
        }
    });
    (thread, writer)
}

/// Two holders; the one the `get` picks (it offers the newer version)
/// trickles ten bytes a second (the floor is 64 KiB a second), which no
/// heartbeat would notice. The `get` cuts
/// it off by the floor rate and is served by the other. Meanwhile the other
/// holder's connection is never parked: a `Store` it sends while the trickle
/// goes on is applied before the trickler is cut off.
#[test]
fn a_trickling_holder_is_cut_off_and_parks_no_other_connection() {
    use gossipfs::Version;
    use gossipfs::frame::{Frame, write_frame};
    use std::sync::mpsc;
    capture_logs();
    let dir = TempDir::new("trickle");
    let mut config = config("t-n1", dir.path());
    quiet(&mut config);
    // The fakes send no heartbeats: only the floor rate may cut them off.
    config.heartbeat_timeout = std::time::Duration::from_secs(60);
    let asker = start(config);
    let (trickler_id, good_id) = (common::fake_id(), common::fake_id());
    let trickler = common::handshaken_peer(&asker, trickler_id);
    let good = common::handshaken_peer(&asker, good_id);
    wait_until("both fakes to be peers", || asker.peers().len(), |n| *n == 2);

    let (went_tx, went) = mpsc::channel();
    // Ten bytes a second, so the trickler hears it was cut off within a
    // tenth of a second; a thousand of them last far past the floor's
    // two-second window.
    let slow = vec![b's'; 1000];
    let newer = Version { time: 2 << 16, node: trickler_id };
    let (trickling, _) = fake_holder(trickler, "wanted", newer, slow, 10, went_tx.clone());
    let content = b"from the good holder".to_vec();
    let older = Version { time: 1 << 16, node: good_id };
    let (serving, good_writer) = fake_holder(good, "wanted", older, content.clone(), 0, went_tx);

    std::thread::scope(|scope| {
        let getter = scope.spawn(|| read(&asker, "wanted"));
        went.recv_timeout(common::DEADLINE).expect("the newer offer gets the go-ahead");
        // The trickle has begun. A store from the other holder now:
        let meanwhile = b"sent meanwhile";
        let store = Frame::Store {
            key: "meanwhile".into(),
            version: Version { time: 3 << 16, node: good_id },
            size: meanwhile.len() as u64,
            sha1: common::sha1_of(&meanwhile[..]).unwrap(),
        };
        {
            let mut out = good_writer.lock().unwrap();
            write_frame(&mut *out, &store).unwrap();
            std::io::Write::write_all(&mut *out, meanwhile).unwrap();
        }
        wait_until("the store sent meanwhile", || holds(&asker, "meanwhile"), |held| *held);
        assert!(!trickling.is_finished(), "applied while the trickle still went on");
        assert_eq!(getter.join().unwrap().unwrap(), content, "served by the other holder");
    });
    went.recv_timeout(common::DEADLINE).expect("the other holder got the go-ahead");
    wait_until("the trickler to be cut off", || trickling.is_finished(), |done| *done);
    drop(asker);
    serving.join().unwrap();
}

/// A quiet node named `name`, and a fake peer of it (its id and its
/// connection), registered.
fn node_and_fake(dir: &TempDir, name: &str) -> (FileServer, u64, std::net::TcpStream) {
    capture_logs();
    let mut config = config(name, dir.path());
    quiet(&mut config);
    let node = start(config);
    let fake_id = common::fake_id();
    let fake = common::handshaken_peer(&node, fake_id);
    wait_until("the fake to be a peer", || node.peers().len(), |n| *n == 1);
    (node, fake_id, fake)
}

/// A holder that pushes the file (diagram 1) and then offers it: by the time
/// the `get` reads the offer, the push is committed, so it serves that copy
/// and gives no go-ahead. A second copy is never asked for.
#[test]
fn a_get_served_by_a_push_that_came_meanwhile_asks_for_no_second_copy() {
    use gossipfs::Version;
    use gossipfs::frame::{Frame, read_frame, write_frame};
    use std::io::{BufReader, Write};
    let dir = TempDir::new("push-meanwhile");
    let (asker, holder_id, holder) = node_and_fake(&dir, "p-n1");

    let content = b"pushed, then offered".to_vec();
    let (sha1, size) = (common::sha1_of(&content[..]).unwrap(), content.len() as u64);
    let version = Version { time: 1 << 16, node: holder_id };
    let fake = std::thread::spawn(move || {
        let mut out = holder.try_clone().unwrap();
        let mut frames = BufReader::new(holder);
        let mut go_aheads = 0;
        while let Ok(Some(frame)) = read_frame(&mut frames) {
            match frame {
                Frame::Get { request, key } => {
                    let store = Frame::Store { key: key.clone(), version, size, sha1 };
                    write_frame(&mut out, &store).unwrap();
                    out.write_all(&content).unwrap();
                    let offer = Frame::Offer { request, key, version, size, sha1 };
                    write_frame(&mut out, &offer).unwrap();
                }
                Frame::GoAhead { .. } => go_aheads += 1,
                // Pushed after the get returned: everything before it is read.
                Frame::Store { key, .. } if key == "marker" => return go_aheads,
                _ => {}
            }
        }
        go_aheads
    });
    assert_eq!(read(&asker, "raced").unwrap(), b"pushed, then offered");
    asker.store("marker", &b"after the get"[..]).unwrap();
    assert_eq!(fake.join().unwrap(), 0, "no go-ahead for a file already held");
    assert_eq!(asker.stats().bytes_received, size, "one copy crossed");
}

/// A `get` for a file whose push is streaming in right now waits for that
/// copy instead of asking its peers for a second one.
#[test]
fn a_get_waits_for_the_copy_already_on_its_way() {
    use gossipfs::Version;
    use gossipfs::frame::{Frame, read_frame, write_frame};
    use std::io::{BufReader, Write};
    let dir = TempDir::new("on-its-way");
    let (asker, pusher_id, pusher) = node_and_fake(&dir, "w-n1");

    let content = common::pseudo_random_bytes(20_000, 9);
    let (sha1, size) = (common::sha1_of(&content[..]).unwrap(), content.len() as u64);
    let version = Version { time: 1 << 16, node: pusher_id };
    let mut out = pusher.try_clone().unwrap();
    // Half the push now, the rest once the get waits for it.
    write_frame(&mut out, &Frame::Store { key: "coming".into(), version, size, sha1 }).unwrap();
    out.write_all(&content[..10_000]).unwrap();
    let listener = std::thread::spawn(move || {
        let mut frames = BufReader::new(pusher);
        let mut asked = 0;
        while let Ok(Some(frame)) = read_frame(&mut frames) {
            match frame {
                Frame::Get { .. } | Frame::GoAhead { .. } => asked += 1,
                // Pushed after the get returned: everything before it is read.
                Frame::Store { key, .. } if key == "marker" => return asked,
                _ => {}
            }
        }
        asked
    });
    // The push is streaming in: its first bytes are read.
    wait_until("the push to stream in", || asker.stats().bytes_received, |n| *n > 0);
    std::thread::scope(|scope| {
        let getter = scope.spawn(|| read(&asker, "coming"));
        let waiting = || steps(&["w-n1"], "coming", &["Waiting for the copy on its way"]);
        wait_until("the get to wait for the push", waiting, |s| !s.is_empty());
        out.write_all(&content[10_000..]).unwrap();
        assert_eq!(getter.join().unwrap().unwrap(), content);
    });
    asker.store("marker", &b"after the get"[..]).unwrap();
    assert_eq!(listener.join().unwrap(), 0, "the get asked no peer");
    assert_eq!(asker.stats().bytes_received, size, "one copy crossed");
}
