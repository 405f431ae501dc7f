mod common;
use common::*;

#[test]
fn a_store_reaches_a_peer() {
    init_logging();
    let dir = TempDir::new("smoke");
    let nodes = chain(&dir, 2, |_| {});
    wait_for_peers(&nodes, &[1, 1]);
    nodes[0].store("k", &b"hello"[..]).unwrap();
    wait_until("k on n2", || keys(&nodes[1]), |k| k == &["k"]);
    assert_eq!(read(&nodes[1], "k").unwrap(), b"hello");
}
