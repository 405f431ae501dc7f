//! The `gossipfs` command: parse the command line (getopts), set up logging
//! (simplelog), call the library. The client, the demo and the benchmark
//! are the binary's own modules (`cli`), built on the library's public API.
//!
//! Exit status: one table, [`EXIT_STATUS`], printed by every `--help` too.
//! A failure prints one `error: ...` line on stderr; a usage mistake adds
//! the command's usage after it.

use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use getopts::{Fail, Matches, Options};
use log::{LevelFilter, info, warn};
use simplelog::{ColorChoice, ConfigBuilder, TermLogger, TerminalMode};

use gossipfs::{Config, FileServer};

use cli::OutputFile;
use cli::client::Client;
use cli::folder;

mod cli;

/// Where client commands connect when neither `--node` nor `GOSSIPFS_NODE`
/// says otherwise.
const DEFAULT_NODE: &str = "127.0.0.1:5000";

const USAGE: &str = "\
usage: gossipfs COMMAND [OPTIONS]

Commands:
  serve    run a node in the foreground
  put      store a file, a folder or stdin under a key
  get      write a stored file to stdout or a file, or a folder's files
  rm       delete a key everywhere
  ls       list the live files (or a folder's): key, a tab, the size in bytes
  clear    delete every file in the cluster (needs --yes)
  status   describe a node: name, id, address, peers, files, bytes
  demo     walk the two sequence diagrams on three nodes in this process (make run)
  bench    measure throughput and latency on loopback (make bench)
  help     show this, or `gossipfs help COMMAND`

Options:
  -h, --help     show this (after a command: that command's help)
  -V, --version  print the version

Client commands talk to --node ADDR, else $GOSSIPFS_NODE, else 127.0.0.1:5000.
Run `gossipfs COMMAND --help` for a command's options.";

/// What each exit status means, for every command: the end of every
/// `--help`, and the README's table.
const EXIT_STATUS: &str = "\
Exit status:
  0  done
  1  an error, on one `error: ...` line (nothing listens at the address,
     a missing file, a file not found, a bad key, ...)
  2  a usage mistake (an unknown option, a missing or extra argument): one
     `error: ...` line, then the command's usage
  3  a put or rm that lost to a newer version already held: the write
     changed nothing
  4  no answer: the node did not answer in time, or the peers a get asked
     could not be asked or did not answer; what happened is not known";

/// A command: its name, its synopsis (what follows `usage: gossipfs`) and
/// what it does, for its `--help`.
struct Command {
    name: &'static str,
    synopsis: &'static str,
    about: &'static str,
}

/// Every command, in the order of [`USAGE`].
const COMMANDS: [Command; 10] = [
    Command {
        name: "serve",
        synopsis: "serve --root DIR [--listen ADDR] [--peer ADDR]... [--secret-file FILE]",
        about: "\
Runs a node in the foreground, logging to stderr. It keeps its files under
DIR, connects to each --peer, and through them finds the rest of the
cluster. A root remembers its peers, so a restarted node rejoins by itself.

It runs until it is stopped: Ctrl-C (SIGINT) or SIGTERM ends it at once,
without a word and without telling its peers, and the shell reports 130
(Ctrl-C) or 143 (SIGTERM). Nothing committed is lost: every commit is an
atomic rename, synced to disk unless --no-fsync, and a transfer cut short
leaves only a temp file that the next start removes. Its peers notice it
gone within seconds and redial it until it is back.",
    },
    Command { name: "put", synopsis: "put [--node ADDR] KEY [FILE | DIR | -]", about: PUT_ABOUT },
    Command {
        name: "get",
        synopsis: "get [--node ADDR] KEY [-o FILE]
       gossipfs get [--node ADDR] --prefix P -o DIR [--force]",
        about: GET_ABOUT,
    },
    Command {
        name: "rm",
        synopsis: "rm [--node ADDR] KEY",
        about: "\
Deletes KEY on every node: the node deletes its copy and gossips the
delete. Each node keeps a small tombstone for the key, so an older copy
that arrives late cannot bring the file back. Fails (exit 1) if the node
holds no live file under KEY.",
    },
    Command {
        name: "ls",
        synopsis: "ls [--node ADDR] [PREFIX]",
        about: "\
Lists every live file the node holds, sorted by key: the key, a tab, the
size in bytes. With PREFIX, only those whose key starts with PREFIX/ (the
files `get --prefix PREFIX` writes).",
    },
    Command {
        name: "clear",
        synopsis: "clear [--node ADDR] --yes",
        about: "\
Deletes every file on every node: every version older than the clear,
and nothing stored after it. Without --yes it refuses and changes nothing.",
    },
    Command {
        name: "status",
        synopsis: "status [--node ADDR]",
        about: "\
Describes the node: its name, its id, the address it listens on, its
connected peers (name and address), and how many live files and bytes it
holds.",
    },
    Command {
        name: "demo",
        synopsis: "demo [--port PORT]",
        about: "\
Walks the two sequence diagrams on three nodes in this process (what `make
run` runs), printing each step from the node that takes it: s1 stores
file.png and pushes it to s2 (diagram 1); s3, which was offline, then gets
it through the network (diagram 2). The nodes keep their files in a temp
folder, removed at the end.

The nodes listen on 127.0.0.1, ports PORT, PORT+1 and PORT+2: 5000, 5001
and 5002 by default. If one is taken (a `make cluster` running, say), pick
others with --port, or --port 0 to let the system choose three free ones.",
    },
    Command {
        name: "bench",
        synopsis: "bench [--size BYTES] [--files N] [--rounds N] [--quick] [--only N,...]",
        about: "\
Measures throughput and latency with threaded nodes on loopback, each
figure beside a baseline measured in the same run (what `make bench` runs).",
    },
    Command {
        name: "help",
        synopsis: "help [COMMAND]",
        about: "Lists the commands, or shows COMMAND's help (as `gossipfs COMMAND --help`).",
    },
];

/// The command called `name`.
fn command(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|command| command.name == name)
}

/// A failed command: an error (exit 1), a usage mistake (exit 2), a write
/// that lost to a newer one already held (exit 3), or a node or peers that
/// could not be asked or did not answer (exit 4).
enum Failure {
    Usage(String),
    Error(String),
    Superseded(String),
    Unreachable(String),
}

impl From<gossipfs::Error> for Failure {
    fn from(err: gossipfs::Error) -> Self {
        match err {
            gossipfs::Error::Superseded(_) => Failure::Superseded(err.to_string()),
            gossipfs::Error::Timeout(_) | gossipfs::Error::Unavailable(_) => {
                Failure::Unreachable(err.to_string())
            }
            _ => Failure::Error(err.to_string()),
        }
    }
}

impl From<io::Error> for Failure {
    fn from(err: io::Error) -> Self {
        Failure::Error(err.to_string())
    }
}

/// getopts says "Unrecognized option: 'bogus'"; we say it our way, in
/// lowercase, with the option as it is typed.
impl From<Fail> for Failure {
    fn from(fail: Fail) -> Self {
        let typed = |name: &str| match name.len() {
            1 => format!("-{name}"),
            _ => format!("--{name}"),
        };
        Failure::Usage(match fail {
            Fail::ArgumentMissing(name) => format!("{} needs a value", typed(&name)),
            Fail::UnrecognizedOption(name) => format!("unknown option {}", typed(&name)),
            Fail::OptionMissing(name) => format!("{} is required", typed(&name)),
            Fail::OptionDuplicated(name) => format!("{} is given more than once", typed(&name)),
            Fail::UnexpectedArgument(name) => format!("{} takes no value", typed(&name)),
        })
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((name, rest)) = args.split_first() else {
        eprintln!("{USAGE}\n\n{EXIT_STATUS}");
        return ExitCode::from(2);
    };
    let result = match name.as_str() {
        "serve" => serve(rest),
        "put" => put(rest),
        "get" => get(rest),
        "rm" => rm(rest),
        "ls" => ls(rest),
        "clear" => clear(rest),
        "status" => status(rest),
        "demo" => demo(rest),
        "bench" => bench(rest),
        "help" | "--help" | "-h" => help(rest),
        "--version" | "-V" => {
            println!("gossipfs {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        other => Err(Failure::Usage(format!("unknown command {other:?}"))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Error(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
        Err(Failure::Usage(message)) => {
            // One line saying what is wrong, then only the usage of the
            // command that was mistaken: the line stays in sight.
            let usage = match command(name) {
                Some(command) if command.name != "help" => format!(
                    "usage: gossipfs {}\n\nRun `gossipfs {} --help` for its options.",
                    command.synopsis, command.name
                ),
                _ => "usage: gossipfs COMMAND [OPTIONS]\n\n\
                      Run `gossipfs help` for the list of commands."
                    .to_string(),
            };
            eprintln!("error: {message}\n\n{usage}");
            ExitCode::from(2)
        }
        Err(Failure::Superseded(message)) => {
            eprintln!("{message}: the write changed nothing");
            ExitCode::from(3)
        }
        Err(Failure::Unreachable(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(4)
        }
    }
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

fn serve(args: &[String]) -> Result<(), Failure> {
    let mut opts = Options::new();
    opts.optopt("l", "listen", "address to listen on (default 127.0.0.1:5000)", "ADDR");
    opts.optopt("r", "root", "directory to keep files in (required)", "DIR");
    opts.optopt("n", "name", "name for logs (default: the listen address)", "NAME");
    opts.optmulti("p", "peer", "a peer to connect to; repeat for more", "ADDR");
    opts.optflag("", "no-fsync", "do not fsync commits (demos and benchmarks only)");
    opts.optopt("s", "secret-file", "file holding the cluster secret", "FILE");
    opts.optflag("v", "verbose", "log every protocol step (debug level)");
    let Some(m) = parse(&opts, args, "serve")? else {
        return Ok(());
    };
    no_free_args(&m, "serve")?;
    let root = m.opt_str("root").ok_or_else(|| Failure::Usage("serve needs --root DIR".into()))?;
    let listen = m.opt_str("listen").unwrap_or_else(|| DEFAULT_NODE.to_string());
    let secret = read_secret(m.opt_str("secret-file").as_deref())?;
    init_logging(if m.opt_present("verbose") { LevelFilter::Debug } else { LevelFilter::Info });

    // Bound here, not by the library, so that a taken port names itself.
    let listener = TcpListener::bind(&listen)
        .map_err(|err| Failure::Error(format!("cannot listen on {listen}: {err}")))?;
    let mut config = Config::new(&m.opt_str("name").unwrap_or_else(|| listen.clone()), root);
    config.listen = listen;
    config.bootstrap = m.opt_strs("peer");
    config.fsync = !m.opt_present("no-fsync");
    config.secret = secret;
    let has_secret = config.secret.is_some();
    let node = FileServer::start_on(listener, config)?;
    if !node.local_addr().ip().is_loopback() && !has_secret {
        warn!(
            target: node.name(),
            "Listening on {} without a cluster secret: anyone who can reach it can read and change every file",
            node.local_addr()
        );
    }
    // Run until killed. Ctrl-C and SIGTERM end the process: every commit is
    // an atomic rename, so nothing committed is lost, and a write cut short
    // leaves only a temp file that the next start sweeps away. (std cannot
    // catch a signal, and this crate takes no more dependencies; so the
    // node says it up front, and `serve --help` says it too.)
    info!(
        target: node.name(),
        "Serving on {} until stopped: Ctrl-C or SIGTERM ends it at once, losing nothing committed",
        node.local_addr()
    );
    loop {
        std::thread::park();
    }
}

fn put(args: &[String]) -> Result<(), Failure> {
    let opts = client_options();
    let Some(m) = parse(&opts, args, "put")? else {
        return Ok(());
    };
    let (key, file) = match m.free.as_slice() {
        [key] => (key, None),
        [key, file] => (key, Some(file.as_str())),
        _ => return Err(Failure::Usage("put takes KEY and at most one FILE".into())),
    };
    check_key(key)?;
    let mut input: Box<dyn Read> = match file {
        Some("-") => Box::new(io::stdin().lock()),
        Some(path) if Path::new(path).is_dir() => return put_folder(&m, key, path),
        Some(path) => Box::new(
            File::open(path).map_err(|err| Failure::Error(format!("cannot read {path}: {err}")))?,
        ),
        // With no FILE, a terminal on stdin is a forgotten argument, not
        // content: reading it would wait for typing, and an Enter then
        // Ctrl-D would store a file by accident. `-` says "yes, stdin".
        None if io::stdin().is_terminal() => {
            return Err(Failure::Usage(format!(
                "put {key} would read the content from stdin, which is a terminal; give a \
                 FILE or a folder (put {key} PATH), pipe the content in (... | gossipfs put \
                 {key}), or type it after `put {key} -` and end with Ctrl-D"
            )));
        }
        None => Box::new(io::stdin().lock()),
    };
    let mut client = connect(&m)?;
    let mut progress = Progress::new("sent");
    let size = client.put(key, &mut input, &mut |n| progress.update(n))?;
    progress.finish(size);
    Ok(())
}

const PUT_ABOUT: &str = "\
Stores FILE under KEY; with -, or with nothing and stdin not a terminal,
stores stdin.

With a folder DIR, stores each regular file below it as KEY/relative/path
(with / between the parts), one after the other in key order, over one
connection. Symbolic links (never followed), special files, names that are
not UTF-8 and empty folders are skipped, each reported on stderr with why.
If a file cannot be read or stored, the put stops there: the error names
it and says which files were stored before it.";

/// `put KEY DIR`: every regular file under `dir`, as `KEY/relative/path`.
fn put_folder(m: &Matches, key: &str, dir: &str) -> Result<(), Failure> {
    let prefix = folder::trim_prefix(key)
        .ok_or_else(|| Failure::Usage(format!("{key:?} cannot name a folder: it is all `/`")))?;
    // The whole walk comes first: a folder that cannot be read fails the
    // put before anything is stored.
    let tree = folder::walk(Path::new(dir), prefix)
        .map_err(|err| Failure::Error(format!("{err}; nothing was stored")))?;
    for skipped in &tree.skipped {
        eprintln!("skipped {}: {}", skipped.path.display(), skipped.why);
    }
    if tree.files.is_empty() {
        return Err(Failure::Error(format!("{dir} holds no regular files; nothing was stored")));
    }
    let mut client = connect(m)?;
    let mut progress = Progress::files("stored", tree.files.len());
    let bytes = folder::put_tree(&mut client, &tree, &mut |done, bytes| {
        progress.file_done(done, bytes);
    })
    .map_err(|stopped| Failure::Error(stopped.to_string()))?;
    progress.finish(bytes);
    Ok(())
}

fn get(args: &[String]) -> Result<(), Failure> {
    let mut opts = client_options();
    opts.optopt("o", "output", "write to FILE instead of stdout (with --prefix: into DIR)", "FILE");
    opts.optopt("", "prefix", "write every file under P/ into the folder -o names", "P");
    opts.optflag("", "force", "with --prefix, replace files that exist in the folder");
    let Some(m) = parse(&opts, args, "get")? else {
        return Ok(());
    };
    if let Some(prefix) = m.opt_str("prefix") {
        return get_folder(&m, &prefix);
    }
    let [key] = m.free.as_slice() else {
        return Err(Failure::Usage("get takes exactly one KEY".into()));
    };
    check_key(key)?;
    let mut client = connect(&m)?;
    let mut progress = Progress::new("received");
    let size = match m.opt_str("output") {
        None => {
            let mut stdout = io::stdout().lock();
            client.get(key, &mut stdout, &mut |n| progress.update(n))?
        }
        Some(path) => {
            if Path::new(&path).file_name().is_none() {
                return Err(Failure::Usage(format!("{path} is not a file name")));
            }
            // Write a temp file beside the target and rename it into place,
            // so a failed get leaves no partial file behind.
            let mut out = OutputFile::create(Path::new(&path))?;
            let size = client.get(key, out.file(), &mut |n| progress.update(n))?;
            out.commit()?;
            size
        }
    };
    progress.finish(size);
    Ok(())
}

const GET_ABOUT: &str = "\
Writes the file stored under KEY to stdout, or to FILE (through a temp file
renamed into place; an existing FILE is replaced).

With --prefix, writes every live file whose key starts with P/ to
DIR/<the key below P/>, creating folders as needed: what `put P DIR` stored
comes back as it was. Files that exist in DIR are not replaced: the get
refuses before writing anything, unless --force. A key whose path below P
would leave DIR or is ambiguous (an absolute path, a `..` or `.` part, an
empty part as in `//`, a NUL) is refused: it is reported on stderr and not
written, the other files still are, and the get exits 1.";

/// `get --prefix P -o DIR`: every key under `P/` into `DIR`.
fn get_folder(m: &Matches, prefix: &str) -> Result<(), Failure> {
    if !m.free.is_empty() {
        return Err(Failure::Usage(format!("get --prefix takes no KEY, got {:?}", m.free)));
    }
    let out_dir = m.opt_str("output").ok_or_else(|| {
        Failure::Usage("get --prefix needs -o DIR, the folder to write to".into())
    })?;
    let out_dir = Path::new(&out_dir);
    let prefix = folder::trim_prefix(prefix)
        .ok_or_else(|| Failure::Usage(format!("--prefix {prefix:?} names no folder")))?;
    let force = m.opt_present("force");
    let mut client = connect(m)?;
    let download = folder::plan_download(&client.list()?, prefix, out_dir);
    for (key, why) in &download.refused {
        eprintln!("skipped {key:?}: {why}");
    }
    let refused = download.refused.len();
    if download.files.is_empty() && refused == 0 {
        return Err(Failure::Error(format!("file not found: no keys under {prefix}/")));
    }
    if !force {
        let existing = download.existing();
        if let Some(first) = existing.first() {
            let more = match existing.len() - 1 {
                0 => String::new(),
                n => format!(" (and {n} more)"),
            };
            return Err(Failure::Error(format!(
                "{} exists{more}; nothing was written (--force replaces existing files)",
                first.display()
            )));
        }
    }
    let mut progress = Progress::files("received", download.files.len());
    let got = folder::get_tree(&mut client, &download, out_dir, force, &mut |done, bytes| {
        progress.file_done(done, bytes);
    })
    .map_err(|stopped| Failure::Error(stopped.to_string()))?;
    progress.finish(got.bytes);
    for key in &got.vanished {
        eprintln!("skipped {key:?}: deleted since it was listed");
    }
    if refused > 0 {
        return Err(Failure::Error(format!(
            "refused {refused} of the {} keys under {prefix}/ (see above); wrote the other {}",
            refused + download.files.len(),
            got.files
        )));
    }
    Ok(())
}

fn rm(args: &[String]) -> Result<(), Failure> {
    let opts = client_options();
    let Some(m) = parse(&opts, args, "rm")? else {
        return Ok(());
    };
    let [key] = m.free.as_slice() else {
        return Err(Failure::Usage("rm takes exactly one KEY".into()));
    };
    check_key(key)?;
    connect(&m)?.remove(key)?;
    Ok(())
}

fn ls(args: &[String]) -> Result<(), Failure> {
    let opts = client_options();
    let Some(m) = parse(&opts, args, "ls")? else {
        return Ok(());
    };
    let prefix = match m.free.as_slice() {
        [] => None,
        [prefix] => Some(
            folder::trim_prefix(prefix)
                .ok_or_else(|| Failure::Usage(format!("PREFIX {prefix:?} names no folder")))?,
        ),
        _ => return Err(Failure::Usage("ls takes at most one PREFIX".into())),
    };
    let mut stdout = io::stdout().lock();
    for file in connect(&m)?.list()? {
        // The protocol has no prefix: the node lists everything, and the
        // client keeps what is in the folder.
        if prefix.is_none_or(|prefix| folder::below(prefix, &file.key).is_some()) {
            writeln!(stdout, "{}\t{}", file.key, file.size)?;
        }
    }
    Ok(())
}

fn clear(args: &[String]) -> Result<(), Failure> {
    let mut opts = client_options();
    opts.optflag("", "yes", "really delete every file in the cluster");
    let Some(m) = parse(&opts, args, "clear")? else {
        return Ok(());
    };
    no_free_args(&m, "clear")?;
    if !m.opt_present("yes") {
        return Err(Failure::Error(
            "clear deletes every file on every node; run it again with --yes to confirm".into(),
        ));
    }
    connect(&m)?.clear()?;
    Ok(())
}

fn status(args: &[String]) -> Result<(), Failure> {
    let opts = client_options();
    let Some(m) = parse(&opts, args, "status")? else {
        return Ok(());
    };
    no_free_args(&m, "status")?;
    let status = connect(&m)?.status()?;
    println!("name:    {}", status.name);
    println!("id:      {:016x}", status.node);
    println!("listen:  {}", status.listen_addr);
    println!("peers:   {}", status.peers.len());
    for peer in &status.peers {
        println!("         {peer}");
    }
    println!("files:   {}", status.files);
    println!("bytes:   {}", status.bytes);
    Ok(())
}

fn demo(args: &[String]) -> Result<(), Failure> {
    let mut opts = Options::new();
    let first = cli::demo::DEFAULT_FIRST_PORT;
    opts.optopt(
        "",
        "port",
        &format!("s1's port; s2 and s3 take the next two (default {first}; 0: any free ports)"),
        "PORT",
    );
    let Some(m) = parse(&opts, args, "demo")? else {
        return Ok(());
    };
    no_free_args(&m, "demo")?;
    let ports = match m.opt_str("port") {
        None => cli::demo::Ports::from_first(first),
        Some(text) => text.parse::<u16>().ok().and_then(cli::demo::Ports::from_first),
    }
    .ok_or_else(|| {
        let text = m.opt_str("port").unwrap_or_default();
        Failure::Usage(format!("--port takes 0 or a port up to 65533, not {text:?}"))
    })?;
    // The demo prints the diagrams' steps through its own logger.
    cli::demo::run(ports)?;
    Ok(())
}

fn bench(args: &[String]) -> Result<(), Failure> {
    let mut opts = Options::new();
    opts.optopt("", "size", "bytes in the big file (default 1 GiB; K, M, G suffixes)", "BYTES");
    opts.optopt("", "files", "small files to store (default 2000)", "N");
    opts.optopt("", "rounds", "rounds per scenario (default 3)", "N");
    opts.optflag("", "quick", "small sizes, for a smoke run");
    opts.optopt("", "only", "run only these scenarios: 7, or 1,3 (6 runs with 1)", "N,...");
    let Some(m) = parse(&opts, args, "bench")? else {
        return Ok(());
    };
    no_free_args(&m, "bench")?;
    let mut options =
        cli::bench::BenchOptions { quick: m.opt_present("quick"), ..Default::default() };
    if let Some(size) = m.opt_str("size") {
        options.size = parse_size(&size)?;
    }
    if let Some(files) = m.opt_str("files") {
        options.files = parse_number(&files, "--files")?;
    }
    if let Some(rounds) = m.opt_str("rounds") {
        options.rounds = parse_number(&rounds, "--rounds")?;
    }
    if let Some(only) = m.opt_str("only") {
        for scenario in only.split(',') {
            let n: u8 = parse_number(scenario, "--only")?;
            if n > cli::bench::SCENARIOS {
                let last = cli::bench::SCENARIOS;
                return Err(Failure::Usage(format!("--only: scenarios run from 1 to {last}")));
            }
            options.only.push(n);
        }
    }
    init_logging(LevelFilter::Warn);
    cli::bench::run(&options)?;
    Ok(())
}

/// A byte count with an optional K, M or G (binary) suffix: `64M`.
fn parse_size(text: &str) -> Result<u64, Failure> {
    let (digits, unit) = match text.char_indices().last() {
        Some((i, 'K' | 'k')) => (&text[..i], 1 << 10),
        Some((i, 'M' | 'm')) => (&text[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    let n: u64 = parse_number(digits, "--size")?;
    n.checked_mul(unit)
        .filter(|size| *size > 0)
        .ok_or_else(|| Failure::Usage(format!("--size {text} is out of range")))
}

/// A positive whole number.
fn parse_number<T: std::str::FromStr + PartialOrd + Default>(
    text: &str,
    option: &str,
) -> Result<T, Failure> {
    text.parse::<T>()
        .ok()
        .filter(|n| *n > T::default())
        .ok_or_else(|| Failure::Usage(format!("{option} takes a positive number, not {text:?}")))
}

fn help(args: &[String]) -> Result<(), Failure> {
    match args {
        [] => {}
        [flag] if flag == "--help" || flag == "-h" || flag == "help" => {}
        [command] => return main_for_help(command),
        _ => return Err(Failure::Usage("help takes at most one COMMAND".into())),
    }
    println!("{USAGE}\n\n{EXIT_STATUS}");
    Ok(())
}

/// `gossipfs help CMD` is `gossipfs CMD --help`.
fn main_for_help(command: &str) -> Result<(), Failure> {
    let args = vec!["--help".to_string()];
    match command {
        "serve" => serve(&args),
        "put" => put(&args),
        "get" => get(&args),
        "rm" => rm(&args),
        "ls" => ls(&args),
        "clear" => clear(&args),
        "status" => status(&args),
        "demo" => demo(&args),
        "bench" => bench(&args),
        other => Err(Failure::Usage(format!("unknown command {other:?}"))),
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The options every client command takes.
fn client_options() -> Options {
    let mut opts = Options::new();
    opts.optopt("", "node", "node to talk to (default $GOSSIPFS_NODE or 127.0.0.1:5000)", "ADDR");
    opts.optopt("s", "secret-file", "file holding the cluster secret", "FILE");
    opts
}

/// Parses the arguments of the command called `name`; prints its help and
/// returns `None` for `--help`.
fn parse(opts: &Options, args: &[String], name: &str) -> Result<Option<Matches>, Failure> {
    let command = command(name).expect("every command is in COMMANDS");
    let mut opts = opts.clone();
    opts.optflag("h", "help", "show this help");
    let m = opts.parse(args)?;
    if m.opt_present("help") {
        let brief = format!("usage: gossipfs {}\n\n{}", command.synopsis, command.about);
        println!("{}\n\n{EXIT_STATUS}", opts.usage(&brief).trim_end());
        return Ok(None);
    }
    Ok(Some(m))
}

/// Checks a KEY argument before anything is read or sent, so that a bad
/// key is reported as such (exit 1), not as whatever a node or a file
/// would have said first.
fn check_key(key: &str) -> Result<(), Failure> {
    Ok(gossipfs::frame::check_key(key)?)
}

fn no_free_args(m: &Matches, command: &str) -> Result<(), Failure> {
    if m.free.is_empty() {
        Ok(())
    } else {
        Err(Failure::Usage(format!("{command} takes no arguments, got {:?}", m.free)))
    }
}

/// Connects to the node the options name.
fn connect(m: &Matches) -> Result<Client, Failure> {
    let node = m
        .opt_str("node")
        .or_else(|| std::env::var("GOSSIPFS_NODE").ok())
        .unwrap_or_else(|| DEFAULT_NODE.to_string());
    let secret = read_secret(m.opt_str("secret-file").as_deref())?;
    Ok(Client::connect(&node, secret)?)
}

/// Reads the cluster secret from `path`, if one was given. Trailing
/// newlines are dropped, so `echo secret > file` works.
fn read_secret(path: Option<&str>) -> Result<Option<Vec<u8>>, Failure> {
    let Some(path) = path else {
        return Ok(None);
    };
    let mut secret = std::fs::read(path)
        .map_err(|err| Failure::Error(format!("cannot read the secret file {path}: {err}")))?;
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    if secret.is_empty() {
        return Err(Failure::Error(format!("the secret file {path} is empty")));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            eprintln!("warning: the secret file {path} can be read by other users; chmod 600 it");
        }
    }
    Ok(Some(secret))
}

/// Transfer progress on stderr: only on a terminal, and only once a
/// transfer has taken more than a moment. One line, redrawn in place.
struct Progress {
    verb: &'static str,
    started: Instant,
    last_shown: Option<Instant>,
    enabled: bool,
    /// For a folder: the files done so far and the files in all.
    files: Option<(usize, usize)>,
}

impl Progress {
    /// How long a transfer runs before progress is shown.
    const AFTER: Duration = Duration::from_millis(500);
    /// How often the line is redrawn.
    const EVERY: Duration = Duration::from_millis(200);

    fn new(verb: &'static str) -> Progress {
        Progress {
            verb,
            started: Instant::now(),
            last_shown: None,
            enabled: io::stderr().is_terminal(),
            files: None,
        }
    }

    /// Progress through a folder of `total` files.
    fn files(verb: &'static str, total: usize) -> Progress {
        Progress { files: Some((0, total)), ..Progress::new(verb) }
    }

    /// A folder's file is done: `done` files and `bytes` bytes so far.
    fn file_done(&mut self, done: usize, bytes: u64) {
        if let Some((_, total)) = self.files {
            self.files = Some((done, total));
        }
        self.update(bytes);
    }

    fn update(&mut self, bytes: u64) {
        let now = Instant::now();
        let due = match self.last_shown {
            None => now.duration_since(self.started) >= Self::AFTER,
            Some(last) => now.duration_since(last) >= Self::EVERY,
        };
        if self.enabled && due {
            self.last_shown = Some(now);
            eprint!("\r{}", self.line(bytes));
        }
    }

    fn finish(&self, bytes: u64) {
        if self.enabled && self.last_shown.is_some() {
            eprintln!("\r{}", self.line(bytes));
        }
    }

    fn line(&self, bytes: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let mib = bytes as f64 / (1024.0 * 1024.0);
        let files = match self.files {
            Some((done, total)) => format!(" {done} of {total} files,"),
            None => String::new(),
        };
        format!("{}{files} {mib:.1} MiB at {:.1} MiB/s   ", self.verb, mib / secs)
    }
}

/// Logs to stderr, colored on a terminal: level, then the node's name (the
/// log target), then the message.
fn init_logging(level: LevelFilter) {
    let config = ConfigBuilder::new()
        .set_target_level(LevelFilter::Error)
        .set_thread_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off)
        .set_time_format_rfc3339()
        .build();
    // termcolor's `Auto` looks only at TERM, so ask whether stderr really
    // is a terminal: no escape codes in log files and pipes.
    let color = if io::stderr().is_terminal() { ColorChoice::Auto } else { ColorChoice::Never };
    let _ = TermLogger::init(level, config, TerminalMode::Stderr, color);
}
