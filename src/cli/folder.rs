//! Folders from the command line: `put KEY DIR`, `get --prefix P -o OUTDIR`
//! and `ls PREFIX`.
//!
//! Keys are flat strings; a folder is a naming convention on top of them,
//! kept entirely by the client. The file `DIR/a/b.txt` put under `KEY` is
//! stored under the key `KEY/a/b.txt`, with `/` between the parts whatever
//! the platform, and "the folder `P`" is every key that starts with `P/`.
//! No node knows about folders: a folder put is one `Put` per file, one after
//! the other on one connection, and a folder get is a `List` and then one
//! `Get` per key. A put sends up to [`PUTS_AHEAD`] files before it waits for
//! the first one's answer, so the node can commit them together.
//!
//! Files go in key order, so "how far it got" is one number: a put that
//! stops at a file has stored the files before it in `ls` order. If the
//! node refused the file, files sent after it may be stored as well, and
//! the error says how many.
//!
//! # Keys become paths
//!
//! On the way out, each key is a path chosen by whoever stored it, so the
//! part below the prefix is checked before it becomes a path under OUTDIR
//! ([`check_below`]): an absolute path or a `..` part would leave OUTDIR; an
//! empty part (`//`, a trailing `/`) or a `.` part would let two keys name
//! one file; a NUL cannot be in a file name. Such a key is refused, never
//! written, and the other keys still are. Folders below OUTDIR are entered
//! only if they are real folders, not symbolic links, so a link inside
//! OUTDIR cannot send a file elsewhere either.
//!
//! Not implemented: empty folders (a key names a file, so an empty folder
//! has nothing to store), file modes and times, and symbolic links, which
//! are reported and skipped rather than followed.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::fs::{self, File, FileType};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use gossipfs::Error;
use gossipfs::frame::check_key;
use gossipfs::frame::client::ListingEntry;

use super::OutputFile;
use super::client::Client;

/// The separator between a key's parts, on every platform.
const SEPARATOR: char = '/';

/// `prefix` without trailing `/`s, so that `photos/` and `photos` name the
/// same folder; `None` if nothing is left.
pub fn trim_prefix(prefix: &str) -> Option<&str> {
    let trimmed = prefix.trim_end_matches(SEPARATOR);
    (!trimmed.is_empty()).then_some(trimmed)
}

/// The part of `key` below the folder `prefix`, if the key is in it:
/// `below("a", "a/b/c")` is `Some("b/c")`; the key `a` itself and the key
/// `ab/c` are not in folder `a`.
pub fn below<'k>(prefix: &str, key: &'k str) -> Option<&'k str> {
    key.strip_prefix(prefix)?.strip_prefix(SEPARATOR)
}

/// Why `below` (a key's part below its prefix) cannot become a path under
/// the output folder, if it cannot. See the module doc.
///
/// # Errors
///
/// The reason, for people: "a `..` part would leave the output folder".
pub fn check_below(below: &str) -> std::result::Result<(), String> {
    if below.contains('\0') {
        return Err("a NUL byte cannot be in a file name".into());
    }
    if below.starts_with(SEPARATOR) {
        return Err("an absolute path (it starts with `/`) would leave the output folder".into());
    }
    for part in below.split(SEPARATOR) {
        match part {
            "" => return Err("an empty part (`//` or a trailing `/`) is ambiguous".into()),
            ".." => return Err("a `..` part would leave the output folder".into()),
            "." => return Err("a `.` part is ambiguous".into()),
            _ => {}
        }
        // Each part must be one plain name to this platform's paths too:
        // on Windows, `\` separates and `C:` starts a drive.
        let mut components = Path::new(part).components();
        if !matches!((components.next(), components.next()), (Some(Component::Normal(_)), None)) {
            return Err(format!("the part {part:?} is not a plain file name here"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// put KEY DIR
// ---------------------------------------------------------------------------

/// A folder to put: its regular files with the key each goes under, and
/// what was left out.
#[derive(Debug, Default)]
pub struct Tree {
    /// The files to store, sorted by key.
    pub files: Vec<TreeFile>,
    /// What is not stored, and why, in the order met.
    pub skipped: Vec<Skipped>,
}

/// One regular file of a [`Tree`].
#[derive(Debug)]
pub struct TreeFile {
    /// Where it is on disk.
    pub path: PathBuf,
    /// The key it is stored under: `KEY/relative/path`.
    pub key: String,
}

/// An entry of a folder that is not stored.
#[derive(Debug)]
pub struct Skipped {
    /// Where it is on disk.
    pub path: PathBuf,
    /// Why it is left out: "a symbolic link; links are not followed".
    pub why: String,
}

/// Lists the regular files under `dir`, each keyed `prefix/relative/path`,
/// and what is skipped: symbolic links (never followed), special files,
/// names that are not UTF-8, keys over the length limit, empty folders.
///
/// The walk finishes before anything is stored, so a folder that cannot be
/// read fails the put before it starts.
///
/// # Errors
///
/// An error naming the folder or entry that could not be read.
pub fn walk(dir: &Path, prefix: &str) -> io::Result<Tree> {
    let mut tree = Tree::default();
    walk_into(dir, prefix, &mut tree)?;
    tree.files.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(tree)
}

/// Adds the entries of `dir`, whose files are keyed under `key`, to `tree`.
fn walk_into(dir: &Path, key: &str, tree: &mut Tree) -> io::Result<()> {
    let cannot_read = |err: io::Error| {
        io::Error::new(err.kind(), format!("cannot read the folder {}: {err}", dir.display()))
    };
    let mut entries = fs::read_dir(dir)
        .and_then(|entries| entries.collect::<io::Result<Vec<_>>>())
        .map_err(cannot_read)?;
    if entries.is_empty() {
        let why = "an empty folder; only files are stored".to_string();
        tree.skipped.push(Skipped { path: dir.to_path_buf(), why });
        return Ok(());
    }
    // Sorted, so that the skipped entries are reported in a stable order.
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let path = entry.path();
        let mut skip = |why: String| tree.skipped.push(Skipped { path: path.clone(), why });
        // The entry's own type: a symbolic link is a link, not its target.
        let file_type = entry.file_type().map_err(|err| {
            io::Error::new(err.kind(), format!("cannot read {}: {err}", path.display()))
        })?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            let what = if file_type.is_dir() { "a folder" } else { "an entry" };
            skip(format!("{what} whose name is not UTF-8, as keys must be"));
            continue;
        };
        let child_key = format!("{key}{SEPARATOR}{name}");
        if file_type.is_dir() {
            walk_into(&path, &child_key, tree)?;
        } else if !file_type.is_file() {
            skip(not_a_file(file_type));
        } else if let Err(err) = check_key(&child_key) {
            skip(format!("its key would be too long ({err})"));
        } else {
            tree.files.push(TreeFile { path, key: child_key });
        }
    }
    Ok(())
}

/// Why an entry that is neither a folder nor a regular file is skipped.
fn not_a_file(file_type: FileType) -> String {
    if file_type.is_symlink() {
        return "a symbolic link; links are not followed".into();
    }
    let kind = special_kind(file_type).unwrap_or("not a regular file");
    format!("{kind}; only regular files are stored")
}

#[cfg(unix)]
fn special_kind(file_type: FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    [
        (file_type.is_fifo(), "a named pipe"),
        (file_type.is_socket(), "a socket"),
        (file_type.is_block_device(), "a block device"),
        (file_type.is_char_device(), "a character device"),
    ]
    .into_iter()
    .find_map(|(is, kind)| is.then_some(kind))
}

#[cfg(not(unix))]
fn special_kind(_: FileType) -> Option<&'static str> {
    None
}

/// How many files a folder put sends before it waits for the first one's
/// answer: enough for the node to commit a full batch while the next one
/// arrives.
pub const PUTS_AHEAD: usize = 128;

/// Stores every file of `tree` through `client`, in key order, up to
/// [`PUTS_AHEAD`] of them sent ahead of their answers; `progress` is called
/// after each answer with the files and bytes stored so far. Returns the
/// bytes stored.
///
/// # Errors
///
/// [`Stopped`] at the first file that cannot be read or that the node does
/// not store: it names the file and says which files were stored before it.
/// The file it stopped at is not stored (a put cut short stores nothing).
pub fn put_tree(
    client: &mut Client,
    tree: &Tree,
    progress: &mut dyn FnMut(usize, u64),
) -> std::result::Result<u64, Stopped> {
    let stopped = Stopped::new("stored", "stored", tree.files.len());
    let mut put = Putting { stopped, bytes: 0, sent: VecDeque::new() };
    for file in &tree.files {
        if put.sent.len() == PUTS_AHEAD {
            put.answer_oldest(client, progress)?;
        }
        match send_file(client, file) {
            Ok(size) => put.sent.push_back((&file.key, size)),
            Err(why) => {
                // What was sent before this file is answered first, so the
                // error says exactly what was stored.
                put.answer_all(client, progress)?;
                return Err(put.stopped.at(why));
            }
        }
    }
    put.answer_all(client, progress)?;
    Ok(put.bytes)
}

/// Sends the put of one file, without waiting for its answer; on failure,
/// says why, naming the file.
fn send_file(client: &mut Client, file: &TreeFile) -> std::result::Result<u64, String> {
    let cannot_read = |err| format!("cannot read {}: {err}", file.path.display());
    let opened = File::open(&file.path).map_err(cannot_read)?;
    let mut content = TrackedFile { file: opened, failed: None };
    client.send_put(&file.key, &mut content, &mut |_| {}).map_err(|err| {
        match content.failed.take() {
            // The client gives up on a read error without ending the file, so
            // the node discards what it got of it.
            Some(failed) => cannot_read(failed),
            None => format!("{}: {err}", file.key),
        }
    })
}

/// A folder put under way: the files sent and not yet answered.
struct Putting<'t> {
    /// How far it got.
    stopped: Stopped,
    /// Bytes of the files answered.
    bytes: u64,
    /// The key and size of each file sent and not yet answered, oldest
    /// first.
    sent: VecDeque<(&'t str, u64)>,
}

impl Putting<'_> {
    /// Takes the node's answer to the oldest file sent.
    fn answer_oldest(
        &mut self,
        client: &mut Client,
        progress: &mut dyn FnMut(usize, u64),
    ) -> std::result::Result<(), Stopped> {
        let Some((key, size)) = self.sent.pop_front() else { return Ok(()) };
        if let Err(err) = client.put_answered(key) {
            let mut at = self.stopped.at(format!("{key}: {err}"));
            // The node may have stored files sent after this one.
            for (key, _) in self.sent.drain(..) {
                at.stored_after += usize::from(client.put_answered(key).is_ok());
            }
            return Err(at);
        }
        self.bytes += size;
        self.stopped.done(key.to_string());
        progress(self.stopped.done, self.bytes);
        Ok(())
    }

    /// Takes the answers to every file sent.
    fn answer_all(
        &mut self,
        client: &mut Client,
        progress: &mut dyn FnMut(usize, u64),
    ) -> std::result::Result<(), Stopped> {
        while !self.sent.is_empty() {
            self.answer_oldest(client, progress)?;
        }
        Ok(())
    }
}

/// A file being put, remembering a read error: the client reports any
/// failure as its own, and only this can tell the disk's from the node's.
struct TrackedFile {
    /// The file.
    file: File,
    /// The error a read returned, if one did.
    failed: Option<io::Error>,
}

impl Read for TrackedFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf).inspect_err(|err| {
            self.failed = Some(io::Error::new(err.kind(), err.to_string()));
        })
    }
}

// ---------------------------------------------------------------------------
// get --prefix P -o OUTDIR
// ---------------------------------------------------------------------------

/// The files under a prefix and where each goes in the output folder, and
/// the keys refused.
#[derive(Debug, Default)]
pub struct Download {
    /// The keys to write, in key order.
    pub files: Vec<Planned>,
    /// Keys under the prefix that are not written, and why.
    pub refused: Vec<(String, String)>,
}

/// One key to write and its path.
#[derive(Debug)]
pub struct Planned {
    /// The key.
    pub key: String,
    /// The part of the key below the prefix, as checked by [`check_below`].
    pub below: String,
    /// `OUTDIR/below`, with this platform's separators.
    pub target: PathBuf,
}

/// Plans the get of every key in `listing` under `prefix` into `out_dir`:
/// refuses the keys that fail [`check_below`], and those whose path is
/// also a folder that another key's file needs (keys `p/a` and `p/a/b`).
pub fn plan_download(listing: &[ListingEntry], prefix: &str, out_dir: &Path) -> Download {
    let mut download = Download::default();
    let mut safe = Vec::new();
    for entry in listing {
        let Some(rest) = below(prefix, &entry.key) else {
            continue;
        };
        match check_below(rest) {
            Ok(()) => safe.push((entry.key.clone(), rest.to_string())),
            Err(why) => download.refused.push((entry.key.clone(), why)),
        }
    }
    let folders: BTreeSet<&str> = safe
        .iter()
        .flat_map(|(_, rest)| rest.match_indices(SEPARATOR).map(|(at, _)| &rest[..at]))
        .collect();
    let mut files = Vec::with_capacity(safe.len());
    for (key, rest) in &safe {
        if folders.contains(rest.as_str()) {
            let why = format!("{rest} is also a folder of other keys under {prefix}/");
            download.refused.push((key.clone(), why));
            continue;
        }
        let mut target = out_dir.to_path_buf();
        target.extend(rest.split(SEPARATOR));
        files.push(Planned { key: key.clone(), below: rest.clone(), target });
    }
    download.files = files;
    download
}

impl Download {
    /// The targets that exist already, to be refused without `--force`.
    pub fn existing(&self) -> Vec<&Path> {
        let files = self.files.iter().map(|file| file.target.as_path());
        files.filter(|target| fs::symlink_metadata(target).is_ok()).collect()
    }
}

/// What [`get_tree`] did.
#[derive(Debug, Default)]
pub struct Got {
    /// Files written.
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Keys deleted between the listing and their get: not written.
    pub vanished: Vec<String>,
}

/// Writes every planned file into `out_dir`, one after the other in key
/// order, each through a temp file renamed into place. Replaces files that
/// exist only if `force`. `progress` is called after each file with the
/// files and bytes written so far.
///
/// # Errors
///
/// [`Stopped`] at the first file that cannot be got or written (one that
/// exists, without `force`): it names the key or path and says which files
/// were written before it. No partial file is left behind.
pub fn get_tree(
    client: &mut Client,
    download: &Download,
    out_dir: &Path,
    force: bool,
    progress: &mut dyn FnMut(usize, u64),
) -> std::result::Result<Got, Stopped> {
    let mut stopped = Stopped::new("wrote", "written", download.files.len());
    let mut got = Got::default();
    fs::create_dir_all(out_dir).map_err(|err| {
        stopped.at(format!("cannot create the folder {}: {err}", out_dir.display()))
    })?;
    for file in &download.files {
        let mut out = create_parents(out_dir, &file.below)
            .and_then(|()| OutputFile::create(&file.target))
            .map_err(|err| stopped.at(err.to_string()))?;
        match client.get(&file.key, out.file(), &mut |_| {}) {
            Ok(size) => got.bytes += size,
            // Deleted since the listing: nothing to write, and not a
            // failure. Dropping `out` removes the temp file.
            Err(Error::NotFound(_)) => {
                got.vanished.push(file.key.clone());
                continue;
            }
            Err(err) => return Err(stopped.at(format!("{}: {err}", file.key))),
        }
        let committed = if force { out.commit() } else { out.commit_new() };
        committed.map_err(|err| stopped.at(err.to_string()))?;
        got.files += 1;
        stopped.done(file.target.display().to_string());
        progress(got.files, got.bytes);
    }
    Ok(got)
}

/// Creates the folders of `below` under `out_dir`, entering only real
/// folders: a symbolic link on the way is refused, not followed.
fn create_parents(out_dir: &Path, below: &str) -> io::Result<()> {
    let Some((folders, _file)) = below.rsplit_once(SEPARATOR) else {
        return Ok(());
    };
    let mut dir = out_dir.to_path_buf();
    for part in folders.split(SEPARATOR) {
        dir.push(part);
        let refuse = |why: &str| {
            let message = format!("cannot write below {}: {why}", dir.display());
            Err(io::Error::new(io::ErrorKind::AlreadyExists, message))
        };
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.file_type().is_symlink() => {
                return refuse("it is a symbolic link, and links are not followed");
            }
            Ok(_) => return refuse("it is a file, not a folder"),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&dir).map_err(|err| {
                    io::Error::new(err.kind(), format!("cannot create {}: {err}", dir.display()))
                })?;
            }
            Err(err) => {
                return Err(io::Error::new(
                    err.kind(),
                    format!("cannot read {}: {err}", dir.display()),
                ));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// How far a folder transfer got
// ---------------------------------------------------------------------------

/// A folder transfer that stopped at one file: why, and how far it had got.
#[derive(Debug)]
pub struct Stopped {
    /// What went wrong, naming the file or key.
    why: String,
    /// What was done to each file, as in "wrote the first 2": "stored",
    /// "wrote".
    verb: &'static str,
    /// The same as in "nothing was written": "stored", "written".
    participle: &'static str,
    /// Files done before it.
    done: usize,
    /// Files it meant to move.
    total: usize,
    /// The last file done: its key, or its path.
    last: Option<String>,
    /// Files sent after the one it stopped at that were stored anyway (a
    /// folder put sends files ahead of their answers).
    stored_after: usize,
}

impl Stopped {
    /// Nothing done yet of `total` files; `verb` and `participle` say
    /// what is done to each ("wrote", "written").
    fn new(verb: &'static str, participle: &'static str, total: usize) -> Stopped {
        Stopped {
            why: String::new(),
            verb,
            participle,
            done: 0,
            total,
            last: None,
            stored_after: 0,
        }
    }

    /// Counts `last` as done.
    fn done(&mut self, last: String) {
        self.done += 1;
        self.last = Some(last);
    }

    /// The transfer stopped here, because of `why`.
    fn at(&self, why: String) -> Stopped {
        Stopped { why, last: self.last.clone(), ..*self }
    }
}

impl fmt::Display for Stopped {
    /// `cannot read d/c.txt: ...; stored the first 2 of 4 files (in key
    /// order, through k/b.txt); the other 2 were not`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.last {
            None => write!(f, "{}; nothing was {}", self.why, self.participle)?,
            Some(last) => write!(
                f,
                "{}; {} the first {} of {} files (in key order, through {last}); the other {} were not",
                self.why,
                self.verb,
                self.done,
                self.total,
                self.total - self.done
            )?,
        }
        match self.stored_after {
            0 => Ok(()),
            n => write!(f, ", except {n} sent after it, which were {} too", self.participle),
        }
    }
}

impl From<Stopped> for Error {
    fn from(stopped: Stopped) -> Error {
        Error::Io(io::Error::other(stopped.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gossipfs::Version;

    fn keys(tree: &Tree) -> Vec<&str> {
        tree.files.iter().map(|file| file.key.as_str()).collect()
    }

    fn entry(key: &str) -> ListingEntry {
        ListingEntry { key: key.to_string(), size: 1, version: Version::default() }
    }

    #[test]
    fn a_folder_is_the_keys_below_its_prefix() {
        assert_eq!(below("a", "a/b/c"), Some("b/c"));
        assert_eq!(below("a", "a"), None);
        assert_eq!(below("a", "ab/c"), None);
        assert_eq!(trim_prefix("photos//"), Some("photos"));
        assert_eq!(trim_prefix("/"), None);
    }

    #[test]
    fn keys_that_would_leave_the_output_folder_are_refused() {
        for bad in ["../x", "a/../../x", "/etc/passwd", "a//b", "a/", "./a", "a/.", "a\0b", ""] {
            assert!(check_below(bad).is_err(), "{bad:?} was accepted");
        }
        for good in ["a", "a/b/c", "...", "a b/é", ".hidden/x"] {
            assert_eq!(check_below(good), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn a_key_that_is_also_a_folder_is_refused() {
        let listing = [entry("p/a"), entry("p/a/b"), entry("p/c"), entry("q/d")];
        let plan = plan_download(&listing, "p", Path::new("out"));
        let planned: Vec<&str> = plan.files.iter().map(|file| file.key.as_str()).collect();
        assert_eq!(planned, ["p/a/b", "p/c"]);
        assert_eq!(plan.refused.len(), 1);
        assert_eq!(plan.refused[0].0, "p/a");
        assert_eq!(plan.files[0].target, Path::new("out").join("a").join("b"));
    }

    #[test]
    fn a_walk_keys_files_by_their_path_and_sorts_them() {
        let dir = super::super::ScratchDir::new("folder-walk").unwrap();
        fs::create_dir_all(dir.0.join("b/c")).unwrap();
        fs::create_dir(dir.0.join("empty")).unwrap();
        fs::write(dir.0.join("b/c/d"), b"1").unwrap();
        fs::write(dir.0.join("b-a"), b"2").unwrap();
        fs::write(dir.0.join("a"), b"3").unwrap();
        let tree = walk(&dir.0, "k").unwrap();
        // Key order, not walk order: `-` sorts before `/`.
        assert_eq!(keys(&tree), ["k/a", "k/b-a", "k/b/c/d"]);
        assert_eq!(tree.skipped.len(), 1);
        assert!(tree.skipped[0].why.contains("empty folder"), "{:?}", tree.skipped);
    }

    #[test]
    fn stopped_says_how_far_it_got() {
        let mut stopped = Stopped::new("stored", "stored", 4);
        assert_eq!(stopped.at("boom".into()).to_string(), "boom; nothing was stored");
        let wrote = Stopped::new("wrote", "written", 4);
        assert_eq!(wrote.at("boom".into()).to_string(), "boom; nothing was written");
        stopped.done("k/a".into());
        stopped.done("k/b".into());
        assert_eq!(
            stopped.at("boom".into()).to_string(),
            "boom; stored the first 2 of 4 files (in key order, through k/b); the other 2 were not"
        );
    }
}
