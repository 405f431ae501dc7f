//! The demo that `make run` runs: a file stored, fetched and deleted across
//! a chain of three nodes.
//!
//! Three nodes in one process on 127.0.0.1:5000-5002, in a chain: s2
//! bootstraps from s1, s3 from s2, and peer discovery is off so the chain
//! stays a chain. s1 stores `file.png`; s2 gets it and logs its content; s3
//! deletes it. The delete reaches s1 only through s2's relay: a change
//! crosses more than one hop. The demo waits until all three nodes agree,
//! prints what each holds, shuts the nodes down and removes its directory.

use std::io::Read;
use std::time::{Duration, Instant};

use gossipfs::{Config, Error, FileServer, Result};
use log::info;

use super::ScratchDir;

/// The ports of the three demo nodes: fixed, so the log is easy to follow.
const DEMO_PORTS: [u16; 3] = [5000, 5001, 5002];

/// How long the demo waits for the cluster to reach each state.
const DEMO_DEADLINE: Duration = Duration::from_secs(20);

/// Runs the demo; see the module doc.
///
/// # Errors
///
/// [`Error::Io`] if a port is taken or the temp directory cannot be made;
/// [`Error::Timeout`] if the cluster does not converge in time.
pub fn run() -> Result<()> {
    let dir = ScratchDir::new("demo")?;
    let mut nodes: Vec<FileServer> = Vec::new();
    for (i, port) in DEMO_PORTS.iter().enumerate() {
        let name = format!("s{}", i + 1);
        let mut config = Config::new(&name, dir.0.join(&name));
        config.listen = format!("127.0.0.1:{port}");
        config.fsync = false;
        config.discover_peers = false;
        if i > 0 {
            config.bootstrap = vec![format!("127.0.0.1:{}", DEMO_PORTS[i - 1])];
        }
        let node = FileServer::start(config).map_err(|err| {
            Error::Io(std::io::Error::other(format!(
                "cannot start {name} on 127.0.0.1:{port}: {err} (is another demo running?)"
            )))
        })?;
        nodes.push(node);
    }
    let [s1, s2, s3] = &nodes[..] else {
        unreachable!("three nodes were started")
    };
    wait_until("the chain s1 - s2 - s3 to connect", || {
        s1.peers().len() == 1 && s2.peers().len() == 2 && s3.peers().len() == 1
    })?;

    let content = b"my big data file here! (a stand-in for file.png)";
    info!(target: s1.name(), "Demo: storing file.png ({} bytes) on s1", content.len());
    s1.store("file.png", &content[..])?;

    let mut fetched = Vec::new();
    s2.get("file.png")?.read_to_end(&mut fetched)?;
    info!(
        target: s2.name(),
        "Demo: s2 got file.png: {:?}",
        String::from_utf8_lossy(&fetched)
    );
    wait_until("file.png to reach s3", || {
        s3.list().iter().any(|f| f.key == "file.png")
    })?;

    info!(target: s3.name(), "Demo: s3 deletes file.png; the delete travels s3 -> s2 -> s1");
    s3.delete("file.png")?;
    wait_until("every node to drop file.png", || {
        nodes.iter().all(|node| node.list().is_empty())
    })?;

    println!();
    println!("All three nodes agree:");
    for node in &nodes {
        let files: Vec<String> = node.list().into_iter().map(|f| f.key).collect();
        let peers: Vec<String> = node.peers().into_iter().map(|p| p.name).collect();
        println!(
            "  {} ({}): files [{}], peers [{}]",
            node.name(),
            node.local_addr(),
            files.join(", "),
            peers.join(", ")
        );
    }
    println!("file.png was stored on s1, fetched by s2, deleted on s3 and is gone everywhere.");
    drop(nodes);
    Ok(())
}

/// Polls `condition` until it holds, or fails after [`DEMO_DEADLINE`].
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + DEMO_DEADLINE;
    while !condition() {
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!("waiting for {what}")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
