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
//! every new write, and its data would silently disappear. A root of
//! format 2, whose key files sat in 256 fan-out directories, is moved to
//! format 3's one directory.
//!
//! Hooks into the core at `Store::open`, which checks the format first and
//! believes the index only after this has rebuilt it from the headers.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use log::{debug, warn};

use crate::error::{Error, Result};

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

/// The format of a root this build reads and writes: 3, with versions from
/// hybrid logical clocks, and every key file in `objects/` itself.
const ROOT_FORMAT: &str = "3";

/// Checks the root's format, or marks a new root with it. A format 2 root
/// is moved to format 3 first.
///
/// # Errors
///
/// [`Error::Config`] for a root written by another format: one with no
/// format file but a node id was written by format 1. [`Error::Io`] if a
/// format 2 root cannot be moved.
pub(crate) fn check_format(root: &Path) -> Result<()> {
    let path = root.join("format");
    match fs::read_to_string(&path) {
        Ok(text) if text.trim() == ROOT_FORMAT => Ok(()),
        Ok(text) if text.trim() == "2" => {
            flatten_objects(root)?;
            write_atomically(root, "format", format!("{ROOT_FORMAT}\n").as_bytes(), true)
        }
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

/// Moves the key files of a format 2 root up from their fan-out
/// directories (`objects/ab/`) into `objects/`, syncs it, and removes the
/// emptied directories. Each move is a rename, and the format file says 2
/// until every file has moved, so a start cut short moves the rest next time.
fn flatten_objects(root: &Path) -> Result<()> {
    let objects = root.join("objects");
    // Listed whole before anything moves into `objects/`: a listing that
    // changes under it may skip entries.
    let mut dirs = key_files(root)?;
    dirs.retain(|path| path.is_dir());
    for dir in &dirs {
        for file in fs::read_dir(dir)? {
            let file = file?;
            fs::rename(file.path(), objects.join(file.file_name()))?;
        }
    }
    File::open(&objects)?.sync_all()?;
    // Fails, and so keeps format 2, if a folder is not empty yet.
    for dir in dirs {
        fs::remove_dir(dir)?;
    }
    Ok(())
}

/// Removes the temp files a crash left behind.
///
/// # Errors
///
/// [`crate::Error::Io`] if `ROOT/tmp` cannot be read.
pub(crate) fn sweep_temp_files(name: &str, root: &Path) -> Result<()> {
    for leftover in fs::read_dir(root.join("tmp"))? {
        let path = leftover?.path();
        debug!(target: name, "Removing leftover temp file {}", path.display());
        fs::remove_file(&path)?;
    }
    Ok(())
}

/// Moves a damaged file out of `objects/` into `corrupt/`, for a person to
/// look at, saying `why` in the log; best effort (if it fails, the file
/// stays and is skipped again).
pub(crate) fn set_aside(name: &str, root: &Path, path: &Path, why: &str, detail: &str) {
    warn!(target: name, "Setting aside {why} key file {}: {detail}", path.display());
    let dir = root.join("corrupt");
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let _ = fs::create_dir_all(&dir);
    let _ = fs::rename(path, dir.join(format!("{name}-{why}")));
}

/// Every file in `objects/`.
pub(crate) fn key_files(root: &Path) -> Result<Vec<PathBuf>> {
    let files = fs::read_dir(root.join("objects"))?;
    Ok(files.map(|file| file.map(|file| file.path())).collect::<io::Result<_>>()?)
}

/// Writes `ROOT/name` atomically: a temp file in `ROOT/tmp`, renamed.
pub(crate) fn write_atomically(root: &Path, name: &str, bytes: &[u8], fsync: bool) -> Result<()> {
    let temp = root.join("tmp").join(format!("{name}.{}.tmp", std::process::id()));
    let mut file = File::create(&temp)?;
    file.write_all(bytes)?;
    if fsync {
        file.sync_all()?;
    }
    fs::rename(&temp, root.join(name))?;
    if fsync {
        File::open(root)?.sync_all()?;
    }
    Ok(())
}
