//! Hardening: crash recovery. What a node does at start with what a crash,
//! a kill or a full disk may have left in its root.
//!
//! The store's commits are atomic (temp file, fsync, rename), so a crash
//! never leaves a half-written key file where a reader would find it. But it
//! can leave:
//!
//! - temp files in `ROOT/tmp/`: writes cut short. They are removed.
//! - a key file older than the clear watermark: a clear that wrote its
//!   watermark and was stopped before it removed every older file. Its work
//!   is finished here.
//! - a key file whose header is damaged, names another key, or disagrees
//!   with the file's length (a crash with fsync off). It is moved to
//!   `ROOT/corrupt/` for a person to look at, and anti-entropy fetches the
//!   key again from a peer.
//!
//! And a root written by a gossipfs whose versions meant something else
//! (format 1, Lamport counters) is refused with a clear error at start
//! ([`check_format`]): read as hybrid times, its versions would all lose to
//! every new write, and its data would silently disappear.
//!
//! Hooks into the core at `Store::open`, which checks the format first and
//! believes the index only after this has rebuilt it from the headers.

use std::fs;
use std::path::{Path, PathBuf};

use log::{debug, warn};

use crate::error::{Error, Result};
use crate::store::{Index, Store, read_header_at, write_atomically};
use crate::version::Version;

/// Locks `ROOT/lock` for this process, so a second node on the same root
/// (which would delete the first one's temp files at its start, and race
/// its commits) fails at once.
///
/// # Errors
///
/// [`Error::Config`] if another process holds the root.
pub(crate) fn lock_root(root: &Path) -> Result<fs::File> {
    let file =
        fs::OpenOptions::new().create(true).truncate(false).write(true).open(root.join("lock"))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(Error::Config(format!(
            "{} is in use by another gossipfs node; one root, one node",
            root.display()
        ))),
        Err(fs::TryLockError::Error(err)) => Err(err.into()),
    }
}

/// The format of a root this build reads and writes: 2, with versions from
/// hybrid logical clocks.
const ROOT_FORMAT: &str = "2";

/// Checks the root's format, or marks a new root with it.
///
/// # Errors
///
/// [`Error::Config`] for a root written by another format: one with no
/// format file but a node id was written by format 1.
pub(crate) fn check_format(root: &Path) -> Result<()> {
    let path = root.join("format");
    match fs::read_to_string(&path) {
        Ok(text) if text.trim() == ROOT_FORMAT => Ok(()),
        Ok(text) => Err(Error::Config(format!(
            "{} says format {:?}; this gossipfs reads format {ROOT_FORMAT}",
            path.display(),
            text.trim()
        ))),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            if root.join("node-id").exists() {
                return Err(Error::Config(format!(
                    "{} was written by an older gossipfs (format 1, Lamport versions); this \
                     one orders versions by hybrid logical clocks and cannot read it. Start \
                     on a new root, or move this one aside",
                    root.display()
                )));
            }
            write_atomically(root, "format", format!("{ROOT_FORMAT}\n").as_bytes(), true)
        }
        Err(err) => Err(err.into()),
    }
}

/// Sweeps the temp files and rebuilds the index from the key files'
/// headers, given the clear watermark `cleared`.
///
/// # Errors
///
/// [`crate::Error::Io`] if the root's directories cannot be read.
pub(crate) fn rebuild_index(store: &Store, cleared: Version) -> Result<Index> {
    let name = store.name.as_str();
    for leftover in fs::read_dir(store.root.join("tmp"))? {
        let path = leftover?.path();
        debug!(target: name, "Removing leftover temp file {}", path.display());
        fs::remove_file(&path)?;
    }
    let mut index = Index { cleared, ..Index::default() };
    for path in key_files(&store.root)? {
        let why = match read_header_at(&path) {
            // A clear was cut short after it wrote the watermark: finish it.
            Ok((_, entry)) if entry.version < cleared => {
                if let Err(err) = fs::remove_file(&path) {
                    warn!(target: name, "Cannot remove cleared file {}: {err}", path.display());
                }
                continue;
            }
            Ok((key, entry)) if store.path_for(&key) == path => {
                index.entries.insert(key, entry);
                continue;
            }
            Ok((key, _)) => format!("it holds key {key:?}, which belongs elsewhere"),
            Err(err) => err.to_string(),
        };
        // A damaged file must not linger where `open_file` would find it.
        warn!(target: name, "Setting aside damaged key file {}: {why}", path.display());
        set_aside(&store.root, &path, "damaged");
    }
    Ok(index)
}

/// Moves a file out of `objects/` into `corrupt/`, for a person to look
/// at; best effort (if it fails, the file stays and is skipped again).
fn set_aside(root: &Path, path: &Path, why: &str) {
    let dir = root.join("corrupt");
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let _ = fs::create_dir_all(&dir);
    let _ = fs::rename(path, dir.join(format!("{name}-{why}")));
}

/// Every file under `objects/*/`.
pub(crate) fn key_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for dir in fs::read_dir(root.join("objects"))? {
        let dir = dir?.path();
        if !dir.is_dir() {
            continue;
        }
        for file in fs::read_dir(&dir)? {
            files.push(file?.path());
        }
    }
    Ok(files)
}
