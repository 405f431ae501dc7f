//! The command line, end to end: real `gossipfs serve` processes on free
//! loopback ports, driven by the client commands the way a user drives them
//! from a shell (stdin, stdout, files, exit codes, stderr).
//!
//! Each test starts its own nodes, so tests share nothing and run in any
//! order. Every process lives in a [`Proc`] guard whose drop kills and reaps
//! it, so a failed assertion never leaves a node running; a failing test
//! also prints its nodes' logs. Nothing sleeps to synchronise: every wait
//! polls a condition until a deadline ([`wait_until`]).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{DEADLINE, FaultProxy, Proc, TempDir, free_port, pseudo_random_bytes, wait_until};
use gossipfs::frame::{ErrorCode, Frame, read_frame};

/// The binary under test, built by cargo for this test target.
const BIN: &str = env!("CARGO_BIN_EXE_gossipfs");

/// How long one client command may run before the test gives up on it.
/// Only reached when something hangs; no test measures how long anything
/// takes.
const COMMAND_DEADLINE: Duration = Duration::from_secs(30);

/// How often a running command is checked for having exited.
const EXIT_POLL: Duration = Duration::from_millis(2);

/// How many times a node is restarted on a fresh port when the port it was
/// given turned out to be taken (another process bound it between our
/// probe and the node's own bind).
const PORT_ATTEMPTS: usize = 5;

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// What a finished command did.
#[derive(Debug)]
struct Output {
    /// The command line, for messages.
    what: String,
    /// The exit code; `None` if a signal ended the process.
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

impl Output {
    /// Stdout as text (the commands print UTF-8 keys and numbers).
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Asserts the command succeeded and returns it.
    fn success(self) -> Output {
        assert_eq!(self.code, Some(0), "`{}` failed; stderr: {}", self.what, self.stderr);
        self
    }

    /// Asserts the command failed with `code`, printing one `error: ` line
    /// on stderr and nothing on stdout, and returns that line.
    fn failure(&self, code: i32) -> &str {
        assert_eq!(
            self.code,
            Some(code),
            "`{}` should exit {code}; stdout: {:?}; stderr: {}",
            self.what,
            self.text(),
            self.stderr
        );
        assert!(self.stdout.is_empty(), "`{}` failed but printed {:?}", self.what, self.text());
        assert!(
            self.stderr.starts_with("error: "),
            "`{}` should start stderr with `error: `, got: {}",
            self.what,
            self.stderr
        );
        self.stderr.lines().next().unwrap_or_default()
    }
}

/// One invocation of the `gossipfs` binary, built up then run.
struct Cli {
    args: Vec<String>,
    stdin: Option<Vec<u8>>,
    env: Vec<(String, String)>,
    /// A terminal to give the command as stdin, in place of a pipe.
    terminal: Option<File>,
    /// The user id (and group id) to run the command as; `None` for ours.
    user: Option<u32>,
}

/// `gossipfs ARGS...`, with `GOSSIPFS_NODE` unset unless a test sets it, so
/// the environment the tests run in cannot redirect them.
fn cli(args: &[&str]) -> Cli {
    Cli {
        args: args.iter().map(|a| a.to_string()).collect(),
        stdin: None,
        env: Vec::new(),
        terminal: None,
        user: None,
    }
}

impl Cli {
    /// Feeds `bytes` to the command's stdin (otherwise stdin is empty).
    fn stdin(mut self, bytes: &[u8]) -> Cli {
        self.stdin = Some(bytes.to_vec());
        self
    }

    /// Gives the command `terminal` as its stdin, as a shell prompt does.
    fn terminal_stdin(mut self, terminal: File) -> Cli {
        self.terminal = Some(terminal);
        self
    }

    /// Runs the command as user and group `id`, if given.
    fn user(mut self, id: Option<u32>) -> Cli {
        self.user = id;
        self
    }

    fn env(mut self, name: &str, value: &str) -> Cli {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// Runs the command to completion and collects what it did. Panics if
    /// it is still running after [`COMMAND_DEADLINE`] (the guard kills it).
    fn run(self) -> Output {
        let what = format!("gossipfs {}", self.args.join(" "));
        let mut command = Command::new(BIN);
        command
            .args(&self.args)
            .env_remove("GOSSIPFS_NODE")
            .stdin(self.terminal.map_or_else(Stdio::piped, Stdio::from))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in &self.env {
            command.env(name, value);
        }
        #[cfg(unix)]
        if let Some(id) = self.user {
            use std::os::unix::process::CommandExt;
            command.uid(id).gid(id);
        }
        let child = command.spawn().unwrap_or_else(|err| panic!("cannot start `{what}`: {err}"));
        let mut proc = Proc { child, what: what.clone(), log: None };

        // Feed stdin (unless it is a terminal) and drain both pipes on
        // their own threads, so a large transfer cannot fill a pipe and
        // stall the child. A write error means the child stopped reading (it
        // failed): its exit code says so.
        let input = self.stdin.unwrap_or_default();
        let feeder = proc.child.stdin.take().map(|mut stdin| {
            thread::spawn(move || {
                let _ = stdin.write_all(&input);
            })
        });
        let stdout = drain(proc.child.stdout.take().expect("stdout is piped"));
        let stderr = drain(proc.child.stderr.take().expect("stderr is piped"));

        let deadline = Instant::now() + COMMAND_DEADLINE;
        let status = loop {
            match proc.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(EXIT_POLL),
                Ok(None) => panic!("`{what}` still running after {COMMAND_DEADLINE:?}"),
                Err(err) => panic!("cannot wait for `{what}`: {err}"),
            }
        };
        if let Some(feeder) = feeder {
            feeder.join().expect("the stdin feeder does not panic");
        }
        let stdout = stdout.join().expect("the stdout reader does not panic");
        let stderr = stderr.join().expect("the stderr reader does not panic");
        Output {
            what,
            code: status.code(),
            stdout,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }
}

/// Reads a pipe to its end on a thread.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

/// Asserts two byte strings are equal without printing megabytes when they
/// are not.
fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first_difference = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: got {} bytes, want {}; first difference at {first_difference:?}",
            got.len(),
            want.len()
        );
    }
}

/// The names of the entries in `dir`, sorted.
fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read the directory")
        .map(|entry| {
            let entry = entry.expect("read a directory entry");
            entry.file_name().to_string_lossy().into_owned()
        })
        .collect();
    names.sort();
    names
}

// ---------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------

/// A running `gossipfs serve`.
struct Node {
    /// Its `--name`, unique across all tests (see [`Cluster::start`]).
    name: String,
    /// Its `--listen` address, `127.0.0.1:PORT`.
    addr: String,
    /// The process, killed when the node is dropped.
    _proc: Proc,
}

impl Node {
    /// `gossipfs COMMAND --node ADDR ARGS...` against this node.
    fn cli(&self, command: &str, args: &[&str]) -> Cli {
        let mut all = vec![command, "--node", &self.addr];
        all.extend_from_slice(args);
        cli(&all)
    }

    /// What `ls` prints for this node.
    fn ls(&self) -> String {
        self.cli("ls", &[]).run().success().text()
    }

    /// What `status` says about this node.
    fn status(&self) -> Status {
        parse_status(&self.cli("status", &[]).run().success().text())
    }

    /// How this node appears in its peers' `status`: `name (addr)`.
    fn as_peer(&self) -> String {
        format!("{} ({})", self.name, self.addr)
    }
}

/// What `status` printed, field by field.
#[derive(Debug, PartialEq, Eq)]
struct Status {
    name: String,
    id: String,
    listen: String,
    peer_count: usize,
    peers: Vec<String>,
    files: u64,
    bytes: u64,
}

/// Parses `status` output: `label: value` lines, and one indented line per
/// peer after `peers:`.
fn parse_status(text: &str) -> Status {
    let mut fields = HashMap::new();
    let mut peers = Vec::new();
    for line in text.lines() {
        if line.starts_with(char::is_whitespace) {
            peers.push(line.trim().to_string());
            continue;
        }
        let Some((label, value)) = line.split_once(':') else {
            panic!("status line {line:?} has no label; the output was:\n{text}");
        };
        fields.insert(label.to_string(), value.trim().to_string());
    }
    let field = |label: &str| {
        fields
            .get(label)
            .cloned()
            .unwrap_or_else(|| panic!("status has no {label:?} line; the output was:\n{text}"))
    };
    let number = |label: &str| {
        field(label)
            .parse::<u64>()
            .unwrap_or_else(|err| panic!("status {label:?} is not a number ({err}):\n{text}"))
    };
    Status {
        name: field("name"),
        id: field("id"),
        listen: field("listen"),
        peer_count: number("peers") as usize,
        peers,
        files: number("files"),
        bytes: number("bytes"),
    }
}

/// What a node being started was last seen doing.
#[derive(Debug)]
enum Startup {
    /// The process ended (most likely its port was taken); its log.
    Exited(String),
    /// It is running; the last `status` against its address.
    Running(Output),
}

/// Starts `gossipfs serve` named `name`, keeping its files and its log in
/// `dir`, bootstrapping from `peers`, and waits until it answers `status`.
fn start_node(dir: &Path, name: &str, peers: &[&Node]) -> Node {
    start_node_with(dir, name, peers, &["--no-fsync"])
}

/// [`start_node`], with `extra` arguments instead of `--no-fsync`.
fn start_node_with(dir: &Path, name: &str, peers: &[&Node], extra: &[&str]) -> Node {
    for _ in 0..PORT_ATTEMPTS {
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.join(format!("{name}.log"));
        let log_file = File::create(&log).expect("create a log file");
        let root = dir.join(name);
        let root = root.to_str().expect("temp paths are UTF-8");
        let mut args = vec!["serve", "--listen", &addr, "--root", root, "--name", name];
        args.extend_from_slice(extra);
        for peer in peers {
            args.extend(["--peer", &peer.addr]);
        }
        let what = format!("gossipfs {}", args.join(" "));
        // The log goes to a file: a pipe nobody reads would fill up and
        // stall the node.
        let child = Command::new(BIN)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start `{what}`: {err}"));
        let mut proc = Proc { child, what, log: Some(log.clone()) };
        let seen = wait_until(
            &format!("{name} to answer status at {addr}"),
            || match proc.child.try_wait() {
                Ok(None) => Startup::Running(cli(&["status", "--node", &addr]).run()),
                _ => Startup::Exited(std::fs::read_to_string(&log).unwrap_or_default()),
            },
            |seen| match seen {
                Startup::Exited(_) => true,
                // The name check makes sure it is our node that answers,
                // not another test's that won a race for the port.
                Startup::Running(out) => {
                    out.code == Some(0) && parse_status(&out.text()).name == name
                }
            },
        );
        match seen {
            Startup::Running(_) => {
                return Node { name: name.to_string(), addr, _proc: proc };
            }
            Startup::Exited(log) => eprintln!("{name} exited at start; retrying:\n{log}"),
        }
    }
    panic!("{name} could not start in {PORT_ATTEMPTS} attempts");
}

/// Nodes started by one test, and the directory they keep everything in.
struct Cluster {
    // Field order is drop order: the nodes are killed (and their logs
    // printed, on failure) before the directory is removed.
    nodes: Vec<Node>,
    _dir: TempDir,
}

impl Cluster {
    /// Starts `n` nodes named `TAG-n1`..`TAG-nN` in a chain, each given
    /// the one before as `--peer`, and waits until every node has every
    /// other as a peer (the chain closes into a mesh by peer discovery).
    /// `tag` is the test's own, so node names are unique across tests.
    fn start(tag: &str, n: usize) -> Cluster {
        let dir = TempDir::new(&format!("cli-{tag}"));
        let mut nodes: Vec<Node> = Vec::new();
        for i in 1..=n {
            let name = format!("{tag}-n{i}");
            let previous: Vec<&Node> = nodes.last().into_iter().collect();
            let node = start_node(dir.path(), &name, &previous);
            nodes.push(node);
        }
        let cluster = Cluster { nodes, _dir: dir };
        cluster.wait_for_mesh();
        cluster
    }

    /// Waits until each node's `status` lists exactly the others.
    fn wait_for_mesh(&self) {
        let expected: Vec<Vec<String>> = self
            .nodes
            .iter()
            .map(|me| {
                let others = self.nodes.iter().filter(|n| n.name != me.name);
                others.map(Node::as_peer).collect()
            })
            .collect();
        wait_until(
            "every node to have every other as a peer",
            || self.nodes.iter().map(|n| n.status().peers).collect::<Vec<_>>(),
            |seen| seen == &expected,
        );
    }

    /// Waits until every node's `ls` prints `expected`.
    fn wait_for_ls(&self, expected: &str) {
        wait_until(
            &format!("every node to list {expected:?}"),
            || self.nodes.iter().map(Node::ls).collect::<Vec<_>>(),
            |seen| seen.iter().all(|ls| ls == expected),
        );
    }
}

// ---------------------------------------------------------------------------
// Moving files between nodes
// ---------------------------------------------------------------------------

#[test]
fn put_from_stdin_on_one_node_and_get_to_stdout_on_another() {
    let cluster = Cluster::start("stdio", 3);
    let [n1, n2, n3] = &cluster.nodes[..] else { unreachable!("three nodes") };
    // About 3 MiB, not a multiple of any buffer size.
    let payload = pseudo_random_bytes(3 * 1024 * 1024 + 17, 1);

    let put = n1.cli("put", &["big.bin"]).stdin(&payload).run().success();
    // Progress goes to stderr only on a terminal; here it is a pipe.
    assert_eq!(put.stderr, "", "put printed on stderr");
    assert!(put.stdout.is_empty(), "put printed {:?}", put.text());

    // Replication is asynchronous: the get may find a local copy or fetch
    // one from a peer. Either way the bytes must be the ones stored.
    let got = n3.cli("get", &["big.bin"]).run().success();
    assert_eq!(got.stderr, "", "get printed on stderr");
    assert_same_bytes(&got.stdout, &payload, "get big.bin through n3");

    // `-` names stdin explicitly.
    n2.cli("put", &["small.txt", "-"]).stdin(b"hello from stdin\n").run().success();
    let got = n1.cli("get", &["small.txt"]).run().success();
    assert_same_bytes(&got.stdout, b"hello from stdin\n", "get small.txt through n1");
}

#[test]
fn put_from_a_file_on_one_node_and_get_to_a_file_on_another() {
    let cluster = Cluster::start("files", 3);
    let [n1, n2, n3] = &cluster.nodes[..] else { unreachable!("three nodes") };
    let work = TempDir::new("cli-files-work");
    let input = work.path().join("input.bin");
    let payload = pseudo_random_bytes(300 * 1024 + 5, 2);
    std::fs::write(&input, &payload).expect("write the input file");

    n2.cli("put", &["docs/report.bin", input.to_str().expect("UTF-8 path")]).run().success();

    let out_dir = TempDir::new("cli-files-out");
    let output = out_dir.path().join("report.bin");
    let output_arg = output.to_str().expect("UTF-8 path");
    let got = n3.cli("get", &["docs/report.bin", "-o", output_arg]).run().success();
    assert!(got.stdout.is_empty(), "get -o printed {:?}", got.text());
    assert_eq!(got.stderr, "", "get -o printed on stderr");
    let written = std::fs::read(&output).expect("get -o wrote the file");
    assert_same_bytes(&written, &payload, "get -o through n3");
    // The temp file it wrote first was renamed into place, not left over.
    assert_eq!(dir_entries(out_dir.path()), ["report.bin"]);

    // A second get -o replaces the file it finds there.
    std::fs::write(&output, b"stale").expect("overwrite the output");
    n1.cli("get", &["docs/report.bin", "--output", output_arg]).run().success();
    let written = std::fs::read(&output).expect("get -o wrote the file");
    assert_same_bytes(&written, &payload, "get --output through n1");
    assert_eq!(dir_entries(out_dir.path()), ["report.bin"]);
}

#[test]
fn get_of_a_missing_key_exits_1_and_leaves_no_output_file() {
    let cluster = Cluster::start("missing", 3);
    let n2 = &cluster.nodes[1];
    let out_dir = TempDir::new("cli-missing-out");
    let output = out_dir.path().join("never.bin");

    let got = n2.cli("get", &["no/such key", "-o", output.to_str().expect("UTF-8 path")]).run();
    let error = got.failure(1);
    assert!(error.contains("not found"), "got: {error}");
    assert!(error.contains("no/such key"), "got: {error}");
    // No FILE, and no temp file beside it either.
    assert_eq!(dir_entries(out_dir.path()), Vec::<String>::new());

    // The same to stdout: nothing printed.
    n2.cli("get", &["no/such key"]).run().failure(1);
}

#[test]
fn rm_then_get_fails_with_not_found_on_every_node() {
    let cluster = Cluster::start("rm", 3);
    let [n1, n2, n3] = &cluster.nodes[..] else { unreachable!("three nodes") };
    n1.cli("put", &["doomed.txt"]).stdin(b"short-lived").run().success();
    // Let every node hold a copy, so the rm has something to delete on each.
    cluster.wait_for_ls("doomed.txt\t11\n");

    n2.cli("rm", &["doomed.txt"]).run().success();
    // On the node that ran the rm the delete is immediate.
    let error = n2.cli("get", &["doomed.txt"]).run();
    let error = error.failure(1);
    assert!(error.contains("not found"), "got: {error}");
    assert!(error.contains("doomed.txt"), "got: {error}");

    // The delete spreads; then no node has it to give.
    cluster.wait_for_ls("");
    for node in [n1, n3] {
        let got = node.cli("get", &["doomed.txt"]).run();
        let error = got.failure(1);
        assert!(error.contains("not found"), "{}: {error}", node.name);
        assert!(error.contains("doomed.txt"), "{}: {error}", node.name);
    }

    // Removing it again: there is nothing to remove.
    let again = n1.cli("rm", &["doomed.txt"]).run();
    let error = again.failure(1);
    assert!(error.contains("not found"), "got: {error}");
}

#[test]
fn ls_prints_each_live_file_sorted_by_key_with_its_size() {
    let cluster = Cluster::start("ls", 3);
    let n1 = &cluster.nodes[0];
    assert_eq!(n1.ls(), "", "a new node lists nothing");

    // Stored out of order; one empty; one removed again.
    let files: [(&str, usize); 4] =
        [("zebra.txt", 5), ("alpha/beta.bin", 1000), ("Mango", 0), ("middle", 3)];
    for (i, (key, size)) in files.into_iter().enumerate() {
        let content = pseudo_random_bytes(size, 10 + i as u64);
        n1.cli("put", &[key]).stdin(&content).run().success();
    }
    n1.cli("rm", &["middle"]).run().success();

    // Sorted by key as bytes: upper case before lower case.
    let expected = "Mango\t0\nalpha/beta.bin\t1000\nzebra.txt\t5\n";
    assert_eq!(n1.ls(), expected, "ls on the node that stored them");
    cluster.wait_for_ls(expected);
}

#[test]
fn clear_refuses_without_yes_and_with_yes_empties_every_node() {
    let cluster = Cluster::start("clear", 3);
    let [n1, n2, _] = &cluster.nodes[..] else { unreachable!("three nodes") };
    n1.cli("put", &["a"]).stdin(b"1").run().success();
    n1.cli("put", &["b"]).stdin(b"22").run().success();
    let both = "a\t1\nb\t2\n";
    cluster.wait_for_ls(both);

    let refused = n2.cli("clear", &[]).run();
    assert_ne!(refused.code, Some(0), "clear without --yes succeeded");
    assert!(
        refused.stderr.contains("--yes"),
        "the refusal should say how to confirm; got: {}",
        refused.stderr
    );
    // A clear that went through would have emptied n2 before returning.
    for node in &cluster.nodes {
        assert_eq!(node.ls(), both, "{} lost files to a refused clear", node.name);
    }

    n2.cli("clear", &["--yes"]).run().success();
    cluster.wait_for_ls("");
}

#[test]
fn status_prints_name_id_address_peers_files_and_bytes() {
    let cluster = Cluster::start("status", 3);
    let [n1, n2, n3] = &cluster.nodes[..] else { unreachable!("three nodes") };
    n1.cli("put", &["ten"]).stdin(&[7; 10]).run().success();
    n1.cli("put", &["two-thousand"]).stdin(&[9; 2000]).run().success();

    let status = n1.status();
    assert_eq!(status.name, n1.name);
    assert_eq!(status.listen, n1.addr);
    assert_eq!(status.peer_count, 2);
    assert_eq!(status.peers, [n2.as_peer(), n3.as_peer()]);
    assert_eq!(status.files, 2);
    assert_eq!(status.bytes, 2010);
    assert!(
        status.id.len() == 16 && status.id.chars().all(|c| c.is_ascii_hexdigit()),
        "the id should be 16 hex digits, got {:?}",
        status.id
    );

    // Each node has its own id.
    let ids: Vec<String> = cluster.nodes.iter().map(|n| n.status().id).collect();
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2], "ids should differ: {ids:?}");
}

// ---------------------------------------------------------------------------
// Folders
// ---------------------------------------------------------------------------

/// Every regular file below `dir`, by its path below `dir` (with `/`), with
/// its bytes. Symbolic links and special files are left out; a temp file
/// left behind is a regular file and shows.
fn files_below(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn visit(dir: &Path, below: &str, files: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).expect("read a folder") {
            let entry = entry.expect("read a folder entry");
            let name = entry.file_name().into_string().expect("UTF-8 names");
            let path = format!("{below}{name}");
            let file_type = entry.file_type().expect("an entry's type");
            if file_type.is_dir() {
                visit(&entry.path(), &format!("{path}/"), files);
            } else if file_type.is_file() {
                files.insert(path, std::fs::read(entry.path()).expect("read a file"));
            }
        }
    }
    let mut files = BTreeMap::new();
    visit(dir, "", &mut files);
    files
}

/// Writes each `(path below dir, bytes)`, creating folders.
fn write_files(dir: &Path, files: &[(&str, Vec<u8>)]) {
    for (path, bytes) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("create a folder");
        std::fs::write(&path, bytes).expect("write a file");
    }
}

/// Asserts the files below `dir` are exactly `want`, byte for byte.
fn assert_files_below(dir: &Path, want: &BTreeMap<String, Vec<u8>>) {
    let got = files_below(dir);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{}",
        dir.display()
    );
    for (path, bytes) in want {
        assert_same_bytes(&got[path], bytes, path);
    }
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

#[test]
fn a_folder_put_on_one_node_comes_back_byte_for_byte_from_a_prefix_get_on_another() {
    let cluster = Cluster::start("folder", 2);
    let [n1, n2] = &cluster.nodes[..] else { unreachable!("two nodes") };
    let work = TempDir::new("cli-folder-work");
    let source = work.path().join("source");
    let files: [(&str, Vec<u8>); 6] = [
        ("top.txt", b"top\n".to_vec()),
        ("empty-file", Vec::new()),
        (".hidden", pseudo_random_bytes(100, 21)),
        ("a/space and é.txt", pseudo_random_bytes(5000, 22)),
        // More than two of the client's 256 KiB chunks.
        ("a/b/c/deep.bin", pseudo_random_bytes(600 * 1024 + 3, 23)),
        ("a/b/sibling.bin", pseudo_random_bytes(4096, 24)),
    ];
    write_files(&source, &files);
    // What is not stored: an empty folder, and on Unix a symbolic link and
    // a socket (UnixListener leaves its socket file behind when dropped).
    std::fs::create_dir(source.join("a/empty")).expect("create an empty folder");
    let mut skipped = vec![("empty", "empty folder")];
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("top.txt", source.join("link")).expect("make a symlink");
        std::os::unix::net::UnixListener::bind(source.join("a/socket")).expect("make a socket");
        skipped.extend([("link", "symbolic link"), ("socket", "socket")]);
    }

    // A trailing `/` on the key changes nothing.
    let put = n1.cli("put", &["photos/", utf8(&source)]).run().success();
    assert!(put.stdout.is_empty(), "put printed {:?}", put.text());
    for (name, why) in &skipped {
        assert!(
            put.stderr
                .lines()
                .any(|l| l.starts_with("skipped ") && l.contains(name) && l.contains(why)),
            "put should say it skipped {name} ({why}); stderr: {}",
            put.stderr
        );
    }
    assert_eq!(put.stderr.lines().count(), skipped.len(), "stderr: {}", put.stderr);

    let want: BTreeMap<String, Vec<u8>> =
        files.iter().map(|(path, bytes)| (path.to_string(), bytes.clone())).collect();
    let listing: String =
        want.iter().map(|(path, bytes)| format!("photos/{path}\t{}\n", bytes.len())).collect();
    wait_until(
        "n2 to list the folder",
        || n2.cli("ls", &["photos"]).run().success().text(),
        |ls| ls == &listing,
    );

    // The output folder does not exist yet: the get makes it.
    let out = work.path().join("out");
    let got = n2.cli("get", &["--prefix", "photos", "-o", utf8(&out)]).run().success();
    assert!(got.stdout.is_empty(), "get printed {:?}", got.text());
    assert_eq!(got.stderr, "", "get printed on stderr");
    assert_files_below(&out, &want);
}

#[test]
fn ls_with_a_prefix_lists_only_the_keys_in_that_folder() {
    let cluster = Cluster::start("lsprefix", 1);
    let n1 = &cluster.nodes[0];
    for key in ["photos/a.jpg", "photos/2024/b.jpg", "photos", "photosynthesis", "x/photos/c"] {
        n1.cli("put", &[key]).stdin(b"x").run().success();
    }
    let photos = "photos/2024/b.jpg\t1\nphotos/a.jpg\t1\n";
    assert_eq!(n1.cli("ls", &["photos"]).run().success().text(), photos);
    assert_eq!(n1.cli("ls", &["photos/"]).run().success().text(), photos);
    assert_eq!(n1.cli("ls", &["photos/2024"]).run().success().text(), "photos/2024/b.jpg\t1\n");
    assert_eq!(n1.cli("ls", &["nothing"]).run().success().text(), "");
    assert_eq!(n1.ls().lines().count(), 5, "ls without a prefix lists everything");
}

#[test]
fn a_prefix_get_refuses_keys_that_would_leave_the_output_folder_and_writes_the_rest() {
    let cluster = Cluster::start("escape", 1);
    let n1 = &cluster.nodes[0];
    let work = TempDir::new("cli-escape-work");
    // Deep enough that every escape below lands inside `work`, so a get
    // that obeyed one would be seen, and cleaned up with the test.
    let out = work.path().join("deep").join("out");
    let absolute_key = format!("p/{}", utf8(&work.path().join("absolute")));
    assert!(absolute_key.starts_with("p//"), "the temp dir should be absolute: {absolute_key}");
    let refused = [
        "p/../escaped",
        "p/a/../../escaped",
        "p/a/../../../escaped",
        absolute_key.as_str(),
        "p/./dot",
        "p/a//b",
        "p/trailing/",
    ];
    n1.cli("put", &["p/ok.txt"]).stdin(b"fine").run().success();
    for key in refused {
        n1.cli("put", &[key]).stdin(b"escape").run().success();
    }
    // A NUL cannot travel in an argument; the protocol carries it.
    let mut client = common::TestClient::connect(&n1.addr, None).expect("connect to n1");
    client.put("p/nul\0byte", &mut &b"escape"[..]).expect("put a key with a NUL");

    let got = n1.cli("get", &["--prefix", "p", "-o", utf8(&out)]).run();
    assert_eq!(got.code, Some(1), "`{}`: {}", got.what, got.stderr);
    assert!(got.stdout.is_empty(), "get printed {:?}", got.text());
    let lines: Vec<&str> = got.stderr.lines().collect();
    for key in refused.iter().copied().chain(["p/nul\0byte"]) {
        assert!(
            lines.iter().any(|l| l.starts_with(&format!("skipped {key:?}: "))),
            "the get should report {key:?} as refused; stderr: {}",
            got.stderr
        );
    }
    let last = lines.last().expect("an error line");
    assert!(last.starts_with("error: refused 8 of the 9 keys under p/"), "got: {last}");

    // The safe key was written, and nothing else anywhere.
    let written = BTreeMap::from([("deep/out/ok.txt".to_string(), b"fine".to_vec())]);
    assert_files_below(work.path(), &written);
}

#[test]
fn a_prefix_get_replaces_no_existing_file_unless_forced() {
    let cluster = Cluster::start("force", 1);
    let n1 = &cluster.nodes[0];
    let work = TempDir::new("cli-force-work");
    let out = work.path().join("out");
    n1.cli("put", &["docs/a.txt"]).stdin(b"alpha").run().success();
    n1.cli("put", &["docs/sub/b.txt"]).stdin(b"beta").run().success();
    let stored = BTreeMap::from([
        ("a.txt".to_string(), b"alpha".to_vec()),
        ("sub/b.txt".to_string(), b"beta".to_vec()),
    ]);
    n1.cli("get", &["--prefix", "docs", "-o", utf8(&out)]).run().success();
    assert_files_below(&out, &stored);

    // One file changed here, one removed: the get may not replace the first,
    // and it refuses before writing the second either.
    std::fs::write(out.join("sub/b.txt"), b"mine").expect("change a file");
    std::fs::remove_file(out.join("a.txt")).expect("remove a file");
    let again = n1.cli("get", &["--prefix", "docs", "-o", utf8(&out)]).run();
    let error = again.failure(1);
    assert!(error.contains(utf8(&out.join("sub").join("b.txt"))), "should name the file: {error}");
    assert!(error.contains("--force"), "should say how to replace it: {error}");
    let mine = BTreeMap::from([("sub/b.txt".to_string(), b"mine".to_vec())]);
    assert_files_below(&out, &mine);

    n1.cli("get", &["--prefix", "docs", "-o", utf8(&out), "--force"]).run().success();
    assert_files_below(&out, &stored);
}

/// The user id tests run commands as when they need file modes to hold:
/// `nobody`, on Linux and the BSDs alike.
#[cfg(unix)]
const NOBODY: u32 = 65534;

#[cfg(unix)]
#[test]
fn a_folder_put_stops_at_an_unreadable_file_naming_it_and_what_was_stored() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = Cluster::start("unreadable", 1);
    let n1 = &cluster.nodes[0];
    let work = TempDir::new("cli-unreadable-work");
    let source = work.path().join("source");
    let names = ["a.txt", "b.txt", "c.txt", "d.txt"];
    write_files(&source, &names.map(|name| (name, b"x".to_vec())));
    let mode = |path: &Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    for dir in [work.path(), &source] {
        mode(dir, 0o755);
    }
    let unreadable = source.join("c.txt");
    mode(&unreadable, 0o000);
    // Root reads a file whatever its mode; then the put runs as nobody, for
    // whom the mode holds. Where nobody cannot even run the binary (a build
    // under a private home directory), the case cannot be made here.
    let user = std::fs::read(&unreadable).is_ok().then_some(NOBODY);
    if let Some(id) = user {
        use std::os::unix::process::CommandExt;
        let probe = Command::new(BIN).arg("help").uid(id).gid(id).output();
        if !probe.is_ok_and(|out| out.status.success()) {
            println!("skipped: user {id} cannot run {BIN} on this machine");
            return;
        }
    }

    let put = n1.cli("put", &["docs", utf8(&source)]).user(user).run();
    let error = put.failure(1);
    assert!(error.contains(utf8(&unreadable)), "should name the file: {error}");
    assert!(
        error.contains("stored the first 2 of 4 files (in key order, through docs/b.txt)"),
        "should say what was stored: {error}"
    );
    assert_eq!(n1.ls(), "docs/a.txt\t1\ndocs/b.txt\t1\n");
}

/// Killed (SIGKILL) while a folder put's batches commit, a node starts
/// again with every file it acknowledged, and every file it holds is whole:
/// a batch commits each file whole or not at all.
#[test]
fn a_node_killed_during_a_folder_put_keeps_every_acknowledged_file_and_no_half_file() {
    const FILES: usize = 1000;
    let work = TempDir::new("cli-kill");
    let node = start_node_with(work.path(), "kill1", &[], &[]);
    let source = work.path().join("source");
    let contents: Vec<(String, Vec<u8>)> =
        (0..FILES).map(|i| (format!("f{i:04}"), pseudo_random_bytes(4096, i as u64))).collect();
    let named: Vec<(&str, Vec<u8>)> =
        contents.iter().map(|(name, bytes)| (name.as_str(), bytes.clone())).collect();
    write_files(&source, &named);
    // The answers come back through a slow link, so the client, which sends
    // a window of files ahead of their answers, is still putting when the
    // node is killed.
    let proxy = FaultProxy::start(node.addr.parse().expect("a socket address"));
    proxy.throttle(2_000);
    let (via, folder) = (proxy.addr().to_string(), utf8(&source).to_string());
    let put = thread::spawn(move || cli(&["put", "--node", &via, "docs", &folder]).run());
    wait_until("300 files committed", || node.status().files, |files| *files >= 300);
    drop(node);

    let out = put.join().expect("the put thread does not panic");
    let error = out.failure(1);
    let acknowledged: usize = error
        .split("stored the first ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("should say how many files were stored: {error}"));
    assert!((1..FILES).contains(&acknowledged), "the kill should land mid-put: {error}");

    let node = start_node_with(work.path(), "kill1", &[], &[]);
    let out = work.path().join("out");
    node.cli("get", &["--prefix", "docs", "-o", utf8(&out)]).run().success();
    let held = files_below(&out);
    for (name, bytes) in &contents[..acknowledged] {
        let got = held.get(name).unwrap_or_else(|| panic!("acknowledged {name} was lost"));
        assert_same_bytes(got, bytes, name);
    }
    let want: BTreeMap<&String, &Vec<u8>> = contents.iter().map(|(n, b)| (n, b)).collect();
    for (name, bytes) in &held {
        assert_same_bytes(bytes, want[name], name);
    }
    let set_aside = work.path().join("kill1").join("corrupt");
    let damaged = std::fs::read_dir(&set_aside).map_or(0, Iterator::count);
    assert_eq!(damaged, 0, "damaged files were set aside in {}", set_aside.display());
}

#[test]
fn a_folder_put_of_a_folder_with_no_files_exits_1_and_stores_nothing() {
    let work = TempDir::new("cli-nofiles");
    // The folder is read before any connection, so no node is needed.
    let addr = format!("127.0.0.1:{}", free_port());
    let out = cli(&["put", "--node", &addr, "k", utf8(work.path())]).run();
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: ") && last.contains("no regular files"), "got: {last}");
}

/// Opens a pseudo-terminal: its controlling side, and the terminal a child
/// gets as stdin, as from a shell prompt. std has no pty API and the tests
/// take no crates, so this calls the C library; `O_NOCTTY` (these
/// architectures' value) keeps the terminal from becoming ours.
#[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
fn pseudo_terminal() -> (File, File) {
    use std::ffi::{CStr, c_char, c_int};
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::fs::OpenOptionsExt;
    const O_RDWR: c_int = 0o2;
    const O_NOCTTY: c_int = 0o400;
    unsafe extern "C" {
        fn posix_openpt(flags: c_int) -> c_int;
        fn grantpt(fd: c_int) -> c_int;
        fn unlockpt(fd: c_int) -> c_int;
        fn ptsname_r(fd: c_int, buf: *mut c_char, len: usize) -> c_int;
    }
    // SAFETY: posix_openpt returns a new descriptor (or -1), which the File
    // then owns.
    let fd = unsafe { posix_openpt(O_RDWR | O_NOCTTY) };
    assert!(fd >= 0, "cannot open a pseudo-terminal: {}", io::Error::last_os_error());
    let control = unsafe { File::from_raw_fd(fd) };
    let mut name = [0 as c_char; 128];
    // SAFETY: the calls take the descriptor the File owns, and ptsname_r
    // writes at most `name.len()` bytes, NUL included, into `name`.
    let ready = unsafe {
        grantpt(control.as_raw_fd()) == 0
            && unlockpt(control.as_raw_fd()) == 0
            && ptsname_r(control.as_raw_fd(), name.as_mut_ptr(), name.len()) == 0
    };
    assert!(ready, "cannot set up a pseudo-terminal: {}", io::Error::last_os_error());
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) }.to_str().expect("a UTF-8 path").to_owned();
    let terminal = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(O_NOCTTY)
        .open(&path)
        .unwrap_or_else(|err| panic!("cannot open {path}: {err}"));
    (control, terminal)
}

#[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
#[test]
fn put_with_no_file_and_a_terminal_on_stdin_stores_nothing_and_says_how_to_give_content() {
    let cluster = Cluster::start("tty", 1);
    let n1 = &cluster.nodes[0];
    // Without the check the put would wait for typing until the command
    // deadline; the controlling side stays open, so the terminal stays up.
    let (_control, terminal) = pseudo_terminal();
    let out = n1.cli("put", &["typed"]).terminal_stdin(terminal).run();
    assert_eq!(out.code, Some(2), "`{}`: {}", out.what, out.stderr);
    let error = out.stderr.lines().next().unwrap_or_default();
    assert!(error.starts_with("error: ") && error.contains("terminal"), "got: {error}");
    for how in ["FILE", "pipe", "put typed -"] {
        assert!(error.contains(how), "should mention {how:?}: {error}");
    }
    assert_eq!(n1.ls(), "", "nothing may be stored");
}

// ---------------------------------------------------------------------------
// Errors and usage
// ---------------------------------------------------------------------------

#[test]
fn a_command_against_a_port_where_nothing_listens_exits_1() {
    let addr = format!("127.0.0.1:{}", free_port());
    let commands: [&[&str]; 6] =
        [&["status"], &["ls"], &["put", "k"], &["get", "k"], &["rm", "k"], &["clear", "--yes"]];
    for args in commands {
        let mut all = args.to_vec();
        all.extend(["--node", &addr]);
        let out = cli(&all).stdin(b"x").run();
        let error = out.failure(1);
        assert_eq!(error, format!("error: nothing listens at {addr}"), "`{}`", out.what);
        assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
    }
}

#[test]
fn put_of_a_file_that_does_not_exist_exits_1() {
    let dir = TempDir::new("cli-nofile");
    let missing = dir.path().join("absent.bin");
    let missing = missing.to_str().expect("UTF-8 path");
    // The file is opened before any connection, so no node is needed.
    let addr = format!("127.0.0.1:{}", free_port());
    let out = cli(&["put", "--node", &addr, "k", missing]).run();
    let error = out.failure(1);
    assert!(error.contains(missing), "the error should name the file: {error}");
}

#[test]
fn usage_errors_exit_2_with_one_error_line_then_that_commands_usage() {
    // A mistaken connection would exit 1, not 2: point it nowhere.
    let dead = format!("127.0.0.1:{}", free_port());
    let listen = format!("127.0.0.1:{}", free_port());
    let long_key = "k".repeat(1025);
    // (arguments, the usage that follows the error line)
    let cases: [(&[&str], &str); 16] = [
        (&["frobnicate"], "usage: gossipfs COMMAND"),
        (&["ls", "--bogus"], "usage: gossipfs ls "),
        (&["get", "--no-such-flag", "k"], "usage: gossipfs get "),
        (&["get"], "usage: gossipfs get "),
        (&["put"], "usage: gossipfs put "),
        (&["rm"], "usage: gossipfs rm "),
        (&["get", "k1", "k2"], "usage: gossipfs get "),
        (&["status", "extra"], "usage: gossipfs status"),
        (&["serve", "--listen", &listen, "--no-fsync"], "usage: gossipfs serve "),
        (&["serve", "--bogus"], "usage: gossipfs serve "),
        (&["help", "frobnicate"], "usage: gossipfs COMMAND"),
        (&["put", "--node"], "usage: gossipfs put "),
        (&["get", "--prefix", "p"], "usage: gossipfs get "),
        (&["get", "--prefix", "p", "k", "-o", &listen], "usage: gossipfs get "),
        (&["ls", "a", "b"], "usage: gossipfs ls "),
        (&["demo", "--port", "65534"], "usage: gossipfs demo "),
    ];
    for (args, usage) in cases {
        let out = cli(args).env("GOSSIPFS_NODE", &dead).stdin(b"x").run();
        let error = out.failure(2);
        // One line says what is wrong, in our lowercase, not getopts'
        // "Unrecognized option: 'bogus'"...
        let first = error["error: ".len()..].chars().next().unwrap_or(' ');
        assert!(!first.is_uppercase(), "`{}` should start lowercase: {error}", out.what);
        // ...then the usage of that command only: the line stays in sight.
        let rest: Vec<&str> = out.stderr.lines().skip(1).collect();
        assert_eq!(rest.first(), Some(&""), "`{}`: {}", out.what, out.stderr);
        assert!(rest[1].starts_with(usage), "`{}` should show {usage:?}: {}", out.what, out.stderr);
        assert!(
            !out.stderr.contains("Commands:") && out.stderr.lines().count() <= 6,
            "`{}` should not list every command: {}",
            out.what,
            out.stderr
        );
    }
    // How getopts' mistakes read.
    let first_line = |args: &[&str]| cli(args).run().failure(2).to_string();
    assert_eq!(first_line(&["serve", "--bogus"]), "error: unknown option --bogus");
    assert_eq!(first_line(&["get", "--node"]), "error: --node needs a value");
    assert_eq!(first_line(&["clear", "--yes=1"]), "error: --yes takes no value");
    // A bad key is an error (exit 1, as the table says), found before
    // anything is read or any node is asked: not "nothing listens".
    for args in [&["put", "", "-"][..], &["get", &long_key], &["rm", ""]] {
        let out = cli(args).env("GOSSIPFS_NODE", &dead).stdin(b"x").run();
        let error = out.failure(1);
        assert!(error.starts_with("error: bad key: "), "`{}`: {error}", out.what);
        assert_eq!(out.stderr.lines().count(), 1, "`{}`: {}", out.what, out.stderr);
    }
    // With no command at all, the list of commands is the help wanted.
    let out = cli(&[]).run();
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("Commands:"), "{}", out.stderr);
}

#[test]
fn help_exits_0_and_prints_usage() {
    for args in [&["help"][..], &["--help"], &["-h"]] {
        let out = cli(args).run().success();
        assert!(out.text().contains("usage: gossipfs"), "{}", out.text());
        for command in ["serve", "put", "get", "rm", "ls", "clear", "status"] {
            assert!(
                out.text().contains(&format!("  {command} ")),
                "`{}` should list {command}: {}",
                out.what,
                out.text()
            );
        }
    }
    for args in [&["put", "--help"][..], &["help", "put"]] {
        let out = cli(args).run().success();
        assert!(out.text().contains("usage: gossipfs put"), "`{}`: {}", out.what, out.text());
        assert!(out.text().contains("--node"), "{}", out.text());
    }
    let out = cli(&["get", "--help"]).run().success();
    assert!(out.text().contains("usage: gossipfs get"), "{}", out.text());
    for option in ["--output", "--prefix", "--force"] {
        assert!(out.text().contains(option), "{}", out.text());
    }
    let out = cli(&["put", "--help"]).run().success();
    assert!(out.text().contains("KEY [FILE | DIR | -]"), "{}", out.text());
}

#[test]
fn gossipfs_node_is_used_when_node_is_absent() {
    let cluster = Cluster::start("env", 1);
    let node = &cluster.nodes[0];

    cli(&["put", "greeting"]).env("GOSSIPFS_NODE", &node.addr).stdin(b"hello").run().success();
    let ls = cli(&["ls"]).env("GOSSIPFS_NODE", &node.addr).run().success();
    assert_eq!(ls.text(), "greeting\t5\n");
    let got = cli(&["get", "greeting"]).env("GOSSIPFS_NODE", &node.addr).run().success();
    assert_same_bytes(&got.stdout, b"hello", "get through GOSSIPFS_NODE");

    // --node wins over the environment...
    let dead = format!("127.0.0.1:{}", free_port());
    let ls = node.cli("ls", &[]).env("GOSSIPFS_NODE", &dead).run().success();
    assert_eq!(ls.text(), "greeting\t5\n");
    // ...and without it the environment is where the client goes.
    let out = cli(&["ls"]).env("GOSSIPFS_NODE", &dead).run();
    assert_eq!(out.failure(1), format!("error: nothing listens at {dead}"));
}

// ---------------------------------------------------------------------------
// A misbehaving client
// ---------------------------------------------------------------------------

/// Sends `garbage` on `stream` and returns the frames the node sent until
/// it closed the connection. Closed means an end of stream, or a reset if
/// some of our garbage was still unread when it closed (the frames it sent
/// before are read first either way). A read that times out means the node
/// kept the connection open: the test fails.
fn frames_until_closed(stream: TcpStream, garbage: &[u8], what: &str) -> Vec<Frame> {
    stream.set_read_timeout(Some(DEADLINE)).expect("set a read timeout");
    (&stream).write_all(garbage).expect("send the garbage");
    let mut reader = io::BufReader::new(&stream);
    let mut frames = Vec::new();
    loop {
        match read_frame(&mut reader) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return frames,
            Err(gossipfs::Error::Io(err))
                if matches!(
                    err.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) =>
            {
                return frames;
            }
            Err(err) => panic!("{what}: the node did not close the connection: {err}"),
        }
    }
}

#[test]
fn a_client_sending_garbage_is_closed_and_the_node_keeps_serving_its_peers() {
    let cluster = Cluster::start("garbage", 3);
    let [n1, n2, n3] = &cluster.nodes[..] else { unreachable!("three nodes") };
    let garbage = pseudo_random_bytes(4096, 99);
    // With this seed the first four bytes, read as a frame length, exceed
    // any frame the node accepts, so it can tell at once that this is not
    // gossipfs (rather than wait for a frame that never completes).
    let announced = u32::from_be_bytes(garbage[..4].try_into().expect("four bytes"));
    assert!(announced > gossipfs::frame::MAX_FRAME_LEN, "pick another seed");

    // Garbage in place of the handshake. The node speaks first, so its
    // Hello may come back; then it closes.
    let stream = TcpStream::connect(&n2.addr).expect("connect to n2");
    let frames = frames_until_closed(stream, &garbage, "garbage before the handshake");
    assert!(
        matches!(frames.first(), None | Some(Frame::Hello { .. })),
        "the node answered garbage with {frames:?}"
    );

    // Garbage after a proper client handshake, in place of a request.
    let stream = TcpStream::connect(&n2.addr).expect("connect to n2");
    let me = gossipfs::handshake::Identity {
        role: gossipfs::frame::Role::Client,
        node: 0,
        name: "garbage".to_string(),
        listen_addr: String::new(),
        secret: None,
    };
    gossipfs::handshake::handshake(&stream, &me, true).expect("the client handshake");
    let frames = frames_until_closed(stream, &garbage, "garbage after the handshake");
    // It says why before it closes.
    assert!(
        matches!(&frames[..], [Frame::Error { code: ErrorCode::Protocol, .. }]),
        "the node should answer garbage with one protocol error, sent {frames:?}"
    );

    // n2 still has its peers, and still takes part: a put on n1 reaches it,
    // and so does one on n3.
    assert_eq!(n2.status().peers, [n1.as_peer(), n3.as_peer()]);
    let payload = pseudo_random_bytes(64 * 1024, 3);
    n1.cli("put", &["after.bin"]).stdin(&payload).run().success();
    n3.cli("put", &["later.bin"]).stdin(b"later").run().success();
    wait_until(
        "n2 to hold after.bin and later.bin",
        || n2.ls(),
        |ls| ls == "after.bin\t65536\nlater.bin\t5\n",
    );
    let got = n2.cli("get", &["after.bin"]).run().success();
    assert_same_bytes(&got.stdout, &payload, "get after.bin through n2");
}

/// `make run` is `gossipfs demo`: it walks diagram 1, then diagram 2 through
/// the network, every step on its own line from the node whose actor does
/// it, in the diagrams' order, and ends with the summary.
#[test]
fn the_demo_walks_both_diagrams_in_order() {
    // Port 0: free ports, whatever holds 5000-5002 (a `make cluster`, say).
    let out = cli(&["demo", "--port", "0"]).run().success();
    let text = out.text();
    // (node and actor, step) of every step line, in the order printed.
    let steps: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split("  ").filter(|f| !f.is_empty());
            let (_time, node, step) = (fields.next()?, fields.next()?, fields.next()?);
            node.starts_with('s').then(|| (node.trim().to_string(), step.trim().to_string()))
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("s1 Server", "Upload file"),
        ("s1 Server", "Save file"),
        ("s1 Store", "Commit batch"),
        ("s1 Server", "Send metadata (filename, size)"),
        ("s1 TL", "Send metadata by TCP"),
        ("s2 TL", "Send metadata (filename, size)"),
        ("s2 Peer", "Lock transport layer"),
        ("s2 Peer", "Stream file data"),
        ("s2 Peer", "Save file"),
        ("s2 Peer", "Unlock transport layer"),
        ("s2 Store", "Commit batch"),
        ("s3 Server", "Request file"),
        ("s3 Server", "Check local storage"),
        ("s3 Server", "File not found"),
        ("s3 Server", "Broadcast getfile"),
        ("s3 TL", "Get File"),
        ("s1 Peer", "Peer receives getfile"),
        ("s1 Peer", "Get file"),
        ("s1 Peer", "Retrieve File Stream"),
        ("s1 Peer", "Send metadata (filename, size)"),
        ("s1 TL", "Send metadata (filename, size)"),
        ("s3 TL", "Send metadata (filename, size)"),
        ("s3 Server", "Send metadata (filename, size)"),
        ("s3 Server", "Lock transport layer"),
        ("s3 Server", "Stream file data"),
        ("s3 Server", "Unlock transport layer"),
        ("s3 Server", "Commit batch"),
        ("s3 Server", "Serve file"),
    ]
    .iter()
    .map(|(node, step)| (node.to_string(), step.to_string()))
    .collect();
    assert_eq!(steps, expected, "{text}");
    let heading = |h: &str| text.find(h).unwrap_or_else(|| panic!("no {h:?} in {text}"));
    assert!(heading("== Diagram 1") < heading("== Diagram 2"));
    assert!(heading("== Diagram 2") < heading("All three nodes agree"));
}

// ---------------------------------------------------------------------------
// What a new user trips over (issue 22)
// ---------------------------------------------------------------------------

#[test]
fn the_demo_on_a_taken_port_names_the_address_and_how_to_pick_others() {
    // Held by us for the length of the test: the demo must fail on it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let port = taken.local_addr().expect("an address").port().to_string();
    let out = cli(&["demo", "--port", &port]).run();
    let error = out.failure(1);
    assert!(error.contains(&format!("127.0.0.1:{port}")), "should name the address: {error}");
    assert!(error.contains("--port 0"), "should say how to pick other ports: {error}");
}

#[test]
fn serve_on_a_taken_port_names_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("an address").to_string();
    let dir = TempDir::new("cli-taken");
    let out = cli(&["serve", "--listen", &addr, "--root", utf8(dir.path())]).run();
    let error = out.failure(1);
    assert!(error.starts_with(&format!("error: cannot listen on {addr}: ")), "got: {error}");
}

#[test]
fn a_client_with_a_secret_against_a_node_without_one_is_told_the_node_has_none() {
    let cluster = Cluster::start("secretless", 1);
    let n1 = &cluster.nodes[0];
    let dir = TempDir::new("cli-secretless");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").expect("write the secret file");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::Permissions::from_mode(0o600);
        std::fs::set_permissions(&secret, mode).expect("chmod the secret file");
    }
    let out = n1.cli("ls", &["--secret-file", utf8(&secret)]).run();
    let error = out.failure(1);
    // The client has the secret; the node is the side without one.
    assert!(
        error.contains("this side has a cluster secret and the other side has none"),
        "got: {error}"
    );
}

#[test]
fn a_prefix_get_into_a_regular_file_says_nothing_was_written() {
    let cluster = Cluster::start("wrote", 1);
    let n1 = &cluster.nodes[0];
    n1.cli("put", &["p/a"]).stdin(b"a").run().success();
    let work = TempDir::new("cli-wrote");
    let file = work.path().join("a-file");
    std::fs::write(&file, b"mine").expect("write a file");
    let out = n1.cli("get", &["--prefix", "p", "-o", utf8(&file)]).run();
    let error = out.failure(1);
    assert!(error.ends_with("; nothing was written"), "got: {error}");
    assert_eq!(std::fs::read(&file).expect("the file is still there"), b"mine");
}

/// Accepts connections on a free port and answers each as a web server
/// answers bytes it does not understand.
fn fake_http_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = listener.local_addr().expect("an address").to_string();
    // Detached: it blocks in accept until the test process ends.
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.read(&mut [0u8; 512]);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    addr
}

#[test]
fn a_client_against_something_that_is_not_gossipfs_is_told_so() {
    let addr = fake_http_server();
    for args in [&["ls"][..], &["status"], &["get", "k"]] {
        let mut all = args.to_vec();
        all.extend(["--node", &addr]);
        let out = cli(&all).run();
        let error = out.failure(1);
        assert!(
            error.starts_with(&format!(
                "error: protocol error: {addr}: this is not a gossipfs node"
            )),
            "`{}`: {error}",
            out.what
        );
    }
}

#[test]
fn a_client_against_a_listener_that_never_answers_exits_4() {
    // Bound and never accepted: the kernel completes the connection, and
    // nothing ever answers the handshake.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = silent.local_addr().expect("an address").to_string();
    let out = cli(&["ls", "--node", &addr]).run();
    let error = out.failure(4);
    assert!(error.contains(&addr) && error.contains("did not answer"), "got: {error}");
}

#[test]
fn version_help_and_each_commands_help_say_what_a_user_needs() {
    let version = format!("gossipfs {}\n", env!("CARGO_PKG_VERSION"));
    for flag in ["--version", "-V"] {
        assert_eq!(cli(&[flag]).run().success().text(), version);
    }
    for args in [&["help", "--help"][..], &["help", "-h"], &["help"]] {
        let out = cli(args).run().success();
        assert!(out.text().starts_with("usage: gossipfs COMMAND"), "`{}`", out.what);
        assert!(out.text().contains("--version"), "`{}`: {}", out.what, out.text());
    }
    for command in ["serve", "put", "get", "rm", "ls", "clear", "status", "demo", "bench"] {
        let help = cli(&[command, "--help"]).run().success().text();
        // usage, a blank line, then a paragraph before the options.
        let mut lines = help.lines();
        assert!(lines.next().is_some_and(|l| l.starts_with(&format!("usage: gossipfs {command}"))));
        let about: Vec<&str> = lines.take_while(|l| !l.starts_with("Options:")).collect();
        let words = about.join(" ").split_whitespace().count();
        assert!(words >= 12, "`{command} --help` should say what it does:\n{help}");
        assert!(help.contains("\nExit status:\n"), "`{command} --help` has no exit statuses");
    }
    let serve = cli(&["serve", "--help"]).run().success().text();
    for word in ["Ctrl-C", "SIGTERM", "130"] {
        assert!(serve.contains(word), "serve --help should say what {word} does:\n{serve}");
    }
    let demo = cli(&["demo", "--help"]).run().success().text();
    for word in ["5000", "--port"] {
        assert!(demo.contains(word), "demo --help should mention {word}:\n{demo}");
    }
}

// ---------------------------------------------------------------------------
// The README's quotes, checked against the real thing
// ---------------------------------------------------------------------------

/// The README, as in the source tree.
fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    std::fs::read_to_string(&path).expect("read README.md")
}

/// The byte range of the fenced block's content that follows `marker` in
/// `text` (the lines between its ``` lines, with their newlines).
fn block_after(text: &str, marker: &str) -> std::ops::Range<usize> {
    let at = text.find(marker).unwrap_or_else(|| panic!("no {marker:?} in the README"));
    let fence = at + text[at..].find("```").expect("a fenced block after the marker");
    let start = fence + text[fence..].find('\n').expect("a line after the fence") + 1;
    let end = start + text[start..].find("```").expect("the end of the fenced block");
    start..end
}

/// Every `127.0.0.1:PORT` in `text`, with PORT rewritten by `port`.
fn map_ports(text: &str, port: impl Fn(&str) -> String) -> String {
    const HOST: &str = "127.0.0.1:";
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(HOST) {
        let digits = rest[at + HOST.len()..].bytes().take_while(u8::is_ascii_digit).count();
        let number = &rest[at + HOST.len()..at + HOST.len() + digits];
        out.push_str(&rest[..at + HOST.len()]);
        out.push_str(&if digits == 0 { String::new() } else { port(number) });
        rest = &rest[at + HOST.len() + digits..];
    }
    out.push_str(rest);
    out
}

/// Demo output with what changes from run to run masked: the time of day,
/// ports, versions' times and node ids (their length is kept), and the
/// run's duration. Everything else must match to the space.
fn normalise_demo(text: &str) -> String {
    let is_clock = |s: &str| {
        s.len() >= 12
            && s.bytes().take(12).enumerate().all(|(i, b)| match i {
                2 | 5 => b == b':',
                8 => b == b'.',
                _ => b.is_ascii_digit(),
            })
    };
    let masked_fields = |line: &str| {
        let fields = line.split(' ').map(|field| match field.split_once('@') {
            Some((time, node)) if time.starts_with("version=") => {
                format!("version=T@{}", "x".repeat(node.len()))
            }
            _ => field.to_string(),
        });
        fields.collect::<Vec<_>>().join(" ")
    };
    let text = map_ports(text, |_| "PORT".to_string());
    let lines = text.lines().map(|line| {
        let line =
            if is_clock(line) { format!("HH:MM:SS.mmm{}", &line[12..]) } else { line.into() };
        let line = masked_fields(&line);
        match line.strip_prefix("Done in ") {
            Some(rest) if rest.ends_with(" ms.") => "Done in N ms.".to_string(),
            _ => line,
        }
    });
    lines.map(|line| line + "\n").collect()
}

/// A run's output as `make run` would print it: the ports of s1, s2 and s3
/// (from the summary) rewritten to 5000, 5001 and 5002.
fn with_default_ports(text: &str) -> String {
    let mut ports = HashMap::new();
    for (i, default) in (1..=3).zip(5000..) {
        let line = text.lines().find(|l| l.trim_start().starts_with(&format!("s{i} (127.0.0.1:")));
        let port = line.and_then(|l| l.split(['(', ')']).nth(1)?.rsplit(':').next());
        if let Some(port) = port {
            ports.insert(port.to_string(), default.to_string());
        }
    }
    map_ports(text, |port| ports.get(port).cloned().unwrap_or_else(|| port.to_string()))
}

/// `want` against `got`, line by line: `-` only in `want`, `+` only in
/// `got` (a longest-common-subsequence diff; demo output is a few dozen
/// lines).
fn line_diff(want: &str, got: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] =
                if a[i] == b[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out += &format!("  {}\n", a[i]);
            (i, j) = (i + 1, j + 1);
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out += &format!("+ {}\n", b[j]);
            j += 1;
        } else {
            out += &format!("- {}\n", a[i]);
            i += 1;
        }
    }
    out
}

/// Where the README quotes `gossipfs demo` in full.
const README_DEMO_MARKER: &str = "<!-- The output of `gossipfs demo`";

/// The README quotes the demo's whole output; a run must print the same,
/// times, ports and ids aside. When the demo changes, this fails with a
/// diff and the new output, ready to paste; or set `UPDATE_README=1` and
/// the test writes it into the README itself:
///
/// ```sh
/// UPDATE_README=1 cargo test --test cli the_readme_quotes_the_demo
/// ```
#[test]
fn the_readme_quotes_the_demo_as_it_runs() {
    let real = cli(&["demo", "--port", "0"]).run().success().text();
    for line in real.lines() {
        // demo.gif is recorded on a terminal 100 columns wide.
        assert!(line.chars().count() <= 100, "a demo line wider than 100 columns: {line:?}");
    }
    let readme = readme();
    let range = block_after(&readme, README_DEMO_MARKER);
    let (want, got) = (normalise_demo(&readme[range.clone()]), normalise_demo(&real));
    if want == got {
        return;
    }
    let as_make_run = with_default_ports(&real);
    if std::env::var_os("UPDATE_README").is_some() {
        let updated = format!("{}{as_make_run}{}", &readme[..range.start], &readme[range.end..]);
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
        std::fs::write(&path, updated).expect("write README.md");
        println!("README.md: the demo's output updated");
        return;
    }
    panic!(
        "The README's demo output is stale. Masking times, ports and ids, the README \
         (-) and a real run (+) differ:\n{}\n\
         A real run printed this (ports as `make run` uses them); paste it into the \
         README's block after {README_DEMO_MARKER:?}, or run\n  \
         UPDATE_README=1 cargo test --test cli the_readme_quotes_the_demo\n\n{as_make_run}",
        line_diff(&want, &got)
    );
}

/// The README's exit status table says, code for code, what every
/// `--help` says.
#[test]
fn the_readme_exit_status_table_is_the_one_in_help() {
    let help = cli(&["help"]).run().success().text();
    let table = help.split("Exit status:\n").nth(1).expect("help has an exit status table");
    // "  N  text", continued on lines indented further.
    let mut from_help: Vec<(String, String)> = Vec::new();
    for line in table.lines() {
        match line.trim_start().split_once("  ") {
            Some((code, text)) if code.parse::<u8>().is_ok() && line.starts_with("  ") => {
                from_help.push((code.to_string(), text.trim().to_string()));
            }
            _ => {
                let (_, text) = from_help.last_mut().expect("a status before its continuation");
                *text = format!("{text} {}", line.trim());
            }
        }
    }
    let readme = readme();
    let section = readme.split("| status | meaning |").nth(1).expect("the README's status table");
    let from_readme: Vec<(String, String)> = section
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .filter_map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let code = cells.get(1)?;
            let text = cells.get(2)?;
            code.parse::<u8>().is_ok().then(|| (code.to_string(), text.to_string()))
        })
        .collect();
    assert_eq!(from_readme, from_help, "the README's table and `gossipfs help` differ");
    assert_eq!(from_help.len(), 5, "{help}");
}
