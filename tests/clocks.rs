//! Versions from a hybrid logical clock, tested with threaded nodes on
//! loopback: the last write in real time wins, after a restart and after a
//! partition, and a clear spares what the other side wrote after it.

mod common;

use common::{FaultProxy, TempDir, config, init_logging, read, start, wait_for_peers, wait_until};
use gossipfs::{Config, FileServer, Version};

/// The version `node` holds for `key`, if any, without a `get`.
fn held(node: &FileServer, key: &str) -> Option<Version> {
    node.list().into_iter().find(|f| f.key == key).map(|f| f.version)
}

/// Waits until the wall clock has passed `version`'s millisecond, so that
/// the next write is later in real time. (A condition, not a sleep: it
/// returns as soon as the clock has moved.)
fn wait_past(version: Version) {
    wait_until(
        "the wall clock to pass the last write",
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis(),
        |now| *now > u128::from(version.millis()),
    );
}

/// A node is stopped while the cluster keeps writing `k`, restarts on its
/// own root, and a client writes `k` to it at once, before it has heard
/// anything from its peers. That write is the last in real time: it must
/// win everywhere. (With Lamport counters the restarted node stamped it
/// below the cluster's versions, and anti-entropy undid it.)
#[test]
fn a_write_right_after_a_restart_survives_though_the_cluster_moved_on() {
    init_logging();
    let dir = TempDir::new("clock-restart");
    let n1 = start(config("cr-n1", dir.path()));
    let n2 = start({
        let mut c = config("cr-n2", dir.path());
        c.bootstrap = vec![n1.local_addr().to_string()];
        c
    });
    let n3_config = |n2: &FileServer| {
        let mut c = config("cr-n3", dir.path());
        c.bootstrap = vec![n2.local_addr().to_string()];
        c
    };
    let n3 = start(n3_config(&n2));
    wait_until("n3 to join", || n3.peers().len(), |n| *n >= 1);
    n1.store("k", &b"first"[..]).unwrap();
    wait_until("k on n3", || held(&n3, "k"), Option::is_some);
    drop(n3);

    // The cluster moves on without n3.
    for i in 0..20 {
        n1.store("k", format!("cluster write {i}").as_bytes()).unwrap();
    }
    let cluster_last = held(&n1, "k").unwrap();
    wait_until("n2 to catch up", || held(&n2, "k"), |v| *v == Some(cluster_last));

    // n3 restarts on its root and takes a write at once.
    wait_past(cluster_last);
    let n3 = start(n3_config(&n2));
    n3.store("k", &b"written right after the restart"[..]).unwrap();
    let mine = held(&n3, "k").unwrap();
    assert!(mine > cluster_last, "{mine} must beat {cluster_last}");

    for node in [&n1, &n2, &n3] {
        wait_until(
            &format!("{} to hold the restarted node's write", node.name()),
            || held(node, "k"),
            |v| *v == Some(mine),
        );
        assert_eq!(read(node, "k").unwrap(), b"written right after the restart");
    }
}

/// Two nodes joined only through a fault proxy. During a partition one
/// side writes `k` many times and clears everything; the other side,
/// later in real time, writes `k` once and stores a new file. After the
/// heal, the later write of `k` wins (not the busier side), the clear
/// removes what was older than it, and the files stored after it survive.
#[test]
fn after_a_partition_the_later_write_wins_and_a_clear_spares_later_files() {
    init_logging();
    let dir = TempDir::new("clock-partition");
    let quiet = |c: &mut Config| c.discover_peers = false;
    let n1 = start({
        let mut c = config("cp-n1", dir.path());
        quiet(&mut c);
        c
    });
    let proxy = FaultProxy::start(n1.local_addr());
    let n2 = start({
        let mut c = config("cp-n2", dir.path());
        quiet(&mut c);
        c.bootstrap = vec![proxy.addr().to_string()];
        c
    });
    let nodes = [n1, n2];
    wait_for_peers(&nodes, &[1, 1]);
    for key in ["k", "old-a", "old-b"] {
        nodes[0].store(key, key.as_bytes()).unwrap();
    }
    for key in ["k", "old-a", "old-b"] {
        wait_until("the files on n2", || held(&nodes[1], key), Option::is_some);
    }

    proxy.partition();
    // The busy side: thirty writes of k, then a clear.
    for i in 0..30 {
        nodes[0].store("k", format!("busy side {i}").as_bytes()).unwrap();
    }
    nodes[0].clear().unwrap();
    // A file stored after the clear on the same node: its version is above
    // the clear's, so once the wall clock passes it, both are in the past.
    nodes[0].store("marker", &b"after the clear, busy side"[..]).unwrap();
    wait_past(held(&nodes[0], "marker").unwrap());
    // The other side, later in real time, and unaware of the clear.
    nodes[1].store("k", &b"later side"[..]).unwrap();
    nodes[1].store("new", &b"stored after the clear"[..]).unwrap();
    let later = held(&nodes[1], "k").unwrap();
    proxy.heal();

    for node in &nodes {
        let name = node.name().to_string();
        wait_until(
            &format!("{name} to hold the later k, the files after the clear, no old one"),
            || node.list().into_iter().map(|f| (f.key, f.version)).collect::<Vec<_>>(),
            |files| {
                let keys: Vec<&str> = files.iter().map(|(k, _)| k.as_str()).collect();
                keys == ["k", "marker", "new"] && files[0].1 == later
            },
        );
        assert_eq!(read(node, "k").unwrap(), b"later side");
        assert_eq!(read(node, "new").unwrap(), b"stored after the clear");
    }
}
