//! The demo that `make run` runs: the two sequence diagrams, walked on
//! three nodes in this process, each step printed as the node that does it
//! logs it.
//!
//! 1. s1 and s2 start (on 127.0.0.1:5000-5001 by default); s1 stores
//!    `file.png`: diagram 1, from the upload on s1 to the unlock on s2.
//! 2. s3 starts (on 127.0.0.1:5002), connected to s1 only, with anti-entropy
//!    off: it was offline during the store and does not catch up by itself,
//!    so it truly lacks the file. It asks for it: diagram 2, through the
//!    network.
//! 3. Every node holds the same bytes; the demo says so and stops.
//!
//! The three ports are [`Ports`]: three in a row from a first one, or
//! three the system picks (port 0), so that a test can run the demo while
//! something else holds 5000-5002.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gossipfs::{Config, Error, FileServer, Result};

use super::ScratchDir;

/// The first of the three demo ports by default, as in the Go original:
/// s1, s2 and s3 listen on 5000, 5001 and 5002.
pub const DEFAULT_FIRST_PORT: u16 = 5000;

/// Where the three demo nodes listen, on 127.0.0.1.
#[derive(Clone, Copy, Debug)]
pub enum Ports {
    /// s1 on this port, s2 on the next, s3 on the one after.
    From(u16),
    /// Three ports the system picks (each node binds port 0).
    Any,
}

impl Ports {
    /// The ports for `--port N`: 0 means [`Ports::Any`]; `None` if
    /// N + 2 is past the last port.
    pub fn from_first(first: u16) -> Option<Ports> {
        match first {
            0 => Some(Ports::Any),
            _ => first.checked_add(2).map(|_| Ports::From(first)),
        }
    }

    /// The port of node `i` (0 for s1), 0 for "any".
    fn port(self, i: usize) -> u16 {
        match self {
            // `from_first` made sure `first + 2` fits.
            Ports::From(first) => first + i as u16,
            Ports::Any => 0,
        }
    }
}

/// How long the demo waits for the cluster to reach each state.
const DEMO_DEADLINE: Duration = Duration::from_secs(20);

/// The step labels of both diagrams, as the nodes log them. Lines that
/// start with one of these are printed; the rest of the log is not.
const STEPS: [&str; 18] = [
    "Upload file",
    "Save file",
    "Commit batch",
    "Send metadata (filename, size)",
    "Send metadata by TCP",
    "Lock transport layer",
    "Stream file data",
    "Unlock transport layer",
    "Request file",
    "Check local storage",
    "Send file",
    "File not found",
    "Broadcast getfile",
    "Get File",
    "Peer receives getfile",
    "Get file",
    "Retrieve File Stream",
    "Serve file",
];

/// Prints each diagram step as `HH:MM:SS.mmm  node  step  details`, and
/// remembers the printed steps so the demo can wait for a flow's last one.
struct StepPrinter {
    printed: Mutex<Vec<(String, &'static str)>>,
    /// Set once both diagrams are shown: the demo's own checks are quiet.
    muted: AtomicBool,
}

static PRINTER: StepPrinter =
    StepPrinter { printed: Mutex::new(Vec::new()), muted: AtomicBool::new(false) };

impl log::Log for StepPrinter {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Debug
    }

    fn log(&self, record: &log::Record) {
        let message = record.args().to_string();
        let Some(step) = STEPS.iter().find(|s| message.starts_with(**s)) else {
            return;
        };
        if self.muted.load(Ordering::SeqCst) {
            return;
        }
        let details = without_versions(message[step.len()..].trim());
        let node = record.target();
        let actor = actor(node, std::thread::current().name().unwrap_or(""));
        let mut printed = self.printed.lock().unwrap_or_else(|e| e.into_inner());
        println!("{}  {node:<3}{actor:<7} {step:<31} {details}", clock());
        printed.push((node.to_string(), step));
    }

    fn flush(&self) {
        let _ = std::io::stdout().flush();
    }
}

/// Which actor of the diagrams logged a step, from the name of the thread
/// that did it: a node names its threads "NODE TL ..." (a connection's read
/// loop or writer) and "NODE Peer ..." (a connection's handler); any other
/// thread is the demo itself calling `store` or `get` on the Server.
fn actor(node: &str, thread: &str) -> &'static str {
    match thread.strip_prefix(node) {
        Some(rest) if rest.starts_with(" TL ") => "TL",
        Some(rest) if rest.starts_with(" Peer ") => "Peer",
        Some(" commit") => "Store",
        _ => "Server",
    }
}

/// Drops the `version=` fields (the nodes' own logs keep them), so that the
/// demo's lines fit in 100 columns.
fn without_versions(details: &str) -> String {
    let fields = details.split(' ').filter(|field| !field.starts_with("version="));
    fields.collect::<Vec<_>>().join(" ")
}

/// The time of day, UTC, as HH:MM:SS.mmm.
fn clock() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let ms = now.as_millis() % (24 * 3600 * 1000);
    let (h, m, s) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}", ms % 1000)
}

/// Runs the demo; see the module doc.
///
/// # Errors
///
/// [`Error::Io`] naming the address if a port is taken, or if the temp
/// directory cannot be made; [`Error::Timeout`] if the cluster does not
/// reach a state in time.
pub fn run(ports: Ports) -> Result<()> {
    // The demo prints the steps itself; a second logger is not installed.
    if log::set_logger(&PRINTER).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
    }
    let started = Instant::now();
    // All three ports are bound before anything is printed: a taken port
    // fails the demo at once, naming the address.
    let [l1, l2, l3] = [0, 1, 2].map(|i| bind(ports, i));
    let (l1, l2, l3) = (l1?, l2?, l3?);
    let dir = ScratchDir::new("demo")?;
    println!("gossipfs demo: the two sequence diagrams on three nodes in this process");
    println!("Each line: time, node and actor (Server, TL: its transport layer, Peer: the");
    println!("handler of a peer's frames, Store: its committer), the step, its details.");

    let s1 = start_node(&dir, 0, l1, None)?;
    let s1_addr = s1.local_addr().to_string();
    let s2 = start_node(&dir, 1, l2, Some(&s1_addr))?;
    wait_until("s1 and s2 to connect", || !s1.peers().is_empty() && !s2.peers().is_empty())?;

    println!();
    println!("== Diagram 1: saving a file. A client uploads file.png to s1; s1 pushes it to s2 ==");
    let content = b"my big data file here! (a stand-in for file.png)";
    s1.store("file.png", &content[..])?;
    wait_until("s2 to commit file.png", || printed("s2", "Commit batch"))?;

    println!();
    println!("== Diagram 2: getting a file through the network ==");
    println!("s3 was offline during the store. It starts now, connected to s1 only, with");
    println!("anti-entropy off, so it lacks file.png and must ask its peers for it.");
    let s3 = start_node(&dir, 2, l3, Some(&s1_addr))?;
    wait_until("s3 to connect to s1", || !s3.peers().is_empty())?;
    let mut fetched = Vec::new();
    s3.get("file.png")?.read_to_end(&mut fetched)?;

    let nodes = [&s1, &s2, &s3];
    PRINTER.muted.store(true, Ordering::SeqCst);
    for node in nodes {
        let mut held = Vec::new();
        node.get("file.png")?.read_to_end(&mut held)?;
        if held != content {
            return Err(Error::Protocol(format!("{} holds other bytes", node.name())));
        }
    }
    println!();
    println!("== Summary ==");
    println!("All three nodes agree: each holds file.png, {} bytes:", content.len());
    println!("  {:?}", String::from_utf8_lossy(&fetched));
    for node in nodes {
        let stats = node.stats();
        println!(
            "  {} ({}): {} file bytes received, {} stream(s) handed over by its read loop",
            node.name(),
            node.local_addr(),
            stats.bytes_received,
            stats.handoffs,
        );
    }
    println!("Done in {} ms.", started.elapsed().as_millis());
    Ok(())
}

/// Whether `node` has printed `step`.
fn printed(node: &str, step: &str) -> bool {
    let printed = PRINTER.printed.lock().unwrap_or_else(|e| e.into_inner());
    printed.iter().any(|(n, s)| n == node && *s == step)
}

/// Binds the listener of demo node `i` (0 for s1).
fn bind(ports: Ports, i: usize) -> Result<TcpListener> {
    let addr = format!("127.0.0.1:{}", ports.port(i));
    TcpListener::bind(&addr).map_err(|err| {
        Error::Io(std::io::Error::new(
            err.kind(),
            format!(
                "cannot start s{} on {addr}: {err} (is another demo or `make cluster` \
                 running? `gossipfs demo --port N` takes N, N+1 and N+2; --port 0 lets \
                 the system pick)",
                i + 1
            ),
        ))
    })
}

/// Starts demo node `i` (s1, s2, s3) on `listener`, quiet apart from the
/// flows shown: no anti-entropy, no discovery.
fn start_node(
    dir: &ScratchDir,
    i: usize,
    listener: TcpListener,
    peer: Option<&str>,
) -> Result<FileServer> {
    let name = format!("s{}", i + 1);
    let mut config = Config::new(&name, dir.0.join(&name));
    config.fsync = false;
    config.anti_entropy = false;
    config.discover_peers = false;
    config.bootstrap = peer.map(str::to_string).into_iter().collect();
    FileServer::start_on(listener, config)
}

/// Polls `condition` until it holds, or fails after [`DEMO_DEADLINE`].
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + DEMO_DEADLINE;
    while !condition() {
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!("waiting for {what}")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
