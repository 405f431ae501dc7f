//! The benchmark behind `gossipfs bench`: how fast gossipfs moves files and
//! what it costs, each figure measured beside the plain code that does the
//! same work with nothing else, in the same run.
//!
//! Absolute times on a shared machine drift from one run to the next, so a
//! figure alone says little. Every figure is printed beside a *baseline*:
//! the same bytes moved by the simplest code that takes the same steps
//! (write a file, send it over a loopback socket, write it on the other
//! side), measured in the same process just before or just after (the order
//! alternates from round to round, so neither side always runs in the
//! other's wake). The ratio of the two is what to read.
//!
//! Everything runs in this one process: threaded nodes on `127.0.0.1`,
//! ephemeral ports, one directory per node under the system temp directory,
//! all removed at the end. Big files are deleted as soon as they are
//! measured; small ones stay until the end, because deleting thousands of
//! files makes the next creates slower on some file systems (ext4 without a
//! journal checks every recently freed inode it passes), which would charge
//! one side for the other's clean-up. Each scenario runs `rounds` times; the
//! table shows min / median / max over the rounds for each side and the
//! ratio of the medians (gossipfs ÷ baseline). The last line is
//! machine-readable, `bench: key=value ...`: the median of every figure
//! (`key`), of its baseline (`key_base`) and their ratio (`key_ratio`).
//!
//! Nodes run with anti-entropy and heartbeats made rare (once an hour), so
//! that their frames neither cost time nor show up in frame counts; with
//! peer discovery off (chains stay chains) except in scenario 5's
//! discovered meshes; and with fsync off except where a row says "fsync
//! on". Content is a 1 MiB pseudo-random pattern repeated: a memcpy to
//! produce, never a file's worth of memory.
//!
//! # Scenarios
//!
//! 1. **Big file, one hop** (`--size`, 1 GiB by default). Node A with one
//!    peer B: the time from `A.store()` until B lists the file, as MiB/s,
//!    fsync off and on. *Baseline*: the same bytes written to a local file,
//!    then read back and sent over a plain loopback socket into a file on
//!    the other side, through buffers of gossipfs's size (256 KiB), fsynced
//!    in the fsync-on row: gossipfs's steps without the framing, the SHA-1
//!    or the rename. Target: at least 0.8 of the baseline with fsync off.
//!    A third row sets the same figure beside a copy that also hashes the
//!    bytes as gossipfs must, while writing the first file and again on the
//!    far side. SHA-1 is slower than the plain copy and the two hashes
//!    cannot overlap (the hash travels in the header, before the bytes), so
//!    this row shows what gossipfs costs beyond its hashing.
//! 2. **Big file, store and forward**: the same through a chain of three
//!    nodes. *Baseline*: scenario 1's plain copy done twice in a row.
//! 3. **Small files.** `--files` files of 4 KiB stored on A one after the
//!    other, until B has committed all: files/s, and the p50 / p99 latency
//!    of `store()`. *Baseline*: create + write + rename of the same files,
//!    both sides at once (two threads, two directories). Target: at least
//!    0.5 of the baseline's files/s.
//! 4. **Network get.** The p50 / p99 latency of `get` of a 4 KiB file only
//!    the peer holds, and the throughput of `get` of a 64 MiB one.
//!    *Baseline*: a plain request over a kept-open loopback socket, the file
//!    sent back and written to a temp file that is renamed and opened. A
//!    file stays "only on the peer" because the peer stores its files before
//!    the asker joins (no relay), and the asker runs with
//!    [`Config::anti_entropy`] off (it never asks for a summary, never
//!    pulls).
//!
//!    Also the copies of a file one `get` moves when 1, 3 and 5 peers hold
//!    it: a 4 MiB file (capped at `--size`) stored in a full mesh of the
//!    holders, got by one more node connected to all of them (joined late,
//!    anti-entropy off, as above). Every holder offers, the asker gives one
//!    the go-ahead and releases the others, so one copy should move however
//!    many hold it. The count is the file bytes read from peers
//!    ([`gossipfs::Stats::bytes_received`]) once every frame sent has been
//!    read, ÷ the file size. *Baseline*: the least that can work, 1.
//! 5. **Convergence.** Chains of 5, 10 and 20 nodes: the time for a 4 KiB
//!    store made at one end to reach the other, and for a delete of it, per
//!    hop (median of a few changes per round). *Baseline*: a chain of plain
//!    relay threads, each of which reads the message, writes (or removes)
//!    its file and passes the message on. Target: under 5 ms per hop. Also
//!    the frames one small store sends in a full mesh of 5, and the copies
//!    of its content; *baseline*: the least that can work, one per other
//!    node (4).
//!
//!    And the copies of a 4 MiB file (capped at `--size`) one store moves in
//!    meshes of 5, 10 and 20 nodes that discovery built: each node
//!    bootstraps from the one before, with [`Config::discover_peers`] on and
//!    [`Config::max_peers`] at its default, and starts once the peer lists
//!    have held still; a context line gives each mesh's shape. The count is
//!    the file bytes every node read (stored or drained) once every node
//!    lists the file and every byte sent has been read, ÷ the file size.
//!    Anti-entropy is off, so every copy counted is the relay's.
//!    *Baseline*: the least that can work, N − 1.
//! 6. **Memory.** The process's peak resident memory (`VmHWM`, reset
//!    through `/proc/self/clear_refs` before each transfer) while scenario 1
//!    moves the big file, beside the same during the plain copy. Target:
//!    under 32 MiB, whatever the file size.
//! 7. **Folder put.** [`FOLDER_FILES`] files of 4 KiB in ten folders, put
//!    by the command line's own code ([`folder::walk`], then
//!    [`folder::put_tree`] over one client connection) to A of a pair, fsync
//!    on: the time from the start of the walk until B has every file.
//!    *Baseline*: the same durable work done file by file on two nodes,
//!    both at once: read each file, then create + write + fsync + rename +
//!    fsync of the folder. Target: under 0.35 s. A second row sets the same
//!    figure beside the *least-work limit*: both copies at once, each in one
//!    process with batched syncs (every file written, then all synced by
//!    as many threads as a node's batch uses, then all renamed, then the
//!    folder synced once). Target:
//!    within 1.5 times of it. Also the syncs per 1,000 files on each node
//!    ([`gossipfs::Stats::syncs`]) and the files per batch commit, figures
//!    with no baseline. A quick run
//!    puts fewer files and says so; the targets are then not checked.
//!
//! Context lines before the table give the `sha1` crate's speed here
//! (hashing bounds scenarios 1, 2 and 4) and the discovered meshes' shapes.
//!
//! # Layout
//!
//! One function per scenario: [`rounds`] runs its rounds, [`both`] runs a
//! round's baseline and gossipfs side in alternating order, and each round
//! gives one (gossipfs, baseline) pair per table row. The gossipfs sides
//! share [`Cluster`] (start nodes, add an asker, count the traffic an act
//! causes); the baselines share the plain copy and file-writing helpers.

use std::fmt::Debug;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use gossipfs::frame::Sha1Digest;
use gossipfs::{Config, Error, FileServer, Result};
use sha1::{Digest, Sha1};

use super::client::Client;
use super::{STREAM_BUFFER_LEN, ScratchDir, folder};

/// One mebibyte, the unit of sizes and throughputs in the table.
const MIB: u64 = 1 << 20;

/// The size of a "small" file (scenarios 3, 4 and 5).
const SMALL_FILE_LEN: usize = 4096;

/// The size of the big file of scenario 4 (capped at `--size`).
const GET_BIG_LEN: u64 = 64 * MIB;

/// How many 4 KiB gets make one round's latency figures (quick: a quarter).
const GET_SAMPLES: usize = 200;

/// How many nodes hold the file of each of scenario 4's copy counts.
const GET_HOLDERS: [usize; 3] = [1, 3, 5];

/// The size of the file whose copies scenarios 4 and 5 count (capped at
/// `--size`).
const COPIES_FILE_LEN: u64 = 4 * MIB;

/// The chain lengths of scenario 5.
const CHAIN_LENGTHS: [usize; 3] = [5, 10, 20];

/// How many changes travel down each chain per round; the round's figure is
/// their median.
const HOP_SAMPLES: usize = 5;

/// The number of nodes in the full mesh of scenario 5.
const MESH_SIZE: usize = 5;

/// The node counts of scenario 5's discovered meshes.
const DISCOVERED_MESH_SIZES: [usize; 3] = [5, 10, 20];

/// The threads that sync scenario 7's least-work limit: as many as a
/// node's batch commit syncs with (`SYNC_THREADS` in the store).
const SYNC_THREADS: usize = 16;

/// The files of scenario 7's folder (quick: a fifth).
const FOLDER_FILES: usize = 1000;

/// The folders scenario 7's files are spread over.
const FOLDER_FANOUT: usize = 10;

/// The key scenario 7 puts its folder under.
const FOLDER_KEY: &str = "folder";

/// The highest scenario number, for `--only`.
pub const SCENARIOS: u8 = 7;

/// Bytes in the repeating content pattern.
const PATTERN_LEN: usize = 1 << 20;

/// Anti-entropy and heartbeat interval of benchmark nodes: long enough
/// never to fire, so neither costs time nor shows in a frame count. A
/// benchmark's links are loopback and its nodes live for seconds: nothing
/// needs detecting there.
const QUIET_INTERVAL: Duration = Duration::from_secs(3600);

/// How often a timed wait re-checks its condition. Short, since it adds to
/// the latencies measured; the checks are cheap.
const POLL_INTERVAL: Duration = Duration::from_micros(200);

/// How often untimed waits (copy counts, settling) poll. They time nothing,
/// so they poll gently: twenty listings every 200 µs would take CPU from
/// the transfers.
const GENTLE_POLL_INTERVAL: Duration = Duration::from_millis(5);

/// How long a cluster has to connect, settle, or pass a small change on.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);

/// How long the frame counters must hold still before a change is made.
const QUIET_PERIOD: Duration = Duration::from_millis(20);

/// How long the counters must hold still before copies are counted, and a
/// discovered mesh's peer lists before it counts as formed. Longer than
/// [`QUIET_PERIOD`]: between a peer reading a request and the first bytes
/// of its answer arriving every counter balances, which on a busy machine
/// can outlast a few milliseconds; and discovery dials take a few
/// milliseconds each. A quick run waits [`QUICK_STILL_PERIOD`]: its copy
/// counts and mesh shapes are only smoke.
const STILL_PERIOD: Duration = Duration::from_millis(200);

/// [`STILL_PERIOD`] in a quick run.
const QUICK_STILL_PERIOD: Duration = Duration::from_millis(20);

/// What to run; `gossipfs bench` fills it from its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchOptions {
    /// Bytes in the big file of scenarios 1 and 2 (and the cap on the big
    /// get of scenario 4). Default 1 GiB.
    pub size: u64,
    /// Small files stored in scenario 3. Default 2000.
    pub files: usize,
    /// Times each scenario runs. Default 3.
    pub rounds: usize,
    /// A smoke run that finishes in seconds: caps the big file at 8 MiB,
    /// the small files at 200 (scenario 7's folder too), runs one round and
    /// waits less for things to settle.
    pub quick: bool,
    /// The scenarios to run, by number; empty runs them all. Scenario 6 is
    /// measured during 1, so either runs both.
    pub only: Vec<u8>,
}

impl Default for BenchOptions {
    fn default() -> BenchOptions {
        BenchOptions { size: 1 << 30, files: 2000, rounds: 3, quick: false, only: Vec::new() }
    }
}

/// The sizes actually run, after `--quick`.
struct Plan {
    /// Big file bytes (scenarios 1, 2).
    size: u64,
    /// Small files (scenario 3).
    files: usize,
    /// Rounds per scenario.
    rounds: usize,
    /// 4 KiB gets per round (scenario 4).
    get_samples: usize,
    /// Bytes of the big get (scenario 4).
    get_big: u64,
    /// Bytes of the file whose copies are counted (scenarios 4 and 5).
    copies_len: u64,
    /// Files in the folder of scenario 7.
    folder_files: usize,
    /// [`STILL_PERIOD`], or [`QUICK_STILL_PERIOD`].
    still: Duration,
}

impl Plan {
    fn new(options: &BenchOptions) -> Plan {
        let quick = options.quick;
        let size = if quick { options.size.min(8 * MIB) } else { options.size }.max(1);
        Plan {
            size,
            files: if quick { options.files.min(200) } else { options.files }.max(1),
            rounds: if quick { 1 } else { options.rounds.max(1) },
            get_samples: if quick { GET_SAMPLES / 4 } else { GET_SAMPLES },
            get_big: GET_BIG_LEN.min(size),
            copies_len: COPIES_FILE_LEN.min(size),
            folder_files: if quick { FOLDER_FILES / 5 } else { FOLDER_FILES },
            still: if quick { QUICK_STILL_PERIOD } else { STILL_PERIOD },
        }
    }
}

/// A scenario: it measures with `plan` in its own directory and adds its
/// rows to the table.
type Scenario = fn(&Plan, &Path, &mut Table) -> Result<()>;

/// Runs every scenario and prints the table, then the `bench:` line.
///
/// Progress goes to stderr, the results to stdout.
///
/// # Errors
///
/// [`Error::Io`] if a directory, file or socket fails; [`Error::Timeout`] if
/// a cluster does not connect or a change does not arrive in time (a
/// benchmark that hangs measures nothing).
pub fn run(options: &BenchOptions) -> Result<()> {
    let plan = Plan::new(options);
    let dir = ScratchDir::new("bench")?;
    let mut table = Table::default();
    let sha1_mibps = sha1_throughput(if options.quick { 32 * MIB } else { 256 * MIB });
    table.context(format!("the sha1 crate hashes {} MiB/s on one core here", fmt(sha1_mibps)));
    table.figure("sha1_mibps", sha1_mibps);

    let scenarios: [(u8, Scenario); 6] = [
        (1, big_file_one_hop),
        (2, big_file_chain),
        (3, small_files),
        (4, network_get),
        (5, convergence),
        (7, folder_put),
    ];
    let runs = |n: u8| options.only.is_empty() || options.only.contains(&n);
    for (n, scenario) in scenarios {
        // Scenario 6 is measured during 1.
        if runs(n) || (n == 1 && runs(6)) {
            scenario(&plan, &dir.0.join(format!("s{n}")), &mut table)?;
        }
    }

    println!(
        "gossipfs bench: size={} MiB files={} folder_files={} rounds={} cpus={} dir={}",
        fmt(plan.size as f64 / MIB as f64),
        plan.files,
        plan.folder_files,
        plan.rounds,
        thread::available_parallelism().map_or(0, |n| n.get()),
        std::env::temp_dir().display()
    );
    table.print();
    Ok(())
}

// ---------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------

/// Scenarios 1 and 6: the big file over one hop, fsync off and on, and the
/// peak memory meanwhile.
fn big_file_one_hop(plan: &Plan, dir: &Path, table: &mut Table) -> Result<()> {
    let speed = |took: Duration| plan.size as f64 / MIB as f64 / secs(took);
    let mut peak = Samples::default();
    for fsync in [false, true] {
        let what = format!("1 big file, one hop, fsync {}", if fsync { "on" } else { "off" });
        let [copy, hashed] = rounds(plan, &what, |round| {
            let ((plain, plain_peak), (gossipfs, gossipfs_peak)) = both(
                round,
                || plain_big(&dir.join("plain"), plan.size, 1, fsync, PlainCopy::Raw),
                || gossipfs_big(&dir.join("nodes"), plan.size, 1, fsync),
            )?;
            if let (Some(g), Some(p)) = (gossipfs_peak, plain_peak) {
                peak.push(g, p);
            }
            // The hashed copy only beside fsync off; the pair is dropped
            // for fsync on.
            let hashed = match fsync {
                true => plain,
                false => plain_big(&dir.join("hashed"), plan.size, 1, false, PlainCopy::Hashed)?.0,
            };
            Ok([(speed(gossipfs), speed(plain)), (speed(gossipfs), speed(hashed))])
        })?;
        if fsync {
            table.row("1", "big file, one hop, fsync on", "MiB/s", "s1_fsync_mibps", copy, None);
        } else {
            let target = Some(Target::RatioAtLeast(0.8));
            table.row("1", "big file, one hop, fsync off", "MiB/s", "s1_mibps", copy, target);
            let name = "big file, one hop, vs copy + SHA-1";
            table.row("1", name, "MiB/s", "s1_vs_sha1_mibps", hashed, None);
        }
    }
    let target = Some(Target::PeakBelow(32.0));
    table.row("6", "peak resident memory during 1", "MiB", "s6_peak_rss_mib", peak, target);
    Ok(())
}

/// Scenario 2: the big file through a chain of three nodes.
fn big_file_chain(plan: &Plan, dir: &Path, table: &mut Table) -> Result<()> {
    let speed = |took: Duration| plan.size as f64 / MIB as f64 / secs(took);
    let [copy] = rounds(plan, "2 big file, chain of 3", |round| {
        let ((plain, _), (gossipfs, _)) = both(
            round,
            || plain_big(&dir.join("plain"), plan.size, 2, false, PlainCopy::Raw),
            || gossipfs_big(&dir.join("nodes"), plan.size, 2, false),
        )?;
        Ok([(speed(gossipfs), speed(plain))])
    })?;
    table.row("2", "big file, chain of 3 (2 hops)", "MiB/s", "s2_mibps", copy, None);
    Ok(())
}

/// Scenario 3: many small files over one hop.
fn small_files(plan: &Plan, dir: &Path, table: &mut Table) -> Result<()> {
    let files = plan.files;
    let [rate, p50, p99] = rounds(plan, "3 small files", |round| {
        let (plain, gossipfs) = both(
            round,
            || plain_files(&dir.join(format!("plain-{round}")), files, None),
            || gossipfs_small(&dir.join(format!("nodes-{round}")), files),
        )?;
        let rate = |side: &Timings| files as f64 / secs(side.took);
        Ok([(rate(&gossipfs), rate(&plain)), gossipfs.vs(&plain, 50.0), gossipfs.vs(&plain, 99.0)])
    })?;
    let name = format!("{files} small files, one hop");
    let target = Some(Target::RatioAtLeast(0.5));
    table.row("3", &name, "files/s", "s3_files_per_s", rate, target);
    table.row("3", "store() latency p50", "ms", "s3_store_p50_ms", p50, None);
    table.row("3", "store() latency p99", "ms", "s3_store_p99_ms", p99, None);
    Ok(())
}

/// Scenario 4: gets of files only the peer holds, then the copies one get
/// moves from 1, 3 and 5 holders.
fn network_get(plan: &Plan, dir: &Path, table: &mut Table) -> Result<()> {
    let (samples, big) = (plan.get_samples, plan.get_big);
    let big_mib = big as f64 / MIB as f64;
    let [p50, p99, speed] = rounds(plan, "4 network get", |round| {
        let (plain, gossipfs) = both(
            round,
            || plain_gets(&dir.join(format!("plain-{round}")), samples, big),
            || gossipfs_gets(&dir.join(format!("nodes-{round}")), samples, big),
        )?;
        let speed = |side: &Timings| big_mib / secs(side.took);
        Ok([
            gossipfs.vs(&plain, 50.0),
            gossipfs.vs(&plain, 99.0),
            (speed(&gossipfs), speed(&plain)),
        ])
    })?;
    table.row("4", "get 4 KiB p50", "ms", "s4_get_p50_ms", p50, None);
    table.row("4", "get 4 KiB p99", "ms", "s4_get_p99_ms", p99, None);
    table.row("4", &format!("get {} MiB", fmt(big_mib)), "MiB/s", "s4_get_big_mibps", speed, None);
    for holders in GET_HOLDERS {
        get_copies(plan, &dir.join(format!("copies-{holders}")), holders, table)?;
    }
    Ok(())
}

/// Scenario 4's copy count: one get of a file that `holders` peers hold, by
/// a node that lacks it.
fn get_copies(plan: &Plan, dir: &Path, holders: usize, table: &mut Table) -> Result<()> {
    let len = plan.copies_len;
    let key = |round: usize| format!("get-copies-{round}");
    // The holders first, with a file of their own for every round, so that
    // each round's get is of a file the asker lacks; then the asker.
    let mut cluster = Cluster::mesh(dir, holders)?;
    for round in 0..plan.rounds {
        cluster.nodes[0].store(&key(round), PatternReader::new(len))?;
    }
    let deadline = transfer_deadline(len * (plan.rounds * holders) as u64);
    wait_until("every holder to hold every file", deadline, GENTLE_POLL_INTERVAL, || {
        (0..plan.rounds).all(|round| cluster.holding(&key(round)) == holders)
    })?;
    cluster.add_asker()?;
    let what = format!("4 copies per get, {holders} holders");
    let [copies] = rounds(plan, &what, |round| {
        let moved = cluster.traffic_of(plan.still, || {
            let file = cluster.nodes[holders].get(&key(round))?;
            check_size(file.size(), len)
        })?;
        Ok([(moved.bytes_received as f64 / len as f64, 1.0)])
    })?;
    let name = format!("get {} MiB from {holders} holders: copies", fmt(len as f64 / MIB as f64));
    table.row("4", &name, "copies", &format!("s4_get_copies_{holders}"), copies, None);
    Ok(())
}

/// Scenario 5: a small change down chains, and the cost of one store in
/// meshes.
fn convergence(plan: &Plan, dir: &Path, table: &mut Table) -> Result<()> {
    for n in CHAIN_LENGTHS {
        let hops = (n - 1) as f64;
        let root = dir.join(format!("chain-{n}"));
        let cluster = Cluster::chain(&root.join("nodes"), n, false)?;
        let relays = RelayChain::start(&root.join("plain"), n)?;
        let [store, delete] = rounds(plan, &format!("5 convergence, chain of {n}"), |round| {
            let mut samples = [(); 4].map(|()| Vec::with_capacity(HOP_SAMPLES));
            for i in 0..HOP_SAMPLES {
                let key = format!("hop-{round}-{i}");
                let content = small_content(i);
                let ((plain_store, plain_delete), (node_store, node_delete)) = both(
                    round + i,
                    || relays.store_then_delete(&key, content),
                    || cluster.store_then_delete(&key, content),
                )?;
                let figures = [node_store, plain_store, node_delete, plain_delete];
                for (list, took) in samples.iter_mut().zip(figures) {
                    list.push(millis(took) / hops);
                }
            }
            let [g_store, p_store, g_delete, p_delete] = samples.map(|s| median(&s));
            Ok([(g_store, p_store), (g_delete, p_delete)])
        })?;
        relays.close()?;
        drop(cluster);
        let target = Some(Target::Below(5.0));
        for (what, samples) in [("store", store), ("delete", delete)] {
            let (name, key) = (
                format!("chain of {n}: {what}, per hop"),
                format!("s5_chain{n}_{what}_ms_per_hop"),
            );
            table.row("5", &name, "ms", &key, samples, target);
        }
    }
    mesh_cost(plan, &dir.join("mesh"), table)?;
    discovered_mesh_copies(plan, &dir.join("discovered"), table)
}

/// Scenario 5's frame count: one small store in a full mesh.
fn mesh_cost(plan: &Plan, dir: &Path, table: &mut Table) -> Result<()> {
    let cluster = Cluster::mesh(dir, MESH_SIZE)?;
    // The least that can work: each other node gets the change once.
    let least = (MESH_SIZE - 1) as f64;
    let [frames, copies] = rounds(plan, &format!("5 frames, mesh of {MESH_SIZE}"), |round| {
        let key = format!("mesh-{round}");
        let moved = cluster.traffic_of(QUIET_PERIOD, || {
            cluster.nodes[0].store(&key, small_content(round))?;
            wait_until("the mesh store to reach every node", SETTLE_DEADLINE, POLL_INTERVAL, || {
                cluster.holding(&key) == MESH_SIZE
            })
        })?;
        Ok([(moved.frames as f64, least), (moved.bytes as f64 / SMALL_FILE_LEN as f64, least)])
    })?;
    drop(cluster);
    let name = format!("mesh of {MESH_SIZE}: frames per store");
    table.row("5", &name, "frames", "s5_mesh5_frames", frames, None);
    let name = format!("mesh of {MESH_SIZE}: content copies per store");
    table.row("5", &name, "copies", "s5_mesh5_copies", copies, None);
    Ok(())
}

/// Scenario 5's copy counts: one store in each mesh that discovery built.
fn discovered_mesh_copies(plan: &Plan, dir: &Path, table: &mut Table) -> Result<()> {
    let len = plan.copies_len;
    let mut shapes = Vec::with_capacity(DISCOVERED_MESH_SIZES.len());
    for n in DISCOVERED_MESH_SIZES {
        let cluster = Cluster::discovered(&dir.join(n.to_string()), n, plan.still)?;
        let (links, shape) = cluster.shape();
        let what = format!("5 copies per store, discovered mesh of {n}");
        let [copies] = rounds(plan, &what, |round| {
            let key = format!("copies-{round}");
            let moved = cluster.traffic_of(plan.still, || {
                cluster.nodes[0].store(&key, PatternReader::new(len))?;
                let deadline = transfer_deadline(len * n as u64);
                wait_until("the store to reach every node", deadline, GENTLE_POLL_INTERVAL, || {
                    cluster.holding(&key) == n
                })
            })?;
            // Deleted, so that the disk does not fill round by round; a
            // delete moves no file bytes.
            cluster.nodes[0].delete(&key)?;
            wait_until(
                "the delete to reach every node",
                SETTLE_DEADLINE,
                GENTLE_POLL_INTERVAL,
                || cluster.holding(&key) == 0,
            )?;
            // The least that can work: each other node reads the bytes once.
            Ok([(moved.bytes_received as f64 / len as f64, (n - 1) as f64)])
        })?;
        drop(cluster);
        let name = format!("discovered mesh of {n}: copies per store");
        table.row("5", &name, "copies", &format!("s5_dmesh{n}_copies"), copies, None);
        table.figure(&format!("s5_dmesh{n}_links"), links as f64);
        shapes.push(shape);
    }
    // The meshes ran with the default; say what it is.
    let max_peers = Config::new("default", dir).max_peers;
    table.context(format!(
        "discovered meshes (max_peers {max_peers}; n1 stores): {}",
        shapes.join("; ")
    ));
    Ok(())
}

/// Scenario 7: a folder of small files put through the command line's
/// client, fsync on, beside the same work file by file and the least-work
/// limit.
fn folder_put(plan: &Plan, dir: &Path, table: &mut Table) -> Result<()> {
    let files = plan.folder_files;
    let source = dir.join("source");
    write_folder(&source, files)?;
    let what = format!("7 folder put, {files} files, fsync on");
    let (mut syncs, mut files_per_batch) = (Vec::new(), Vec::new());
    let [plain, limit] = rounds(plan, &what, |round| {
        let limit = least_work(&dir.join(format!("least-{round}")), files, &source)?;
        let (plain, gossipfs) = both(
            round,
            || plain_files(&dir.join(format!("plain-{round}")), files, Some(&source)),
            || gossipfs_folder(&source, &dir.join(format!("nodes-{round}")), files),
        )?;
        let (gossipfs, [synced, batches]) = (millis(gossipfs.0), gossipfs.1);
        // Per node (A and B), per 1,000 files.
        syncs.push(synced as f64 / 2.0 * 1000.0 / files as f64);
        files_per_batch.push(2.0 * files as f64 / batches.max(1) as f64);
        Ok([(gossipfs, millis(plain.took)), (gossipfs, millis(limit))])
    })?;
    table.figure("s7_syncs_per_1000_files_per_node", median(&syncs));
    table.figure("s7_files_per_batch", median(&files_per_batch));
    let name = format!("folder put, {files} x 4 KiB, fsync on");
    let full = files == FOLDER_FILES;
    table.row("7", &name, "ms", "s7_folder_ms", plain, full.then_some(Target::Below(350.0)));
    let name = format!("folder put, {files} x 4 KiB, beside the least-work limit");
    let within = full.then_some(Target::RatioAtMost(1.5));
    table.row("7", &name, "ms", "s7_folder_limit_ms", limit, within);
    if !full {
        table.context(format!(
            "quick: the folder put of scenario 7 has {files} files, not {FOLDER_FILES}; \
             its goals (under 0.35 s, within 1.5 times the limit) are not checked"
        ));
    }
    Ok(())
}

/// Scenario 7's least-work limit: the files made durable on two sides at
/// once, each side with the least work there is (see the module doc).
fn least_work(dir: &Path, files: usize, source: &Path) -> Result<Duration> {
    let started = Instant::now();
    let sides = ["a", "b"].map(|side| {
        let (dir, source) = (dir.join(side), source.to_path_buf());
        thread::spawn(move || write_files_batched(&dir, files, &source))
    });
    for side in sides {
        join(side)?;
    }
    Ok(started.elapsed())
}

/// One side of [`least_work`].
fn write_files_batched(dir: &Path, files: usize, source: &Path) -> io::Result<()> {
    let (tmp, done) = (dir.join("tmp"), dir.join("files"));
    fs::create_dir_all(&tmp)?;
    fs::create_dir_all(&done)?;
    let mut written = Vec::with_capacity(files);
    for i in 0..files {
        let temp = tmp.join(format!("{i}.tmp"));
        let mut file = File::create(&temp)?;
        file.write_all(&fs::read(source.join(folder_file(i)))?)?;
        written.push((file, temp));
    }
    thread::scope(|scope| {
        let syncing: Vec<_> = written
            .chunks(files.div_ceil(SYNC_THREADS).max(1))
            .map(|chunk| {
                scope.spawn(move || chunk.iter().try_for_each(|(file, _)| file.sync_all()))
            })
            .collect();
        syncing.into_iter().try_for_each(|s| s.join().unwrap_or(Err(io::Error::other("panicked"))))
    })?;
    for (i, (_, temp)) in written.iter().enumerate() {
        fs::rename(temp, done.join(small_key(i)))?;
    }
    File::open(&done)?.sync_all()
}

/// Runs a scenario's rounds, a progress line on stderr before each; every
/// round gives one (gossipfs, baseline) pair per table row.
fn rounds<const ROWS: usize>(
    plan: &Plan,
    what: &str,
    mut round: impl FnMut(usize) -> Result<[(f64, f64); ROWS]>,
) -> Result<[Samples; ROWS]> {
    let mut samples = [(); ROWS].map(|()| Samples::default());
    for i in 0..plan.rounds {
        eprintln!("bench: {what} (round {} of {})", i + 1, plan.rounds);
        for (row, (gossipfs, baseline)) in samples.iter_mut().zip(round(i)?) {
            row.push(gossipfs, baseline);
        }
    }
    Ok(samples)
}

/// Runs one round's baseline and gossipfs measurement: the baseline first
/// in even rounds, second in odd ones, so that neither always runs in the
/// wake of the other (its dirty pages being written back, the inodes it
/// freed: ext4 without a journal scans recently freed inodes on every
/// create).
fn both<P, G>(
    round: usize,
    plain: impl FnOnce() -> Result<P>,
    gossipfs: impl FnOnce() -> Result<G>,
) -> Result<(P, G)> {
    if round.is_multiple_of(2) {
        let plain = plain()?;
        Ok((plain, gossipfs()?))
    } else {
        let gossipfs = gossipfs()?;
        Ok((plain()?, gossipfs))
    }
}

/// What one side of scenario 3 or 4 measured.
struct Timings {
    /// Each small operation's latency, in ms: a store (3), a get (4).
    latencies: Vec<f64>,
    /// The time of the whole: every file at B (3), the big get (4).
    took: Duration,
}

impl Timings {
    /// Percentile `p` of these latencies beside the baseline's.
    fn vs(&self, baseline: &Timings, p: f64) -> (f64, f64) {
        (percentile(&self.latencies, p), percentile(&baseline.latencies, p))
    }
}

// ---------------------------------------------------------------------------
// gossipfs's side of each scenario
// ---------------------------------------------------------------------------

/// Stores a big file at one end of a fresh chain of `hops + 1` nodes and
/// times it until the far end has committed it. Returns the time and the
/// peak resident memory meanwhile, in MiB.
fn gossipfs_big(
    dir: &Path,
    size: u64,
    hops: usize,
    fsync: bool,
) -> Result<(Duration, Option<f64>)> {
    let cluster = Cluster::chain(dir, hops + 1, fsync)?;
    let far = &cluster.nodes[hops];
    let watching_memory = reset_peak_rss();
    let started = Instant::now();
    cluster.nodes[0].store("big", PatternReader::new(size))?;
    wait_until(
        "the big file to reach the far end",
        transfer_deadline(size),
        POLL_INTERVAL,
        || far.list().iter().any(|f| f.key == "big" && f.size == size),
    )?;
    let took = started.elapsed();
    let peak = if watching_memory { peak_rss_mib() } else { None };
    drop(cluster);
    fs::remove_dir_all(dir)?;
    Ok((took, peak))
}

/// Stores `files` small files on A of a fresh pair, one at a time, and
/// times it until B has committed every one.
fn gossipfs_small(dir: &Path, files: usize) -> Result<Timings> {
    let mut latencies = Vec::with_capacity(files);
    let (took, _) = time_pair(dir, false, files, |a| {
        for i in 0..files {
            let stored = Instant::now();
            a.store(&small_key(i), small_content(i))?;
            latencies.push(millis(stored.elapsed()));
        }
        Ok(())
    })?;
    Ok(Timings { latencies, took })
}

/// Puts the folder at `source` on A of a fresh pair with fsync on, as
/// `gossipfs put folder SOURCE` does, and times it from the start of the
/// walk until B has every file; also returns the syncs of A and B.
fn gossipfs_folder(source: &Path, dir: &Path, files: usize) -> Result<(Duration, [u64; 2])> {
    time_pair(dir, true, files, |a| {
        let tree = folder::walk(source, FOLDER_KEY)?;
        check_size(tree.files.len() as u64, files as u64)?;
        let mut client = Client::connect(&a.local_addr().to_string(), None)?;
        folder::put_tree(&mut client, &tree, &mut |_, _| {})?;
        Ok(())
    })
}

/// Starts a pair A → B and times `put` on A until B has applied `changes`
/// more changes. B's applied-change counter, not its listing: the listing
/// copies every key each time it is polled, and holds B's index lock while
/// it does. Also returns the syncs both nodes made.
fn time_pair(
    dir: &Path,
    fsync: bool,
    changes: usize,
    put: impl FnOnce(&FileServer) -> Result<()>,
) -> Result<(Duration, [u64; 2])> {
    let cluster = Cluster::chain(dir, 2, fsync)?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let applied_before = b.stats().changes_applied;
    let started = Instant::now();
    put(a)?;
    let deadline = SETTLE_DEADLINE + Duration::from_millis(10) * changes as u32;
    wait_until("every change to reach B", deadline, POLL_INTERVAL, || {
        b.stats().changes_applied - applied_before >= changes as u64
    })?;
    let (a, b) = (a.stats(), b.stats());
    Ok((started.elapsed(), [a.syncs + b.syncs, a.batches + b.batches]))
}

/// Gets `samples` small files and one big file that only the peer holds
/// (see the module doc for how they get there).
fn gossipfs_gets(dir: &Path, samples: usize, big: u64) -> Result<Timings> {
    // The holder first, alone: it stores the files through its own API.
    let mut cluster = Cluster::chain(dir, 1, false)?;
    for i in 0..samples {
        cluster.nodes[0].store(&small_key(i), small_content(i))?;
    }
    cluster.nodes[0].store("get-big", PatternReader::new(big))?;
    cluster.add_asker()?;
    let asker = &cluster.nodes[1];
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let started = Instant::now();
        let file = asker.get(&small_key(i))?;
        latencies.push(millis(started.elapsed()));
        check_size(file.size(), SMALL_FILE_LEN as u64)?;
    }
    let started = Instant::now();
    let file = asker.get("get-big")?;
    let took = started.elapsed();
    check_size(file.size(), big)?;
    Ok(Timings { latencies, took })
}

/// Per-node counters, summed over a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Traffic {
    /// Frames written by every node.
    frames: u64,
    /// Frames read by every node.
    received: u64,
    /// File content bytes written by every node.
    bytes: u64,
    /// File content bytes read by every node, stored or drained.
    bytes_received: u64,
}

/// Nodes started together and shut down together (last first, so no
/// dialler sees its bootstrap peer vanish and starts redialling).
struct Cluster {
    /// The directory holding one subdirectory per node.
    root: PathBuf,
    /// The nodes, `n1` first.
    nodes: Vec<FileServer>,
}

impl Cluster {
    /// `n` nodes, each dialling the one before it.
    fn chain(root: &Path, n: usize, fsync: bool) -> Result<Cluster> {
        Cluster::start(root, n, fsync, |i| i.saturating_sub(1)..i)
    }

    /// `n` nodes, each dialling every node before it: a full mesh.
    fn mesh(root: &Path, n: usize) -> Result<Cluster> {
        Cluster::start(root, n, false, |i| 0..i)
    }

    /// `n` nodes, node `i` dialling the nodes `dials(i)`; returns once
    /// every node has as many peers as it has links.
    fn start(
        root: &Path,
        n: usize,
        fsync: bool,
        dials: impl Fn(usize) -> Range<usize>,
    ) -> Result<Cluster> {
        let mut cluster = Cluster { root: root.to_path_buf(), nodes: Vec::with_capacity(n + 1) };
        let mut links = vec![0; n];
        for i in 0..n {
            for j in dials(i) {
                links[i] += 1;
                links[j] += 1;
            }
            cluster.add(cluster.config(fsync), dials(i))?;
        }
        wait_until("the cluster to connect", SETTLE_DEADLINE, POLL_INTERVAL, || {
            cluster.nodes.iter().zip(&links).all(|(node, n)| node.peers().len() == *n)
        })?;
        Ok(cluster)
    }

    /// `n` nodes with discovery on and anti-entropy off, each bootstrapping
    /// from the one before; each starts once the peer lists have held still
    /// (every link seen from both ends) for `still`, so each newcomer hears
    /// of every node its first peer knows. The periodic `Peers` frames come
    /// once an hour, like anti-entropy elsewhere: the mesh grows from the
    /// ones exchanged whenever two nodes connect.
    fn discovered(root: &Path, n: usize, still: Duration) -> Result<Cluster> {
        let mut cluster = Cluster { root: root.to_path_buf(), nodes: Vec::with_capacity(n) };
        for i in 0..n {
            let mut config = cluster.config(false);
            config.discover_peers = true;
            config.anti_entropy = false;
            cluster.add(config, i.saturating_sub(1)..i)?;
            let addrs: Vec<String> =
                cluster.nodes.iter().map(|node| node.local_addr().to_string()).collect();
            let peers_of = |i: usize| cluster.nodes[i].peers().into_iter().map(|p| p.addr);
            settle(
                "the discovered mesh to settle",
                still,
                || (0..addrs.len()).map(|i| peers_of(i).collect::<Vec<_>>()).collect::<Vec<_>>(),
                |lists| {
                    let linked = lists.len() < 2 || lists.iter().all(|peers| !peers.is_empty());
                    linked
                        && lists.iter().zip(&addrs).all(|(peers, me)| {
                            peers.iter().all(|peer| {
                                let at = addrs.iter().position(|addr| addr == peer);
                                at.is_some_and(|j| lists[j].contains(me))
                            })
                        })
                },
            )?;
        }
        Ok(cluster)
    }

    /// Adds the asker of scenario 4: a node that dials every node so far,
    /// with anti-entropy off, so that it never sends a summary, the holders
    /// never offer it their files, and only a get brings it one. Returns
    /// once it is connected to all.
    fn add_asker(&mut self) -> Result<()> {
        let holders = self.nodes.len();
        let mut config = self.config(false);
        config.anti_entropy = false;
        self.add(config, 0..holders)?;
        let asker = &self.nodes[holders];
        wait_until("the asker to connect to every holder", SETTLE_DEADLINE, POLL_INTERVAL, || {
            asker.peers().len() == holders
        })
    }

    /// The config of the next node: discovery off (it would turn a chain
    /// into a mesh; meshes are dialled explicitly instead), anti-entropy
    /// and heartbeats rare.
    fn config(&self, fsync: bool) -> Config {
        let name = format!("n{}", self.nodes.len() + 1);
        let mut config = Config::new(&name, self.root.join(&name));
        config.fsync = fsync;
        config.discover_peers = false;
        config.anti_entropy_interval = QUIET_INTERVAL;
        config.heartbeat_interval = QUIET_INTERVAL;
        config.heartbeat_timeout = QUIET_INTERVAL * 3;
        config
    }

    /// Starts a node with `config`, dialling the nodes `dials`.
    fn add(&mut self, mut config: Config, dials: Range<usize>) -> Result<()> {
        config.bootstrap = self.nodes[dials].iter().map(|n| n.local_addr().to_string()).collect();
        self.nodes.push(FileServer::start_on(TcpListener::bind("127.0.0.1:0")?, config)?);
        Ok(())
    }

    /// How many nodes hold a live file under `key`.
    fn holding(&self, key: &str) -> usize {
        self.nodes.iter().filter(|node| holds(node, key)).count()
    }

    /// The links of a discovered mesh, and its shape in words:
    /// `20 nodes: 90 of 190 links, 8 to 12 peers a node, n1 has 12` (`n1`
    /// stores: its copies are pushed, the others fetched).
    fn shape(&self) -> (usize, String) {
        let peers: Vec<usize> = self.nodes.iter().map(|node| node.peers().len()).collect();
        let (n, links) = (peers.len(), peers.iter().sum::<usize>() / 2);
        let (fewest, most) = (peers.iter().min(), peers.iter().max());
        let shape = format!(
            "{n} nodes: {links} of {} links, {} to {} peers a node, n1 has {}",
            n * n.saturating_sub(1) / 2,
            fewest.unwrap_or(&0),
            most.unwrap_or(&0),
            peers.first().unwrap_or(&0)
        );
        (links, shape)
    }

    /// Stores `key` at the first node and times its arrival at the last;
    /// then the same for a delete of it.
    fn store_then_delete(&self, key: &str, content: &[u8]) -> Result<(Duration, Duration)> {
        let (first, last) = (&self.nodes[0], &self.nodes[self.nodes.len() - 1]);
        let started = Instant::now();
        first.store(key, content)?;
        wait_until(
            "a store to reach the end of the chain",
            SETTLE_DEADLINE,
            POLL_INTERVAL,
            || holds(last, key),
        )?;
        let stored = started.elapsed();
        let started = Instant::now();
        first.delete(key)?;
        wait_until(
            "a delete to reach the end of the chain",
            SETTLE_DEADLINE,
            POLL_INTERVAL,
            || !holds(last, key),
        )?;
        Ok((stored, started.elapsed()))
    }

    /// What `act` made the cluster send and read: waits for the counters
    /// to hold still for [`QUIET_PERIOD`], runs `act`, then waits until
    /// every frame and file byte sent since has been read and the counters
    /// have held still for `still`. Returns the difference.
    ///
    /// Only frames sent since a point are compared with frames read: the
    /// totals can differ for good, since a frame that arrives while its
    /// receiver is still in the handshake is lost. And a reader counts a
    /// frame a moment before it queues the frame's relay, hence the still
    /// period too.
    fn traffic_of(&self, still: Duration, act: impl FnOnce() -> Result<()>) -> Result<Traffic> {
        let before =
            settle("the cluster to fall quiet", QUIET_PERIOD, || self.traffic(), |_| true)?;
        act()?;
        let after = settle(
            "every frame sent to be read",
            still,
            || self.traffic(),
            |now| {
                now.frames - before.frames == now.received - before.received
                    && now.bytes - before.bytes == now.bytes_received - before.bytes_received
            },
        )?;
        Ok(Traffic {
            frames: after.frames - before.frames,
            received: after.received - before.received,
            bytes: after.bytes - before.bytes,
            bytes_received: after.bytes_received - before.bytes_received,
        })
    }

    /// The summed counters.
    fn traffic(&self) -> Traffic {
        let mut sum = Traffic { frames: 0, received: 0, bytes: 0, bytes_received: 0 };
        for stats in self.nodes.iter().map(FileServer::stats) {
            sum.frames += stats.frames_sent;
            sum.received += stats.frames_received;
            sum.bytes += stats.bytes_sent;
            sum.bytes_received += stats.bytes_received;
        }
        sum
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        while let Some(node) = self.nodes.pop() {
            node.shutdown();
        }
    }
}

/// Whether `node` holds a live file under `key`.
fn holds(node: &FileServer, key: &str) -> bool {
    node.list().iter().any(|f| f.key == key)
}

// ---------------------------------------------------------------------------
// The baselines: the same steps in plain code
// ---------------------------------------------------------------------------

/// How a plain copy treats the bytes it moves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PlainCopy {
    /// Only moves them: the machine's limit.
    Raw,
    /// Also hashes them with SHA-1 as gossipfs does: once while writing the
    /// first file, and again on the far side of each hop, which checks its
    /// hash against the first.
    Hashed,
}

/// Writes a big file and copies it over `hops` plain loopback sockets, each
/// into a file on the far side of the socket, one after the other. Returns
/// the time and the peak resident memory meanwhile, in MiB.
fn plain_big(
    dir: &Path,
    size: u64,
    hops: usize,
    fsync: bool,
    copy: PlainCopy,
) -> Result<(Duration, Option<f64>)> {
    fs::create_dir_all(dir)?;
    let paths: Vec<PathBuf> = (0..=hops).map(|i| dir.join(format!("copy-{i}"))).collect();
    // Connections are open before the clock starts, as gossipfs's are: each
    // far end writes what it receives to its file, hashing it if asked.
    let mut links = Vec::with_capacity(hops);
    for path in &paths[1..] {
        let path = path.clone();
        let (sender, socket) = loopback_pair()?;
        let receiver = thread::spawn(move || {
            let mut socket = Hashing::new(socket, copy);
            let written = write_plain(&path, &mut socket, fsync)?;
            Ok((written, socket.finish()))
        });
        links.push((sender, receiver));
    }
    let watching_memory = reset_peak_rss();
    let started = Instant::now();
    let mut source = Hashing::new(PatternReader::new(size), copy);
    write_plain(&paths[0], &mut source, fsync)?;
    let sha1 = source.finish();
    for ((mut sender, receiver), from) in links.into_iter().zip(&paths) {
        copy_buffered(&mut File::open(from)?, &mut sender)?;
        sender.shutdown(Shutdown::Write)?;
        let (copied, copied_sha1) = join(receiver)?;
        check_size(copied, size)?;
        if copied_sha1 != sha1 {
            return Err(Error::Io(io::Error::other("a plain copy changed the bytes")));
        }
    }
    let took = started.elapsed();
    let peak = if watching_memory { peak_rss_mib() } else { None };
    fs::remove_dir_all(dir)?;
    Ok((took, peak))
}

/// A reader that hashes what passes through it, for [`PlainCopy::Hashed`].
struct Hashing<R> {
    /// Where the bytes come from.
    inner: R,
    /// SHA-1 of the bytes read so far; `None` for a raw copy.
    hasher: Option<Sha1>,
}

impl<R: Read> Hashing<R> {
    fn new(inner: R, copy: PlainCopy) -> Hashing<R> {
        Hashing { inner, hasher: (copy == PlainCopy::Hashed).then(Sha1::new) }
    }

    /// The SHA-1 of everything read, if hashing.
    fn finish(self) -> Option<Sha1Digest> {
        self.hasher.map(|hasher| hasher.finalize().into())
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Streams `reader` to its end into a new file at `path`, then fsyncs the
/// file if asked. Returns the bytes written.
fn write_plain(path: &Path, reader: &mut impl Read, fsync: bool) -> io::Result<u64> {
    let mut file = File::create(path)?;
    let written = copy_buffered(reader, &mut file)?;
    if fsync {
        file.sync_all()?;
    }
    Ok(written)
}

/// Copies `reader` to its end into `writer` through one buffer of
/// gossipfs's size. (`io::copy` would use 8 KiB writes into a socket: std
/// does not `sendfile` from a file to a socket, and gossipfs's writes are
/// 256 KiB, so a baseline using it would be handicapped.)
fn copy_buffered(reader: &mut impl Read, writer: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; STREAM_BUFFER_LEN];
    let mut copied = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(copied),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        writer.write_all(&buf[..n])?;
        copied += n as u64;
    }
}

/// The baselines of scenarios 3 and 7: both nodes' files written at once
/// (two threads, one directory each). For scenario 3 (`source` `None`),
/// each file is created, written and renamed into place; for scenario 7,
/// the least durable work: each file read from `source`, then created,
/// written, fsynced, renamed into place and its folder fsynced. One file
/// after the other on each side. Returns A's latencies and the time until
/// both sides are done.
fn plain_files(dir: &Path, files: usize, source: Option<&Path>) -> Result<Timings> {
    let (other_side, theirs) = (dir.join("b"), source.map(Path::to_path_buf));
    let started = Instant::now();
    let other = thread::spawn(move || write_files(&other_side, files, theirs.as_deref()));
    let latencies = write_files(&dir.join("a"), files, source)?;
    join(other)?;
    Ok(Timings { latencies, took: started.elapsed() })
}

/// One side of [`plain_files`]; returns each file's latency in ms.
fn write_files(dir: &Path, files: usize, source: Option<&Path>) -> io::Result<Vec<f64>> {
    let (tmp, done) = (dir.join("tmp"), dir.join("files"));
    fs::create_dir_all(&tmp)?;
    fs::create_dir_all(&done)?;
    let folder = File::open(&done)?;
    let mut latencies = Vec::with_capacity(files);
    for i in 0..files {
        let started = Instant::now();
        let read;
        let content = match source {
            Some(source) => {
                read = fs::read(source.join(folder_file(i)))?;
                &read[..]
            }
            None => small_content(i),
        };
        let temp = tmp.join(format!("{i}.tmp"));
        let mut file = File::create(&temp)?;
        file.write_all(content)?;
        if source.is_some() {
            file.sync_all()?;
        }
        fs::rename(&temp, done.join(small_key(i)))?;
        if source.is_some() {
            folder.sync_all()?;
        }
        latencies.push(millis(started.elapsed()));
    }
    Ok(latencies)
}

/// The path of scenario 7's file `i` below its folder.
fn folder_file(i: usize) -> PathBuf {
    Path::new(&format!("d{}", i % FOLDER_FANOUT)).join(small_key(i))
}

/// Writes scenario 7's folder: `files` small files in [`FOLDER_FANOUT`]
/// folders.
fn write_folder(source: &Path, files: usize) -> io::Result<()> {
    for i in 0..FOLDER_FANOUT.min(files) {
        fs::create_dir_all(source.join(format!("d{i}")))?;
    }
    for i in 0..files {
        fs::write(source.join(folder_file(i)), small_content(i))?;
    }
    Ok(())
}

/// Scenario 4's baseline: a plain file server on a kept-open connection.
/// Each request is a file's index (`u32`); the answer is its length (`u64`)
/// and content, which the client writes to a temp file, renames into place
/// and opens, as `get` does.
fn plain_gets(dir: &Path, samples: usize, big: u64) -> Result<Timings> {
    let (served, fetched) = (dir.join("served"), dir.join("fetched"));
    fs::create_dir_all(&served)?;
    fs::create_dir_all(fetched.join("tmp"))?;
    for i in 0..samples {
        fs::write(served.join(i.to_string()), small_content(i))?;
    }
    write_plain(&served.join(samples.to_string()), &mut PatternReader::new(big), false)?;

    let (mut client, server_end) = loopback_pair()?;
    let server = thread::spawn(move || serve_plain(&served, server_end));
    let mut replies = BufReader::with_capacity(STREAM_BUFFER_LEN, client.try_clone()?);
    let mut fetch = move |index: usize| -> io::Result<u64> {
        client.write_all(&(index as u32).to_be_bytes())?;
        let mut len = [0u8; 8];
        replies.read_exact(&mut len)?;
        let temp = fetched.join("tmp").join(format!("{index}.tmp"));
        let written = write_plain(&temp, &mut (&mut replies).take(u64::from_be_bytes(len)), false)?;
        let path = fetched.join(index.to_string());
        fs::rename(&temp, &path)?;
        File::open(&path)?;
        Ok(written)
    };
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let started = Instant::now();
        let size = fetch(i)?;
        latencies.push(millis(started.elapsed()));
        check_size(size, SMALL_FILE_LEN as u64)?;
    }
    let started = Instant::now();
    let size = fetch(samples)?;
    let took = started.elapsed();
    check_size(size, big)?;
    // Closing our end ends the server's loop.
    drop(fetch);
    join(server)?;
    Ok(Timings { latencies, took })
}

/// The plain server: for each `u32` index read, sends the file's length
/// and its content, until the client closes.
fn serve_plain(dir: &Path, socket: TcpStream) -> io::Result<()> {
    let mut requests = BufReader::new(socket.try_clone()?);
    let mut replies = socket;
    // A clean close between requests ends the loop.
    while !requests.fill_buf()?.is_empty() {
        let mut index = [0u8; 4];
        requests.read_exact(&mut index)?;
        let mut file = File::open(dir.join(u32::from_be_bytes(index).to_string()))?;
        replies.write_all(&file.metadata()?.len().to_be_bytes())?;
        copy_buffered(&mut file, &mut replies)?;
    }
    Ok(())
}

/// Scenario 5's baseline: a chain of plain relay threads. The first link
/// is this thread; each relay writes (or removes) its file and passes the
/// message on; the last one reports.
struct RelayChain {
    /// The directory of the first link's file.
    dir: PathBuf,
    /// The connection to the first relay.
    head: TcpStream,
    /// A message per change that reached the end.
    arrived: Receiver<()>,
    /// The relay threads.
    relays: Vec<JoinHandle<io::Result<()>>>,
}

/// Relay message kind: write the key's file.
const RELAY_STORE: u8 = 1;

/// Relay message kind: remove the key's file.
const RELAY_DELETE: u8 = 2;

impl RelayChain {
    /// A chain of `n` links: this thread and `n - 1` relays, each with its
    /// own directory under `root`.
    fn start(root: &Path, n: usize) -> Result<RelayChain> {
        let (arrived_tx, arrived) = mpsc::channel();
        let mut relays = Vec::with_capacity(n - 1);
        let mut downstream: Option<TcpStream> = None;
        // Built from the far end back, so each relay's next hop exists.
        for i in (1..n).rev() {
            let dir = root.join(format!("r{i}"));
            fs::create_dir_all(dir.join("tmp"))?;
            let (upstream_end, relay_end) = loopback_pair()?;
            let (next, arrived_tx) = (downstream.replace(upstream_end), arrived_tx.clone());
            relays.push(thread::spawn(move || relay(&dir, relay_end, next, arrived_tx)));
        }
        let dir = root.join("r0");
        fs::create_dir_all(dir.join("tmp"))?;
        let head = downstream.expect("a chain has at least two links");
        Ok(RelayChain { dir, head, arrived, relays })
    }

    /// Stores `key` here, sends it down the chain and times its arrival at
    /// the end; then the same for a delete.
    fn store_then_delete(&self, key: &str, content: &[u8]) -> Result<(Duration, Duration)> {
        let send = |kind: u8, content: &[u8]| -> Result<Duration> {
            let started = Instant::now();
            apply_relayed(&self.dir, kind, key, content)?;
            (&self.head).write_all(&relay_message(kind, key, content))?;
            self.arrived
                .recv_timeout(SETTLE_DEADLINE)
                .map_err(|_| Error::Timeout("waiting for the relay chain".into()))?;
            Ok(started.elapsed())
        };
        Ok((send(RELAY_STORE, content)?, send(RELAY_DELETE, &[])?))
    }

    /// Closes the chain (each relay sees its upstream close and closes its
    /// downstream) and joins the relays.
    fn close(self) -> Result<()> {
        drop(self.head);
        self.relays.into_iter().try_for_each(join)
    }
}

/// Encodes a relay message: kind (`u8`), key length (`u16`), key, content
/// length (`u32`), content; all big-endian.
fn relay_message(kind: u8, key: &str, content: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(7 + key.len() + content.len());
    message.push(kind);
    message.extend_from_slice(&(key.len() as u16).to_be_bytes());
    message.extend_from_slice(key.as_bytes());
    message.extend_from_slice(&(content.len() as u32).to_be_bytes());
    message.extend_from_slice(content);
    message
}

/// One relay of the chain: apply each message, pass it on (or report it
/// arrived, at the end of the chain), until the upstream closes.
fn relay(
    dir: &Path,
    upstream: TcpStream,
    mut downstream: Option<TcpStream>,
    arrived: Sender<()>,
) -> io::Result<()> {
    let mut upstream = BufReader::new(upstream);
    while !upstream.fill_buf()?.is_empty() {
        let mut head = [0u8; 3];
        upstream.read_exact(&mut head)?;
        let mut key = vec![0u8; usize::from(u16::from_be_bytes([head[1], head[2]]))];
        upstream.read_exact(&mut key)?;
        let mut len = [0u8; 4];
        upstream.read_exact(&mut len)?;
        let mut content = vec![0u8; u32::from_be_bytes(len) as usize];
        upstream.read_exact(&mut content)?;
        let key = String::from_utf8_lossy(&key);
        apply_relayed(dir, head[0], &key, &content)?;
        match &mut downstream {
            Some(next) => next.write_all(&relay_message(head[0], &key, &content))?,
            None => {
                let _ = arrived.send(());
            }
        }
    }
    Ok(())
}

/// A relay's local step: create + write + rename, or remove.
fn apply_relayed(dir: &Path, kind: u8, key: &str, content: &[u8]) -> io::Result<()> {
    let path = dir.join(key);
    if kind == RELAY_DELETE {
        return fs::remove_file(path);
    }
    let temp = dir.join("tmp").join(key);
    File::create(&temp)?.write_all(content)?;
    fs::rename(&temp, path)
}

/// A connected pair of loopback sockets, Nagle off like gossipfs's.
fn loopback_pair() -> io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let dialled = TcpStream::connect(listener.local_addr()?)?;
    let (accepted, _) = listener.accept()?;
    dialled.set_nodelay(true)?;
    accepted.set_nodelay(true)?;
    Ok((dialled, accepted))
}

// ---------------------------------------------------------------------------
// Content, memory, waiting, figures
// ---------------------------------------------------------------------------

/// The repeating content pattern: 1 MiB of splitmix64 output, made once.
fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut bytes = Vec::with_capacity(PATTERN_LEN);
        while bytes.len() < PATTERN_LEN {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            bytes.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        bytes
    })
}

/// `len` bytes of the pattern, repeated: a big file that costs a memcpy to
/// produce and never sits in memory whole.
struct PatternReader {
    /// Bytes still to produce.
    left: u64,
    /// Where in the pattern the next byte comes from.
    offset: usize,
}

impl PatternReader {
    fn new(len: u64) -> PatternReader {
        PatternReader { left: len, offset: 0 }
    }
}

impl Read for PatternReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = usize::try_from(self.left).unwrap_or(usize::MAX);
        let n = buf.len().min(PATTERN_LEN - self.offset).min(left);
        buf[..n].copy_from_slice(&pattern()[self.offset..self.offset + n]);
        self.offset = (self.offset + n) % PATTERN_LEN;
        self.left -= n as u64;
        Ok(n)
    }
}

/// The key of small file `i`.
fn small_key(i: usize) -> String {
    format!("small-{i:05}")
}

/// The content of small file `i`: 4 KiB of the pattern, different per file.
fn small_content(i: usize) -> &'static [u8] {
    let offset = (i * 4093) % (PATTERN_LEN - SMALL_FILE_LEN);
    &pattern()[offset..offset + SMALL_FILE_LEN]
}

/// How long a big file may take to arrive: generous, since the benchmark
/// means to fail only when something is stuck.
fn transfer_deadline(size: u64) -> Duration {
    SETTLE_DEADLINE + Duration::from_secs(size / (4 * MIB))
}

/// Resets the process's peak resident memory to its current value; false
/// where that is not possible (not Linux, or an old kernel).
fn reset_peak_rss() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's peak resident memory in MiB (`VmHWM`), if the system says.
fn peak_rss_mib() -> Option<f64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The `sha1` crate's throughput on one core, in MiB/s.
fn sha1_throughput(bytes: u64) -> f64 {
    let mut hasher = Sha1::new();
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(PATTERN_LEN as u64) as usize;
        hasher.update(&pattern()[..n]);
        left -= n as u64;
    }
    std::hint::black_box(hasher.finalize());
    bytes as f64 / MIB as f64 / secs(started.elapsed())
}

/// Polls `done` every `poll` until it holds, or fails after `deadline`.
fn wait_until(
    what: &str,
    deadline: Duration,
    poll: Duration,
    mut done: impl FnMut() -> bool,
) -> Result<()> {
    let give_up = Instant::now() + deadline;
    while !done() {
        if Instant::now() > give_up {
            return Err(Error::Timeout(format!("waiting for {what}")));
        }
        thread::sleep(poll);
    }
    Ok(())
}

/// Polls `observe` every [`GENTLE_POLL_INTERVAL`] until what it returns has
/// not changed for `still` and satisfies `done`; returns it. Fails after
/// [`SETTLE_DEADLINE`], with the last state seen.
fn settle<T: PartialEq + Debug>(
    what: &str,
    still: Duration,
    mut observe: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> Result<T> {
    let give_up = Instant::now() + SETTLE_DEADLINE;
    let (mut last, mut changed) = (observe(), Instant::now());
    loop {
        thread::sleep(GENTLE_POLL_INTERVAL);
        let now = observe();
        if now != last {
            (last, changed) = (now, Instant::now());
        } else if changed.elapsed() >= still && done(&now) {
            return Ok(now);
        }
        if Instant::now() > give_up {
            return Err(Error::Timeout(format!("waiting for {what}; last saw {last:?}")));
        }
    }
}

/// Joins a benchmark thread, turning a panic into an error.
fn join<T>(handle: JoinHandle<io::Result<T>>) -> Result<T> {
    let result =
        handle.join().map_err(|_| Error::Io(io::Error::other("a benchmark thread panicked")))?;
    Ok(result?)
}

/// Fails if a transfer moved a different number of bytes than it should.
fn check_size(actual: u64, expected: u64) -> Result<()> {
    if actual != expected {
        return Err(Error::Io(io::Error::other(format!(
            "moved {actual} bytes where {expected} were expected"
        ))));
    }
    Ok(())
}

fn secs(duration: Duration) -> f64 {
    duration.as_secs_f64().max(1e-9)
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The nearest-rank percentile `p` (0 to 100) of `values`; NaN if empty.
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// A figure to three significant digits or so, without a thousands
/// separator: `1234`, `56.7`, `8.90`, `0.123`.
fn fmt(value: f64) -> String {
    let magnitude = value.abs();
    match magnitude {
        m if m.is_nan() => "nan".to_string(),
        m if m >= 100.0 => format!("{value:.0}"),
        m if m >= 10.0 => format!("{value:.1}"),
        m if m >= 1.0 => format!("{value:.2}"),
        _ => format!("{value:.3}"),
    }
}

/// One figure per round, for gossipfs and for its baseline.
#[derive(Default)]
struct Samples {
    /// gossipfs's figure, one per round.
    gossipfs: Vec<f64>,
    /// The baseline's figure from the same rounds.
    baseline: Vec<f64>,
}

impl Samples {
    fn push(&mut self, gossipfs: f64, baseline: f64) {
        self.gossipfs.push(gossipfs);
        self.baseline.push(baseline);
    }
}

/// What a row's figure must show.
#[derive(Clone, Copy)]
enum Target {
    /// gossipfs ÷ baseline at least this.
    RatioAtLeast(f64),
    /// gossipfs ÷ baseline at most this.
    RatioAtMost(f64),
    /// The gossipfs median under this.
    Below(f64),
    /// The gossipfs maximum under this (a peak must stay under it).
    PeakBelow(f64),
}

/// One line of the table.
struct Row {
    /// The scenario's number, as in the module doc.
    scenario: &'static str,
    /// What is measured, for people.
    name: String,
    /// The figures' unit.
    unit: &'static str,
    /// The figure's name on the `bench:` line.
    key: String,
    /// The figures.
    samples: Samples,
    /// What the figure must show, if the issue set a target.
    target: Option<Target>,
}

impl Row {
    fn ratio(&self) -> f64 {
        median(&self.samples.gossipfs) / median(&self.samples.baseline)
    }

    /// The target and whether it was met, for the last column.
    fn verdict(&self) -> Option<(String, bool)> {
        Some(match self.target? {
            Target::RatioAtLeast(least) => {
                (format!("ratio >= {}", fmt(least)), self.ratio() >= least)
            }
            Target::RatioAtMost(most) => (format!("ratio <= {}", fmt(most)), self.ratio() <= most),
            Target::Below(limit) => {
                (format!("< {} {}", fmt(limit), self.unit), median(&self.samples.gossipfs) < limit)
            }
            Target::PeakBelow(limit) => (
                format!("max < {} {}", fmt(limit), self.unit),
                self.samples.gossipfs.iter().all(|v| *v < limit),
            ),
        })
    }
}

/// The results, printed at the end.
#[derive(Default)]
struct Table {
    /// Lines printed before the table, each after `context: `.
    context: Vec<String>,
    /// Figures with no baseline, first on the `bench:` line.
    figures: Vec<(String, f64)>,
    /// In the order measured; printed in scenario order.
    rows: Vec<Row>,
}

impl Table {
    fn row(
        &mut self,
        scenario: &'static str,
        name: &str,
        unit: &'static str,
        key: &str,
        samples: Samples,
        target: Option<Target>,
    ) {
        if samples.gossipfs.is_empty() {
            return; // not measurable here (peak memory off Linux)
        }
        self.rows.push(Row {
            scenario,
            name: name.to_string(),
            unit,
            key: key.to_string(),
            samples,
            target,
        });
    }

    /// Adds a line to print before the table.
    fn context(&mut self, line: String) {
        self.context.push(line);
    }

    /// Adds a figure that has no baseline to the `bench:` line.
    fn figure(&mut self, key: &str, value: f64) {
        self.figures.push((key.to_string(), value));
    }

    /// Prints the context lines, the table, then the `bench:` line (with
    /// the figures first).
    fn print(&self) {
        for line in &self.context {
            println!("context: {line}");
        }
        let triple = |values: &[f64]| {
            let (min, max) = values
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
            format!("{:>7} {:>7} {:>7}", fmt(min), fmt(median(values)), fmt(max))
        };
        println!(
            "{:<2} {:<40} {:<7} {:^23} | {:^23} | {:>6}  target",
            "#", "scenario", "unit", "gossipfs min/med/max", "baseline min/med/max", "ratio"
        );
        let mut missed = 0;
        let mut line = String::from("bench:");
        for (key, value) in &self.figures {
            line.push_str(&format!(" {key}={}", fmt(*value)));
        }
        // Scenario order (memory, measured during 1, is printed last).
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        rows.sort_by_key(|row| row.scenario);
        for row in rows {
            let verdict = match row.verdict() {
                Some((what, true)) => format!("{what}: ok"),
                Some((what, false)) => {
                    missed += 1;
                    format!("{what}: MISSED")
                }
                None => String::new(),
            };
            println!(
                "{:<2} {:<40} {:<7} {} | {} | {:>6}  {}",
                row.scenario,
                row.name,
                row.unit,
                triple(&row.samples.gossipfs),
                triple(&row.samples.baseline),
                fmt(row.ratio()),
                verdict
            );
            line.push_str(&format!(
                " {key}={} {key}_base={} {key}_ratio={}",
                fmt(median(&row.samples.gossipfs)),
                fmt(median(&row.samples.baseline)),
                fmt(row.ratio()),
                key = row.key
            ));
        }
        let targets = self.rows.iter().filter(|row| row.target.is_some()).count();
        line.push_str(&format!(" targets={targets} missed={missed}"));
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 50.0);
        assert_eq!(percentile(&values, 99.0), 99.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), 2.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn figures_keep_about_three_digits() {
        assert_eq!(fmt(1234.4), "1234");
        assert_eq!(fmt(56.78), "56.8");
        assert_eq!(fmt(8.9), "8.90");
        assert_eq!(fmt(0.1234), "0.123");
    }

    #[test]
    fn the_pattern_reader_yields_exactly_its_length() {
        let mut bytes = Vec::new();
        let len = PATTERN_LEN as u64 + 12345;
        PatternReader::new(len).read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, len);
        assert_eq!(&bytes[..100], &bytes[PATTERN_LEN..PATTERN_LEN + 100]);
    }

    #[test]
    fn quick_mode_caps_the_sizes() {
        let plan = Plan::new(&BenchOptions { quick: true, ..BenchOptions::default() });
        assert_eq!((plan.size, plan.files, plan.rounds), (8 * MIB, 200, 1));
        assert_eq!(plan.get_big, 8 * MIB);
        assert_eq!(plan.folder_files, 200);
        assert_eq!(plan.still, QUICK_STILL_PERIOD);
    }
}
