//! The benchmark behind `gossipfs bench`: how fast gossipfs moves files and
//! what it costs, each figure measured beside the plain code that does the
//! same work with nothing else, in the same run.
//!
//! Absolute times on a shared machine drift from one run to the next, so a
//! figure alone says little. Every figure here is printed beside a
//! *baseline*: the same bytes moved by the simplest code that takes the same
//! steps (write a file, send it over a loopback socket, write it on the
//! other side), measured in the same process just before or just after
//! (the order alternates from round to round, so neither side always runs
//! in the other's wake). The ratio of the two is what to read.
//!
//! Everything runs in this one process: threaded nodes on `127.0.0.1`,
//! ephemeral ports, one directory per node under the system temp directory,
//! all removed at the end. Big files are deleted as soon as they are
//! measured; small ones stay until the end, because deleting thousands of
//! files makes the next creates slower on some file systems (ext4 without a
//! journal checks every recently freed inode it passes), which would charge
//! one side for the other's clean-up. Each scenario runs `rounds` times; the table shows
//! min / median / max over the rounds for gossipfs and for the baseline, and
//! the ratio of the two medians (gossipfs ÷ baseline). The last line of the
//! output is one machine-readable line, `bench: key=value ...`, with the
//! median of every figure (`key`), of its baseline (`key_base`) and their
//! ratio (`key_ratio`).
//!
//! Nodes run with anti-entropy made rare (once an hour) so that its frames
//! neither cost time nor show up in frame counts, with peer discovery off
//! (chains stay chains) except in the discovered meshes of scenario 5, and
//! with fsync off except where a row says "fsync on". Content comes from a
//! 1 MiB pseudo-random pattern repeated, so producing it costs a memcpy and
//! never a file's worth of memory.
//!
//! # Scenarios
//!
//! 1. **Big file, one hop** (`--size`, 1 GiB by default). Node A with one
//!    peer B: the time from `A.store()` until B lists the file (committed),
//!    as MiB/s, with fsync off and with fsync on. *Baseline*: the same bytes
//!    written to a local file, then read back and sent over a plain loopback
//!    socket into a file on the other side, through buffers of gossipfs's
//!    size (256 KiB) — gossipfs's steps without the framing, the SHA-1 or
//!    the rename (fsynced too in the fsync-on row). Target: at
//!    least 0.8 of the baseline with fsync off.
//!
//!    A third row sets the same gossipfs figure beside a copy that also
//!    hashes the bytes as gossipfs must: while writing the first file, and
//!    again on the far side to check them. SHA-1 runs at about 1.5 GB/s on
//!    one core, slower than the plain copy, and the two hashes cannot
//!    overlap (the hash travels in the header, before the bytes), so this
//!    row shows what gossipfs costs beyond its hashing.
//! 2. **Big file, store and forward.** The same through a chain of three
//!    nodes, until the far end has it. *Baseline*: the plain copy of
//!    scenario 1 done twice in a row, file to file.
//! 3. **Small files.** `--files` files of 4 KiB stored on A, one after the
//!    other, until B has committed all of them: files/s, and the p50 / p99
//!    latency of `store()`. *Baseline*: create + write + rename of the same
//!    files by plain code, both sides at once (two threads, two
//!    directories); its latency is that of one create + write + rename.
//!    Target: at least 0.5 of the baseline's files/s.
//! 4. **Network get.** The p50 / p99 latency of `get` of a 4 KiB file only
//!    the peer holds, and the throughput of `get` of a 64 MiB one.
//!    *Baseline*: a plain request over a kept-open loopback socket, the file
//!    sent back and written to a temp file that is renamed and opened.
//!
//!    A file stays "only on the peer" only if nothing copies it over: the
//!    peer stores its files before the requester joins (so there is no
//!    relay), and the requester runs with [`Config::anti_entropy`] off (so
//!    it never asks for a summary and never pulls).
//!
//!    Also the copies of a file one `get` moves when three peers hold it: a
//!    4 MiB file (capped at `--size`) stored in a full mesh of three, got by
//!    a fourth node connected to all three that lacks it (joined late,
//!    anti-entropy off, as above). `get` asks every peer and keeps the first
//!    answer; the others still arrive and are drained, so the count is the
//!    asker's file bytes read from peers ([`gossipfs::Stats::bytes_received`])
//!    once every reply has been read, ÷ the file size. *Baseline*: the
//!    least that can work, 1.
//! 5. **Convergence.** Chains of 5, 10 and 20 nodes: the time for a small
//!    store (4 KiB) made at one end to reach the other end, and for a delete
//!    of it, per hop (median of a few changes per round). *Baseline*: a
//!    chain of plain relay threads, each of which reads the message, writes
//!    (or removes) its file and passes the message on. Also the frames sent
//!    for one small store in a full mesh of 5 nodes, and how many copies of
//!    its content crossed the network; the *baseline* is the least that can
//!    work, one per other node (4). Target: under 5 ms per hop.
//!
//!    And the copies of a 4 MiB file (capped at `--size`) one store moves
//!    in meshes of 5, 10 and 20 nodes that discovery built: each node
//!    bootstraps from the one before, with [`Config::discover_peers`] on and
//!    [`Config::max_peers`] at its default, and starts once the peer lists
//!    have held still; so the mesh is what discovery makes of it, and a
//!    context line gives each mesh's shape (links, peers per node). One
//!    store per round is made on the first node; the count is the
//!    file bytes every node read from peers ([`gossipfs::Stats::bytes_received`],
//!    stored or drained), once every node lists the file and every byte
//!    sent has been read, ÷ the file size. Anti-entropy is off on these
//!    nodes, so every copy counted is the relay's. *Baseline*: the least
//!    that can work, N − 1.
//! 6. **Memory.** The process's peak resident memory (`VmHWM` in
//!    `/proc/self/status`, reset before each transfer through
//!    `/proc/self/clear_refs`) while scenario 1 moves the big file. *Baseline*:
//!    the same during the plain copy. Target: under 32 MiB, whatever the file
//!    size.
//!
//! 7. **Folder put.** [`FOLDER_FILES`] files of 4 KiB in ten folders, put
//!    from a directory by the command line's own code (`put KEY DIR`:
//!    [`folder::walk`], then [`folder::put_tree`] over one client
//!    connection) to node A of a pair, fsync on: the time from the start of
//!    the walk until B lists every file. *Baseline*: the least durable work
//!    the same files need on two nodes, both sides at once (two threads):
//!    read each file, then create + write + fsync + rename + fsync of the
//!    folder, one file after the other. Target: under 1 s. A quick run puts
//!    fewer files and says so; the target is then not checked.
//!
//! Before the table, context lines give the `sha1` crate's throughput on
//! this machine, since hashing bounds scenarios 1, 2 and 4, and the shapes
//! of scenario 5's discovered meshes.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
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

/// The chain lengths of scenario 5.
const CHAIN_LENGTHS: [usize; 3] = [5, 10, 20];

/// The number of nodes in the full mesh of scenario 5.
const MESH_SIZE: usize = 5;

/// The node counts of scenario 5's discovered meshes.
const DISCOVERED_MESH_SIZES: [usize; 3] = [5, 10, 20];

/// How many nodes hold the file of scenario 4's copy count.
const GET_HOLDERS: usize = 3;

/// The size of the file whose copies scenarios 4 and 5 count (capped at
/// `--size`).
const COPIES_FILE_LEN: u64 = 4 * MIB;

/// How many changes travel down each chain per round; the round's figure is
/// their median.
const HOP_SAMPLES: usize = 5;

/// Anti-entropy interval of benchmark nodes: long enough never to fire.
const QUIET_ANTI_ENTROPY: Duration = Duration::from_secs(3600);

/// Heartbeats rare enough not to show in a scenario's frame counts, which
/// wait for the cluster to fall quiet. A benchmark's links are loopback and
/// its nodes live for seconds: nothing needs detecting there.
fn quiet_heartbeats(config: &mut Config) {
    config.heartbeat_interval = QUIET_ANTI_ENTROPY;
    config.heartbeat_timeout = QUIET_ANTI_ENTROPY * 3;
}

/// How often a wait re-checks its condition. Short, since it adds to the
/// latencies measured; the checks are cheap.
const POLL_INTERVAL: Duration = Duration::from_micros(200);

/// How long a cluster has to connect, or a small change to arrive.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);

/// How long a frame count must hold still to count as settled.
const QUIET_PERIOD: Duration = Duration::from_millis(20);

/// How long the counters must hold still before copies are counted. Longer
/// than [`QUIET_PERIOD`]: between a peer reading a `Get` and the first
/// bytes of its answer arriving, every counter balances, and on a busy
/// machine that gap can outlast a few milliseconds.
const COPIES_QUIET_PERIOD: Duration = Duration::from_millis(200);

/// How long a discovered mesh's peer lists must hold still to count as
/// formed: discovery dials on loopback take a few milliseconds each.
const MESH_STILL_PERIOD: Duration = Duration::from_millis(200);

/// How often the copy counts poll the nodes' listings. They time nothing,
/// so they poll gently: twenty listings every 200 µs would take CPU from the
/// transfers.
const GENTLE_POLL_INTERVAL: Duration = Duration::from_millis(5);

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
    /// the small files at 200 (scenario 7's folder too), and runs one round.
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
}

impl Plan {
    fn new(options: &BenchOptions) -> Plan {
        let (size, files, rounds, get_samples) = if options.quick {
            (options.size.min(8 * MIB), options.files.min(200), 1, GET_SAMPLES / 4)
        } else {
            (options.size, options.files, options.rounds, GET_SAMPLES)
        };
        Plan {
            size: size.max(1),
            files: files.max(1),
            rounds: rounds.max(1),
            get_samples,
            get_big: GET_BIG_LEN.min(size).max(1),
            copies_len: COPIES_FILE_LEN.min(size).max(1),
            folder_files: if options.quick { FOLDER_FILES / 5 } else { FOLDER_FILES },
        }
    }
}

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

    let runs = |scenario: u8| options.only.is_empty() || options.only.contains(&scenario);
    if runs(1) || runs(6) {
        big_file_one_hop(&plan, &dir.0.join("s1"), &mut table)?;
    }
    if runs(2) {
        big_file_chain(&plan, &dir.0.join("s2"), &mut table)?;
    }
    if runs(3) {
        small_files(&plan, &dir.0.join("s3"), &mut table)?;
    }
    if runs(4) {
        network_get(&plan, &dir.0.join("s4"), &mut table)?;
    }
    if runs(5) {
        convergence(&plan, &dir.0.join("s5"), &mut table)?;
    }
    if runs(7) {
        folder_put(&plan, &dir.0.join("s7"), &mut table)?;
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
    let mib = plan.size as f64 / MIB as f64;
    let mut peak = Samples::default();
    let mut against_sha1 = Samples::default();
    for fsync in [false, true] {
        let mut speed = Samples::default();
        for round in 0..plan.rounds {
            progress(&format!("1 big file, one hop, fsync {}", on_off(fsync)), round, plan);
            let ((plain, plain_peak), (gossipfs, gossipfs_peak)) = both(
                round,
                || plain_big(&dir.join("plain"), plan.size, 1, fsync, PlainCopy::Raw),
                || gossipfs_big(&dir.join("nodes"), plan.size, 1, fsync),
            )?;
            speed.push(mib / secs(gossipfs), mib / secs(plain));
            if !fsync {
                let hashed = dir.join("hashed");
                let (hashed, _) = plain_big(&hashed, plan.size, 1, false, PlainCopy::Hashed)?;
                against_sha1.push(mib / secs(gossipfs), mib / secs(hashed));
            }
            if let (Some(g), Some(p)) = (gossipfs_peak, plain_peak) {
                peak.push(g, p);
            }
        }
        let (name, key) = if fsync {
            ("big file, one hop, fsync on", "s1_fsync_mibps")
        } else {
            ("big file, one hop, fsync off", "s1_mibps")
        };
        let target = (!fsync).then_some(Target::RatioAtLeast(0.8));
        table.row("1", name, "MiB/s", key, speed, target);
        if !fsync {
            let name = "big file, one hop, vs copy + SHA-1";
            let key = "s1_vs_sha1_mibps";
            table.row("1", name, "MiB/s", key, std::mem::take(&mut against_sha1), None);
        }
    }
    table.row(
        "6",
        "peak resident memory during 1",
        "MiB",
        "s6_peak_rss_mib",
        peak,
        Some(Target::PeakBelow(32.0)),
    );
    Ok(())
}

/// Scenario 2: the big file through a chain of three nodes.
fn big_file_chain(plan: &Plan, dir: &Path, table: &mut Table) -> Result<()> {
    let mib = plan.size as f64 / MIB as f64;
    let mut speed = Samples::default();
    for round in 0..plan.rounds {
        progress("2 big file, chain of 3", round, plan);
        let ((plain, _), (gossipfs, _)) = both(
            round,
            || plain_big(&dir.join("plain"), plan.size, 2, false, PlainCopy::Raw),
            || gossipfs_big(&dir.join("nodes"), plan.size, 2, false),
        )?;
        speed.push(mib / secs(gossipfs), mib / secs(plain));
    }
    let name = "big file, chain of 3 (2 hops)";
    table.row("2", name, "MiB/s", "s2_mibps", speed, None);
    Ok(())
}

/// Scenario 3: many small files over one hop.
fn small_files(plan: &Plan, dir: &Path, table: &mut Table) -> Result<()> {
    let mut rate = Samples::default();
    let mut p50 = Samples::default();
    let mut p99 = Samples::default();
    for round in 0..plan.rounds {
        progress("3 small files", round, plan);
        let (plain, gossipfs) = both(
            round,
            || plain_small(&dir.join(format!("plain-{round}")), plan.files),
            || gossipfs_small(&dir.join(format!("nodes-{round}")), plan.files),
        )?;
        rate.push(gossipfs.files_per_sec, plain.files_per_sec);
        p50.push(percentile(&gossipfs.latencies, 50.0), percentile(&plain.latencies, 50.0));
        p99.push(percentile(&gossipfs.latencies, 99.0), percentile(&plain.latencies, 99.0));
    }
    let name = format!("{} small files, one hop", plan.files);
    let target = Some(Target::RatioAtLeast(0.5));
    table.row("3", &name, "files/s", "s3_files_per_s", rate, target);
    table.row("3", "store() latency p50", "ms", "s3_store_p50_ms", p50, None);
    table.row("3", "store() latency p99", "ms", "s3_store_p99_ms", p99, None);
    Ok(())
}

/// Scenario 4: gets of files only the peer holds.
fn network_get(plan: &Plan, dir: &Path, table: &mut Table) -> Result<()> {
    let mut p50 = Samples::default();
    let mut p99 = Samples::default();
    let mut speed = Samples::default();
    let big_mib = plan.get_big as f64 / MIB as f64;
    for round in 0..plan.rounds {
        progress("4 network get", round, plan);
        let (plain, gossipfs) = both(
            round,
            || plain_gets(&dir.join(format!("plain-{round}")), plan.get_samples, plan.get_big),
            || gossipfs_gets(&dir.join(format!("nodes-{round}")), plan.get_samples, plan.get_big),
        )?;
        p50.push(percentile(&gossipfs.latencies, 50.0), percentile(&plain.latencies, 50.0));
        p99.push(percentile(&gossipfs.latencies, 99.0), percentile(&plain.latencies, 99.0));
        speed.push(big_mib / secs(gossipfs.big), big_mib / secs(plain.big));
    }
    table.row("4", "get 4 KiB p50", "ms", "s4_get_p50_ms", p50, None);
    table.row("4", "get 4 KiB p99", "ms", "s4_get_p99_ms", p99, None);
    let name = format!("get {} MiB", fmt(big_mib));
    table.row("4", &name, "MiB/s", "s4_get_big_mibps", speed, None);
    get_copies(plan, &dir.join("copies"), table)
}

/// Scenario 4's copy count: one get of a file that [`GET_HOLDERS`] peers
/// hold, by a node that lacks it.
fn get_copies(plan: &Plan, dir: &Path, table: &mut Table) -> Result<()> {
    let len = plan.copies_len;
    let key = |round: usize| format!("get-copies-{round}");
    // The holders first, with a file of their own for every round, so that
    // each round's get is of a file the asker lacks.
    let mut cluster = Cluster::mesh(dir, GET_HOLDERS)?;
    for round in 0..plan.rounds {
        cluster.nodes[0].store(&key(round), PatternReader::new(len))?;
    }
    let all = len * (plan.rounds * GET_HOLDERS) as u64;
    wait_for(
        "every holder to hold every file",
        transfer_deadline(all),
        GENTLE_POLL_INTERVAL,
        || cluster.nodes.iter().all(|node| (0..plan.rounds).all(|round| holds(node, &key(round)))),
    )?;
    // Then the asker, connected to every holder, with anti-entropy off so
    // that nothing but the get brings it the file (see scenario 4's note).
    let mut config = cluster.config(GET_HOLDERS, false);
    config.anti_entropy = false;
    config.bootstrap = cluster.nodes.iter().map(|node| node.local_addr().to_string()).collect();
    let asker = FileServer::start_on(TcpListener::bind("127.0.0.1:0")?, config)?;
    wait_until("the asker to connect to every holder", SETTLE_DEADLINE, || {
        asker.peers().len() == GET_HOLDERS
    })?;
    cluster.nodes.push(asker);
    let asker = &cluster.nodes[GET_HOLDERS];
    let mut copies = Samples::default();
    for round in 0..plan.rounds {
        progress(&format!("4 copies per get, {GET_HOLDERS} holders"), round, plan);
        let since = cluster.wait_quiet(None, QUIET_PERIOD)?;
        let before = asker.stats().bytes_received;
        let file = asker.get(&key(round))?;
        check_size(file.size(), len)?;
        drop(file);
        // The get returned with the first answer; the others are still on
        // their way, to be drained.
        cluster.wait_quiet(Some(since), COPIES_QUIET_PERIOD)?;
        let received = asker.stats().bytes_received - before;
        copies.push(received as f64 / len as f64, 1.0);
    }
    drop(cluster);
    let name =
        format!("get {} MiB from {GET_HOLDERS} holders: copies", fmt(len as f64 / MIB as f64));
    table.row("4", &name, "copies", "s4_get_copies", copies, None);
    Ok(())
}

/// Scenario 5: a small change down chains, and the cost of one store in a
/// full mesh.
fn convergence(plan: &Plan, dir: &Path, table: &mut Table) -> Result<()> {
    for n in CHAIN_LENGTHS {
        let hops = (n - 1) as f64;
        let root = dir.join(format!("chain-{n}"));
        let cluster = Cluster::chain(&root.join("nodes"), n, false)?;
        let relays = RelayChain::start(&root.join("plain"), n)?;
        let mut store = Samples::default();
        let mut delete = Samples::default();
        for round in 0..plan.rounds {
            progress(&format!("5 convergence, chain of {n}"), round, plan);
            let mut samples = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
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
            store.push(g_store, p_store);
            delete.push(g_delete, p_delete);
        }
        relays.close()?;
        drop(cluster);
        let target = Some(Target::Below(5.0));
        let (store_name, delete_name) =
            (format!("chain of {n}: store, per hop"), format!("chain of {n}: delete, per hop"));
        let key = format!("s5_chain{n}_store_ms_per_hop");
        table.row("5", &store_name, "ms", &key, store, target);
        let key = format!("s5_chain{n}_delete_ms_per_hop");
        table.row("5", &delete_name, "ms", &key, delete, target);
    }
    mesh_cost(plan, &dir.join("mesh"), table)?;
    discovered_mesh_copies(plan, &dir.join("discovered"), table)
}

/// Scenario 7: a folder of small files put through the command line's
/// client, fsync on.
fn folder_put(plan: &Plan, dir: &Path, table: &mut Table) -> Result<()> {
    let files = plan.folder_files;
    let source = dir.join("source");
    write_folder(&source, files)?;
    let mut took = Samples::default();
    for round in 0..plan.rounds {
        progress(&format!("7 folder put, {files} files, fsync on"), round, plan);
        let (plain, gossipfs) = both(
            round,
            || plain_folder(&source, &dir.join(format!("plain-{round}")), files),
            || gossipfs_folder(&source, &dir.join(format!("nodes-{round}")), files),
        )?;
        took.push(millis(gossipfs), millis(plain));
    }
    let name = format!("folder put, {files} x 4 KiB, fsync on");
    let target = (files == FOLDER_FILES).then_some(Target::Below(1000.0));
    table.row("7", &name, "ms", "s7_folder_ms", took, target);
    if files != FOLDER_FILES {
        table.context(format!(
            "quick: the folder put of scenario 7 has {files} files, not {FOLDER_FILES}; \
             its goal (under 1 s for {FOLDER_FILES}) is not checked"
        ));
    }
    Ok(())
}

/// Scenario 5's frame count: one small store in a full mesh.
fn mesh_cost(plan: &Plan, dir: &Path, table: &mut Table) -> Result<()> {
    let cluster = Cluster::mesh(dir, MESH_SIZE)?;
    // The least that can work: each other node gets the change once.
    let least = (MESH_SIZE - 1) as f64;
    let mut frames = Samples::default();
    let mut copies = Samples::default();
    for round in 0..plan.rounds {
        progress(&format!("5 frames, mesh of {MESH_SIZE}"), round, plan);
        let before = cluster.wait_quiet(None, QUIET_PERIOD)?;
        let key = format!("mesh-{round}");
        cluster.nodes[0].store(&key, small_content(round))?;
        wait_until("the mesh store to reach every node", SETTLE_DEADLINE, || {
            cluster.nodes.iter().all(|node| holds(node, &key))
        })?;
        let after = cluster.wait_quiet(Some(before), QUIET_PERIOD)?;
        frames.push((after.frames - before.frames) as f64, least);
        let content_bytes = (after.bytes - before.bytes) as f64;
        copies.push(content_bytes / SMALL_FILE_LEN as f64, least);
    }
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
        let cluster = Cluster::discovered(&dir.join(n.to_string()), n)?;
        let shape = MeshShape::of(&cluster);
        // The least that can work: each other node reads the bytes once.
        let least = (n - 1) as f64;
        let mut copies = Samples::default();
        for round in 0..plan.rounds {
            progress(&format!("5 copies per store, discovered mesh of {n}"), round, plan);
            let key = format!("copies-{round}");
            let before = cluster.wait_quiet(None, QUIET_PERIOD)?;
            cluster.nodes[0].store(&key, PatternReader::new(len))?;
            let deadline = transfer_deadline(len * n as u64);
            wait_for("the store to reach every node", deadline, GENTLE_POLL_INTERVAL, || {
                cluster.nodes.iter().all(|node| holds(node, &key))
            })?;
            // Every node holds it; copies that lost a race may still be on
            // their way, to be drained.
            let after = cluster.wait_quiet(Some(before), COPIES_QUIET_PERIOD)?;
            let received = after.bytes_received - before.bytes_received;
            copies.push(received as f64 / len as f64, least);
            // Deleted, so that the disk does not fill round by round; a
            // delete moves no file bytes.
            cluster.nodes[0].delete(&key)?;
            wait_for(
                "the delete to reach every node",
                SETTLE_DEADLINE,
                GENTLE_POLL_INTERVAL,
                || cluster.nodes.iter().all(|node| !holds(node, &key)),
            )?;
        }
        drop(cluster);
        let name = format!("discovered mesh of {n}: copies per store");
        table.row("5", &name, "copies", &format!("s5_dmesh{n}_copies"), copies, None);
        table.figure(&format!("s5_dmesh{n}_links"), shape.links as f64);
        shapes.push(shape.to_string());
    }
    // The meshes ran with the default; say what it is.
    let max_peers = Config::new("default", dir).max_peers;
    table.context(format!(
        "discovered meshes (max_peers {max_peers}; n1 stores): {}",
        shapes.join("; ")
    ));
    Ok(())
}

/// Who is connected to whom in a discovered mesh, in numbers.
struct MeshShape {
    /// Nodes.
    nodes: usize,
    /// Connections.
    links: usize,
    /// The fewest peers a node has.
    min_peers: usize,
    /// The most peers a node has.
    max_peers: usize,
    /// The peers of `n1`, the node that stores: its copies are pushed, the
    /// others fetched.
    first_peers: usize,
}

impl MeshShape {
    fn of(cluster: &Cluster) -> MeshShape {
        let degrees: Vec<usize> = cluster.peer_lists().iter().map(Vec::len).collect();
        MeshShape {
            nodes: degrees.len(),
            links: degrees.iter().sum::<usize>() / 2,
            min_peers: degrees.iter().copied().min().unwrap_or(0),
            max_peers: degrees.iter().copied().max().unwrap_or(0),
            first_peers: degrees.first().copied().unwrap_or(0),
        }
    }
}

impl std::fmt::Display for MeshShape {
    /// `20 nodes: 90 of 190 links, 8 to 12 peers a node, n1 has 12`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let full = self.nodes * self.nodes.saturating_sub(1) / 2;
        write!(
            f,
            "{} nodes: {} of {full} links, {} to {} peers a node, n1 has {}",
            self.nodes, self.links, self.min_peers, self.max_peers, self.first_peers
        )
    }
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
    wait_until("the big file to reach the far end", transfer_deadline(size), || {
        far.list().iter().any(|f| f.key == "big" && f.size == size)
    })?;
    let took = started.elapsed();
    let peak = if watching_memory { peak_rss_mib() } else { None };
    drop(cluster);
    fs::remove_dir_all(dir)?;
    Ok((took, peak))
}

/// What scenario 3 measured on one side.
struct SmallFiles {
    /// Files per second until the far side had them all.
    files_per_sec: f64,
    /// Each file's store latency, in ms.
    latencies: Vec<f64>,
}

/// Stores `files` small files on A, one at a time, and waits until B has
/// committed every one.
fn gossipfs_small(dir: &Path, files: usize) -> Result<SmallFiles> {
    let cluster = Cluster::chain(dir, 2, false)?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let applied_before = b.stats().changes_applied;
    let mut latencies = Vec::with_capacity(files);
    let started = Instant::now();
    for i in 0..files {
        let stored = Instant::now();
        a.store(&small_key(i), small_content(i))?;
        latencies.push(millis(stored.elapsed()));
    }
    // B's applied-change counter, not its listing: the listing copies every
    // key each time it is polled, and holds B's index lock while it does.
    let deadline = SETTLE_DEADLINE + Duration::from_millis(10) * files as u32;
    wait_until("every small file to reach B", deadline, || {
        b.stats().changes_applied - applied_before >= files as u64
    })?;
    let took = started.elapsed();
    drop(cluster);
    Ok(SmallFiles { files_per_sec: files as f64 / secs(took), latencies })
}

/// Puts the folder at `source` on A of a fresh pair with fsync on, as
/// `gossipfs put folder SOURCE` does, and times it from the start of the
/// walk until B lists every file.
fn gossipfs_folder(source: &Path, dir: &Path, files: usize) -> Result<Duration> {
    let cluster = Cluster::chain(dir, 2, true)?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let applied_before = b.stats().changes_applied;
    let in_folder = |key: &str| folder::below(FOLDER_KEY, key).is_some();
    let started = Instant::now();
    let tree = folder::walk(source, FOLDER_KEY)?;
    let mut client = Client::connect(&a.local_addr().to_string(), None)?;
    folder::put_tree(&mut client, &tree, &mut |_, _| {})?;
    // B's applied-change counter first, then its listing: the listing
    // copies every key each time it is polled, and holds B's index lock
    // while it does, so it is polled only once the count says it may pass.
    let deadline = SETTLE_DEADLINE + Duration::from_millis(10) * files as u32;
    wait_until("every file of the folder to reach B", deadline, || {
        b.stats().changes_applied - applied_before >= files as u64
            && b.list().iter().filter(|file| in_folder(&file.key)).count() == files
    })?;
    let took = started.elapsed();
    check_size(tree.files.len() as u64, files as u64)?;
    drop(client);
    drop(cluster);
    Ok(took)
}

/// What scenario 4 measured on one side.
struct Gets {
    /// Each 4 KiB get's latency, in ms.
    latencies: Vec<f64>,
    /// The time of the big get.
    big: Duration,
}

/// Gets `samples` small files and one big file that only the peer holds
/// (see the module doc for how they get there).
fn gossipfs_gets(dir: &Path, samples: usize, big: u64) -> Result<Gets> {
    // The holder first, alone: it stores the files through its own API.
    let mut cluster = Cluster::chain(dir, 1, false)?;
    let holder = &cluster.nodes[0];
    for i in 0..samples {
        holder.store(&small_key(i), small_content(i))?;
    }
    holder.store("get-big", PatternReader::new(big))?;
    // Then the asker joins with anti-entropy off: it never sends a summary,
    // so the holder never offers it the files, and every get below crosses
    // the network.
    let mut config = Config::new("asker", cluster.root(1));
    config.fsync = false;
    config.discover_peers = false;
    config.anti_entropy = false;
    quiet_heartbeats(&mut config);
    config.bootstrap = vec![holder.local_addr().to_string()];
    let asker = FileServer::start_on(TcpListener::bind("127.0.0.1:0")?, config)?;
    wait_until("the asker to connect", SETTLE_DEADLINE, || asker.peers().len() == 1)?;
    cluster.nodes.push(asker);
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
    let big_took = started.elapsed();
    check_size(file.size(), big)?;
    drop(file);
    drop(cluster);
    Ok(Gets { latencies, big: big_took })
}

/// Per-node frame counters, summed over a cluster.
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
    /// `n` nodes, each dialling the one before it, and waits until every
    /// link is up.
    fn chain(root: &Path, n: usize, fsync: bool) -> Result<Cluster> {
        Cluster::start(root, n, fsync, |i| (i.saturating_sub(1)..i).collect())
    }

    /// `n` nodes, each dialling every node before it: a full mesh.
    fn mesh(root: &Path, n: usize) -> Result<Cluster> {
        Cluster::start(root, n, false, |i| (0..i).collect())
    }

    /// `n` nodes, node `i` dialling the nodes `dials(i)` (all before it);
    /// returns once every node has as many peers as it has links.
    fn start(
        root: &Path,
        n: usize,
        fsync: bool,
        dials: impl Fn(usize) -> Vec<usize>,
    ) -> Result<Cluster> {
        let mut cluster = Cluster { root: root.to_path_buf(), nodes: Vec::with_capacity(n) };
        let mut links = vec![0; n];
        for i in 0..n {
            let mut config = cluster.config(i, fsync);
            for j in dials(i) {
                let addr = cluster.nodes[j].local_addr().to_string();
                config.bootstrap.push(addr);
                links[i] += 1;
                links[j] += 1;
            }
            let listener = TcpListener::bind("127.0.0.1:0")?;
            cluster.nodes.push(FileServer::start_on(listener, config)?);
        }
        wait_until("the cluster to connect", SETTLE_DEADLINE, || {
            let nodes = cluster.nodes.iter();
            nodes.zip(&links).all(|(node, n)| node.peers().len() == *n)
        })?;
        Ok(cluster)
    }

    /// `n` nodes with discovery on and anti-entropy off, each bootstrapping
    /// from the one before; each starts once the peer lists have held still
    /// (every link seen from both ends) for [`MESH_STILL_PERIOD`], so each
    /// newcomer hears of every node its first peer knows. The periodic
    /// `Peers` frames come once an hour, like anti-entropy elsewhere: the
    /// mesh grows from the ones exchanged whenever two nodes connect.
    fn discovered(root: &Path, n: usize) -> Result<Cluster> {
        let mut cluster = Cluster { root: root.to_path_buf(), nodes: Vec::with_capacity(n) };
        for i in 0..n {
            let mut config = cluster.config(i, false);
            config.discover_peers = true;
            config.anti_entropy = false;
            if let Some(previous) = cluster.nodes.last() {
                config.bootstrap.push(previous.local_addr().to_string());
            }
            let listener = TcpListener::bind("127.0.0.1:0")?;
            cluster.nodes.push(FileServer::start_on(listener, config)?);
            cluster.wait_mesh_still()?;
        }
        Ok(cluster)
    }

    /// The config of node `i`: discovery off (it would turn a chain into a
    /// mesh; meshes are dialled explicitly instead) and anti-entropy rare.
    fn config(&self, i: usize, fsync: bool) -> Config {
        let mut config = Config::new(&format!("n{}", i + 1), self.root(i));
        config.fsync = fsync;
        config.discover_peers = false;
        config.anti_entropy_interval = QUIET_ANTI_ENTROPY;
        quiet_heartbeats(&mut config);
        config
    }

    /// Each node's peers' listen addresses, sorted.
    fn peer_lists(&self) -> Vec<Vec<String>> {
        let lists = self.nodes.iter().map(|node| node.peers().into_iter().map(|p| p.addr));
        lists
            .map(|addrs| {
                let mut addrs: Vec<String> = addrs.collect();
                addrs.sort();
                addrs
            })
            .collect()
    }

    /// Waits until every node has a peer, every link is seen from both
    /// ends, and the peer lists have held still for [`MESH_STILL_PERIOD`].
    fn wait_mesh_still(&self) -> Result<()> {
        let addrs: Vec<String> = self.nodes.iter().map(|n| n.local_addr().to_string()).collect();
        let deadline = Instant::now() + SETTLE_DEADLINE;
        let mut last = self.peer_lists();
        loop {
            thread::sleep(MESH_STILL_PERIOD);
            let now = self.peer_lists();
            let linked = now.iter().all(|peers| !peers.is_empty()) || self.nodes.len() < 2;
            let mutual = now.iter().zip(&addrs).all(|(peers, me)| {
                peers.iter().all(|peer| {
                    let at = addrs.iter().position(|addr| addr == peer);
                    at.is_some_and(|j| now[j].contains(me))
                })
            });
            if now == last && linked && mutual {
                return Ok(());
            }
            if Instant::now() > deadline {
                let counts: Vec<usize> = now.iter().map(Vec::len).collect();
                return Err(Error::Timeout(format!(
                    "waiting for the discovered mesh to settle; last saw peers per node {counts:?}"
                )));
            }
            last = now;
        }
    }

    /// The root directory of node `i`.
    fn root(&self, i: usize) -> PathBuf {
        self.root.join(format!("n{}", i + 1))
    }

    /// Stores `key` at the first node and times its arrival at the last;
    /// then the same for a delete of it.
    fn store_then_delete(&self, key: &str, content: &[u8]) -> Result<(Duration, Duration)> {
        let (first, last) = (&self.nodes[0], &self.nodes[self.nodes.len() - 1]);
        let started = Instant::now();
        first.store(key, content)?;
        wait_until("a store to reach the end of the chain", SETTLE_DEADLINE, || holds(last, key))?;
        let stored = started.elapsed();
        let started = Instant::now();
        first.delete(key)?;
        wait_until("a delete to reach the end of the chain", SETTLE_DEADLINE, || {
            !holds(last, key)
        })?;
        Ok((stored, started.elapsed()))
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

    /// Waits until the counters have held still for `period` and, if
    /// `since` is given, every frame and file byte sent since then has been
    /// read (a reader counts a frame a moment before it queues the frame's
    /// relay, hence the still period too). Returns the counters.
    ///
    /// Only frames sent since a point are compared with frames read: the
    /// totals can differ for good, since a frame that arrives while its
    /// receiver is still in the handshake is lost (see the benchmark notes).
    fn wait_quiet(&self, since: Option<Traffic>, period: Duration) -> Result<Traffic> {
        let deadline = Instant::now() + SETTLE_DEADLINE;
        let mut last = self.traffic();
        loop {
            thread::sleep(period);
            let now = self.traffic();
            let all_read = since.is_none_or(|then| {
                now.frames - then.frames == now.received - then.received
                    && now.bytes - then.bytes == now.bytes_received - then.bytes_received
            });
            if now == last && all_read {
                return Ok(now);
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "waiting for the mesh to fall quiet; last saw {now:?}"
                )));
            }
            last = now;
        }
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
    // Connections are open before the clock starts, as gossipfs's are.
    let mut links = Vec::with_capacity(hops);
    for path in &paths[1..] {
        links.push(PlainHop::open(path.clone(), fsync, copy)?);
    }
    let watching_memory = reset_peak_rss();
    let started = Instant::now();
    let mut source = Hashing::new(PatternReader::new(size), copy);
    write_plain(&paths[0], &mut source, fsync)?;
    let sha1 = source.finish();
    for (link, from) in links.into_iter().zip(&paths) {
        let (copied, copied_sha1) = link.send(from)?;
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

/// One plain loopback connection whose far end writes what it receives to
/// a file.
struct PlainHop {
    /// Our end.
    sender: TcpStream,
    /// The far end's thread; returns the bytes it wrote and, for a hashed
    /// copy, their SHA-1.
    receiver: JoinHandle<io::Result<(u64, Option<Sha1Digest>)>>,
}

impl PlainHop {
    /// Connects, and starts the far end writing into `to`.
    fn open(to: PathBuf, fsync: bool, copy: PlainCopy) -> Result<PlainHop> {
        let (sender, socket) = loopback_pair()?;
        let receiver = thread::spawn(move || {
            let mut socket = Hashing::new(socket, copy);
            let written = write_plain(&to, &mut socket, fsync)?;
            Ok((written, socket.finish()))
        });
        Ok(PlainHop { sender, receiver })
    }

    /// Sends the file at `from`, closes our end and waits until the far end
    /// has written everything.
    fn send(mut self, from: &Path) -> Result<(u64, Option<Sha1Digest>)> {
        copy_buffered(&mut File::open(from)?, &mut self.sender)?;
        self.sender.shutdown(Shutdown::Write)?;
        join(self.receiver)
    }
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
        let hasher = (copy == PlainCopy::Hashed).then(Sha1::new);
        Hashing { inner, hasher }
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

/// Creates, writes and renames `files` small files in `dir`, one at a
/// time; returns each one's latency in ms.
fn write_small_files(dir: &Path, files: usize) -> io::Result<Vec<f64>> {
    let (tmp, done) = (dir.join("tmp"), dir.join("files"));
    fs::create_dir_all(&tmp)?;
    fs::create_dir_all(&done)?;
    let mut latencies = Vec::with_capacity(files);
    for i in 0..files {
        let started = Instant::now();
        let temp = tmp.join(format!("{i}.tmp"));
        File::create(&temp)?.write_all(small_content(i))?;
        fs::rename(&temp, done.join(small_key(i)))?;
        latencies.push(millis(started.elapsed()));
    }
    Ok(latencies)
}

/// Scenario 3's baseline: both sides' files written at once, by two
/// threads.
fn plain_small(dir: &Path, files: usize) -> Result<SmallFiles> {
    let other_side = dir.join("b");
    let started = Instant::now();
    let other = thread::spawn(move || write_small_files(&other_side, files));
    let latencies = write_small_files(&dir.join("a"), files)?;
    join(other)?;
    let took = started.elapsed();
    Ok(SmallFiles { files_per_sec: files as f64 / secs(took), latencies })
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

/// One node's least durable work for scenario 7: each file read, then
/// created, written, fsynced, renamed into place and its folder fsynced,
/// one after the other.
fn durable_copies(source: &Path, to: &Path, files: usize) -> io::Result<()> {
    let (tmp, done) = (to.join("tmp"), to.join("files"));
    fs::create_dir_all(&tmp)?;
    fs::create_dir_all(&done)?;
    let folder = File::open(&done)?;
    for i in 0..files {
        let content = fs::read(source.join(folder_file(i)))?;
        let temp = tmp.join(format!("{i}.tmp"));
        let mut file = File::create(&temp)?;
        file.write_all(&content)?;
        file.sync_all()?;
        fs::rename(&temp, done.join(small_key(i)))?;
        folder.sync_all()?;
    }
    Ok(())
}

/// Scenario 7's baseline: both nodes' durable copies made at once, by two
/// threads.
fn plain_folder(source: &Path, dir: &Path, files: usize) -> Result<Duration> {
    let (theirs, other_side) = (source.to_path_buf(), dir.join("b"));
    let started = Instant::now();
    let other = thread::spawn(move || durable_copies(&theirs, &other_side, files));
    durable_copies(source, &dir.join("a"), files)?;
    join(other)?;
    Ok(started.elapsed())
}

/// Scenario 4's baseline: a plain file server on a kept-open connection.
fn plain_gets(dir: &Path, samples: usize, big: u64) -> Result<Gets> {
    let (served, fetched) = (dir.join("served"), dir.join("fetched"));
    fs::create_dir_all(&served)?;
    fs::create_dir_all(fetched.join("tmp"))?;
    for i in 0..samples {
        fs::write(served.join(i.to_string()), small_content(i))?;
    }
    let big_index = samples as u32;
    write_plain(&served.join(big_index.to_string()), &mut PatternReader::new(big), false)?;

    let (mut client, server_end) = loopback_pair()?;
    let server = thread::spawn(move || serve_plain(&served, server_end));
    let mut replies = BufReader::with_capacity(STREAM_BUFFER_LEN, client.try_clone()?);
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let started = Instant::now();
        let size = fetch_plain(&mut client, &mut replies, &fetched, i as u32)?;
        latencies.push(millis(started.elapsed()));
        check_size(size, SMALL_FILE_LEN as u64)?;
    }
    let started = Instant::now();
    let size = fetch_plain(&mut client, &mut replies, &fetched, big_index)?;
    let big_took = started.elapsed();
    check_size(size, big)?;
    // Closing our end ends the server's loop.
    drop(replies);
    drop(client);
    join(server)?;
    Ok(Gets { latencies, big: big_took })
}

/// Asks the plain server for file `index` (a `u32`), receives its length (a
/// `u64`) and content into a temp file, renames it into place and opens it,
/// as `get` does. Returns the length.
fn fetch_plain(
    client: &mut TcpStream,
    replies: &mut BufReader<TcpStream>,
    dir: &Path,
    index: u32,
) -> io::Result<u64> {
    client.write_all(&index.to_be_bytes())?;
    let mut len = [0u8; 8];
    replies.read_exact(&mut len)?;
    let len = u64::from_be_bytes(len);
    let temp = dir.join("tmp").join(format!("{index}.tmp"));
    let written = write_plain(&temp, &mut replies.take(len), false)?;
    let path = dir.join(index.to_string());
    fs::rename(&temp, &path)?;
    File::open(&path)?;
    Ok(written)
}

/// The plain server: for each `u32` index read, sends the file's length
/// and its content, until the client closes.
fn serve_plain(dir: &Path, socket: TcpStream) -> io::Result<()> {
    let mut requests = BufReader::new(socket.try_clone()?);
    let mut replies = socket;
    loop {
        // A clean close between requests ends the loop.
        if requests.fill_buf()?.is_empty() {
            return Ok(());
        }
        let mut index = [0u8; 4];
        requests.read_exact(&mut index)?;
        let mut file = File::open(dir.join(u32::from_be_bytes(index).to_string()))?;
        replies.write_all(&file.metadata()?.len().to_be_bytes())?;
        copy_buffered(&mut file, &mut replies)?;
    }
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
            let next = downstream.take();
            let arrived_tx = arrived_tx.clone();
            relays.push(thread::spawn(move || relay(&dir, relay_end, next, arrived_tx)));
            downstream = Some(upstream_end);
        }
        let dir = root.join("r0");
        fs::create_dir_all(dir.join("tmp"))?;
        let head = downstream.expect("a chain has at least two links");
        Ok(RelayChain { dir, head, arrived, relays })
    }

    /// Stores `key` here, sends it down the chain and times its arrival at
    /// the end; then the same for a delete.
    fn store_then_delete(&self, key: &str, content: &[u8]) -> Result<(Duration, Duration)> {
        let started = Instant::now();
        apply_relayed(&self.dir, RELAY_STORE, key, content)?;
        (&self.head).write_all(&relay_message(RELAY_STORE, key, content))?;
        self.wait_arrival()?;
        let stored = started.elapsed();
        let started = Instant::now();
        apply_relayed(&self.dir, RELAY_DELETE, key, &[])?;
        (&self.head).write_all(&relay_message(RELAY_DELETE, key, &[]))?;
        self.wait_arrival()?;
        Ok((stored, started.elapsed()))
    }

    fn wait_arrival(&self) -> Result<()> {
        self.arrived
            .recv_timeout(SETTLE_DEADLINE)
            .map_err(|_| Error::Timeout("waiting for the relay chain".into()))
    }

    /// Closes the chain (each relay sees its upstream close and closes its
    /// downstream) and joins the relays.
    fn close(self) -> Result<()> {
        drop(self.head);
        for relay in self.relays {
            join(relay)?;
        }
        Ok(())
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
    loop {
        if upstream.fill_buf()?.is_empty() {
            return Ok(());
        }
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

/// Polls `done` every [`POLL_INTERVAL`] until it holds, or fails after
/// `deadline`.
fn wait_until(what: &str, deadline: Duration, done: impl FnMut() -> bool) -> Result<()> {
    wait_for(what, deadline, POLL_INTERVAL, done)
}

/// Polls `done` every `poll` until it holds, or fails after `deadline`.
fn wait_for(
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

fn progress(scenario: &str, round: usize, plan: &Plan) {
    eprintln!("bench: {scenario} (round {} of {})", round + 1, plan.rounds);
}

fn on_off(flag: bool) -> &'static str {
    if flag { "on" } else { "off" }
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
    }
}
