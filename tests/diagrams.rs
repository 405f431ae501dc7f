//! The two sequence diagrams, tested as diagrams: a `log` sink of our own
//! captures every node's debug lines, and each flow's step labels must
//! appear in the diagram's order, each logged by the node whose actor
//! performs it. Also: relays travel by announcement, so a store crosses
//! each link once.
//!
//! Every node here runs with anti-entropy and discovery off, so the only
//! traffic is the flow under test and the paths are deterministic.

mod common;

use std::sync::{Mutex, OnceLock};

use common::{TempDir, config, read, start, wait_for_peers, wait_until};
use gossipfs::{Config, FileServer};

/// Every log line of every node in this test binary: (node name, message).
static LINES: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        let line = (record.target().to_string(), record.args().to_string());
        LINES.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
    fn flush(&self) {}
}

fn capture_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        log::set_logger(&Capture).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Debug);
    });
}

/// The diagram steps logged so far by the nodes in `names` about `key`, as
/// (node, label), in the order they were logged. A line is a step if it
/// starts with one of `labels` and names the key.
fn steps(names: &[&str], key: &str, labels: &[&str]) -> Vec<(String, String)> {
    let lines = LINES.lock().unwrap_or_else(|e| e.into_inner());
    let key_field = format!("key={key}");
    lines
        .iter()
        .filter(|(node, _)| names.contains(&node.as_str()))
        .filter_map(|(node, message)| {
            let label = labels.iter().find(|l| message.starts_with(**l))?;
            // Lock and unlock lines name the key on lock only; keep both.
            let about_key = message.split(' ').any(|field| field == key_field);
            (about_key || label.starts_with("Unlock")).then(|| (node.clone(), label.to_string()))
        })
        .collect()
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

fn expected(steps: &[(&str, &str)]) -> Vec<(String, String)> {
    steps.iter().map(|(node, label)| (node.to_string(), label.to_string())).collect()
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
    // The last step (the unlock) is logged just after the commit that made
    // the file readable: wait for it rather than race it.
    let names = ["d1-s1", "d1-s2"];
    let got = wait_until(
        "the unlock on d1-s2",
        || steps(&names, "one.txt", &DIAGRAM_1),
        |s| s.last().is_some_and(|(_, l)| l.starts_with("Unlock")),
    );
    assert_eq!(
        got,
        expected(&[
            ("d1-s1", "Upload file"),
            ("d1-s1", "Save file"),
            ("d1-s1", "Send metadata (filename, size)"),
            ("d1-s1", "Send metadata by TCP"),
            ("d1-s2", "Send metadata (filename, size)"),
            ("d1-s2", "Lock transport layer"),
            ("d1-s2", "Stream file data"),
            ("d1-s2", "Save file"),
            ("d1-s2", "Unlock transport layer"),
        ])
    );
    let handoffs = nodes[1].stats().handoffs;
    assert_eq!(handoffs, 1, "d1-s2's read loop handed one stream over and waited");
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
    let start = got.iter().position(|(n, _)| n == "d2-s3").expect("d2-s3 logged the get");
    assert_eq!(
        got[start..].to_vec(),
        expected(&[
            ("d2-s3", "Request file"),
            ("d2-s3", "Check local storage"),
            ("d2-s3", "File not found"),
            ("d2-s3", "Broadcast getfile"),
            ("d2-s3", "Get File"),
            ("d2-s1", "Peer receives getfile"),
            ("d2-s1", "Get file"),
            ("d2-s1", "Retrieve File Stream"),
            ("d2-s1", "Send metadata (filename, size)"),
            ("d2-s1", "Send metadata (filename, size)"),
            ("d2-s3", "Send metadata (filename, size)"),
            ("d2-s3", "Lock transport layer"),
            ("d2-s3", "Stream file data"),
            ("d2-s3", "Unlock transport layer"),
            ("d2-s3", "Serve file"),
        ])
    );
    assert_eq!(s3.stats().handoffs, 1, "the get's stream was handed over once");

    // Asked again, the file is local now: the found branch.
    assert_eq!(read(&s3, "two.txt").unwrap(), b"diagram two");
    let again = steps(&["d2-s3"], "two.txt", &DIAGRAM_2);
    assert_eq!(
        again[again.len() - 3..].to_vec(),
        expected(&[
            ("d2-s3", "Request file"),
            ("d2-s3", "Check local storage"),
            ("d2-s3", "Send file"),
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
    let fetched = steps(&["r-n3", "r-n4"], "chain.bin", &["Get File", "Lock transport layer"]);
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
